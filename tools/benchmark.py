"""Reproduce the ZipIt! paper's comparison table on the Fashion-MNIST 5+5 model pairs in `models/`, with onnxzip.

For every pair `models/<arch>-s<seed>/{a.onnx,b.onnx,card.json}` this merges A and B with each method and
evaluates the result (per-task accuracy, joint accuracy, parameters, MACs per image, merge wall time):

- Model A alone and Model B alone (one head each: joint accuracy over all 10 classes with that one head),
- weight averaging, Permute, ZipIt! (full: everything but the task heads), ZipIt! partial at several stop
  points K (the first K weighted layers zipped), and the ensemble (both models side by side);
- statistics repair off, for average / Permute / ZipIt! (the main rows have it on, onnxzip's default);
- on one pair per architecture, a sweep of ZipIt!'s alpha and beta (full zip).

Results are aggregated (mean ± std over the pairs of each architecture) into `<out>/RESULTS.md`, with every raw
figure in `<out>/results/benchmark.json` and the plot `<out>/results/joint_vs_macs.png`. The JSON and the report
are rewritten after every pair, so a run that is stopped still leaves its data (`--resume` continues it).

Usage (from the repository root):

    python3 tools/benchmark.py                      # every pair in models/, full Fashion-MNIST test set
    python3 tools/benchmark.py --quick              # smoke run: one pair, no sweep
    python3 tools/benchmark.py --pairs mlp-s0 vgg-s1 --eval models/data/eval.npz

Needs numpy, onnx, onnxruntime, onnxzip (this repository) and, for the plot, matplotlib (a tools-only
dependency: `pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # onnxzip from this checkout, also when it is not installed
sys.path.insert(0, os.path.join(ROOT, "tools"))

import onnx  # noqa: E402

import onnxzip  # noqa: E402
from onnxzip.evaluate import evaluate, load_eval_data  # noqa: E402

ALPHAS = (0.0, 0.3, 0.5, 1.0)
BETAS = (0.0, 0.125, 0.5)
DEFAULT_ALPHA, DEFAULT_BETA = 0.3, 0.125
ARCH_ORDER = ("mlp", "vgg", "resnet20", "resnet20x2")
PAIR_DIR = re.compile(r"^(?P<arch>.+)-s(?P<seed>\d+)$")


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def find_pairs(models_dir: str) -> list:
    """Pair folder names (`<arch>-s<seed>`) under models_dir that hold a.onnx, b.onnx and a card.json of two tasks
    (the model triples, `<arch>3-s<seed>` with tasks a, b, c, are left out: this benchmark merges two models)."""
    out = []
    for name in sorted(os.listdir(models_dir)):
        folder = os.path.join(models_dir, name)
        if PAIR_DIR.match(name) and all(os.path.isfile(os.path.join(folder, f)) for f in ("a.onnx", "b.onnx",
                                                                                          "card.json")):
            with open(os.path.join(folder, "card.json"), encoding="utf-8") as f:
                if len(json.load(f).get("tasks", {})) == 2:
                    out.append(name)
    return sorted(out, key=_pair_order)


def _arch_rank(arch: str) -> tuple:
    return (ARCH_ORDER.index(arch) if arch in ARCH_ORDER else len(ARCH_ORDER), arch)


def _pair_order(name: str) -> tuple:
    m = PAIR_DIR.match(name)
    return (*_arch_rank(m["arch"]), int(m["seed"])) if m else (len(ARCH_ORDER), name, 0)


def load_test_set(path: str | None) -> tuple:
    """(x, y, description). path None: the full Fashion-MNIST test set if installed, else models/data/eval.npz."""
    if path is None:
        try:
            import fmnist
            x, y = fmnist.load("test")
            return x, y, f"full Fashion-MNIST test set ({len(y)} images, {fmnist.DATA_DIR})"
        except (ImportError, FileNotFoundError, ValueError) as e:
            path = os.path.join(ROOT, "models", "data", "eval.npz")
            print(f"note: the full Fashion-MNIST test set is not available ({e}); evaluating on {path}", flush=True)
    x, y = load_eval_data(path)
    return x.astype(np.float32), y.astype(np.int64), f"{os.path.relpath(path, ROOT)} ({len(y)} images)"


def stop_points(num_weighted: int, num_zippable: int) -> list:
    """Partial-zip stop points K: 1, L//4, L//2, 3L//4, L-1 (L = weighted layers, heads included), distinct, and
    below the number of layers the full zip takes (K = that number is the full zip itself, run separately)."""
    L = num_weighted
    ks = {1, L // 4, L // 2, (3 * L) // 4, L - 1}
    return sorted(k for k in ks if 1 <= k < num_zippable)


# --------------------------------------------------------------------------------------------------------------
# Running one configuration
# --------------------------------------------------------------------------------------------------------------


class PairRunner:
    """Merges and evaluates one pair; every run becomes one flat dict of raw figures."""

    def __init__(self, models_dir, pair, calib, x, y, num_samples, batch_size, latency):
        self.pair = pair
        self.folder = os.path.join(models_dir, pair)
        with open(os.path.join(self.folder, "card.json")) as f:
            self.card = json.load(f)
        m = PAIR_DIR.match(pair)
        self.arch = self.card.get("arch", m["arch"])
        self.seed = int(self.card.get("seed", m["seed"]))
        self.tasks = {t: [int(c) for c in cls] for t, cls in self.card["tasks"].items()}
        self.path_a = os.path.join(self.folder, "a.onnx")
        self.path_b = os.path.join(self.folder, "b.onnx")
        self.calib, self.x, self.y = calib, x, y
        self.num_samples, self.batch_size, self.latency = num_samples, batch_size, latency
        self.runs = []

    def _record(self, run: dict, report, seconds_eval: float) -> dict:
        acc = report.per_task_accuracy
        a, b = acc.get("a"), acc.get("b")
        run.update({
            "pair": self.pair, "arch": self.arch, "seed": self.seed,
            "acc_a": a, "acc_b": b,
            "acc_avg": (a + b) / 2 if a is not None and b is not None else None,
            "joint": report.joint_accuracy,
            "params": int(report.params), "macs": int(report.macs),
            "latency_ms": report.latency_ms,
            "eval_seconds": round(seconds_eval, 3),
            "test_images": int(report.num_joint_images),
        })
        self.runs.append(run)
        return run

    def single(self, which: str) -> dict:
        """Model A or Model B alone, with its one head."""
        model = onnx.load(self.path_a if which == "a" else self.path_b)
        out = self.card.get("output") or model.graph.output[0].name
        t = time.perf_counter()
        report = evaluate(model, self.x, self.y, self.tasks, heads={which: out}, latency=self.latency)
        run = {"label": f"Model {which.upper()}", "method": f"model_{which}", "stop_at": None, "repair": None,
               "alpha": None, "beta": None, "merge_seconds": 0.0, "stage_seconds": {}}
        return self._record(run, report, time.perf_counter() - t)

    def merged(self, label, method, stop_at=None, repair=True, alpha=DEFAULT_ALPHA, beta=DEFAULT_BETA,
               latency=None, refit="none") -> dict:
        t = time.perf_counter()
        res = onnxzip.merge(self.path_a, self.path_b, self.calib, method=method, alpha=alpha, beta=beta,
                            stop_at=stop_at, num_samples=self.num_samples, batch_size=self.batch_size,
                            repair=repair, verify=True, progress=False, refit=refit)
        merge_seconds = time.perf_counter() - t
        c = res.card
        t = time.perf_counter()
        report = evaluate(res.model, self.x, self.y, self.tasks,
                          latency=self.latency if latency is None else latency)
        run = {"label": label, "method": method, "stop_at": stop_at, "repair": bool(repair),
               "refit": refit if method != "ensemble" else "none",
               "refit_layers": len(c.get("refit", {}).get("layers") or []),
               "alpha": alpha if method == "zip" else None, "beta": beta if method == "zip" else None,
               "merge_seconds": round(merge_seconds, 3), "stage_seconds": c.get("seconds", {}),
               "weighted_layers": c["trunk"]["weighted_layers"],
               "weighted_layers_zipped": c["trunk"]["weighted_layers_zipped"],
               "calibration_samples": c["calibration"]["samples"],
               "repair_applied": bool(c.get("repair", {}).get("applied")),
               "verification": c.get("verification", {}).get("heads", []),
               "spaces": [{k: s.get(k) for k in ("width", "cross_model_merges", "within_model_merges",
                                                 "mean_merged_correlation")} for s in c.get("spaces", [])]}
        return self._record(run, report, time.perf_counter() - t)


def _fmt_acc(v):
    return "  —  " if v is None else f"{100 * v:5.1f}"


def _progress(pair, run, t_pair):
    print(f"  [{pair}] {run['label']:<26} joint {_fmt_acc(run['joint'])}  A {_fmt_acc(run['acc_a'])}  "
          f"B {_fmt_acc(run['acc_b'])}  MACs {run['macs'] / 1e6:8.3f}M  merge {run['merge_seconds']:6.1f}s  "
          f"eval {run['eval_seconds']:5.1f}s  (pair {time.perf_counter() - t_pair:6.0f}s)", flush=True)


REFIT_SUFFIX = " + LS refit"


def run_pair(runner: PairRunner, sweep: bool, ablation: bool, partial: bool, full_sweep: bool = False,
             refit: bool = True, paper: bool = True) -> list:
    """The paper's rows (`paper`: refit none, statistics repair) and the least-squares refit rows (`refit`)."""
    t_pair = time.perf_counter()

    def go(fn, *args, **kw):
        try:
            r = fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - a failed run is reported and recorded, the benchmark goes on
            label = args[0] if args else fn.__name__
            print(f"  [{runner.pair}] {label}: FAILED: {type(e).__name__}: {e}", flush=True)
            r = {"pair": runner.pair, "arch": runner.arch, "seed": runner.seed, "label": str(label),
                 "method": kw.get("method", args[1] if len(args) > 1 else None), "error": f"{type(e).__name__}: {e}",
                 "stop_at": kw.get("stop_at"), "repair": kw.get("repair", True),
                 "alpha": kw.get("alpha"), "beta": kw.get("beta")}
            runner.runs.append(r)
            return r
        _progress(runner.pair, r, t_pair)
        return r

    if paper:
        go(runner.single, "a")
        go(runner.single, "b")
        go(runner.merged, "Weight averaging", "average")
        go(runner.merged, "Permute", "permute")
        full = go(runner.merged, "ZipIt! full", "zip")
    if refit:
        go(runner.merged, "Weight averaging" + REFIT_SUFFIX, "average", refit="ls", latency=False)
        go(runner.merged, "Permute" + REFIT_SUFFIX, "permute", refit="ls", latency=False)
        full_refit = go(runner.merged, "ZipIt! full" + REFIT_SUFFIX, "zip", refit="ls")
        full = full if paper else full_refit
    num_weighted = full.get("weighted_layers")
    num_zippable = full.get("weighted_layers_zipped")
    ks = stop_points(num_weighted, num_zippable) if partial and num_weighted else []
    if paper:
        for k in ks:
            go(runner.merged, f"ZipIt! {k}/{num_weighted}", "zip", stop_at=k, latency=False)
        go(runner.merged, "Ensemble", "ensemble")
    if refit:
        for k in ks:
            go(runner.merged, f"ZipIt! {k}/{num_weighted}" + REFIT_SUFFIX, "zip", stop_at=k, refit="ls",
               latency=False)
    if ablation and paper:
        for label, method in (("Weight averaging", "average"), ("Permute", "permute"), ("ZipIt! full", "zip")):
            go(runner.merged, f"{label}, no repair", method, repair=False, latency=False)
    if sweep and paper:
        for alpha in ALPHAS:
            for beta in BETAS:
                if (alpha, beta) == (DEFAULT_ALPHA, DEFAULT_BETA):
                    continue  # that cell is the full zip above
                if beta == 0 and alpha != DEFAULT_ALPHA and not full_sweep:
                    # beta = 0 allows no same-model merge, so after its one A<->B merge a cluster can never merge
                    # again and alpha changes nothing: the alpha = 0.3 run stands for the row (--full-sweep runs it)
                    continue
                go(runner.merged, f"ZipIt! full a={alpha} b={beta}", "zip", alpha=alpha, beta=beta, latency=False)
    return runner.runs


