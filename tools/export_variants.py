"""Export a trained pair again with other ONNX exporters, and check that onnxzip merges every export alike (issue 4).

A pair `models/<arch>-s<seed>/` made by `tools/train_pairs.py` has `a.onnx`, `b.onnx` (TorchScript exporter,
opset 17, BatchNorm folded into the Conv weights: the "default" export) and the trained torch weights `a.pt`,
`b.pt`. From the weights this script writes, under `<pair>/variants/<variant>/`:

- `dynamo`:    `torch.onnx.export(..., dynamo=True)` as shipped (its own opset; the onnxscript optimizer it runs
               by default folds BatchNorm into the Conv weights, and the graph gets dynamo's node and
               initializer names, ReduceMean + Reshape for the ResNet's pooling and flatten);
- `bn_kept`:   the TorchScript exporter (opset 17) with `training=TrainingMode.PRESERVE` and
               `do_constant_folding=False`: BatchNormalization nodes stay in the graph;
- `dynamo_bn`: the dynamo exporter with its optimizer minus the BatchNorm-fusion rewrite: BatchNormalization
               nodes in an otherwise ordinary dynamo graph;
- `dynamo23`:  the dynamo exporter at opset 23, where scaled_dot_product_attention becomes ONNX's fused
               `Attention` op (the same graph as `dynamo` for models without attention).

Each file is checked against torch with onnxruntime (1e-4 × max(1, max |logit|)) on evaluation images, and each
variant folder gets a `card.json` with the pair card's tasks, classes and input/output names, and what the
exporter wrote (opset, ops, names, whether BatchNorm is folded).

`--compare` then merges the default export and every variant with onnxzip (zip, permute, average, zip with
stop_at=1, ensemble), evaluates each merged model on `models/data/eval.npz` (per-task and joint accuracy),
writes `<pair>/variants/compare.json` and `compare.png`, and renders `docs/EXPORTERS.md` from every pair's
variants (so pairs can be added one run at a time).

Usage (from the repository root):

    python3 tools/export_variants.py --pairs models/vgg-s0 models/resnet20-s1          # export + check
    python3 tools/export_variants.py --pairs models/vgg-s0 models/resnet20-s1 --compare
    python3 tools/export_variants.py --render-only --pairs models/vgg-s0 models/resnet20-s1

Needs torch, onnx, onnxruntime, onnxscript (for dynamo=True), onnxzip (this repository), matplotlib (plot).
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
import warnings

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
sys.path.insert(0, ROOT)

CHECK_ATOL = 1e-4
CHECK_IMAGES = 256
EVAL = os.path.join("models", "data", "eval.npz")
CALIB = os.path.join("models", "data", "calib.npy")
# (row label, onnxzip.merge keyword arguments)
METHODS = [
    ("zip", dict(method="zip")),
    ("permute", dict(method="permute")),
    ("average", dict(method="average")),
    ("zip stop_at=1", dict(method="zip", stop_at=1)),
    ("ensemble", dict(method="ensemble")),
    # onnxzip folds BatchNorm before merging; --keep-batchnorm merges BN's parameters per channel instead
    ("zip --keep-batchnorm", dict(method="zip", fold_batchnorm=False)),
    ("average --keep-batchnorm", dict(method="average", fold_batchnorm=False)),
]
EXPORTS = ["default", "dynamo", "bn_kept", "dynamo_bn"]


# ---------------------------------------------------------------- exporters

def _quiet_torch_onnx():
    """Silence the exporters' chatter (deprecation notes, dynamo's progress lines, torchvision-missing warnings)."""
    import logging
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _export_dynamo(model, path, opset=None):
    import torch
    batch = torch.export.Dim("batch")
    version = {} if opset is None else {"opset_version": opset}
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), path, dynamo=True, input_names=["input"],
                          output_names=["logits"], dynamic_shapes=({0: batch},), external_data=False, verbose=False,
                          **version)
    return {"call": "torch.onnx.export(model, (x,), path, dynamo=True, input_names=['input'], "
                    "output_names=['logits'], dynamic_shapes=({0: Dim('batch')},)"
                    + ("" if opset is None else f", opset_version={opset}") + ")"}


def _export_dynamo23(model, path):
    return _export_dynamo(model, path, opset=23)


@contextlib.contextmanager
def _without_batchnorm_fusion():
    """The onnxscript optimizer that dynamo=True runs, minus its Conv+BatchNorm fusion rules.

    Relies on onnxscript's private rule table (`rewriter._DEFAULT_REWRITE_RULES`, read when the optimizer runs);
    checked on onnxscript 0.7.2.
    """
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import _fuse_batchnorm

    fusion = {id(rule) for rule in _fuse_batchnorm.rules}
    saved = rewriter._DEFAULT_REWRITE_RULES
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in saved if id(r) not in fusion)
    if len(rewriter._DEFAULT_REWRITE_RULES) == len(saved):
        rewriter._DEFAULT_REWRITE_RULES = saved
        raise RuntimeError("onnxscript's BatchNorm fusion rules are not in its default rewrite rules; "
                           "this onnxscript version needs another way to keep BatchNorm")
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


def _export_dynamo_bn(model, path):
    with _without_batchnorm_fusion():
        info = _export_dynamo(model, path)
    info["call"] += ", with onnxscript's optimizer minus its BatchNorm fusion rules"
    return info


def _export_bn_kept(model, path):
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, torch.zeros(1, 1, 28, 28), path, dynamo=False, opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return {"call": "torch.onnx.export(model.eval(), x, path, dynamo=False, opset_version=17, "
                    "training=TrainingMode.PRESERVE, do_constant_folding=False, input_names=['input'], "
                    "output_names=['logits'], dynamic_axes={batch})"}


VARIANTS = {
    "dynamo": _export_dynamo,
    "dynamo23": _export_dynamo23,
    "bn_kept": _export_bn_kept,
    "dynamo_bn": _export_dynamo_bn,
}


def describe_onnx(path):
    """What an exporter wrote: opset, op counts, input/output names and shapes, node and initializer names."""
    import onnx

    proto = onnx.load(path)
    ops = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return {
        "opset": {imp.domain or "ai.onnx": imp.version for imp in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "ops": dict(sorted(ops.items())),
        "inputs": {v.name: shape(v) for v in proto.graph.input},
        "outputs": {v.name: shape(v) for v in proto.graph.output},
        "node_names": [n.name for n in proto.graph.node[:4]] + ["..."] + [n.name for n in proto.graph.node[-3:]],
        "initializer_names": [t.name for t in proto.graph.initializer[:6]],
        "initializers": len(proto.graph.initializer),
        "batchnorm": "kept" if "BatchNormalization" in ops else "folded",
        "bytes": os.path.getsize(path),
    }


# ---------------------------------------------------------------- export a pair

def _read_card(pair):
    with open(os.path.join(pair, "card.json")) as f:
        return json.load(f)


def _task_eval(card, k):
    """Evaluation images of task k with labels remapped to head order (as train_pairs evaluates)."""
    import fmnist
    data = np.load(os.path.join(ROOT, EVAL))
    return fmnist.task_subset(data["x"], data["y"], card["tasks"][k])


def state_dict_from_onnx(arch, num_classes, path):
    """Torch weights rebuilt from a default export (BN folded), for pairs trained before `a.pt` was kept.

    Each Conv gets the folded kernel; the BatchNorm after it gets scale 1, the folded bias as shift, mean 0 and
    variance 1 - eps, so it computes exactly the folded bias. The rebuilt model computes the exported function,
    but its BatchNorm carries no information: a BN-kept export of it tests how onnxzip handles BatchNormalization
    nodes in the graph, not how it merges trained BN parameters. Conv nodes are matched to modules in execution
    order (forward hooks), Gemm to the last Linear.
    """
    import onnx
    import torch
    from onnx import numpy_helper

    import models_torch

    proto = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    gemms = [n for n in proto.graph.node if n.op_type == "Gemm"]
    model = models_torch.build(arch, num_classes).eval()
    order, hooks = [], []
    modules = list(model.named_modules())
    for name, mod in modules:
        if isinstance(mod, torch.nn.Conv2d):
            hooks.append(mod.register_forward_hook(lambda m, i, o, name=name: order.append(name)))
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    for h in hooks:
        h.remove()
    if len(order) != len(convs):
        raise RuntimeError(f"{path}: {len(convs)} Conv nodes but the {arch} model runs {len(order)} Conv2d modules")
    names = [n for n, _ in modules]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name, node in zip(order, convs):
        sd[f"{name}.weight"] = torch.from_numpy(inits[node.input[1]].copy())
        bn_name = names[names.index(name) + 1]
        bn = dict(modules)[bn_name]
        if not isinstance(bn, torch.nn.BatchNorm2d) or len(node.input) < 3:
            raise RuntimeError(f"{path}: {name} is not followed by a BatchNorm2d / has no folded bias")
        bias = torch.from_numpy(inits[node.input[2]].copy())
        sd[f"{bn_name}.weight"] = torch.ones_like(bias)
        sd[f"{bn_name}.bias"] = bias
        sd[f"{bn_name}.running_mean"] = torch.zeros_like(bias)
        sd[f"{bn_name}.running_var"] = torch.full_like(bias, 1 - bn.eps)
    linears = [n for n, m in modules if isinstance(m, torch.nn.Linear)]
    for name, node in zip(linears, gemms):
        sd[f"{name}.weight"] = torch.from_numpy(inits[node.input[1]].copy())
        sd[f"{name}.bias"] = torch.from_numpy(inits[node.input[2]].copy())
    return sd


def _weights(pair, card, k, from_onnx):
    import torch
    path = os.path.join(pair, f"{k}.pt")
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu"), "trained state dict (a.pt / b.pt)"
    if not from_onnx:
        raise FileNotFoundError(f"{path} missing: only pairs trained with the weights saved can be exported "
                                "again (tools/train_pairs.py writes them), or pass --from-onnx")
    return (state_dict_from_onnx(card["arch"], len(card["tasks"][k]), os.path.join(pair, f"{k}.onnx")),
            "rebuilt from the default export (BN folded): BatchNorm scale 1, shift = folded bias, mean 0, "
            "variance 1 - eps; its BatchNorm parameters carry no trained information")


def export_pair(pair, out=None, variants=tuple(VARIANTS), log=print, from_onnx=False):
    """Write <out>/<variant>/{a,b}.onnx and card.json for every variant; return {variant: card}."""
    import onnx
    import onnxruntime
    import torch

    import models_torch
    import train_pairs

    _quiet_torch_onnx()
    card = _read_card(pair)
    out = out or os.path.join(pair, "variants")
    weights = {k: _weights(pair, card, k, from_onnx) for k in "ab"}
    cards = {}
    for variant in variants:
        vdir = os.path.join(out, variant)
        os.makedirs(vdir, exist_ok=True)
        vcard = {key: card[key] for key in ("arch", "seed", "tasks", "class_names", "input", "output",
                                            "normalization", "architecture", "parameters_torch") if key in card}
        vcard.update(variant=variant, variant_of=os.path.relpath(pair, ROOT), files={}, test_accuracy={},
                     test_count={}, default_test_accuracy={})
        diffs = {}
        for k in "ab":
            model = models_torch.build(card["arch"], len(card["tasks"][k]))
            model.load_state_dict(weights[k][0])
            model.eval()
            path = os.path.join(vdir, f"{k}.onnx")
            t0 = time.time()
            info = VARIANTS[variant](model, path)
            seconds = time.time() - t0
            xe, ye = _task_eval(card, k)
            diffs[k] = train_pairs.check_onnx(path, model, xe[:CHECK_IMAGES], atol=CHECK_ATOL)
            # and the default export against the same torch model (proves rebuilt weights, with --from-onnx)
            vcard.setdefault("default_max_abs_diff", {})[k] = train_pairs.check_onnx(
                os.path.join(pair, f"{k}.onnx"), model, xe[:CHECK_IMAGES], atol=CHECK_ATOL)
            desc = describe_onnx(path)
            vcard["files"][k] = desc
            vcard["parameters"] = train_pairs.onnx_parameters(path)  # this export's own count (BN kept: more)
            vcard["test_accuracy"][k] = train_pairs.onnx_accuracy(path, xe, ye)
            vcard["default_test_accuracy"][k] = train_pairs.onnx_accuracy(os.path.join(pair, f"{k}.onnx"), xe, ye)
            vcard["test_count"][k] = int(len(xe))
            log(f"{pair} {variant}/{k}.onnx: opset {desc['opset']}, BN {desc['batchnorm']}, "
                f"max |diff| vs torch {diffs[k]:.1e}, own-task accuracy {100 * vcard['test_accuracy'][k]:.2f} % "
                f"(default export {100 * vcard['default_test_accuracy'][k]:.2f} %), {seconds:.1f}s")
        vcard["test_set"] = f"{EVAL} (the task's images)"
        vcard["weights"] = weights["a"][1]
        vcard["export"] = dict(info, variant=variant, torch=torch.__version__, onnx=onnx.__version__,
                               onnxruntime=onnxruntime.__version__, onnxscript=_version("onnxscript"),
                               check_atol=CHECK_ATOL, check_images=CHECK_IMAGES, max_abs_diff=diffs)
        with open(os.path.join(vdir, "card.json"), "w") as f:
            json.dump(vcard, f, indent=2)
            f.write("\n")
        cards[variant] = vcard
    return cards


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


# ---------------------------------------------------------------- compare merges

def compare_pair(pair, out=None, exports=EXPORTS, log=print):
    """Merge every export of the pair with each method of METHODS; write and return <out>/compare.json."""
    import onnxzip
    from onnxzip.evaluate import evaluate

    card = _read_card(pair)
    out = out or os.path.join(pair, "variants")
    data = np.load(os.path.join(ROOT, EVAL))
    x, y = data["x"], data["y"]
    calib = os.path.join(ROOT, CALIB)
    results = {"pair": os.path.relpath(pair, ROOT), "tasks": card["tasks"], "eval": EVAL, "calib": CALIB,
               "num_images": int(len(x)), "onnxzip": onnxzip.__version__, "refit": "ls", "exports": {}, "runs": []}
    for export in exports:
        folder = pair if export == "default" else os.path.join(out, export)
        if not os.path.isfile(os.path.join(folder, "a.onnx")):
            log(f"{pair}: no {export} export, skipped")
            continue
        results["exports"][export] = os.path.relpath(folder, ROOT)
        for label, kwargs in METHODS:
            t0 = time.time()
            run = {"export": export, "method": label, "kwargs": kwargs}
            try:
                res = onnxzip.merge(os.path.join(folder, "a.onnx"), os.path.join(folder, "b.onnx"), calib, **kwargs)
            except Exception as exc:  # recorded, not fatal: a failing export is a finding
                run["error"] = f"{type(exc).__name__}: {exc}"
                log(f"{pair} {export:9s} {label:14s} FAILED {run['error']}")
                results["runs"].append(run)
                continue
            rep = evaluate(res.model, x, y, card["tasks"], latency=False)
            trunk = res.card.get("trunk", {})
            run.update(
                joint=rep.joint_accuracy, per_task=rep.per_task_accuracy, params=rep.params, macs=rep.macs,
                seconds=round(time.time() - t0, 2), unmerged=res.card.get("unmerged", []),
                weighted_layers=trunk.get("weighted_layers"), weighted_layers_zipped=trunk.get("weighted_layers_zipped"),
                spaces=len(res.card.get("spaces", [])),
            )
            results["runs"].append(run)
            log(f"{pair} {export:9s} {label:14s} joint {100 * rep.joint_accuracy:5.2f}  "
                + "  ".join(f"{t} {100 * a:5.2f}" for t, a in rep.per_task_accuracy.items())
                + f"  zipped {run['weighted_layers_zipped']}/{run['weighted_layers']}, {len(run['unmerged'])} "
                  f"unmerged, {run['seconds']:.0f}s")
    results["average_rule"] = check_average_rule(pair, list(results["exports"]), log)
    results["created"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    plot_pair(results, os.path.join(out, "compare.png"))
    return results


def check_average_rule(pair, exports, log=print, images=200):
    """onnxzip's `average` without repair against torch: the two BN-folded models averaged (the default: onnxzip
    folds BatchNorm before merging) and, for exports with BatchNorm kept, `--keep-batchnorm` against the two state
    dicts averaged; each task's own head on top. Max |logit difference| per export and head.

    Shows which parametrization onnxzip averages: ZIPIT.md's rule merges the weights it finds in the graph, so with
    BatchNorm kept it averages the raw Conv weights and the BN parameters, and with BN folded the folded weights;
    the two are different models.
    """
    import torch
    from torch.fx.experimental.optimization import fuse

    import models_torch
    import onnxruntime as ort
    import onnxzip

    card = _read_card(pair)
    x = np.load(os.path.join(ROOT, EVAL))["x"][:images]
    states = {k: _weights(pair, card, k, True)[0] for k in "ab"}

    def averaged(head, folded):
        models = {}
        for k in "ab":
            m = models_torch.build(card["arch"], len(card["tasks"][k]))
            m.load_state_dict(states[k])
            models[k] = fuse(m.eval()) if folded else m.eval()
        own = models[head]
        sa, sb = models["a"].state_dict(), models["b"].state_dict()
        last = [name for name, _ in own.named_parameters()][-1].rsplit(".", 1)[0] + "."  # the task head
        merged = {name: own.state_dict()[name] if name.startswith(last) or not t.dtype.is_floating_point
                  else (t + sb[name]) / 2 for name, t in sa.items()}
        own.load_state_dict(merged)
        return own

    out = {}
    for export in exports:
        folder = pair if export == "default" else os.path.join(pair, "variants", export)
        kept = describe_onnx(os.path.join(folder, "a.onnx"))["batchnorm"] != "folded"
        for fold in (True, False) if kept else (True,):
            res = onnxzip.merge(os.path.join(folder, "a.onnx"), os.path.join(folder, "b.onnx"),
                                os.path.join(ROOT, CALIB), method="average", repair=False, refit="none", verify=False,
                                fold_batchnorm=fold)
            sess = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
            got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))
            row = {"torch_reference": "average of the BN-folded models" if fold else "average of the state dicts"}
            for k in "ab":
                with torch.no_grad():
                    want = averaged(k, fold)(torch.from_numpy(x)).numpy()
                row[k] = {"max_abs_diff": float(np.abs(got[f"{k}/logits"] - want).max()),
                          "max_abs_logit": float(np.abs(want).max())}
            label = export if fold else f"{export} --keep-batchnorm"
            out[label] = row
            log(f"{pair} {label:24s} average (no repair) vs torch {row['torch_reference']}: max |diff| "
                f"a {row['a']['max_abs_diff']:.1e}, b {row['b']['max_abs_diff']:.1e}")
    return out


def plot_pair(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    exports = list(results["exports"])
    methods = [m for m, _ in METHODS]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(1, len(exports))
    n = results["num_images"]
    for i, export in enumerate(exports):
        vals = [_cell(results, export, m, "joint") for m in methods]
        xs = [j + (i - (len(exports) - 1) / 2) * width for j in range(len(methods))]
        errs = [math.sqrt(v * (1 - v) / n) if v is not None else 0 for v in vals]
        ax.bar(xs, [100 * (v or 0) for v in vals], width, yerr=[100 * e for e in errs], capsize=2, label=export)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods)
    ax.set_ylabel("joint accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{os.path.basename(results['pair'])}: onnxzip merges of each export "
                 f"({n} images, bars ± binomial std)", fontsize=9)
    ax.legend(fontsize=8, ncol=len(exports), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(results, export, method, key, task=None):
    for run in results["runs"]:
        if run["export"] == export and run["method"] == method and "error" not in run:
            return run[key] if task is None else run[key].get(task)
    return None


# ---------------------------------------------------------------- report

def render(pairs, path):
    """docs/EXPORTERS.md from every pair's variants/*/card.json and variants/compare.json."""
    lines = [
        "# Exporters: does onnxzip merge every PyTorch export of a pair alike? (issue 4)",
        "",
        "Generated by `tools/export_variants.py` — do not edit by hand. Command: "
        f"`python3 tools/export_variants.py --pairs {' '.join(os.path.relpath(p, ROOT) for p in pairs)} --compare"
        + (" --from-onnx" if any(not os.path.isfile(os.path.join(p, "a.pt")) for p in pairs) else "")
        + "` (`--from-onnx` only acts on pairs without `a.pt`/`b.pt`).",
        "",
        "The pairs in `models/` are exported by `tools/train_pairs.py` with the TorchScript exporter (opset 17, "
        "BatchNorm folded into the Conv weights): the **default** export. The same trained weights (`a.pt`, "
        "`b.pt`) are exported again into `models/<pair>/variants/<variant>/` (each with a `card.json`):",
        "",
        "- **dynamo**: `torch.onnx.export(..., dynamo=True)` as shipped.",
        "- **bn_kept**: TorchScript exporter, opset 17, `training=TrainingMode.PRESERVE, do_constant_folding=False`: "
        "BatchNormalization nodes kept.",
        "- **dynamo_bn**: dynamo exporter with its onnxscript optimizer minus the Conv+BatchNorm fusion rules: "
        "BatchNormalization nodes kept in a dynamo graph.",
        "- **dynamo23**: the dynamo exporter at `opset_version=23`, where `scaled_dot_product_attention` becomes "
        "ONNX's fused `Attention` op (exported for the ViT pair).",
        "",
        "Every file is checked against torch with onnxruntime (max |diff| ≤ 1e-4 × max(1, max |logit|) on 256 "
        "evaluation images of its task).",
        "",
    ]
    comparisons = []
    for pair in pairs:
        vroot = os.path.join(pair, "variants")
        cards = {}
        for v in VARIANTS:
            p = os.path.join(vroot, v, "card.json")
            if os.path.isfile(p):
                with open(p) as f:
                    cards[v] = json.load(f)
        if not cards:
            continue
        name = os.path.basename(os.path.normpath(pair))
        lines += [f"## What the exporters wrote: {name}", ""]
        default = describe_onnx(os.path.join(pair, "a.onnx"))
        descs = {"default": default, **{v: c["files"]["a"] for v, c in cards.items()}}
        lines += ["| export | opset | BatchNorm | ops in a.onnx | input → output | node names | initializer names | "
                  "max \\|diff\\| vs torch (a, b) | own-task acc. a / b |",
                  "|---|---|---|---|---|---|---|---|---|"]
        pair_card = _read_card(pair)
        for export, d in descs.items():
            opset = d["opset"].get("ai.onnx")
            ops = ", ".join(f"{k}×{v}" for k, v in d["ops"].items())
            io = (", ".join(f"`{k}` {v}" for k, v in d["inputs"].items()) + " → "
                  + ", ".join(f"`{k}` {v}" for k, v in d["outputs"].items()))
            nodes = ", ".join(f"`{n}`" for n in d["node_names"][:2] + d["node_names"][-2:])
            inits = ", ".join(f"`{n}`" for n in d["initializer_names"][:3])
            if export == "default":
                diff = pair_card["export"]["max_abs_diff"]
                acc = next(iter(cards.values()))["default_test_accuracy"]  # on the variants' evaluation images
            else:
                diff = cards[export]["export"]["max_abs_diff"]
                acc = cards[export]["test_accuracy"]
            acc_note = f"{100 * acc['a']:.2f} / {100 * acc['b']:.2f}"
            lines.append(f"| {export} | {opset} | {d['batchnorm']} | {ops} | {io} | {nodes} | {inits} | "
                         f"{diff['a']:.1e}, {diff['b']:.1e} | {acc_note} |")
        any_card = next(iter(cards.values()))
        lines += ["", f"Torch weights exported: {any_card.get('weights', 'trained state dict (a.pt / b.pt)')}."]
        lines += ["", f"torch {any_card['export']['torch']}, onnx {any_card['export']['onnx']}, onnxruntime "
                  f"{any_card['export']['onnxruntime']}, onnxscript {any_card['export']['onnxscript']}. Own-task "
                  f"accuracy on the task's images of `{EVAL}` with onnxruntime.", ""]
        cpath = os.path.join(vroot, "compare.json")
        if not os.path.isfile(cpath):
            lines += ["(no comparison run yet)", ""]
            continue
        with open(cpath) as f:
            results = json.load(f)
        comparisons.append((name, results))
        lines += _comparison_table(name, results)
    lines += _verdict(comparisons)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


