"""Graph analysis: the feature spaces found, and exact permuted-twin merges of the less common structures
(channel Concat, depthwise conv, squeeze-and-excitation gate, LayerNorm on the channel axis)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxzip
from onnxzip.graph import analyse, normalise, stop_points, trunk_nodes, unsupported_report

import fixtures as F

RNG = np.random.RandomState(0)


def learned_spaces(model):
    return [s for s in analyse(model).spaces.values() if not s.identity and not s.composite]


# ---------------------------------------------------------------------------------------------------------------
# a tiny builder: nodes + named weights; the twin permutes the weights, the graph stays the same


def conv_w(o, i, k=3, groups=1):
    return (RNG.randn(o, i // groups, k, k) * np.sqrt(2.0 / (i // groups * k * k))).astype(np.float32)


def bias(n):
    return RNG.uniform(0.0, 0.2, n).astype(np.float32)


def make(nodes, weights, in_shape, out_width, opset=17):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N"] + list(in_shape))
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_width])
    inits = [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in weights.items()]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def perm(n):
    return RNG.permutation(n)


def head(nodes, w, source, width, classes=5):
    nodes += [helper.make_node("GlobalAveragePool", [source], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1)]
    w["fc.w"] = (RNG.randn(classes, width) / np.sqrt(width)).astype(np.float32)
    w["fc.b"] = bias(classes)


def concat_model():
    n = [helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], pads=[1] * 4),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "c2a.w", "c2a.b"], ["c2a"], pads=[1] * 4),
         helper.make_node("Relu", ["c2a"], ["r2a"]),
         helper.make_node("Conv", ["r1", "c2b.w", "c2b.b"], ["c2b"], kernel_shape=[1, 1]),
         helper.make_node("Relu", ["c2b"], ["r2b"]),
         helper.make_node("Concat", ["r2a", "r2b", "r1"], ["cat"], axis=1),
         helper.make_node("Conv", ["cat", "c3.w", "c3.b"], ["c3"], pads=[1] * 4),
         helper.make_node("Relu", ["c3"], ["r3"])]
    w = {"c1.w": conv_w(6, 3), "c1.b": bias(6), "c2a.w": conv_w(4, 6), "c2a.b": bias(4),
         "c2b.w": conv_w(5, 6, 1), "c2b.b": bias(5), "c3.w": conv_w(7, 15), "c3.b": bias(7)}
    head(n, w, "r3", 7)

    def twin(w):
        p1, pa, pb, p3 = perm(6), perm(4), perm(5), perm(7)
        cat = np.concatenate([pa, 4 + pb, 9 + p1])
        return {"c1.w": w["c1.w"][p1], "c1.b": w["c1.b"][p1],
                "c2a.w": w["c2a.w"][pa][:, p1], "c2a.b": w["c2a.b"][pa],
                "c2b.w": w["c2b.w"][pb][:, p1], "c2b.b": w["c2b.b"][pb],
                "c3.w": w["c3.w"][p3][:, cat], "c3.b": w["c3.b"][p3],
                "fc.w": w["fc.w"][:, p3], "fc.b": w["fc.b"]}
    return n, w, twin, (3, 8, 8), 4  # learned spaces: c1, c2a, c2b, c3 (the head is the 5th)


def depthwise_model():
    n = [helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], pads=[1] * 4),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "dw.w", "dw.b"], ["dw"], pads=[1] * 4, group=6),
         helper.make_node("Relu", ["dw"], ["r2"]),
         helper.make_node("Conv", ["r2", "pw.w", "pw.b"], ["pw"], kernel_shape=[1, 1]),
         helper.make_node("Relu", ["pw"], ["r3"])]
    w = {"c1.w": conv_w(6, 3), "c1.b": bias(6), "dw.w": conv_w(6, 6, groups=6), "dw.b": bias(6),
         "pw.w": conv_w(8, 6, 1), "pw.b": bias(8)}
    head(n, w, "r3", 8)

    def twin(w):
        p1, p2 = perm(6), perm(8)
        return {"c1.w": w["c1.w"][p1], "c1.b": w["c1.b"][p1], "dw.w": w["dw.w"][p1], "dw.b": w["dw.b"][p1],
                "pw.w": w["pw.w"][p2][:, p1], "pw.b": w["pw.b"][p2], "fc.w": w["fc.w"][:, p2], "fc.b": w["fc.b"]}
    return n, w, twin, (3, 8, 8), 2


def se_model():
    n = [helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], pads=[1] * 4),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("GlobalAveragePool", ["r1"], ["sq"]),
         helper.make_node("Conv", ["sq", "s.w", "s.b"], ["s"], kernel_shape=[1, 1]),
         helper.make_node("Relu", ["s"], ["rs"]),
         helper.make_node("Conv", ["rs", "e.w", "e.b"], ["e"], kernel_shape=[1, 1]),
         helper.make_node("Sigmoid", ["e"], ["gate"]),
         helper.make_node("Mul", ["r1", "gate"], ["gated"])]
    w = {"c1.w": conv_w(8, 3), "c1.b": bias(8), "s.w": conv_w(3, 8, 1), "s.b": bias(3),
         "e.w": conv_w(8, 3, 1), "e.b": bias(8)}
    head(n, w, "gated", 8)

    def twin(w):
        p1, ps = perm(8), perm(3)
        return {"c1.w": w["c1.w"][p1], "c1.b": w["c1.b"][p1], "s.w": w["s.w"][ps][:, p1], "s.b": w["s.b"][ps],
                "e.w": w["e.w"][p1][:, ps], "e.b": w["e.b"][p1], "fc.w": w["fc.w"][:, p1], "fc.b": w["fc.b"]}
    return n, w, twin, (3, 8, 8), 2  # the gate is tied to the map it gates


def layernorm_model():
    n = [helper.make_node("MatMul", ["input", "l1.w"], ["m1"]),
         helper.make_node("Add", ["m1", "l1.b"], ["a1"]),
         helper.make_node("LayerNormalization", ["a1", "ln.s", "ln.b"], ["ln"], axis=-1),
         helper.make_node("Relu", ["ln"], ["r1"]),
         helper.make_node("Gemm", ["r1", "fc.w", "fc.b"], ["logits"])]
    w = {"l1.w": (RNG.randn(10, 6) / 3).astype(np.float32), "l1.b": bias(6),
         "ln.s": RNG.uniform(0.5, 1.5, 6).astype(np.float32), "ln.b": bias(6),
         "fc.w": (RNG.randn(6, 5) / 3).astype(np.float32), "fc.b": bias(5)}

    def twin(w):
        p = perm(6)
        return {"l1.w": w["l1.w"][:, p], "l1.b": w["l1.b"][p], "ln.s": w["ln.s"][p], "ln.b": w["ln.b"][p],
                "fc.w": w["fc.w"][p], "fc.b": w["fc.b"]}
    return n, w, twin, (10,), 1



def reshape_model(groups=1):
    """PyTorch's GroupNorm decomposition (Reshape (N, G, -1) -> InstanceNormalization -> Reshape back -> Mul -> Add),
    then a flattening Reshape and one that splits the flat features back into channels before the next conv."""
    shape = lambda *d: np.array(d, dtype=np.int64)  # noqa: E731
    n = [helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], pads=[1] * 4),
         helper.make_node("Reshape", ["c1", "sh.groups"], ["g"]),
         helper.make_node("InstanceNormalization", ["g", "in.s", "in.b"], ["gn"]),
         helper.make_node("Reshape", ["gn", "sh.map"], ["gm"]),
         helper.make_node("Mul", ["gm", "gn.s"], ["gs"]),
         helper.make_node("Add", ["gs", "gn.b"], ["ga"]),
         helper.make_node("Relu", ["ga"], ["r1"]),
         helper.make_node("Reshape", ["r1", "sh.flat"], ["flat1"]),
         helper.make_node("Reshape", ["flat1", "sh.map"], ["r1b"]),
         helper.make_node("Conv", ["r1b", "c2.w", "c2.b"], ["c2"], pads=[1] * 4),
         helper.make_node("Relu", ["c2"], ["r2"])]
    w = {"c1.w": conv_w(8, 3), "c1.b": bias(8), "sh.groups": shape(0, groups, -1),
         "in.s": np.ones(groups, np.float32), "in.b": np.zeros(groups, np.float32), "sh.map": shape(0, 8, 8, 8),
         "gn.s": RNG.uniform(0.5, 1.5, (8, 1, 1)).astype(np.float32), "gn.b": bias(8).reshape(8, 1, 1),
         "sh.flat": shape(0, 512), "c2.w": conv_w(6, 8), "c2.b": bias(6)}
    head(n, w, "r2", 6)

    def twin(w):
        p1, p2 = perm(8), perm(6)
        out = dict(w)
        out.update({"c1.w": w["c1.w"][p1], "c1.b": w["c1.b"][p1], "gn.s": w["gn.s"][p1], "gn.b": w["gn.b"][p1],
                    "c2.w": w["c2.w"][p2][:, p1], "c2.b": w["c2.b"][p2], "fc.w": w["fc.w"][:, p2]})
        return out
    return n, w, twin, (3, 8, 8), 2

def permute_within(blocks, n):
    """A permutation of n channels that keeps each of `blocks` contiguous blocks in place."""
    size = n // blocks
    return np.concatenate([g * size + RNG.permutation(size) for g in range(blocks)])


def grouped_model():
    """ResNeXt-style: a grouped conv on the input (group 2, 4 -> 8), a bottleneck 1x1 -> 3x3 grouped (group 4,
    two channels per group) -> 1x1 whose output is added back to the stem's (a residual tie), then the head."""
    n = [helper.make_node("Conv", ["input", "c0.w", "c0.b"], ["c0"], pads=[1] * 4, group=2),
         helper.make_node("Relu", ["c0"], ["x0"]),
         helper.make_node("Conv", ["x0", "c1.w", "c1.b"], ["c1"]),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "g.w", "g.b"], ["g"], pads=[1] * 4, group=4),
         helper.make_node("Relu", ["g"], ["r2"]),
         helper.make_node("Conv", ["r2", "c3.w", "c3.b"], ["c3"]),
         helper.make_node("Add", ["c3", "x0"], ["s"]),
         helper.make_node("Relu", ["s"], ["r3"])]
    w = {"c0.w": conv_w(8, 4, groups=2), "c0.b": bias(8), "c1.w": conv_w(8, 8, k=1), "c1.b": bias(8),
         "g.w": conv_w(8, 8, groups=4), "g.b": bias(8), "c3.w": conv_w(8, 8, k=1), "c3.b": bias(8)}
    head(n, w, "r3", 8)

    def twin(w):
        p0, p1, p2 = permute_within(2, 8), permute_within(4, 8), permute_within(4, 8)
        g = w["g.w"][p2]  # output channels inside their groups; then each group's inputs inside its block
        g = np.concatenate([g[2 * k:2 * k + 2][:, p1[2 * k:2 * k + 2] - 2 * k] for k in range(4)])
        return dict(w, **{"c0.w": w["c0.w"][p0], "c0.b": w["c0.b"][p0], "c1.w": w["c1.w"][p1][:, p0],
                          "c1.b": w["c1.b"][p1], "g.w": g, "g.b": w["g.b"][p2], "c3.w": w["c3.w"][p0][:, p2],
                          "c3.b": w["c3.b"][p0], "fc.w": w["fc.w"][:, p0]})
    return n, w, twin, (4, 8, 8), 3