# --------------------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------------------


def _ok(runs):
    return [r for r in runs if "error" not in r]


def _stats(values):
    """(mean, std, n) over the values that are numbers; std is the sample std (ddof 1), 0 for one value."""
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def _refit(r) -> str:
    """Runs recorded before the refit existed made the paper's merge: refit none."""
    return r.get("refit") or "none"


def _is_main(r):
    return r["method"] in ("model_a", "model_b", "ensemble") or (
        (r.get("repair") or _refit(r) == "ls")
        and (r["method"] != "zip" or (r.get("alpha"), r.get("beta")) == (DEFAULT_ALPHA, DEFAULT_BETA)))


def _row_key(r):
    """Rows of the main table, in the paper's order (models, baselines, partial zips deep to shallow, ensemble)."""
    order = {"model_a": 0, "model_b": 1, "average": 2, "permute": 3, "zip": 4, "ensemble": 10}
    k = order.get(r["method"], 11)
    refit = _refit(r) == "ls"  # the refit rows after the paper's: averaging, Permute, full, partial zips
    if r["method"] == "zip" and r.get("stop_at") is not None:
        return (5 + 4 * refit, -int(r["stop_at"]))
    return (k + 4 * refit if r["method"] in ("average", "permute", "zip") else k, 0)


def aggregate(runs: list) -> dict:
    """arch -> {'pairs': [...], 'main': rows, 'repair': rows, 'sweep': rows}; each row holds mean/std/n per figure."""
    out = {}
    runs = _ok(runs)
    archs = sorted({r["arch"] for r in runs}, key=_arch_rank)
    figures = ("joint", "acc_a", "acc_b", "acc_avg", "params", "macs", "merge_seconds", "latency_ms", "ratio",
               "refit_share")
    for arch in archs:
        rs = [r for r in runs if r["arch"] == arch]
        pairs = sorted({r["pair"] for r in rs}, key=_pair_order)
        ens = {r["pair"]: r["joint"] for r in rs if r["method"] == "ensemble"}
        for r in rs:
            r["ratio"] = r["joint"] / ens[r["pair"]] if r["pair"] in ens and ens[r["pair"]] else None
            stages = r.get("stage_seconds") or {}
            r["refit_share"] = stages["refit"] / stages["total"] if stages.get("refit") and stages.get("total") \
                else None

        def rows(selected, key=None):
            groups = {}
            for r in selected:
                groups.setdefault(r["label"], []).append(r)
            result = []
            for label, group in groups.items():
                row = {"label": label, "method": group[0]["method"], "stop_at": group[0].get("stop_at"),
                       "repair": group[0].get("repair"), "refit": _refit(group[0]), "alpha": group[0].get("alpha"),
                       "beta": group[0].get("beta"), "pairs": [g["pair"] for g in group]}
                for f in figures:
                    row[f] = _stats([g.get(f) for g in group])
                row["refit_share"] = row["refit_share"][0]
                result.append(row)
            return sorted(result, key=key) if key else result

        main = rows([r for r in rs if _is_main(r)], key=_row_key)
        repair_rows = rows([r for r in rs if _refit(r) == "none" and (r["method"] in ("average", "permute") or
                            (r["method"] == "zip" and r.get("stop_at") is None and
                             (r.get("alpha"), r.get("beta")) == (DEFAULT_ALPHA, DEFAULT_BETA)))],
                           key=lambda row: (("average", "permute", "zip").index(row["method"]), not row["repair"]))
        sweep_pairs = sorted({r["pair"] for r in rs if r["method"] == "zip" and r.get("stop_at") is None
                              and (r.get("alpha"), r.get("beta")) != (DEFAULT_ALPHA, DEFAULT_BETA)})
        sweep = {}
        for p in sweep_pairs:
            sweep[p] = [r for r in rs if r["pair"] == p and r["method"] == "zip" and r.get("stop_at") is None
                        and r.get("repair") and _refit(r) == "none"]
        out[arch] = {"pairs": pairs, "main": main, "repair": repair_rows, "sweep": sweep,
                     "weighted_layers": next((r.get("weighted_layers") for r in rs if r.get("weighted_layers")), None)}
    return out


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _pm(stat, scale=100.0, digits=1):
    mean, std, n = stat
    if mean is None:
        return "—"
    if n > 1:
        return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"
    return f"{scale * mean:.{digits}f}"


