"""The least-squares refit (onnxzip/refit.py): invariants that must hold exactly.

- patch extraction reproduces onnxruntime's Conv for every geometry (strides, asymmetric pads, dilations, groups,
  auto_pad, 1-D and 3-D);
- a model merged with a channel-permuted copy of itself stays exact with the refit on (zero residual);
- least squares recovers known weights: a merged model whose every layer was overwritten with noise is refitted
  back to the original function;
- a rank-deficient input (dead channels, fewer samples than regressors) gives a warning and a finite model;
- residual joins are fitted through the sum; `--refit none` is the paper's pipeline; the ensemble is untouched.
"""
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxzip
from onnxzip.calibration import calibration_from_arrays, input_specs
from onnxzip.errors import UsageError
from onnxzip.graph import analyse, match, trunk_nodes
from onnxzip.calibration import as_rows
from onnxzip.refit import conv_geometry, conv_patches, refit, refit_layers
from onnxzip.solver import solve
from onnxzip.surgery import ZipPlan, build, zipped_spaces

try:
    from tests import fixtures as F
except ImportError:  # pytest put tests/ itself on sys.path
    import fixtures as F

ATOL = 1e-4


def _conv_model(x_shape, w, b, **attrs):
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


GEOMETRIES = {
    "stride2-asymmetric-pads": ((2, 4, 9, 8), (6, 4, 3, 3), dict(strides=[2, 2], pads=[0, 1, 2, 0])),
    "dilation": ((2, 3, 11, 10), (5, 3, 3, 2), dict(dilations=[2, 3], pads=[1, 1, 1, 1])),
    "groups": ((2, 4, 7, 7), (6, 2, 3, 3), dict(group=2, pads=[1, 1, 1, 1])),
    "depthwise": ((2, 5, 6, 6), (5, 1, 3, 3), dict(group=5, strides=[2, 1], pads=[1, 0, 1, 1])),
    "same-upper-stride2": ((2, 3, 9, 8), (4, 3, 4, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "same-lower": ((2, 3, 8, 7), (4, 3, 4, 2), dict(auto_pad="SAME_LOWER")),
    "valid": ((2, 3, 8, 7), (4, 3, 3, 3), dict(auto_pad="VALID", strides=[1, 2])),
    "1d": ((3, 4, 13), (6, 4, 3), dict(strides=[2], pads=[2, 1], dilations=[2])),
    "3d": ((2, 2, 5, 4, 6), (3, 2, 2, 3, 2), dict(strides=[1, 2, 1], pads=[1, 0, 1, 0, 1, 1])),
}


@pytest.mark.parametrize("case", list(GEOMETRIES))
def test_conv_patches_agree_with_the_conv(case):
    import onnxruntime as ort
    x_shape, w_shape, attrs = GEOMETRIES[case]
    rng = np.random.RandomState(0)
    x = rng.randn(*x_shape).astype(np.float32)
    w = rng.randn(*w_shape).astype(np.float32)
    b = rng.randn(w_shape[0]).astype(np.float32)
    model = _conv_model(x_shape, w, b, **attrs)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    node = model.graph.node[0]
    out_spatial = y.shape[2:]
    geometry = conv_geometry(node, w.shape, x.shape[2:], out_spatial)
    rows = np.arange(y.shape[0] * int(np.prod(out_spatial)))
    blocks = conv_patches(x.astype(np.float64), geometry, out_spatial, rows)
    group = geometry.group
    per_out = w.shape[0] // group
    assert len(blocks) == group and all(b.flags.c_contiguous for b in blocks)
    got = np.concatenate([blocks[g] @ w[g * per_out:(g + 1) * per_out].reshape(per_out, -1).T.astype(np.float64)
                          for g in range(group)], axis=1) + b
    want = as_rows(y, 1)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=case)
    # a subsample of rows, in any order, gives the same rows
    some = rows[::3][::-1]
    for block, part in zip(blocks, conv_patches(x.astype(np.float64), geometry, out_spatial, some)):
        np.testing.assert_array_equal(part, block[some])


# ---------------------------------------------------------------------------------------------------------------
# Through the whole merge
# ---------------------------------------------------------------------------------------------------------------

ARCHS = ["mlp", "vgg", "resnet"]


@pytest.fixture(scope="module")
def twins():
    out = {}
    for arch in ARCHS:
        a, pa = F.ARCHS[arch](seed=11)
        b, _ = F.permuted_twin(pa, np.random.RandomState(5))
        out[arch] = (a, b)
    return out


def _assert_close(got, want, atol, what):
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:g}"


