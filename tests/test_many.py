"""N models, --width and --budget (`onnxzip.merge_models`): invariants that must hold exactly.

- N permuted twins of one model merge into that model on every head (permute; zip without same-model merges);
- zip at width N keeps every feature of every model: the ensemble's outputs; width 1 is the default, byte for byte;
- two models through `merge_models` are byte-identical to `merge`;
- a budget's choice fits the budget, costs what the card says, and is the candidate closest to the originals;
- wrong models, names and budgets are errors naming the thing at fault before any model runs.
"""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import onnxzip
from onnxzip.cli import cli
from onnxzip.errors import MismatchError, UsageError
from onnxzip.evaluate import count_macs, count_parameters

try:
    from tests import fixtures as F
except ImportError:  # pytest put tests/ itself on sys.path
    import fixtures as F

ATOL = 1e-4


def run(model, x):
    return F.run(model, x)


def heads(model):
    return [o.name for o in model.graph.output]


@pytest.fixture(scope="module")
def triplets():
    """arch -> (A, twin 1, twin 2): A and two differently permuted copies."""
    out = {}
    for arch in ("mlp", "vgg", "resnet"):
        a, pa = F.ARCHS[arch](seed=11)
        b, _ = F.permuted_twin(pa, np.random.RandomState(5))
        c, _ = F.permuted_twin(pa, np.random.RandomState(6))
        out[arch] = (a, b, c)
    return out


@pytest.fixture(scope="module")
def strangers():
    """Three independently initialised models with 5, 3 and 4 classes (not twins)."""
    models = [F.ARCHS["vgg"](seed=s, classes=k)[0] for s, k in ((21, 5), (22, 3), (23, 4))]
    return models


@pytest.mark.parametrize("refit", ["ls", "none"])
@pytest.mark.parametrize("method", ["permute", "zip"])
@pytest.mark.parametrize("arch", ["mlp", "vgg", "resnet"])
def test_three_twins_merge_exactly(triplets, arch, method, refit):
    a, b, c = triplets[arch]
    kw = {"beta": 0.0} if method == "zip" else {}
    result = onnxzip.merge_models([a, b, c], F.calib(a, 256), method=method, refit=refit, **kw)
    merged = result.model
    assert heads(merged) == ["a/logits", "b/logits", "c/logits"]
    assert result.card["num_models"] == 3 and len(result.card["inputs"]) == 3
    weighted = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in a.graph.node)
    got = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in merged.graph.node)
    assert got == (weighted - 1) + 3, f"{arch}: {got} weighted layers, expected a shared trunk and three heads"
    x = F.calib(a, 64, seed=987)
    want = run(a, x)["logits"]
    out = run(merged, x)
    for name in heads(merged):
        err = float(np.max(np.abs(out[name] - want)))
        assert err <= ATOL, f"{arch} {method} refit={refit} {name}: max abs error {err:.3g}"


@pytest.mark.parametrize("refit", ["none", "ls"])
def test_zip_at_width_n_is_the_ensemble(strangers, refit):
    models = strangers
    merged = onnxzip.merge_models(models, F.calib(models[0], 256), width=3, refit=refit).model
    x = F.calib(models[0], 64, seed=987)
    out = run(merged, x)
    for name, model in zip("abc", models):
        want = run(model, x)["logits"]
        got = out[f"{name}/logits"]
        assert got.shape == want.shape
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        # without the refit every feature is kept exactly; the refit refits them to the same targets
        assert rel <= (1e-5 if refit == "none" else 1e-3), f"{name}: relative error {rel:.3g}"


def test_width_grows_the_trunk(strangers):
    """Wider merged spaces cost more; a merged layer is dense, so at width W its cost grows about as W² (at width N
    it holds the N models' layers on its block diagonal and zeros elsewhere: more than the ensemble)."""
    models = strangers
    data = F.calib(models[0], 256)
    sizes = []
    for width in (1, 1.5, 2, 3):
        result = onnxzip.merge_models(models, data, width=width, refit="none", verify=False)
        sizes.append(count_parameters(result.model))
        if width != 1:
            assert result.card["width"] == width
            assert all(s["merged_width"] == int(np.floor(width * s["width"] + 0.5)) for s in result.card["spaces"])
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1], sizes
    ensemble = onnxzip.merge_models(models, data, method="ensemble", verify=False).model
    assert sizes[0] < count_parameters(ensemble) < sizes[-1]


