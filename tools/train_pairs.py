"""Train ZipIt!-style model pairs (or triples, ...) on disjoint Fashion-MNIST tasks, export them to ONNX, write cards.

For each seed s: task_split(s, split) cuts the 10 classes into disjoint tasks (default 5+5); model m (a, b, c, ...)
is trained on task m only, from its own random init (torch seed 1000*s+0 for a, 1000*s+1 for b, +2 for c, ...).
Each is exported to ONNX, checked against torch with onnxruntime, and written with a card to
<out>/<arch>-s<seed>/ (the 5+5 pairs) or <out>/<arch><N>-s<seed>/ for any other split into N tasks.

Examples:
    python3 tools/train_pairs.py --arch mlp --seeds 0 1 2 --epochs 4 --out models/
    python3 tools/train_pairs.py --arch mlp --seeds 0 --epochs 8 --split 4,3,3 --out models/    # -> models/mlp3-s0/
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fmnist  # noqa: E402
import models_torch  # noqa: E402

# Per-arch training defaults; every one can be overridden on the command line and is recorded in the card.
RECIPES = {
    "mlp": dict(lr=0.05, weight_decay=5e-4, augment=False),
    "vgg": dict(lr=0.05, weight_decay=5e-4, augment=True),
    "resnet20": dict(lr=0.1, weight_decay=5e-4, augment=True),
    "resnet20x2": dict(lr=0.1, weight_decay=5e-4, augment=True),
    # transformers train poorly with plain SGD at this budget: AdamW, as ViTs are usually trained
    "vit": dict(lr=1e-3, weight_decay=0.05, augment=True, optimizer="adamw"),
    "vitgqa": dict(lr=1e-3, weight_decay=0.05, augment=True, optimizer="adamw"),
    "swinvit": dict(lr=1e-3, weight_decay=0.05, augment=True, optimizer="adamw"),
    "swinv2vit": dict(lr=1e-3, weight_decay=0.05, augment=True, optimizer="adamw"),
}
CROP_PAD = 2
DEFAULT_SPLIT = (5, 5)
MODEL_NAMES = "abcdefghij"
CALIB_SEED, CALIB_SIZE = 20240101, 1000
EVAL_SEED, EVAL_PER_CLASS = 20240102, 200


# ---------------------------------------------------------------- export

def _export_torchscript(model, path, opset):
    # The TorchScript exporter in eval mode folds BatchNorm into the preceding Conv: what most users ship.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript", DeprecationWarning)
        torch.onnx.export(
            model, torch.zeros(1, 1, 28, 28), path, dynamo=False, opset_version=opset,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


# One entry per exporter variant; a later task can add e.g. "dynamo" (dynamo=True) or a BN-kept TorchScript export.
EXPORTERS = {
    "torchscript": _export_torchscript,
}


def export_onnx(model, path, exporter="torchscript", opset=17):
    """Export `model` (put in eval mode) to `path` with the named exporter; return a description for the card."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose one of {sorted(EXPORTERS)}")
    model.eval()
    EXPORTERS[exporter](model, path, opset)
    return {"exporter": exporter, "opset": opset, "torch": torch.__version__}


def check_onnx(path, model, x, atol=1e-4):
    """Run the exported file with onnxruntime on x (float32 numpy) and compare to torch; return max |diff|.

    The tolerance is atol * max(1, max |logit|): BN folded into Conv changes float32 rounding, and the error
    scales with the logits' magnitude.

    Also refuse float64 initializers (they double the file and break float32 pipelines).
    """
    import onnx
    import onnxruntime as ort

    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    wide = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.DOUBLE]
    if wide:
        raise RuntimeError(f"{path}: float64 initializers {wide[:5]}")
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x})[0]
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    diff = float(np.abs(got - want).max())
    tol = atol * max(1.0, float(np.abs(want).max()))
    if not diff <= tol:
        raise RuntimeError(f"{path}: onnxruntime output differs from torch by {diff:.3g} > {tol:.3g}")
    return diff