BUILDERS = {"concat": concat_model, "depthwise": depthwise_model, "se": se_model, "layernorm": layernorm_model,
            "reshape": reshape_model, "grouped": grouped_model}


@pytest.mark.parametrize("method", ["permute", "zip"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_twin_of_special_structures_is_exact(name, method):
    nodes, w, twin, in_shape, _ = BUILDERS[name]()
    a = make(nodes, w, in_shape, 5)
    b = make(nodes, twin(w), in_shape, 5)
    x = RNG.randn(64, *in_shape).astype(np.float32)
    (want,) = run(a, x)
    np.testing.assert_allclose(run(b, x)[0], want, atol=1e-5)  # the fixture is a twin
    res = onnxzip.merge(a, b, RNG.randn(256, *in_shape).astype(np.float32), method=method, beta=0.0)
    assert not res.card["unmerged"], res.card["unmerged"]
    assert res.card["trunk"]["weighted_layers_zipped"] == res.card["trunk"]["weighted_layers"] - 1
    got_a, got_b = run(res.model, x)
    np.testing.assert_allclose(got_a, want, atol=1e-4)
    np.testing.assert_allclose(got_b, want, atol=1e-4)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_spaces_counted(name):
    nodes, w, _, in_shape, expected = BUILDERS[name]()
    spaces = learned_spaces(make(nodes, w, in_shape, 5))
    assert len(spaces) == expected + 1  # + the head's output space


def test_concat_output_is_composite_of_its_parts():
    nodes, w, _, in_shape, _ = concat_model()
    an = analyse(make(nodes, w, in_shape, 5))
    cat = an.spaces[an.tensor_spaces["cat"].space]
    assert cat.composite and cat.width == 15
    assert [an.spaces[p].width for p in cat.parts] == [4, 5, 6]
    assert cat.parts[2] == an.tensor_spaces["r1"].space


def test_resnet_residual_stream_is_one_space():
    model, _ = F.resnet()
    an = analyse(model)
    adds = [n.index for n in an.nodes if n.op_type == "Add" and n.out_space is not None
            and an.spaces[n.out_space.space].width == 8 and len(an.spaces[n.out_space.space].producers) > 1]
    assert adds, "the residual adds tie the stem's and the blocks' outputs into one space"
    stream = an.spaces[an.nodes[adds[0]].out_space.space]
    assert len(stream.producers) == 3  # stem conv + the second conv of each of the two blocks


def test_flatten_widens_the_space_by_the_positions():
    model, _ = F.vgg()
    an = analyse(model)
    flat = next(n for n in an.nodes if n.op_type == "Flatten")
    assert flat.out_space.expand == 36 and flat.in_space.expand == 1


def test_reshape_into_a_unit_axis_and_back_keeps_the_channels():
    nodes, w, _, in_shape, _ = reshape_model()
    an = analyse(make(nodes, w, in_shape, 5))
    c1 = an.tensor_spaces["c1"]
    assert (an.tensor_spaces["g"].space, an.tensor_spaces["g"].axis, an.tensor_spaces["g"].expand) == (c1.space, 2, 64)
    assert an.tensor_spaces["flat1"].axis == 1 and an.tensor_spaces["flat1"].expand == 64
    assert (an.tensor_spaces["r1b"].space, an.tensor_spaces["r1b"].axis, an.tensor_spaces["r1b"].expand) == \
        (c1.space, 1, 1)


def test_grouped_groupnorm_decomposition_is_left_unmerged_and_exact():
    """Reshape (N, 2, -1) puts half the channels in each group: no channel axis to follow."""
    nodes, w, twin, in_shape, _ = reshape_model(groups=2)
    a, b = make(nodes, w, in_shape, 5), make(nodes, twin(w), in_shape, 5)
    reasons = [reason for i, reason in unsupported_report(analyse(a))]
    assert any("reshapes" in r and "[1, 2, 256]" in r for r in reasons), reasons
    x = RNG.randn(32, *in_shape).astype(np.float32)
    (want,) = run(a, x)
    res = onnxzip.merge(a, b, RNG.randn(128, *in_shape).astype(np.float32), method="zip")
    assert res.card["unmerged"]
    got_a, got_b = run(res.model, x)
    assert np.isfinite(got_b).all()
    np.testing.assert_allclose(got_a, want, atol=1e-4)

def test_heads_and_stop_points():
    model, _ = F.mlp()
    an = analyse(model)
    assert [an.nodes[i].op_type for i in an.heads] == ["Gemm"]
    points = [p for p, _ in stop_points(an)]
    assert points[0] == "input" and points[-1] == "heads" and "1" in points
    assert trunk_nodes(an, "input") == set(range(an.weighted[0]))
    assert an.heads[0] not in trunk_nodes(an)


def test_unsupported_operator_is_reported_with_node_and_reason():
    model, _ = F.vgg(lrn=True)
    an = analyse(model)
    ((i, reason),) = unsupported_report(an)
    assert an.nodes[i].op_type == "LRN" and "LRN" in reason
    assert i in an.blocked and an.heads[0] in an.blocked


def test_identity_of_a_constant_is_a_constant():
    """TorchScript with BatchNorm kept stores equal parameters once and writes the others as Identity of it."""
    n = [helper.make_node("Conv", ["input", "c1.w"], ["c1"], pads=[1] * 4),
         helper.make_node("Identity", ["bn.ones"], ["bn.scale"]),
         helper.make_node("BatchNormalization", ["c1", "bn.scale", "bn.b", "bn.m", "bn.v"], ["bn"]),
         helper.make_node("Relu", ["bn"], ["r1"])]
    w = {"c1.w": conv_w(6, 3), "bn.ones": np.ones(6, np.float32), "bn.b": bias(6),
         "bn.m": RNG.randn(6).astype(np.float32) * 0.1, "bn.v": RNG.uniform(0.5, 1.5, 6).astype(np.float32)}
    head(n, w, "r1", 6)
    a = make(n, w, (3, 8, 8), 5)
    assert analyse(a).folded_batchnorms == 1  # the Identity's value is a constant: foldable
    an = analyse(a, fold_batchnorm=False)
    assert not unsupported_report(an)
    assert an.nodes[[x.op_type for x in an.nodes].index("BatchNormalization")].kind == "carrier"
    p = perm(6)
    w2 = dict(w, **{"c1.w": w["c1.w"][p], "bn.b": w["bn.b"][p], "bn.m": w["bn.m"][p], "bn.v": w["bn.v"][p],
                    "fc.w": w["fc.w"][:, p]})
    b = make(n, w2, (3, 8, 8), 5)
    x = RNG.randn(32, 3, 8, 8).astype(np.float32)
    res = onnxzip.merge(a, b, RNG.randn(128, 3, 8, 8).astype(np.float32), method="permute", fold_batchnorm=False)
    assert res.card["trunk"]["weighted_layers_zipped"] == 1
    got_a, got_b = run(res.model, x)
    np.testing.assert_allclose(got_a, run(a, x)[0], atol=1e-4)
    np.testing.assert_allclose(got_b, run(a, x)[0], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm folding in normalise


def bn_params(prefix, n):
    return {f"{prefix}.s": RNG.uniform(0.5, 1.5, n).astype(np.float32), f"{prefix}.b": bias(n),
            f"{prefix}.m": RNG.randn(n).astype(np.float32), f"{prefix}.v": RNG.uniform(0.5, 2.0, n).astype(np.float32)}


def bn(prefix, x, y):
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}.{k}" for k in "sbmv"], [y], epsilon=1e-3)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_batchnorm_folding_is_exact_for_conv_and_gemm(trans_b):
    n = [helper.make_node("Conv", ["input", "c1.w"], ["c1"], pads=[1] * 4),  # no bias: folding adds one
         bn("bn1", "c1", "b1"),
         helper.make_node("Relu", ["b1"], ["r1"]),
         helper.make_node("GlobalAveragePool", ["r1"], ["gap"]),
         helper.make_node("Flatten", ["gap"], ["flat"]),
         helper.make_node("Gemm", ["flat", "l.w", "l.b"], ["l"], transB=trans_b),
         bn("bn2", "l", "b2"),
         helper.make_node("Relu", ["b2"], ["r2"]),
         helper.make_node("Gemm", ["r2", "fc.w", "fc.b"], ["logits"], transB=1)]
    w = {"c1.w": conv_w(8, 3), **bn_params("bn1", 8), **bn_params("bn2", 6), "l.b": bias(6),
         "l.w": (RNG.randn(6, 8) if trans_b else RNG.randn(8, 6)).astype(np.float32),
         "fc.w": (RNG.randn(5, 6) / 3).astype(np.float32), "fc.b": bias(5)}
    model = make(n, w, (3, 8, 8), 5)
    folded = normalise(model)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm", "Relu",
                                                      "Gemm"]
    onnx.checker.check_model(folded, full_check=True)
    x = RNG.randn(16, 3, 8, 8).astype(np.float32)
    np.testing.assert_allclose(run(folded, x)[0], run(model, x)[0], rtol=1e-5, atol=1e-5)
    assert analyse(model).folded_batchnorms == 2 and analyse(model, fold_batchnorm=False).folded_batchnorms == 0


def test_batchnorm_is_not_folded_where_the_layer_output_is_used_elsewhere():
    n = [helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], pads=[1] * 4),
         bn("bn1", "c1", "b1"),
         helper.make_node("Add", ["b1", "c1"], ["s"]),
         helper.make_node("Relu", ["s"], ["r1"])]
    w = {"c1.w": conv_w(8, 3), "c1.b": bias(8), **bn_params("bn1", 8)}
    head(n, w, "r1", 8)
    model = make(n, w, (3, 8, 8), 5)
    assert "BatchNormalization" in [n.op_type for n in normalise(model).graph.node]