def test_width_one_is_the_default_and_two_models_are_merge(triplets):
    a, b, _ = triplets["vgg"]
    data = F.calib(a, 128)
    default = onnxzip.merge(a, b, data, verify=False).model.SerializeToString()
    assert onnxzip.merge(a, b, data, verify=False, width=1).model.SerializeToString() == default
    assert onnxzip.merge_models([a, b], data, verify=False).model.SerializeToString() == default
    assert onnxzip.merge_models((a, b), data, verify=False, names=("a", "b")).model.SerializeToString() == default


def test_twins_at_width_one_and_a_half_stay_exact(triplets):
    a, b, _ = triplets["resnet"]
    merged = onnxzip.merge_models([a, b], F.calib(a, 256), beta=0.0, width=1.5, refit="none").model
    x = F.calib(a, 64, seed=987)
    want = run(a, x)["logits"]
    out = run(merged, x)
    for name in ("a/logits", "b/logits"):
        assert float(np.max(np.abs(out[name] - want))) <= ATOL
    assert count_parameters(merged) > count_parameters(a)


def test_budget_fits_and_picks_the_closest_candidate(strangers):
    models = strangers
    result = onnxzip.merge_models(models, F.calib(models[0], 320), budget="macs=0.6", refit="none")
    budget = result.card["budget"]
    shapes = {models[0].graph.input[0].name: F.input_shape(models[0], 1)}
    ensemble = sum(count_macs(m, shapes) for m in models)
    assert budget["ensemble_cost"] == ensemble
    chosen = budget["chosen"]
    assert chosen["cost"] <= 0.6 * ensemble
    merged_macs = count_macs(result.model, shapes)
    assert merged_macs == chosen["cost"], (merged_macs, chosen)
    errors = [c["held_back_error"] for c in budget["candidates"]]
    assert chosen["held_back_error"] == min(errors)
    assert all(c["cost"] <= 0.6 * ensemble for c in budget["frontier"])
    assert result.card["stop_at"] == chosen["stop_at"]
    # a bigger budget allows at least as much
    wider = onnxzip.merge_models(models, F.calib(models[0], 320), budget="macs=0.9", refit="none", verify=False)
    assert wider.card["budget"]["chosen"]["cost"] <= 0.9 * ensemble
    assert max(c["width"] for c in wider.card["budget"]["frontier"]) >= max(c["width"] for c in budget["frontier"])


def _no_model_runs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model ran before the error")

    monkeypatch.setattr(ort, "InferenceSession", refuse)


def test_budget_below_any_stop_point_is_a_usage_error_before_any_model_runs(strangers, monkeypatch):
    _no_model_runs(monkeypatch)
    with pytest.raises(UsageError, match="below what any stop point can reach"):
        onnxzip.merge_models(strangers, F.calib(strangers[0], 64), budget="params=0.2")


@pytest.mark.parametrize("kw, match", [
    ({"names": ("a", "b")}, "3 different names"),
    ({"names": ("a", "b", "a")}, "3 different names"),
    ({"width": 3.5}, "between 1 and the number of models"),
    ({"width": 0.5}, "between 1 and the number of models"),
    ({"width": 2, "method": "permute"}, "only --method zip"),
    ({"budget": "macs=0.5", "width": 2}, "not both"),
    ({"budget": "macs=0.5", "stop_at": 2}, "not both"),
    ({"budget": "flops=0.5"}, "params=R or macs=R"),
    ({"budget": "macs=0.5", "method": "ensemble"}, "zips nothing"),
])
def test_bad_n_model_options_are_usage_errors(strangers, monkeypatch, kw, match):
    _no_model_runs(monkeypatch)
    with pytest.raises(UsageError, match=match):
        onnxzip.merge_models(strangers, F.calib(strangers[0], 64), **kw)


def test_fewer_than_two_models_is_a_usage_error(strangers):
    with pytest.raises(UsageError, match="at least two models"):
        onnxzip.merge_models(strangers[:1], F.calib(strangers[0], 64))