def onnx_accuracy(path, x, y, batch=1000):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, len(x), batch):
        logits = sess.run(["logits"], {"input": x[i:i + batch]})[0]
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def onnx_parameters(path: str) -> int:
    """Parameters of an exported model as onnxzip counts them (`onnxzip.evaluate.count_parameters`)."""
    import onnx

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from onnxzip.evaluate import count_parameters

    return count_parameters(onnx.load(path))


def onnx_summary(path):
    import onnx

    proto = onnx.load(path)
    ops = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"bytes": os.path.getsize(path), "sha256": digest, "ops": dict(sorted(ops.items()))}


# ---------------------------------------------------------------- training

def random_crop(xb, pad, background, generator):
    """Per-sample random translation by up to `pad` pixels (pad with the background value, then crop 28x28)."""
    n, c, h, w = xb.shape
    padded = F.pad(xb, (pad, pad, pad, pad), value=background)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    out = torch.empty_like(xb)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        out[i] = padded[i, :, dy:dy + h, dx:dx + w]
    return out


def evaluate(model, x, y, batch=1000):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def train_one(arch, x, y, torch_seed, epochs, lr, weight_decay, momentum, batch_size, augment, log=print,
              optimizer="sgd"):
    """Train one model from init seed `torch_seed`; SGD + momentum (or AdamW) with a per-step cosine LR to 0."""
    torch.manual_seed(torch_seed)
    gen = torch.Generator().manual_seed(torch_seed)
    num_classes = int(y.max()) + 1
    model = models_torch.build(arch, num_classes)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    background = float((0.0 - fmnist.MEAN) / fmnist.STD)
    epoch_times = []
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(x), generator=gen)
        loss_sum, seen = 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            xb, yb = x[idx], y[idx]
            if augment:
                xb = random_crop(xb, CROP_PAD, background, gen)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
        epoch_times.append(time.time() - t0)
        log(f"    epoch {epoch + 1}/{epochs}  loss {loss_sum / seen:.4f}  {epoch_times[-1]:.1f}s")
    return model.eval(), epoch_times


# ---------------------------------------------------------------- data samples

def write_data_samples(out_dir, data_dir):
    """models/data/calib.npy (1000 unlabeled train images) and eval.npz (2000 test images, 200 per class)."""
    os.makedirs(out_dir, exist_ok=True)
    x_train, _ = fmnist.load("train", data_dir)
    idx = np.sort(np.random.RandomState(CALIB_SEED).choice(len(x_train), CALIB_SIZE, replace=False))
    np.save(os.path.join(out_dir, "calib.npy"), np.ascontiguousarray(x_train[idx], dtype=np.float32))
    x_test, y_test = fmnist.load("test", data_dir)
    rng = np.random.RandomState(EVAL_SEED)
    picks = np.sort(np.concatenate(
        [rng.choice(np.flatnonzero(y_test == c), EVAL_PER_CLASS, replace=False) for c in range(10)]))
    np.savez(os.path.join(out_dir, "eval.npz"), x=np.ascontiguousarray(x_test[picks], dtype=np.float32),
             y=y_test[picks].astype(np.int64))
    return {"calib_train_indices": idx.tolist(), "eval_test_indices": picks.tolist()}


# ---------------------------------------------------------------- cards

def folder_name(arch, seed, sizes):
    """`<arch>-s<seed>` for the 5+5 pairs, `<arch><N>-s<seed>` for any other split into N tasks (mlp3-s0)."""
    tag = "" if tuple(sizes) == DEFAULT_SPLIT else str(len(sizes))
    return f"{arch}{tag}-s{seed}"


