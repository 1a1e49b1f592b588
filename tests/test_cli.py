"""The command line (option checks, exit codes, `eval` end to end) and onnxzip.onnx_io (checked loads, atomic
saves). `merge` itself is exercised through a stand-in for the API: here we test only what the CLI does."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxzip
from conftest import build_logits_model
from onnxzip import onnx_io
from onnxzip.cli import cli, parse_stop_at
from onnxzip.errors import (CalibrationDataError, InstallError, MismatchError, ModelError, OnnxzipError, OutputError,
                            UsageError)
from onnxzip.onnx_io import file_sha256, load_model, save_model_atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {"a": [3, 7, 1], "b": [0, 5]}


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def fake_merge(monkeypatch):
    """Replace the API with a recorder; returns the list of calls' keyword arguments."""
    calls = []

    def merge(models, data, output, **kw):
        calls.append(dict(models=models, model_a=models[0], model_b=models[1], data=data, output=output, **kw))
        return types.SimpleNamespace(output_path=output, card={}, summary_lines=lambda: ["merged OK", "line 2"])

    monkeypatch.setattr(onnxzip, "merge_models", merge, raising=False)
    return calls


MERGE = ["merge", "a.onnx", "b.onnx", "--data", "calib.npy", "-o", "out.onnx"]


# ---------------------------------------------------------------------------------------------------------------
# help, version
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["merge", "--help"], ["eval", "--help"], ["-h"]])
def test_help(runner, args):
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and onnxzip.__version__ in result.output


def test_python_dash_m(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "onnxzip", "--version"], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"onnxzip {onnxzip.__version__}"


# ---------------------------------------------------------------------------------------------------------------
# merge: option checks happen before the API is called
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    ["--names", "a"], ["--names", "a,b,c"], ["--names", "a,a"], ["--width", "2.5"], ["--width", "0.5"],
    ["--width", "nan"], ["--budget", "macs"], ["--budget", "flops=0.5"], ["--budget", "macs=0"],
    ["--budget", "macs=0.5", "--width", "1.5"], ["--budget", "params=0.5", "--stop-at", "3"], ["--names", "a,"], ["--names", "a b,c"],
    ["--names", "a/x,b"], ["--beta", "1.5"], ["--beta", "-0.1"], ["--alpha", "nan"], ["--batch-size", "0"],
    ["--num-samples", "0"], ["--method", "magic"], ["--device", "tpu"], ["--stop-at", "-1"], ["--stop-at", "half"],
    ["-v", "-q"],
])
def test_merge_bad_options_exit_2_without_calling_the_api(runner, fake_merge, extra):
    result = runner.invoke(cli, MERGE + extra)
    assert result.exit_code == 2, result.output
    assert fake_merge == []


def test_merge_missing_required(runner, fake_merge):
    assert runner.invoke(cli, ["merge", "a.onnx", "b.onnx", "-o", "x.onnx"]).exit_code == 2
    assert runner.invoke(cli, ["merge", "a.onnx", "b.onnx", "--data", "d.npy"]).exit_code == 2
    assert fake_merge == []