# ---------------------------------------------------------------------------------------------------------------
# Shapes that ONNX shape inference cannot reach on its own (issue 13, "never a crash")


def torchscript_shuffle_model(w=None, chunk="slice"):
    """conv0 -> ReLU -> channel shuffle and `chunk(2, dim=1)` as PyTorch's TorchScript exporter writes them
    (ShuffleNetV2): every shape is computed at run time, Shape -> Gather -> Div -> Cast -> Concat, and ONNX's data
    propagation stops at the Div (TorchScript gathers scalars and unsqueezes them; `make` keeps no 0-d constant).
    The second half goes through conv1, is concatenated back with the first half, then the head. Returns (model, weights); pass `w` to rebuild with other weights. `chunk="split"`:
    one Split (sizes [4, 4]) instead of the computed Slices, as the dynamo exporter writes `chunk`."""
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    n = [helper.make_node("Conv", ["input", "c0.w", "c0.b"], ["c0"], pads=[1] * 4),
         helper.make_node("Relu", ["c0"], ["r0"]),
         helper.make_node("Shape", ["r0"], ["s"])]
    for k, dim in enumerate("nchw"):
        n.append(helper.make_node("Gather", ["s", f"k.{k}"], [f"u.{dim}"], axis=0))
    n += [helper.make_node("Div", ["u.c", "k.two"], ["cg"]),
          helper.make_node("Cast", ["cg"], ["cg1"], to=TensorProto.INT64),
          helper.make_node("Concat", ["u.n", "k.groups", "cg1", "u.h", "u.w"], ["shape5"], axis=0),
          helper.make_node("Reshape", ["r0", "shape5"], ["g5"]),
          helper.make_node("Transpose", ["g5"], ["t5"], perm=[0, 2, 1, 3, 4]),
          helper.make_node("Concat", ["u.n", "u.c", "u.h", "u.w"], ["shape4"], axis=0),
          helper.make_node("Reshape", ["t5", "shape4"], ["shuffled"])]
    if chunk == "split":
        n.append(helper.make_node("Split", ["shuffled", "k.halves"], ["x1", "x2"], axis=1))
    else:
        n += [helper.make_node("Shape", ["shuffled"], ["s2"]),
              helper.make_node("Gather", ["s2", "k.1"], ["c2"], axis=0),
              helper.make_node("Div", ["c2", "k.two"], ["half1"]),
              helper.make_node("Slice", ["shuffled", "k.zero", "half1", "k.axis1"], ["x1"]),
              helper.make_node("Slice", ["shuffled", "half1", "k.big", "k.axis1"], ["x2"])]
    n += [          helper.make_node("Conv", ["x2", "c1.w", "c1.b"], ["c1x"]),
          helper.make_node("Relu", ["c1x"], ["r1"]),
          helper.make_node("Concat", ["x1", "r1"], ["cat"], axis=1)]
    if w is None:
        w = {"c0.w": conv_w(8, 3), "c0.b": bias(8), "c1.w": conv_w(4, 4, k=1), "c1.b": bias(4),
             **{f"k.{k}": i64(k) for k in range(4)}, "k.two": i64(2),
             "k.groups": i64(2), "k.zero": i64(0), "k.big": i64(2 ** 62), "k.axis1": i64(1), "k.halves": i64(4, 4)}
    given = {k: w[k] for k in ("fc.w", "fc.b") if k in w}
    head(n, w, "cat", 8)
    w.update(given)  # a twin keeps its (permuted) head
    return make(n, w, (3, 8, 8), 5), w


