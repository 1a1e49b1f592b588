"""onnxzip.deploy and `onnxzip deploy`: the Triton model repository (config parsed by Triton's own ModelConfig
schema), fp16 and opset conversions and their checks, models without a card, never overwriting a model folder."""

import json
import logging
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

import onnxzip
from onnxzip.cli import cli
from onnxzip.deploy import (FP16_MIN_AGREEMENT, compare_outputs, deploy, ir_version_for_opset, parse_instances,
                            read_merge_card, triton_config)
from onnxzip.errors import OutputError, UnsupportedModelError, UsageError, VerificationError
from onnxzip.onnx_io import load_model

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "models")
CALIB = os.path.join(MODELS, "data", "calib.npy")
PAIRS = sorted(d for d in os.listdir(MODELS) if os.path.isfile(os.path.join(MODELS, d, "card.json")))


def _members(folder):
    """The model files of a bundled pair or group: a.onnx, b.onnx (, c.onnx, …)."""
    files = [os.path.join(folder, f"{m}.onnx") for m in "abcdefgh"]
    return [f for f in files if os.path.isfile(f)]


@pytest.fixture
def merged(merged_mlp):
    """The bundled MLP pair zipped on 300 calibration samples (60 held back): (path, MergeResult)."""
    return merged_mlp


def parse_config(path) -> "model_config_pb2.ModelConfig":
    with open(path, encoding="utf-8") as f:
        return text_format.Parse(f.read(), model_config_pb2.ModelConfig())


def _dims(value):
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def _run(model, x):
    from onnxzip.calibration import make_session

    session = make_session(model, "cpu", "basic")
    return session.run(None, {model.graph.input[0].name: x})


# ---------------------------------------------------------------------------------------------------------------
# the Triton configuration
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair", PAIRS)
def test_config_of_every_bundled_pair_parses_as_triton_model_config(pair, tmp_path):
    """Every bundled pair (and group of N models), merged (as an ensemble: the same inputs and heads as a zip, built
    without calibration), deploys to a config that Triton's schema parses, that survives a round trip, and that says
    what the model is."""
    folder = os.path.join(MODELS, pair)
    out = tmp_path / "merged.onnx"
    members = _members(folder)
    onnxzip.merge_models(members, CALIB, str(out), method="ensemble", num_samples=10, verify=False, device="cpu")
    result = deploy(str(out), tmp_path / "repo", name="zipped", card=os.path.join(folder, "card.json"),
                    max_batch_size=32, instances="gpu:2")
    config = parse_config(tmp_path / "repo" / "zipped" / "config.pbtxt")
    again = text_format.Parse(text_format.MessageToString(config), model_config_pb2.ModelConfig())
    assert again == config
    model = load_model(tmp_path / "repo" / "zipped" / "1" / "model.onnx")
    assert config.name == "zipped" and config.backend == "onnxruntime" and config.max_batch_size == 32
    assert [i.name for i in config.input] == ["input"] and list(config.input[0].dims) == _dims(model.graph.input[0])[1:]
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    with open(os.path.join(folder, "card.json"), encoding="utf-8") as f:
        tasks = json.load(f)["tasks"]
    assert [o.name for o in config.output] == [f"{t}/logits" for t in "abcdefgh"[:len(members)]]
    assert all(list(o.dims) == [len(tasks[o.name.split("/")[0]])] and o.data_type == model_config_pb2.TYPE_FP32
               for o in config.output)
    assert config.HasField("dynamic_batching")
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert config.instance_group[0].count == 2
    with open(os.path.join(folder, "card.json"), encoding="utf-8") as f:
        card = json.load(f)
    for output in config.output:
        task = output.name.split("/")[0]
        labels = (tmp_path / "repo" / "zipped" / output.label_filename).read_text().splitlines()
        assert labels == [card["class_names"][c] for c in card["tasks"][task]]
    assert result.card["deploy"]["onnxzip_merge"] and result.card["method"] == "ensemble"


