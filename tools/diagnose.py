"""Why does a merge method win or lose on a pair? Measurements behind docs/RESULTS.md (issue 3).

The paper's headline metric, joint accuracy, mixes two things: how accurate each head still is on its own task
(per-task accuracy) and whether, on an image of task t, head t's largest logit beats every logit of the other
head (task routing, `onnxzip.evaluate`'s `task_routing_accuracy`). Joint accuracy is at most the routing
accuracy. The heads are plain linear layers trained only on their own task, so nothing makes their logits
comparable; the paper's CLIP heads are.

For every pair this script merges with weight averaging, Permute and ZipIt! (full, onnxzip's defaults) and
the ensemble, and measures on the test set:

- per-task accuracy, task routing accuracy and joint accuracy;
- the *cross-task confidence* of each merged head: the mean of its largest logit on the *other* task's images
  divided by the same on its own task's images (1.0: the head is as sure of itself on foreign images as on its
  own; the ensemble shows what training alone leaves);
- for every zipped feature space, how alike the two models' features are: the mean correlation of the pairs
  weight averaging merges (channel i with channel i), of the pairs Permute merges (the best one-to-one matching
  of the correlation matrix) and the mean over A's features of its best correlation with any of B's.

Writes `docs/DIAGNOSIS.md` and `docs/results/diagnosis.json`.

    python3 tools/diagnose.py --pairs mlp-s0 mlp-s1 mlp-s2 vgg-s0 vgg-s1 vgg-s2 resnet20-s0 resnet20-s1 resnet20-s2

Needs numpy, scipy, onnx, onnxruntime, onnxzip (this checkout); the full test set from the Debian package
`dataset-fashion-mnist` (else `models/data/eval.npz`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import onnxruntime as ort  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

import onnxzip  # noqa: E402
from benchmark import _pair_order, find_pairs, load_test_set, source_revision  # noqa: E402
from onnxzip.calibration import FeatureRequest, collect_stats, input_specs, load_calibration  # noqa: E402
from onnxzip.evaluate import evaluate  # noqa: E402
from onnxzip.graph import analyse, match, trunk_nodes  # noqa: E402
from onnxzip.onnx_io import load_model  # noqa: E402
from onnxzip.surgery import merge_points, zipped_spaces  # noqa: E402

METHODS = [("Ensemble", "ensemble"), ("Weight averaging", "average"), ("Permute", "permute"), ("ZipIt!", "zip")]


def feature_similarity(a_path, b_path, calib_path, num_samples=800):
    """Per zipped space (input to head order): width and the three mean correlations described above."""
    a, b = analyse(load_model(a_path, "model A")), analyse(load_model(b_path, "model B"))
    corr = match(a, b)
    trunk = trunk_nodes(a, None)
    requests = []
    for sid, names in merge_points(a, trunk).items():
        name = names[0]
        ts = a.tensor_spaces[name]
        requests.append(FeatureRequest(f"space:{sid}", [name, corr.tensors[name]], ts.axis, ts.expand))
    data = load_calibration(calib_path, input_specs(a.model), num_samples)
    stats = collect_stats([a.model, b.model], requests, data)
    out = []
    for sid in zipped_spaces(a, trunk):
        key = f"space:{sid}"
        if key not in stats:
            continue
        width = a.spaces[sid].width
        c = np.nan_to_num(stats[key].correlation()[:width, width:])  # A's features (rows) vs B's (columns)
        rows, cols = linear_sum_assignment(-c)
        out.append({"space": sid, "width": width, "identity": float(np.mean(np.diag(c))),
                    "permute": float(np.mean(c[rows, cols])), "best": float(np.mean(c.max(1)))})
    return out


def _logits(model, x, batch=500):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    parts = [dict(zip(names, session.run(None, {session.get_inputs()[0].name: x[i:i + batch]})))
             for i in range(0, len(x), batch)]
    return {n: np.concatenate([p[n] for p in parts]) for n in names}


def diagnose_pair(pair, models_dir, x, y, calib, log=print):
    folder = os.path.join(models_dir, pair)
    card = json.load(open(os.path.join(folder, "card.json")))
    tasks = card["tasks"]
    a_path, b_path = os.path.join(folder, "a.onnx"), os.path.join(folder, "b.onnx")
    own = {t: np.isin(y, tasks[t]) for t in tasks}
    result = {"pair": pair, "arch": card["arch"], "methods": {}}
    for label, method in METHODS:
        t0 = time.time()
        res = onnxzip.merge(a_path, b_path, calib, method=method, verify=False)
        rep = evaluate(res.model, x, y, tasks, latency=False)
        logits = _logits(res.model, x)
        cross = {}
        for t in tasks:
            other = [u for u in tasks if u != t][0]
            head = logits[f"{t}/logits"]
            cross[t] = float(head[own[other]].max(1).mean() / head[own[t]].max(1).mean())
        result["methods"][label] = {"joint": rep.joint_accuracy, "routing": rep.task_routing_accuracy,
                                    "per_task": rep.per_task_accuracy, "cross_confidence": cross}
        log(f"{pair} {label:16s} joint {100 * rep.joint_accuracy:5.1f}  routing {100 * rep.task_routing_accuracy:5.1f}"
            f"  per-task " + " / ".join(f"{100 * v:5.1f}" for v in rep.per_task_accuracy.values())
            + "  cross " + " / ".join(f"{v:.2f}" for v in cross.values()) + f"  ({time.time() - t0:.0f} s)")
    result["spaces"] = feature_similarity(a_path, b_path, calib)
    log(f"{pair} feature similarity (identity / permute / best): "
        + ", ".join(f"{s['identity']:.2f}/{s['permute']:.2f}/{s['best']:.2f}" for s in result["spaces"]))
    return result


def _mean_std(values):
    v = np.asarray([x for x in values if x is not None], float)
    if not len(v):
        return "—"
    return f"{100 * v.mean():.1f} ± {100 * v.std(ddof=1):.1f}" if len(v) > 1 else f"{100 * v.mean():.1f}"


def render(results, meta) -> str:
    lines = ["# Diagnosis: what the joint accuracy of a merge is made of", "",
             "Generated by `tools/diagnose.py` — do not edit by hand. " f"Command: `{meta['command']}`  ",
             f"Date: {meta['date']}. onnxzip at commit {meta['revision']}. Test set: {meta['test_set']}. "
             f"Merges: onnxzip defaults (alpha 0.3, beta 0.125, statistics repair on, full zip), calibration "
             f"`models/data/calib.npy`.", "",
             "**Joint** accuracy (the paper's metric: argmax over both heads' logits side by side) is at most the "
             "**routing** accuracy: the share of test images whose largest logit is in their own task's head. "
             "**Per-task**: mean of each head's accuracy on its own task. **Cross conf.**: a head's mean largest "
             "logit on the other task's images divided by that on its own task's images, averaged over the two "
             "heads (how sure a head is of foreign images; the ensemble shows what training alone leaves). Means "
             "± std over the pairs of each architecture.", ""]
    by_arch = {}
    for r in results:
        by_arch.setdefault(r["arch"], []).append(r)
    for arch, rs in by_arch.items():
        lines += [f"## {arch} ({len(rs)} pairs: {', '.join(r['pair'] for r in rs)})", "",
                  "| method | joint | routing | per-task | cross conf. |", "|---|---|---|---|---|"]
        for label, _ in METHODS:
            ms = [r["methods"][label] for r in rs]
            cross = [float(np.mean(list(m["cross_confidence"].values()))) for m in ms]
            lines.append(f"| {label} | {_mean_std([m['joint'] for m in ms])} | "
                         f"{_mean_std([m['routing'] for m in ms])} | "
                         f"{_mean_std([np.mean(list(m['per_task'].values())) for m in ms])} | "
                         f"{np.mean(cross):.2f} |")
        lines += ["", "Feature similarity per zipped space, input to heads (mean correlation of A's and B's "
                  "features, averaged over the pairs): **identity** = the pairs weight averaging merges "
                  "(channel i with channel i), **permute** = the best one-to-one matching, **best** = each of A's "
                  "features with its most correlated feature of B.", "",
                  "| space | width | identity | permute | best |", "|---|---|---|---|---|"]
        n = min(len(r["spaces"]) for r in rs)
        for k in range(n):
            sp = [r["spaces"][k] for r in rs]
            lines.append(f"| {k + 1} | {sp[0]['width']} | {np.mean([s['identity'] for s in sp]):.3f} | "
                         f"{np.mean([s['permute'] for s in sp]):.3f} | {np.mean([s['best'] for s in sp]):.3f} |")
        lines.append("")
    lines += findings(by_arch)
    lines += ["Per pair: [`results/diagnosis.json`](results/diagnosis.json).", ""]
    return "\n".join(lines)


BENCHMARK_LABELS = {"Weight averaging": "Weight averaging", "Permute": "Permute", "ZipIt!": "ZipIt! full"}


def benchmark_joint(path=os.path.join(ROOT, "docs", "results", "benchmark.json")) -> dict:
    """(pair, method label) -> joint accuracy of the benchmark's main full merges (defaults, repair on)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        runs = json.load(f)["runs"]
    wanted = {v: k for k, v in BENCHMARK_LABELS.items()}
    return {(r["pair"], wanted[r["label"]]): r["joint"] for r in runs if r["label"] in wanted and r.get("repair")}