@pytest.mark.parametrize("method", ["permute", "zip"])
@pytest.mark.parametrize("arch", ARCHS)
def test_permuted_twin_stays_exact_with_the_refit(twins, arch, method):
    a, b = twins[arch]
    kw = {"beta": 0.0} if method == "zip" else {}
    result = onnxzip.merge(a, b, F.calib(a, 256, seed=0), method=method, refit="ls", **kw)
    fitted = result.card["refit"]["layers"]
    assert result.card["refit"]["applied"] and fitted, "the refit ran"
    assert len(fitted) >= 3
    for layer in fitted:  # zero residual: every layer reproduces its target
        assert layer["r2_calibration"] > 1 - 1e-6, layer
    x = F.calib(a, 64, seed=987)
    want = F.run(a, x)["logits"]
    out = F.run(result.model, x)
    _assert_close(out["a/logits"], want, ATOL, f"{arch} {method} a/logits")
    _assert_close(out["b/logits"], want, ATOL, f"{arch} {method} b/logits")


def _plan_and_surgery(a_model, b_model, method="average"):
    """The merge pipeline up to surgery, with matchings that need no statistics (average: identity)."""
    a, b = analyse(a_model), analyse(b_model)
    corr = match(a, b)
    trunk = trunk_nodes(a)
    plan = ZipPlan([a, b], [None, corr], trunk, {}, ("a", "b"))
    for sid in zipped_spaces(a, trunk):
        plan.matchings[sid] = solve(method, None, a.spaces[sid].width, 2, 0.3, 0.125)
    return plan, build(plan)


@pytest.mark.parametrize("arch", ARCHS)
def test_least_squares_recovers_known_weights(arch, caplog):
    """A model merged with itself is the model; overwrite every layer the refit fits with noise, and the refit
    must find the original weights again (each layer's input is full rank once the layers before it are right)."""
    a, _ = F.ARCHS[arch](seed=3)
    plan, surgery = _plan_and_surgery(a, a)
    layers = refit_layers(plan, surgery)
    assert {lay.model for lay in layers} == {None, 0, 1}, "trunk layers and both heads are refitted"
    rng = np.random.RandomState(1)
    nodes = {n.name: n for n in surgery.model.graph.node}
    inits = {i.name: i for i in surgery.model.graph.initializer}
    originals = {}
    for layer in layers:
        node = nodes[layer.merged_node]
        for j in range(1, len(node.input)):
            value = numpy_helper.to_array(inits[node.input[j]])
            originals[(layer.merged_node, j)] = value
            inits[node.input[j]].CopyFrom(numpy_helper.from_array(
                rng.randn(*value.shape).astype(value.dtype) * 0.3, node.input[j]))
    x = F.calib(a, 1500, seed=0)
    data = calibration_from_arrays(x, input_specs(a))
    calib, held = data.split(300)
    summary = refit(plan, surgery, calib, held, [a, a], batch_size=128, device="cpu")
    assert len(summary["layers"]) == len(layers)
    nodes = {n.name: n for n in surgery.model.graph.node}
    inits = {i.name: i for i in surgery.model.graph.initializer}
    # a weight on an input that (almost) never varies -- a flattened position where a ReLU is nearly always 0, a
    # dead unit -- is barely identifiable: convolutions (whose patches see every channel everywhere) must give the
    # weights back, every layer the function
    identifiable = {lay.merged_node for lay, rec in zip(sorted(layers, key=lambda x: (x.level, x.key)),
                                                        summary["layers"]) if not rec["singular"] and lay.op == "Conv"}
    assert len(identifiable) >= (2 if arch != "mlp" else 0)
    for (name, j), want in originals.items():
        if j != 1 or name not in identifiable:
            continue  # biases: the refit may move a chain's additive constants into one place (checked below)
        got = numpy_helper.to_array(inits[nodes[name].input[j]])
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3, err_msg=f"{arch}: {name} input {j}")
    test = F.calib(a, 64, seed=987)
    want = F.run(a, test)["logits"]
    out = F.run(surgery.model, test)
    _assert_close(out["a/logits"], want, 1e-3, f"{arch} recovered a/logits")
    _assert_close(out["b/logits"], want, 1e-3, f"{arch} recovered b/logits")


