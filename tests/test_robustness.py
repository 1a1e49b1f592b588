"""Issue 5, "never a wrong model, never a lost file", checked from outside:

- pre-flight: every bad option, file, model or data set fails with its error class (and exit code), names what is
  at fault, leaves no file, and is found *before* calibration runs;
- safe writing: a failure injected anywhere (in a stage, while writing the card, between the two renames, as an
  OSError or a KeyboardInterrupt) leaves no file behind, and a file that --force was replacing intact;
- numerical robustness: dead, constant, duplicate and near-constant features, 2..10 calibration samples, inputs
  scaled by 1e4: every weight of the merged model is finite, thin statistics are warned about through logging;
- verification: a sabotaged merge (a NaN weight, a head drowned in noise) fails with VerificationError and writes
  nothing; an honest one passes.
"""
import importlib
import logging
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxzip
from onnxzip import onnx_io
from onnxzip.errors import (CalibrationDataError, MismatchError, ModelError, OnnxzipError, OutputError,
                            UnsupportedModelError, UsageError, VerificationError)

try:
    from tests import fixtures as F
except ImportError:  # pytest put tests/ itself on sys.path
    import fixtures as F

M = importlib.import_module("onnxzip.pipeline")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the module (the package's `merge` attribute is the function)


class CalibrationRan(Exception):
    """Raised by the stand-in for calibration: a pre-flight check came too late."""



@pytest.fixture(scope="module")
def mlp_pair():
    (a, _), (b, _) = F.random_pair("mlp", seed=3)
    return a, b


@pytest.fixture(scope="module")
def files(tmp_path_factory, mlp_pair):
    """Model files and a .npy calibration file of the mlp pair."""
    d = tmp_path_factory.mktemp("files")
    a, b = mlp_pair
    onnx.save(a, str(d / "a.onnx"))
    onnx.save(b, str(d / "b.onnx"))
    np.save(d / "calib.npy", F.calib(a, 64))
    return d


def listing(*dirs):
    return {str(d): sorted(os.listdir(d)) for d in dirs}


def snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def initializers_finite(model):
    for init in model.graph.initializer:
        value = numpy_helper.to_array(init)
        if value.dtype.kind == "f":
            assert np.isfinite(value).all(), f"initializer {init.name!r} holds NaN or inf"


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight: error class, message, nothing written, before calibration
# ---------------------------------------------------------------------------------------------------------------

def _bad_calls(files, out):
    """(error class, words the message must hold, merge arguments) for every pre-flight failure."""
    a, b, calib = files / "a.onnx", files / "b.onnx", files / "calib.npy"
    x = np.load(calib)
    garbage = files / "garbage.onnx"
    garbage.write_bytes(np.random.RandomState(1).bytes(1000))
    empty = files / "empty.npy"
    np.save(empty, np.zeros((0, 1, 8, 8), np.float32))
    text = files / "notes.npy"
    text.write_text("not numpy")
    nan = x.copy()
    nan[3, 0, 1, 1] = np.nan
    vgg, _ = F.vgg(0)
    wide, _ = F.mlp(1, hidden=(16, 12))
    out_file = out / "m.onnx"
    return [
        # options
        (UsageError, ["method"], dict(method="zipit")),
        (UsageError, ["alpha"], dict(alpha=float("nan"))),
        (UsageError, ["alpha"], dict(alpha="0.3")),
        (UsageError, ["beta"], dict(beta=1.5)),
        (UsageError, ["beta"], dict(beta=-0.1)),
        (UsageError, ["beta"], dict(beta=float("nan"))),
        (UsageError, ["batch-size"], dict(batch_size=0)),
        (UsageError, ["batch-size"], dict(batch_size=2.5)),
        (UsageError, ["num-samples"], dict(num_samples=1)),
        (UsageError, ["num-samples"], dict(num_samples=True)),
        (UsageError, ["stop-at"], dict(stop_at=-1)),
        (UsageError, ["stop-at"], dict(stop_at=1.5)),
        (UsageError, ["stop-at"], dict(stop_at="middle")),
        (UsageError, ["stop-at", "out of range"], dict(stop_at=99)),
        (UsageError, ["names"], dict(names=("a", "a"))),
        (UsageError, ["names"], dict(names="ab")),
        (UsageError, ["names"], dict(names=("a", "b/c"))),
        (UsageError, ["names"], dict(names=5)),
        (UsageError, ["zip"], dict(names=("zip", "b"))),
        (UsageError, ["device"], dict(device="tpu")),
        (UsageError, ["seed"], dict(seed="0")),
        (UsageError, ["verify"], dict(verify="no")),
        (UsageError, ["force"], dict(force=None)),
        (UsageError, ["logger"], dict(logger="log")),
        (UsageError, ["progress"], dict(progress="yes")),
        # files
        (ModelError, ["nowhere.onnx"], dict(model_a=files / "nowhere.onnx")),
        (ModelError, ["garbage.onnx"], dict(model_b=garbage)),
        (ModelError, ["directory"], dict(model_a=files)),
        (ModelError, ["model A"], dict(model_a=42)),
        (ModelError, ["model B", "checker"], dict(model_b=onnx.ModelProto())),
        (OutputError, ["folder"], dict(output=out / "missing" / "m.onnx")),
        (OutputError, ["directory"], dict(output=out)),
        (OutputError, ["file name"], dict(output="")),
        (OutputError, ["NUL"], dict(output=str(out_file) + "\0x")),
        (OutputError, ["a.onnx"], dict(output=a, force=True)),
        (OutputError, ["calib.npy"], dict(output=calib, force=True)),
        (OutputError, ["output"], dict(output=12)),
        # the models' match
        (MismatchError, ["input", "shape"], dict(model_b=vgg)),
        (MismatchError, ["fc"], dict(model_b=wide)),
        # calibration data
        (CalibrationDataError, ["does not exist"], dict(data=files / "nothing.npy")),
        (CalibrationDataError, ["empty"], dict(data=empty)),
        (CalibrationDataError, ["notes.npy"], dict(data=text)),
        (CalibrationDataError, ["non-finite"], dict(data=nan)),
        (CalibrationDataError, ["rank"], dict(data=x[:, 0])),
        (CalibrationDataError, ["dimension"], dict(data=x[:, :, :4])),
        (CalibrationDataError, ["dtype"], dict(data=x.astype(np.complex64))),
        (CalibrationDataError, ["dtype"], dict(data=x > 0)),
        (CalibrationDataError, ["input"], dict(data={"input": x.tolist()})),
        (CalibrationDataError, ["calibration data"], dict(data=42)),
        (CalibrationDataError, ["'input'"], dict(data={"other": x, "more": x})),
        (CalibrationDataError, ["2"], dict(data=x[:1])),
    ]


def test_every_preflight_failure_comes_before_calibration(files, dirs, monkeypatch):
    """Each bad argument: its error class (a documented exit code), a message naming the culprit, no file left,
    and calibration never started (the stand-in for it raises CalibrationRan)."""
    _, out, tmp = dirs

    def no_calibration(*args, **kw):
        raise CalibrationRan()

    monkeypatch.setattr(M, "run_sources", no_calibration)
    monkeypatch.setattr(M, "run_model", no_calibration)
    default = dict(model_a=files / "a.onnx", model_b=files / "b.onnx", data=files / "calib.npy",
                   output=out / "m.onnx")
    for cls, words, kw in _bad_calls(files, out):
        args = dict(default, **kw)
        before = listing(files, out, tmp)
        with pytest.raises(OnnxzipError) as info:
            onnxzip.merge(args.pop("model_a"), args.pop("model_b"), args.pop("data"), args.pop("output"), **args)
        assert type(info.value) is cls, f"{kw}: {type(info.value).__name__} ({info.value}), expected {cls.__name__}"
        msg = str(info.value)
        for word in words:
            assert word.lower() in msg.lower(), f"{kw}: message should name {word!r}: {msg!r}"
        assert "\n" not in msg.strip(), f"{kw}: one line please: {msg!r}"
        assert listing(files, out, tmp) == before, f"{kw}: files left behind"
        assert cls.exit_code not in (0, 1)


def test_exit_codes_are_distinct():
    classes = [UsageError, ModelError, MismatchError, CalibrationDataError, UnsupportedModelError,
               VerificationError, OutputError]
    codes = [c.exit_code for c in classes]
    assert len(set(codes)) == len(codes) and all(c >= 2 for c in codes), codes


def test_existing_output_or_card_is_kept(files, dirs):
    _, out, _ = dirs
    path = out / "m.onnx"
    for existing in (path, out / "m.onnx.json"):
        existing.write_bytes(b"precious")
        with pytest.raises(OutputError) as info:
            onnxzip.merge(files / "a.onnx", files / "b.onnx", files / "calib.npy", path)
        assert existing.name in str(info.value) and "force" in str(info.value)
        assert existing.read_bytes() == b"precious"
        assert sorted(os.listdir(out)) == [existing.name]
        existing.unlink()


def test_nan_weight_in_an_original_is_a_model_error(files, dirs, mlp_pair):
    a, b = mlp_pair
    bad = onnx.ModelProto()
    bad.CopyFrom(b)
    init = bad.graph.initializer[0]
    value = numpy_helper.to_array(init).copy()
    value.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(value, init.name))
    with pytest.raises(ModelError) as info:
        onnxzip.merge(a, bad, F.calib(a, 64), dirs[1] / "m.onnx")
    assert init.name in str(info.value) and "NaN" in str(info.value)
    assert os.listdir(dirs[1]) == []


