"""What the one-pass calibration costs in accuracy (issue 12): the statistics' row subsample, measured.

Usage: python3 tools/pass_accuracy.py [--pairs resnet20-s0 ...] [--out FILE]

For each bundled pair, the default merge (zip, least-squares refit, models/data/calib.npy) runs twice: with the
statistics taken from a seeded subsample of rows (`onnxzip.pipeline.STATS_SAMPLING`, the default) and from every
row. Both are evaluated on the full Fashion-MNIST test set (joint accuracy over the 10 classes, divided by the
ensemble's), next to the figure docs/results/benchmark.json recorded for the code before the one-pass calibration
(where its refit drew other rows). Prints one line per pair; --out writes JSON. Not part of the package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import onnxzip  # noqa: E402
import onnxzip.pipeline as P  # noqa: E402
from onnxzip.evaluate import evaluate  # noqa: E402

PAIRS = ["mlp-s0", "mlp-s1", "mlp-s2", "vgg-s0", "vgg-s1", "vgg-s2", "resnet20-s0", "resnet20-s1", "resnet20-s2",
         "resnet20x2-s0", "resnet20x2-s1", "resnet20x2-s2"]


def previous(path: str) -> dict:
    """pair -> (full zip + refit joint, ensemble joint) from an earlier benchmark run."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        runs = json.load(f)["runs"]
    out = {}
    for r in runs:
        if r.get("stop_at") is None and r["method"] == "ensemble":
            out.setdefault(r["pair"], {})["ensemble"] = r["joint"]
        if r.get("stop_at") is None and r["method"] == "zip" and r.get("refit") == "ls" and r.get("alpha") == 0.3:
            out.setdefault(r["pair"], {})["zip"] = r["joint"]
    return out


def bundled_pair(pair: str) -> tuple:
    """(path of a.onnx, path of b.onnx, {task: [class ids]}) of the bundled pair models/`pair`."""
    folder = os.path.join(ROOT, "models", pair)
    with open(os.path.join(folder, "card.json")) as f:
        tasks = {t: [int(c) for c in cls] for t, cls in json.load(f)["tasks"].items()}
    return os.path.join(folder, "a.onnx"), os.path.join(folder, "b.onnx"), tasks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=PAIRS)
    p.add_argument("--out")
    args = p.parse_args(argv)
    import fmnist

    x, y = fmnist.load("test")
    calib = os.path.join(ROOT, "models", "data", "calib.npy")
    before = previous(os.path.join(ROOT, "docs", "results", "benchmark.json"))
    rows = []
    default_sampling = P.STATS_SAMPLING
    for pair in args.pairs:
        a, b, tasks = bundled_pair(pair)
        row = {"pair": pair}
        ens = evaluate(onnxzip.merge(a, b, calib, method="ensemble").model, x, y, tasks, latency=False)
        row["ensemble"] = ens.joint_accuracy
        for label, sampling in (("subsample", default_sampling), ("every_row", None)):
            P.STATS_SAMPLING = sampling
            t = time.perf_counter()
            result = onnxzip.merge(a, b, calib)
            row[f"{label}_seconds"] = round(time.perf_counter() - t, 2)
            row[label] = evaluate(result.model, x, y, tasks, latency=False).joint_accuracy
            row[f"{label}_rows"] = [s["samples"] for s in result.card["spaces"]]
        P.STATS_SAMPLING = default_sampling
        row["before"] = before.get(pair, {}).get("zip")
        rows.append(row)
        e = row["ensemble"]
        prev = f"{row['before'] / e:.3f}" if row["before"] is not None else "n/a"
        print(f"{pair}: joint / ensemble: subsample {row['subsample'] / e:.3f}, every row "
              f"{row['every_row'] / e:.3f}, before this change {prev} "
              f"(merge {row['subsample_seconds']:.1f} s vs {row['every_row_seconds']:.1f} s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
