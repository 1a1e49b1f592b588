"""N-model merges, --width and --budget on the bundled model groups: accuracy against cost.

For every group `models/<arch>3-s<seed>/{a,b,c}.onnx` (N = 3, Fashion-MNIST split 4+3+3) this merges the models
with every method and evaluates the result on the full Fashion-MNIST test set (per-task accuracy, joint accuracy
over all 10 classes, parameters, MACs per image, merge wall time):

- each model alone (its one head), the ensemble (the N models side by side), average, permute, zip (full: all but
  the heads), zip at widths 1.25 / 1.5 / 2, zip partial at every stop point, and `--budget macs=0.5` / `0.7`;
  all with onnxzip's default least-squares refit.

With `--pairs`, two-model groups (`<arch>-s<seed>`) get the width rows too (the ResNet-20 width 1.5 target).
Everything is written to `<out>/RESULTS_MANY.md`, `<out>/results/many.json` and the plot
`<out>/results/many_joint_vs_macs.png` (joint accuracy against MACs for every width and stop point). The JSON is
rewritten after every group; `--resume` keeps the groups already there.

    python3 tools/benchmark_many.py                                   # every triple in models/
    python3 tools/benchmark_many.py --groups mlp3-s0 --pairs resnet20-s0 resnet20-s1 resnet20-s2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import onnx  # noqa: E402

import onnxzip  # noqa: E402
from onnxzip.evaluate import evaluate  # noqa: E402
from onnxzip.graph import analyse, stop_points  # noqa: E402
from benchmark import load_test_set, source_revision  # noqa: E402

GROUP_DIR = re.compile(r"^(?P<arch>.+?)(?P<n>\d)?-s(?P<seed>\d+)$")
WIDTHS = (1.25, 1.5, 2.0)
BUDGETS = (0.5, 0.7)


def find_groups(models_dir: str, min_models: int = 3) -> list:
    out = []
    for name in sorted(os.listdir(models_dir)):
        folder = os.path.join(models_dir, name)
        if os.path.isfile(os.path.join(folder, "card.json")) and len(_model_files(folder)) >= min_models:
            out.append(name)
    return out


def _model_files(folder: str) -> list:
    files = []
    for letter in "abcdefghij":
        path = os.path.join(folder, f"{letter}.onnx")
        if not os.path.isfile(path):
            break
        files.append(path)
    return files


class GroupRunner:
    def __init__(self, models_dir, group, calib, x, y, num_samples):
        self.group = group
        folder = os.path.join(models_dir, group)
        with open(os.path.join(folder, "card.json")) as f:
            self.card = json.load(f)
        self.paths = _model_files(folder)
        self.names = tuple(os.path.basename(p)[0] for p in self.paths)
        self.tasks = {t: [int(c) for c in cls] for t, cls in self.card["tasks"].items()}
        m = GROUP_DIR.match(group)
        self.arch = self.card.get("arch", m["arch"] if m else group)
        self.seed = int(self.card.get("seed", m["seed"] if m else 0))
        self.calib, self.x, self.y, self.num_samples = calib, x, y, num_samples
        self.runs = []

    def _record(self, run, report):
        run.update({"group": self.group, "arch": self.arch, "seed": self.seed, "num_models": len(self.paths),
                    "acc": dict(report.per_task_accuracy), "joint": report.joint_accuracy,
                    "params": int(report.params), "macs": int(report.macs)})
        self.runs.append(run)
        print(f"  {self.group:<14} {run['label']:<28} joint {100 * run['joint']:5.1f}  tasks "
              + " ".join(f"{100 * v:5.1f}" for v in run["acc"].values())
              + f"  MACs {run['macs'] / 1e6:7.2f} M  {run.get('merge_seconds', 0):6.1f} s", flush=True)
        return run

    def single(self, k):
        model = onnx.load(self.paths[k])
        report = evaluate(model, self.x, self.y, self.tasks, heads={self.names[k]: model.graph.output[0].name},
                          latency=False)
        return self._record({"label": f"model {self.names[k]} alone", "method": f"model_{self.names[k]}"}, report)

    def merged(self, label, method="zip", **kw):
        t = time.perf_counter()
        res = onnxzip.merge_models(self.paths, self.calib, method=method, num_samples=self.num_samples,
                                   names=self.names, progress=False, **kw)
        seconds = time.perf_counter() - t
        report = evaluate(res.model, self.x, self.y, self.tasks, latency=False)
        c = res.card
        run = {"label": label, "method": method, "merge_seconds": round(seconds, 2),
               "stop_at": c.get("stop_at"), "width": c.get("width", 1.0),
               "weighted_layers_zipped": c["trunk"]["weighted_layers_zipped"],
               "weighted_layers": c["trunk"]["weighted_layers"], **{k: v for k, v in kw.items() if k != "budget"}}
        if "budget" in c:
            b = c["budget"]
            run.update(budget=f"{b['kind']}={b['fraction']:g}", chosen=b["chosen"], candidates=b["candidates"])
        return self._record(run, report)


def run_group(r: GroupRunner, partial: bool, budgets: bool, widths=WIDTHS):
    for k in range(len(r.paths)):
        r.single(k)
    r.merged("ensemble", "ensemble")
    r.merged("average", "average")
    r.merged("permute", "permute")
    r.merged("zip", "zip")
    for w in widths:
        if w <= len(r.paths):
            r.merged(f"zip width {w:g}", "zip", width=w)
    if partial:
        a = analyse(onnx.load(r.paths[0]))
        for value, _ in stop_points(a):
            if value.isdigit():
                r.merged(f"zip stop at {value}", "zip", stop_at=int(value))
    if budgets:
        for fraction in BUDGETS:
            r.merged(f"zip budget macs={fraction:g}", "zip", budget=f"macs={fraction:g}")


def _ratios(runs):
    """Per run: joint ÷ the ensemble's joint and mean over tasks of task accuracy ÷ the ensemble's (same group)."""
    ens = {r["group"]: r for r in runs if r["method"] == "ensemble"}
    for r in runs:
        e = ens.get(r["group"])
        if e is None:
            continue
        r["joint_ratio"] = r["joint"] / e["joint"]
        common = [t for t in r["acc"] if t in e["acc"]]
        r["task_ratio"] = float(np.mean([r["acc"][t] / e["acc"][t] for t in common])) if common else None
        r["macs_ratio"] = r["macs"] / e["macs"]


def write_report(out_dir, meta, runs):
    _ratios(runs)
    os.makedirs(os.path.join(out_dir, "results"), exist_ok=True)
    with open(os.path.join(out_dir, "results", "many.json"), "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
    lines = ["# N-model merges, width and budget", "",
             f"Generated by `tools/benchmark_many.py` on {meta['date']} ({meta['revision']}); evaluation: "
             f"{meta['test_set']}; {meta['num_samples']} calibration samples (`models/data/calib.npy`), least-squares "
             "refit on (the default). Ratios are to the ensemble of the same group (the N models side by side) in "
             "the same run; *tasks* is the mean over tasks of the task accuracy ÷ the ensemble's.", "",
             f"Command: `{meta['command']}`", ""]
    for source in meta.get("runs") or []:
        lines += [f"- runs from `{source['command']}` on {source['date']} ({source['revision']})"]
    if meta.get("runs"):
        lines.append("")
    groups = list(dict.fromkeys(r["group"] for r in runs))
    archs = list(dict.fromkeys((r["arch"], r["num_models"]) for r in runs))
    lines += ["## Mean over seeds", "", "| arch | N | row | joint % | ÷ ens. joint | ÷ ens. tasks | MACs ÷ ens. | "
              "merge s | groups |", "|---|---|---|---|---|---|---|---|---|"]
    for arch, n in archs:
        rows = [r for r in runs if r["arch"] == arch and r["num_models"] == n]
        for label in dict.fromkeys(r["label"] for r in rows):
            sel = [r for r in rows if r["label"] == label]
            def mean(key):
                vals = [r[key] for r in sel if r.get(key) is not None]
                return float(np.mean(vals)) if vals else None
            jr, tr, mr = mean("joint_ratio"), mean("task_ratio"), mean("macs_ratio")
            lines.append(f"| {arch} | {n} | {label} | {100 * mean('joint'):.1f} | "
                         f"{'' if jr is None else f'{jr:.3f}'} | {'' if tr is None else f'{tr:.3f}'} | "
                         f"{'' if mr is None else f'{mr:.2f}'} | {mean('merge_seconds') or 0:.1f} | {len(sel)} |")
    lines += ["", "## Budget choices", "", "| group | budget | chosen stop | chosen width | MACs ÷ ens. | "
              "held-back error (chosen / candidates) |", "|---|---|---|---|---|---|"]
    for r in runs:
        if "chosen" in r:
            c = r["chosen"]
            cands = ", ".join(f"{x['stop_at']}@{x['width']:g}: {x['held_back_error']:.3f}" for x in r["candidates"])
            lines.append(f"| {r['group']} | {r['budget']} | {c['stop_at']} | {c['width']:g} | {c['fraction']} | "
                         f"{c['held_back_error']:.3f} / {cands} |")
    lines += ["", "## Every run", "", "| group | row | joint % | tasks % | params | MACs | merge s |",
              "|---|---|---|---|---|---|---|"]
    for g in groups:
        for r in runs:
            if r["group"] == g:
                lines.append(f"| {g} | {r['label']} | {100 * r['joint']:.1f} | "
                             + " / ".join(f"{100 * v:.1f}" for v in r["acc"].values())
                             + f" | {r['params']:,} | {r['macs']:,} | {r.get('merge_seconds', 0):.1f} |")
    note = plot(os.path.join(out_dir, "results", "many_joint_vs_macs.png"), runs)
    lines += ["", note, ""]
    with open(os.path.join(out_dir, "RESULTS_MANY.md"), "w") as f:
        f.write("\n".join(lines))


def plot(path, runs) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no plot: matplotlib is not installed)"
    groups = list(dict.fromkeys(r["group"] for r in runs))
    cols = min(4, len(groups))
    rows_n = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.6 * rows_n), squeeze=False)
    for ax in axes.ravel()[len(groups):]:
        ax.axis("off")
    for ax, g in zip(axes.ravel(), groups):
        rows = [r for r in runs if r["group"] == g and not r["method"].startswith("model_")]
        for kind, marker, sel in (
                ("stop point", "o", [r for r in rows if r["label"].startswith("zip stop")]),
                ("width", "s", [r for r in rows if r["label"].startswith("zip width") or r["label"] == "zip"]),
                ("budget", "*", [r for r in rows if "budget" in r]),
                ("baseline", "x", [r for r in rows if r["method"] in ("ensemble", "average", "permute")])):
            if sel:
                ax.scatter([r["macs"] / 1e6 for r in sel], [100 * r["joint"] for r in sel], marker=marker,
                           label=kind)
                for r in sel:
                    ax.annotate(r["label"].replace("zip ", ""), (r["macs"] / 1e6, 100 * r["joint"]), fontsize=6)
        ax.set_title(g)
        ax.set_xlabel("MACs per image (M)")
        ax.set_ylabel("joint accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"![joint accuracy vs MACs](results/{os.path.basename(path)})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=os.path.join(ROOT, "models"))
    p.add_argument("--groups", nargs="*", help="N-model group folders (default: every one with >= 3 models)")
    p.add_argument("--pairs", nargs="*", default=[], help="two-model folders that get the width rows")
    p.add_argument("--eval", help="an .npz with x, y (default: the full Fashion-MNIST test set)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--no-partial", action="store_true", help="skip the partial zips of the groups")
    p.add_argument("--no-budget", action="store_true", help="skip the budget rows")
    p.add_argument("--out", default=os.path.join(ROOT, "docs"))
    p.add_argument("--resume", action="store_true", help="keep the groups already in <out>/results/many.json")
    p.add_argument("--add", nargs="*", default=[], help="many.json files of other runs whose runs join this report")
    args = p.parse_args(argv)
    calib = np.load(os.path.join(args.models, "data", "calib.npy"))
    x, y, test_set = load_test_set(args.eval)
    groups = args.groups if args.groups is not None else find_groups(args.models)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "revision": source_revision(), "test_set": test_set, "num_samples": args.num_samples,
            "command": "python3 tools/benchmark_many.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    runs = []
    path = os.path.join(args.out, "results", "many.json")
    meta["runs"] = []  # the runs whose figures this report keeps (--resume, --add)
    if args.resume and os.path.exists(path):
        with open(path) as f:
            kept = json.load(f)
        runs = kept["runs"]
        meta["runs"] = kept["meta"].get("runs") or [kept["meta"]]
    for extra in args.add:
        with open(extra) as f:
            other = json.load(f)
        runs += [r for r in other["runs"] if r["group"] not in {x["group"] for x in runs}]
        meta["runs"] += other["meta"].get("runs") or [other["meta"]]
    done = {r["group"] for r in runs}
    for g in groups:
        if g in done:
            continue
        r = GroupRunner(args.models, g, calib, x, y, args.num_samples)
        run_group(r, partial=not args.no_partial, budgets=not args.no_budget)
        runs += r.runs
        write_report(args.out, meta, runs)
    for g in args.pairs:
        if g in done:
            continue
        r = GroupRunner(args.models, g, calib, x, y, args.num_samples)
        for k in range(len(r.paths)):
            r.single(k)
        r.merged("ensemble", "ensemble")
        r.merged("zip", "zip")
        for w in (1.25, 1.5):
            r.merged(f"zip width {w:g}", "zip", width=w)
        runs += r.runs
        write_report(args.out, meta, runs)
    write_report(args.out, meta, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