def findings(by_arch) -> list:
    """Sentences computed from the numbers (means over pairs), so that the text cannot drift from them."""
    lines = ["## What the measurements say", "", "Written by the script from the numbers above.", ""]
    bench = benchmark_joint()
    names = [label for label, _ in METHODS[1:]]
    for arch, rs in by_arch.items():
        def mean(label, key):
            vals = []
            for r in rs:
                m = r["methods"][label]
                vals.append(np.mean(list(m[key].values())) if isinstance(m[key], dict) else m[key])
            return float(np.mean(vals))

        order = lambda key: " > ".join(f"{n} {100 * mean(n, key):.1f}"  # noqa: E731
                                       for n in sorted(names, key=lambda n: -mean(n, key)))
        ens_task, zip_task = mean("Ensemble", "per_task"), mean("ZipIt!", "per_task")
        wins = sum(r["methods"]["ZipIt!"]["joint"] > r["methods"]["Permute"]["joint"] for r in rs)
        lines.append(f"- **{arch}** ({len(rs)} pairs): joint {order('joint')}; routing {order('routing')}; "
                     f"per-task {order('per_task')}. ZipIt! beats Permute on joint accuracy on {wins} of "
                     f"{len(rs)} pairs.")
        lines.append(f"  - The ensemble itself routes only {100 * mean('Ensemble', 'routing'):.1f} % of the images to "
                     f"their own head (its joint accuracy {100 * mean('Ensemble', 'joint'):.1f} against "
                     f"{100 * ens_task:.1f} per task): the heads were never trained to be compared.")
        for n in names:
            cross = np.mean([np.mean(list(r["methods"][n]["cross_confidence"].values())) for r in rs])
            lines.append(f"  - {n}: per-task {100 * mean(n, 'per_task'):.1f} "
                         f"({mean(n, 'per_task') / ens_task:.2f} of the ensemble's), routing "
                         f"{100 * mean(n, 'routing'):.1f}, cross-task confidence {cross:.2f} (ensemble "
                         f"{np.mean([np.mean(list(r['methods']['Ensemble']['cross_confidence'].values())) for r in rs]):.2f}).")
        n = min(len(r["spaces"]) for r in rs)
        if n:
            first = np.mean([r["spaces"][0]["permute"] for r in rs])
            last = np.mean([r["spaces"][n - 1]["permute"] for r in rs])
            ident = np.mean([s["identity"] for r in rs for s in r["spaces"][:n]])
            lines.append(f"  - Matched features: the best one-to-one matching pairs features with mean correlation "
                         f"{first:.2f} in the first zipped space and {last:.2f} in the last; weight averaging's "
                         f"channel-i-with-channel-i pairs have {ident:.2f} on average.")
        moves = {n: [100 * (r["methods"][n]["joint"] - bench[r["pair"], n]) for r in rs if (r["pair"], n) in bench]
                 for n in names}
        if all(moves.values()):
            gaps = [100 * abs(r["methods"]["ZipIt!"]["joint"] - r["methods"]["Permute"]["joint"]) for r in rs]
            lines.append("  - Calibration sensitivity: these merges use all 1000 calibration images (no samples held "
                         "back to verify), `tools/benchmark.py` 800 of them. Joint accuracy moved by "
                         + ", ".join(f"{n} {', '.join(f'{v:+.1f}' for v in moves[n])}" for n in names)
                         + f" points per pair between the two; the ZipIt!–Permute gap here is "
                         f"{', '.join(f'{g:.1f}' for g in gaps)} points.")
    lines.append("")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=os.path.join(ROOT, "models"))
    p.add_argument("--pairs", nargs="+", help="pair folder names (default: every pair)")
    p.add_argument("--eval", help="an .npz with x, y (default: the full Fashion-MNIST test set if installed)")
    p.add_argument("--calib", default=os.path.join(ROOT, "models", "data", "calib.npy"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs"))
    p.add_argument("--resume", action="store_true",
                   help="keep the pairs already in <out>/results/diagnosis.json and add the ones given")
    p.add_argument("--render-only", action="store_true", help="only rewrite DIAGNOSIS.md from diagnosis.json")
    args = p.parse_args(argv)
    json_path = os.path.join(args.out, "results", "diagnosis.json")
    if args.render_only:
        with open(json_path) as f:
            old = json.load(f)
        with open(os.path.join(args.out, "DIAGNOSIS.md"), "w") as f:
            f.write(render(old["pairs"], old["meta"]))
        print(f"rewrote {os.path.join(args.out, 'DIAGNOSIS.md')} from {json_path}")
        return
    pairs = args.pairs or find_pairs(args.models)
    x, y, described = load_test_set(args.eval)
    results = []
    if args.resume and os.path.isfile(json_path):
        with open(json_path) as f:
            results = [r for r in json.load(f)["pairs"] if r["pair"] not in pairs]
    results += [diagnose_pair(pair, args.models, x, y, args.calib) for pair in pairs]
    results.sort(key=lambda r: _pair_order(r["pair"]))
    meta = {"command": "python3 tools/diagnose.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "revision": source_revision(), "test_set": described}
    os.makedirs(os.path.join(args.out, "results"), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "pairs": results}, f, indent=1)
    with open(os.path.join(args.out, "DIAGNOSIS.md"), "w") as f:
        f.write(render(results, meta))
    print(f"wrote {os.path.join(args.out, 'DIAGNOSIS.md')}")


if __name__ == "__main__":
    main()