def test_static_batch_is_refused_and_served_unbatched_with_max_batch_size_0(merged, tmp_path):
    model = load_model(merged[0])
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(UnsupportedModelError, match=r"input 'input' has a fixed batch dimension of 1.*"
                                                    r"--max-batch-size 0"):
        deploy(model, tmp_path / "repo", name="static")
    assert not (tmp_path / "repo" / "static").exists()
    deploy(model, tmp_path / "repo", name="static", max_batch_size=0)
    config = parse_config(tmp_path / "repo" / "static" / "config.pbtxt")
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 1, 28, 28]
    assert list(config.output[0].dims) == [1, 5] and not config.HasField("dynamic_batching")


def test_triton_config_options():
    model = load_model(os.path.join(MODELS, "mlp-s0", "a.onnx"))
    assert parse_instances("cpu") == ("KIND_CPU", 1) and parse_instances("GPU:3") == ("KIND_GPU", 3)
    for bad in ("tpu", "gpu:0", "cpu:x", "gpu:", ""):
        with pytest.raises(UsageError, match="--instances"):
            parse_instances(bad)
    with pytest.raises(UsageError, match="--max-batch-size"):
        triton_config(model, "m", max_batch_size=-1)
    text = triton_config(model, 'we"ird', label_files={"logits": "a b.txt"})
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == 'we"ird' and config.output[0].label_filename == "a b.txt"


# ---------------------------------------------------------------------------------------------------------------
# the repository: never half-written, never overwritten without force; models without a card
# ---------------------------------------------------------------------------------------------------------------


def test_existing_model_folder_is_kept_without_force(merged, tmp_path):
    repo = tmp_path / "repo"
    deploy(merged[0], repo, name="m")
    before = {p: p.read_bytes() for p in (repo / "m").rglob("*") if p.is_file()}
    (repo / "m" / "stray.txt").write_text("left from an older deploy")
    with pytest.raises(OutputError, match=r"model folder '.*/repo/m' already exists; use --force"):
        deploy(merged[0], repo, name="m", max_batch_size=8)
    assert all(p.read_bytes() == data for p, data in before.items())
    deploy(merged[0], repo, name="m", max_batch_size=8, force=True)
    assert parse_config(repo / "m" / "config.pbtxt").max_batch_size == 8
    assert not (repo / "m" / "stray.txt").exists()  # the folder is replaced whole
    assert sorted(p.name for p in repo.iterdir()) == ["m"]  # no temporary folder left


def test_failed_deploy_leaves_the_old_folder(merged, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    deploy(merged[0], repo, name="m")
    config = (repo / "m" / "config.pbtxt").read_text()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("onnxzip.deploy._write_text", broken)
    with pytest.raises(OutputError, match="No space left"):
        deploy(merged[0], repo, name="m", max_batch_size=8, force=True)
    assert (repo / "m" / "config.pbtxt").read_text() == config
    assert sorted(p.name for p in repo.iterdir()) == ["m"]


def test_model_without_card_deploys_with_generic_names_and_a_warning(tmp_path, caplog):
    path = os.path.join(MODELS, "mlp-s0", "a.onnx")
    with caplog.at_level(logging.WARNING, logger="onnxzip"):
        result = deploy(path, tmp_path / "repo")
    assert any("not an onnxzip merge" in r.getMessage() for r in caplog.records)
    assert result.warnings and result.card["deploy"]["onnxzip_merge"] is False
    config = parse_config(tmp_path / "repo" / "a" / "config.pbtxt")
    assert [o.name for o in config.output] == ["logits"] and not config.output[0].label_filename
    deployed = load_model(tmp_path / "repo" / "a" / "1" / "model.onnx")
    assert read_merge_card(deployed)["deploy"]["name"] == "a"


def test_card_that_names_no_head_is_a_usage_error(merged, tmp_path):
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"tasks": {"cats": [0, 1], "dogs": [2, 3]}}))
    with pytest.raises(UsageError, match="name no output"):
        deploy(merged[0], tmp_path / "repo", card=str(card))
    card.write_text(json.dumps({"tasks": {"a": [0, 1, 2], "b": [3, 4, 5]}}))
    with pytest.raises(UsageError, match="has 5 outputs, but task 'a'"):
        deploy(merged[0], tmp_path / "repo", card=str(card))
    assert not (tmp_path / "repo").exists()


