"""Merge two real models above protobuf's 2 GiB limit, end to end (issue 4: models stored with external data; issue
12: peak memory).

Unit tests lower onnxzip's size limits to push small models through the large-model path; this script runs that
path at full size once. It builds model A, an MLP whose last layer (the task head) is wide enough to make the
file larger than `--gb` GB, and model B, A with every hidden unit permuted (a twin: it computes A's function),
stores both as `.onnx` + `.onnx.data`, merges them with `onnxzip merge --method permute` (or `--method zip`) and
checks that the merged model (written with external data, about twice the size) loads with
`onnxzip.onnx_io.load_model` and gives A's outputs on both heads. Prints sizes, wall times and the merge's peak
resident memory, also as a multiple of the two models' size.

    python3 tools/large_model_check.py --gb 2.2 --workdir /tmp/onnxzip-large

Needs about 6x the model size in free disk space (A, B, the merged model and the merge's own weight file beside
it) and about 4.5x in memory (2x the two models plus a working set: one batch of the head's outputs per running
model, and the held-back samples' outputs kept for verification, `--samples` / 5 of them). Deletes its files
unless --keep.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

HIDDEN = 256
IN = 64
# `onnxzip merge` run so that it reports its own peak resident size (VmHWM) on its last stderr line: a child's
# ru_maxrss (RUSAGE_CHILDREN) starts from the parent's own peak, which here is the building of the models.
MERGE = """
import sys
from onnxzip.cli import main
try:
    main(sys.argv[1:])
finally:
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(f"peak resident {hwm * 1024}", file=sys.stderr)
"""


def build(initializers: list, classes: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["input", "l1.w", "l1.b"], ["h1"], transB=1),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "l2.w", "l2.b"], ["h2"], transB=1),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "head.w"], ["logits"])]
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", IN])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def save(weights: dict, classes: int, path: str) -> None:
    """`path` + `path.data`, every weight in the data file, written from the arrays (a tensor above 2 GiB cannot be a
    protobuf message, so onnx.save_model cannot take it)."""
    location = os.path.basename(path) + ".data"
    stubs = []
    with open(path + ".data", "wb") as f:
        for name, value in weights.items():
            f.write(b"\0" * (-f.tell() % 4096))
            offset = f.tell()
            np.ascontiguousarray(value, dtype=np.float32).tofile(f)
            stub = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=value.shape)
            stub.data_location = TensorProto.EXTERNAL
            for key, v in (("location", location), ("offset", offset), ("length", value.nbytes)):
                stub.external_data.add(key=key, value=str(v))
            stubs.append(stub)
    onnx.save_model(build(stubs, classes), path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=2.2, help="size of each input model in GB (10^9 bytes)")
    p.add_argument("--workdir", default="/tmp/onnxzip-large")
    p.add_argument("--samples", type=int, default=200,
                   help="calibration samples (a fifth held back to verify: their outputs, 8.6 MB a sample at "
                        "2.2 GB, are kept)")
    p.add_argument("--method", choices=("permute", "zip"), default="permute",
                   help="merge method (zip: onnxzip's default, with the least-squares refit)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    classes = int(args.gb * 1e9 / 4 / HIDDEN) + 1
    rng = np.random.default_rng(0)
    t0 = time.time()
    w = {"l1.w": (rng.standard_normal((HIDDEN, IN)) / 8).astype(np.float32),
         "l1.b": rng.uniform(0, 0.1, HIDDEN).astype(np.float32),
         "l2.w": (rng.standard_normal((HIDDEN, HIDDEN)) / 16).astype(np.float32),
         "l2.b": rng.uniform(0, 0.1, HIDDEN).astype(np.float32),
         "head.w": (rng.standard_normal((HIDDEN, classes), dtype=np.float32) / 16)}
    p1, p2 = rng.permutation(HIDDEN), rng.permutation(HIDDEN)
    paths = {k: os.path.join(args.workdir, f"{k}.onnx") for k in "ab"}
    save(w, classes, paths["a"])
    twin = {"l1.w": w["l1.w"][p1], "l1.b": w["l1.b"][p1], "l2.w": w["l2.w"][p2][:, p1], "l2.b": w["l2.b"][p2]}
    w["head.w"] = w["head.w"][p2]  # reuse the name: only one 2 GB head in memory at a time
    twin["head.w"] = w.pop("head.w")
    save(twin, classes, paths["b"])
    del twin
    sizes = {k: os.path.getsize(v) + os.path.getsize(v + ".data") for k, v in paths.items()}
    print(f"built A and B: {classes} head outputs, {sizes['a'] / 1e9:.2f} GB and {sizes['b'] / 1e9:.2f} GB on disk "
          f"(.onnx + .onnx.data), {time.time() - t0:.0f} s", flush=True)

    x = rng.standard_normal((args.samples, IN), dtype=np.float32)
    calib = os.path.join(args.workdir, "calib.npy")
    np.save(calib, x)
    out = os.path.join(args.workdir, "merged.onnx")
    for f in (out, out + ".data", out + ".json"):
        if os.path.exists(f):
            os.remove(f)
    t0 = time.time()
    cmd = [sys.executable, "-c", MERGE, "merge", paths["a"], paths["b"], "--data", calib, "-o", out,
           "--method", args.method, "--num-samples", str(args.samples)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    merge_s = time.time() - t0
    child_rss = int(proc.stderr.strip().splitlines()[-1].split()[-1]) / 1e9
    pair = (sizes["a"] + sizes["b"]) / 1e9
    print(f"onnxzip merge --method {args.method}: exit {proc.returncode}, {merge_s:.0f} s, peak RSS "
          f"{child_rss:.2f} GB ({child_rss / pair:.2f}x the two models' {pair:.2f} GB)", flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return 1
    print("\n".join("  " + line for line in proc.stdout.strip().splitlines()))
    data = os.path.getsize(out + ".data") if os.path.exists(out + ".data") else 0
    merged_size = os.path.getsize(out) + data
    print(f"merged: {os.path.getsize(out) / 1e6:.2f} MB graph + {data / 1e9:.2f} GB external weights "
          f"({merged_size / (sizes['a'] + sizes['b']):.3f}× A + B)", flush=True)

    from onnxzip.onnx_io import inference_session, load_model
    import onnxruntime as ort
    t0 = time.time()
    # mapped: the weights stay in their files, and the sessions use them there
    merged = load_model(out, "merged model", mapped=True)
    session = inference_session(merged, ort.SessionOptions(), ["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x[:8]})))
    del session, merged
    a = load_model(paths["a"], "model A", mapped=True)
    want = inference_session(a, ort.SessionOptions(), ["CPUExecutionProvider"]).run(None, {"input": x[:8]})[0]
    err = max(float(np.abs(got[f"{k}/logits"] - want).max()) for k in "ab")
    print(f"reloaded and ran the merged model: max |merged - A| over both heads {err:.2e} ({time.time() - t0:.0f} s); "
          f"peak RSS of this script {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0 if err < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
