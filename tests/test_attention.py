"""Attention, tokens and residual streams with LayerNorm (issue 13): what graph analysis finds in the transformer
fixtures both PyTorch exporters write (tests/data/vit_*, made by tools/make_fixtures.py; exact twin merges of them
are checked in test_exporters.py), and the solver's matching of queries and keys alike.

The facts checked here are the ones twin merges cannot see: a permuted twin is matched exactly even where queries and
keys were (wrongly) matched on their own, so only the analysis says whether their dot product survives a real
merge."""
import json
import os

import numpy as np
import onnx
import pytest

import onnxzip
from onnxzip.graph import analyse, trunk_nodes
from onnxzip.inspect import format_report, inspect_models
from onnxzip.solver import solve_blocks
from onnxzip.surgery import zipped_spaces

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
with open(os.path.join(DATA, "manifest.json")) as _f:
    MANIFEST = json.load(_f)["fixtures"]
VITS = sorted(k for k in MANIFEST if k.startswith("vit_"))
DIM, HEADS, DEPTH = 16, 2, 2  # tools/make_fixtures.py TinyViT
D = DIM // HEADS


def load(name, which="a"):
    return onnx.load(os.path.join(DATA, name, f"{which}.onnx"))


def projections(an):
    """Node indices of the attention's input projections, in graph order: the packed qkv (3 DIM outputs) or q, k, v
    (the DIM-wide layers reading a LayerNorm directly)."""
    graph = an.model.graph
    out = []
    for i in an.weighted:
        width = an.spaces[an.nodes[i].out_space.space].width
        src = an.producer.get(graph.node[i].input[0])
        if width == 3 * DIM or (width == DIM and src is not None
                                and graph.node[src[0]].op_type == "LayerNormalization"):
            out.append(i)
    return out


def test_the_fixtures_cover_both_exporters_and_three_attention_styles():
    assert VITS == [f"vit_{a}_{h}" for a in ("mha", "packed", "separate") for h in ("dynamo", "ts")]


@pytest.mark.parametrize("name", VITS)
def test_every_layer_but_the_head_is_in_the_trunk(name):
    an = analyse(load(name))
    trunk = trunk_nodes(an)
    assert not an.blocked_reasons.keys() - set(an.heads), [an.blocked_reasons[i] for i in an.blocked_reasons]
    assert [i for i in an.weighted if i not in trunk] == an.heads and len(an.heads) == 1
    learned = [s for s in an.spaces.values() if not s.identity and not s.composite]
    zipped = zipped_spaces(an, trunk)
    assert len(zipped) == len(learned) - 1, "every learned space but the head's output is zipped"


@pytest.mark.parametrize("name", VITS)
def test_the_residual_stream_is_one_space_through_layernorm(name):
    """Patch embedding, class token, position embedding, every attention output projection and fc2, every
    LayerNorm: one space (pre-norm residual stream)."""
    an = analyse(load(name))
    graph = an.model.graph
    conv = next(i for i, n in enumerate(graph.node) if n.op_type == "Conv")
    stream = an.nodes[conv].out_space.space
    norms = [i for i, n in enumerate(graph.node) if n.op_type == "LayerNormalization"]
    assert len(norms) == 2 * DEPTH + 1
    for i in norms:
        n = graph.node[i]
        assert an.tensor_spaces[n.output[0]].space == stream, f"{n.name} is not on the residual stream"
        assert [(w.space, w.role) for k in (1, 2) for w in an.weight_axes(i, k)] == [(stream, "out")] * 2, \
            f"{n.name}: scale and bias are not merged in the stream's space"
    adds = [i for i, n in enumerate(graph.node) if n.op_type == "Add"
            and sum(t in an.tensor_spaces and not an.spaces[an.tensor_spaces[t].space].identity for t in n.input) == 2
            and an.tensor_spaces[n.output[0]].space == stream]
    assert len(adds) >= 2 * DEPTH, "the residual Adds tie the blocks into the stream"
    # the class token (broadcast by Expand) and the position embedding are per-channel constants of the stream
    expand = next(i for i, n in enumerate(graph.node) if n.op_type == "Expand")
    assert [(w.space, w.role) for w in an.weight_axes(expand, 0)] == [(stream, "out")]
    pos = [w for w in an.weights if w.space == stream and an.initializers[graph.node[w.node].input[w.input]].shape
           == (1, 5, DIM)]
    assert len(pos) == 1 and pos[0].axis == 2