def test_shapes_computed_at_run_time_are_known_to_analysis():
    """Before: ONNX shape inference alone left every tensor after the shuffle without a shape."""
    model, _ = torchscript_shuffle_model()
    an = analyse(model)
    assert an.shapes["g5"] == (1, 2, 4, 8, 8) and an.shapes["shuffled"] == (1, 8, 8, 8)
    assert an.shapes["x2"] == (1, 4, 8, 8) and an.shapes["c1x"] == (1, 4, 8, 8) and an.shapes["cat"] == (1, 8, 8, 8)
    # the model itself still computes its shapes (its batch dimension stays dynamic)
    assert [x.op_type for x in an.model.graph.node].count("Shape") == 2


def shuffle_twin(w):
    """torchscript_shuffle_model's twin. The shuffle puts conv0's channels in the order 0 4 1 5 2 6 3 7, the slices
    keep {0, 1, 4, 5} and {2, 3, 6, 7}: conv0 is permuted inside those blocks (what a merge may match), conv1
    freely, and conv1 and the head read their inputs in the order the twin's shuffle and slices deliver them."""
    order = np.array([0, 4, 1, 5, 2, 6, 3, 7])
    p0 = np.array([5, 4, 7, 6, 0, 1, 3, 2])  # keeps {0, 1, 4, 5} and {2, 3, 6, 7}
    p1 = perm(4)
    q = np.argsort(order)[p0[order]]  # the twin's shuffled channel j is A's shuffled channel q[j]
    assert sorted(q[:4]) == [0, 1, 2, 3]
    return dict(w, **{"c0.w": w["c0.w"][p0], "c0.b": w["c0.b"][p0], "c1.w": w["c1.w"][p1][:, q[4:] - 4],
                      "c1.b": w["c1.b"][p1], "fc.w": w["fc.w"][:, np.concatenate([q[:4], 4 + p1])]})