# ---------------------------------------------------------------------------------------------------------------
# fp16 and opset conversions
# ---------------------------------------------------------------------------------------------------------------


def test_fp16_deploy_is_checked_on_the_merges_held_back_samples(merged, tmp_path):
    path, result = merged
    out = deploy(path, tmp_path / "repo", name="half", fp16=True)
    half = load_model(tmp_path / "repo" / "half" / "1" / "model.onnx")
    source = result.model
    assert any(i.data_type == TensorProto.FLOAT16 for i in half.graph.initializer)
    assert not any(i.data_type == TensorProto.FLOAT for i in half.graph.initializer)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # io kept in float32
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in half.graph.output)
    assert half.ir_version == source.ir_version <= 10
    assert [(o.domain, o.version) for o in half.opset_import] == [(o.domain, o.version) for o in source.opset_import]
    check = out.card["deploy"]["fp16"]
    held = result.card["calibration"]["verification_samples"]
    assert check["samples"] == held == 60 and check["sample_source"].startswith("held-back")
    # the figures in the card are those of the written model on the merge's last 60 of its 300 samples
    calib = np.load(CALIB)
    chosen = np.sort(np.random.default_rng(0).choice(len(calib), 300, replace=False))
    x = calib[chosen][-held:]
    want, got = _run(source, x), _run(half, x)
    for head, w, g in zip(check["heads"], want, got):
        assert head["top1_agreement"] == pytest.approx(np.mean(w.argmax(1) == g.argmax(1)))
        assert head["max_relative_error"] == pytest.approx(np.abs(g - w).max() / np.abs(w).max(), rel=1e-4)
        assert head["top1_agreement"] >= FP16_MIN_AGREEMENT and 0 < head["max_relative_error"] < 1e-2


