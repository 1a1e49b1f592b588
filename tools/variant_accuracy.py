"""What a setting of onnxzip's module constants does to the merged models' accuracy and the merge's time.

Usage: python3 tools/variant_accuracy.py --variant LABEL=MODULE.NAME=VALUE[,MODULE.NAME=VALUE...] [--variant ...]
                                         [--pairs resnet20-s0 ...] [--out FILE]

e.g. `--variant rows16=refit.ROWS_PER_REGRESSOR=16,refit.MIN_ROWS=10000`. For each bundled pair, the default merge
(zip, least-squares refit, models/data/calib.npy) runs once with onnxzip's constants as they are ("default") and
once per variant, in this order, one process; every merged model is evaluated on the full Fashion-MNIST test set
(joint accuracy over the 10 classes, divided by the ensemble's: data no setting was tuned on). The merge's seconds
are wall time in this process, interleaved pair by pair (read them as ratios within a run). Prints one line per
pair and the means; --out writes JSON. Not part of the package.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import onnxzip  # noqa: E402
from onnxzip.evaluate import evaluate  # noqa: E402
from pass_accuracy import PAIRS, bundled_pair  # noqa: E402


def parse_variant(text: str) -> tuple:
    """'LABEL=mod.NAME=VALUE,...' -> (label, [(module, name, value)])."""
    label, _, rest = text.partition("=")
    if not label or not rest:
        raise SystemExit(f"--variant {text!r}: expected LABEL=MODULE.NAME=VALUE[,...]")
    settings = []
    for item in rest.split(","):
        target, _, value = item.partition("=")
        module, _, name = target.rpartition(".")
        mod = importlib.import_module(f"onnxzip.{module}")
        if not hasattr(mod, name):
            raise SystemExit(f"--variant {label}: onnxzip.{module} has no {name}")
        settings.append((mod, name, ast.literal_eval(value)))
    return label, settings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", default=[], type=parse_variant)
    p.add_argument("--pairs", nargs="+", default=PAIRS)
    p.add_argument("--out")
    args = p.parse_args(argv)
    import fmnist

    x, y = fmnist.load("test")
    calib = os.path.join(ROOT, "models", "data", "calib.npy")
    variants = [("default", [])] + args.variant
    rows = []
    for pair in args.pairs:
        a, b, tasks = bundled_pair(pair)
        row = {"pair": pair}
        row["ensemble"] = evaluate(onnxzip.merge(a, b, calib, method="ensemble").model, x, y, tasks,
                                   latency=False).joint_accuracy
        for label, settings in variants:
            saved = [(mod, name, getattr(mod, name)) for mod, name, _ in settings]
            for mod, name, value in settings:
                setattr(mod, name, value)
            try:
                t = time.perf_counter()
                result = onnxzip.merge(a, b, calib)
                row[f"{label}_seconds"] = round(time.perf_counter() - t, 2)
            finally:
                for mod, name, value in saved:
                    setattr(mod, name, value)
            row[label] = evaluate(result.model, x, y, tasks, latency=False).joint_accuracy / row["ensemble"]
            row[f"{label}_stages"] = result.card["seconds"]
        rows.append(row)
        print(f"{pair}: joint / ensemble: " + ", ".join(
            f"{label} {row[label]:.4f} ({row[f'{label}_seconds']:.1f} s)" for label, _ in variants), flush=True)
    means = {label: {"joint_over_ensemble": statistics.mean(r[label] for r in rows),
                     "seconds": sum(r[f"{label}_seconds"] for r in rows)} for label, _ in variants}
    for label, m in means.items():
        print(f"mean {label}: {m['joint_over_ensemble']:.4f}, merges {m['seconds']:.1f} s in all")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "means": means, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