@pytest.mark.parametrize("chunk", ["slice", "split"])
@pytest.mark.parametrize("method", ["permute", "zip"])
def test_torchscript_channel_shuffle_and_chunk_merge_exactly(method, chunk):
    """ShuffleNetV2's TorchScript export crashed merge with `internal error: KeyError` on the Conv after the
    shuffle (statistics repair read a shape shape inference had not found). Now the shuffle and the slices are
    followed (views of conv0's space, which is split into the two blocks the slices keep), and twins merge
    exactly with everything but the head in the trunk."""
    a, w = torchscript_shuffle_model(chunk=chunk)
    b, _ = torchscript_shuffle_model(shuffle_twin(w), chunk)
    x = RNG.randn(32, 3, 8, 8).astype(np.float32)
    (want,) = run(a, x)
    np.testing.assert_allclose(run(b, x)[0], want, atol=1e-5)  # the fixture is a twin
    an = analyse(a)
    assert an.spaces[an.tensor_spaces["r0"].space].partition == (0, 0, 1, 1, 0, 0, 1, 1)
    assert an.tensor_spaces["g5"].split == (2, 4)
    res = onnxzip.merge(a, b, RNG.randn(256, 3, 8, 8).astype(np.float32), method=method, beta=0.0)
    assert not res.card["unmerged"] and res.card["trunk"]["weighted_layers_zipped"] == 2
    got_a, got_b = run(res.model, x)
    np.testing.assert_allclose(got_a, want, atol=1e-4)
    np.testing.assert_allclose(got_b, want, atol=1e-4)