def _fragile_model():
    """logits = x · [1, 1 + 1e-4]: in float32 the second class wins where x > 0, the first where x < 0; float16
    rounds both weights to 1 (its spacing there is 1e-3), a tie the first class always wins. (onnxruntime on CPU
    computes float16 Gemm in float32, so the rounding must be in the weights to show.)"""
    w = numpy_helper.from_array(np.array([[1.0, 1.0 + 1e-4]], np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["a/logits"])], "fragile",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
                              [helper.make_tensor_value_info("a/logits", TensorProto.FLOAT, ["N", 2])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_fp16_below_min_agreement_is_an_error_unless_force(tmp_path):
    x = np.random.default_rng(0).standard_normal((200, 1)).astype(np.float32)
    with pytest.raises(VerificationError, match=r"below 0.99 on 'a/logits'.*--force"):
        deploy(_fragile_model(), tmp_path / "repo", name="fragile", fp16=True, data=x)
    assert not (tmp_path / "repo" / "fragile").exists()
    result = deploy(_fragile_model(), tmp_path / "repo", name="fragile", fp16=True, data=x, force=True)
    check = result.card["deploy"]["fp16"]
    assert check["accepted_below_min"] and check["heads"][0]["top1_agreement"] < 0.9


def test_fp16_without_samples_asks_for_data(tmp_path):
    with pytest.raises(UsageError, match="--data"):
        deploy(os.path.join(MODELS, "mlp-s0", "a.onnx"), tmp_path / "repo", fp16=True)


def test_merge_fp16_writes_a_checked_float16_model(tmp_path):
    result = onnxzip.merge(os.path.join(MODELS, "mlp-s0", "a.onnx"), os.path.join(MODELS, "mlp-s0", "b.onnx"),
                           CALIB, str(tmp_path / "half.onnx"), num_samples=300, device="cpu", fp16=True)
    model = load_model(tmp_path / "half.onnx")
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    assert model.ir_version == load_model(os.path.join(MODELS, "mlp-s0", "a.onnx")).ir_version
    card = json.loads((tmp_path / "half.onnx.json").read_text())
    assert card["fp16"]["samples"] == card["calibration"]["verification_samples"] == 60
    assert card["options"]["fp16"] and read_merge_card(model)["fp16"] == card["fp16"]
    assert [h["output"] for h in card["fp16"]["heads"]] == ["a/logits", "b/logits"]
    assert "float16: checked against the float32 merge on 60 held-back" in "\n".join(result.summary_lines())


def test_target_opset_up_keeps_outputs_and_down_below_relu_14_is_refused(merged, tmp_path):
    path, result = merged
    out = deploy(path, tmp_path / "repo", name="o21", target_opset=21)
    model = load_model(tmp_path / "repo" / "o21" / "1" / "model.onnx")
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    assert model.ir_version == ir_version_for_opset(21) == 10
    conv = out.card["deploy"]["opset_conversion"]
    assert conv["from"] == 17 and conv["to"] == 21 and all(h["max_relative_error"] <= 1e-5 for h in conv["heads"])
    x = np.load(CALIB)[:32]
    for g, w in zip(_run(model, x), _run(result.model, x)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(UnsupportedModelError, match=r"from opset 17 to 13: .*Relu"):
        deploy(path, tmp_path / "repo", name="o13", target_opset=13)
    with pytest.raises(UsageError, match="--ir-version goes with --target-opset"):
        deploy(path, tmp_path / "repo", name="x", ir_version=8)


def test_compare_outputs_finds_a_changed_head(merged):
    model = merged[1].model
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    last = changed.graph.node[-1]
    bias = next(i for i in changed.graph.initializer if i.name == last.input[2])
    value = numpy_helper.to_array(bias).copy()
    value[0] += 100.0  # head b's first class wins everywhere
    bias.CopyFrom(numpy_helper.from_array(value, bias.name))
    heads = compare_outputs(model, changed, {"input": np.load(CALIB)[:50]})
    by_name = {h["output"]: h for h in heads}
    changed_head = last.output[0]
    other = next(n for n in by_name if n != changed_head)
    assert by_name[other]["max_relative_error"] == 0 and by_name[other]["top1_agreement"] == 1
    assert by_name[changed_head]["max_relative_error"] > 1 and by_name[changed_head]["top1_agreement"] < 1


# ---------------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------------


def test_cli_deploy_end_to_end(merged, tmp_path):
    runner = CliRunner()
    args = ["deploy", merged[0], "--triton", str(tmp_path / "repo"), "--name", "zip",
            "--card", os.path.join(MODELS, "mlp-s0", "card.json"), "--instances", "cpu:2"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "model 'zip' version 1: 2 output(s) (a/logits, b/logits), max_batch_size 64" in result.stdout
    assert "a/logits: labels in a_logits.labels.txt" in result.stdout
    assert parse_config(tmp_path / "repo" / "zip" / "config.pbtxt").instance_group[0].count == 2
    again = runner.invoke(cli, args)
    assert again.exit_code == OutputError.exit_code == 8
    assert again.stderr.startswith("error: model folder") and again.stderr.count("\n") == 1
    assert runner.invoke(cli, args + ["--force", "--version", "3"]).exit_code == 0
    assert (tmp_path / "repo" / "zip" / "3" / "model.onnx").is_file()
    bad = runner.invoke(cli, args + ["--force", "--instances", "tpu"])
    assert bad.exit_code == 2 and "--instances 'tpu'" in bad.stderr
