"""Merge every torchvision classification model, as a new user would (issue 13: "never a crash").

For each model in `torchvision.models.list_models(module=torchvision.models)` (the classification models) with at
most `--max-params` parameters, built with `num_classes=10` and random weights:

1. two copies, seed 0 and seed 1 (different random initialisations; eval mode), exported with each exporter
   (`torchscript`: `torch.onnx.export(dynamo=False, opset_version=17)`, BatchNorm folded; `dynamo`:
   `dynamo=True`), at the smallest of `--sizes` at which the export runs in onnxruntime; a batch axis is dynamic;
2. `onnxzip inspect A B --json`: how many of the learned feature spaces outside the task heads are zipped by
   default;
3. `onnxzip merge A A` (twins: the same model twice, defaults: zip, least-squares refit; `--twin-options` adds
   options): the merged model's heads against A on the calibration samples (max relative error, both heads). Where
   that is not exact (1e-4) and ZipIt's beta merged features of one model with each other (lossy by design), the
   twins are merged again with `--beta 0`, which must be exact;
4. `onnxzip merge A B` (two initialisations, defaults: zip, least-squares refit): the outcome and the card's
   verification.

Every command runs as a user would run it (the `onnxzip` CLI in a subprocess). Its outcome is one of `merged`
(exit 0), `refused` (exit 2-9: an `error:` line naming what is at fault), `crash` (exit 1, an internal error, a
signal) or `timeout`. A crash is a bug.

Calibration data: seeded standard-normal images, `--samples` of them (a fifth held back by onnxzip).

torchvision's compiled operators (nms, roi_align, ...) are not needed for these models. When its extension
cannot load (the wheel on this machine is built for CUDA torch), `import_torchvision` declares the two operator
schemas torchvision registers fake kernels for at import, so that `import torchvision` succeeds.

Usage (from the repository root; needs torch, torchvision, onnxscript for dynamo):

    python3 tools/torchvision_check.py                                  # every model <= 30M params, both exporters
    python3 tools/torchvision_check.py --models resnet18 shufflenet_v2_x0_5 --exporters torchscript

Writes `docs/results/torchvision.json` (merged with what is there, per model and exporter) and prints a table.
"""
import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
RESULTS = os.path.join(ROOT, "docs", "results", "torchvision.json")
TWIN_RTOL = 1e-4


def import_torchvision():
    """`import torchvision`, declaring its nms/qnms schemas first when its compiled extension cannot load."""
    import importlib.util

    import torch
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise SystemExit("torchvision is not installed: pip install --no-deps torchvision")
    folder = os.path.dirname(spec.origin)
    library = [f for f in os.listdir(folder) if f.startswith("_C") and f.endswith(".so")]
    try:
        torch.ops.load_library(os.path.join(folder, library[0]))
        loaded = True
    except (OSError, IndexError):
        loaded = False
    if not loaded:
        for op in ("nms", "qnms"):
            try:
                torch.library.define(f"torchvision::{op}",
                                     "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:
                pass  # already declared
    import torchvision
    return torchvision


def build(tv, name, seed, size=None):
    import torch
    torch.manual_seed(seed)
    kwargs = {"weights": None, "num_classes": 10}
    if name.startswith("vit_") and size:
        kwargs["image_size"] = size  # the class token and position embeddings are sized for it
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tv.models.get_model(name, **kwargs)
    return model.eval()


def export(model, path, exporter, size):
    import torch
    x = torch.randn(2, 3, size, size)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(model, x, path, dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        else:
            torch.onnx.export(model, (x,), path, dynamo=True, input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
                              verbose=False)
    return x


def run_onnx(path, x):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    first = sess.get_inputs()[0]
    step = first.shape[0] if isinstance(first.shape[0], int) and first.shape[0] > 0 else len(x)  # a fixed batch
    runs = [sess.run(None, {first.name: x[lo:lo + step]}) for lo in range(0, len(x), step)]
    return {o.name: np.concatenate([r[k] for r in runs]) for k, o in enumerate(sess.get_outputs())}


def exported_pair(tv, name, exporter, sizes, folder, log):
    """Export seed 0 and seed 1 at the first size that exports and agrees with torch; (size, error)."""
    import torch
    error = None
    for size in sizes:
        try:
            for seed, tag in ((0, "a"), (1, "b")):
                model = build(tv, name, seed, size)
                path = os.path.join(folder, f"{tag}.onnx")
                export(model, path, exporter, size)
                x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
                with torch.no_grad():
                    ref = model(x).numpy()
                got = run_onnx(path, x.numpy())["logits"]
                if not np.allclose(got, ref, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(ref).max()))):
                    raise RuntimeError(f"onnxruntime differs from torch by {np.abs(got - ref).max():.3g}")
            return size, None
        except Exception as e:  # the exporter or the model at this size; try the next size
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            log(f"    export at {size}: {error}")
    return None, error


