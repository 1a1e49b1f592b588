"""onnxzip.runtime and the runtime side of `onnxzip eval`: merged models (float32 and float16) in OpenVINO agree
with onnxruntime, `eval --runtime openvino`, throughput and `--compare`, and a broken onnxruntime install is one
`error:` line while `--version`/`--help` do not need onnxruntime at all."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import onnxzip
from onnxzip.calibration import make_session
from onnxzip.cli import cli
from onnxzip.deploy import to_fp16
from onnxzip.errors import InstallError, UsageError
from onnxzip.evaluate import THROUGHPUT_BATCH_SIZES, measure_throughput
from onnxzip.onnx_io import load_model

pytest.importorskip("openvino")
from onnxzip.runtime import OpenVINOSession  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "models")
CALIB = os.path.join(MODELS, "data", "calib.npy")


@pytest.fixture(scope="module")
def merged_resnet():
    """The bundled ResNet-20 pair zipped on 64 samples (no verification: the graph is what matters here)."""
    return onnxzip.merge(os.path.join(MODELS, "resnet20-s0", "a.onnx"), os.path.join(MODELS, "resnet20-s0", "b.onnx"),
                         CALIB, None, num_samples=64, verify=False, device="cpu").model


@pytest.fixture(params=["mlp-s0", "resnet20-s0"])
def merged_model(request, merged_mlp):
    return merged_mlp[1].model if request.param == "mlp-s0" else request.getfixturevalue("merged_resnet")


def _both(model, x):
    names = [o.name for o in model.graph.output]
    return names, OpenVINOSession(model).run(names, {"input": x}), make_session(model, "cpu", "basic").run(
        names, {"input": x})


def test_openvino_float32_matches_onnxruntime(merged_model):
    x = np.load(CALIB)[-256:]
    names, got, want = _both(merged_model, x)
    assert names == ["a/logits", "b/logits"]
    for g, w in zip(got, want):
        assert g.shape == w.shape == (256, 5)
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max()


def test_openvino_float16_agrees_with_onnxruntime(merged_model):
    half = to_fp16(merged_model)
    x = np.load(CALIB)[-256:]
    _, got, want = _both(half, x)
    for g, w in zip(got, want):
        assert g.dtype == np.float32  # io kept in float32
        assert np.mean(g.argmax(1) == w.argmax(1)) >= 0.99


@pytest.fixture(scope="module")
def eval_subset(tmp_path_factory):
    data = np.load(os.path.join(MODELS, "data", "eval.npz"))
    path = tmp_path_factory.mktemp("eval") / "eval.npz"
    np.savez(path, x=data["x"][:1000], y=data["y"][:1000])
    return str(path)


def test_eval_runtime_openvino_reports_what_onnxruntime_does(merged_mlp, eval_subset):
    runner = CliRunner()
    base = ["eval", merged_mlp[0], "--data", eval_subset, "--card", os.path.join(MODELS, "mlp-s0", "card.json"),
            "--no-latency", "--no-throughput", "--json"]
    reports = {}
    for runtime in ("onnxruntime", "openvino"):
        result = runner.invoke(cli, base + ["--runtime", runtime])
        assert result.exit_code == 0, result.output
        reports[runtime] = json.loads(result.stdout)
    assert reports["openvino"]["runtime"] == "openvino"
    for task, acc in reports["onnxruntime"]["per_task_accuracy"].items():
        assert reports["openvino"]["per_task_accuracy"][task] == pytest.approx(acc, abs=2e-3)
    assert reports["openvino"]["joint_accuracy"] == pytest.approx(reports["onnxruntime"]["joint_accuracy"], abs=2e-3)
    bad = runner.invoke(cli, base + ["--runtime", "openvino", "--device", "cuda"])
    assert bad.exit_code == UsageError.exit_code and "--runtime openvino" in bad.stderr


def test_eval_throughput_and_compare(merged_mlp, eval_subset):
    a, b = (os.path.join(MODELS, "mlp-s0", f"{m}.onnx") for m in "ab")
    result = CliRunner().invoke(cli, ["eval", merged_mlp[0], "--data", eval_subset, "--card",
                                      os.path.join(MODELS, "mlp-s0", "card.json"), "--no-latency",
                                      "--compare", a, b])
    assert result.exit_code == 0, result.output
    rows = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    assert all(f"img/s @ {n}" in rows["throughput"] for n in (1, 8, 64))
    assert all(f"img/s @ {n}" in rows["A then B"] for n in (1, 8, 64)) and "one after the other" in rows["A then B"]
    assert rows["speed-up"].count("x @") == 3


def test_measure_throughput_runs_every_model_per_step(merged_mlp, monkeypatch):
    model = merged_mlp[1].model
    calls = []
    from onnxzip import evaluate as evaluate_module

    real = evaluate_module._make_session

    def counting(m, *args):
        session = real(m, *args)
        run = session.run

        def counted(names, feed):
            calls.append((m.graph.name, len(next(iter(feed.values())))))
            return run(names, feed)

        return type("Counted", (), {"run": staticmethod(counted)})()

    monkeypatch.setattr(evaluate_module, "_make_session", counting)
    a = load_model(os.path.join(MODELS, "mlp-s0", "a.onnx"))
    result = measure_throughput([model, a], seconds=0.01, min_repeats=2, max_repeats=2)
    assert list(result) == list(THROUGHPUT_BATCH_SIZES) and all(v > 0 for v in result.values())
    # per batch size: one warm-up step and two timed ones, each running both models on that batch
    expected = [(g, n) for n in THROUGHPUT_BATCH_SIZES for _ in range(3) for g in (model.graph.name, a.graph.name)]
    assert calls == expected


def test_measure_throughput_refuses_a_fixed_batch(merged_mlp):
    model = onnx.ModelProto()
    model.CopyFrom(merged_mlp[1].model)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(UsageError, match="fixed batch size of 1"):
        measure_throughput(model)


# ---------------------------------------------------------------------------------------------------------------
# a broken onnxruntime install
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def broken_onnxruntime(tmp_path):
    """An environment in which `import onnxruntime` fails as it does when the shared library is missing (what
    installing plain onnxruntime over onnxruntime-gpu, or removing one of them, leaves behind)."""
    package = tmp_path / "shadow" / "onnxruntime"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise ImportError('libonnxruntime.so.1: cannot open shared object file: No such file or directory')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shadow"), REPO]))


def _onnxzip(env, *args):
    return subprocess.run([sys.executable, "-m", "onnxzip", *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)


_HELP_SCRIPT = """
import json, sys
from click.testing import CliRunner
from onnxzip.cli import cli
runs = {" ".join(a): CliRunner().invoke(cli, a) for a in
        (["--version"], ["--help"], ["merge", "--help"], ["deploy", "--help"], ["eval", "--help"])}
print(json.dumps({k: [r.exit_code, r.output] for k, r in runs.items()}))
"""


def test_version_and_help_do_not_need_onnxruntime(broken_onnxruntime):
    result = subprocess.run([sys.executable, "-c", _HELP_SCRIPT], env=broken_onnxruntime, capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    runs = json.loads(result.stdout)
    assert runs["--version"] == [0, f"onnxzip {onnxzip.__version__}\n"]
    for args, (code, output) in runs.items():
        assert code == 0 and (args == "--version" or "Usage:" in output), (args, output)
    assert "held back to verify" in runs["merge --help"][1]


def test_broken_onnxruntime_is_one_error_line(broken_onnxruntime, tmp_path):
    a, b = (os.path.join(MODELS, "mlp-s0", f"{m}.onnx") for m in "ab")
    result = _onnxzip(broken_onnxruntime, "merge", a, b, "--data", CALIB, "-o", str(tmp_path / "m.onnx"),
                      "--num-samples", "50")
    assert result.returncode == InstallError.exit_code == 9, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: onnxruntime cannot be used: libonnxruntime.so.1") and "Traceback" not in \
        result.stderr
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in lines[-1]
    assert not (tmp_path / "m.onnx").exists()
