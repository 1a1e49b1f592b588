"""onnxzip on models written by real exporters (issue 4): TorchScript and dynamo torch.onnx, skl2onnx, channels-last.

The fixtures in tests/data are made by tools/make_fixtures.py (torch / scikit-learn, not needed here): for a *twin*
fixture B is A with its hidden units permuted on the weights before export, so B computes exactly A's function.
Then, whatever exporter wrote the pair:

- merging the twins with `permute`, or with `zip` without same-model merges (beta=0), computes A on both heads;
- the merged model passes the full ONNX checker, runs in onnxruntime, and costs less than A and B side by side when
  anything was zipped;
- graph analysis finds the number of learned feature spaces counted by hand in the manifest;
- `heads_5_7` (a random pair with 5 and 7 classes) merges, and stopping at the input is the ensemble.

Fixtures whose operators onnxzip does not handle yet are marked xfail (not strict) with the reason; they pass
again on their own as support lands.
"""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxzip
from onnxzip.graph import analyse

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
with open(os.path.join(DATA, "manifest.json")) as _f:
    MANIFEST = json.load(_f)["fixtures"]

TWINS = sorted(k for k, v in MANIFEST.items() if v["twin"])
ATOL = 1e-4
CALIB_SAMPLES = 256

# Known gaps, measured on the fixtures (see the report of issue 4); keyed by fixture, or (fixture, method).
MERGE_XFAIL = {}
SPACES_XFAIL = {}
TRUNK_XFAIL = {}
_MERGES = {}


def load(name):
    return (onnx.load(os.path.join(DATA, name, "a.onnx")), onnx.load(os.path.join(DATA, name, "b.onnx")))


def random_inputs(name, n, seed):
    """Random inputs of the fixture's input shape: name -> array; normal float32, or int64 token ids below the
    manifest's `input_high` for a model that reads them (BERT)."""
    inp = MANIFEST[name]["inputs"][0]
    shape = MANIFEST[name]["input_shape"][1:]
    rng = np.random.RandomState(seed)
    if inp["elem_type"] == "INT64":
        return {inp["name"]: rng.randint(0, MANIFEST[name]["input_high"], (n, *shape)).astype(np.int64)}
    return {inp["name"]: rng.randn(n, *shape).astype(np.float32)}


def run(model, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return {k: as_array(v) for k, v in zip(names, sess.run(None, feed))}


def as_array(v):
    """onnxruntime output -> numpy; ZipMap's list of {class: probability} dicts -> (N, classes) in class order."""
    if isinstance(v, list) and v and isinstance(v[0], dict):
        keys = sorted(v[0])
        return np.array([[d[k] for k in keys] for d in v], dtype=np.float32)
    return np.asarray(v)


def param_count(model):
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)))


def assert_same(got, want, what):
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    if want.dtype.kind == "f":
        err = float(np.max(np.abs(got.astype(np.float64) - want)))
        assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL:g} (output scale {np.abs(want).max():.3g})"
    else:
        wrong = int(np.sum(got != want))
        assert wrong == 0, f"{what}: {wrong} of {want.size} values differ"


def xfail_marks(table, *keys):
    for key in keys:
        if key in table:
            return [pytest.mark.xfail(reason=table[key], strict=False)]
    return []


def merge_cases():
    for name in TWINS:
        for method in ("permute", "zip"):
            yield pytest.param(name, method, id=f"{name}-{method}",
                               marks=xfail_marks(MERGE_XFAIL, (name, method), name))