NOISE_JOINT = 0.022  # ≈ 2 binomial std of a joint accuracy near 0.5 on 2000 images
NOISE_TASK = 0.02  # ≈ 2 std of a per-task accuracy near 0.7-0.9 on 1000 images (0.9 to 2.9 points; generous)


def _bn_handling(results):
    """export -> 'folded' | 'kept', read from the files."""
    return {e: describe_onnx(os.path.join(ROOT, folder, "a.onnx"))["batchnorm"]
            for e, folder in results["exports"].items()}


def _spread(values):
    return max(values) - min(values) if len(values) > 1 else None


def _deltas(results, method):
    """(Δ joint, {task: Δ}) among exports with the same BN handling (max over the groups), and among all."""
    bn = _bn_handling(results)
    runs = [r for r in results["runs"] if r["method"] == method and "error" not in r]
    tasks = list(results["tasks"])

    def spread(group):
        sub = [r for r in runs if r["export"] in group]
        return (_spread([r["joint"] for r in sub]), {t: _spread([r["per_task"][t] for r in sub]) for t in tasks})

    groups = [[e for e in bn if bn[e] == h] for h in ("folded", "kept")]
    same = [spread(g) for g in groups if len(g) > 1]
    same_joint = max((d[0] for d in same if d[0] is not None), default=None)
    same_task = {t: max((d[1][t] for d in same if d[1][t] is not None), default=None) for t in tasks}
    return (same_joint, same_task), spread(list(bn))


