"""Tests of onnxzip.calibration: data validation, sessions, and streamed feature statistics."""

from __future__ import annotations

import logging
import sys
import zlib

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from onnxzip.calibration import (
    CalibrationData,
    FeatureRequest,
    InputSpec,
    RowRequest,
    StatsSampling,
    as_rows,
    collect_stats,
    expose_tensors,
    input_specs,
    load_calibration,
    make_session,
    provider_name,
    run_model,
    run_sources,
    select_rows,
    subset_of_rows,
)
from onnxzip.errors import CalibrationDataError, MismatchError, ModelError, UsageError, VerificationError

C, H, W, CLASSES = 4, 5, 5, 6


def _model(seed: int, batch="N") -> onnx.ModelProto:
    """x[N,3,5,5] -> Conv -> c -> Relu -> r; r -> GlobalAveragePool -> g -> Flatten -> gf -> Gemm -> y;
    r -> Flatten -> f (C*H*W, channel-major) -> Gemm -> z."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(size=(C, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(size=(C,)).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(size=(CLASSES, C)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(size=(CLASSES,)).astype(np.float32), "fc_b"),
        numpy_helper.from_array(rng.normal(size=(2, C * H * W)).astype(np.float32), "fc2_w"),
    ]
    nodes = [
        oh.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        oh.make_node("Relu", ["c"], ["r"]),
        oh.make_node("GlobalAveragePool", ["r"], ["g"]),
        oh.make_node("Flatten", ["g"], ["gf"]),
        oh.make_node("Gemm", ["gf", "fc_w", "fc_b"], ["y"], transB=1),
        oh.make_node("Flatten", ["r"], ["f"]),
        oh.make_node("Gemm", ["f", "fc2_w"], ["z"], transB=1),
    ]
    graph = oh.make_graph(
        nodes,
        "tiny",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, H, W])],
        [
            oh.make_tensor_value_info("y", TensorProto.FLOAT, [batch, CLASSES]),
            oh.make_tensor_value_info("z", TensorProto.FLOAT, [batch, 2]),
        ],
        inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _data(tmp_path, n=23, seed=0, dtype=np.float32, name="x.npy") -> CalibrationData:
    x = np.random.default_rng(seed).normal(size=(n, 3, H, W)).astype(dtype)
    path = tmp_path / name
    np.save(path, x)
    return load_calibration(path, input_specs(_model(0)))


def _run(model, x, names):
    session = ort.InferenceSession(
        expose_tensors(model, names).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return dict(zip(names, session.run(names, {"x": x})))


def _moments(features):
    return features.mean(axis=0), np.cov(features, rowvar=False, bias=True)


def _assert_close(a, b, rtol):
    scale = np.abs(b).max()
    assert np.abs(a - b).max() <= rtol * scale, (np.abs(a - b).max(), scale)


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------


def test_stats_match_numpy_two_models_with_expand(tmp_path):
    models = [_model(1), _model(2)]
    data = _data(tmp_path)
    requests = [
        FeatureRequest("conv", ["r", "r"], axis=1),
        FeatureRequest("flat", ["f", "f"], axis=1, expand=H * W),
        FeatureRequest("pooled", ["gf", "gf"], axis=-1),
        FeatureRequest("head", ["y", "y"], axis=1, full=False),
    ]
    stats = collect_stats(models, requests, data, batch_size=5, device="cpu")
    x = np.load(data.path)
    outs = [_run(m, x, ["r", "f", "gf", "y"]) for m in models]

    # conv features by hand: every (image, row, column) is a sample; model 0's channels, then model 1's.
    conv = np.concatenate([o["r"].transpose(0, 2, 3, 1).reshape(-1, C) for o in outs], axis=1)
    mean, cov = _moments(conv)
    assert stats["conv"].count == len(x) * H * W
    assert stats["conv"].mean.shape == (2 * C,)
    _assert_close(stats["conv"].mean, mean, 1e-6)
    _assert_close(stats["conv"].covariance(), cov, 1e-6)

    # flatten (channel-major C x positions): read as (C, H*W), positions are samples
    flat = np.concatenate([o["f"].reshape(len(x), C, H * W).transpose(0, 2, 1).reshape(-1, C) for o in outs], axis=1)
    mean_f, cov_f = _moments(flat)
    _assert_close(stats["flat"].mean, mean_f, 1e-6)
    _assert_close(stats["flat"].covariance(), cov_f, 1e-6)
    # Flatten only reorders: the same samples as the conv map, so the same statistics.
    _assert_close(stats["flat"].covariance(), stats["conv"].covariance(), 1e-12)

    pooled = np.concatenate([o["gf"] for o in outs], axis=1)
    mean_p, cov_p = _moments(pooled)
    assert stats["pooled"].count == len(x)
    _assert_close(stats["pooled"].mean, mean_p, 1e-6)
    _assert_close(stats["pooled"].covariance(), cov_p, 1e-6)

    head = np.concatenate([o["y"] for o in outs], axis=1)
    assert not stats["head"].full
    _assert_close(stats["head"].variance(), head.var(axis=0), 1e-6)


def test_stats_invariant_to_batch_size(tmp_path):
    models = [_model(3), _model(4)]
    data = _data(tmp_path, n=17)
    requests = [FeatureRequest("conv", ["r", "r"], axis=1), FeatureRequest("flat", ["f", "f"], axis=1, expand=H * W)]
    runs = [collect_stats(models, requests, data, batch_size=b, device="cpu") for b in (1, 7, 17)]
    for other in runs[1:]:
        for key in ("conv", "flat"):
            assert other[key].count == runs[0][key].count
            _assert_close(other[key].mean, runs[0][key].mean, 1e-9)
            _assert_close(other[key].covariance(), runs[0][key].covariance(), 1e-9)


def test_stats_subsample_is_seeded_and_close(tmp_path):
    """A subsample of the rows: the same seed draws the same rows, another seed others; the statistics stay close
    to those of every row."""
    models = [_model(3), _model(4)]
    data = _data(tmp_path, n=400)
    requests = [FeatureRequest("conv", ["r", "r"], axis=1)]
    every = collect_stats(models, requests, data, batch_size=8, device="cpu")["conv"]
    sampling = StatsSampling(min_rows=2000, rows_per_feature=10, seed=3)
    first, again = (collect_stats(models, requests, data, batch_size=8, device="cpu", sampling=sampling)["conv"]
                    for _ in range(2))
    other = collect_stats(models, requests, data, batch_size=8, device="cpu",
                          sampling=StatsSampling(2000, 10, seed=4))["conv"]
    total = 400 * H * W
    assert 0.8 * 2000 < first.count < 1.2 * 2000 < total
    assert first.count == again.count
    np.testing.assert_array_equal(first.covariance(), again.covariance())
    assert other.count != first.count or not np.array_equal(other.covariance(), first.covariance())
    corr, corr_all = first.correlation(), every.correlation()
    assert np.abs(corr - corr_all).max() < 0.1
    # exactly the rows select_rows draws in each batch, in as_rows' order: model 0's channels, then model 1's
    x = np.load(data.path)
    outs = [_run(m, x, ["r"])["r"] for m in models]
    fraction = sampling.fraction(2 * C, total)
    picked = np.concatenate([
        np.concatenate([as_rows(o[lo:lo + 8], 1, select_rows(zlib.crc32(b"conv#0"), False, lo, 8 * H * W, fraction, 3))
                        for o in outs], axis=1) for lo in range(0, 400, 8)])
    assert first.count == len(picked)
    mean, cov = _moments(picked.astype(np.float64))
    _assert_close(first.mean, mean, 1e-6)
    _assert_close(first.covariance(), cov, 1e-6)
    # a space with few rows is never subsampled
    dense = collect_stats(models, requests, data, batch_size=8, device="cpu",
                          sampling=StatsSampling(min_rows=10 * total, rows_per_feature=1))["conv"]
    assert dense.count == total
    np.testing.assert_allclose(dense.covariance(), every.covariance(), rtol=1e-12, atol=1e-12)


def test_one_source_pass_gives_stats_rows_and_held_outputs(tmp_path):
    """run_sources: statistics on the calibration part as collect_stats gives them, the rows asked for (the same
    rows select_rows draws, on both parts) and every graph output on the held-back part."""
    models = [_model(3), _model(4)]
    data = _data(tmp_path, n=23)
    fit, held = data.split(7)
    requests = [FeatureRequest("conv", ["r", "r"], axis=1)]
    rows = [RowRequest(11, ["r", "r"], axis=1, fraction=0.3), RowRequest(12, ["y", "y"], axis=1, fraction=1.0)]
    run = run_sources(models, requests, fit, batch_size=5, device="cpu", rows=rows, held=held, outputs=True,
                      seed=2)
    alone = collect_stats(models, requests, fit, batch_size=5, device="cpu")
    np.testing.assert_array_equal(run.stats["conv"].covariance(), alone["conv"].covariance())
    x = np.load(data.path)
    for m, model in enumerate(models):
        out = _run(model, x[16:], ["y"])
        np.testing.assert_allclose(run.outputs[m]["y"], out["y"], rtol=1e-5, atol=1e-5)
        for is_held, lo0, part in ((False, 0, fit), (True, 16, held)):
            full = _run(model, x[lo0:lo0 + part.num_samples], ["r"])["r"]
            for b, (lo, count, arrays) in enumerate(run.rows[11][is_held]):
                assert lo == 5 * b
                batch = full[lo:lo + 5]
                assert count == batch.shape[0] * H * W
                chosen = select_rows(11, is_held, lo, count, 0.3, 2)
                want = batch.transpose(0, 2, 3, 1).reshape(-1, C)[chosen]
                np.testing.assert_allclose(arrays[m], want, rtol=1e-5, atol=1e-5)
                # a smaller fraction's rows are among them, where subset_of_rows says
                fewer = select_rows(11, is_held, lo, count, 0.1, 2)
                np.testing.assert_array_equal(chosen[subset_of_rows(11, is_held, lo, count, 0.3, 0.1, 2)], fewer)
        assert sum(len(a[m]) for _, _, a in run.rows[12][False]) == fit.num_samples


def test_shared_key_accumulates_and_width_conflict_is_an_error(tmp_path):
    models = [_model(5)]
    data = _data(tmp_path, n=6)
    both = collect_stats(
        models, [FeatureRequest("s", ["c"], 1), FeatureRequest("s", ["r"], 1)], data, device="cpu"
    )
    only_c = collect_stats(models, [FeatureRequest("s", ["c"], 1)], data, device="cpu")
    only_r = collect_stats(models, [FeatureRequest("s", ["r"], 1)], data, device="cpu")
    assert both["s"].count == 2 * 6 * H * W
    sums = [s["s"].mean * s["s"].count for s in (both, only_c, only_r)]
    np.testing.assert_allclose(sums[0], sums[1] + sums[2], rtol=1e-12)
    with pytest.raises(MismatchError, match="'s'.*6 features.*gave 4"):
        collect_stats(models, [FeatureRequest("s", ["r"], 1), FeatureRequest("s", ["y"], 1)], data, device="cpu")


def test_progress_callable_and_wrong_tensor_count(tmp_path):
    data = _data(tmp_path, n=10)
    seen = []
    collect_stats([_model(0)], [FeatureRequest("g", ["gf"], 1)], data, batch_size=4, device="cpu",
                  progress=lambda done, total: seen.append((done, total)))
    assert seen == [(4, 10), (8, 10), (10, 10)]
    with pytest.raises(CalibrationDataError, match="no calibration samples"):
        collect_stats([_model(0)], [FeatureRequest("g", ["gf"], 1)], data.split(0)[1], device="cpu")
    with pytest.raises(UsageError, match="names 1 tensor"):
        collect_stats([_model(0), _model(1)], [FeatureRequest("g", ["gf"], 1)], data, device="cpu")


def test_non_finite_activation_is_a_verification_error(tmp_path):
    graph = oh.make_graph(
        [oh.make_node("Log", ["x"], ["l"]), oh.make_node("Relu", ["l"], ["y"])],
        "log",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 10
    x = np.ones((8, 3), np.float32)
    x[5, 1] = -1.0  # log(-1) = NaN
    np.save(tmp_path / "x.npy", x)
    data = load_calibration(tmp_path / "x.npy", input_specs(model))
    with pytest.raises(VerificationError, match=r"model 1: tensor 'l' is not finite.*samples 4\.\.7"):
        collect_stats([model, model], [FeatureRequest("l", ["x", "l"], 1)], data, batch_size=4, device="cpu")


def test_run_model_concatenates_batches(tmp_path):
    model = _model(7)
    data = _data(tmp_path, n=11)
    out = run_model(model, data, batch_size=4, device="cpu")
    ref = _run(model, np.load(data.path), ["y", "z"])
    assert set(out) == {"y", "z"}
    np.testing.assert_allclose(out["y"], ref["y"], rtol=1e-6, atol=1e-6)
    inter = run_model(model, data, batch_size=3, device="cpu", outputs=["r", "x"])
    assert inter["r"].shape == (11, C, H, W)
    np.testing.assert_array_equal(inter["x"], np.load(data.path))


# ---------------------------------------------------------------------------------------------------------------
# calibration data
# ---------------------------------------------------------------------------------------------------------------


def test_input_specs_skip_initializers_and_keep_symbolic_dims():
    model = _model(0)
    model.graph.input.append(oh.make_tensor_value_info("conv_w", TensorProto.FLOAT, [C, 3, 3, 3]))
    (spec,) = input_specs(model)
    assert spec == InputSpec("x", ("N", 3, H, W), np.dtype(np.float32))


def test_batches_split_and_num_samples(tmp_path, caplog):
    data = _data(tmp_path, n=10, dtype=np.float64)
    batches = list(data.batches(4))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    assert all(b["x"].dtype == np.float32 and b["x"].flags.c_contiguous for b in batches)
    assert isinstance(data.arrays["x"], np.memmap)
    calib, held = data.split(3)
    assert (calib.num_samples, held.num_samples) == (7, 3)
    np.testing.assert_array_equal(next(held.batches(10))["x"], np.load(data.path)[7:].astype(np.float32))
    assert data.split(0)[1].num_samples == 0 and list(data.split(0)[1].batches(4)) == []
    with pytest.raises(CalibrationDataError, match="leaves none for calibration"):
        data.split(10)
    assert [b["x"].shape[0] for b in data.batches(3, start=2, stop=8)] == [3, 3]

    specs = input_specs(_model(0))
    assert load_calibration(data.path, specs, num_samples=4).num_samples == 4
    with caplog.at_level(logging.WARNING):
        assert load_calibration(data.path, specs, num_samples=50).num_samples == 10
    assert "50 calibration samples asked for, but the file has 10" in caplog.text
    with pytest.raises(UsageError, match="at least 1"):
        load_calibration(data.path, specs, num_samples=0)


def test_fixed_batch_dimension_forces_batch_size(tmp_path):
    model = _model(0, batch=1)
    np.save(tmp_path / "x.npy", np.zeros((3, 3, H, W), np.float32))
    data = load_calibration(tmp_path / "x.npy", input_specs(model))
    assert [b["x"].shape[0] for b in data.batches(64)] == [1, 1, 1]
    assert run_model(model, data, batch_size=64, device="cpu")["y"].shape == (3, CLASSES)


@pytest.mark.parametrize("dtype, note", [(np.uint8, "not scaled"), (np.float64, "converting to float32"),
                                         (np.int16, "converting to float32"), (np.float16, "converting")])
def test_dtype_conversion_notice(tmp_path, caplog, dtype, note):
    x = (np.arange(2 * 3 * H * W) % 200).reshape(2, 3, H, W).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    with caplog.at_level(logging.WARNING):
        data = load_calibration(tmp_path / "x.npy", input_specs(_model(0)))
    assert f"has dtype {np.dtype(dtype)}" in caplog.text and note in caplog.text
    batch = next(data.batches(2))["x"]
    assert batch.dtype == np.float32
    np.testing.assert_array_equal(batch, x.astype(np.float32))  # uint8: by value, no /255


def _error(tmp_path, content, pattern="", specs=None, name="bad.npy", **kwargs):
    path = tmp_path / name
    if isinstance(content, dict):
        np.savez(path, **content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content)
    with pytest.raises(CalibrationDataError, match=pattern) as info:
        load_calibration(path, specs or input_specs(_model(0)), **kwargs)
    assert str(path) in str(info.value)  # every message names the file
    return str(info.value)


GOOD = np.zeros((4, 3, H, W), np.float32)
TWO_INPUTS = [InputSpec("a", ("N", 3), np.dtype(np.float32)), InputSpec("b", ("N", 2), np.dtype(np.float32))]


@pytest.mark.parametrize(
    "content, kwargs, pattern",
    [
        (b"hello, not numpy", {}, r"not a \.npy or \.npz file"),
        (GOOD[:0], {}, r"input 'x' is empty \(0 samples"),
        (GOOD[:, 0], {}, r"input 'x' has rank 3 .* model input has rank 4 \(N, 3, 5, 5\)"),
        (np.zeros((4, 2, H, W), np.float32), {}, r"dimension 1 is 2, expected 3"),
        (np.zeros((4, 3, H, W), bool), {}, r"dtype bool, which cannot be fed"),
        (np.zeros((4, 3, H, W), np.complex64), {}, r"dtype complex64"),
        (np.full((4, 3, H, W), "a"), {}, r"dtype <U1"),
        ({"y": GOOD, "z": GOOD}, {"name": "bad.npz"}, r"no array for model input\(s\) 'x'; the file has 'y', 'z'"),
        ({}, {"name": "bad.npz"}, r"holds no arrays"),
        (GOOD, {"specs": TWO_INPUTS}, r"\.npy file holds one array but the model has 2 inputs \(a, b\)"),
        ({"a": np.zeros((3, 3), np.float32), "b": np.zeros((4, 2), np.float32)}, {"specs": TWO_INPUTS, "name": "x.npz"},
         r"different numbers of samples \('a': 3, 'b': 4\)"),
        ({"a": np.zeros((3, 3), np.int64), "b": np.zeros((3, 2), np.float32)},
         {"specs": [InputSpec("a", ("N", 3), np.dtype(np.int64)), TWO_INPUTS[1]], "name": "x.npz"}, None),
    ],
)
def test_validation_errors(tmp_path, content, kwargs, pattern):
    name = kwargs.pop("name", "bad.npy")
    if pattern is None:  # control: a valid two-input npz with an int64 input loads
        path = tmp_path / name
        np.savez(path, **content)
        assert load_calibration(path, kwargs["specs"]).num_samples == 3
        return
    _error(tmp_path, content, pattern, name=name, **kwargs)


def test_missing_file_and_object_array(tmp_path):
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_calibration(tmp_path / "nope.npy", input_specs(_model(0)))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationDataError, match="Python objects"):
        load_calibration(tmp_path / "obj.npy", input_specs(_model(0)))


def test_non_finite_values_give_count_and_first_sample(tmp_path, monkeypatch):
    import onnxzip.calibration as calibration

    monkeypatch.setattr(calibration, "_CHUNK_BYTES", 1)  # one sample per chunk: exercises the streaming check
    x = np.zeros((6, 3, H, W), np.float32)
    x[3, 0, 0, 0] = np.nan
    x[4, 1, 2, 2] = np.inf
    x[4, 2, 2, 2] = -np.inf
    _error(tmp_path, x, r"input 'x' holds 3 non-finite value\(s\).*first in sample 3")
    # float64 beyond float32's range becomes inf once converted
    big = np.zeros((2, 3, H, W))
    big[1, 0, 0, 0] = 1e300
    _error(tmp_path, big, r"1 non-finite value\(s\) \(NaN or inf as float32\), the first in sample 1")
    # only the first num_samples are checked and used
    assert load_calibration(tmp_path / "bad.npy", input_specs(_model(0)), num_samples=1).num_samples == 1


def test_single_array_npz_under_another_name_is_accepted(tmp_path, caplog):
    np.savez(tmp_path / "d.npz", images=GOOD)
    with caplog.at_level(logging.WARNING):
        data = load_calibration(tmp_path / "d.npz", input_specs(_model(0)))
    assert data.num_samples == 4 and list(data.arrays) == ["x"]
    assert "'images'" in caplog.text and "'x'" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# sessions
# ---------------------------------------------------------------------------------------------------------------


def test_expose_tensors():
    model = _model(0)
    with pytest.raises(ModelError, match="'nope' does not exist"):
        expose_tensors(model, ["nope"])
    exposed = expose_tensors(model, ["r", "y", "x", "r"])
    names = [o.name for o in exposed.graph.output]
    assert names == ["y", "z", "r", "x"]
    assert exposed.graph.output[2].type.tensor_type.elem_type == TensorProto.FLOAT
    assert [o.name for o in model.graph.output] == ["y", "z"]  # the original is untouched
    session = make_session(exposed, device="cpu")
    x = np.ones((2, 3, H, W), np.float32)
    r, xx = session.run(["r", "x"], {"x": x})
    assert r.shape == (2, C, H, W) and np.array_equal(xx, x)


def test_make_session_cpu_and_options():
    session = make_session(_model(0), device="cpu", optimization="disable")
    assert provider_name(session) == "cpu"
    assert provider_name(make_session(_model(0), device="auto")) in ("cpu", "cuda")
    with pytest.raises(UsageError, match="optimization level 'max'"):
        make_session(_model(0), device="cpu", optimization="max")
    with pytest.raises(UsageError, match="device 'tpu'"):
        make_session(_model(0), device="tpu")


def test_make_session_cuda_without_gpu_is_a_usage_error():
    try:
        session = make_session(_model(0), device="cuda")
    except UsageError as exc:
        assert "--device cuda" in str(exc) and "no usable CUDA" in str(exc)
        return
    if provider_name(session) == "cuda":
        pytest.skip("a CUDA provider came up on this machine")
    pytest.fail("make_session('cuda') returned a CPU session")


def test_progress_bar_goes_to_stderr(tmp_path, capsys, monkeypatch):
    data = _data(tmp_path, n=5)
    collect_stats([_model(0)], [FeatureRequest("g", ["gf"], 1)], data, batch_size=2, device="cpu", desc="zipping")
    assert capsys.readouterr().err == ""  # silent by default
    # stderr not a terminal (a log file, CI): no bar, not even the bare label click would print once
    collect_stats([_model(0)], [FeatureRequest("g", ["gf"], 1)], data, batch_size=2, device="cpu", progress=True,
                  desc="zipping")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    collect_stats([_model(0)], [FeatureRequest("g", ["gf"], 1)], data, batch_size=2, device="cpu", progress=True,
                  desc="zipping")
    captured = capsys.readouterr()
    assert "zipping" in captured.err and captured.out == ""


def test_rows_that_cannot_be_spilled_name_the_directory(monkeypatch, tmp_path):
    """A temporary file for the refit's rows that cannot be written (a full disk) is an error that says where and
    what to do, and leaves no file behind."""
    import tempfile

    from onnxzip.calibration import RowSpill
    from onnxzip.errors import OnnxzipError

    spill = RowSpill(str(tmp_path))
    place = spill.write(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(spill.reader()(place), np.arange(6).reshape(2, 3))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    with pytest.raises(OnnxzipError, match=f"temporary file in {tmp_path}.*No space left.*TMPDIR"):
        RowSpill(str(tmp_path)).write(np.zeros((2, 3)))
    assert list(tmp_path.iterdir()) == []