# ---------------------------------------------------------------------------------------------------------------
# The fixtures themselves
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_fixture_is_valid_and_as_recorded(name):
    a, b = load(name)
    entry = MANIFEST[name]
    for m in (a, b):
        onnx.checker.check_model(m, full_check=True)
        assert len(m.SerializeToString()) < 200_000
    ops = {(n.domain + "." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in a.graph.node}
    assert ops == set(entry["op_types"]), f"{name}: ops {sorted(ops)}, manifest {sorted(entry['op_types'])}"
    x = random_inputs(name, 32, seed=5)
    ya, yb = run(a, x), run(b, x)
    assert list(ya) == [o["name"] for o in entry["outputs"]]
    if entry["twin"]:
        for k in ya:
            assert_same(yb[k], ya[k], f"{name}: twin B vs A, output {k}")
        assert any(not np.array_equal(onnx.numpy_helper.to_array(i), onnx.numpy_helper.to_array(j))
                   for i, j in zip(a.graph.initializer, b.graph.initializer)), f"{name}: B has A's weights"


# ---------------------------------------------------------------------------------------------------------------
# Twins: merging a model with a permuted copy of itself is exact
# ---------------------------------------------------------------------------------------------------------------

def merge_twins(name, method):
    """onnxzip.merge of the twin fixture (cached: the trunk tests look at the same merges)."""
    if (name, method) not in _MERGES:
        a, b = load(name)
        kw = {"beta": 0.0} if method == "zip" else {}
        _MERGES[name, method] = onnxzip.merge(a, b, random_inputs(name, CALIB_SAMPLES, seed=0), method=method,
                                              **kw)
    return _MERGES[name, method]


@pytest.mark.parametrize("name,method", list(merge_cases()))
def test_twin_merge_is_exact(name, method):
    a, b = load(name)
    res = merge_twins(name, method)
    merged = res.model
    onnx.checker.check_model(merged, full_check=True)
    outs = [o.name for o in a.graph.output]
    assert [o.name for o in merged.graph.output] == [f"a/{o}" for o in outs] + [f"b/{o}" for o in outs]

    x = random_inputs(name, 64, seed=987)
    want, got = run(a, x), run(merged, x)
    for o in outs:
        for head in ("a", "b"):
            assert_same(got[f"{head}/{o}"], want[o], f"{name} {method} {head}/{o} "
                                                     f"(unmerged: {res.card['unmerged']})")
    if res.card["spaces"]:
        n_a, n_b, n_m = param_count(a), param_count(b), param_count(merged)
        assert n_m < n_a + n_b, f"{name}: {len(res.card['spaces'])} space(s) zipped, yet {n_m} parameters >= " \
                                f"{n_a} + {n_b}"


@pytest.mark.parametrize("name", [pytest.param(n, marks=xfail_marks(TRUNK_XFAIL, n)) for n in TWINS
                                  if n != "groupnorm_grouped"])
def test_twin_trunk_is_everything_but_the_heads(name):
    """Exactness alone would also pass an ensemble in disguise: check that every weighted layer but the task heads
    is in the shared trunk and nothing was left unmerged."""
    card = merge_twins(name, "permute").card
    trunk = card["trunk"]
    assert not card["unmerged"], f"{name}: left unmerged: {card['unmerged']}"
    assert trunk["weighted_layers_zipped"] == trunk["weighted_layers"] - len(trunk["task_heads"]), (
        f"{name}: {trunk['weighted_layers_zipped']} of {trunk['weighted_layers']} weighted layers zipped, heads "
        f"{trunk['task_heads']}")


def test_grouped_groupnorm_is_left_unmerged():
    """GroupNorm with 1 < groups < C normalises groups of channels together: merging across groups is not exact,
    so its region stays unmerged (and the twin merge is still exact, checked above)."""
    card = merge_twins("groupnorm_grouped", "permute").card
    assert card["unmerged"], "the grouped GroupNorm was merged"
    assert card["trunk"]["weighted_layers_zipped"] < card["trunk"]["weighted_layers"] - 1


# ---------------------------------------------------------------------------------------------------------------
# A random pair with heads of different widths
# ---------------------------------------------------------------------------------------------------------------

def test_heads_5_7_merge_and_ensemble():
    a, b = load("heads_5_7")
    calib = random_inputs("heads_5_7", CALIB_SAMPLES, seed=0)
    x = random_inputs("heads_5_7", 64, seed=987)
    want_a, want_b = run(a, x)["logits"], run(b, x)["logits"]
    assert want_a.shape == (64, 5) and want_b.shape == (64, 7)

    merged = onnxzip.merge(a, b, calib).model
    onnx.checker.check_model(merged, full_check=True)
    got = run(merged, x)
    assert got["a/logits"].shape == (64, 5) and got["b/logits"].shape == (64, 7)
    assert np.isfinite(got["a/logits"]).all() and np.isfinite(got["b/logits"]).all()

    ensemble = onnxzip.merge(a, b, calib, stop_at="input").model
    got = run(ensemble, x)
    assert_same(got["a/logits"], want_a, "heads_5_7 stop_at=input a/logits")
    assert_same(got["b/logits"], want_b, "heads_5_7 stop_at=input b/logits")


# ---------------------------------------------------------------------------------------------------------------
# Graph analysis finds the feature spaces counted by hand
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [pytest.param(n, marks=xfail_marks(SPACES_XFAIL, n)) for n in sorted(MANIFEST)])
def test_analysis_finds_the_learned_spaces(name):
    a, _ = load(name)
    analysis = analyse(a)
    learned = [s for s in analysis.spaces.values() if not s.identity and not s.composite]
    want = MANIFEST[name]["expected_spaces"]
    assert len(learned) == want, (
        f"{name}: {len(learned)} learned space(s) found, {want} counted by hand "
        f"({MANIFEST[name]['spaces_counted']}); found widths {[s.width for s in learned]}")


