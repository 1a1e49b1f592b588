"""The paper's BN reset against onnxzip's measured-statistics repair, on the BatchNorm-kept exports.

Usage: python3 tools/repair_targets.py [--pairs vgg-s0 resnet20-s0] [--eval PATH] [--out FILE]

For each pair, the BatchNorm-kept TorchScript export in `models/<pair>/variants/bn_kept/` (whose BatchNorm parameters
onnxzip records before folding) is merged with ZipIt! (paper defaults) three ways: `--refit none` with the repair's
measured targets (the source channels' mean and std on the calibration data), `--refit none --repair-targets
batchnorm` (the paper's BN reset: the merged BatchNorm's beta and |gamma|), and the default least-squares refit.
Prints per-task and joint accuracy; the full Fashion-MNIST test set if installed, else models/data/eval.npz.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import onnxzip  # noqa: E402
from onnxzip.evaluate import evaluate  # noqa: E402

VARIANTS = [("measured targets (onnxzip's repair)", dict(refit="none", repair_targets="measured")),
            ("BN reset targets (the paper's)", dict(refit="none", repair_targets="batchnorm")),
            ("least-squares refit (default)", dict(refit="ls"))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=["vgg-s0", "resnet20-s0"])
    p.add_argument("--models", default=os.path.join(ROOT, "models"))
    p.add_argument("--eval", help="an .npz with x, y (default: the full test set if installed, else eval.npz)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    from benchmark import load_test_set
    x, y, desc = load_test_set(args.eval)
    calib = os.path.join(args.models, "data", "calib.npy")
    rows = []
    print(f"test set: {desc}")
    for pair in args.pairs:
        folder = os.path.join(args.models, pair, "variants", "bn_kept")
        with open(os.path.join(args.models, pair, "card.json")) as f:
            tasks = json.load(f)["tasks"]
        for label, kw in VARIANTS:
            result = onnxzip.merge(os.path.join(folder, "a.onnx"), os.path.join(folder, "b.onnx"), calib, **kw)
            report = evaluate(result.model, x, y, tasks, latency=False)
            row = {"pair": pair, "variant": label, **kw, "joint": report.joint_accuracy,
                   "per_task": report.per_task_accuracy,
                   "batchnorm_targets": result.card["repair"].get("batchnorm_targets")}
            rows.append(row)
            print(f"{pair} {label}: joint {100 * row['joint']:.1f}, task a {100 * row['per_task']['a']:.1f}, "
                  f"task b {100 * row['per_task']['b']:.1f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"test_set": desc, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
