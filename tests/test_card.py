"""The merge card (`<output>.json`, mirrored in the model's metadata under `onnxzip.card`) and determinism: the same
inputs and seed give a byte-identical model file, even when the statistics move in their last bits."""
import hashlib
import importlib
import json
import math

import numpy as np
import onnx
import pytest

import onnxzip
from onnxzip.stats import FeatureStats

try:
    from tests import fixtures as F
except ImportError:  # pytest put tests/ itself on sys.path
    import fixtures as F

M = importlib.import_module("onnxzip.pipeline")


@pytest.fixture(scope="module")
def vgg_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vgg")
    (a, _), (b, _) = F.random_pair("vgg", seed=11)
    onnx.save(a, str(d / "a.onnx"))
    onnx.save(b, str(d / "b.onnx"))
    np.save(d / "calib.npy", F.calib(a, 160))
    return d


@pytest.fixture(scope="module")
def merged(vgg_files):
    d = vgg_files
    result = onnxzip.merge(d / "a.onnx", d / "b.onnx", d / "calib.npy", d / "m.onnx", alpha=0.5, beta=0.25,
                           seed=7, names=("left", "right"))
    return d, result


def _no_nan(text):
    json.loads(text, parse_constant=lambda c: pytest.fail(f"card holds {c}"))


