"""Peak memory of a merge of large models (issue 12): at most twice the two models' size (the source models and the
merged model, each held once: mapped from files, shared by every onnxruntime session) plus a fixed working set;
never the second and third in-memory copies (protobuf bytes, numpy arrays, serialised sessions) of before.

The merge runs in a fresh subprocess whose peak resident size (VmHWM: ru_maxrss would include the parent's own
peak, which a child inherits across exec) is compared with its size after its imports. The pair is a twin MLP whose weights are almost all in one wide head (as in tools/large_model_check.py):
its statistics and activations stay small, so the weights are what the peak measures. The heads are wider than
the least-squares refit takes (its budget `refit.MAX_SUMS_BYTES` is scaled down with the model, as a 2.2 GB
model's 2-million-class heads are over the real one), so the refit's own sums do not hide a copy.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxzip

try:
    from tests import fixtures as F
except ImportError:  # pytest put tests/ itself on sys.path
    import fixtures as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN, IN = 256, 64
MODEL_MB = 60  # each model: 60 MB of weights, the pair 120 MB
# What the merge holds besides the weights: onnxruntime's start-up and its arenas for a batch of activations
# (64 samples x 58k logits x 4 bytes = 15 MB per head output, a few of them), scipy/BLAS buffers, the
# statistics of two 256-wide spaces (2 MB), the 100 samples' outputs kept for verification (a few MB), the
# merge card, and surgery's float64 slices of a weight (surgery.CHUNK_BYTES, 64 MB, a few at a time). Measured:
# 100 MB. The code before this test held about 20x the pair (2.6 GB growth).
WORKING_SET_MB = 150

CHILD = textwrap.dedent("""
    import sys
    import numpy, onnx, onnxruntime, scipy.linalg  # noqa: F401 - imported before the baseline
    import onnxzip
    from onnxzip import refit

    def status_mb(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024

    refit.MAX_SUMS_BYTES = 8 << 20
    base = status_mb("VmRSS")
    result = onnxzip.merge(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], num_samples=100)
    peak = status_mb("VmHWM")
    skipped = sum(1 for x in result.card["refit"]["layers"] if "skipped" in x)
    print(base, peak, skipped)
""")


def _model(weights: dict, classes: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["input", "l1.w", "l1.b"], ["h1"], transB=1),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "l2.w", "l2.b"], ["h2"], transB=1),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "head.w"], ["logits"])]
    graph = helper.make_graph(nodes, "wide_head", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                 ["N", IN])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _twin_pair(folder) -> tuple:
    """a.onnx and b.onnx (b: a with its hidden units permuted), calib.npy; returns the paths and the pair's bytes."""
    classes = MODEL_MB * 10**6 // 4 // HIDDEN
    rng = np.random.default_rng(0)
    w = {"l1.w": (rng.standard_normal((HIDDEN, IN)) / 8).astype(np.float32),
         "l1.b": rng.uniform(0, 0.1, HIDDEN).astype(np.float32),
         "l2.w": (rng.standard_normal((HIDDEN, HIDDEN)) / 16).astype(np.float32),
         "l2.b": rng.uniform(0, 0.1, HIDDEN).astype(np.float32),
         "head.w": rng.standard_normal((HIDDEN, classes), dtype=np.float32) / 16}
    p1, p2 = rng.permutation(HIDDEN), rng.permutation(HIDDEN)
    twin = {"l1.w": w["l1.w"][p1], "l1.b": w["l1.b"][p1], "l2.w": w["l2.w"][p2][:, p1], "l2.b": w["l2.b"][p2],
            "head.w": w["head.w"][p2]}
    paths = [str(folder / "a.onnx"), str(folder / "b.onnx"), str(folder / "calib.npy")]
    onnx.save(_model(w, classes), paths[0])
    onnx.save(_model(twin, classes), paths[1])
    np.save(paths[2], rng.standard_normal((100, IN), dtype=np.float32))
    return paths, os.path.getsize(paths[0]) + os.path.getsize(paths[1])


def test_peak_memory_is_twice_the_pair_plus_a_fixed_working_set(tmp_path):
    paths, pair = _twin_pair(tmp_path)
    out = tmp_path / "merged.onnx"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, *paths, str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, peak, skipped = proc.stdout.split()
    growth_mb = float(peak) - float(base)
    pair_mb = pair / 2**20
    assert growth_mb <= 2 * pair_mb + WORKING_SET_MB, \
        f"peak grew by {growth_mb:.0f} MB for a {pair_mb:.0f} MB pair (allowed: 2x the pair + {WORKING_SET_MB} MB)"
    assert int(skipped) == 2, "both heads are over the (scaled) refit budget"
    merged = onnx.load(str(out))  # a single file below 1.8 GB, as before
    assert {o.name for o in merged.graph.output} == {"a/logits", "b/logits"}