def test_unrelated_shuffle_models_merge_with_clusters_inside_the_slices():
    """Two initialisations: unrestricted, ZipIt! would merge channels that the slices then separate (no merged
    model could hold such a cluster on both sides); the blocks keep every cluster inside one slice."""
    a, _ = torchscript_shuffle_model()
    b, _ = torchscript_shuffle_model()
    res = onnxzip.merge(a, b, RNG.randn(256, 3, 8, 8).astype(np.float32), method="zip", beta=0.5)
    assert not res.card["unmerged"] and [s["blocks"] for s in res.card["spaces"]] == [2, 1]
    assert all(np.isfinite(y).all() for y in run(res.model, RNG.randn(8, 3, 8, 8).astype(np.float32)))


def test_repair_measures_layers_whose_rank_shape_inference_does_not_know():
    """An operator of another domain (com.microsoft.Gelu, which onnxruntime runs and ONNX cannot infer) leaves the
    conv after it without even a rank: statistics repair measures it in a pass of its own instead of crashing."""
    n = [helper.make_node("Conv", ["input", "c0.w", "c0.b"], ["c0"], pads=[1] * 4),
         helper.make_node("Relu", ["c0"], ["r0"]),
         helper.make_node("Gelu", ["r0"], ["g"], domain="com.microsoft"),
         helper.make_node("Conv", ["g", "c1.w", "c1.b"], ["c1"]),
         helper.make_node("Relu", ["c1"], ["r1"])]
    w = {"c0.w": conv_w(8, 3), "c0.b": bias(8), "c1.w": conv_w(6, 8, k=1), "c1.b": bias(6)}
    head(n, w, "r1", 6)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])
    a = helper.make_model(helper.make_graph(n, "g", [x], [y], [numpy_helper.from_array(v, k) for k, v in w.items()]),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    a.ir_version = 10
    an = analyse(a)
    assert "c1" not in an.ranks and an.nodes[3].kind == "weighted"
    data = RNG.randn(128, 3, 8, 8).astype(np.float32)
    xs = RNG.randn(16, 3, 8, 8).astype(np.float32)
    for refit in ("none", "ls"):  # the refit supersedes the repair; it leaves layers of unknown shape as they are
        res = onnxzip.merge(a, a, data, refit=refit)
        assert res.card["unmerged"][0]["op"] == "Gelu"
        assert res.card["repair"].get("branch_layers") == (2 if refit == "none" else None)
        got_a, got_b = run(res.model, xs)
        np.testing.assert_allclose(got_a, run(a, xs)[0], atol=1e-4)
        np.testing.assert_allclose(got_b, run(a, xs)[0], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Grouped convolutions (issue 13): spaces split into blocks, matched block by block (grouped_model is above, with
# the other builders; its twins merge exactly in test_twin_of_special_structures_is_exact)


def test_grouped_conv_spaces_are_split_into_its_groups():
    nodes, w, _, in_shape, _ = grouped_model()
    an = analyse(make(nodes, w, in_shape, 5))
    assert not unsupported_report(an)
    assert [an.nodes[i].kind for i in range(5)] == ["weighted", "carrier", "weighted", "carrier", "weighted"]
    blocks = {name: an.spaces[an.tensor_spaces[name].space].blocks for name in ("x0", "r1", "r2", "s")}
    assert blocks == {"x0": 2, "r1": 4, "r2": 4, "s": 2}
    (g_in,) = [x for x in an.weight_axes(4, 1) if x.role == "in"]
    assert g_in.groups == 4 and g_in.space == an.tensor_spaces["r1"].space


def test_grouped_conv_with_one_input_channel_per_group_is_refused_by_name():
    n = [helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], pads=[1] * 4),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "g.w"], ["g"], pads=[1] * 4, group=6, name="multiplier"),
         helper.make_node("Relu", ["g"], ["r2"])]
    w = {"c1.w": conv_w(6, 3), "c1.b": bias(6), "g.w": conv_w(12, 6, groups=6)}
    head(n, w, "r2", 12)
    ((i, reason),) = unsupported_report(analyse(make(n, w, (3, 8, 8), 5)))
    assert "multiplier" in analyse(make(n, w, (3, 8, 8), 5)).describe_node(i) and "one input channel" in reason


@pytest.mark.parametrize("method", ["zip", "permute", "average"])
def test_unrelated_grouped_models_merge_into_a_grouped_model(method):
    """Two different initialisations: ZipIt!'s greedy matching would pair features across groups if it could (the
    merged layer could then not stay grouped); block by block, the merged graph keeps every group attribute and runs."""
    nodes, w, _, in_shape, _ = grouped_model()
    _, w2, _, _, _ = grouped_model()
    a, b = make(nodes, w, in_shape, 5), make(nodes, w2, in_shape, 5)
    res = onnxzip.merge(a, b, RNG.randn(256, *in_shape).astype(np.float32), method=method)
    assert not res.card["unmerged"] and res.card["trunk"]["weighted_layers_zipped"] == 4
    assert [s["blocks"] for s in res.card["spaces"]] == [2, 4, 4]
    groups = [next((x.i for x in n.attribute if x.name == "group"), 1) for n in res.model.graph.node
              if n.op_type == "Conv" and n.name.startswith("zip/")]
    assert groups == [2, 1, 4, 1]
    assert all(np.isfinite(y).all() for y in run(res.model, RNG.randn(8, *in_shape).astype(np.float32)))


def swap_groups(blocks, n, order):
    """A permutation of n channels whose block k is block order[k], its channels permuted inside."""
    size = n // blocks
    return np.concatenate([order[k] * size + RNG.permutation(size) for k in range(blocks)])


