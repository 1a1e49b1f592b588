"""End-to-end invariants of `onnxzip.merge` that must hold exactly, checked from outside the core.

The fixtures (tests/fixtures.py) build models by hand and permute their hidden units without onnxzip's graph
analysis, so a mistake in analysis or surgery shows up here as a wrong number:

- A merged with a channel-permuted copy of itself (permute, or zip without same-model merges) computes A on both
  heads, with the least-squares refit and with and without statistics repair;
- a model merged with itself gives back that model, whatever the method;
- stopping at the input is the ensemble, and the ensemble is A and B side by side;
- the merged file is valid ONNX, runs the same at every onnxruntime optimisation level, keeps the opset, and a full
  zip costs about one model.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxzip

try:
    from tests import fixtures as F
except ImportError:  # pytest put tests/ itself on sys.path
    import fixtures as F

ARCHS = ["mlp", "vgg", "resnet"]
ATOL = 1e-4
EXACT = 1e-5
LEVELS = [
    ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
]


def held_out(model, n=64):
    """Test inputs, drawn independently of the calibration data (seed 0)."""
    return F.calib(model, n=n, seed=987)


def merge(a, b, data, **kw):
    kw.setdefault("progress", False)
    return onnxzip.merge(a, b, data, **kw)


def outputs(merged, x, level=None):
    out = F.run(merged, x, level)
    assert "a/logits" in out and "b/logits" in out, f"merged outputs are {sorted(out)}"
    return out["a/logits"], out["b/logits"]


def assert_close(got, want, atol, what):
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:g} (output scale {np.abs(want).max():.3g})"


def check_interface(merged, a):
    """Inputs as in A, then a/<out>, then b/<out>; A's opset; ir_version <= 10."""
    assert [i.name for i in merged.graph.input] == [i.name for i in a.graph.input]
    assert [o.name for o in merged.graph.output] == ["a/logits", "b/logits"]
    opsets = {o.domain: o.version for o in merged.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == F.OPSET, f"opset_import {opsets}"
    assert merged.ir_version <= 10, f"ir_version {merged.ir_version}"


WEIGHTED = ("Conv", "Gemm", "MatMul")


def weighted_count(model):
    return sum(n.op_type in WEIGHTED for n in model.graph.node)


def check_trunk(merged, a, shared, what):
    """The first `shared` weighted layers of A are computed once, every other one once per model.

    Without this an 'ensemble' in disguise (nothing merged) would pass every exactness test."""
    n = weighted_count(a)
    got = weighted_count(merged)
    want = shared + 2 * (n - shared)
    assert got == want, f"{what}: {got} weighted layers in the merged graph, expected {want} ({shared} shared of {n})"


def check_file(path, a, x, want_a, want_b, atol):
    """The merged file passes the full checker and computes the same at every ORT optimisation level."""
    onnx.checker.check_model(str(path), full_check=True)
    merged = onnx.load(str(path))
    check_interface(merged, a)
    for level in LEVELS:
        ya, yb = outputs(merged, x, level)
        assert_close(ya, want_a, atol, f"a/logits at {level}")
        assert_close(yb, want_b, atol, f"b/logits at {level}")


@pytest.fixture(scope="module")
def twins():
    """arch -> (A, params A, B = permuted twin of A, params B)."""
    out = {}
    for arch in ARCHS:
        a, pa = F.ARCHS[arch](seed=11)
        b, pb = F.permuted_twin(pa, np.random.RandomState(5))
        out[arch] = (a, pa, b, pb)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The fixtures themselves
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_fixture_twin_computes_a_with_other_weights(twins, arch):
    a, pa, b, pb = twins[arch]
    onnx.checker.check_model(a, full_check=True)
    onnx.checker.check_model(b, full_check=True)
    assert a.ir_version == 10 and a.opset_import[0].version == 17
    x = held_out(a)
    ya, yb = F.run(a, x)["logits"], F.run(b, x)["logits"]
    assert_close(yb, ya, EXACT, f"{arch} twin vs A")
    assert 0.05 < np.abs(ya).mean() < 5, "logits should be O(1)"
    changed = [k for k in pa["w"] if not np.array_equal(pa["w"][k], pb["w"][k])]
    hidden = {name for axes in F.spaces(pa).values() for name, _, _ in axes}
    assert set(changed) == hidden, f"every weight of a hidden space is permuted: {set(hidden) - set(changed)}"


@pytest.mark.parametrize("arch", ARCHS)
def test_fixture_relus_live(twins, arch):
    """No hidden channel is constant on the calibration data (a dead unit has no correlation to match by)."""
    a = twins[arch][0]
    acts = F.hidden_activations(a, F.calib(a, 256, seed=0))
    for name, v in acts.items():
        if name == "logits" or v.ndim < 2 or (name.startswith("flatten") and arch == "vgg"):
            continue
        std = v.std(axis=(0,) + tuple(range(2, v.ndim)))
        assert std.min() > 0.05, f"{arch}: {name} has a near-constant channel (std {std.min():.3g})"


def test_fixture_random_pair_differs():
    (a, pa), (b, pb) = F.random_pair("vgg", seed=1, classes=(5, 7))
    x = held_out(a)
    assert F.run(a, x)["logits"].shape == (64, 5) and F.run(b, x)["logits"].shape == (64, 7)
    assert not np.allclose(pa["w"]["conv1.weight"], pb["w"]["conv1.weight"])


# ---------------------------------------------------------------------------------------------------------------
# Twins: exact
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("refit,repair", [("ls", True), ("none", True), ("none", False)],
                         ids=["refit", "repair", "norepair"])
@pytest.mark.parametrize("method", ["permute", "zip"])
@pytest.mark.parametrize("arch", ARCHS)
def test_twin_merge_is_exact(twins, arch, method, refit, repair):
    a, _, b, _ = twins[arch]
    kw = {"beta": 0.0} if method == "zip" else {}
    result = merge(a, b, F.calib(a, 256, seed=0), method=method, refit=refit, repair=repair, **kw)
    merged = result.model
    check_interface(merged, a)
    check_trunk(merged, a, weighted_count(a) - 1, f"{arch} {method}")
    n_a, n_m = F.float_param_count(a), F.float_param_count(merged)
    assert n_m < 1.15 * n_a, f"{arch}: merged twin has {n_m} float parameters, A has {n_a}"
    x = held_out(a)
    want = F.run(a, x)["logits"]
    ya, yb = outputs(merged, x)
    assert_close(ya, want, ATOL, f"{arch} {method} repair={repair} a/logits")
    assert_close(yb, want, ATOL, f"{arch} {method} repair={repair} b/logits")


@pytest.mark.parametrize("refit,repair", [("ls", True), ("none", True), ("none", False)],
                         ids=["refit", "repair", "norepair"])
def test_twins_with_tiny_features_merge_exactly(refit, repair):
    # hidden features of std ~1e-9 (as deep in a randomly initialised network): the same function as the fixture
    # (ReLU is positively homogeneous), and zip at its default beta must still pair each feature with its twin
    _, pa = F.mlp(seed=11)
    w = dict(pa["w"])
    for name in ("fc1.weight", "fc1.bias", "fc2.bias"):
        w[name] = (w[name] * 1e-9).astype(np.float32)
    w["fc3.weight"] = (w["fc3.weight"] * 1e9).astype(np.float32)
    tiny = dict(pa, w=w)
    a = F.build(tiny)
    b, _ = F.permuted_twin(tiny, np.random.RandomState(5))
    hidden = F.hidden_activations(a, F.calib(a, 64, seed=1))
    assert max(np.abs(hidden[k]).max() for k in ("relu1.out", "relu2.out")) < 1e-7
    result = merge(a, b, F.calib(a, 256, seed=0), method="zip", refit=refit, repair=repair)
    assert all(s["within_model_merges"] == [0, 0] for s in result.card["spaces"]), result.card["spaces"]
    x = held_out(a)
    want = F.run(a, x)["logits"]
    ya, yb = outputs(result.model, x)
    assert_close(ya, want, ATOL, f"tiny twin refit={refit} repair={repair} a/logits")
    assert_close(yb, want, ATOL, f"tiny twin refit={refit} repair={repair} b/logits")


@pytest.mark.parametrize("method", ["zip", "permute", "average"])
@pytest.mark.parametrize("arch", ARCHS)
def test_self_merge_gives_back_the_model(twins, arch, method):
    a = twins[arch][0]
    merged = merge(a, a, F.calib(a, 256, seed=0), method=method).model
    check_interface(merged, a)
    check_trunk(merged, a, weighted_count(a) - 1, f"{arch} {method} self-merge")
    x = held_out(a)
    want = F.run(a, x)["logits"]
    ya, yb = outputs(merged, x)
    assert_close(ya, want, EXACT, f"{arch} {method} self-merge a/logits")
    assert_close(yb, want, EXACT, f"{arch} {method} self-merge b/logits")


# every stop point: branches read trunk tensors through U folded into conv / Gemm / MatMul weights (the vgg's
# K=3 folds through the flatten), through a Gather (the resnet's residual Adds), and at the resnet's K=7 the
# downsampling block is cut between its main path (b3c2, shared) and its shortcut (b3sc, per model)
PARTIAL = [("mlp", 1), ("mlp", 2)] + [("vgg", k) for k in range(1, 5)] + [("resnet", k) for k in range(1, 9)]


@pytest.mark.parametrize("arch,k", PARTIAL)
def test_partial_zip_of_twins_is_exact(twins, arch, k):
    a, _, b, _ = twins[arch]
    merged = merge(a, b, F.calib(a, 256, seed=0), method="zip", beta=0.0, stop_at=k).model
    check_trunk(merged, a, min(k, weighted_count(a) - 1), f"{arch} stop_at={k}")
    x = held_out(a)
    want = F.run(a, x)["logits"]
    ya, yb = outputs(merged, x)
    assert_close(ya, want, ATOL, f"{arch} stop_at={k} a/logits")
    assert_close(yb, want, ATOL, f"{arch} stop_at={k} b/logits")


# ---------------------------------------------------------------------------------------------------------------
# Random pairs: ensemble-like cases are exact; the rest is valid and finite
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs():
    """(arch, classes) -> (A, B)."""
    out = {}
    for arch, classes in [("vgg", (5, 7)), ("vgg", (5, 5)), ("resnet", (5, 5)), ("mlp", (5, 7))]:
        (a, _), (b, _) = F.random_pair(arch, seed=3, classes=classes)
        out[arch, classes] = (a, b)
    return out


@pytest.mark.parametrize("stop_at", ["input", 0])
@pytest.mark.parametrize("arch", ["vgg", "mlp"])
def test_stop_at_input_is_the_ensemble(pairs, arch, stop_at, tmp_path):
    a, b = pairs[arch, (5, 7)]
    path = tmp_path / "m.onnx"
    result = merge(a, b, F.calib(a, 256, seed=0), output=path, stop_at=stop_at)
    assert path.exists()
    check_trunk(result.model, a, 0, f"{arch} stop_at={stop_at!r}")
    x = held_out(a)
    want_a, want_b = F.run(a, x)["logits"], F.run(b, x)["logits"]
    ya, yb = outputs(result.model, x)
    assert_close(ya, want_a, EXACT, f"{arch} stop_at={stop_at!r} a/logits")
    assert_close(yb, want_b, EXACT, f"{arch} stop_at={stop_at!r} b/logits")
    check_file(path, a, x, want_a, want_b, EXACT)


@pytest.mark.parametrize("arch", ["vgg", "mlp"])
def test_ensemble_is_a_and_b_side_by_side(pairs, arch, tmp_path):
    a, b = pairs[arch, (5, 7)]
    path = tmp_path / "ens.onnx"
    result = merge(a, b, F.calib(a, 256, seed=0), output=path, method="ensemble")
    check_trunk(result.model, a, 0, f"{arch} ensemble")
    x = held_out(a)
    want_a, want_b = F.run(a, x)["logits"], F.run(b, x)["logits"]
    ya, yb = outputs(result.model, x)
    assert ya.shape == (64, 5) and yb.shape == (64, 7)
    assert_close(ya, want_a, EXACT, f"{arch} ensemble a/logits")
    assert_close(yb, want_b, EXACT, f"{arch} ensemble b/logits")
    check_file(path, a, x, want_a, want_b, ATOL)
    # the written file is the returned model
    assert onnx.load(str(path)).SerializeToString() == result.model.SerializeToString()


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_full_zip_costs_about_one_model(pairs, arch, tmp_path):
    a, b = pairs[arch, (5, 5)]
    path = tmp_path / "zip.onnx"
    merged = merge(a, b, F.calib(a, 256, seed=0), output=path).model
    check_trunk(merged, a, weighted_count(a) - 1, f"{arch} full zip")
    x = held_out(a)
    ya, yb = outputs(merged, x)
    assert np.isfinite(ya).all() and np.isfinite(yb).all()
    assert ya.shape == (64, 5) and yb.shape == (64, 5)
    # a real merge of two different models is not exact (else nothing was merged)
    assert np.abs(ya - F.run(a, x)["logits"]).max() > 1e-3
    n_a, n_m = F.float_param_count(a), F.float_param_count(merged)
    assert n_m < 1.15 * n_a, f"{arch}: merged model has {n_m} float parameters, A has {n_a} ({n_m / n_a:.2f}x)"
    # file valid and the same at every optimisation level
    check_file(path, a, x, ya, yb, ATOL)


@pytest.mark.parametrize("arch", ["vgg", "mlp"])
def test_partial_zip_of_random_pair_with_different_heads(pairs, arch, tmp_path):
    a, b = pairs[arch, (5, 7)]
    path = tmp_path / "p.onnx"
    merged = merge(a, b, F.calib(a, 256, seed=0), output=path, stop_at=2).model
    check_trunk(merged, a, 2, f"{arch} stop_at=2")
    x = held_out(a)
    ya, yb = outputs(merged, x)
    assert ya.shape == (64, 5) and yb.shape == (64, 7)
    assert np.isfinite(ya).all() and np.isfinite(yb).all()
    check_file(path, a, x, ya, yb, ATOL)


# ---------------------------------------------------------------------------------------------------------------
# Ways of passing models and data
# ---------------------------------------------------------------------------------------------------------------

def test_models_and_data_by_path_array_or_dict(twins, tmp_path):
    a, _, b, _ = twins["mlp"]
    pa, pb = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(a, str(pa))
    onnx.save(b, str(pb))
    data = F.calib(a, 256, seed=0)
    np.save(tmp_path / "cal.npy", data)
    np.savez(tmp_path / "cal.npz", input=data)
    x = held_out(a)
    want = F.run(a, x)["logits"]
    for models in [(str(pa), str(pb)), (pa, pb), (a, b)]:
        for d in [data, {"input": data}, tmp_path / "cal.npy", str(tmp_path / "cal.npz")]:
            merged = merge(*models, d, method="permute").model
            ya, yb = outputs(merged, x)
            what = f"models {type(models[0]).__name__}, data {type(d).__name__}"
            assert_close(ya, want, ATOL, what + " a/logits")
            assert_close(yb, want, ATOL, what + " b/logits")


def test_same_seed_same_model_and_names(pairs):
    a, b = pairs["vgg", (5, 7)]
    data = F.calib(a, 256, seed=0)
    m1 = merge(a, b, data, seed=3).model
    m2 = merge(a, b, data, seed=3).model
    assert m1.SerializeToString() == m2.SerializeToString(), "merge is not deterministic for a fixed seed"
    m3 = merge(a, b, data, names=("shirts", "shoes"), method="ensemble").model
    assert [o.name for o in m3.graph.output] == ["shirts/logits", "shoes/logits"]