def _join(words):
    """'a', 'a and b', 'a, b and c'."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def card_markdown(card):
    names = card["class_names"]
    t = card["train"]
    models = list(card["tasks"])
    sizes = [len(card["tasks"][k]) for k in models]
    split = "+".join(str(n) for n in sizes)
    kind = {2: "pair", 3: "triple"}.get(len(models), f"set of {len(models)}")
    what = ("Two" if len(models) == 2 else "Three" if len(models) == 3 else str(len(models)))
    if len(set(sizes)) == 1:
        task_words = f"disjoint {sizes[0]}-class tasks"
        output_shape = f"(batch,{sizes[0]}) logits (no softmax)"
        cuts = f"first {sizes[0]} to a, last {sizes[0]} to b" if len(models) == 2 else \
            ", ".join(f"{n} to {k}" for k, n in zip(models, sizes))
    else:
        task_words = f"disjoint tasks of {_join([str(n) for n in sizes])} classes"
        output_shape = ("(batch,K) logits (no softmax), K the model's class count: " +
                        ", ".join(f"{k} {n}" for k, n in zip(models, sizes)))
        cuts = ", ".join([f"first {sizes[0]} to {models[0]}"] +
                         [f"next {n} to {k}" for k, n in zip(models[1:-1], sizes[1:-1])] +
                         [f"last {sizes[-1]} to {models[-1]}"])
    labels = f"0..{sizes[0] - 1}" if len(set(sizes)) == 1 else "0..K-1"
    seconds = " + ".join(f"{t['seconds'][k]:.0f} s ({k})" for k in models)
    diffs = ", ".join(f"{k} {card['export']['max_abs_diff'][k]:.1e}" for k in models)
    split_call = f"task_split({card['seed']})" if tuple(sizes) == DEFAULT_SPLIT else \
        f"task_split({card['seed']}, ({', '.join(str(n) for n in sizes)}))"
    lines = [
        f"# {folder_name(card['arch'], card['seed'], sizes)}: a Fashion-MNIST {split} model {kind}",
        "",
        f"{what} `{card['arch']}` models ({card['architecture']}), same architecture, different random inits, "
        f"trained on {task_words} of Fashion-MNIST. Inputs to merge with onnxzip.",
        "",
        "| file | task | classes (head order) | test accuracy (own task, onnxruntime) | params | size |",
        "|---|---|---|---|---|---|",
    ]
    for k in models:
        cls = card["tasks"][k]
        lines.append(
            f"| `{k}.onnx` | {k} | {', '.join(f'{c} {names[c]}' for c in cls)} | "
            f"{100 * card['test_accuracy'][k]:.2f} % ({card['test_count'][k]} images) | "
            f"{model_parameters(card, k):,} | {card['files'][k]['bytes'] / 1e6:.2f} MB |")
    lines += [
        "",
        f"Head output k of model a predicts Fashion-MNIST class `tasks.a[k]` (see `card.json`); "
        f"same for {_join(models[1:])}.",
        "",
        "## Input / output",
        f"- input `{card['input']}`: float32 (batch,1,28,28), pixels scaled to [0,1] then "
        f"normalised `(x - {card['normalization']['mean']}) / {card['normalization']['std']}`; batch is dynamic.",
        f"- output `{card['output']}`: float32 {output_shape}.",
        "- shared calibration / evaluation samples: `../data/` (already normalised).",
        "",
        "## Training",
        f"- task split: `tools/fmnist.py:{split_call}` — numpy RandomState({card['seed']}) "
        f"permutation of the 10 classes, {cuts}; labels remapped to {labels} in that order.",
        f"- data: each model sees only its task's training images "
        f"({' / '.join(str(t['train_count'][k]) for k in models)}), evaluated on its task's test images.",
        f"- init seeds: torch.manual_seed({t['torch_seed'][models[0]]}) for {models[0]}, "
        + ", ".join(f"({t['torch_seed'][k]}) for {k}" for k in models[1:]) + ".",
        f"- {t['epochs']} epochs, {t['optimizer']}, lr {t['lr']} with cosine decay to 0 (per step), "
        f"weight decay {t['weight_decay']}, batch {t['batch_size']}, "
        f"augmentation: {t['augmentation']}.",
        f"- time: {seconds} on a shared 2-core CPU, "
        f"{t['threads']} torch threads.",
        "",
        "## Export",
        f"- torch {card['export']['torch']}, onnx {card['export']['onnx']}, onnxruntime {card['export']['onnxruntime']}.",
        f"- exporter: `{card['export']['exporter']}` (torch.onnx.export(..., dynamo=False, opset_version="
        f"{card['export']['opset']})); {_batchnorm_note(card)}",
        f"- ops in a.onnx: {', '.join(f'{k}×{v}' for k, v in card['files']['a']['ops'].items())}.",
        f"- verified: onnxruntime logits equal torch's to {card['export']['check_atol']} × max(1, max |logit|) "
        f"(max |diff| {diffs}).",
        "",
        "## Made by",
        "```",
        card["command"],
        "```",
        f"on {card['created']}.",
        "",
    ]
    return "\n".join(lines)


def model_parameters(card, model):
    """A card's parameter count of one model: `parameters` is one number where every model has the same count
    (the 5+5 pairs), else a mapping model -> count (heads of different sizes)."""
    count = card["parameters"]
    return count[model] if isinstance(count, dict) else count


def _batchnorm_note(card):
    if card["arch"] in ("mlp", "vit", "vitgqa", "swinvit", "swinv2vit"):
        return "the architecture has no BatchNorm."
    if any("BatchNormalization" in card["files"][k]["ops"] for k in card["tasks"]):
        return "the graphs keep BatchNormalization nodes."
    return ("BatchNorm was folded into the preceding Conv weights by this exporter, so the graphs have no "
            "BatchNormalization nodes (the Conv nodes carry biases instead).")


def rerender_cards(out):
    """Rewrite every <out>/*/README.md from its card.json (after a change to card_markdown)."""
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name, "card.json")
        if os.path.isfile(path):
            with open(path) as f:
                card = json.load(f)
            with open(os.path.join(out, name, "README.md"), "w") as f:
                f.write(card_markdown(card))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(models_torch.ARCHS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--split", type=_parse_split, default=DEFAULT_SPLIT, metavar="N,N[,N...]",
                   help="class counts of the tasks, in order a, b, c, ... (sum 10, at least 2 each); default 5,5 "
                        "(the pairs, <out>/<arch>-s<seed>/); any other split writes <out>/<arch><N>-s<seed>/")
    p.add_argument("--out", default="models/")
    p.add_argument("--lr", type=float, default=None, help="default: per-arch (see RECIPES)")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--augment", choices=["on", "off", "default"], default="default",
                   help=f"random crop with padding {CROP_PAD}; default: per-arch")
    p.add_argument("--exporter", default="torchscript", choices=sorted(EXPORTERS))
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=fmnist.DATA_DIR)
    p.add_argument("--limit", type=int, default=None, help="use only the first N task training images (timing)")
    p.add_argument("--write-data", choices=["missing", "always", "never"], default="missing",
                   help="write <out>/data/calib.npy and eval.npz")
    p.add_argument("--rerender", action="store_true", help="only rewrite README.md of every card under --out")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.rerender:
        rerender_cards(args.out)
        return
    if args.arch is None:
        p.error("--arch is required")

    import onnx
    import onnxruntime

    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    torch.set_num_threads(args.threads)
    recipe = dict(RECIPES[args.arch])
    if args.lr is not None:
        recipe["lr"] = args.lr
    if args.weight_decay is not None:
        recipe["weight_decay"] = args.weight_decay
    if args.augment != "default":
        recipe["augment"] = args.augment == "on"

    data_out = os.path.join(args.out, "data")
    if args.write_data == "always" or (args.write_data == "missing"
                                       and not os.path.exists(os.path.join(data_out, "eval.npz"))):
        write_data_samples(data_out, args.data_dir)
        log(f"wrote {data_out}/calib.npy, eval.npz")

    x_train, y_train = fmnist.load("train", args.data_dir)
    x_test, y_test = fmnist.load("test", args.data_dir)
    command = "python3 tools/train_pairs.py " + " ".join(sys.argv[1:] if argv is None else argv)

    models = MODEL_NAMES[:len(args.split)]
    for seed in args.seeds:
        classes = dict(zip(models, fmnist.task_split(seed, args.split)))
        pair_dir = os.path.join(args.out, folder_name(args.arch, seed, args.split))
        os.makedirs(pair_dir, exist_ok=True)
        card = {
            "arch": args.arch, "seed": seed, "tasks": classes, "class_names": fmnist.CLASS_NAMES,
            "test_accuracy": {}, "test_accuracy_torch": {}, "test_count": {},
            "input": "input", "output": "logits",
            "normalization": {"mean": fmnist.MEAN, "std": fmnist.STD},
            "files": {}, "train": {
                "epochs": args.epochs, "optimizer": "AdamW" if recipe.get("optimizer") == "adamw"
                else f"SGD momentum {args.momentum} nesterov",
                "lr": recipe["lr"], "lr_schedule": "cosine to 0, stepped per batch",
                "weight_decay": recipe["weight_decay"], "batch_size": args.batch_size,
                "augmentation": f"random crop 28 with padding {CROP_PAD} (background value)" if recipe["augment"]
                else "none",
                "torch_seed": {}, "train_count": {}, "epoch_seconds": {}, "seconds": {}, "threads": args.threads,
                "limit": args.limit,
            },
            "export": {}, "export_max_abs_diff": {},
        }
        diffs, parameters, parameters_torch = {}, {}, {}
        for m, k in enumerate(models):
            torch_seed = 1000 * seed + m
            xt, yt = fmnist.task_subset(x_train, y_train, classes[k])
            if args.limit:
                xt, yt = xt[:args.limit], yt[:args.limit]
            xe, ye = fmnist.task_subset(x_test, y_test, classes[k])
            log(f"{os.path.basename(pair_dir)} model {k}: classes {classes[k]}, {len(xt)} train images, "
                f"seed {torch_seed}")
            t0 = time.time()
            model, epoch_times = train_one(
                args.arch, torch.from_numpy(xt), torch.from_numpy(yt), torch_seed, args.epochs, recipe["lr"],
                recipe["weight_decay"], args.momentum, args.batch_size, recipe["augment"], log,
                recipe.get("optimizer", "sgd"))
            seconds = time.time() - t0
            acc_torch = evaluate(model, torch.from_numpy(xe), torch.from_numpy(ye))
            path = os.path.join(pair_dir, f"{k}.onnx")
            # the trained weights too, so the same models can be exported again with other exporters
            # (tools/export_variants.py: dynamo, BatchNorm kept)
            torch.save(model.state_dict(), os.path.join(pair_dir, f"{k}.pt"))
            export = export_onnx(model, path, args.exporter, args.opset)
            diffs[k] = check_onnx(path, model, xe[:256])
            acc = onnx_accuracy(path, xe, ye)
            log(f"  {k}: test accuracy {100 * acc:.2f} % (torch {100 * acc_torch:.2f} %), "
                f"onnx max |diff| {diffs[k]:.1e}, {seconds:.0f}s")
            card["test_accuracy"][k] = acc
            card["test_accuracy_torch"][k] = acc_torch
            card["test_count"][k] = int(len(xe))
            card["files"][k] = onnx_summary(path)
            card["train"]["torch_seed"][k] = torch_seed
            card["train"]["train_count"][k] = int(len(xt))
            card["train"]["epoch_seconds"][k] = [round(s, 2) for s in epoch_times]
            card["train"]["seconds"][k] = round(seconds, 2)
            # what the exported file holds, counted as `onnxzip eval` counts it (the float elements of the
            # initializers): the export folds each BatchNorm into its Conv (one bias per channel where torch
            # counts BN's weight and bias), so torch's own count is kept apart as parameters_torch
            parameters[k] = onnx_parameters(path)
            parameters_torch[k] = models_torch.num_parameters(model)
        # one number where every model has the same count (the pairs: same head size), else one per model
        card["parameters"] = _one_or_each(parameters)
        card["parameters_torch"] = _one_or_each(parameters_torch)
        card["architecture"] = _describe(args.arch)
        card["export"] = dict(export, onnx=onnx.__version__, onnxruntime=onnxruntime.__version__,
                              check_atol=1e-4, max_abs_diff=diffs)
        del card["export_max_abs_diff"]
        card["command"] = command
        card["created"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(os.path.join(pair_dir, "card.json"), "w") as f:
            json.dump(card, f, indent=2)
            f.write("\n")
        with open(os.path.join(pair_dir, "README.md"), "w") as f:
            f.write(card_markdown(card))
        accuracies = ", ".join(f"{k} {100 * card['test_accuracy'][k]:.2f} %" for k in models)
        log(f"wrote {pair_dir}/ ({accuracies})")


def _one_or_each(counts):
    return next(iter(counts.values())) if len(set(counts.values())) == 1 else counts


def _parse_split(text):
    try:
        sizes = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected class counts separated by commas, e.g. 4,3,3")
    if len(sizes) < 2 or min(sizes) < 2 or sum(sizes) != len(fmnist.CLASS_NAMES):
        raise argparse.ArgumentTypeError(
            f"{text!r}: need two or more tasks of at least 2 classes each, {len(fmnist.CLASS_NAMES)} classes in all")
    return sizes


def _describe(arch):
    return {
        "resnet20": "CIFAR-style ResNet-20 ×1: 16/32/64 channels, 3×3 basic blocks, 1×1 conv+BN shortcuts, "
                    "global average pool, linear head",
        "resnet20x2": "CIFAR-style ResNet-20 ×2: 32/64/128 channels, 3×3 basic blocks, 1×1 conv+BN shortcuts, "
                      "global average pool, linear head",
        "vgg": "VGG-style CNN: conv 32,32,pool,64,64,pool,128,128,pool (3×3, BN, ReLU), flatten 128×3×3 → "
               "linear 256 → ReLU → linear",
        "mlp": "MLP: flatten 784 → 256 → 256 → 256 → classes, ReLU",
        "vit": "ViT: 7×7 patches (16 tokens) + class token, position embedding, 3 pre-norm blocks of dim 64 with 4 "
               "attention heads of 16 (packed qkv, scaled_dot_product_attention) and a GELU MLP 64 → 128 → 64, final "
               "LayerNorm, linear head on the class token",
        "vitgqa": "ViT: 7×7 patches (16 tokens) + class token, position embedding, 3 pre-norm blocks of dim 64 with "
                  "grouped-query attention (4 query heads of 16 over 2 key/value heads, separate q, k, v Linears, "
                  "each key/value head repeated over its 2 query heads as Hugging Face's repeat_kv does it, "
                  "scaled_dot_product_attention) and a GELU MLP 64 → 128 → 64, final LayerNorm, linear head on the "
                  "class token",
        "swinvit": "ViT with Swin's window attention: 4×4 patches (a 7×7 grid, one window of 49 tokens), no class "
                   "token or absolute position embedding, 3 pre-norm blocks of dim 64 with 4 attention heads of 16 "
                   "(packed qkv, q kᵀ plus a learned relative position bias per head, softmax) and a GELU MLP "
                   "64 → 128 → 64, final LayerNorm, mean over tokens, linear head",
        "swinv2vit": "ViT with Swin V2's window attention: 4×4 patches (a 7×7 grid, one window of 49 tokens), 3 "
                     "residual post-norm blocks of dim 64 with 4 heads of 16 (packed qkv with the keys' bias fixed at "
                     "zero, cosine attention times a learned logit scale per head, a continuous position bias from "
                     "an MLP of the relative coordinates) and a GELU MLP 64 → 128 → 64, final LayerNorm, mean over "
                     "tokens, linear head",
    }[arch]


if __name__ == "__main__":
    main()
