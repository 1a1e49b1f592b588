"""What the least-squares refit costs: merge time with and without it, measured in one run, interleaved.

Usage: python3 tools/refit_cost.py [--pairs mlp-s0 vgg-s0 resnet20-s0 resnet20x2-s0] [--repeats 2] [--out FILE]

For each pair, `onnxzip.merge` runs alternately with `refit="none"` (the paper's pipeline: statistics repair) and
`refit="ls"` (the default), `--repeats` times each; the ratio of the median wall times is printed, with the refit's
share of the merge (from the card's stage times) and its passes. Ratios within one run, since the machines this is
run on are shared and noisy. Not part of the package; writes JSON to --out if given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import onnxzip  # noqa: E402


def measure(pair: str, models: str, calib: str, repeats: int) -> dict:
    folder = os.path.join(models, pair)
    times = {"none": [], "ls": []}
    cards = {}
    for _ in range(repeats):
        for refit in ("none", "ls"):
            t = time.perf_counter()
            result = onnxzip.merge(os.path.join(folder, "a.onnx"), os.path.join(folder, "b.onnx"), calib,
                                   refit=refit, progress=False)
            times[refit].append(time.perf_counter() - t)
            cards[refit] = result.card
    ls = cards["ls"]
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"pair": pair, "seconds": times, "median_seconds": median, "ratio": median["ls"] / median["none"],
            "refit_seconds": ls["seconds"].get("refit"), "refit_share": ls["seconds"].get("refit", 0.0)
            / ls["seconds"]["total"], "passes": ls["refit"]["passes"], "levels": ls["refit"]["levels"],
            "layers": len(ls["refit"]["layers"]), "stages_ls": ls["seconds"], "stages_none": cards["none"]["seconds"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", nargs="+", default=["mlp-s0", "vgg-s0", "resnet20-s0", "resnet20x2-s0"])
    p.add_argument("--models", default=os.path.join(ROOT, "models"))
    p.add_argument("--calib", default=None, help="calibration .npy (default: <models>/data/calib.npy)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    calib = args.calib or os.path.join(args.models, "data", "calib.npy")
    rows = []
    for pair in args.pairs:
        row = measure(pair, args.models, calib, args.repeats)
        rows.append(row)
        print(f"{pair}: merge {row['median_seconds']['none']:.1f} s without the refit, "
              f"{row['median_seconds']['ls']:.1f} s with it: {row['ratio']:.2f}x; the refit is "
              f"{100 * row['refit_share']:.0f} % of the merge ({row['layers']} layers, {row['levels']} levels, "
              f"{row['passes']} onnxruntime passes)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "cpu_count": os.cpu_count(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