def _count(stat, unit=1e6, digits=2):
    mean = stat[0]
    return "—" if mean is None else f"{mean / unit:.{digits}f}M"


def _get(rows, method, stop_at=None, repair=True, refit="none"):
    for row in rows:
        if row["method"] == method and row.get("stop_at") == stop_at and (repair is None or row.get("repair") in
                                                                           (repair, None)) \
                and (method in ("model_a", "model_b", "ensemble") or row.get("refit", "none") == refit):
            return row
    return None


def findings(agg: dict) -> list:
    """Sentences computed from the aggregated numbers (nothing here is written by hand)."""
    lines = []
    for arch, a in agg.items():
        rows = a["main"]
        n = len(a["pairs"])
        avg, perm, zp, ens = (_get(rows, "average"), _get(rows, "permute"), _get(rows, "zip"),
                              _get(rows, "ensemble"))
        ma, mb = _get(rows, "model_a", repair=None), _get(rows, "model_b", repair=None)
        if not (avg and perm and zp and ens):
            lines.append(f"- **{arch}**: incomplete results; no comparison drawn.")
            continue
        j = {k: r["joint"][0] for k, r in (("zip", zp), ("permute", perm), ("average", avg), ("ensemble", ens))}
        order = sorted(("zip", "permute", "average"), key=lambda k: -j[k])
        holds = order == ["zip", "permute", "average"]
        names = {"zip": "ZipIt!", "permute": "Permute", "average": "weight averaging"}
        s = (f"- **{arch}** ({n} pair{'s' if n != 1 else ''}): joint accuracy "
             + " > ".join(f"{names[k]} {100 * j[k]:.1f}" for k in order)
             + (" — the paper's ordering (ZipIt! > Permute > averaging) holds on the means."
                if holds else " — the paper's ordering (ZipIt! > Permute > averaging) does **not** hold here."))
        # per pair: how often zip beats permute
        per_pair = a.get("per_pair_zip_vs_permute")
        if per_pair is not None:
            s += f" ZipIt! beats Permute on {per_pair[0]} of {per_pair[1]} pairs."
        lines.append(s)
        t = {k: r["acc_avg"][0] for k, r in (("zip", zp), ("permute", perm), ("average", avg))}
        t_order = sorted(t, key=lambda k: -t[k])
        lines.append("  - On the mean per-task accuracy (each head on its own classes, which does not depend on how the "
                     "two heads' logits compare): " + " > ".join(f"{names[k]} {100 * t[k]:.1f}" for k in t_order)
                     + f" (ensemble {100 * ens['acc_avg'][0]:.1f}).")
        ratio = zp["ratio"][0]
        if ratio is not None:
            lines.append(f"  - Full ZipIt! reaches {100 * ratio:.1f} % of the ensemble's joint accuracy "
                         f"({100 * j['zip']:.1f} vs {100 * j['ensemble']:.1f}) at "
                         f"{zp['macs'][0] / ens['macs'][0]:.2f}× its MACs: "
                         + ("at or above" if ratio >= 0.9 else "below") + " the 0.9 × ensemble mark.")
        if ma and mb:
            ta = (zp["acc_a"][0] - ma["acc_a"][0], zp["acc_b"][0] - mb["acc_b"][0])
            lines.append(f"  - Per-task accuracy of full ZipIt! vs the original models: task A "
                         f"{100 * ta[0]:+.1f} points, task B {100 * ta[1]:+.1f} points. Each single model's joint "
                         f"accuracy is {100 * ma['joint'][0]:.1f} (A) / {100 * mb['joint'][0]:.1f} (B), bounded by "
                         "its half of the classes.")
        partial = sorted([r for r in rows if r["method"] == "zip" and r.get("stop_at") is not None
                          and r.get("refit", "none") == "none"], key=lambda r: r["stop_at"])
        if partial:
            seq = [(0, j["ensemble"])] + [(r["stop_at"], r["joint"][0]) for r in partial] + [
                (zp.get("weighted_layers_zipped") or "full", j["zip"])]
            mono = all(seq[i][1] >= seq[i + 1][1] - 1e-9 for i in range(len(seq) - 1))
            best = max(partial, key=lambda r: r["joint"][0])
            lines.append(
                "  - Partial zips, from the input to the heads: "
                + ", ".join(f"K={r['stop_at']}: {100 * r['joint'][0]:.1f} "
                            f"({r['macs'][0] / 1e6:.2f}M MACs)" for r in partial)
                + f"; full {100 * j['zip']:.1f} ({zp['macs'][0] / 1e6:.2f}M). "
                + ("Joint accuracy falls monotonically as more layers are zipped"
                   if mono else "Joint accuracy does not fall monotonically with the stop point")
                + f"; the best partial zip (K={best['stop_at']}) reaches {100 * best['ratio'][0]:.1f} % of the "
                  f"ensemble at {best['macs'][0] / ens['macs'][0]:.2f}× its MACs.")
            near = [r for r in partial + [zp] if r["ratio"][0] is not None and r["ratio"][0] >= 0.9]
            if near:
                cheap = min(near, key=lambda r: r["macs"][0])
                name = "full ZipIt!" if cheap is zp else f"ZipIt! K={cheap['stop_at']}"
                lines.append(f"  - The cheapest stop point within 0.9 × the ensemble's joint accuracy is {name}: "
                             f"{100 * cheap['ratio'][0]:.1f} % of it at {cheap['macs'][0] / ens['macs'][0]:.2f}× "
                             "its MACs.")
            else:
                lines.append("  - No zip (partial or full) reaches 0.9 × the ensemble's joint accuracy.")
            per_task = [ens["acc_avg"][0]] + [r["acc_avg"][0] for r in partial] + [zp["acc_avg"][0]]
            mono_t = all(per_task[i] >= per_task[i + 1] - 1e-9 for i in range(len(per_task) - 1))
            lines.append("  - Mean per-task accuracy along the same path (ensemble, K = "
                         + ", ".join(str(r["stop_at"]) for r in partial) + ", full): "
                         + ", ".join(f"{100 * v:.1f}" for v in per_task) + " — "
                         + ("monotone." if mono_t else "not monotone in the stop point."))
        lines.extend(_refit_findings(a, names))
        rep = a["repair"]
        diffs = []
        for method in ("average", "permute", "zip"):
            on = next((r for r in rep if r["method"] == method and r["repair"]), None)
            off = next((r for r in rep if r["method"] == method and r["repair"] is False), None)
            if on and off:
                diffs.append(f"{names[method]} {100 * (on['joint'][0] - off['joint'][0]):+.1f}")
        if diffs:
            lines.append("  - Statistics repair changes joint accuracy by " + ", ".join(diffs) + " points.")
        for pair, sweep in a["sweep"].items():
            if len(sweep) > 1:
                best = max(sweep, key=lambda r: r["joint"])
                default = next((r for r in sweep if (r["alpha"], r["beta"]) == (DEFAULT_ALPHA, DEFAULT_BETA)), None)
                worst = min(sweep, key=lambda r: r["joint"])
                lines.append(f"  - alpha/beta sweep on {pair}: best joint {100 * best['joint']:.1f} at "
                             f"alpha={best['alpha']}, beta={best['beta']}; worst {100 * worst['joint']:.1f} at "
                             f"alpha={worst['alpha']}, beta={worst['beta']}"
                             + (f"; the paper's defaults (0.3, 0.125) give {100 * default['joint']:.1f}."
                                if default else "."))
    return lines