@pytest.mark.parametrize("name", VITS)
def test_queries_and_keys_are_matched_alike_head_by_head(name):
    an = analyse(load(name))
    packed = "separate" not in name
    for block in range(DEPTH):
        if packed:
            (qkv,) = projections(an)[block * 1:(block + 1) * 1]
            space = an.spaces[an.nodes[qkv].out_space.space]
            assert space.width == 3 * DIM
            # q, k, v, each cut into its heads
            assert space.blocks == 3 * HEADS
            labels = np.asarray(space.partition)
            for part in range(3):
                for h in range(HEADS):
                    lo = part * DIM + h * D
                    assert len(set(labels[lo:lo + D])) == 1
            assert len(set(labels[::D])) == 3 * HEADS
            (pair,) = space.alike
            assert list(pair[0]) == list(range(DIM)) and list(pair[1]) == list(range(DIM, 2 * DIM))
        else:
            q, k, v = projections(an)[3 * block:3 * block + 3]
            sq, sk, sv = (an.nodes[i].out_space.space for i in (q, k, v))
            assert sq == sk, "queries and keys share one space"
            assert sv != sq
            for sid in (sq, sv):
                assert an.spaces[sid].blocks == HEADS
                assert list(an.spaces[sid].partition) == [h for h in range(HEADS) for _ in range(D)]


def test_solver_matches_linked_blocks_position_for_position():
    """The qkv space of the packed fixture, a random correlation: the queries' and keys' clusters of every head are
    the same, position for position; values are matched on their own."""
    an = analyse(load("vit_packed_ts"))
    space = an.spaces[an.nodes[projections(an)[0]].out_space.space]
    rng = np.random.RandomState(3)
    x = rng.randn(400, 2 * space.width)
    corr = np.corrcoef(x, rowvar=False)
    for method in ("zip", "permute"):
        m = solve_blocks(method, corr, space.width, space.partition, 2, 0.3, 0.125, alike=space.alike)
        p, q = (np.asarray(v) for v in space.alike[0])
        for model in range(2):
            cl = m.clusters[model * space.width:(model + 1) * space.width]
            # feature p[i] sits in the cluster at position p[j] exactly when feature q[i] sits in the one at q[j]
            where = {int(v): j for j, v in enumerate(p)}
            assert [where[int(c)] for c in cl[p]] == [int(np.flatnonzero(q == c)[0]) for c in cl[q]]
        labels = np.asarray(space.partition)
        for model in range(2):
            cl = m.clusters[model * space.width:(model + 1) * space.width]
            assert np.array_equal(labels[cl], labels), "a cluster crosses a head"


def test_solver_refuses_links_that_cut_a_block():
    with pytest.raises(ValueError, match="whole block"):
        solve_blocks("permute", np.eye(16), 8, [0, 0, 0, 0, 1, 1, 1, 1], alike=[([0, 1], [4, 5])])


def test_linked_blocks_of_a_twin_correlation_recover_the_permutation():
    """Two blocks linked alike, model B's features a permutation of A's in both: the shared matching is exact."""
    rng = np.random.RandomState(0)
    feats = rng.randn(500, 4)
    perm = np.array([2, 0, 3, 1])
    a = np.concatenate([feats, feats + 0.01 * rng.randn(500, 4)], axis=1)  # blocks 0-3 and 4-7, alike
    b = np.concatenate([a[:, perm], a[:, 4 + perm]], axis=1)
    corr = np.corrcoef(np.concatenate([a, b], axis=1), rowvar=False)
    m = solve_blocks("permute", corr, 8, [0] * 4 + [1] * 4, alike=[(list(range(4)), list(range(4, 8)))])
    assert np.array_equal(m.unmerge_index(1)[:4], perm) and np.array_equal(m.unmerge_index(1)[4:], 4 + perm)


def test_a_real_merge_of_two_unrelated_transformers_runs_and_zips_everything_but_the_head():
    """Not twins: the packed TorchScript fixture's A against its twin with every weight perturbed by noise."""
    a = load("vit_packed_ts")
    b = load("vit_packed_ts", "b")
    rng = np.random.RandomState(1)
    for t in b.graph.initializer:
        v = onnx.numpy_helper.to_array(t)
        if v.dtype == np.float32 and v.size > 1:
            t.CopyFrom(onnx.numpy_helper.from_array((v + 0.3 * v.std() * rng.randn(*v.shape)).astype(np.float32),
                                                    t.name))
    x = np.random.RandomState(0).randn(256, 1, 8, 8).astype(np.float32)
    res = onnxzip.merge(a, b, {"input": x})
    assert not res.card["unmerged"] and not res.card["zipped_nothing"]
    assert res.card["trunk"]["weighted_layers_zipped"] == res.card["trunk"]["weighted_layers"] - 1
    assert all(np.isfinite(h["relative_error"]) for h in res.card["verification"]["heads"])


@pytest.mark.parametrize("name", ["vit_packed_ts", "vit_separate_dynamo"])
def test_inspect_reports_how_many_spaces_are_zipped(name):
    report = inspect_models(load(name), load(name, "b"))
    want = {"vit_packed_ts": 1 + 2 * DEPTH, "vit_separate_dynamo": 1 + 3 * DEPTH}[name]
    assert report["a"]["spaces_zipped"] == {"zipped": want, "of": want}
    text = format_report(report)
    assert f"{want} of {want} learned space(s) outside the task heads zipped by default" in text
    assert ("queries and keys matched alike" in text) == ("packed" in name)