def _mlp_with_dead_units(dead=4):
    a, pa = F.mlp(seed=2)
    w = dict(pa["w"])
    first = [k for k in w if k.endswith("weight")][0]
    bias = first.replace("weight", "bias")
    w[first] = w[first].copy()
    w[bias] = w[bias].copy()
    out_axis = 1 if w[first].shape[1] == w[bias].shape[0] else 0
    index = [slice(None)] * 2
    index[out_axis] = slice(0, dead)
    w[first][tuple(index)] = 0.0
    w[bias][:dead] = -1.0  # ReLU(-1) = 0 for every input: dead units
    return F.build(dict(pa, w=w))


def test_rank_deficient_inputs_warn_and_stay_finite(caplog):
    a = _mlp_with_dead_units()
    b, _ = F.permuted_twin(F.mlp(seed=2)[1], np.random.RandomState(3))
    for n in (300, 12):  # dead channels; then also fewer samples than regressors
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="onnxzip"):
            result = onnxzip.merge(a, b, F.calib(a, n, seed=0), method="zip", refit="ls")
        assert any("rank-deficient" in r.getMessage() for r in caplog.records), f"n={n}: no warning"
        assert any(layer["singular"] for layer in result.card["refit"]["layers"])
        for init in result.model.graph.initializer:
            value = numpy_helper.to_array(init)
            if value.dtype.kind == "f":
                assert np.isfinite(value).all(), f"n={n}: {init.name} is not finite"
        out = F.run(result.model, F.calib(a, 32, seed=5))
        assert all(np.isfinite(v).all() for v in out.values())


def test_residual_joins_fit_the_sum(twins):
    """In the ResNet fixture every block's last conv is fitted through its residual Add; where a shortcut conv
    meets it, one of the two fits its own output first and the other the sum."""
    a, b = twins["resnet"]
    plan, surgery = _plan_and_surgery(a, b, "average")
    layers = refit_layers(plan, surgery)
    adds = [i for i, n in enumerate(plan.a.model.graph.node) if n.op_type == "Add" and i in plan.trunk
            and not any(x in plan.a.initializers for x in n.input)]
    residual = [lay for lay in layers if lay.partner]
    assert residual and len(residual) == len(adds), (len(residual), len(adds))
    by_name = {lay.merged_node: lay for lay in layers}
    for lay in residual:
        partner_producer = next(n for n in surgery.model.graph.node if lay.partner in n.output)
        other = by_name.get(partner_producer.name)
        if other is not None:  # two refit layers added together: the other one fits its own output, first
            assert other.partner is None and other.level < lay.level


def test_refit_none_is_the_papers_pipeline(twins):
    a, b = twins["vgg"]
    x = F.calib(a, 256, seed=0)
    plain = onnxzip.merge(a, b, x, method="zip", refit="none")
    assert plain.card["refit"] == {"applied": False, "method": "none"}
    assert plain.card["repair"]["applied"]
    assert not any("/refit/" in i.name for i in plain.model.graph.initializer)
    fitted = onnxzip.merge(a, b, x, method="zip", refit="ls")
    assert not fitted.card["repair"]["applied"] and fitted.card["repair"]["superseded_by_refit"]
    assert any("/refit/" in i.name for i in fitted.model.graph.initializer)


def test_ensemble_is_untouched(twins):
    a, b = twins["mlp"]
    result = onnxzip.merge(a, b, F.calib(a, 128, seed=0), method="ensemble", refit="ls")
    assert not result.card["refit"]["applied"]
    x = F.calib(a, 16, seed=1)
    out = F.run(result.model, x)
    np.testing.assert_array_equal(out["a/logits"], F.run(a, x)["logits"])
    np.testing.assert_array_equal(out["b/logits"], F.run(b, x)["logits"])


@pytest.mark.parametrize("value", ["LS", "ridge", None, 1])
def test_bad_refit_option_is_a_usage_error(twins, value):
    a, b = twins["mlp"]
    with pytest.raises(UsageError, match="--refit"):
        onnxzip.merge(a, b, F.calib(a, 16, seed=0), refit=value)


def test_refit_without_held_back_samples_uses_the_default_ridge(twins):
    a, b = twins["mlp"]
    result = onnxzip.merge(a, b, F.calib(a, 4, seed=0), method="zip", beta=0.0, refit="ls", verify=False)
    refit_card = result.card["refit"]
    assert refit_card["applied"]
    assert refit_card["held_back_samples"] == 0 and len(refit_card["lambda_grid"]) == 1