def _refit_findings(a: dict, names: dict) -> list:
    """Sentences on the least-squares refit rows of one architecture."""
    rows = a["main"]
    ens = _get(rows, "ensemble")
    lines = []
    fitted = [(m, _get(rows, m, refit="ls"), _get(rows, m)) for m in ("average", "permute", "zip")]
    fitted = [(m, ls, paper) for m, ls, paper in fitted if ls is not None]
    if not fitted or ens is None:
        return lines
    parts = []
    for m, ls, paper in fitted:
        was = f" (without: {100 * paper['joint'][0]:.1f})" if paper else ""
        parts.append(f"{names[m]} {100 * ls['joint'][0]:.1f}{was}")
    lines.append("  - **Least-squares refit** (joint accuracy): " + ", ".join(parts)
                 + f"; ensemble {100 * ens['joint'][0]:.1f}.")
    zp = _get(rows, "zip", refit="ls")
    zp_paper = _get(rows, "zip")
    if zp is not None and zp["ratio"][0] is not None:
        per_task = zp["acc_avg"][0] / ens["acc_avg"][0]
        goal = zp["ratio"][0] >= 0.95 and per_task >= 0.97
        lines.append(f"  - Full zip + refit: {100 * zp['ratio'][0]:.1f} % of the ensemble's joint accuracy and "
                     f"{100 * per_task:.1f} % of its per-task accuracy ({100 * zp['acc_avg'][0]:.1f} vs "
                     f"{100 * ens['acc_avg'][0]:.1f}) — the goal (≥ 95 % and ≥ 97 %) is "
                     + ("met." if goal else "**not** met."))
        if zp_paper is not None and zp_paper["merge_seconds"][0]:
            share = zp.get("refit_share")
            lines.append(f"  - Merge time of the full zip: {zp['merge_seconds'][0]:.1f} s with the refit, "
                         f"{zp_paper['merge_seconds'][0]:.1f} s without (the paper's rows, recorded in an earlier "
                         f"run: not a same-run ratio)"
                         + (f"; the refit is {100 * share:.0f} % of the merge" if share is not None else "") + ".")
    partial = sorted([r for r in rows if r["method"] == "zip" and r.get("stop_at") is not None
                      and r.get("refit") == "ls"], key=lambda r: r["stop_at"])
    if partial and zp is not None:
        lines.append(f"  - Partial zips + refit ({', '.join(sorted({p for r in partial for p in r['pairs']}))} only), "
                     "from the input to the heads: "
                     + ", ".join(f"K={r['stop_at']}: {100 * r['joint'][0]:.1f}" for r in partial)
                     + f"; full {100 * zp['joint'][0]:.1f}.")
    return lines


