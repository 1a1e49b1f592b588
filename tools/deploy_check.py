"""fp16 and second-runtime figures for the bundled pairs: what `merge --fp16` / `deploy --fp16` and OpenVINO change.

For every pair given (default: the s0 pair of each architecture) this merges A and B with onnxzip's defaults
(ZipIt!, 1000 calibration samples of which 200 are held back to verify), converts the merge to float16 and records:

- the fp16 check that `merge --fp16` writes into the card: per head, top-1 agreement with the float32 merge and max
  relative error on the 200 held-back samples;
- joint accuracy of the float32 and the float16 merge on the full evaluation set (`models/data/eval.npz`);
- OpenVINO (CPU plugin, f32 precision) against onnxruntime on the held-back samples: max relative error of the
  float32 merge, top-1 agreement of the float16 merge;
- throughput (images/s, onnxruntime CPU) at batch 1, 8, 64 of the float32 merge, of the float16 merge, and of A then
  B one after the other (`onnxzip eval --compare`).

Writes `docs/results/deploy_check.json` (every figure) and prints a markdown table. Usage, from the repository root:

    python3 tools/deploy_check.py                           # mlp-s0 vgg-s0 resnet20-s0 resnet20x2-s0
    python3 tools/deploy_check.py --pairs mlp-s1 --no-throughput
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import onnxzip  # noqa: E402
from onnxzip.deploy import check_fp16, check_samples, to_fp16  # noqa: E402
from onnxzip.evaluate import evaluate, load_eval_data, measure_throughput  # noqa: E402
from onnxzip.onnx_io import load_model  # noqa: E402
from onnxzip.runtime import OpenVINOSession  # noqa: E402


def _openvino(model, samples, reference_model):
    """(max relative error, top-1 agreement) of OpenVINO against onnxruntime, per output."""
    from onnxzip.calibration import make_session

    ov = OpenVINOSession(model)
    ort = make_session(reference_model, "cpu", "basic")
    names = [o.name for o in model.graph.output]
    got = ov.run(names, samples)
    want = ort.run(names, samples)
    rows = []
    for name, g, w in zip(names, got, want):
        rows.append({"output": name, "max_relative_error": float(np.abs(g - w).max() / np.abs(w).max()),
                     "top1_agreement": float(np.mean(g.argmax(1) == w.argmax(1)))})
    return rows


def check_pair(pair: str, x, y, throughput: bool) -> dict:
    folder = os.path.join(ROOT, "models", pair)
    with open(os.path.join(folder, "card.json"), encoding="utf-8") as f:
        tasks = json.load(f)["tasks"]
    a, b = os.path.join(folder, "a.onnx"), os.path.join(folder, "b.onnx")
    calib = os.path.join(ROOT, "models", "data", "calib.npy")
    merged = onnxzip.merge(a, b, calib, None, num_samples=1000, device="cpu")
    # the held-back samples found again through the card, as `deploy --fp16` does; the same check `merge --fp16`
    # runs on them (force: record a low agreement rather than stop)
    samples, source = check_samples(merged.model, merged.card)
    half = to_fp16(merged.model)
    row = {"pair": pair, "samples": source,
           "fp16_check": check_fp16(merged.model, half, samples, source, force=True)}
    for label, model in (("fp32", merged.model), ("fp16", half)):
        report = evaluate(model, x, y, tasks, latency=False)
        row[f"joint_{label}"] = report.joint_accuracy
        row[f"per_task_{label}"] = report.per_task_accuracy
    row["openvino_fp32"] = _openvino(merged.model, samples, merged.model)
    row["openvino_fp16"] = _openvino(half, samples, half)
    if throughput:
        shape = x.shape[1:]
        row["throughput"] = {
            "merged_fp32": measure_throughput(merged.model, input_shape=shape),
            "merged_fp16": measure_throughput(half, input_shape=shape),
            "a_then_b": measure_throughput([load_model(a), load_model(b)], input_shape=shape),
        }
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["mlp-s0", "vgg-s0", "resnet20-s0", "resnet20x2-s0"])
    parser.add_argument("--eval", default=os.path.join(ROOT, "models", "data", "eval.npz"))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "results", "deploy_check.json"))
    parser.add_argument("--no-throughput", dest="throughput", action="store_false")
    args = parser.parse_args(argv)
    x, y = load_eval_data(args.eval)
    rows = []
    for pair in args.pairs:
        print(f"{pair} ...", file=sys.stderr, flush=True)
        rows.append(check_pair(pair, x, y, args.throughput))
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
                       "command": "python3 tools/deploy_check.py " + " ".join(argv or sys.argv[1:]),
                       "pairs": rows}, f, indent=2)
    print("| pair | fp16 top-1 agreement a / b | fp16 max rel. error a / b | joint fp32 → fp16 | "
          "OpenVINO fp32 max rel. error | OpenVINO fp16 top-1 agreement |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        h = r["fp16_check"]["heads"]
        agree = " / ".join(f"{x['top1_agreement']:.3f}" for x in h)
        error = " / ".join(f"{x['max_relative_error']:.2g}" for x in h)
        print(f"| {r['pair']} | {agree} | {error} | "
              f"{100 * r['joint_fp32']:.2f} → {100 * r['joint_fp16']:.2f} | "
              f"{max(x['max_relative_error'] for x in r['openvino_fp32']):.2g} | "
              f"{min(x['top1_agreement'] for x in r['openvino_fp16']):.3f} |")
    if any("throughput" in r for r in rows):
        print("\n| pair | merged fp32 img/s @1/8/64 | merged fp16 | A then B |")
        print("| --- | --- | --- | --- |")
        for r in rows:
            t = r.get("throughput")
            if t:
                cells = [" / ".join(f"{v:,.0f}" for v in t[k].values()) for k in ("merged_fp32", "merged_fp16",
                                                                                    "a_then_b")]
                print(f"| {r['pair']} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