def _fmt(d, tasks=None):
    if tasks is None:
        return "—" if d is None else f"{100 * d:.2f}"
    return " / ".join(_fmt(d[t]) for t in tasks)


def _against_default(results, method):
    """Exports within noise of the default export, and 'export Δ joint / Δ per task' for the others."""
    runs = {r["export"]: r for r in results["runs"] if r["method"] == method and "error" not in r}
    base = runs.get("default")
    ok, off = [], []
    for export, run in runs.items():
        if export == "default" or base is None:
            continue
        dj = abs(run["joint"] - base["joint"])
        dt = max(abs(run["per_task"][t] - base["per_task"][t]) for t in results["tasks"])
        if dj <= NOISE_JOINT and dt <= NOISE_TASK:
            ok.append(export)
        else:
            off.append(f"{export} Δ {_fmt(dj)} joint, up to {_fmt(dt)} per task")
    return ok, off


def _comparison_table(name, results):
    exports = list(results["exports"])
    n = results["num_images"]
    tasks = list(results["tasks"])
    bn = _bn_handling(results)
    png = os.path.relpath(os.path.join(ROOT, results["pair"], "variants", "compare.png"), os.path.join(ROOT, "docs"))
    lines = [f"## Merges: {name}", "",
             f"`onnxzip.merge(a, b, '{results['calib']}', method=...)` (defaults otherwise: alpha 0.3, beta 0.125, "
             + ("the least-squares refit of every merged layer and head (`refit='ls'`)"
                if results.get("refit") == "ls" else
                "statistics repair (recorded before the least-squares refit became the default)")
             + f", BatchNorm folded before merging; `--keep-batchnorm` rows: "
             f"`fold_batchnorm=False`), evaluated with `onnxzip.evaluate.evaluate(..., latency=False)` on "
             f"`{results['eval']}` ({n} test images, {n // 2} per task). Cells: **joint** accuracy % "
             f"(task {' / task '.join(tasks)}). BatchNorm: "
             + ", ".join(f"{e} {bn[e]}" for e in exports) + " (in the file). **Δ exporter**: the largest difference between two "
             "exports with the same BatchNorm handling (default↔dynamo, bn_kept↔dynamo_bn), joint; per task. "
             f"**Δ all**: the largest difference between any two exports. onnxzip {results['onnxzip']}, run "
             f"{results['created']}; raw figures in `{results['pair']}/variants/compare.json`.", "",
             f"![joint accuracy per export]({png})", "",
             "| method | " + " | ".join(exports) + " | Δ exporter | Δ all | zipped layers | unmerged regions |",
             "|---|" + "---|" * (len(exports) + 4)]
    for method, _ in METHODS:
        cells, zipped, unmerged = [], set(), set()
        for export in exports:
            run = next((r for r in results["runs"] if r["export"] == export and r["method"] == method), None)
            if run is None:
                cells.append("—")
            elif "error" in run:
                cells.append(f"error: {run['error'][:80]}")
            else:
                cells.append(f"**{100 * run['joint']:.2f}** ("
                             + " / ".join(f"{100 * run['per_task'][t]:.2f}" for t in tasks) + ")")
                zipped.add(f"{run['weighted_layers_zipped']}/{run['weighted_layers']}")
                unmerged.add(str(len(run["unmerged"])))
        (sj, st), (aj, at) = _deltas(results, method)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_fmt(sj)}; {_fmt(st, tasks)} | "
                     f"{_fmt(aj)}; {_fmt(at, tasks)} | {', '.join(sorted(zipped))} | {', '.join(sorted(unmerged))} |")
    lines.append("")
    for export in exports:
        runs = [r for r in results["runs"] if r["export"] == export and r.get("unmerged")]
        if not runs:
            continue
        reasons = [runs[0]["unmerged"][0]["reason"]]
        ops = describe_onnx(os.path.join(ROOT, results["exports"][export], "a.onnx"))["ops"]
        note = (f" The graph has Identity×{ops['Identity']}: the TorchScript exporter writes an initializer whose "
                "values equal an earlier one's as an Identity node of that one, and onnxzip reads a "
                "BatchNormalization parameter that comes out of an Identity as computed, so it leaves that BN, "
                "and the rest of the trunk, unmerged and cannot repair those layers' statistics."
                if "Identity" in ops else "")
        lines += [f"**{export}**: onnxzip left {max(len(r['unmerged']) for r in runs)} region(s) unmerged "
                  f"({'; '.join(reasons)}; e.g. `{runs[0]['unmerged'][0]['node']}`).{note}", ""]
    rule = results.get("average_rule")
    if rule:
        lines += ["What `average` computes, checked against torch (merge with `repair=False, refit='none'`, 200 "
                  "images, each "
                  "head on the averaged trunk):", "",
                  "| export | torch reference | max \\|logit diff\\| a | b | max \\|logit\\| |", "|---|---|---|---|---|"]
        for export, row in rule.items():
            lines.append(f"| {export} | {row['torch_reference']} | {row['a']['max_abs_diff']:.1e} | "
                         f"{row['b']['max_abs_diff']:.1e} | {max(row['a']['max_abs_logit'], row['b']['max_abs_logit']):.2f} |")
        lines.append("")
    return lines