def anomalies(runs: list) -> list:
    """Runs that look wrong: errors, NaN, or a merged head far below both original models on its task."""
    out = []
    singles = {(r["pair"], r["method"]): r for r in _ok(runs) if r["method"] in ("model_a", "model_b")}
    for r in runs:
        if "error" in r:
            out.append(f"{r['pair']} {r['label']}: error {r['error']}")
            continue
        for t in ("a", "b"):
            v = r.get(f"acc_{t}")
            if v is not None and isinstance(v, float) and math.isnan(v):
                out.append(f"{r['pair']} {r['label']}: task {t} accuracy is NaN")
            ref = singles.get((r["pair"], f"model_{t}"))
            if v is not None and ref and ref.get(f"acc_{t}") and v < 0.5 * ref[f"acc_{t}"] \
                    and r["method"] not in ("model_a", "model_b"):
                out.append(f"{r['pair']} {r['label']}: task {t} accuracy {100 * v:.1f} is below half of the "
                           f"original's {100 * ref[f'acc_{t}']:.1f}")
        if r.get("joint") is not None and math.isnan(r["joint"]):
            out.append(f"{r['pair']} {r['label']}: joint accuracy is NaN")
    return out


def write_report(path: str, meta: dict, runs: list, agg: dict, plot_note: str) -> None:
    L = []
    L.append("# Benchmark: ZipIt! and baselines on Fashion-MNIST 5+5 pairs, with onnxzip\n")
    L.append(f"Generated by `tools/benchmark.py` — do not edit by hand. Command: `{meta['command']}`  ")
    L.append(f"Date: {meta['date']}. Machine: {meta['machine']}. Wall time of the run: "
             f"{meta['wall_seconds'] / 60:.1f} min{' (stopped early: partial results)' if not meta['complete'] else ''}.  ")
    L.append(f"Test set: {meta['test_set']}. Calibration: `{meta['calibration']}`, {meta['num_samples']} images "
             f"requested, of which {meta['calibration_used']} are used for the statistics (onnxzip holds the rest "
             f"back to verify the merge). onnxzip {meta['onnxzip_version']} at commit "
             f"{meta.get('revision', 'unknown')}.  ")
    L.append("Pairs per architecture: " + ", ".join(f"{arch} {len(a['pairs'])} ({', '.join(a['pairs'])})"
                                                   for arch, a in agg.items()) + ".")
    if meta.get("missing_note"):
        L.append("\n" + meta["missing_note"])
    L.append("\nEach pair: two models of one architecture from different random initialisations, trained on disjoint "
             "5-class halves of Fashion-MNIST (`models/<arch>-s<seed>/card.json` has the split). "
             "**Joint** accuracy: every test image of the 10 classes, argmax over both heads side by side; "
             "**Task A/B**: each head on its own 5 classes; **Avg**: mean of task A and B. The single models have "
             "one head, so their joint accuracy can only ever be right on their own half and they have no task-B "
             "(resp. A) accuracy. Figures are mean ± sample std over the pairs (seeds) of the architecture. "
             "**÷ ens.**: joint accuracy divided by the ensemble's, per pair, then averaged. MACs are per image "
             "(Conv/Gemm/MatMul). Merge time is the wall time of `onnxzip.merge` (calibration, matching, surgery, "
             "statistics repair or refit, verification) on this machine, shared with other jobs. "
             "ZipIt! *K/L*: the first K of the model's L weighted layers zipped, the rest kept per model; "
             "ZipIt! full: everything but the task heads. Rows without a suffix are the paper's method "
             "(`--refit none`: matching, then statistics repair); rows marked **+ LS refit** add onnxzip's default "
             "least-squares refit of every merged layer and head (`--refit ls`, docs/DESIGN.md). All use "
             "alpha = 0.3, beta = 0.125 (the paper's defaults). The paper's rows were recorded in an earlier run "
             "(same models, data and code path; `--refit none` reproduces them byte for byte), so merge times of "
             "the two kinds of rows come from different runs.\n")

    for arch, a in agg.items():
        L.append(f"## {arch}\n")
        L.append("| method | joint | task A | task B | avg | ÷ ens. | params | MACs | merge s |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for r in a["main"]:
            few = len(r["pairs"]) < len(a["pairs"])
            label = r["label"] + (f" ({len(r['pairs'])} of {len(a['pairs'])} pairs: {', '.join(r['pairs'])})"
                                  if few else "")
            L.append(f"| {label} | {_pm(r['joint'])} | {_pm(r['acc_a'])} | {_pm(r['acc_b'])} | "
                     f"{_pm(r['acc_avg'])} | {_pm(r['ratio'], 1.0, 3)} | {_count(r['params'])} | "
                     f"{_count(r['macs'])} | {_pm(r['merge_seconds'], 1.0, 1)} |")
        L.append("")

    L.append("## Statistics repair on vs off\n")
    L.append("Full merges (everything but the heads); repair = onnxzip's per-channel scale and shift that give each "
             "merged channel the mean and std of the originals' (the paper's BN reset / REPAIR).\n")
    L.append("| arch | method | repair | joint | task A | task B | avg | merge s |")
    L.append("|---|---|---|---|---|---|---|---|")
    for arch, a in agg.items():
        for r in a["repair"]:
            name = {"average": "Weight averaging", "permute": "Permute", "zip": "ZipIt! full"}[r["method"]]
            L.append(f"| {arch} | {name} | {'on' if r['repair'] else 'off'} | {_pm(r['joint'])} | "
                     f"{_pm(r['acc_a'])} | {_pm(r['acc_b'])} | {_pm(r['acc_avg'])} | "
                     f"{_pm(r['merge_seconds'], 1.0, 1)} |")
    L.append("")

    L.append("## ZipIt! alpha / beta sweep\n")
    L.append("Full zip with repair, on one pair per architecture. Cells: joint accuracy (task A / task B). alpha "
             "scales a merged cluster's similarities (≤ 0: it never merges again); beta is the budget of "
             "same-model merges (0: only A↔B merges, i.e. a permutation by greedy matching).\n")
    any_sweep = dagger = False
    for arch, a in agg.items():
        for pair, sweep in a["sweep"].items():
            any_sweep = True
            cell = {(r["alpha"], r["beta"]): r for r in sweep}
            L.append(f"**{pair}**\n")
            L.append("| alpha \\ beta | " + " | ".join(str(b) for b in BETAS) + " |")
            L.append("|---|" + "---|" * len(BETAS))
            for al in ALPHAS:
                cells = []
                for be in BETAS:
                    r = cell.get((al, be))
                    if r is None and be == 0 and (DEFAULT_ALPHA, 0.0) in cell:
                        r = cell[(DEFAULT_ALPHA, 0.0)]
                        cells.append(f"{100 * r['joint']:.1f}†")
                        dagger = True
                        continue
                    cells.append("—" if r is None else f"{100 * r['joint']:.1f} ({100 * r['acc_a']:.1f} / "
                                                       f"{100 * r['acc_b']:.1f})")
                L.append(f"| {al} | " + " | ".join(cells) + " |")
            L.append("")
    if dagger:
        L.append("† not run: with beta = 0 no same-model merge is allowed, so a cluster cannot merge twice and alpha "
                 "has no effect; the alpha = 0.3 run stands for it (`--full-sweep` runs these cells too).\n")
    if not any_sweep:
        L.append("(not run)\n")

    L.append("## What the figures show\n")
    L.append("Written by the script from the numbers above (means over pairs).\n")
    L.extend(findings(agg))
    bad = anomalies(runs)
    if bad:
        L.append("\nRuns with errors or NaN, and heads below half of their original model's accuracy (20 % is chance "
                 "on 5 classes). Expected for weight averaging and for merges without repair of deep networks; "
                 "listed so that a bug would not pass unseen:\n")
        L.extend(f"- {b}" for b in bad)
    L.append(f"\n![joint accuracy vs MACs](results/joint_vs_macs.png)\n\n{plot_note}\n")
    L.append("Raw figures of every run (per pair, with merge stage times and verification): "
             "[`results/benchmark.json`](results/benchmark.json).\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(L))
    os.replace(tmp, path)


def plot(path: str, agg: dict) -> str:
    """Joint accuracy against MACs per image; returns a sentence for the report (or why there is no plot)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        msg = "matplotlib is not installed, so no plot was drawn (`pip install matplotlib`, a tools-only dependency)."
        print(f"warning: {msg}", flush=True)
        return msg
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (arch, a) in enumerate(agg.items()):
        rows = a["main"]
        ens, zp = _get(rows, "ensemble"), _get(rows, "zip")
        single = _get(rows, "model_a", repair=None)
        if not ens or not zp:
            continue
        lines = []
        for refit, style, name in (("none", "-", "ZipIt!, paper"), ("ls", "--", "ZipIt! + LS refit")):
            full = _get(rows, "zip", refit=refit)
            if full is None:
                continue
            lines.append((style, name, [ens] + sorted([r for r in rows if r["method"] == "zip"
                                                       and r.get("stop_at") is not None
                                                       and r.get("refit", "none") == refit],
                                                      key=lambda r: r["stop_at"]) + [full]))
        unit = single["macs"][0] if single else ens["macs"][0] / 2
        for ax, scale in ((axes[0], 1e6), (axes[1], unit)):
            c = colors[i % len(colors)]
            for style, name, line in lines:
                xs = [r["macs"][0] / scale for r in line]
                ys = [100 * r["joint"][0] for r in line]
                es = [100 * (r["joint"][1] or 0) for r in line]
                ax.errorbar(xs, ys, yerr=es, color=c, marker="o", linestyle=style, capsize=3,
                            label=f"{arch}: {name} (ensemble → full)")
                ax.annotate("full", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color=c)
            ax.annotate("ens.", (ens["macs"][0] / scale, 100 * ens["joint"][0]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=c)
            for method, marker, name in (("permute", "^", "Permute"), ("average", "s", "averaging")):
                r = _get(rows, method)
                if r:
                    ax.errorbar([r["macs"][0] / scale], [100 * r["joint"][0]], yerr=[100 * (r["joint"][1] or 0)],
                                color=c, marker=marker, linestyle="none", markersize=8, capsize=3,
                                markerfacecolor="none", label=f"{arch}: {name}")
    axes[0].set_xscale("log")
    axes[0].xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes[0].xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axes[0].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].set_xlabel("MACs per image (millions, log scale)")
    axes[1].set_xlabel("MACs per image ÷ one model's")
    for ax in axes:
        ax.set_ylabel("joint accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title("Joint accuracy vs cost")
    axes[1].set_title("Same, cost relative to one model")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * math.ceil(len(labels) / 3), 1, 1))
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return ("Each line: one architecture's mean joint accuracy (error bars: std over pairs) as the stop point moves "
            "from the input (the ensemble, right) through the partial zips to the full zip (left): solid, the paper's "
            "method (`--refit none`); dashed, with the least-squares refit (its partial zips only where they were "
            "run, see the tables); hollow triangles and squares: Permute and weight averaging, the paper's method.")


def save(out_dir, meta, runs):
    results = os.path.join(out_dir, "results")
    os.makedirs(results, exist_ok=True)
    agg = aggregate(runs)
    for arch, a in agg.items():
        zp = {r["pair"]: r["joint"] for r in _ok(runs) if r["arch"] == arch and _is_main(r)
              and r["method"] == "zip" and r.get("stop_at") is None}
        pm = {r["pair"]: r["joint"] for r in _ok(runs) if r["arch"] == arch and _is_main(r)
              and r["method"] == "permute"}
        common = sorted(set(zp) & set(pm))
        if common:
            a["per_pair_zip_vs_permute"] = (sum(zp[p] > pm[p] for p in common), len(common))
    tmp = os.path.join(results, "benchmark.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "runs": runs, "aggregate": agg}, f, indent=1, default=_json_default)
    os.replace(tmp, os.path.join(results, "benchmark.json"))
    note = plot(os.path.join(results, "joint_vs_macs.png"), agg)
    write_report(os.path.join(out_dir, "RESULTS.md"), meta, runs, agg, note)


def _command_line(argv) -> str:
    """The invocation, shell-quoted, with the --note text (printed under the header anyway) elided."""
    import shlex
    args, skip = [], False
    for a in argv:
        if skip:
            args.append("'…'")
            skip = False
        elif a == "--note":
            args.append(a)
            skip = True
        elif a.startswith("--note="):
            args.append("--note='…'")
        else:
            args.append(shlex.quote(a))
    return " ".join(["python3 tools/benchmark.py", *args])


def source_revision() -> str:
    """The checkout's commit, and whether onnxzip/ has uncommitted changes (the numbers depend on that code)."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "onnxzip"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes in onnxzip/" if dirty else "")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=os.path.join(ROOT, "models"), help="folder of <arch>-s<seed>/ pairs")
    p.add_argument("--pairs", nargs="+", help="pair folder names (default: every pair found)")
    p.add_argument("--eval", help="an .npz with x, y (default: the full Fashion-MNIST test set if installed, "
                                  "else models/data/eval.npz)")
    p.add_argument("--calib", help="calibration images .npy (default: <models>/data/calib.npy)")
    p.add_argument("--num-samples", type=int, default=1000, help="calibration images (default 1000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=os.path.join(ROOT, "docs"), help="writes RESULTS.md and results/ here")
    p.add_argument("--quick", action="store_true", help="smoke run: the first pair only, no sweep")
    p.add_argument("--sweep-pairs", nargs="*", help="pairs that get the alpha/beta sweep (default: the first pair "
                                                   "of each architecture); give none to skip it")
    p.add_argument("--full-sweep", action="store_true", help="also run the sweep cells beta = 0, alpha != 0.3 "
                                                                "(alpha has no effect there)")
    p.add_argument("--ablation-pairs", nargs="*", help="pairs that get the repair-off runs (default: every pair)")
    p.add_argument("--no-ablation", action="store_true", help="skip the repair-off runs")
    p.add_argument("--no-partial", action="store_true", help="skip the partial zips")
    p.add_argument("--partial-pairs", nargs="*", help="pairs that get the partial zips (default: every pair)")
    p.add_argument("--no-latency", action="store_true", help="do not measure latency (it is measured on the main "
                                                             "rows only)")
    p.add_argument("--resume", action="store_true", help="keep the pairs already in <out>/results/benchmark.json "
                   "(pairs without least-squares refit rows get only those)")
    p.add_argument("--no-refit", action="store_true", help="skip the least-squares refit rows (--refit ls)")
    p.add_argument("--note", help="a sentence added under the header of RESULTS.md")
    p.add_argument("--report-only", action="store_true", help="run nothing: redraw RESULTS.md and the plot from "
                                                              "<out>/results/benchmark.json")
    args = p.parse_args(argv)

    if args.report_only:
        json_path = os.path.join(args.out, "results", "benchmark.json")
        if not os.path.isfile(json_path):
            p.error(f"--report-only: {json_path} does not exist; run the benchmark first")
        with open(json_path) as f:
            old = json.load(f)
        if args.note:
            old["meta"]["missing_note"] = args.note
        save(args.out, old["meta"], old["runs"])
        print(f"rewrote {os.path.join(args.out, 'RESULTS.md')} from {json_path}", flush=True)
        return 0

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("warning: matplotlib is not installed; the benchmark runs but draws no plot "
              "(`pip install matplotlib`, a tools-only dependency)", flush=True)

    if not os.path.isdir(args.models):
        p.error(f"--models {args.models}: no such folder")
    pairs = args.pairs or find_pairs(args.models)
    if not pairs:
        p.error(f"no model pairs (<arch>-s<seed>/ with a.onnx, b.onnx, card.json) under {args.models}")
    for pair in pairs:
        if not os.path.isfile(os.path.join(args.models, pair, "card.json")):
            p.error(f"pair {pair}: {os.path.join(args.models, pair, 'card.json')} is missing")
    if args.quick:
        pairs = pairs[:1]
    if args.sweep_pairs is not None:
        sweep_pairs = set(args.sweep_pairs)
    elif args.quick:
        sweep_pairs = set()
    else:
        first = {}
        for pair in pairs:
            first.setdefault(PAIR_DIR.match(pair)["arch"], pair)
        sweep_pairs = set(first.values())

    calib_path = args.calib or os.path.join(args.models, "data", "calib.npy")
    calib = np.load(calib_path).astype(np.float32)
    x, y, test_desc = load_test_set(args.eval)
    print(f"benchmark: {len(pairs)} pair(s): {', '.join(pairs)}; test set: {test_desc}; calibration: "
          f"{calib_path} ({len(calib)} images, {args.num_samples} requested); sweep on: "
          f"{', '.join(sorted(sweep_pairs)) or 'none'}", flush=True)

    runs, done, refit_done, previous_wall = [], set(), set(), 0.0
    json_path = os.path.join(args.out, "results", "benchmark.json")
    if args.resume and os.path.isfile(json_path):
        with open(json_path) as f:
            old = json.load(f)
        runs = [r for r in old["runs"] if r["pair"] in pairs]
        done = set(old["meta"].get("pairs_done", []))
        refit_done = set(old["meta"].get("refit_pairs_done", []))
        runs = [r for r in runs if r["pair"] in done and (_refit(r) == "none" or r["pair"] in refit_done)]
        previous_wall = float(old["meta"].get("wall_seconds", 0.0))
        print(f"resuming: {len(done)} pair(s) already done: {', '.join(sorted(done))}", flush=True)

    used = min(args.num_samples, len(calib))
    holdout = min(256, used // 5)
    meta = {
        "command": _command_line(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} "
                   f"{platform.release()}, Python {platform.python_version()}",
        "onnxzip_version": onnxzip.__version__, "revision": source_revision(),
        "test_set": test_desc, "test_images": int(len(y)),
        "calibration": os.path.relpath(calib_path, ROOT), "num_samples": args.num_samples,
        "calibration_used": used - holdout,
        "pairs": pairs, "sweep_pairs": sorted(sweep_pairs), "pairs_done": sorted(done),
        "refit_pairs_done": sorted(refit_done),
        "alphas": ALPHAS, "betas": BETAS, "complete": False, "wall_seconds": 0.0,
        "missing_note": args.note,
    }
    t0 = time.perf_counter()
    for n, pair in enumerate(pairs):
        paper = pair not in done
        refit = not args.no_refit and pair not in refit_done
        if not (paper or refit):
            continue
        print(f"[{n + 1}/{len(pairs)}] {pair}" + ("" if paper else " (least-squares refit rows only)"), flush=True)
        runner = PairRunner(args.models, pair, calib, x, y, args.num_samples, args.batch_size, not args.no_latency)
        t = time.perf_counter()
        ablation = not args.no_ablation and (args.ablation_pairs is None or pair in args.ablation_pairs)
        partial = not args.no_partial and (args.partial_pairs is None or pair in args.partial_pairs)
        runs += run_pair(runner, sweep=pair in sweep_pairs, ablation=ablation, partial=partial,
                         full_sweep=args.full_sweep, refit=refit, paper=paper)
        done.add(pair)
        if refit:
            refit_done.add(pair)
        meta["pairs_done"] = sorted(done, key=_pair_order)
        meta["refit_pairs_done"] = sorted(refit_done, key=_pair_order)
        meta["wall_seconds"] = previous_wall + time.perf_counter() - t0
        meta["complete"] = len(done) == len(pairs)
        save(args.out, meta, runs)
        print(f"[{n + 1}/{len(pairs)}] {pair} done in {time.perf_counter() - t:.0f}s; results saved", flush=True)
    meta["wall_seconds"] = previous_wall + time.perf_counter() - t0
    meta["complete"] = True
    save(args.out, meta, runs)
    print(f"done in {meta['wall_seconds'] / 60:.1f} min: {os.path.join(args.out, 'RESULTS.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