def test_card_records_each_fit(twins):
    a, b = twins["resnet"]
    result = onnxzip.merge(a, b, F.calib(a, 200, seed=0), method="zip")
    card = result.card["refit"]
    assert card["passes"] >= 1 and card["levels"] > 1
    # the calibration pass kept every target: the sources ran once
    assert card["targets_kept_by_calibration"] == len(card["layers"])
    assert "refit" in result.card["seconds"]
    for layer in card["layers"]:
        assert {"layer", "rows", "regressors", "lambda", "r2_calibration", "r2_held_back"} <= set(layer)
    assert onnx.checker.check_model(result.model) is None


def test_targets_kept_by_calibration_equal_a_pass_of_their_own(twins, monkeypatch):
    """The refit's targets from the rows the calibration pass kept in memory, in a temporary file (beyond the memory
    budget for them), or (beyond that too) from a source pass of the refit's own: the same rows, the same fit."""
    import onnxzip.calibration as C
    import onnxzip.refit as R

    written = []
    reader = C.RowSpill.reader

    def counted(self):
        written.append(self.nbytes)
        return reader(self)

    monkeypatch.setattr(C.RowSpill, "reader", counted)
    a, b = twins["resnet"]
    data = F.calib(a, 120, seed=1)
    kept = onnxzip.merge(a, b, data, method="zip")
    assert written == [0]  # every row in memory: no file
    monkeypatch.setattr(R, "ROW_CACHE_BYTES", 0)
    spilled = onnxzip.merge(a, b, data, method="zip")
    assert written[1] > 0
    monkeypatch.setattr(R, "ROW_SPILL_BYTES", 0)
    own = onnxzip.merge(a, b, data, method="zip")
    assert written[2] == 0
    layers = len(kept.card["refit"]["layers"])
    assert kept.card["refit"]["targets_kept_by_calibration"] == layers > 0
    assert spilled.card["refit"]["targets_kept_by_calibration"] == layers
    assert spilled.card["refit"]["passes"] == kept.card["refit"]["passes"]
    assert own.card["refit"]["targets_kept_by_calibration"] == 0
    assert own.card["refit"]["passes"] == kept.card["refit"]["passes"] + 4  # each source over both parts
    x = F.calib(a, 16, seed=2)
    outs = [F.run(r.model, x) for r in (kept, spilled, own)]
    for name in outs[0]:
        np.testing.assert_array_equal(outs[1][name], outs[0][name])  # the same float32 rows, from the file
        np.testing.assert_allclose(outs[0][name], outs[2][name], rtol=1e-4, atol=1e-4 * np.abs(outs[2][name]).max())


@pytest.mark.parametrize("d", [1, 255, 256, 600])
def test_the_gram_matrix_is_symmetrised_in_place_from_its_upper_triangle(d):
    """The refit's sums hold XᵀX's upper triangle; the solve fills the lower one in place, in bands of 256 rows."""
    from onnxzip.refit import _symmetrized

    upper = np.random.RandomState(d).randn(d, d)
    want = np.triu(upper) + np.triu(upper, 1).T
    got = _symmetrized(upper)
    assert got is upper
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bias", [True, False])
def test_products_are_the_regression_sums(bias):
    """XᵀX (upper triangle, with the bias column of ones), XᵀT, Σt² and Σt of float32 regressors with a large
    mean, in float64, against numpy's."""
    from onnxzip.refit import _add_products

    rng = np.random.RandomState(3)
    x = (rng.randn(500, 7) * 0.1 + 40.0).astype(np.float32)
    t = rng.randn(500, 3) + 5.0
    d = 8 if bias else 7
    gram, cross = np.zeros((d, d)), np.zeros((d, 3))
    t_sq, t_sum = _add_products(gram, cross, x, t, bias)  # added to zeros
    xx = np.hstack([x.astype(np.float64), np.ones((500, 1))]) if bias else x.astype(np.float64)
    np.testing.assert_allclose(np.triu(gram), np.triu(xx.T @ xx), rtol=1e-12)
    np.testing.assert_allclose(cross, xx.T @ t, rtol=1e-12)
    np.testing.assert_allclose(t_sq, np.sum(t * t), rtol=1e-12)
    np.testing.assert_allclose(t_sum, t.sum(axis=0), rtol=1e-12)


