"""What a whole merge costs against its physical floor: running the models once (issue 12).

Usage: python3 tools/merge_cost.py [--pairs mlp-s0 vgg-s0 resnet20-s0 resnet20x2-s0] [--samples 1000 4000]
                                   [--repeats 1] [--before CHECKOUT] [--out FILE] [-- extra merge options]

The floor of a merge is onnxruntime running each source model over the calibration samples, plus one pass of the
merged model: everything else is bookkeeping. For each pair and sample count this script times, interleaved in one
run (these machines are shared and noisy: read the ratios, not the seconds):

- floor: for A, B and the merged model in turn, create a default onnxruntime CPU session and run every sample
  through it in batches of 64 (the merge's batch size);
- merge: the whole `onnxzip merge A B --data calib.npy -o OUT --num-samples N` command in a fresh process (start-up
  and imports included), with the default options (zip, least-squares refit, verification) plus any options after
  `--`. `--num-samples N` makes the merge use all N samples the floor runs (its default is 1000: without it, a
  merge at N = 4000 would use a quarter of the floor's samples).

`--before CHECKOUT` times the same merge from another checkout of onnxzip too (a git worktree of an earlier
commit), each pair's two merges one after the other before its floor: a before/after ratio from one run.

Calibration samples are the first N Fashion-MNIST training images (normalised like models/data/calib.npy), written
to a temporary .npy. The card's stage times (`seconds`) are kept for each merge. Prints one line per case and, with
--out, writes JSON. Not part of the package.

`--torchvision resnet50 convnext_tiny vit_b_16` measures ImageNet-size torchvision models instead (random weights,
seeds 0 and 1, 10 classes, TorchScript export at `--size` 224, `tools/torchvision_check.py`'s export) on N seeded
standard-normal images of that size: the cost of a merge does not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

BATCH = 64


def floor_seconds(paths: list, data: np.ndarray) -> float:
    """Seconds to run every model in `paths` once over `data` (session creation included), one after another."""
    import onnxruntime as ort

    total = 0.0
    for path in paths:
        t = time.perf_counter()
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for lo in range(0, len(data), BATCH):
            session.run(None, {name: data[lo:lo + BATCH]})
        total += time.perf_counter() - t
        del session
    return total


def merge_seconds(a: str, b: str, calib: str, samples: int, out: str, extra: list, code: str = ROOT) -> tuple:
    """Seconds of the whole `onnxzip merge` command over the `samples` in `calib`, run from checkout `code` (its
    package, not the installed one), and the card."""
    cmd = [sys.executable, "-m", "onnxzip", "merge", a, b, "--data", calib, "-o", out, "--force", "-q", *extra]
    if "--num-samples" not in extra:  # the merge uses every sample the floor runs
        cmd += ["--num-samples", str(samples)]
    env = dict(os.environ, PYTHONPATH=code)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=code, env=env)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"merge failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    with open(out + ".json") as f:
        card = json.load(f)
    return seconds, card


def torchvision_pair(name: str, size: int, work: str) -> str:
    """Export torchvision model `name` (seeds 0 and 1) as `work`/`name`/a.onnx, b.onnx; the folder."""
    import torchvision_check as tvc

    folder = os.path.join(work, name)
    os.makedirs(folder, exist_ok=True)
    tv = tvc.import_torchvision()
    for seed, tag in ((0, "a"), (1, "b")):
        tvc.export(tvc.build(tv, name, seed, size), os.path.join(folder, f"{tag}.onnx"), "torchscript", size)
    return folder


def measure(pair: str, models: str, calib: str, data: np.ndarray, repeats: int, extra: list, work: str,
            before: str | None = None) -> dict:
    folder = pair if os.path.isabs(pair) else os.path.join(models, pair)
    pair = os.path.basename(folder)
    a, b = os.path.join(folder, "a.onnx"), os.path.join(folder, "b.onnx")
    out = os.path.join(work, f"{pair}.onnx")
    floors, merges, card, befores, before_card = [], [], None, [], None
    for _ in range(repeats):
        if before:
            seconds, before_card = merge_seconds(a, b, calib, len(data), out + ".before.onnx", extra, before)
            befores.append(seconds)
        seconds, card = merge_seconds(a, b, calib, len(data), out, extra)
        merges.append(seconds)
        floors.append(floor_seconds([a, b, out], data))
    floor, merge = statistics.median(floors), statistics.median(merges)
    row = {"pair": pair, "samples": len(data), "floor_seconds": floors, "merge_seconds": merges,
           "ratio": merge / floor, "stages": card["seconds"], "refit_passes": card.get("refit", {}).get("passes")}
    if before:
        row.update({"before_seconds": befores, "before_ratio": statistics.median(befores) / floor,
                    "before_stages": before_card["seconds"]})
    return row


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        k = argv.index("--")
        argv, extra = argv[:k], argv[k + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=["mlp-s0", "vgg-s0", "resnet20-s0", "resnet20x2-s0"])
    p.add_argument("--samples", nargs="+", type=int, default=[1000, 4000])
    p.add_argument("--models", default=os.path.join(ROOT, "models"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--torchvision", nargs="+", metavar="NAME",
                   help="torchvision models (random weights) instead of the bundled pairs")
    p.add_argument("--size", type=int, default=224, help="with --torchvision: the image size")
    p.add_argument("--before", metavar="CHECKOUT",
                   help="another checkout of onnxzip (e.g. a git worktree of an earlier commit): its merge is timed "
                        "too, interleaved with this one's, against the same floor")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxzip-cost-") as work:
        if args.torchvision:
            pairs = [torchvision_pair(name, args.size, work) for name in args.torchvision]
        else:
            import fmnist
            images, _ = fmnist.load_split("train")
            pairs = args.pairs
        for n in args.samples:
            if args.torchvision:
                data = np.random.default_rng(0).standard_normal((n, 3, args.size, args.size)).astype(np.float32)
            else:
                data = fmnist.normalize(images[:n])
            calib = os.path.join(work, f"calib{n}.npy")
            np.save(calib, data)
            for pair in pairs:
                row = measure(pair, args.models, calib, data, args.repeats, extra, work, args.before)
                rows.append(row)
                stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stages"].items() if k != "total")
                was = (f"; before: {statistics.median(row['before_seconds']):.2f} s, {row['before_ratio']:.1f}x"
                       if args.before else "")
                print(f"{pair} N={n}: floor {statistics.median(row['floor_seconds']):.2f} s, whole merge "
                      f"{statistics.median(row['merge_seconds']):.2f} s: {row['ratio']:.1f}x ({stages}){was}",
                      flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "before": args.before,
                       "size": args.size if args.torchvision else None,
                       "cpu_count": os.cpu_count(), "load": os.getloadavg(),
                       "extra_options": extra, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