def _verdict(comparisons):
    if not comparisons:
        return []
    lines = ["## Verdict", "",
             "Noise: an accuracy p measured on n images has binomial std √(p(1−p)/n): about 1.1 points for a "
             "joint accuracy near 0.5 (n = 2000) and 0.5–1.5 points per task (n = 1000, p ≈ 0.95–0.5). Two merges "
             "of one pair are evaluated on the *same* images, so their difference varies less than two independent "
             f"measurements; we call a difference noise below {100 * NOISE_JOINT:.1f} points joint and "
             f"{100 * NOISE_TASK:.1f} per task (≈ 2 std).", ""]
    for name, results in comparisons:
        for method, _ in METHODS:
            errors = [r["export"] for r in results["runs"] if r["method"] == method and "error" in r]
            (sj, st), (aj, at) = _deltas(results, method)
            worst_task = max((v for v in at.values() if v is not None), default=None)
            worst_same = max((v for v in st.values() if v is not None), default=None)
            if errors:
                verdict = f"FAILS on {', '.join(errors)}"
            elif aj is not None and aj <= NOISE_JOINT and (worst_task or 0) <= NOISE_TASK:
                verdict = f"all exports agree within noise (Δ all {_fmt(aj)} joint, ≤ {_fmt(worst_task)} per task)"
            elif sj is not None and sj <= NOISE_JOINT and (worst_same or 0) <= NOISE_TASK:
                verdict = (f"the exporter makes no difference (Δ exporter {_fmt(sj)} joint, ≤ {_fmt(worst_same)} "
                           f"per task), but BatchNorm folded vs kept does: **Δ {_fmt(aj)} joint, up to "
                           f"{_fmt(worst_task)} per task — not noise**")
            else:
                ok, off = _against_default(results, method)
                verdict = (f"**NOT within noise**: vs default, {'; '.join(off)}"
                           + (f"; {', '.join(ok)} agree with default within noise" if ok else ""))
            lines.append(f"- **{name}, {method}**: {verdict}.")
    lines += ["", "Merges of different exports are not bit-identical: folding BatchNorm into the Conv weights rounds "
              "differently from running it, and the dynamo exporter orders and names the graph its own way, so "
              "calibration statistics differ in their last bits and the greedy matching can take another pair on "
              "a near-tie. The ensemble rows (no matching) show the floor: the exports compute the same functions.",
              "",
              "Why onnxzip folds BatchNorm first (its default since this comparison first ran): ZIPIT.md's rule "
              "merges the weights it finds in the graph (W* = M_A W_A U_A + M_B W_B U_B, BatchNorm parameters "
              "merged with M). With BN kept (`--keep-batchnorm` rows) that averages the raw Conv kernels and, "
              "separately, BN's scale, shift, mean and variance; with BN folded it averages kernels already "
              "multiplied by each model's γ/σ. For two unaligned models (plain averaging matches channel i of A "
              "with channel i of B whatever they compute) these are different models, and statistics repair "
              "cannot undo the difference, which is in the direction of each merged filter, not its scale. So "
              "onnxzip folds every inference BatchNorm into the Conv or Gemm before it: every export of a model "
              "then merges to the same model (to float32 rounding), and a BN-kept export can be merged with a "
              "folded one. The check above shows onnxzip computes each parametrization exactly (logits equal to "
              "torch's to float32 rounding). After matching (zip, permute) the paired filters are similar and the "
              "two parametrizations give nearly the same merge.", ""]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", required=True, help="pair folders, e.g. models/vgg-s0")
    p.add_argument("--out", default=None, help="where the variants go (default: <pair>/variants/; one pair only)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--compare", action="store_true", help="also merge every export and write docs/EXPORTERS.md")
    p.add_argument("--skip-export", action="store_true", help="reuse the variants already written")
    p.add_argument("--from-onnx", action="store_true",
                   help="for a pair without a.pt/b.pt: rebuild the torch weights from the default export "
                        "(BatchNorm then carries only the folded bias; see state_dict_from_onnx)")
    p.add_argument("--render-only", action="store_true", help="only rewrite docs/EXPORTERS.md from the JSON files")
    p.add_argument("--doc", default=os.path.join(ROOT, "docs", "EXPORTERS.md"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.out and len(args.pairs) > 1:
        p.error("--out works with one pair only")
    pairs = [os.path.abspath(pair) for pair in args.pairs]
    if not args.render_only:
        import torch
        torch.set_num_threads(args.threads)
        for pair in pairs:
            if not args.skip_export:
                export_pair(pair, args.out, args.variants, from_onnx=args.from_onnx)
            if args.compare:
                compare_pair(pair, args.out, ["default"] + args.variants)
    if args.compare or args.render_only:
        render(pairs, args.doc)
        print(f"wrote {os.path.relpath(args.doc)}")


if __name__ == "__main__":
    main()