def test_card_file_and_metadata(merged):
    d, result = merged
    text = (d / "m.onnx.json").read_text()
    _no_nan(text)
    card = json.loads(text)
    assert card == result.card
    model = onnx.load(str(d / "m.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert set(meta) >= {"onnxzip.card"}
    _no_nan(meta["onnxzip.card"])
    mirrored = json.loads(meta["onnxzip.card"])
    # wall times only in the file: the model must not change from run to run
    assert "seconds" not in mirrored and set(card["seconds"]) >= {"analyse", "calibrate", "solve", "surgery",
                                                                  "refit", "verify", "total"}
    assert {k: v for k, v in card.items() if k != "seconds"} == mirrored


def test_card_contents(merged):
    d, result = merged
    card = result.card
    assert card["tool"] == "onnxzip" and card["version"] == onnxzip.__version__
    for name, file in (("left", "a.onnx"), ("right", "b.onnx")):
        assert card["inputs"][name]["sha256"] == hashlib.sha256((d / file).read_bytes()).hexdigest()
        assert card["inputs"][name]["path"].endswith(file)
    assert (card["method"], card["alpha"], card["beta"], card["seed"]) == ("zip", 0.5, 0.25, 7)
    assert card["options"]["names"] == ["left", "right"] and card["options"]["repair"] is True
    # 160 samples: 32 held back for verification, 128 for calibration
    assert card["calibration"]["samples"] == 128 and card["calibration"]["verification_samples"] == 32
    assert card["calibration"]["source"].endswith("calib.npy")
    assert len(card["spaces"]) == 4
    for space in card["spaces"]:
        assert space["width"] in (8, 16)
        assert space["cross_model_merges"] + sum(space["within_model_merges"]) == space["width"]
        assert -1 <= space["mean_merged_correlation"] <= 1
        assert space["thin_statistics"] is False and space["samples"] >= 128
    # the least-squares refit (default) fits the 4 trunk layers and both heads, and supersedes the repair
    assert card["repair"] == {"applied": False, "superseded_by_refit": True}
    assert card["refit"]["applied"] is True and len(card["refit"]["layers"]) == 6
    assert card["refit"]["held_back_samples"] == 32 and card["calibration"]["held_back_samples"] == 32
    ver = card["verification"]
    assert ver["samples"] == 32 and ver["held_back"] is True
    assert [h["output"] for h in ver["heads"]] == ["left/logits", "right/logits"]
    for head in ver["heads"]:
        assert 0 <= head["top1_agreement"] <= 1 and head["relative_error"] >= 0 and -1 <= head["kappa"] <= 1
    assert card["parameters"]["merged"] < card["parameters"]["a"] + card["parameters"]["b"]


def test_summary_lines_report_verification(merged):
    _, result = merged
    lines = result.summary_lines()
    text = "\n".join(lines)
    assert "left/logits" in text and "right/logits" in text and "relative error" in text
    assert "top-1 agreement" in text and "held-back" in text
    assert lines[-1].startswith("wrote ")


def test_card_for_in_memory_inputs_and_no_verify():
    (a, _), (b, _) = F.random_pair("mlp", seed=2)
    card = onnxzip.merge(a, b, F.calib(a, 64), verify=False, method="permute").card
    assert card["inputs"]["a"]["path"] is None
    assert card["inputs"]["a"]["sha256"] == hashlib.sha256(a.SerializeToString()).hexdigest()
    assert card["calibration"]["source"] is None and card["calibration"]["verification_samples"] == 0
    assert card["verification"] == {}
    assert "verify" not in card["seconds"]
    json.dumps(card, allow_nan=False)


def test_no_nan_in_card_when_nothing_is_merged():
    """average's mean correlation, ensemble's empty spaces: null (never NaN) where there is no figure."""
    (a, _), (b, _) = F.random_pair("mlp", seed=2)
    for method in ("average", "ensemble"):
        card = onnxzip.merge(a, b, F.calib(a, 64), method=method).card
        json.dumps(card, allow_nan=False)
    assert M._measured(float("nan")) is None and M._measured(float("inf")) is None
    assert M._plain({"x": (np.float32(1.5), np.int64(3), np.bool_(True), float("nan"))}) == {
        "x": [1.5, 3, True, None]}


@pytest.mark.parametrize("arch,method", [("vgg", "zip"), ("resnet", "zip"), ("resnet", "permute"),
                                         ("mlp", "average")])
def test_same_inputs_same_bytes(arch, method, tmp_path):
    (a, _), (b, _) = F.random_pair(arch, seed=12)
    onnx.save(a, str(tmp_path / "a.onnx"))
    onnx.save(b, str(tmp_path / "b.onnx"))
    np.save(tmp_path / "x.npy", F.calib(a, 128))
    files = []
    for k in range(2):
        out = tmp_path / f"m{k}.onnx"
        onnxzip.merge(tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "x.npy", out, method=method, seed=3)
        files.append(out.read_bytes())
    assert files[0] == files[1], "the same inputs and seed gave two different model files"


def test_last_bit_noise_in_statistics_does_not_change_the_model(monkeypatch):
    """onnxruntime may sum in another order from run to run. Duplicate units make exact ties in the correlation
    (which the greedy zip breaks by index); noise of 1e-13 on it must not flip a matching."""
    _, p = F.mlp(0, hidden=(12, 12))
    for k, src in ((3, 4), (7, 4), (9, 1)):  # duplicate units: ties
        p["w"]["fc1.weight"][k] = p["w"]["fc1.weight"][src]
        p["w"]["fc1.bias"][k] = p["w"]["fc1.bias"][src]
    a = F.build(p)
    b, _ = F.permuted_twin(p, 3)
    x = F.calib(a, 128)
    clean = onnxzip.merge(a, b, x, beta=0.25).model.SerializeToString()
    real = FeatureStats.correlation
    rng = np.random.RandomState(0)

    def noisy(self, *args, **kw):
        c = real(self, *args, **kw)
        noise = rng.uniform(-1e-13, 1e-13, c.shape)
        c = c + (noise + noise.T) / 2
        np.fill_diagonal(c, 1.0)
        return c

    monkeypatch.setattr(FeatureStats, "correlation", noisy)
    for _ in range(3):
        assert onnxzip.merge(a, b, x, beta=0.25).model.SerializeToString() == clean


def test_card_figures_are_rounded():
    assert M._measured(0.123456789123) == 0.123457
    assert M._measured(123456789.0) == 123457000.0
    assert math.isclose(M._measured(1e-300), 1e-300)
