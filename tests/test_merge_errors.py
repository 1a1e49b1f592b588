"""`onnxzip.merge` on bad input: the right error class from `onnxzip.errors`, a message that names what is at
fault, and nothing left behind at the output path (no partial file, no temp file). Also: an operator onnxzip does
not handle (LRN, which mixes neighbouring channels) stops the trunk, or raises with `strict=True`."""
import os

import numpy as np
import onnx
import pytest

import onnxzip
from onnxzip.errors import (CalibrationDataError, MismatchError, ModelError, OnnxzipError, OutputError,
                            UnsupportedModelError)

try:
    from tests import fixtures as F
except ImportError:  # pytest put tests/ itself on sys.path
    import fixtures as F



def listing(*dirs):
    return {str(d): sorted(os.listdir(d)) for d in dirs}


def expect_error(cls, dirs, a, b, data, output=None, **kw):
    """Run merge, expect `cls`, and check no file appeared (or vanished) anywhere we look."""
    models, out, tmp = dirs
    output = out / "merged.onnx" if output is None else output
    before = listing(models, out, tmp, output.parent)
    with pytest.raises(cls) as info:
        onnxzip.merge(a, b, data, output=output, progress=False, **kw)
    assert listing(models, out, tmp, output.parent) == before, "merge left files behind after an error"
    msg = str(info.value)
    assert msg.strip(), "error without a message"
    return msg


@pytest.fixture(scope="module")
def vgg_pair():
    (a, _), (b, _) = F.random_pair("vgg", seed=2)
    return a, b


# ---------------------------------------------------------------------------------------------------------------
# Mismatched models
# ---------------------------------------------------------------------------------------------------------------

def test_mlp_vs_vgg_is_a_mismatch(dirs):
    a, _ = F.mlp(0)
    b, _ = F.vgg(1)
    msg = expect_error(MismatchError, dirs, a, b, F.calib(a, 64))
    assert msg


def test_different_conv_width_names_the_node(dirs):
    a, _ = F.vgg(0, widths=(8, 8, 8))
    b, _ = F.vgg(1, widths=(8, 12, 8))
    msg = expect_error(MismatchError, dirs, a, b, F.calib(a, 64))
    assert "conv2" in msg, f"message should name the node that differs (conv2): {msg!r}"


# ---------------------------------------------------------------------------------------------------------------
# Calibration data
# ---------------------------------------------------------------------------------------------------------------

def test_wrong_channel_count(dirs):
    a, _ = F.mlp(0)
    b, _ = F.mlp(1)
    data = np.random.RandomState(0).randn(64, 3, 8, 8).astype(np.float32)
    msg = expect_error(CalibrationDataError, dirs, a, b, data)
    assert "input" in msg, f"message should name the input: {msg!r}"


def test_wrong_rank(dirs):
    a, _ = F.mlp(0)
    b, _ = F.mlp(1)
    data = np.random.RandomState(0).randn(64, 64).astype(np.float32)
    msg = expect_error(CalibrationDataError, dirs, a, b, data)
    assert "input" in msg, f"message should name the input: {msg!r}"


def test_wrong_shape_from_npy_file(dirs):
    models, _, _ = dirs
    a, _ = F.vgg(0)
    b, _ = F.vgg(1)
    path = models / "cal.npy"
    np.save(path, np.random.RandomState(0).randn(16, 3, 8, 8).astype(np.float32))
    expect_error(CalibrationDataError, dirs, a, b, path)


def test_nan_in_calibration(dirs):
    a, _ = F.mlp(0)
    b, _ = F.mlp(1)
    data = F.calib(a, 64)
    data[5, 0, 3, 3] = np.nan
    msg = expect_error(CalibrationDataError, dirs, a, b, data)
    assert "nan" in msg.lower() or "finite" in msg.lower(), f"message should say the data is not finite: {msg!r}"


# ---------------------------------------------------------------------------------------------------------------
# An operator onnxzip does not handle: LRN after the first conv of the vgg
# ---------------------------------------------------------------------------------------------------------------

def test_lrn_with_strict_names_node_and_op(dirs):
    a, pa = F.vgg(0, lrn=True)
    b, _ = F.permuted_twin(pa, 1)
    msg = expect_error(UnsupportedModelError, dirs, a, b, F.calib(a, 256), strict=True)
    assert "LRN" in msg and "lrn1" in msg, f"message should name the node (lrn1) and its op (LRN): {msg!r}"


def test_lrn_without_strict_is_left_unmerged_and_exact(dirs):
    """Only conv1 is in the trunk; LRN and everything after it runs per model. B is A with every hidden space
    permuted (conv1's too, so B is another function: LRN mixes neighbouring channels), and the merged heads must
    still compute A and B exactly, which needs the unmerge into the branches to be right."""
    a, pa = F.vgg(0, lrn=True)
    b, _ = F.permuted_twin(pa, 1)
    _, out, _ = dirs
    path = out / "merged.onnx"
    merged = onnxzip.merge(a, b, F.calib(a, 256), output=path, method="zip", beta=0.0, progress=False).model
    onnx.checker.check_model(str(path), full_check=True)
    ops = [n.op_type for n in merged.graph.node]
    assert ops.count("LRN") == 2, f"LRN should be computed once per model: {ops}"
    assert ops.count("Conv") == 5, f"conv1 should be shared and conv2/conv3 per model: {ops}"
    x = F.calib(a, 64, seed=987)
    got = F.run(merged, x)
    for name, model in [("a/logits", a), ("b/logits", b)]:
        want = F.run(model, x)["logits"]
        err = float(np.abs(got[name] - want).max())
        assert err < 1e-4, f"{name}: max abs error {err:.3g}"


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------