def onnxzip(args, timeout, stdout=None):
    """Run the onnxzip CLI; (outcome, exit code, last stderr lines, seconds). `stdout`: a list that gets its
    standard output."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "onnxzip", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "timeout", None, "", timeout
    if stdout is not None:
        stdout.append(proc.stdout)
    seconds = round(time.perf_counter() - t0, 1)
    err = proc.stderr.strip().splitlines()
    if proc.returncode == 0:
        outcome = "merged"
    elif 2 <= proc.returncode <= 9 and any(line.startswith("error:") for line in err):
        outcome = "refused"
    else:
        outcome = "crash"
    tail = "\n".join(line for line in err if not line.startswith("\r"))[-600:]
    return outcome, proc.returncode, tail if outcome != "merged" else "", seconds


def twin_error(merged, reference, data):
    """Max over heads of ||head - A|| / ||A|| on the data."""
    ref = run_onnx(reference, data)["logits"]
    out = run_onnx(merged, data)
    return max(float(np.linalg.norm(v - ref) / max(np.linalg.norm(ref), 1e-30)) for v in out.values())


def check_model(tv, name, exporter, args, log):
    row = {"model": name, "exporter": exporter}
    with tempfile.TemporaryDirectory(prefix="tvcheck-") as folder:
        t0 = time.perf_counter()
        size, error = exported_pair(tv, name, exporter, args.sizes, folder, log)
        row["export_seconds"] = round(time.perf_counter() - t0, 1)
        if size is None:
            row.update(outcome="export failed", error=error)
            return row
        row["size"] = size
        data = np.random.default_rng(0).standard_normal((args.samples, 3, size, size)).astype(np.float32)
        merge_checks(row, folder, data, args)
    return row


def merge_checks(row, folder, data, args):
    """Steps 2-4 on `folder`/a.onnx and b.onnx with calibration inputs `data` (one input); fills `row`."""
    a, b = os.path.join(folder, "a.onnx"), os.path.join(folder, "b.onnx")
    calib = os.path.join(folder, "calib.npy")
    np.save(calib, data)

    printed = []
    outcome, code, tail, seconds = onnxzip(["inspect", "--json", a, b], args.timeout, printed)
    row["inspect"] = {"outcome": outcome, "exit": code, "seconds": seconds}
    if outcome == "merged":  # exit 0
        report = json.loads(printed[0])
        row["spaces_zipped"] = report["a"]["spaces_zipped"]
        row["match"] = report["match"]["ok"]
    else:
        row["inspect"]["error"] = tail

    common = ["--data", calib, "--num-samples", str(args.samples), "--force", "-q"]
    merged = os.path.join(folder, "twins.onnx")
    outcome, code, tail, seconds = onnxzip(["merge", a, a, "-o", merged, *common, *args.twin_options],
                                           args.timeout)
    row["twins"] = {"outcome": outcome, "exit": code, "seconds": seconds, "options": list(args.twin_options)}
    if outcome == "merged":
        row["twins"]["relative_error"] = twin_error(merged, a, data[:64])
        row["twins"]["exact"] = row["twins"]["relative_error"] <= TWIN_RTOL
        with open(merged + ".json") as f:
            row["twins"]["within_model_merges"] = sum(s["within_model_merges"][0]
                                                      for s in json.load(f)["spaces"])
        if not row["twins"]["exact"] and row["twins"]["within_model_merges"]:
            # ZipIt's beta lets each model merge its own features (lossy by design); without them a twin pair
            # must come back exactly
            outcome, code, tail, seconds = onnxzip(["merge", a, a, "-o", merged, *common, *args.twin_options,
                                                    "--beta", "0"], args.timeout)
            row["twins_beta0"] = {"outcome": outcome, "exit": code, "seconds": seconds}
            if outcome == "merged":
                row["twins_beta0"]["relative_error"] = twin_error(merged, a, data[:64])
                row["twins_beta0"]["exact"] = row["twins_beta0"]["relative_error"] <= TWIN_RTOL
    else:
        row["twins"]["error"] = tail

    merged = os.path.join(folder, "pair.onnx")
    outcome, code, tail, seconds = onnxzip(["merge", a, b, "-o", merged, *common], args.timeout)
    row["pair"] = {"outcome": outcome, "exit": code, "seconds": seconds}
    if outcome == "merged":
        with open(merged + ".json") as f:
            card = json.load(f)
        row["pair"]["verification"] = [
            {k: h[k] for k in ("output", "relative_error", "top1_agreement")} for h in card["verification"]["heads"]]
        row["pair"]["zipped_nothing"] = card["zipped_nothing"]
        row["pair"]["unmerged"] = len(card["unmerged"])
    else:
        row["pair"]["error"] = tail
    outcomes = [row["inspect"]["outcome"], row["twins"]["outcome"], row["pair"]["outcome"],
                row.get("twins_beta0", {}).get("outcome", "merged")]
    row["outcome"] = next((o for o in ("crash", "timeout", "refused") if o in outcomes), "merged")


def model_names(tv, max_params, only):
    import torch
    names = only or tv.models.list_models(module=tv.models)
    keep = []
    for name in names:
        try:
            with torch.device("meta"):  # counts parameters without allocating them
                model = build(tv, name, 0)
        except Exception:  # some initialisers read their tensors back (RegNet): build for real
            model = build(tv, name, 0)
        params = sum(p.numel() for p in model.parameters())
        if only or params <= max_params:
            keep.append((name, params))
    return keep


def summary_line(row):
    z = row.get("spaces_zipped")
    zipped = f"{z['zipped']}/{z['of']}" if z else "-"
    twins = row.get("twins", {})
    err = twins.get("relative_error")
    pair = row.get("pair", {})
    head_err = max((h["relative_error"] for h in pair.get("verification", [])), default=None)
    return (f"{row['model']:24s} {row['exporter']:11s} {row.get('size', '-')!s:>4} {row['outcome']:13s} "
            f"zipped {zipped:>7s}  twins {'-' if err is None else f'{err:.1e}':>8s}  "
            f"pair head err {'-' if head_err is None else f'{head_err:.3f}'}")


def save_results(out, tool, argv, rows, samples, versions) -> dict:
    """Write the rows so far (sorted by model and exporter) to `out`, atomically; the results. Rows of earlier runs
    kept in `out` stay, so `commands` lists every command that wrote some of them (with the date of the last)."""
    command = f"python3 tools/{tool} " + " ".join(argv if argv is not None else sys.argv[1:])
    commands = []
    if os.path.exists(out):
        with open(out) as f:
            earlier = json.load(f)
        commands = earlier.get("commands", [earlier["command"]] if "command" in earlier else [])
    results = {
        "commands": [c for c in commands if c != command] + [command],
        "date": datetime.date.today().isoformat(),
        "versions": versions,
        "samples": samples,
        "twin_rtol": TWIN_RTOL,
        "rows": sorted(rows.values(), key=lambda r: (r["model"], r["exporter"])),
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(out + ".tmp", out)
    return results


def markdown(rows) -> str:
    """The rows as a Markdown table (README, docs)."""
    lines = ["| model | exporter | input | outcome | spaces zipped by default | twins: rel. error | pair: head rel. "
             "error (max) | pair merge s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        z = r.get("spaces_zipped")
        zipped = f"{z['zipped']} / {z['of']}" if z else "-"
        twins, pair = r.get("twins", {}), r.get("pair", {})
        err = twins.get("relative_error")
        err = "-" if err is None else f"{err:.1e}"
        if "twins_beta0" in r and r["twins_beta0"].get("relative_error") is not None:
            err += f" ({twins['within_model_merges']} same-model merges); β 0: {r['twins_beta0']['relative_error']:.1e}"
        head = max((h["relative_error"] for h in pair.get("verification", [])), default=None)
        outcome = r["outcome"] if r["outcome"] != "export failed" else "export failed (torch)"
        lines.append(f"| {r['model']} | {r['exporter']} | {r.get('size', '-')} | {outcome} | {zipped} | "
                     f"{err} | {'-' if head is None else f'{head:.3f}'} | "
                     f"{pair.get('seconds', '-')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", help="torchvision model names (default: every classification model "
                                               "with at most --max-params parameters)")
    p.add_argument("--exporters", nargs="+", default=["torchscript", "dynamo"], choices=["torchscript", "dynamo"])
    p.add_argument("--max-params", type=float, default=30e6)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--samples", type=int, default=80)
    p.add_argument("--timeout", type=int, default=900, help="seconds per onnxzip command")
    p.add_argument("--twin-options", nargs="*", default=[],
                   help="extra `onnxzip merge` options for the twin merge (default: none, the user's path: zip and "
                        "the least-squares refit)")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown too")
    p.add_argument("--render-only", action="store_true", help="print the Markdown table of --out and stop")
    args = p.parse_args(argv)
    if args.render_only:
        with open(args.out) as f:
            print(markdown(json.load(f)["rows"]))
        return
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    import logging

    import torch
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tv = import_torchvision()
    models = model_names(tv, args.max_params, args.models)
    log(f"{len(models)} model(s): {', '.join(n for n, _ in models)}")

    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    rows = {(r["model"], r["exporter"]): r for r in results.get("rows", [])}
    for name, params in models:
        for exporter in args.exporters:
            log(f"{name} ({params / 1e6:.1f}M) {exporter}")
            t0 = time.perf_counter()
            try:
                row = check_model(tv, name, exporter, args, log)
            except Exception as e:  # the tool itself; recorded, never hidden
                row = {"model": name, "exporter": exporter, "outcome": "tool error", "error": repr(e)[:300]}
            row["params"] = params
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows[(name, exporter)] = row
            log("  " + summary_line(row))
            results = save_results(args.out, "torchvision_check.py", argv, rows, args.samples,
                                   {"torch": torch.__version__, "torchvision": tv.__version__})
    for row in results.get("rows", []):
        print(summary_line(row))
    if args.markdown:
        print(markdown(results.get("rows", [])))


if __name__ == "__main__":
    main()