def test_merge_passes_options_to_the_api(runner, fake_merge):
    result = runner.invoke(cli, MERGE + ["--method", "permute", "--alpha", "-1", "--beta", "0", "--stop-at", "13",
                                         "--names", "cats,dogs.v2", "--num-samples", "10", "--batch-size", "5",
                                         "--device", "cpu", "--seed", "3", "--force", "--no-repair",
                                         "--no-verify", "--strict", "--keep-batchnorm", "--refit", "none",
                                         "--repair-targets", "batchnorm", "--fp16", "--ray", "auto",
                                         "--ray-workers", "3"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "merged OK\nline 2\n"
    (call,) = fake_merge
    logger = call.pop("logger")
    assert logger.name == "onnxzip"
    assert call == dict(models=["a.onnx", "b.onnx"], model_a="a.onnx", model_b="b.onnx", data="calib.npy",
                        output="out.onnx", width=None, budget=None, method="permute",
                        alpha=-1.0, beta=0.0, stop_at=13, num_samples=10, batch_size=5, device="cpu",
                        names=("cats", "dogs.v2"), seed=3, force=True, refit="none", repair=False,
                        repair_targets="batchnorm", verify=False, strict=True, fold_batchnorm=False, fp16=True,
                        progress=True, ray="auto", ray_workers=3)


def test_merge_defaults_and_quiet(runner, fake_merge):
    result = runner.invoke(cli, MERGE + ["-q"])
    assert result.exit_code == 0 and result.stdout == ""
    call = fake_merge[0]
    assert (call["method"], call["alpha"], call["beta"], call["stop_at"], call["num_samples"], call["batch_size"],
            call["device"], call["names"], call["seed"], call["force"], call["repair"], call["verify"],
            call["strict"], call["progress"], call["refit"], call["repair_targets"]) == (
        "zip", 0.3, 0.125, "heads", 1000, 64, "auto", ("a", "b"), 0, False, True, True, False, False, "ls",
        "measured")


def test_stop_at_parsing():
    assert parse_stop_at(None) == "heads" and parse_stop_at("all") == "heads" and parse_stop_at("HEADS") == "heads"
    assert parse_stop_at("input") == "input" and parse_stop_at("0") == 0 and parse_stop_at("13") == 13


# ---------------------------------------------------------------------------------------------------------------
# errors become messages and exit codes in one place
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [UsageError, ModelError, MismatchError, CalibrationDataError, OutputError])
def test_onnxzip_errors_exit_with_their_code(runner, monkeypatch, exc):
    def merge(*a, **kw):
        raise exc("the thing at fault")

    monkeypatch.setattr(onnxzip, "merge_models", merge, raising=False)
    result = runner.invoke(cli, MERGE)
    assert result.exit_code == exc.exit_code
    assert result.stderr == "error: the thing at fault\n"  # no traceback without -v
    result = runner.invoke(cli, MERGE + ["-v"])
    assert result.exit_code == exc.exit_code and "Traceback" in result.stderr


def test_interrupt_exits_130(runner, monkeypatch):
    def merge(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnxzip, "merge_models", merge, raising=False)
    result = runner.invoke(cli, MERGE)
    assert result.exit_code == 130 and result.stderr.strip() == "interrupted"


def test_internal_error_exits_1(runner, monkeypatch):
    def merge(*a, **kw):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(onnxzip, "merge_models", merge, raising=False)
    result = runner.invoke(cli, MERGE)
    assert result.exit_code == 1
    assert "internal error: ZeroDivisionError: oops" in result.stderr and "-v" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Traceback" in runner.invoke(cli, MERGE + ["-v"]).stderr


# ---------------------------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def eval_files(tmp_path):
    model = build_logits_model({"a/logits": (0, 3), "b/logits": (3, 5)}, width=5)
    single = build_logits_model({"logits": (0, 3)}, width=5)
    onnx.save(model, tmp_path / "merged.onnx")
    onnx.save(single, tmp_path / "a.onnx")
    x = np.eye(5, dtype=np.float32)  # image i predicts column i
    y = np.array([3, 7, 1, 0, 5])  # every prediction right
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    (tmp_path / "card.json").write_text(json.dumps({"tasks": TASKS}))
    return tmp_path


def test_eval_table(runner, eval_files):
    d = eval_files
    result = runner.invoke(cli, ["eval", str(d / "merged.onnx"), "--data", str(d / "eval.npz"),
                                 "--card", str(d / "card.json"), "--no-latency"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith("task a") and "100.00 %" in line and "3 images" in line for line in lines)
    assert any(line.startswith("joint") and "100.00 %" in line and "5 images" in line for line in lines)
    assert any(line.startswith("params") for line in lines)
    assert not any(line.startswith("latency") for line in lines)


def test_eval_json_single_head_task(runner, eval_files):
    d = eval_files
    result = runner.invoke(cli, ["eval", str(d / "a.onnx"), "--data", str(d / "eval.npz"),
                                 "--card", str(d / "card.json"), "--task", "a", "--json", "--no-throughput"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["per_task_accuracy"] == {"a": 1.0}
    assert report["joint_accuracy"] == pytest.approx(3 / 5)  # model A cannot answer task b's classes
    assert report["heads"] == {"a": "logits"} and report["latency_ms"] > 0


def test_eval_head_option(runner, eval_files):
    d = eval_files
    args = ["eval", str(d / "merged.onnx"), "--data", str(d / "eval.npz"), "--card", str(d / "card.json"),
            "--no-latency", "--json"]
    result = runner.invoke(cli, args + ["--head", "b=b/logits"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["per_task_accuracy"] == {"b": 1.0}
    for bad in (["--head", "b"], ["--head", "b=nope"], ["--head", "c=a/logits"], ["--task", "a"],
                ["--task", "z"], ["--task", "a", "--head", "a=a/logits"]):
        result = runner.invoke(cli, args + bad)
        assert result.exit_code == 2, (bad, result.output)


def test_eval_missing_model_exits_3(runner, eval_files):
    d = eval_files
    result = runner.invoke(cli, ["eval", str(d / "missing.onnx"), "--data", str(d / "eval.npz"),
                                 "--card", str(d / "card.json")])
    assert result.exit_code == 3
    assert result.stderr.startswith("error: ") and "missing.onnx" in result.stderr


def test_eval_bad_data_and_card(runner, eval_files):
    d = eval_files
    base = ["eval", str(d / "merged.onnx")]
    result = runner.invoke(cli, base + ["--data", str(d / "nope.npz"), "--card", str(d / "card.json")])
    assert result.exit_code == CalibrationDataError.exit_code and "nope.npz" in result.stderr
    (d / "bad.json").write_text(json.dumps({"arch": "x"}))
    result = runner.invoke(cli, base + ["--data", str(d / "eval.npz"), "--card", str(d / "bad.json")])
    assert result.exit_code == 2 and '"tasks"' in result.stderr
    result = runner.invoke(cli, base + ["--data", str(d / "eval.npz"), "--card", str(d / "none.json")])
    assert result.exit_code == 2


# ---------------------------------------------------------------------------------------------------------------
# onnx_io
# ---------------------------------------------------------------------------------------------------------------


def _tiny(big=False):
    model = build_logits_model({"a/logits": (0, 3), "b/logits": (3, 5)}, width=5)
    if big:  # an (unused) weight above onnx's 1 KB threshold for moving a tensor to external data
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "big"))
    return model


def _same(m1, m2):
    """Same graph and weights (external-data bookkeeping fields aside)."""
    def weights(m):
        return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    w1, w2 = weights(m1), weights(m2)
    return (list(m1.graph.node) == list(m2.graph.node) and w1.keys() == w2.keys()
            and all(np.array_equal(w1[k], w2[k]) for k in w1))


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "missing.onnx", what="model A")
    with pytest.raises(ModelError, match="is a directory"):
        load_model(tmp_path)
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01 this is not onnx \xff" * 10)
    with pytest.raises(ModelError, match="junk.onnx"):
        load_model(tmp_path / "junk.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match="empty.onnx"):
        load_model(tmp_path / "empty.onnx")
    broken = _tiny()
    broken.graph.node[0].input[0] = "nowhere"  # reads a tensor nothing produces
    onnx.save(broken, tmp_path / "broken.onnx")
    with pytest.raises(ModelError, match="broken.onnx.*checker"):
        load_model(tmp_path / "broken.onnx")


def test_load_model_ok_and_external_data(tmp_path):
    model = _tiny()
    onnx.save(model, tmp_path / "m.onnx")
    assert load_model(tmp_path / "m.onnx") == model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save moves the weights of the model it saves out to the data file
    onnx.save(copy, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert os.path.exists(tmp_path / "ext.onnx.data")
    assert _same(load_model(str(tmp_path / "ext.onnx")), model)
    os.remove(tmp_path / "ext.onnx.data")
    with pytest.raises(ModelError, match="external"):
        load_model(tmp_path / "ext.onnx")


def test_save_model_atomic(tmp_path):
    model = _tiny()
    path = tmp_path / "out.onnx"
    assert save_model_atomic(model, path) == str(path)
    assert onnx.load(path) == model
    with pytest.raises(OutputError, match="--force"):
        save_model_atomic(model, path)
    save_model_atomic(model, path, force=True)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    with pytest.raises(OutputError, match="does not exist"):
        save_model_atomic(model, tmp_path / "no" / "such" / "dir.onnx")
    with pytest.raises(OutputError, match="directory"):
        save_model_atomic(model, tmp_path)
    assert len(file_sha256(path)) == 64


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
@pytest.mark.parametrize("external, fail_in", [(False, "replace"), (True, "_write_external"), (True, "replace")])
def test_save_model_atomic_leaves_nothing_on_failure(tmp_path, monkeypatch, exc, external, fail_in):
    model = _tiny(big=True)
    before = model.SerializeToString()
    old = tmp_path / "out.onnx"
    old.write_bytes(b"old contents")

    def fail(*a, **kw):
        raise exc

    if external:
        monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(onnx_io if fail_in == "_write_external" else onnx_io.os, fail_in, fail)
    with pytest.raises(type(exc)):
        save_model_atomic(model, old, force=True)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]  # no temporary file or folder left
    assert old.read_bytes() == b"old contents"  # and the old file untouched
    assert model.SerializeToString() == before  # nor the caller's model


def test_save_model_atomic_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 0)
    model = _tiny(big=True)
    before = model.SerializeToString()
    save_model_atomic(model, tmp_path / "big.onnx")
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert model.SerializeToString() == before  # the caller's model keeps its weights
    assert _same(load_model(tmp_path / "big.onnx"), model)
    with pytest.raises(OutputError, match="--force"):
        save_model_atomic(model, tmp_path / "big.onnx")
    save_model_atomic(model, tmp_path / "big.onnx", force=True)
    assert _same(load_model(tmp_path / "big.onnx"), model)


def test_error_classes_have_documented_codes():
    codes = {cls.__name__: cls.exit_code for cls in (OnnxzipError, UsageError, ModelError, MismatchError,
                                                     CalibrationDataError, OutputError, InstallError)}
    assert len(set(codes.values())) == len(codes)


@pytest.mark.parametrize("given, expected", [(None, "4"), ("20", "20")])
def test_the_command_stops_openblas_threads_spinning_before_numpy_loads(given, expected):
    """`onnxzip` sets OPENBLAS_THREAD_TIMEOUT (read once, when OpenBLAS loads) before anything imports numpy, and
    keeps a value the user set."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    code = ("import os, sys; from onnxzip import cli\n"
            "try:\n    cli.main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split()[-2:] == [expected, "False"], out.stdout


def test_help_and_version_import_no_numpy_onnx_or_onnxruntime():
    """Start-up: `onnxzip --help` / `--version` import only click and the CLI (numpy, onnx, onnxruntime and scipy
    take seconds to import); the API is imported when a command needs it."""
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from onnxzip.cli import cli; "
            "r = [CliRunner().invoke(cli, a).exit_code for a in (['--help'], ['--version'], ['merge', '--help'])]; "
            "print(r, sorted(m for m in ('numpy', 'onnx', 'onnxruntime', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[0, 0, 0] []", out
    import onnxzip

    assert callable(onnxzip.merge) and callable(onnxzip.merge_models) and onnxzip.MergeOptions is not None