def test_corrupt_model_file_is_named(dirs, vgg_pair):
    models, _, _ = dirs
    a, _ = vgg_pair
    good, bad = models / "good.onnx", models / "broken_b.onnx"
    onnx.save(a, str(good))
    bad.write_bytes(np.random.RandomState(0).bytes(4096))
    msg = expect_error(ModelError, dirs, good, bad, F.calib(a, 64))
    assert "broken_b.onnx" in msg, f"message should name the file: {msg!r}"


def test_missing_model_file_is_named(dirs, vgg_pair):
    models, _, _ = dirs
    a, _ = vgg_pair
    msg = expect_error(ModelError, dirs, a, models / "nowhere.onnx", F.calib(a, 64))
    assert "nowhere.onnx" in msg, f"message should name the file: {msg!r}"


def test_existing_output_without_force(dirs, vgg_pair):
    _, out, _ = dirs
    a, b = vgg_pair
    path = out / "merged.onnx"
    path.write_bytes(b"precious")
    stat = path.stat()
    msg = expect_error(OutputError, dirs, a, b, F.calib(a, 64), output=path)
    assert path.read_bytes() == b"precious" and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert "merged.onnx" in msg and "force" in msg.lower(), f"message should name the file and --force: {msg!r}"
    # and with force the file is replaced by a valid model
    onnxzip.merge(a, b, F.calib(a, 64), output=path, force=True, progress=False)
    onnx.checker.check_model(str(path), full_check=True)
    assert sorted(os.listdir(out)) == ["merged.onnx", "merged.onnx.json"]  # the model and its merge card


def test_errors_share_one_family():
    for cls in (CalibrationDataError, MismatchError, ModelError, OutputError, UnsupportedModelError):
        assert issubclass(cls, OnnxzipError)


# ---------------------------------------------------------------------------------------------------------------
# Zipping nothing is said, never silent (issue 13): asked to zip, the merge found nothing to zip
# ---------------------------------------------------------------------------------------------------------------

def nothing_to_zip(kind, seed):
    """`head_only`: Flatten -> Gemm, the one weighted layer is the task head (as when the pooler of a transformer
    export is taken for the head). `input_mean`: Sub of a per-channel input mean that differs between the two
    models, then Flatten -> Gemm -> Relu -> Gemm: the first layer reads a tensor computed differently per model."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.RandomState(seed)
    w = {"fc.w": rng.randn(5, 48).astype(np.float32) / 7, "fc.b": np.zeros(5, np.float32)}
    nodes = [helper.make_node("Flatten", ["input"], ["flat"])]
    if kind == "input_mean":
        w.update({"mean": rng.rand(3, 1, 1).astype(np.float32), "fc0.w": rng.randn(48, 16).astype(np.float32) / 7,
                  "fc0.b": np.zeros(16, np.float32), "fc.w": rng.randn(5, 16).astype(np.float32) / 4})
        nodes = [helper.make_node("Sub", ["input", "mean"], ["centred"], name="input_mean"),
                 helper.make_node("Flatten", ["centred"], ["flat0"]),
                 helper.make_node("Gemm", ["flat0", "fc0.w", "fc0.b"], ["h"], name="fc0"),
                 helper.make_node("Relu", ["h"], ["flat"])]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("kind,named", [("head_only", "'fc' (Gemm)"), ("input_mean", "'input_mean' (Sub)")])
def test_zipping_nothing_is_warned_and_named_in_the_card(kind, named, caplog):
    a, b = nothing_to_zip(kind, 0), nothing_to_zip(kind, 1)
    data = np.random.RandomState(2).randn(64, 3, 4, 4).astype(np.float32)
    with caplog.at_level("WARNING", logger="onnxzip"):
        res = onnxzip.merge(a, b, data, progress=False)
    warned = [r.getMessage() for r in caplog.records if "NOTHING IS ZIPPED" in r.getMessage()]
    assert len(warned) == 1 and named in warned[0], [r.getMessage() for r in caplog.records]
    assert res.card["zipped_nothing"] is True and named in res.card["zipped_nothing_reason"]
    assert res.card["spaces"] == [] and res.card["trunk"]["weighted_layers_zipped"] == 0
    assert any("NOTHING IS ZIPPED" in line for line in res.summary_lines())
    x = np.random.RandomState(3).randn(16, 3, 4, 4).astype(np.float32)
    got = F.run(res.model, x)  # the ensemble it says it is
    np.testing.assert_allclose(got["a/logits"], F.run(a, x)["logits"], atol=1e-5)
    np.testing.assert_allclose(got["b/logits"], F.run(b, x)["logits"], atol=1e-5)


@pytest.mark.parametrize("kind", ["head_only", "input_mean"])
def test_zipping_nothing_with_strict_is_an_error(kind, dirs):
    a, b = nothing_to_zip(kind, 0), nothing_to_zip(kind, 1)
    data = np.random.RandomState(2).randn(64, 3, 4, 4).astype(np.float32)
    msg = expect_error(UnsupportedModelError, dirs, a, b, data, strict=True)
    assert ("nothing can be zipped" if kind == "head_only" else "input_mean") in msg, msg
    assert UnsupportedModelError.exit_code == 6


def test_zipping_nothing_on_purpose_is_not_warned(caplog):
    a, b = nothing_to_zip("input_mean", 0), nothing_to_zip("input_mean", 0)  # the same model: fc0 is zipped
    data = np.random.RandomState(2).randn(64, 3, 4, 4).astype(np.float32)
    assert onnxzip.merge(a, b, data, progress=False).card["zipped_nothing"] is False
    with caplog.at_level("WARNING", logger="onnxzip"):
        for kw in ({"method": "ensemble"}, {"stop_at": "input"}):
            card = onnxzip.merge(a, b, data, progress=False, strict=True, **kw).card
            assert card["zipped_nothing"] is True and "side by side" in card["zipped_nothing_reason"]
    assert not [r for r in caplog.records if "NOTHING" in r.getMessage()]


# ---------------------------------------------------------------------------------------------------------------
# onnxruntime failing during calibration: blame the model, the data or onnxzip, whichever is at fault
# ---------------------------------------------------------------------------------------------------------------

def _fixed_batch(model, batch):
    """`model` (the MLP fixture) with its Flatten written as a Reshape to a fixed batch, as a tracer writes it."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    node = next(n for n in model.graph.node if n.op_type == "Flatten")
    shape = onnx.numpy_helper.from_array(np.array([batch, 64], np.int64), "fixed_shape")
    model.graph.initializer.append(shape)
    node.op_type = "Reshape"
    del node.attribute[:]
    node.input.append("fixed_shape")
    return model