def test_uint8_and_float64_data_are_converted_with_a_notice(mlp_pair, caplog):
    a, b = mlp_pair
    x = F.calib(a, 64)
    for data in (x.astype(np.float64), (np.clip(x, 0, 2) * 100).astype(np.uint8)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="onnxzip"):
            result = onnxzip.merge(a, b, data)
        assert any("converting" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
        initializers_finite(result.model)


def test_fixed_batch_dimension(dirs):
    """A model exported with a fixed batch of 4: calibration and verification run whole batches only."""
    a, pa = F.mlp(0)
    b, _ = F.permuted_twin(pa, 1)
    for model in (a, b):
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    with pytest.raises(CalibrationDataError):
        onnxzip.merge(a, b, F.calib(a, 4)[:3])
    x = F.calib(a, 30)  # 30 // 5 = 6 held back -> 4 (a whole batch); 26 -> 6 batches of 4 for calibration
    result = onnxzip.merge(a, b, x, method="permute")
    assert result.card["verification"]["samples"] == 4
    initializers_finite(result.model)


# ---------------------------------------------------------------------------------------------------------------
# Safe writing: failures injected at every step
# ---------------------------------------------------------------------------------------------------------------

def _fail_on_call(n, exc):
    """A wrapper factory: the n-th call (1-based) of the wrapped function raises `exc`."""
    def wrap(fn):
        calls = [0]

        def wrapped(*args, **kw):
            calls[0] += 1
            if calls[0] == n:
                raise exc
            return fn(*args, **kw)
        return wrapped
    return wrap


INJECTIONS = [
    # (where, what)
    ("run_sources", KeyboardInterrupt()),
    ("build", RuntimeError("boom in surgery")),
    ("repair_statistics", KeyboardInterrupt()),  # with --refit none
    ("refit_layers", KeyboardInterrupt()),
    ("_verify", KeyboardInterrupt()),
    ("json.dumps#2", KeyboardInterrupt()),  # the second dumps is the JSON card file
    ("fsync#1", OSError(28, "No space left on device")),  # writing the card's temporary file
    ("save_model_atomic", KeyboardInterrupt()),
    ("save_model_atomic", OSError(28, "No space left on device")),
    ("replace#1", KeyboardInterrupt()),  # save_model_atomic's own rename (of the model's temporary file)
    ("replace#2", KeyboardInterrupt()),  # the model into place
    ("replace#3", KeyboardInterrupt()),  # the card into place, after the model
    ("replace#3", OSError(13, "Permission denied")),
]


def _inject(monkeypatch, where, exc):
    name, _, n = where.partition("#")
    n = int(n or 1)
    if name in ("run_sources", "build", "repair_statistics", "refit_layers", "_verify"):
        monkeypatch.setattr(M, name, _fail_on_call(n, exc)(getattr(M, name)))
    elif name == "save_model_atomic":
        monkeypatch.setattr(onnx_io, name, _fail_on_call(n, exc)(onnx_io.save_model_atomic))
    elif name == "json.dumps":
        monkeypatch.setattr(M.json, "dumps", _fail_on_call(n, exc)(M.json.dumps))
    elif name in ("fsync", "replace"):
        monkeypatch.setattr(os, name, _fail_on_call(n, exc)(getattr(os, name)))
    else:
        raise AssertionError(where)


@pytest.mark.parametrize("force", [False, True], ids=["new", "force"])
@pytest.mark.parametrize("where,exc", INJECTIONS, ids=[f"{w}-{type(e).__name__}" for w, e in INJECTIONS])
def test_interrupted_run_leaves_nothing_behind(mlp_pair, dirs, monkeypatch, where, exc, force):
    a, b = mlp_pair
    _, out, tmp = dirs
    path = out / "m.onnx"
    if force:  # an earlier merge's files, which a failed run must leave as they were
        path.write_bytes(b"old model")
        (out / "m.onnx.json").write_bytes(b"old card")
    before_out, before_tmp = snapshot(out), listing(tmp)
    _inject(monkeypatch, where, exc)
    expected = (type(exc),) if not isinstance(exc, OSError) else (OutputError,)
    with pytest.raises(expected):
        onnxzip.merge(a, b, F.calib(a, 64), path, force=force, refit="none" if where == "repair_statistics" else "ls")
    monkeypatch.undo()
    assert snapshot(out) == before_out, f"{where}: the output folder changed: {sorted(os.listdir(out))}"
    assert listing(tmp) == before_tmp


def test_complete_run_writes_model_and_card_only(mlp_pair, dirs):
    a, b = mlp_pair
    _, out, tmp = dirs
    path = out / "m.onnx"
    path.write_bytes(b"old model")
    result = onnxzip.merge(a, b, F.calib(a, 64), path, force=True)
    assert sorted(os.listdir(out)) == ["m.onnx", "m.onnx.json"]
    assert os.listdir(tmp) == []
    assert path.read_bytes() == result.model.SerializeToString()
    assert oct(path.stat().st_mode & 0o777) == oct((out / "m.onnx.json").stat().st_mode & 0o777)


# ---------------------------------------------------------------------------------------------------------------
# Numerical robustness
# ---------------------------------------------------------------------------------------------------------------

def _mlp_variant(seed=0, dead=(), constant=(), duplicate=(), near_constant=()):
    """The fixtures' mlp with hidden units of fc1 made dead (bias -100: ReLU always 0), constant (zero weights,
    positive bias), duplicates of another unit, or near-constant (weights scaled by 1e-7)."""
    _, p = F.mlp(seed)
    w = p["w"]
    for k in dead:
        w["fc1.bias"][k] = -100.0
    for k in constant:
        w["fc1.weight"][k] = 0.0
        w["fc1.bias"][k] = 0.7
    for k, src in duplicate:
        w["fc1.weight"][k] = w["fc1.weight"][src]
        w["fc1.bias"][k] = w["fc1.bias"][src]
    for k in near_constant:
        w["fc1.weight"][k] *= 1e-7
        w["fc1.bias"][k] = 0.5
    return F.build(p), p


DEGENERATE = {
    "dead": dict(dead=(0, 5, 9)),
    "constant": dict(constant=(1, 2)),
    "duplicate": dict(duplicate=((3, 4), (7, 4))),
    "near_constant": dict(near_constant=(6, 11)),
    "all": dict(dead=(0,), constant=(1,), duplicate=((3, 4),), near_constant=(6,)),
}


@pytest.mark.parametrize("kind", sorted(DEGENERATE))
def test_degenerate_features_give_finite_weights_and_exact_twins(kind):
    """Twins with degenerate units merge exactly on the calibration samples (two dead or duplicate units are
    interchangeable there) and every weight stays finite, with and without repair, for every method."""
    a, p = _mlp_variant(**DEGENERATE[kind])
    b, _ = F.permuted_twin(p, 5)
    x = F.calib(a, 128)
    want = F.run(a, x)["logits"]
    for method, repair in [("zip", True), ("permute", True), ("zip", False), ("average", True)]:
        kw = dict(beta=0.0) if method == "zip" else {}
        merged = onnxzip.merge(a, b, x, method=method, repair=repair, **kw).model
        initializers_finite(merged)
        out = F.run(merged, x)
        assert np.isfinite(out["a/logits"]).all() and np.isfinite(out["b/logits"]).all()
        if method != "average":
            calibrated = x[: len(x) - len(x) // 5]  # the samples statistics were taken on
            got = F.run(merged, calibrated)
            for head in ("a/logits", "b/logits"):
                err = float(np.abs(got[head] - want[: len(calibrated)]).max())
                assert err < 1e-4, f"{kind} {method} repair={repair} {head}: max abs error {err:.3g}"


@pytest.mark.parametrize("kind", ["dead", "near_constant", "all"])
def test_degenerate_features_against_another_model(kind):
    """A with degenerate units merged with an unrelated B: finite weights, verification passes."""
    a, _ = _mlp_variant(seed=0, **DEGENERATE[kind])
    b, _ = _mlp_variant(seed=1, **DEGENERATE[kind])
    x = F.calib(a, 128)
    for method in ("zip", "permute"):
        result = onnxzip.merge(a, b, x, method=method)
        initializers_finite(result.model)
        for head in result.card["verification"]["heads"]:
            assert head["relative_error"] < 10, head


def test_repair_on_a_nearly_cancelled_channel():
    """Averaging two almost opposite units leaves a merged channel of tiny spread (1e-6 of its sources'): repair
    must neither divide by ~0 nor blow the weights up beyond float range."""
    a, p = F.mlp(0)
    q = {**p, "w": {k: v.copy() for k, v in p["w"].items()}}
    rng = np.random.RandomState(0)
    q["w"]["fc1.weight"][2] = -p["w"]["fc1.weight"][2] + 1e-6 * rng.randn(64).astype(np.float32)
    q["w"]["fc1.bias"][2] = -p["w"]["fc1.bias"][2]
    b = F.build(q)
    x = F.calib(a, 128)
    result = onnxzip.merge(a, b, x, method="average")
    initializers_finite(result.model)
    biggest = max(float(np.abs(numpy_helper.to_array(i)).max()) for i in result.model.graph.initializer
                  if i.data_type == onnx.TensorProto.FLOAT and i.dims)
    assert biggest < 1e8, f"repair blew a weight up to {biggest:.3g}"
    out = F.run(result.model, x)
    assert np.isfinite(out["a/logits"]).all() and np.isfinite(out["b/logits"]).all()


@pytest.mark.parametrize("n", [2, 3, 5, 10])
@pytest.mark.parametrize("arch", ["mlp", "vgg"])
def test_few_samples_are_finite_and_warned_about(arch, n, caplog):
    (a, _), (b, _) = F.random_pair(arch, seed=4)
    with caplog.at_level(logging.WARNING, logger="onnxzip"):
        result = onnxzip.merge(a, b, F.calib(a, n))
    initializers_finite(result.model)
    thin = [s for s in result.card["spaces"] if s["thin_statistics"]]
    assert all(s["samples"] < 2 * s["width"] for s in thin)
    assert all(s["thin_statistics"] == (s["samples"] < 2 * s["width"]) for s in result.card["spaces"])
    if arch == "mlp":  # 16 units, 32 stacked features, at most 10 samples: every space is thin
        assert len(thin) == len(result.card["spaces"])
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for s in thin:
        assert any(f"feature space {s['space']} " in m and "thin" in m for m in messages), messages
    assert any("thin" in line for line in result.summary_lines()) == bool(thin)


def test_thin_statistics_warning_reaches_a_plain_logging_setup(tmp_path):
    """In a fresh interpreter without any logging configuration, the warning still reaches stderr (Python's
    last-resort handler); pytest's own log capture would hide that here."""
    (a, _), (b, _) = F.random_pair("mlp", seed=4)
    onnx.save(a, str(tmp_path / "a.onnx"))
    onnx.save(b, str(tmp_path / "b.onnx"))
    np.save(tmp_path / "x.npy", F.calib(a, 6))
    code = "import onnxzip; onnxzip.merge('a.onnx', 'b.onnx', 'x.npy')"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "feature space" in proc.stderr and "thin" in proc.stderr, proc.stderr


@pytest.mark.parametrize("arch", ["mlp", "vgg", "resnet"])
def test_huge_activations(arch):
    """Inputs scaled by 1e4: statistics, matching and repair stay finite and the merge verifies."""
    (a, pa), _ = F.random_pair(arch, seed=5)
    b, _ = F.permuted_twin(pa, 2)
    x = F.calib(a, 128) * np.float32(1e4)
    result = onnxzip.merge(a, b, x, method="zip", beta=0.0)
    initializers_finite(result.model)
    want = F.run(a, x)["logits"]
    got = F.run(result.model, x)
    scale = float(np.abs(want).max())
    for head in ("a/logits", "b/logits"):
        assert np.abs(got[head] - want).max() <= 1e-4 * scale, head


# ---------------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------------

def _sabotage(monkeypatch, how, which="a/"):
    """Make the merge's output wrong: `how` rewrites the first 2-D float weight of a branch (`which`): the task
    head's in a full zip; after surgery, and again after the least-squares refit (which would otherwise fit it
    back)."""
    real_build, real_refit = M.build, M.refit_layers

    def corrupt(model):
        for init in model.graph.initializer:
            if init.name.startswith(which) and init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2:
                value = how(numpy_helper.to_array(init).copy())
                init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
                return
        raise AssertionError(f"no branch weight under {which!r}")

    def build(plan, *args, **kw):
        surgery = real_build(plan, *args, **kw)
        corrupt(surgery.model)
        return surgery

    def refit(plan, surgery, *args, **kw):
        summary = real_refit(plan, surgery, *args, **kw)
        corrupt(surgery.model)
        return summary

    monkeypatch.setattr(M, "build", build)
    monkeypatch.setattr(M, "refit_layers", refit)


def _nan(v):
    v.flat[0] = np.nan
    return v


def _noise(v):
    return v + 1e3 * np.random.RandomState(0).randn(*v.shape)


def _scaled(v):
    return v * 1e3


def test_nan_weight_is_caught_even_without_verify(mlp_pair, dirs, monkeypatch):
    a, b = mlp_pair
    _sabotage(monkeypatch, _nan)
    for verify in (True, False):
        with pytest.raises(VerificationError) as info:
            onnxzip.merge(a, b, F.calib(a, 64), dirs[1] / "m.onnx", verify=verify)
        assert "NaN" in str(info.value)
        assert os.listdir(dirs[1]) == []


@pytest.mark.parametrize("arch", ["mlp", "vgg", "resnet"])
def test_head_drowned_in_noise_fails_verification(arch, dirs, monkeypatch):
    (a, _), (b, _) = F.random_pair(arch, seed=6)
    _sabotage(monkeypatch, _noise, "b/")
    path = dirs[1] / "m.onnx"
    with pytest.raises(VerificationError) as info:
        onnxzip.merge(a, b, F.calib(a, 200), path)
    assert "b/logits" in str(info.value) and "a/logits" not in str(info.value)
    assert os.listdir(dirs[1]) == []
    # --no-verify keeps it (the weights are finite, merely wrong)
    result = onnxzip.merge(a, b, F.calib(a, 200), path, verify=False)
    assert path.exists() and result.card["verification"] == {}


def test_scaled_head_keeps_its_predictions_and_passes(monkeypatch):
    """Logits 1000x too large: a huge relative error, but the same predictions: not 'nothing like' the original.
    (A twin pair, so that the merge is otherwise exact.)"""
    a, pa = F.mlp(0)
    b, _ = F.permuted_twin(pa, 1)
    _sabotage(monkeypatch, _scaled, "a/")
    result = onnxzip.merge(a, b, F.calib(a, 200), beta=0.0)
    head = result.card["verification"]["heads"][0]
    assert head["relative_error"] > 10 and head["top1_agreement"] > 0.9, head


def test_kappa():
    eye = np.eye(3)
    want = eye[[0, 1, 2, 0, 1, 2]]
    assert M._kappa(want, want) == (1.0, 1.0)
    agreement, kappa = M._kappa(eye[[0] * 6], want)  # always class 0: agrees a third of the time, by chance
    assert agreement == pytest.approx(1 / 3) and kappa == pytest.approx(0.0)
    assert M._kappa(eye[[0] * 6], eye[[0] * 6]) == (1.0, 1.0)  # both constant and equal


@pytest.mark.parametrize("arch", ["mlp", "vgg", "resnet"])
@pytest.mark.parametrize("method", ["zip", "permute", "average"])
def test_honest_merges_verify(arch, method):
    """The threshold is conservative: an honest merge of two unrelated models never trips it."""
    (a, _), (b, _) = F.random_pair(arch, seed=7)
    result = onnxzip.merge(a, b, F.calib(a, 128), method=method)
    heads = result.card["verification"]["heads"]
    assert len(heads) == 2 and result.card["verification"]["held_back"]
    for head in heads:
        assert head["relative_error"] < M.VERIFY_MAX_RELATIVE_ERROR, head