def grouped_swapped_twin(w):
    """grouped_model's twin with the grouped conv's groups in another order: its output groups and the blocks of
    c1's output they read move together (g's new group k is its old group s[k], reading c1's old block s[k]); the
    stem's groups stay in place (its grouped conv reads the input)."""
    order = np.array([2, 0, 3, 1])
    p0, p1, p2 = permute_within(2, 8), swap_groups(4, 8, order), swap_groups(4, 8, order)
    g = w["g.w"][p2]
    g = np.concatenate([g[2 * k:2 * k + 2][:, p1[2 * k:2 * k + 2] - 2 * order[k]] for k in range(4)])
    return dict(w, **{"c0.w": w["c0.w"][p0], "c0.b": w["c0.b"][p0], "c1.w": w["c1.w"][p1][:, p0],
                      "c1.b": w["c1.b"][p1], "g.w": g, "g.b": w["g.b"][p2], "c3.w": w["c3.w"][p0][:, p2],
                      "c3.b": w["c3.b"][p0], "fc.w": w["fc.w"][:, p0]}), order


def test_grouped_layers_link_their_spaces_into_block_families():
    nodes, w, _, in_shape, _ = grouped_model()
    an = analyse(make(nodes, w, in_shape, 5))
    stem, bottleneck = an.block_families
    assert stem.layers == (0,) and not stem.movable and "reads the shared input" in stem.why
    assert stem.spaces == (an.tensor_spaces["x0"].space,) and stem.blocks == 2
    assert bottleneck.layers == (4,) and bottleneck.movable and bottleneck.blocks == 4
    assert bottleneck.spaces == tuple(sorted(an.tensor_spaces[t].space for t in ("r1", "r2")))


@pytest.mark.parametrize("method", ["permute", "zip"])
def test_a_twin_with_its_groups_in_another_order_merges_exactly(method):
    """Groups are matched as wholes first (summed correlation of the linked spaces), then features inside them."""
    nodes, w, _, in_shape, _ = grouped_model()
    twin, order = grouped_swapped_twin(w)
    a, b = make(nodes, w, in_shape, 5), make(nodes, twin, in_shape, 5)
    x = RNG.randn(64, *in_shape).astype(np.float32)
    (want,) = run(a, x)
    np.testing.assert_allclose(run(b, x)[0], want, atol=1e-5)  # the fixture is a twin
    res = onnxzip.merge(a, b, RNG.randn(256, *in_shape).astype(np.float32), method=method, beta=0.0)
    for got in run(res.model, x):
        np.testing.assert_allclose(got, want, atol=1e-4)
    moved = [s for s in res.card["spaces"] if "block_order" in s]
    assert len(moved) == 2 and all(s["blocks"] == 4 for s in moved)
    # A's group k is B's group j with order[j] = k
    assert all(np.array_equal(order[np.array(s["block_order"][1])], np.arange(4)) for s in moved)
    groups = [next((x.i for x in n.attribute if x.name == "group"), 1) for n in res.model.graph.node
              if n.op_type == "Conv" and n.name.startswith("zip/")]
    assert groups == [2, 1, 4, 1], "the merged layer keeps its groups"


def test_groups_read_after_the_trunk_stay_in_place():
    """Stopping before the grouped conv: it reads c1's merged blocks from a branch, in place, so c1's space is
    matched block for block at its positions (no block order), and the merge runs."""
    nodes, w, _, in_shape, _ = grouped_model()
    twin, _ = grouped_swapped_twin(w)
    a, b = make(nodes, w, in_shape, 5), make(nodes, twin, in_shape, 5)
    res = onnxzip.merge(a, b, RNG.randn(256, *in_shape).astype(np.float32), method="permute", stop_at=2)
    assert res.card["trunk"]["weighted_layers_zipped"] == 2
    assert not any("block_order" in s for s in res.card["spaces"])
    assert all(np.isfinite(y).all() for y in run(res.model, RNG.randn(8, *in_shape).astype(np.float32)))


def test_groups_a_slice_reads_stay_in_place():
    """A Split of a grouped conv's output reads fixed positions: its family keeps its blocks in place."""
    n = [helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], pads=[1] * 4),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "g.w", "g.b"], ["g"], pads=[1] * 4, group=2),
         helper.make_node("Relu", ["g"], ["r2"]),
         helper.make_node("Split", ["r2"], ["h1", "h2"], axis=1, num_outputs=2),
         helper.make_node("Concat", ["h2", "h1"], ["s"], axis=1)]
    w = {"c1.w": conv_w(8, 3), "c1.b": bias(8), "g.w": conv_w(8, 8, groups=2), "g.b": bias(8)}
    head(n, w, "s", 8)
    an = analyse(make(n, w, (3, 8, 8), 5, opset=18))
    assert not unsupported_report(an)
    (family,) = an.block_families
    assert not family.movable and "a slice, split or shuffle reads" in family.why


def test_transform_axis_follows_groups_matched_in_another_order():
    """A grouped weight whose groups were merged in another order: each merged group's slice is contracted with the
    block of the matrix it reads; a matrix that mixes two blocks into one is refused."""
    from onnxzip.surgery import block_map, transform_axis

    groups, size = 3, 2
    weight = RNG.randn(groups * 4, size, 1, 1)  # 4 outputs per group, 2 inputs per group
    order = [2, 0, 1]  # merged block k takes the model's block order[k]
    matrix = np.zeros((6, 6))
    for k, src in enumerate(order):
        matrix[k * size:(k + 1) * size, src * size:(src + 1) * size] = RNG.randn(size, size)
    assert block_map(matrix, groups) == order
    got = transform_axis(weight, 1, 1, matrix, groups)
    for k, src in enumerate(order):
        block = matrix[k * size:(k + 1) * size, src * size:(src + 1) * size]
        np.testing.assert_allclose(got[k * 4:(k + 1) * 4, :, 0, 0], weight[k * 4:(k + 1) * 4, :, 0, 0] @ block.T)
    matrix[0, 2] = 1.0  # merged block 0 now also reads block 1
    with pytest.raises(ValueError, match="one to one"):
        transform_axis(weight, 1, 1, matrix, groups)