def test_products_taken_in_blocks_are_the_products_of_every_batch(monkeypatch):
    """A level's rows are held and multiplied in blocks after its pass (refit.ROW_BUFFER_BYTES, PRODUCT_BYTES):
    taken a batch at a time, or a few rows at a time, the fit is the same (two unrelated models: the layers after
    the stem do not fit exactly, so their ridge strengths are chosen by real differences)."""
    import onnxzip.refit as R

    a, _ = F.ARCHS["resnet"](seed=11)
    b, _ = F.ARCHS["resnet"](seed=12)
    data = F.calib(a, 120, seed=1)
    blocks = onnxzip.merge(a, b, data, method="zip")
    monkeypatch.setattr(R, "ROW_BUFFER_BYTES", 0)  # every batch's products at once, as it comes
    monkeypatch.setattr(R, "PRODUCT_BYTES", 4096)  # and those a few rows at a time
    batches = onnxzip.merge(a, b, data, method="zip")
    for x, y in zip(blocks.card["refit"]["layers"], batches.card["refit"]["layers"]):
        assert x["rows"] == y["rows"], (x, y)
        assert abs(x["r2_held_back"] - y["r2_held_back"]) < 1e-9, (x, y)
        if x["r2_held_back"] < 1 - 1e-6:  # (the stem's target is linear in its patches: every λ fits it exactly)
            assert x["lambda"] == y["lambda"], (x, y)
    x = F.calib(a, 16, seed=2)
    outs = [F.run(r.model, x) for r in (blocks, batches)]
    for name in outs[0]:
        np.testing.assert_allclose(outs[0][name], outs[1][name], rtol=1e-5, atol=1e-5 * np.abs(outs[1][name]).max())