# ---------------------------------------------------------------------------------------------------------------
# BatchNorm kept or folded: the same model, the same merge
# ---------------------------------------------------------------------------------------------------------------

def batchnorms(model):
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


@pytest.mark.parametrize("method", ["average", "zip"])
def test_batchnorm_kept_and_folded_exports_merge_alike(method):
    """ts_bn_kept and ts_folded are one torch model exported two ways: folding BatchNorm before merging makes
    every method (averaging included) give the same merged model."""
    kept, folded = load("ts_bn_kept"), load("ts_folded")
    assert batchnorms(kept[0]) > 0 and batchnorms(folded[0]) == 0
    calib = random_inputs("ts_folded", CALIB_SAMPLES, seed=0)
    res_kept = onnxzip.merge(*kept, calib, method=method)
    res_folded = onnxzip.merge(*folded, calib, method=method)
    assert res_kept.card["options"]["batchnorms_folded"] == [batchnorms(kept[0])] * 2
    assert batchnorms(res_kept.model) == 0
    x = random_inputs("ts_folded", 64, seed=987)
    got, want = run(res_kept.model, x), run(res_folded.model, x)
    for k in want:
        assert_same(got[k], want[k], f"{method} {k}: BN-kept export vs BN-folded export")


def test_keep_batchnorm_merges_batchnorm_parameters():
    a, b = load("ts_bn_kept")
    calib = random_inputs("ts_bn_kept", CALIB_SAMPLES, seed=0)
    x = random_inputs("ts_bn_kept", 64, seed=987)
    want = run(a, x)["logits"]
    exact = onnxzip.merge(a, b, calib, method="permute", fold_batchnorm=False)
    assert exact.card["options"]["batchnorms_folded"] == [0, 0]
    assert batchnorms(exact.model) == batchnorms(a), "the trunk keeps one BatchNorm per BatchNorm"
    for head in ("a", "b"):
        assert_same(run(exact.model, x)[f"{head}/logits"], want, f"permute with BN kept, {head}")
    # averaging unaligned twins: averaging raw kernels and BN parameters is another model than averaging folded ones
    # (the paper's merge: the least-squares refit would fit both to the same targets)
    raw = run(onnxzip.merge(a, b, calib, method="average", fold_batchnorm=False, repair=False, refit="none").model, x)
    fold = run(onnxzip.merge(a, b, calib, method="average", repair=False, refit="none").model, x)
    assert np.abs(raw["a/logits"] - fold["a/logits"]).max() > 1e-3


def test_a_batchnorm_kept_export_merges_with_a_folded_one():
    """Once folded, a BN-kept export matches a BN-folded one node for node: users can mix them."""
    a, _ = load("ts_bn_kept")
    _, b = load("ts_folded")
    x = random_inputs("ts_folded", 64, seed=987)
    want = run(a, x)["logits"]
    res = onnxzip.merge(a, b, random_inputs("ts_folded", CALIB_SAMPLES, seed=0), method="permute")
    for head in ("a", "b"):
        assert_same(run(res.model, x)[f"{head}/logits"], want, f"mixed exports, {head}")


@pytest.mark.parametrize("name", TWINS)
def test_twin_merge_at_width_one_and_a_half_is_exact(name):
    """--width 1.5 on every exporter's twins (zip without same-model merges keeps pairs of equal features): exact, and
    every space whose width a Reshape, Expand or view fixes keeps it (the card says which and why)."""
    a, b = load(name)
    res = onnxzip.merge(a, b, random_inputs(name, CALIB_SAMPLES, seed=0), beta=0.0, width=1.5, refit="none")
    x = random_inputs(name, 64, seed=987)
    want, got = run(a, x), run(res.model, x)
    for o in want:
        for head in ("a", "b"):
            assert_same(got[f"{head}/{o}"], want[o], f"{name} width 1.5 {head}/{o}")
    for space in res.card["spaces"]:
        assert space["merged_width"] >= space["width"]
        assert (space["merged_width"] > space["width"]) != ("width_kept_because" in space), space