def test_channels_last_reshapes_of_the_leading_axes_merge_exactly():
    """Hugging Face's Conv1D (GPT-2) as TorchScript writes it at a fixed batch: x.view(-1, C) -> Gemm -> view back
    (2, T, C'): the leading axes merge and split while the channels stay last."""
    shape = lambda *d: np.array(d, dtype=np.int64)  # noqa: E731
    nodes = [helper.make_node("Reshape", ["input", "flat"], ["x2"]),
             helper.make_node("Gemm", ["x2", "fc1.w", "fc1.b"], ["h"], transB=1),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Reshape", ["r", "back"], ["r3"]),
             helper.make_node("ReduceMean", ["r3"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("Gemm", ["pooled", "fc.w", "fc.b"], ["logits"], transB=1)]
    w = {"flat": shape(-1, 8), "back": shape(2, 4, 16), "fc1.w": (RNG.randn(16, 8) / np.sqrt(8)).astype(np.float32),
         "fc1.b": bias(16), "fc.w": (RNG.randn(5, 16) / 4).astype(np.float32), "fc.b": bias(5)}

    def build(w):
        x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 4, 8])
        y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 5])
        inits = [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in w.items()]
        model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 10
        return model

    p = perm(16)
    a, b = build(w), build(dict(w, **{"fc1.w": w["fc1.w"][p], "fc1.b": w["fc1.b"][p], "fc.w": w["fc.w"][:, p]}))
    x = RNG.randn(64, 4, 8).astype(np.float32)
    want = np.concatenate([run(a, x[k:k + 2])[0] for k in range(0, 64, 2)])
    res = onnxzip.merge(a, b, RNG.randn(256, 4, 8).astype(np.float32), method="zip", beta=0.0)
    assert not res.card["unmerged"], res.card["unmerged"]
    assert res.card["trunk"]["weighted_layers_zipped"] == 1
    got = [np.concatenate([run(res.model, x[k:k + 2])[h] for k in range(0, 64, 2)]) for h in (0, 1)]
    np.testing.assert_allclose(got[0], want, atol=1e-4)
    np.testing.assert_allclose(got[1], want, atol=1e-4)


def test_a_concat_of_one_tensor_carries_its_space():
    """TorchScript writes a key/value cache with no past as a Concat of the keys alone (Hugging Face's Llama)."""
    nodes = [helper.make_node("Flatten", ["input"], ["x"]),
             helper.make_node("Gemm", ["x", "fc1.w", "fc1.b"], ["h"], transB=1),
             helper.make_node("Concat", ["h"], ["c"], axis=1),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Gemm", ["r", "fc.w", "fc.b"], ["logits"], transB=1)]
    w = {"fc1.w": (RNG.randn(16, 12) / np.sqrt(12)).astype(np.float32), "fc1.b": bias(16),
         "fc.w": (RNG.randn(5, 16) / 4).astype(np.float32), "fc.b": bias(5)}
    p = perm(16)
    a = make(nodes, w, (12,), 5)
    b = make(nodes, dict(w, **{"fc1.w": w["fc1.w"][p], "fc1.b": w["fc1.b"][p], "fc.w": w["fc.w"][:, p]}), (12,), 5)
    x = RNG.randn(64, 12).astype(np.float32)
    (want,) = run(a, x)
    res = onnxzip.merge(a, b, RNG.randn(256, 12).astype(np.float32), method="zip", beta=0.0)
    assert not res.card["unmerged"], res.card["unmerged"]
    assert [s.width for s in learned_spaces(a)] == [16, 5]
    for got in run(res.model, x):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_pads_computed_from_shapes_carry_the_space():
    """Swin's window padding: Pad whose pads TorchScript computes from the feature map's shape."""
    ints = lambda *d: np.array(d, dtype=np.int64)  # noqa: E731
    nodes = [helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Shape", ["r1"], ["s"]),
             helper.make_node("Slice", ["s", "two", "four"], ["hw"]),
             helper.make_node("Div", ["hw", "hw"], ["one"]),
             helper.make_node("Concat", ["zeros", "one", "zeros", "one"], ["pads"], axis=0),
             helper.make_node("Pad", ["r1", "pads"], ["p1"]),
             helper.make_node("Conv", ["p1", "c2.w", "c2.b"], ["c2"]),
             helper.make_node("Relu", ["c2"], ["r2"])]
    w = {"c1.w": conv_w(8, 3), "c1.b": bias(8), "two": ints(2), "four": ints(4), "zeros": ints(0, 0),
         "c2.w": conv_w(6, 8), "c2.b": bias(6)}
    head(nodes, w, "r2", 6)
    p1, p2 = perm(8), perm(6)
    twin = dict(w, **{"c1.w": w["c1.w"][p1], "c1.b": w["c1.b"][p1], "c2.w": w["c2.w"][p2][:, p1],
                      "c2.b": w["c2.b"][p2], "fc.w": w["fc.w"][:, p2]})
    a, b = make(nodes, w, (3, 8, 8), 5), make(nodes, twin, (3, 8, 8), 5)
    assert len(learned_spaces(a)) == 3
    x = RNG.randn(64, 3, 8, 8).astype(np.float32)
    (want,) = run(a, x)
    res = onnxzip.merge(a, b, RNG.randn(256, 3, 8, 8).astype(np.float32), method="permute")
    assert not res.card["unmerged"], res.card["unmerged"]
    for got in run(res.model, x):
        np.testing.assert_allclose(got, want, atol=1e-4)
