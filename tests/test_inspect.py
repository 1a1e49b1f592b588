"""`onnxzip inspect`: the analysis report, as text and JSON, and the match check of two models."""

import json

import onnx
from click.testing import CliRunner

from onnxzip.cli import cli
from onnxzip.inspect import describe, format_report, inspect_models
from onnxzip.graph import analyse

import fixtures as F


def save(model, path):
    onnx.save(model, str(path))
    return str(path)


def test_report_lists_spaces_heads_and_stop_points():
    model, _ = F.resnet()
    r = describe(analyse(model))
    widths = sorted(s["width"] for s in r["feature_spaces"])
    assert len(r["feature_spaces"]) == len(F.spaces(F.resnet()[1])) + 1  # hidden spaces + the head's output
    assert widths[-1] == 16 and 5 in widths
    stream = max(r["feature_spaces"], key=lambda s: len(s["producers"]))
    assert stream["tied_by"] == ["Add"] and stream["zipped_by_default"]
    assert [h["op"] for h in r["task_heads"]] == ["Gemm"]
    assert r["stop_points"][0]["value"] == "input" and r["stop_points"][-1]["value"] == "heads"
    assert "space" in format_report({"a": r, "match": None})


def test_cli_json_and_text(tmp_path):
    a, pa = F.vgg(lrn=True)
    b, _ = F.permuted_twin(pa)
    path_a, path_b = save(a, tmp_path / "a.onnx"), save(b, tmp_path / "b.onnx")
    result = CliRunner().invoke(cli, ["inspect", path_a, path_b, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["match"]["ok"]
    assert [u["op"] for u in report["a"]["unmerged"]] == ["LRN"]
    result = CliRunner().invoke(cli, ["inspect", path_a])
    assert result.exit_code == 0 and "left unmerged" in result.output and "lrn1 (LRN)" in result.output


def test_cli_reports_first_difference_with_exit_code_4(tmp_path):
    a, _ = F.vgg()
    b, _ = F.vgg(widths=(8, 12, 8))
    result = CliRunner().invoke(cli, ["inspect", save(a, tmp_path / "a.onnx"), save(b, tmp_path / "b.onnx")])
    assert result.exit_code == 4
    assert "DO NOT match" in result.output and "conv2" in result.output


def test_missing_file_is_a_model_error(tmp_path):
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nope.onnx")])
    assert result.exit_code == 3 and "nope.onnx" in result.output


def test_inspect_models_without_b():
    model, _ = F.mlp()
    report = inspect_models(model)
    assert report["match"] is None and report["a"]["weighted_layers"] == 3


def test_nothing_zipped_is_not_reported_as_nothing_unmerged(tmp_path):
    """The one weighted layer is the task head: nothing is unmerged, but nothing is zipped either (issue 13)."""
    from test_merge_errors import nothing_to_zip
    path = save(nothing_to_zip("head_only", 0), tmp_path / "a.onnx")
    result = CliRunner().invoke(cli, ["inspect", path])
    assert result.exit_code == 0, result.output
    assert "left unmerged: nothing" not in result.output and "NOTHING IS ZIPPED" in result.output
    assert "'fc' (Gemm)" in result.output
    report = json.loads(CliRunner().invoke(cli, ["inspect", path, "--json"]).output)
    assert report["a"]["zipped_nothing"] is True and not report["a"]["unmerged"]
    model, _ = F.mlp()
    assert describe(analyse(model))["zipped_nothing"] is False
    assert "left unmerged: nothing" in format_report(inspect_models(model))


def test_views_and_blocks_are_reported():
    """The ShuffleNet unit fixture: chunk and shuffle are views, conv0's space is cut into the halves chunk keeps,
    and every space but the head's is zipped by default (issue 13)."""
    import os
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shuffle", "a.onnx")
    r = inspect_models(onnx.load(path), path_a=path)["a"]
    spaces = r["feature_spaces"]
    assert all(s["zipped_by_default"] for s in spaces if not s["head_output"]), spaces
    assert sum("view_of" in s for s in spaces) == 3 and [s["blocks"] for s in spaces if s["blocks"] > 1] == [2]
    assert "slice/shuffle of space(s)" in format_report({"a": r, "match": None})