def _bottleneck_model(seed):
    """stem Conv 3->8, Relu, two bottleneck blocks (1x1 8->4, 3x3 4->4, 1x1 4->8, + the block's input, Relu),
    GlobalAveragePool, Gemm to 5 classes: a residual join's partner is fetched two levels before the join."""
    rng = np.random.RandomState(seed)
    inits, nodes = [], []

    def w(name, *shape):
        fan_in = int(np.prod(shape[1:]))
        inits.append(numpy_helper.from_array((rng.randn(*shape) * np.sqrt(2.0 / fan_in)).astype(np.float32),
                                             name + "_w"))
        inits.append(numpy_helper.from_array((rng.rand(shape[0]) * 0.1).astype(np.float32), name + "_b"))
        return [name + "_w", name + "_b"]

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    x = node("Relu", [node("Conv", ["input", *w("stem", 8, 3, 3, 3)], "stem", pads=[1, 1, 1, 1])], "stem_relu")
    for b in ("b1", "b2"):
        h = node("Relu", [node("Conv", [x, *w(f"{b}c1", 4, 8, 1, 1)], f"{b}c1")], f"{b}r1")
        h = node("Relu", [node("Conv", [h, *w(f"{b}c2", 4, 4, 3, 3)], f"{b}c2", pads=[1, 1, 1, 1])], f"{b}r2")
        h = node("Conv", [h, *w(f"{b}c3", 8, 4, 1, 1)], f"{b}c3")
        x = node("Relu", [node("Add", [h, x], f"{b}_add")], f"{b}r3")
    x = node("Flatten", [node("GlobalAveragePool", [x], "gap")], "flatten", axis=1)
    fc = w("fc", 5, 8)
    nodes.append(helper.make_node("Gemm", [x, *fc], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "bottleneck", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                  [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def _count_pruned_nodes(monkeypatch) -> list:
    """The node count of every pruned graph the refit's passes run (filled as they are made)."""
    import onnxzip.refit as R

    ran = []
    prune = R._prune

    def counting(model, outputs, types, known=None):
        pruned = prune(model, outputs, types, known)
        ran.append(len(pruned.graph.node))
        return pruned

    monkeypatch.setattr(R, "_prune", counting)
    return ran


def test_refit_passes_run_each_node_about_once(monkeypatch):
    """The refit's level passes start from tensors earlier levels fetched, residual partners included: together
    they run each node of the merged model about once, not the whole network before every residual join again
    (a bottleneck block's join reads its input, fetched two levels before)."""
    ran = _count_pruned_nodes(monkeypatch)
    a, b = _bottleneck_model(1), _bottleneck_model(2)
    data = np.random.RandomState(0).randn(120, 3, 8, 8).astype(np.float32)
    result = onnxzip.merge(a, b, data, method="zip", verify=False)
    refit_card = result.card["refit"]
    assert refit_card["levels"] >= 7 and sum(x["residual"] for x in refit_card["layers"]) == 2
    nodes = len(result.model.graph.node)
    assert sum(ran) <= 1.2 * nodes, f"the refit's passes ran {sum(ran)} nodes in all for a model of {nodes}: {ran}"


@pytest.mark.parametrize("name", ["vit_mha_ts", "vit_relative_ts", "vit_separate_dynamo"])
def test_refit_passes_of_a_transformer_run_each_node_about_once(monkeypatch, name):
    """A transformer block's second residual join reads the block's input, which no level fetches (the attention's
    output projection has no residual partner of its own): the passes keep what a node not yet run reads, so the
    block's input is not computed again from the graph inputs for every block (that ran 351 nodes for 123)."""
    import os

    ran = _count_pruned_nodes(monkeypatch)
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", name)
    a, b = (onnx.load(os.path.join(folder, f"{m}.onnx")) for m in "ab")
    result = onnxzip.merge(a, b, F.calib(a, 64, seed=0), method="zip", verify=False)
    assert result.card["refit"]["levels"] >= 8
    nodes = len(result.model.graph.node)
    assert sum(ran) <= 1.2 * nodes, f"the refit's passes ran {sum(ran)} nodes in all for a model of {nodes}: {ran}"


@pytest.mark.parametrize("value", ["BN", "reset", None])
def test_bad_repair_targets_option_is_a_usage_error(twins, value):
    a, b = twins["mlp"]
    with pytest.raises(UsageError, match="--repair-targets"):
        onnxzip.merge(a, b, F.calib(a, 16, seed=0), refit="none", repair_targets=value)


def test_batchnorm_repair_targets_use_the_recorded_batchnorms():
    """BN-kept exports: the paper's BN reset targets are used for every repaired layer with a BatchNorm (and none
    where the BatchNorm was folded away by the exporter, which leaves nothing to read them from)."""
    import os
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "vgg-s0")
    x = np.load(os.path.join(root, "..", "data", "calib.npy"))[:120]
    kept = onnxzip.merge(os.path.join(root, "variants", "bn_kept", "a.onnx"),
                         os.path.join(root, "variants", "bn_kept", "b.onnx"), x, refit="none",
                         repair_targets="batchnorm", verify=False)
    folded = onnxzip.merge(os.path.join(root, "a.onnx"), os.path.join(root, "b.onnx"), x, refit="none",
                           repair_targets="batchnorm", verify=False)
    assert kept.card["repair"]["batchnorm_targets"] > 0
    assert folded.card["repair"]["batchnorm_targets"] == 0


def test_spill_room_is_half_the_free_space_up_to_the_bound_and_none_where_the_directory_cannot_be_read(tmp_path,
                                                                                                      monkeypatch):
    """Target rows beyond the memory budget go to a temporary file only where there is room: ROW_SPILL_BYTES, or
    half the free space; a directory that cannot be read gives no room (the refit then runs the sources again)."""
    import shutil

    import onnxzip.refit as R

    usage = shutil.disk_usage
    free = [10 << 30]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(path)._replace(free=free[0]))
    assert R.spill_room(str(tmp_path)) == 5 << 30  # half the free space
    free[0] = 1 << 40
    assert R.spill_room(str(tmp_path)) == R.ROW_SPILL_BYTES  # the bound
    assert R.spill_room(str(tmp_path / "missing" / "dir")) == 0  # disk_usage raises FileNotFoundError


def test_rows_per_sample_count_the_tokens_wherever_the_batch_sits():
    """nn.MultiheadAttention computes on (T, N, D) and (T·N, D): graph analysis's shapes (batch 1) hold the tokens on
    the first axis, which must count as rows of a sample, not as the batch (that estimated a ViT-B/16 pair's target
    rows 197× too small: 16 GB in memory for a budget of 1 GiB)."""
    from onnxzip.graph import shape_batch
    from onnxzip.refit import _positions

    assert _positions((197, 1, 2304), 2) == 197
    assert _positions((197, 768), 1) == 197
    assert _positions((1, 197, 3072), 2) == 197
    assert _positions((1, 768, 14, 14), 1) == 196
    assert _positions((1, 10), 1) == 1
    assert _positions((8, 64, 4, 4), 1, batch=8) == 16  # a model with a fixed batch of 8
    dynamic, _ = F.mlp(seed=0)
    assert shape_batch(analyse(dynamic)) == 1
    fixed = onnx.ModelProto()
    fixed.CopyFrom(dynamic)
    dims = fixed.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = 8
    assert shape_batch(analyse(fixed)) == 8
