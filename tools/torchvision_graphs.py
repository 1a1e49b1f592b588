"""Export the graph of every torchvision classification model, without its weights, for the CI property test.

`tests/test_torchvision_graphs.py` (issue 13, "never a crash") runs graph analysis on every torchvision classifier
and twin merges on the small ones. torch and torchvision are not test dependencies, and the weights of 80 models
(tens of GB) do not belong in the repository; their graphs do (a few KB to a few hundred KB each). So this script
exports each model once, as a user would:

1. `torchvision.models.get_model(name, weights=None, num_classes=10)` (random weights, eval mode; `image_size` set
   for the ViTs, no auxiliary heads for GoogLeNet and Inception v3), exported by the TorchScript exporter
   (`torch.onnx.export(dynamo=False, opset_version=17)`, BatchNorm folded, a dynamic batch axis) at the first of
   `--sizes` at which the export runs in onnxruntime and agrees with torch (1e-3 relative, 1e-4 × max |logit|
   absolute, 3 images);
2. every float initializer of more than `KEEP_ELEMENTS` elements loses its data (its name, type and shape stay):
   the test fills it with seeded random values. Smaller float constants (scales,
   epsilons, masks of a few values) and every integer constant (Reshape targets, indices) stay as exported.

Writes `tests/data/torchvision/<name>.onnx` and `tests/data/torchvision/manifest.json` (per model: input size,
parameters, how many initializers were emptied, bytes; the torch and torchvision versions; models that did not
export at any size, with the error).

Usage (from the repository root; needs torch, torchvision):

    python3 tools/torchvision_graphs.py                      # every classification model
    python3 tools/torchvision_graphs.py --models resnet18 vit_b_16
"""
import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
OUT = os.path.join(ROOT, "tests", "data", "torchvision")
KEEP_ELEMENTS = 64
SIZES = (64, 56, 96, 112, 224)  # 56: patch 14 (ViT-H/14); 96: Inception v3 needs 75; 224: MaxViT's 7x7 windows


def strip(model) -> int:
    """Empty every float initializer of more than KEEP_ELEMENTS elements in place; the number emptied."""
    import onnx
    emptied = 0
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and int(np.prod(init.dims)) > KEEP_ELEMENTS:
            init.ClearField("raw_data")
            init.ClearField("float_data")
            emptied += 1
    return emptied


def export_graph(tv, name, sizes, log):
    """(entry, error): the stripped graph written to OUT/<name>.onnx at the first size that exports and agrees
    with torch."""
    import onnx
    import torch

    import torchvision_check as tc
    error = None
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="tvgraph-") as folder:
            path = os.path.join(folder, "model.onnx")
            try:
                model = tc.build(tv, name, 0, size)
                tc.export(model, path, "torchscript", size)
                x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(7))
                with torch.no_grad():
                    ref = model(x).numpy()
                got = tc.run_onnx(path, x.numpy())["logits"]
                if not np.allclose(got, ref, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(ref).max()))):
                    raise RuntimeError(f"onnxruntime differs from torch by {np.abs(got - ref).max():.3g}")
            except Exception as e:  # the exporter or the model at this size: try the next size
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                error = f"{type(e).__name__}: {first}"
                log(f"    export at {size}: {error}")
                continue
            proto = onnx.load(path)
            params = sum(p.numel() for p in model.parameters())
            emptied = strip(proto)
            out = os.path.join(OUT, f"{name}.onnx")
            onnx.save(proto, out)
            return {"size": size, "params": int(params), "initializers_emptied": emptied,
                    "nodes": len(proto.graph.node), "bytes": os.path.getsize(out)}, None
    return None, error


def main(argv=None):
    import torch

    import torchvision_check as tc
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", help="torchvision model names (default: every classification model)")
    ap.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    args = ap.parse_args(argv)
    tv = tc.import_torchvision()
    names = args.models or tv.models.list_models(module=tv.models)
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "manifest.json")
    manifest = {"models": {}, "failed": {}}
    if os.path.exists(path):
        with open(path) as f:
            manifest = json.load(f)
    manifest.update(torch=torch.__version__, torchvision=tv.__version__, keep_elements=KEEP_ELEMENTS,
                    exporter="torch.onnx.export(dynamo=False, opset_version=17), BatchNorm folded, batch axis dynamic",
                    command="python3 tools/torchvision_graphs.py" + (" --models " + " ".join(args.models)
                                                                     if args.models else ""))
    for name in names:
        t0 = time.perf_counter()
        print(f"{name} ...", flush=True)
        entry, error = export_graph(tv, name, args.sizes, print)
        if entry is None:
            manifest["failed"][name] = error
            manifest["models"].pop(name, None)
            print(f"{name}: no export ({error})", flush=True)
        else:
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            manifest["models"][name] = entry
            manifest["failed"].pop(name, None)
            print(f"{name}: {entry}", flush=True)
        manifest["models"] = dict(sorted(manifest["models"].items()))
        manifest["date"] = datetime.date.today().isoformat()
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
    print(f"{len(manifest['models'])} graph(s) in {os.path.relpath(OUT, ROOT)}, {len(manifest['failed'])} failed")


if __name__ == "__main__":
    main()