# Many wide spaces: the statistics of every space are held after the calibration pass (one (2W)² float64 co-moment
# each); the solve must add only a few such matrices at a time (the space being solved), not a correlation matrix and
# dense merge/unmerge matrices per space for the rest of the merge (what ViT-B/16's 25 spaces made 18 GB of).
WIDE, LAYERS = 768, 16
WIDE_CHILD = textwrap.dedent("""
    import sys
    import numpy, onnx, onnxruntime, scipy.linalg  # noqa: F401 - imported before the baseline
    import onnxzip

    def status_mb(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024

    base = status_mb("VmRSS")
    result = onnxzip.merge(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])
    peak = status_mb("VmHWM")
    print(base, peak, len(result.card["spaces"]))
""")


def _deep_mlp(rng, classes=10) -> onnx.ModelProto:
    nodes, inits, x = [], [], "input"
    for i in range(LAYERS):
        fan_in = IN if i == 0 else WIDE
        inits += [numpy_helper.from_array((rng.standard_normal((WIDE, fan_in)) * np.sqrt(2 / fan_in))
                                          .astype(np.float32), f"l{i}.w"),
                  numpy_helper.from_array(rng.uniform(0, 0.1, WIDE).astype(np.float32), f"l{i}.b")]
        nodes += [helper.make_node("Gemm", [x, f"l{i}.w", f"l{i}.b"], [f"h{i}"], transB=1),
                  helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        x = f"r{i}"
    inits.append(numpy_helper.from_array((rng.standard_normal((WIDE, classes)) / 32).astype(np.float32), "head.w"))
    nodes.append(helper.make_node("MatMul", [x, "head.w"], ["logits"]))
    graph = helper.make_graph(nodes, "deep_mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                ["N", IN])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_wide_spaces_are_solved_without_holding_every_spaces_matrices(tmp_path):
    rng = np.random.default_rng(1)
    paths = [str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), str(tmp_path / "calib.npy")]
    onnx.save(_deep_mlp(rng), paths[0])
    onnx.save(_deep_mlp(rng), paths[1])
    np.save(paths[2], rng.standard_normal((300, IN), dtype=np.float32))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", WIDE_CHILD, *paths, str(tmp_path / "merged.onnx")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, peak, spaces = proc.stdout.split()
    assert int(spaces) == LAYERS
    space_mb = (2 * WIDE) ** 2 * 8 / 2**20  # one stacked co-moment, correlation or pair of merge matrices
    weights_mb = 3 * (os.path.getsize(paths[0]) / 2**20)  # A, B and the merged model
    # every co-moment, the solve's few matrices of one space, the models, and a fixed working set (onnxruntime's
    # arenas, BLAS buffers, the refit's sums of one level). Measured: 515 MB against 684 allowed; the code before
    # this test: 1116 MB.
    allowed = LAYERS * space_mb + 8 * space_mb + weights_mb + WORKING_SET_MB
    growth = float(peak) - float(base)
    assert growth <= allowed, f"peak grew by {growth:.0f} MB for {LAYERS} spaces of {space_mb:.0f} MB " \
                              f"(allowed: {allowed:.0f} MB)"


# With more statistics than pipeline.STATS_BYTES, the spaces are calibrated in groups, each group solved before the
# next: the features of the later groups go to a temporary file in the one pass and their statistics are made from
# it afterwards, or, where the file has no room, each group takes a pass of its own. Either way the merge must be
# the one a single pass gives, bit for bit.
def _grouped_conv_pair():
    from tests.test_exporters import load
    a, b = load("grouped")
    return a, F.perturb(b, 0.3, np.random.RandomState(0))


@pytest.mark.parametrize("pair", ["resnet", "grouped"])
def test_statistics_in_groups_give_the_merge_of_one_pass(pair, monkeypatch, caplog):
    from onnxzip import calibration, pipeline
    from onnxzip.calibration import StatsSampling
    from onnxzip.graph import analyse

    if pair == "resnet":
        (a, _), (b, _) = F.random_pair("resnet", seed=3)
    else:
        a, b = _grouped_conv_pair()
    data = F.calib(a, n=200, seed=1)
    # statistics from a subsample of rows, as on large inputs: the same rows must be drawn however spaces are grouped
    monkeypatch.setattr(pipeline, "STATS_SAMPLING", StatsSampling(min_rows=500, rows_per_feature=20))
    runs = []
    run_sources = calibration.run_sources
    monkeypatch.setattr(pipeline, "run_sources", lambda *args, **kw: runs.append(1) or run_sources(*args, **kw))
    one = onnxzip.merge(a, b, data, progress=False)
    assert len(runs) == 1
    monkeypatch.setattr(pipeline, "STATS_BYTES", 1)  # every space (every grouped family) in a group of its own
    spaces = len(one.card["spaces"])
    families = analyse(a).block_families
    groups = spaces - sum(len(f.spaces) - 1 for f in families)
    assert groups > 1
    if pair == "grouped":
        assert families and any(len(f.spaces) > 1 for f in families)
    written = []
    write = calibration.RowSpill.write
    monkeypatch.setattr(calibration.RowSpill, "write", lambda self, x: written.append(x.shape) or write(self, x))
    runs.clear()
    with caplog.at_level("INFO", logger="onnxzip"):
        deferred = onnxzip.merge(a, b, data, progress=False)
    assert f"the features of {groups - 1} group(s) of spaces go to a temporary file" in caplog.text, caplog.text
    assert len(runs) == 1 and written
    monkeypatch.setattr(pipeline, "spill_room", lambda: 0)  # no room for the file: a pass per group
    caplog.clear()
    runs.clear()
    with caplog.at_level("INFO", logger="onnxzip"):
        passes = onnxzip.merge(a, b, data, progress=False)
    assert f"in {groups} passes" in caplog.text, caplog.text
    assert len(runs) == groups
    for grouped in (deferred, passes):
        assert [i.SerializeToString() for i in one.model.graph.initializer] == \
            [i.SerializeToString() for i in grouped.model.graph.initializer]
        assert one.card["spaces"] == grouped.card["spaces"]


def test_batches_shrink_to_fit_the_activation_bound(monkeypatch, caplog):
    """A batch whose activations (every model's merge points, layer inputs and outputs) would exceed
    pipeline.ACTIVATION_BYTES runs as smaller batches: the merge is then the one --batch-size of that size gives."""
    from onnxzip import pipeline

    (a, _), (b, _) = F.random_pair("resnet", seed=4)
    data = F.calib(a, n=120, seed=2)
    monkeypatch.setattr(pipeline, "ACTIVATION_BYTES", 200_000)
    with caplog.at_level("INFO", logger="onnxzip"):
        capped = onnxzip.merge(a, b, data, progress=False, batch_size=64)
    size = capped.card["options"]["batch_size"]
    assert 1 <= size < 64 and capped.card["options"]["batch_size_asked"] == 64
    assert f"running batches of {size} samples instead of --batch-size 64" in caplog.text
    monkeypatch.setattr(pipeline, "ACTIVATION_BYTES", 2 << 30)
    plain = onnxzip.merge(a, b, data, progress=False, batch_size=size)
    assert "batch_size_asked" not in plain.card["options"]
    assert [i.SerializeToString() for i in capped.model.graph.initializer] == \
        [i.SerializeToString() for i in plain.model.graph.initializer]


def test_the_features_deferred_to_the_file_take_the_bytes_estimated(monkeypatch):
    """The room the deferred features need is estimated from analysis's shapes before the pass: on a transformer
    exported with nn.MultiheadAttention, whose (T, N, D) tensors hold the tokens first, it must count every token
    (it counted one a sample: a ViT-B/16 pair's estimate was far below the 10 GB it wrote)."""
    import os

    from onnxzip import calibration, pipeline

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "vit_mha_ts")
    a, b = (onnx.load(os.path.join(folder, f"{m}.onnx")) for m in "ab")
    data = F.calib(a, n=64, seed=0)
    monkeypatch.setattr(pipeline, "STATS_BYTES", 1)
    estimates, written = [], []
    feature_bytes = pipeline._feature_bytes
    monkeypatch.setattr(pipeline, "_feature_bytes", lambda *args: estimates.append(feature_bytes(*args)) or
                        estimates[-1])
    write = calibration.RowSpill.write
    monkeypatch.setattr(calibration.RowSpill, "write", lambda self, x: written.append(x.size * 4) or write(self, x))
    merged = onnxzip.merge(a, b, data, progress=False, verify=False)
    assert merged.card["refit"]["applied"]
    # every row is kept at these sizes (fraction 1), and the refit's target rows all fit in memory
    assert len(estimates) == 1 and estimates[0] == sum(written) > 0