def test_mismatched_model_among_n_is_named(strangers, tmp_path, monkeypatch):
    paths = []
    other = F.ARCHS["vgg"](seed=24, widths=(8, 12, 8))[0]
    for k, model in enumerate([strangers[0], strangers[1], other]):
        paths.append(str(tmp_path / f"m{k}.onnx"))
        onnx.save(model, paths[-1])
    _no_model_runs(monkeypatch)
    with pytest.raises(MismatchError) as info:
        onnxzip.merge_models(paths, F.calib(strangers[0], 64))
    assert paths[2] in str(info.value) and paths[1] not in str(info.value)


def test_cli_merges_three_models_with_names(strangers, tmp_path):
    paths = []
    for k, model in enumerate(strangers):
        paths.append(str(tmp_path / f"m{k}.onnx"))
        onnx.save(model, paths[-1])
    np.save(tmp_path / "x.npy", F.calib(strangers[0], 256))
    out = tmp_path / "merged.onnx"
    result = CliRunner().invoke(cli, ["merge", *paths, "--data", str(tmp_path / "x.npy"), "-o", str(out),
                                      "--names", "cats,dogs,birds", "--width", "1.5", "-q"])
    assert result.exit_code == 0, result.output
    merged = onnx.load(str(out))
    assert heads(merged) == ["cats/logits", "dogs/logits", "birds/logits"]
    card = json.loads((tmp_path / "merged.onnx.json").read_text())
    assert card["width"] == 1.5 and card["options"]["names"] == ["cats", "dogs", "birds"]
    assert sorted(card["inputs"]) == ["birds", "cats", "dogs"]
    assert set(card["parameters"]) == {"merged", "a", "b", "c"}
    bad = CliRunner().invoke(cli, ["merge", *paths, "--data", str(tmp_path / "x.npy"), "-o",
                                   str(tmp_path / "out2.onnx"), "--names", "cats,dogs"])
    assert bad.exit_code == 2 and "one name per model" in bad.output
    assert not (tmp_path / "out2.onnx").exists()
    one = CliRunner().invoke(cli, ["merge", paths[0], "--data", str(tmp_path / "x.npy"), "-o",
                                   str(tmp_path / "out2.onnx")])
    assert one.exit_code == 2 and "at least two models" in one.output


def test_inspect_takes_n_models(strangers, tmp_path):
    paths = []
    for k, model in enumerate(strangers + [F.ARCHS["vgg"](seed=24, widths=(8, 12, 8))[0]]):
        paths.append(str(tmp_path / f"m{k}.onnx"))
        onnx.save(model, paths[-1])
    ok = CliRunner().invoke(cli, ["inspect", *paths[:3]])
    assert ok.exit_code == 0 and "all 3 models match" in ok.output
    bad = CliRunner().invoke(cli, ["inspect", *paths])
    assert bad.exit_code == 4 and paths[3] in bad.output


def test_params_budget_counts_parameters(strangers):
    models = strangers
    result = onnxzip.merge_models(models, F.calib(models[0], 320), budget=("params", 0.5), refit="none",
                                  verify=False)
    budget = result.card["budget"]
    # the ensemble as onnxzip writes it (BatchNorms folded into the layers before them, as in every merge)
    ensemble = onnxzip.merge_models(models, F.calib(models[0], 64), method="ensemble", verify=False).model
    assert budget["kind"] == "params" and budget["ensemble_cost"] == count_parameters(ensemble)
    assert count_parameters(result.model) == budget["chosen"]["cost"] <= 0.5 * budget["ensemble_cost"]
    assert budget["candidates"] and all(c["cost"] <= 0.5 * budget["ensemble_cost"] for c in budget["candidates"])


def test_budget_without_samples_to_hold_back_and_models_not_a_list_are_clear_errors(strangers, monkeypatch):
    from onnxzip.errors import CalibrationDataError

    _no_model_runs(monkeypatch)
    with pytest.raises(CalibrationDataError, match="too few calibration samples .* --budget"):
        onnxzip.merge_models(strangers, F.calib(strangers[0], 4), budget="macs=0.9")
    with pytest.raises(UsageError, match="list of model paths"):
        onnxzip.merge_models(strangers[0], F.calib(strangers[0], 64))
