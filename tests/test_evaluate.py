"""onnxzip.evaluate: parameter and MAC counts against hand counts, accuracies on logits chosen by the test."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import build_logits_model
from onnxzip.errors import CalibrationDataError, UsageError
from onnxzip.evaluate import (EvalReport, count_macs, count_parameters, evaluate, load_eval_data, measure_latency,
                              resolve_heads)


def _model(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _f(name, *shape):
    return numpy_helper.from_array(np.random.RandomState(0).randn(*shape).astype(np.float32), name)


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def conv_gemm_model(batch="N"):
    """input (N,3,8,8) -> Conv 3->8 k3 s1 p1 -> Conv 8->8 k3 s2 group 2 -> Flatten -> Gemm 128->10."""
    inits = [_f("W1", 8, 3, 3, 3), _f("B1", 8), _f("W2", 8, 4, 3, 3), _f("G", 10, 128), _f("GB", 10),
             numpy_helper.from_array(np.array([0, -1], np.int64), "shape")]
    nodes = [
        helper.make_node("Conv", ["input", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], group=2),
        helper.make_node("Reshape", ["c2", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "G", "GB"], ["logits"], transB=1),
    ]
    return _model(nodes, [_vi("input", [batch, 3, 8, 8])], [_vi("logits", [batch, 10])], inits)


CONV_GEMM_MACS = (
    8 * 8 * 8 * 3 * 3 * 3  # conv1: 8×8×8 outputs, 3 in-channels × 3×3 each
    + 8 * 4 * 4 * 4 * 3 * 3  # conv2: 8×4×4 outputs, 8/2 in-channels × 3×3 each
    + 128 * 10  # gemm: M=1, K=128, N=10
)


def test_macs_conv_gemm_hand_count():
    assert count_macs(conv_gemm_model()) == CONV_GEMM_MACS


def test_macs_are_per_sample_when_batch_is_fixed():
    assert count_macs(conv_gemm_model(batch=4)) == CONV_GEMM_MACS


def test_macs_batched_matmul_and_conv_transpose():
    inits = [_f("K", 6, 5), _f("T", 2, 3, 2, 2)]
    nodes = [
        helper.make_node("MatMul", ["q", "k"], ["qk"]),  # (N,4,7,6) @ (N,4,6,9): 4·7·6·9 per sample
        helper.make_node("MatMul", ["qk2", "K"], ["y"]),  # (N,7,6) @ (6,5): 7·6·5
        helper.make_node("ConvTranspose", ["img", "T"], ["up"], strides=[2, 2]),  # (N,2,3,3) -> (N,3,6,6)
    ]
    model = _model(nodes, [_vi("q", ["N", 4, 7, 6]), _vi("k", ["N", 4, 6, 9]), _vi("qk2", ["N", 7, 6]),
                           _vi("img", ["N", 2, 3, 3])],
                   [_vi("qk", ["N", 4, 7, 9]), _vi("y", ["N", 7, 5]), _vi("up", ["N", 3, 6, 6])], inits)
    # ConvTranspose: each of the 2·3·3 input elements scatters into Cout/group · kh · kw = 3·2·2 outputs
    assert count_macs(model) == 4 * 7 * 6 * 9 + 7 * 6 * 5 + 2 * 3 * 3 * 3 * 2 * 2


def test_macs_of_the_fused_attention_op_count_its_two_products():
    """ONNX's Attention (opset 23): Q·Kᵀ and P·V, per query head, query token and key token: d + dv products.
    (N, H, T, d) inputs: 4 heads, 7 queries, 9 keys, d 6, dv 5; (N, T, H·d) inputs with q_num_heads 4 and
    kv_num_heads 2 (grouped queries): d 24 / 4, dv 10 / 2."""
    def model(nodes, inputs, outputs):
        graph = helper.make_graph(nodes, "g", inputs, outputs)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
        m.ir_version = 10
        onnx.checker.check_model(m, full_check=True)
        return m
    four = model([helper.make_node("Attention", ["q", "k", "v"], ["y"])],
                 [_vi("q", ["N", 4, 7, 6]), _vi("k", ["N", 4, 9, 6]), _vi("v", ["N", 4, 9, 5])],
                 [_vi("y", ["N", 4, 7, 5])])
    assert count_macs(four) == 4 * 7 * 9 * (6 + 5)
    three = model([helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=4, kv_num_heads=2)],
                  [_vi("q", ["N", 7, 24]), _vi("k", ["N", 9, 12]), _vi("v", ["N", 9, 10])], [_vi("y", ["N", 7, 20])])
    assert count_macs(three) == 4 * 7 * 9 * (6 + 5)


def test_macs_input_shapes_for_symbolic_dims():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    model = _model(nodes, [_vi("x", ["N", "T", 4])], [_vi("y", ["N", "T", 3])], [_f("W", 4, 3)])
    assert count_macs(model, {"x": (1, 10, 4)}) == 10 * 4 * 3
    with pytest.raises(UsageError):
        count_macs(model, {"nope": (1, 2)})


def test_parameters_count_floats_only():
    model = conv_gemm_model()
    assert count_parameters(model) == 8 * 3 * 9 + 8 + 8 * 4 * 9 + 1280 + 10  # the int64 shape is not counted
    model.graph.node.insert(0, helper.make_node("Constant", [], ["c"], value=_f("cv", 2, 3)))
    model.graph.node.insert(0, helper.make_node(
        "Constant", [], ["ci"], value=numpy_helper.from_array(np.arange(4, dtype=np.int64), "civ")))
    assert count_parameters(model) == 8 * 3 * 9 + 8 + 8 * 4 * 9 + 1280 + 10 + 6


# ---------------------------------------------------------------------------------------------------------------
# accuracy
# ---------------------------------------------------------------------------------------------------------------

# Global classes: task a = [3, 7, 1] (head a/logits = input[:, 0:3]), task b = [0, 5] (b/logits = input[:, 3:5]).
TASKS = {"a": [3, 7, 1], "b": [0, 5]}


def _rows(*winners, low=0.0, high=1.0):
    """One input row per winner: column `w` gets `high`, others `low`."""
    x = np.full((len(winners), 5), low, np.float32)
    for i, w in enumerate(winners):
        x[i, w] = high
    return x


def test_per_task_and_joint_accuracy():
    model = build_logits_model({"a/logits": (0, 3), "b/logits": (3, 5)}, width=5)
    x = np.concatenate([
        _rows(0, 1, 1, 2),  # task a images: predicted 3, 7, 7, 1
        _rows(3, 4, 0),     # task b images: predicted (joint) 0, 5, 3 -> per-task b: argmax of cols 3:5
    ])
    y = np.array([3, 7, 1, 1,   0, 5, 0])
    # per-task a: [3,7,7,1] vs [3,7,1,1] -> 3/4. per-task b: row 6 has cols 3:5 = [0, 0] -> argmax 0 -> class 0: 3/3
    # joint: a rows 3/4 correct; b rows: 0 ok, 5 ok, row 6 answers class 3 (col 0) -> wrong: 5/7
    report = evaluate(model, x, y, TASKS, latency=False)
    assert isinstance(report, EvalReport)
    assert report.per_task_accuracy == {"a": 0.75, "b": 1.0}
    assert report.joint_accuracy == pytest.approx(5 / 7)
    assert report.num_images == {"a": 4, "b": 3}
    assert report.num_joint_images == 7
    assert report.heads == {"a": "a/logits", "b": "b/logits"}
    assert report.latency_ms is None
    assert report.params == 0 and report.macs == 0
    # routing: a rows all win in head a (cols 0-2); b rows win in cols 3, 4, 0 -> the last one is routed to a: 6/7
    assert report.task_routing_accuracy == pytest.approx(6 / 7)


def test_joint_accuracy_takes_raw_logits_not_softmax():
    # Head a is confident in relative terms (softmax) but head b has the larger raw logit: raw argmax wins.
    model = build_logits_model({"a/logits": (0, 3), "b/logits": (3, 5)}, width=5)
    x = np.array([[5.0, -10.0, -10.0, 6.0, 5.9]], np.float32)
    report = evaluate(model, x, np.array([0]), TASKS, latency=False)
    assert report.joint_accuracy == 1.0  # class 0 = column 3, the largest raw value


def test_one_head_model_gets_a_joint_accuracy():
    # The paper's "Model A" row: a model with only task a's head answers a's classes for every image.
    model = build_logits_model({"logits": (0, 3)}, width=5)
    x = _rows(0, 1, 2, 0, 1)
    y = np.array([3, 7, 0, 5, 5])  # two task-a images (both right), three task-b images (never right)
    report = evaluate(model, x, y, TASKS, heads={"a": "logits"}, latency=False)
    assert report.per_task_accuracy == {"a": 1.0}
    assert report.joint_accuracy == pytest.approx(2 / 5)
    assert report.task_routing_accuracy is None  # one head: nothing to route
    assert report.num_images == {"a": 2, "b": 3}


def test_images_of_no_task_are_ignored():
    model = build_logits_model({"a/logits": (0, 3), "b/logits": (3, 5)}, width=5)
    report = evaluate(model, _rows(0, 3, 1), np.array([3, 0, 9]), TASKS, latency=False)
    assert report.num_joint_images == 2 and report.joint_accuracy == 1.0


def test_fixed_batch_model_is_padded():
    model = build_logits_model({"a/logits": (0, 3), "b/logits": (3, 5)}, width=5)
    for v in list(model.graph.input) + list(model.graph.output):
        v.type.tensor_type.shape.dim[0].Clear()
        v.type.tensor_type.shape.dim[0].dim_value = 4
    x = _rows(*([0, 1, 2, 3, 4] * 2))  # 10 images: two full batches of 4 and a padded one
    y = np.array([3, 7, 1, 0, 5] * 2)
    report = evaluate(model, x, y, TASKS, batch_size=3, latency=False)
    assert report.joint_accuracy == 1.0 and report.per_task_accuracy == {"a": 1.0, "b": 1.0}


def test_head_resolution_errors():
    model = build_logits_model({"a/logits": (0, 3), "b/logits": (3, 5)}, width=5)
    assert resolve_heads(model, TASKS) == {"a": "a/logits", "b": "b/logits"}
    with pytest.raises(UsageError, match="no output 'nope'"):
        resolve_heads(model, TASKS, {"a": "nope"})
    with pytest.raises(UsageError, match="not a task"):
        resolve_heads(model, TASKS, {"c": "a/logits"})
    single = build_logits_model({"logits": (0, 3)}, width=5)
    with pytest.raises(UsageError, match="--head"):
        resolve_heads(single, TASKS)


def test_head_width_must_match_task():
    model = build_logits_model({"a/logits": (0, 2), "b/logits": (3, 5)}, width=5)
    with pytest.raises(UsageError, match="2 outputs per image"):
        evaluate(model, _rows(0), np.array([3]), TASKS, latency=False)


def test_tasks_must_be_disjoint():
    model = build_logits_model({"a/logits": (0, 3), "b/logits": (3, 5)}, width=5)
    with pytest.raises(UsageError, match="both task"):
        evaluate(model, _rows(0), np.array([3]), {"a": [3, 7, 1], "b": [1, 5]}, latency=False)


def test_data_shape_must_match_model():
    model = build_logits_model({"a/logits": (0, 3), "b/logits": (3, 5)}, width=5)
    with pytest.raises(CalibrationDataError, match="expects"):
        evaluate(model, np.zeros((2, 6), np.float32), np.array([3, 0]), TASKS, latency=False)


def test_latency_is_measured():
    ms = measure_latency(conv_gemm_model(), repeats=3, warmup=1)
    assert ms > 0
    report = evaluate(conv_gemm_model(), np.zeros((2, 3, 8, 8), np.float32), np.array([0, 1]),
                      {"a": list(range(10)), "b": [10, 11]}, heads={"a": "logits"})
    assert report.latency_ms > 0 and report.macs == CONV_GEMM_MACS


# ---------------------------------------------------------------------------------------------------------------
# evaluation data
# ---------------------------------------------------------------------------------------------------------------


def test_load_eval_data(tmp_path):
    path = tmp_path / "eval.npz"
    np.savez(path, x=np.zeros((3, 5), np.float32), y=np.array([1.0, 2.0, 3.0]))
    x, y = load_eval_data(path)
    assert x.shape == (3, 5) and y.dtype.kind == "i" and list(y) == [1, 2, 3]


@pytest.mark.parametrize("arrays, match", [
    ({"x": np.zeros((3, 5))}, "no array 'y'"),
    ({"images": np.zeros((3, 5)), "labels": np.zeros(3)}, "it has: images, labels"),
    ({"x": np.zeros((3, 5)), "y": np.zeros(4, np.int64)}, "3 images but 'y' has 4"),
    ({"x": np.zeros((0, 5)), "y": np.zeros(0, np.int64)}, "no images"),
    ({"x": np.zeros((2, 5)), "y": np.array([0.5, 1.0])}, "must be integers"),
])
def test_load_eval_data_errors(tmp_path, arrays, match):
    path = tmp_path / "eval.npz"
    np.savez(path, **arrays)
    with pytest.raises(CalibrationDataError, match=match):
        load_eval_data(path)


def test_load_eval_data_bad_files(tmp_path):
    with pytest.raises(CalibrationDataError, match="no such file"):
        load_eval_data(tmp_path / "missing.npz")
    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(CalibrationDataError, match="single array"):
        load_eval_data(tmp_path / "x.npy")
    (tmp_path / "junk.npz").write_bytes(b"not numpy")
    with pytest.raises(CalibrationDataError, match="not a readable"):
        load_eval_data(tmp_path / "junk.npz")


def _vit_macs():
    """By hand, for tools/make_fixtures.py's TinyViT: 8x8 image, 4x4 patches -> 4 tokens + the class token (T = 5),
    D = 16, 2 heads of d = 8, 2 blocks, MLP 16-32-16, 5 classes."""
    t, d, heads, depth = 5, 16, 2, 2
    patch = (d * 2 * 2) * (1 * 4 * 4)  # each of the 16x2x2 outputs: 1 channel x 4x4 kernel
    qkv, proj = t * d * 3 * d, t * d * d
    scores = values = heads * t * t * (d // heads)  # Q Kᵀ and P V, per head
    mlp = 2 * t * d * 2 * d
    return patch + depth * (qkv + scores + values + proj + mlp) + d * 5


@pytest.mark.parametrize("name", ["vit_packed_ts", "vit_packed_dynamo", "vit_mha_ts", "vit_separate_ts"])
def test_macs_of_exported_and_merged_vits_count_the_attention_matmuls(name):
    """TorchScript computes the attention Reshape targets from shapes (through Div, which ONNX's data propagation
    does not evaluate), so the attention MatMuls' shapes, in the export and in the merged model, are only known once
    those computations are evaluated. A twin merge shares everything but the head: one more head's Gemm."""
    import os

    import onnxzip

    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", name)
    a, b = (onnx.load(os.path.join(data, f"{w}.onnx")) for w in ("a", "b"))
    assert count_macs(a) == _vit_macs() == 23184
    x = np.random.RandomState(0).randn(64, 1, 8, 8).astype(np.float32)
    merged = onnxzip.merge(a, b, {a.graph.input[0].name: x}, method="permute", refit="none").model
    assert count_macs(merged) == _vit_macs() + 16 * 5