def test_a_model_that_fails_on_the_data_by_itself_is_blamed_with_the_data(dirs):
    models, _, _ = dirs
    (a, _), (b, _) = F.random_pair("mlp", seed=5)
    a_path, b_path = models / "fixed_a.onnx", models / "fixed_b.onnx"
    onnx.save(_fixed_batch(a, 2), a_path)
    onnx.save(_fixed_batch(b, 2), b_path)
    data = models / "fixed_calib.npy"
    np.save(data, F.calib(a, n=40))
    msg = expect_error(CalibrationDataError, dirs, str(a_path), str(b_path), str(data), batch_size=8)
    assert str(a_path) in msg and "first batch of 8" in msg, msg
    # at the batch the model was written for, the same models merge
    onnxzip.merge(str(a_path), str(b_path), str(data), output=dirs[1] / "fixed.onnx", batch_size=2,
                  progress=False)


def _with_custom_op(model):
    """`model` with its logits passed through an operator of a custom domain: the ONNX checker accepts it (it
    knows no schema to check), onnxruntime has no kernel for it."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    out = model.graph.output[0].name
    for node in model.graph.node:
        for k, name in enumerate(node.output):
            if name == out:
                node.output[k] = "before_custom"
    model.graph.node.append(onnx.helper.make_node("Scale", ["before_custom"], [out], domain="com.example"))
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    return model


def test_a_model_onnxruntime_cannot_load_is_named(dirs):
    models, _, _ = dirs
    (a, _), (b, _) = F.random_pair("mlp", seed=7)
    a_path, b_path = models / "custom_a.onnx", models / "custom_b.onnx"
    onnx.save(_with_custom_op(a), a_path)
    onnx.save(_with_custom_op(b), b_path)
    data = models / "custom_calib.npy"
    np.save(data, F.calib(a, n=40))
    msg = expect_error(ModelError, dirs, str(a_path), str(b_path), str(data))
    assert msg.startswith(f"{a_path}: onnxruntime cannot load the model") and "com.example" in msg, msg


def test_a_failure_of_onnxzips_own_copy_of_the_models_is_not_blamed_on_the_data(dirs, monkeypatch):
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    import onnxzip.pipeline as pipeline

    def fail(*args, **kwargs):
        raise state.Fail("[ONNXRuntimeError] : 1 : FAIL : a kernel onnxzip's copy does not like")

    monkeypatch.setattr(pipeline, "run_sources", fail)
    models, _, _ = dirs
    (a, _), (b, _) = F.random_pair("mlp", seed=6)
    onnx.save(a, models / "own_a.onnx")
    onnx.save(b, models / "own_b.onnx")
    data = models / "own_calib.npy"
    np.save(data, F.calib(a, n=40))
    msg = expect_error(OnnxzipError, dirs, str(models / "own_a.onnx"), str(models / "own_b.onnx"), str(data))
    assert "instrumented copy" in msg and "not a fault of the models or the data" in msg, msg
    assert "does not like" in msg
