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

import fixtures as F

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


def test_the_fixtures_cover_both_exporters_and_four_attention_styles():
    written_out = [f"vit_{a}_{h}" for a in ("mha", "packed", "relative", "separate") for h in ("dynamo", "ts")]
    fused = [f"vit_{a}_dynamo23" for a in ("mha", "packed", "relative_sdpa")]  # ONNX's Attention op
    assert VITS == sorted(written_out + fused)
    for name in fused:
        assert MANIFEST[name]["op_types"]["Attention"] == DEPTH
        assert "Softmax" not in MANIFEST[name]["op_types"]


@pytest.mark.parametrize("fused, written_out", [("vit_packed_dynamo23", "vit_packed_dynamo"),
                                                ("vit_mha_dynamo23", "vit_mha_dynamo"),
                                                ("vit_relative_sdpa_dynamo23", "vit_relative_dynamo")])
def test_the_fused_attention_op_costs_what_the_written_out_attention_costs(fused, written_out):
    from onnxzip.evaluate import count_macs
    assert count_macs(load(fused)) == count_macs(load(written_out))


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
    # (the relative-bias fixture has no class token and adds the position embedding of its 4 patches)
    relative = "relative" in name
    if not relative:
        expand = next(i for i, n in enumerate(graph.node) if n.op_type == "Expand")
        assert [(w.space, w.role) for w in an.weight_axes(expand, 0)] == [(stream, "out")]
    pos = [w for w in an.weights if w.space == stream and an.initializers[graph.node[w.node].input[w.input]].shape
           == (1, 4 if relative else 5, DIM)]
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
    F.perturb(b, 0.3, rng)
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


# ---------------------------------------------------------------------------------------------------------------
# Embeddings (BERT-style): a Gather from a constant table opens a space on the table's channel axis; word, position
# and token-type embeddings sum into the residual stream; post-norm and RMSNorm streams
# ---------------------------------------------------------------------------------------------------------------

BERTS = sorted(k for k in MANIFEST if k.startswith("bert_"))
BERT_DEPTH = 2  # tools/make_fixtures.py TinyBert


def bert_ids(name, n, seed):
    entry = MANIFEST[name]
    ids = np.random.RandomState(seed).randint(0, entry["input_high"], (n, *entry["input_shape"][1:]))
    return {entry["inputs"][0]["name"]: ids.astype(np.int64)}


def run(model, feed):
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def embeddings(an):
    graph = an.model.graph
    return [i for i in an.weighted if graph.node[i].op_type == "Gather"]


def test_the_bert_fixtures_cover_both_exporters_and_both_norms():
    assert BERTS == [f"bert_{n}_{h}" for n in ("layer", "rms") for h in ("dynamo", "ts")]


@pytest.mark.parametrize("name", BERTS)
def test_embedding_tables_open_the_residual_stream(name):
    """Word, position (TorchScript: looked up by Range(0, T); dynamo folds it to a constant) and token-type
    embeddings are layers writing the stream on the table's axis 1; every norm and residual Add of the post-norm
    blocks is on it; q and k are tied, heads are blocks."""
    an = analyse(load(name))
    graph = an.model.graph
    tables = embeddings(an)
    assert len(tables) == (3 if name.endswith("_ts") else 2)
    stream = an.nodes[tables[0]].out_space.space
    for i in tables:
        node = graph.node[i]
        assert an.nodes[i].out_space.space == stream, f"{node.name} writes another space"
        assert [(w.input, w.axis, w.space, w.role) for w in an.weights if w.node == i] == [(0, 1, stream, "out")]
        assert an.tensor_spaces[node.output[0]].axis == len(an.shapes[node.output[0]]) - 1
    if name.endswith("_dynamo"):  # the folded position embedding is a per-channel constant of the stream
        pos = [w for w in an.weights if w.space == stream and graph.node[w.node].op_type == "Add"]
        assert any(an.initializers[graph.node[w.node].input[w.input]].shape == (6, 16) for w in pos)
    if "layer" in name:
        norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    else:  # RMSNorm written out: x * (1 / sqrt(mean(x²) + eps)) * weight, the last Mul by the weight
        norms = [n for i, n in enumerate(graph.node) if n.op_type == "Mul"
                 and any(w.role == "out" for k in range(2) for w in an.weight_axes(i, k))]
    assert len(norms) == 1 + 2 * BERT_DEPTH
    for n in norms:
        assert an.tensor_spaces[n.output[0]].space == stream, f"{n.name} is not on the stream"
    for i in an.weighted:
        if graph.node[i].op_type == "MatMul" and an.spaces[an.nodes[i].out_space.space].width == 16 \
                and an.nodes[i].in_space.space == stream:
            assert an.spaces[an.nodes[i].out_space.space].blocks == 2, "q, k, v: each head a block"
    qk = [s for s in an.spaces.values() if s.width == 16 and not s.identity and s.id != stream
          and sum(1 for i in s.producers if graph.node[i].op_type == "MatMul") == 2]
    assert len(qk) == BERT_DEPTH, "one space per block for queries and keys (tied by q kᵀ)"


@pytest.mark.parametrize("name", [n for n in BERTS if "rms" in n])
def test_rms_statistic_is_computed_once_and_scales_every_channel(name):
    """The mean of squares over the channel axis carries no channels (computed once in the trunk); the Mul of the
    stream by 1/rms keeps the stream."""
    an = analyse(load(name))
    graph = an.model.graph
    means = [n for n in graph.node if n.op_type == "ReduceMean" and graph.node[an.producer[n.input[0]][0]].op_type
             == "Pow"]
    assert len(means) == 1 + 2 * BERT_DEPTH
    for n in means:
        assert an.spaces[an.tensor_spaces[n.output[0]].space].identity
    assert not an.blocked_reasons.keys() - set(an.heads)


@pytest.mark.parametrize("name", BERTS)
def test_inspect_zips_every_bert_space_outside_the_head(name):
    report = inspect_models(load(name), load(name, "b"))
    want = 1 + 3 * BERT_DEPTH  # the stream; per block q+k, v, fc1
    assert report["a"]["spaces_zipped"] == {"zipped": want, "of": want}


@pytest.mark.parametrize("name", BERTS)
@pytest.mark.parametrize("refit", ["ls", "none"])
def test_bert_twins_merge_exactly_with_and_without_the_refit(name, refit):
    """Permute, refit on and off (with the statistics repair, which rescales the embedding tables): A on both heads
    to 1e-4 of the output's scale. (test_exporters checks zip with beta 0 and the trunk.)"""
    a, b = load(name), load(name, "b")
    res = onnxzip.merge(a, b, bert_ids(name, 256, 0), method="permute", refit=refit)
    assert not res.card["unmerged"]
    x = bert_ids(name, 64, 987)
    want = run(a, x)
    out = list(want)[0]
    got = run(res.model, x)
    for head in ("a", "b"):
        err = np.abs(got[f"{head}/{out}"] - want[out]).max() / np.abs(want[out]).max()
        assert err < 1e-4, f"{name} refit {refit} {head}: relative error {err:.3g}"


def test_token_ids_merge_from_an_int64_npy_file_on_the_command_line(tmp_path):
    from click.testing import CliRunner
    from onnxzip.cli import cli

    name = "bert_layer_ts"
    ids = bert_ids(name, 200, 0)["input"]
    np.save(tmp_path / "ids.npy", ids)
    paths = [os.path.join(DATA, name, f"{w}.onnx") for w in ("a", "b")]
    out = tmp_path / "merged.onnx"
    result = CliRunner().invoke(cli, ["merge", *paths, "--data", str(tmp_path / "ids.npy"), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    merged = onnx.load(out)
    x = bert_ids(name, 32, 5)
    want, got = run(load(name), x)["logits"], run(merged, x)
    for head in ("a", "b"):
        assert np.abs(got[f"{head}/logits"] - want).max() < 1e-4 * np.abs(want).max()

    np.save(tmp_path / "floats.npy", ids.astype(np.float32))
    result = CliRunner().invoke(cli, ["merge", *paths, "--data", str(tmp_path / "floats.npy"), "-o", str(out),
                                      "--force"])
    assert result.exit_code == 5 and "has dtype float32, but the model input is int64" in result.output

    np.save(tmp_path / "big.npy", ids + 10)  # the vocabulary has 50 ids
    result = CliRunner().invoke(cli, ["merge", *paths, "--data", str(tmp_path / "big.npy"), "-o", str(out),
                                      "--force"])
    assert result.exit_code == 5, result.output
    assert "token ids from 10 to 59" in result.output and "'word.weight' of 50 rows" in result.output


def token_model(weights, opset=23):
    """ids (N, 4) -> word[ids] + pos[constant positions] -> times a mask of the nonzero ids -> RMSNormalization
    (opset 23) -> MatMul + bias -> Relu -> mean over tokens -> Gemm head."""
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node("Gather", ["word", "ids"], ["we"]),
             helper.make_node("Gather", ["pos", "positions"], ["pe"]),
             helper.make_node("Add", ["we", "pe"], ["emb"]),
             helper.make_node("Greater", ["ids", "zero"], ["nonzero"]),
             helper.make_node("Cast", ["nonzero"], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["maskf", "last"], ["mask"]),
             helper.make_node("Mul", ["emb", "mask"], ["masked"]),
             helper.make_node("RMSNormalization", ["masked", "scale"], ["norm"], axis=-1),
             helper.make_node("MatMul", ["norm", "fc.w"], ["fc"]),
             helper.make_node("Add", ["fc", "fc.b"], ["fcb"]),
             helper.make_node("Relu", ["fcb"], ["r"]),
             helper.make_node("ReduceMean", ["r", "tokens"], ["pool"], keepdims=0),
             helper.make_node("Gemm", ["pool", "head.w", "head.b"], ["logits"])]
    consts = {"positions": np.arange(4, dtype=np.int64), "zero": np.array(0, np.int64),
              "last": np.array([-1], np.int64), "tokens": np.array([1], np.int64)}
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in {**weights, **consts}.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def test_constant_positions_a_token_mask_and_the_rmsnormalization_op_merge_exactly():
    """A position table looked up by constant indices is an embedding too; a mask of one value per token scales
    every channel alike; RMSNormalization (opset 23) carries the stream with its per-channel scale."""
    rng = np.random.RandomState(4)
    d, h = 8, 12
    w = {"word": rng.randn(20, d), "pos": rng.randn(6, d), "scale": rng.uniform(0.6, 1.4, d),
         "fc.w": rng.randn(d, h) / np.sqrt(d), "fc.b": rng.uniform(0, 0.2, h), "head.w": rng.randn(h, 5) / np.sqrt(h),
         "head.b": rng.uniform(0, 0.2, 5)}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    ps, ph = rng.permutation(d), rng.permutation(h)
    twin = {"word": w["word"][:, ps], "pos": w["pos"][:, ps], "scale": w["scale"][ps], "fc.w": w["fc.w"][ps][:, ph],
            "fc.b": w["fc.b"][ph], "head.w": w["head.w"][ph], "head.b": w["head.b"]}
    a, b = token_model(w), token_model(twin)
    an = analyse(a)
    graph = an.model.graph
    assert [graph.node[i].op_type for i in an.weighted] == ["Gather", "Gather", "MatMul", "Gemm"]
    stream = an.tensor_spaces["norm"].space
    assert an.tensor_spaces["we"].space == an.tensor_spaces["pe"].space == an.tensor_spaces["masked"].space == stream
    assert an.spaces[an.tensor_spaces["mask"].space].identity
    x = {"ids": rng.randint(0, 20, (64, 4)).astype(np.int64)}
    want = run(a, x)["logits"]
    assert np.abs(run(b, x)["logits"] - want).max() < 1e-5
    for refit in ("ls", "none"):
        res = onnxzip.merge(a, b, {"ids": rng.randint(0, 20, (256, 4)).astype(np.int64)}, method="permute",
                            refit=refit)
        assert res.card["trunk"]["weighted_layers_zipped"] == 3 and not res.card["unmerged"]
        got = run(res.model, x)
        for head in ("a", "b"):
            assert np.abs(got[f"{head}/logits"] - want).max() < 1e-4 * np.abs(want).max(), (refit, head)


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embeddings (Llama): queries and keys pinned in place
# ---------------------------------------------------------------------------------------------------------------

ROPES = ["llama_rope_dynamo", "llama_rope_ts"]


def _rope_projections(an):
    """(q, k, v) node indices per block of the Llama fixture: the 16-wide MatMuls reading an RMSNorm's output."""
    graph = an.model.graph
    out = [i for i in an.weighted if an.spaces[an.nodes[i].out_space.space].width == DIM
           and graph.node[i].op_type == "MatMul" and "o" not in graph.node[i].input[1].split(".")[-2:-1]]
    return out


@pytest.mark.parametrize("name", ROPES)
def test_rotary_embeddings_pin_queries_and_keys_and_nothing_else(name):
    an = analyse(load(name))
    assert not an.blocked_reasons.keys() - set(an.heads), [an.blocked_reasons[i] for i in an.blocked_reasons]
    trunk = trunk_nodes(an)
    assert [i for i in an.weighted if i not in trunk] == an.heads
    pinned = [s for s in an.spaces.values() if not s.identity and not s.composite and s.view is None
              and len(set(s.partition or [0])) == s.width]
    # one q+k space per block, every feature its own block
    assert len(pinned) == DEPTH and all(s.width == DIM for s in pinned)
    for s in an.spaces.values():
        if s.identity or s.composite or s.view is not None or s in pinned:
            continue
        # values: their heads; the residual stream and the MLPs: one block
        assert len(set(s.partition or [0])) in (1, HEADS), (s.id, s.width, s.partition)


@pytest.mark.parametrize("name", ROPES)
def test_a_merge_of_unrelated_rope_models_keeps_queries_and_keys_in_place(name):
    """Not twins (every weight of B perturbed): zip still pairs feature j of A's queries and keys with feature j of
    B's, so the rotation by position commutes with the merge."""
    a, b = load(name), load(name, "b")
    rng = np.random.RandomState(1)
    weights = {n.input[0 if n.op_type == "Gather" else 1] for n in b.graph.node if n.op_type in ("MatMul", "Gemm",
                                                                                                  "Gather")}
    for init in b.graph.initializer:  # the learned matrices; rotary frequencies and the mask stay the models' own
        value = onnx.numpy_helper.to_array(init)
        if init.name in weights and value.ndim == 2 and value.dtype == np.float32:
            init.CopyFrom(onnx.numpy_helper.from_array(value + 0.3 * value.std() * rng.randn(*value.shape)
                                                       .astype(np.float32), init.name))
    x = np.random.RandomState(0).randint(0, 50, (256, 6)).astype(np.int64)
    res = onnxzip.merge(a, b, {a.graph.input[0].name: x}, refit="none", repair=False)
    assert not res.card["unmerged"] and not res.card["zipped_nothing"]
    an = analyse(a)
    pinned = {s.id for s in an.spaces.values() if not s.identity and not s.composite and s.view is None
              and len(set(s.partition or [0])) == s.width}
    assert len(pinned) == DEPTH
    matchings = {s["space"]: s for s in res.card["spaces"]}
    for sid in pinned:
        card = matchings[sid]
        assert card["cross_model_merges"] == card["width"] and card["within_model_merges"] == [0, 0]


@pytest.mark.parametrize("name", ROPES)
def test_rotary_tables_that_differ_leave_the_attention_unmerged_without_a_crash(name):
    """Every constant of B perturbed, the rotary frequencies (and dynamo's mask) too: the nodes reading them are
    left unmerged, and whatever reads the queries' halves with them (surgery once failed on a trunk node reading a
    branch tensor)."""
    a, b = load(name), load(name, "b")
    F.perturb(b, 0.3, np.random.RandomState(1))
    x = np.random.RandomState(0).randint(0, 50, (256, 6)).astype(np.int64)
    res = onnxzip.merge(a, b, {a.graph.input[0].name: x})
    assert res.card["unmerged"]
    out = F.run(res.model, x[:16])
    assert all(np.isfinite(v).all() for v in out.values())


# ---------------------------------------------------------------------------------------------------------------
# Grouped-query attention (Llama 2 70B and later, Mistral, Qwen): each key/value head repeated over a group of
# query heads (Hugging Face's repeat_kv: Unsqueeze, Expand, Reshape)
# ---------------------------------------------------------------------------------------------------------------

# tools/make_fixtures.py TinyLlamaGQA (4 query heads over 2 key/value heads) and TinyLlamaMQA (over one)
GQAS = {"llama_gqa_dynamo": 2, "llama_gqa_ts": 2, "llama_mqa_dynamo": 1, "llama_mqa_ts": 1}
GQA_HEADS = 4


@pytest.mark.parametrize("name", sorted(GQAS))
def test_grouped_query_attention_reads_each_value_head_once_per_query_head(name):
    """The output projection reads a view of the values with each channel read once per query head of its group,
    in the heads' order; queries (16) and keys (4 per key head) are pinned by the rotary embedding, not tied (their
    widths differ); nothing is left unmerged. (Exact twin merges: test_exporters.py.)"""
    an = analyse(load(name))
    assert not an.blocked_reasons.keys() - set(an.heads), [an.blocked_reasons[i] for i in an.blocked_reasons]
    kv_heads = GQAS[name]
    d, copies = DIM // GQA_HEADS, GQA_HEADS // kv_heads
    pinned = sorted(s.width for s in an.spaces.values() if not s.identity and not s.composite
                    and len(set(s.partition or [0])) == s.width)
    assert pinned == [d * kv_heads] * DEPTH + [DIM] * DEPTH
    graph = an.model.graph
    outs = [i for i in an.weighted if ".o." in graph.node[i].input[1] or "o.weight" in graph.node[i].input[1]
            or an.spaces[an.nodes[i].in_space.space].view is not None]
    assert len(outs) == DEPTH, [graph.node[i].name for i in outs]
    for i in outs:
        view = an.spaces[an.nodes[i].in_space.space].view
        assert view is not None and len(view) == DIM
        (values,) = {sp for sp, _ in view}
        assert an.spaces[values].width == DIM // copies and len(set(an.spaces[values].partition or [0])) == kv_heads
        # query head h reads value head h // copies, feature by feature
        assert [c for _, c in view] == [(h // copies) * d + j for h in range(GQA_HEADS) for j in range(d)]


def test_a_view_reading_every_channel_twice_keeps_each_copy_in_its_own_head():
    """view_matching of a repeat: model 1's feature j of value head g is merged with model 0's feature π(j); each of
    its copies (one per query head) is restored from the copy of π(j) in the same query head."""
    from onnxzip.solver import matching_from_clusters, view_matching
    perm = np.array([1, 0, 3, 2])  # model 1's features of 2 heads of 2, swapped inside each head
    base = matching_from_clusters(np.concatenate([np.arange(4), perm]), 2, 4)
    channels = [(7, c) for h in range(2) for _ in range(2) for c in (2 * h, 2 * h + 1)]  # heads h, h, h', h'
    m = view_matching(channels, {7: base})
    clusters = m.clusters.reshape(2, 8)
    assert clusters[0].tolist() == list(range(8))
    assert clusters[1].tolist() == [1, 0, 3, 2, 5, 4, 7, 6]
    with pytest.raises(ValueError, match="more often"):
        view_matching(channels[:-1], {7: base})


def grouped_query_model(weights, kv_heads=2, repeat=True):
    """x (N, 4, 16) -> q = x Wq in 4 heads of 4, k and v = x Wk, x Wv in `kv_heads` heads of 4, each repeated over
    its group of query heads (Unsqueeze, Expand, Reshape), no rotary embedding -> softmax(q kᵀ) v -> (N, 4, 16) ->
    MatMul -> mean over tokens -> Gemm. One key/value head (multi-query attention): its head axis has size 1, and
    without `repeat` the MatMuls broadcast it."""
    from onnx import helper
    nodes = []
    for p, heads in (("q", 4), ("k", kv_heads), ("v", kv_heads)):
        nodes += [helper.make_node("MatMul", ["x", f"{p}.w"], [f"{p}0"]),
                  helper.make_node("Reshape", [f"{p}0", f"heads{heads}"], [f"{p}1"]),
                  helper.make_node("Transpose", [f"{p}1"], [p if p == "q" or not repeat else f"{p}2"],
                                   perm=[0, 2, 1, 3])]
    for p in "kv" if repeat else "":
        nodes += [helper.make_node("Unsqueeze", [f"{p}2", "axis2"], [f"{p}3"]),
                  helper.make_node("Expand", [f"{p}3", "copies"], [f"{p}4"]),
                  helper.make_node("Reshape", [f"{p}4", "repeated"], [p])]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["s"]),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["a0"]),
              helper.make_node("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["a1", "tokens_shape"], ["att"]),
              helper.make_node("MatMul", ["att", "o.w"], ["o"]),
              helper.make_node("ReduceMean", ["o", "tokens"], ["pool"], keepdims=0),
              helper.make_node("Gemm", ["pool", "head.w", "head.b"], ["logits"])]
    consts = {"heads4": np.array([0, 4, 4, 4], np.int64), f"heads{kv_heads}": np.array([0, 4, kv_heads, 4], np.int64),
              "tokens_shape": np.array([0, 4, 16], np.int64), "tokens": np.array([1], np.int64)}
    if repeat:
        consts.update({"axis2": np.array([2], np.int64), "copies": np.array([1, 1, 4 // kv_heads, 1, 1], np.int64),
                       "repeated": np.array([0, 4, 4, 4], np.int64)})
    return tokens_model("grouped_query", nodes, weights, consts)


def _grouped_query_weights(rng, kv_heads=2):
    return {"q.w": rng.randn(16, 16) / 4, "k.w": rng.randn(16, 4 * kv_heads) / 4,
            "v.w": rng.randn(16, 4 * kv_heads) / 4, "o.w": rng.randn(16, 16) / 4, "head.w": rng.randn(16, 5) / 4,
            "head.b": rng.randn(5) * 0.1}


def _grouped_query_twin(w, rng, kv_heads=2):
    """Inside every key/value head g, its keys and the queries of its query heads by one permutation, its values
    and the output projection's rows of its query heads by another."""
    t = {k: v.copy() for k, v in w.items()}
    copies = 4 // kv_heads
    for g in range(kv_heads):
        keys, values = 4 * g + rng.permutation(4), 4 * g + rng.permutation(4)
        t["k.w"][:, 4 * g:4 * g + 4] = w["k.w"][:, keys]
        t["v.w"][:, 4 * g:4 * g + 4] = w["v.w"][:, values]
        for h in range(g * copies, (g + 1) * copies):
            t["q.w"][:, 4 * h:4 * h + 4] = w["q.w"][:, 4 * h + keys - 4 * g]
            t["o.w"][4 * h:4 * h + 4] = w["o.w"][4 * h + values - 4 * g]
    return t


@pytest.mark.parametrize("kv_heads, repeat", [(2, True), (1, True), (1, False)])
def test_grouped_query_attention_without_a_rotary_embedding_matches_the_queries_as_their_key_heads(kv_heads, repeat):
    """Without a rotary embedding pinning them, the queries of each group need one transform with their key head,
    across two spaces of different widths: the queries are matched as the view of the repeated keys. A twin
    permuted inside every key head (queries of its group alike) and every value head merges back exactly, with and
    without the refit; two unrelated models merge with every space zipped; inspect says how the queries are
    matched. With one key/value head (multi-query attention) every query head reads it all, repeated or broadcast
    by the MatMuls."""
    rng = np.random.RandomState(3)
    w = _grouped_query_weights(rng, kv_heads)
    a = grouped_query_model(w, kv_heads, repeat)
    b = grouped_query_model(_grouped_query_twin(w, rng, kv_heads), kv_heads, repeat)
    an = analyse(a)
    assert not an.blocked_reasons, an.blocked_reasons
    queries = an.tensor_spaces["q0"].space
    assert an.spaces[queries].queries_of_keys
    assert {sp for sp, _ in an.spaces[queries].view} == {an.tensor_spaces["k0"].space}
    x = rng.randn(256, 4, 16).astype(np.float32)
    want = F.run(a, x[:16])["logits"]
    for refit in ("ls", "none"):
        res = onnxzip.merge(a, b, x, refit=refit)
        assert not res.card["unmerged"] and not res.card["zipped_nothing"]
        for v in F.run(res.model, x[:16]).values():
            assert np.abs(v - want).max() < 1e-4 * np.abs(want).max(), refit
    other = grouped_query_model(_grouped_query_weights(np.random.RandomState(4), kv_heads), kv_heads, repeat)
    res = onnxzip.merge(a, other, x)
    assert not res.card["unmerged"] and all(np.isfinite(v).all() for v in F.run(res.model, x[:8]).values())
    report = inspect_models(a, other)
    assert report["a"]["spaces_zipped"] == {"zipped": 4, "of": 4}
    assert "queries matched as their key heads" in format_report(report)


def test_the_fused_attention_op_with_heads_that_do_not_divide_is_left_unmerged_with_its_reason():
    """3 key/value heads for 2 query heads (an attribute ONNX's checker does not compare with the widths): the op is
    left unmerged and the reason gives the widths and head counts."""
    a = fused_attention_model(fused_weights(np.random.RandomState(8)), heads=2, kv_heads=2)
    node = next(n for n in a.graph.node if n.op_type == "Attention")
    next(at for at in node.attribute if at.name == "kv_num_heads").i = 3
    an = analyse(a)
    index = next(i for i, n in enumerate(an.model.graph.node) if n.op_type == "Attention")
    assert an.nodes[index].kind == "unsupported"
    assert an.nodes[index].reason == ("attends with 16 query and 16 key features in 2 query heads over 3 key/value "
                                      "heads")


def test_an_expand_along_the_channels_is_left_unmerged_with_its_reason():
    """Expand broadcasts a feature tensor of one channel to 16 (along its channel axis): no feature space carries
    through that; the Expand is left unmerged with the shapes in its reason, and the merge still runs."""
    from onnx import helper
    n = helper.make_node
    nodes = [n("MatMul", ["x", "a.w"], ["a"]), n("Expand", ["a", "wide"], ["b"]), n("MatMul", ["b", "c.w"], ["c"]),
             n("ReduceMean", ["c", "tokens"], ["pool"], keepdims=0),
             n("Gemm", ["pool", "head.w", "head.b"], ["logits"])]
    rng = np.random.RandomState(6)
    weights = {"a.w": rng.randn(16, 1), "c.w": rng.randn(16, 16) / 4, "head.w": rng.randn(16, 5) / 4,
               "head.b": rng.randn(5)}
    a = tokens_model("expand", nodes, weights, {"wide": np.array([1, 1, 16], np.int64),
                                                 "tokens": np.array([1], np.int64)})
    an = analyse(a)
    expand = next(i for i, node in enumerate(an.model.graph.node) if node.op_type == "Expand")
    assert an.nodes[expand].reason == "broadcasts [1, 4, 1] to [1, 4, 16] along an axis of its channels"
    b = onnx.ModelProto()
    b.CopyFrom(a)
    F.perturb(b, 0.3, np.random.RandomState(1))
    x = rng.randn(64, 4, 16).astype(np.float32)
    res = onnxzip.merge(a, b, {"x": x})
    assert res.card["unmerged"] and all(np.isfinite(v).all() for v in F.run(res.model, {"x": x[:8]}).values())


def test_a_written_out_key_value_cache_is_left_unmerged_with_its_reason():
    """A decoder exported with its cache concatenates graph inputs (past keys and values) with the new keys and
    values along the tokens: the cache holds each model's own features, so the attention is left unmerged and the
    reason says so; the merge still runs."""
    from onnx import TensorProto, helper, numpy_helper
    n = helper.make_node
    nodes = [n("MatMul", ["x", "q.w"], ["q"]), n("MatMul", ["x", "k.w"], ["k"]), n("MatMul", ["x", "v.w"], ["v"]),
             n("Concat", ["past_k", "k"], ["kc"], axis=1), n("Concat", ["past_v", "v"], ["vc"], axis=1),
             n("Transpose", ["kc"], ["kt"], perm=[0, 2, 1]), n("MatMul", ["q", "kt"], ["s"]),
             n("Softmax", ["s"], ["p"], axis=-1), n("MatMul", ["p", "vc"], ["a"]), n("MatMul", ["a", "o.w"], ["o"]),
             n("ReduceMean", ["o", "tokens"], ["pool"], keepdims=0),
             n("Gemm", ["pool", "head.w", "head.b"], ["logits"])]
    rng = np.random.RandomState(5)
    weights = {"q.w": rng.randn(16, 16), "k.w": rng.randn(16, 16), "v.w": rng.randn(16, 16), "o.w": rng.randn(16, 16),
               "head.w": rng.randn(16, 5), "head.b": rng.randn(5)}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16])] + [
        helper.make_tensor_value_info(p, TensorProto.FLOAT, ["N", 2, 16]) for p in ("past_k", "past_v")]
    graph = helper.make_graph(nodes, "cache", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                    ["N", 5])],
                              [numpy_helper.from_array((v / 4).astype(np.float32), k) for k, v in weights.items()]
                              + [numpy_helper.from_array(np.array([1], np.int64), "tokens")])
    a = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    a.ir_version = 10
    an = analyse(a)
    reasons = [info.reason for info in an.nodes if info.kind == "unsupported"]
    assert len(reasons) == 2 and all("key/value cache" in r and "'past_" in r for r in reasons), reasons
    b = onnx.ModelProto()
    b.CopyFrom(a)
    F.perturb(b, 0.3, np.random.RandomState(1))
    feed = {"x": rng.randn(64, 4, 16).astype(np.float32), "past_k": rng.randn(64, 2, 16).astype(np.float32),
            "past_v": rng.randn(64, 2, 16).astype(np.float32)}
    res = onnxzip.merge(a, b, feed)
    assert res.card["unmerged"] and all(np.isfinite(v).all() for v in F.run(res.model, feed).values())


# ---------------------------------------------------------------------------------------------------------------
# A learned relative position bias added to the attention scores (Swin): averaged like a bias where it differs
# ---------------------------------------------------------------------------------------------------------------

RELATIVE = ["vit_relative_ts", "vit_relative_dynamo", "vit_relative_sdpa_dynamo23"]  # the last: the Attention op's mask


@pytest.mark.parametrize("name", RELATIVE)
def test_relative_position_biases_are_found_once_per_block(name):
    an = analyse(load(name))
    assert len(an.averaged) == DEPTH, an.averaged
    for i, j in an.averaged:
        value = an.initializers[an.model.graph.node[i].input[j]]
        assert value.size >= HEADS * 4, value.shape  # a value per head and pair of tokens (or the table of them)


@pytest.mark.parametrize("name", RELATIVE)
def test_relative_position_biases_that_differ_are_merged_as_their_average(name):
    """B perturbed everywhere, its biases too: the attention is zipped all the same (before, every block from the
    first attention on was left unmerged), and the merged model adds the average of the two models' biases."""
    a, b = load(name), load(name, "b")
    F.perturb(b, 0.3, np.random.RandomState(1))
    an, bn = analyse(a), analyse(b)
    x = np.random.RandomState(0).randn(256, 1, 8, 8).astype(np.float32)
    res = onnxzip.merge(a, b, {"input": x})
    assert not res.card["unmerged"] and not res.card["zipped_nothing"]
    assert res.card["trunk"]["weighted_layers_zipped"] == res.card["trunk"]["weighted_layers"] - 1
    assert len(res.card["averaged_constants"]) == DEPTH
    merged = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    nodes = {n.name: n for n in res.model.graph.node}
    for i, j in an.averaged:
        node = an.model.graph.node[i]
        want = (an.initializers[node.input[j]].astype(np.float64)
                + bn.initializers[bn.model.graph.node[i].input[j]]) / 2
        got = merged[next(n for k, n in nodes.items() if k.endswith("/" + node.name)).input[j]]
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert all(np.isfinite(h["relative_error"]) for h in res.card["verification"]["heads"])


def test_inspect_says_which_differing_constants_merge_takes_as_their_average():
    a, b = load("vit_relative_ts"), load("vit_relative_ts", "b")
    assert inspect_models(a, b)["match"]["averaged_constants"] == []  # twins: the biases agree
    F.perturb(b, 0.3, np.random.RandomState(1))
    report = inspect_models(a, b)
    assert report["match"]["ok"] and len(report["match"]["averaged_constants"]) == DEPTH
    assert f"{DEPTH} constant(s) differ between the models where merge takes their average" in format_report(report)


# ---------------------------------------------------------------------------------------------------------------
# ONNX's fused Attention op (opset 23) on (N, T, H·d) inputs: the op splits them into heads itself
# ---------------------------------------------------------------------------------------------------------------

def fused_attention_model(weights, heads=2, kv_heads=2, past=False, present=False):
    """x (N, 4, 16) -> q, k, v = x W + b -> Attention(q, k, v, mask, q_num_heads, kv_num_heads) on (N, T, H·d)
    -> MatMul + bias -> mean over tokens -> Gemm head. `past`: the op also reads a key/value
    cache (graph inputs); `present` (or `past`): it also writes its keys and values."""
    from onnx import TensorProto, helper, numpy_helper
    nodes = []
    for p in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"{p}.w"], [f"{p}0"]),
                  helper.make_node("Add", [f"{p}0", f"{p}.b"], [p])]
    attention_inputs = ["q", "k", "v", "mask"] + (["past_k", "past_v"] if past else [])
    outputs = ["att"] + (["present_k", "present_v"] if past or present else [])  # onnxruntime needs them with a cache
    nodes += [helper.make_node("Attention", attention_inputs, outputs, q_num_heads=heads, kv_num_heads=kv_heads),
              helper.make_node("MatMul", ["att", "o.w"], ["o0"]),
              helper.make_node("Add", ["o0", "o.b"], ["o"]),
              helper.make_node("ReduceMean", ["o", "tokens"], ["pool"], keepdims=0),
              helper.make_node("Gemm", ["pool", "head.w", "head.b"], ["logits"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16])]
    if past:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", kv_heads, 2, 16 // heads])
                   for n in ("past_k", "past_v")]
    graph = helper.make_graph(nodes, "fused", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
                              + [numpy_helper.from_array(np.array([1], np.int64), "tokens")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def head_permuted_twin(w, rng, heads=2, d=8):
    """The weights `w` of a model with separate q, k, v projections (x W + b) and an output projection `o.w`, with
    queries and keys permuted by one permutation inside each head and values (and the output projection's input)
    by another, heads in place: the twin computes the model exactly."""
    pqk = np.concatenate([h * d + rng.permutation(d) for h in range(heads)])
    pv = np.concatenate([h * d + rng.permutation(d) for h in range(heads)])
    twin = dict(w)
    for p, perm in (("q", pqk), ("k", pqk), ("v", pv)):
        twin[f"{p}.w"], twin[f"{p}.b"] = w[f"{p}.w"][:, perm], w[f"{p}.b"][perm]
    twin["o.w"] = w["o.w"][pv]
    return twin


def assert_twins_merge_exactly(a, b, x, zipped):
    """B computes A; their merge on `x` zips `zipped` weighted layers, leaves nothing unmerged, and both heads
    compute A (1e-4 of the largest logit)."""
    want = run(a, {"x": x[:64]})["logits"]
    assert np.abs(run(b, {"x": x[:64]})["logits"] - want).max() < 1e-5
    res = onnxzip.merge(a, b, {"x": x})
    assert not res.card["unmerged"] and res.card["trunk"]["weighted_layers_zipped"] == zipped
    got = run(res.model, {"x": x[:64]})
    for head in ("a", "b"):
        assert np.abs(got[f"{head}/logits"] - want).max() < 1e-4 * np.abs(want).max(), head


def fused_weights(rng, kv_width=16):
    return {"q.w": rng.randn(16, 16) / 4, "q.b": rng.uniform(0, 0.2, 16), "k.w": rng.randn(16, kv_width) / 4,
            "k.b": rng.uniform(0, 0.2, kv_width), "v.w": rng.randn(16, kv_width) / 4,
            "v.b": rng.uniform(0, 0.2, kv_width), "mask": rng.randn(2, 4, 4), "o.w": rng.randn(16, 16) / 4,
            "o.b": rng.uniform(0, 0.2, 16), "head.w": rng.randn(16, 5) / 4, "head.b": rng.uniform(0, 0.2, 5)}


def test_the_fused_attention_op_on_packed_heads_merges_twins_exactly_and_averages_its_mask():
    """Queries and keys share a transform inside each head of 8 (the op's own split of 16 features into 2 heads),
    values carry through to the output projection; the twin permutes both inside each head, heads in place. A
    perturbed B zips everything, its mask (a per-head bias added to the scores) merged as the average."""
    rng = np.random.RandomState(7)
    w = fused_weights(rng)
    twin = head_permuted_twin(w, rng)
    a, b = fused_attention_model(w), fused_attention_model(twin)
    an = analyse(a)
    assert not an.blocked_reasons, an.blocked_reasons
    sq, sk, sv = (an.tensor_spaces[t].space for t in "qkv")
    assert sq == sk != sv
    for sid in (sq, sv):
        assert list(an.spaces[sid].partition) == [h for h in range(2) for _ in range(8)]
    assert an.tensor_spaces["att"].space == sv
    x = rng.randn(256, 4, 16).astype(np.float32)
    assert_twins_merge_exactly(a, b, x, zipped=4)

    b = fused_attention_model({k: v + 0.3 * rng.randn(*v.shape) for k, v in w.items()})
    res = onnxzip.merge(a, b, {"x": x})
    assert not res.card["unmerged"] and not res.card["zipped_nothing"]
    assert len(res.card["averaged_constants"]) == 1
    mask = next(onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer if t.name.endswith("mask"))
    want_mask = (w["mask"].astype(np.float32).astype(np.float64)
                 + onnx.numpy_helper.to_array(next(t for t in b.graph.initializer if t.name == "mask"))) / 2
    np.testing.assert_allclose(mask, want_mask, rtol=1e-6)


def test_the_fused_attention_op_with_grouped_query_heads_merges_twins_exactly():
    """q_num_heads 2 over kv_num_heads 1: the op repeats the key/value head for both query heads. The queries of
    both heads are matched as the key head (a view of it), the output projection reads the value head once per
    query head; a twin permuted inside the key head (both query heads alike) and the value head merges back."""
    rng = np.random.RandomState(9)
    w = fused_weights(rng, kv_width=8)
    keys, values = rng.permutation(8), rng.permutation(8)
    twin = dict(w)
    twin["k.w"], twin["k.b"] = w["k.w"][:, keys], w["k.b"][keys]
    twin["v.w"], twin["v.b"] = w["v.w"][:, values], w["v.b"][values]
    both = np.concatenate([keys, 8 + keys])
    twin["q.w"], twin["q.b"] = w["q.w"][:, both], w["q.b"][both]
    twin["o.w"] = w["o.w"][np.concatenate([values, 8 + values])]
    a, b = fused_attention_model(w, kv_heads=1), fused_attention_model(twin, kv_heads=1)
    an = analyse(a)
    assert not an.blocked_reasons, an.blocked_reasons
    assert an.spaces[an.tensor_spaces["q"].space].queries_of_keys
    assert_twins_merge_exactly(a, b, rng.randn(256, 4, 16).astype(np.float32), zipped=4)


@pytest.mark.parametrize("case", ["past", "present"])
def test_fused_attention_the_walk_cannot_follow_is_left_unmerged_with_its_reason(case):
    """A key/value cache and keys and values written out for one are not followed: the attention is left unmerged
    and says why, the merge still runs."""
    rng = np.random.RandomState(8)
    w = fused_weights(rng)
    if case == "past":
        w["mask"] = rng.randn(2, 4, 6)  # over the 2 cached and the 4 new tokens
    a = fused_attention_model(w, past=case == "past", present=case == "present")
    an = analyse(a)
    node = next(i for i, n in enumerate(an.model.graph.node) if n.op_type == "Attention")
    reason = an.nodes[node].reason
    assert an.nodes[node].kind == "unsupported"
    assert {"past": "past_key", "present": "present_key"}[case] in reason
    x = {"x": rng.randn(128, 4, 16).astype(np.float32)}
    if case == "past":
        x.update({n: rng.randn(128, 2, 2, 8).astype(np.float32) for n in ("past_k", "past_v")})
    b = onnx.ModelProto()
    b.CopyFrom(a)
    F.perturb(b, 0.3, np.random.RandomState(1))
    res = onnxzip.merge(a, b, x)
    assert res.card["unmerged"]
    out = F.run(res.model, {k: v[:8] for k, v in x.items()})
    assert all(np.isfinite(v).all() for v in out.values())


# ---------------------------------------------------------------------------------------------------------------
# Attention's products written as Einsum (torchvision's MaxViT)
# ---------------------------------------------------------------------------------------------------------------

def tokens_model(name, nodes, weights, consts, opset=18):
    """A checked model x (N, 4, 16) -> logits (N, 5) of `nodes`, float `weights` and `consts` as initializers."""
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
                              + [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def einsum_attention_model(weights, scores="b h i d, b h j d -> b h i j", values="bhij,bhjd->bhid"):
    """x (N, 4, 16) -> q, k, v = x W + b, each reshaped (N, 4, 2, 8) and transposed to (N, 2, 4, 8) -> Einsum
    `scores` -> Softmax -> Einsum `values` -> back to (N, 4, 16) -> MatMul + bias -> mean over tokens -> Gemm."""
    from onnx import helper
    nodes = []
    for p in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"{p}.w"], [f"{p}0"]),
                  helper.make_node("Add", [f"{p}0", f"{p}.b"], [f"{p}1"]),
                  helper.make_node("Reshape", [f"{p}1", "heads"], [f"{p}2"]),
                  helper.make_node("Transpose", [f"{p}2"], [p], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Einsum", ["q", "k"], ["s"], equation=scores),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1),
              helper.make_node("Einsum", ["p", "v"], ["a0"], equation=values),
              helper.make_node("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["a1", "tokens_shape"], ["att"]),
              helper.make_node("MatMul", ["att", "o.w"], ["o0"]),
              helper.make_node("Add", ["o0", "o.b"], ["o"]),
              helper.make_node("ReduceMean", ["o", "tokens"], ["pool"], keepdims=0),
              helper.make_node("Gemm", ["pool", "head.w", "head.b"], ["logits"])]
    consts = {"heads": np.array([0, 4, 2, 8], np.int64), "tokens_shape": np.array([0, 4, 16], np.int64),
              "tokens": np.array([1], np.int64)}
    return tokens_model("einsum", nodes, weights, consts)


def test_attention_written_as_einsum_merges_twins_exactly():
    """MaxViT writes Q Kᵀ as Einsum "B G H I D, B G H J D -> B G H I J" and P V as "… I J, … J D -> … I D":
    queries and keys are tied head by head, values carry to the output; a twin permuted inside each head merges
    back exactly, and an equation that is not attention's is left unmerged with its reason."""
    rng = np.random.RandomState(9)
    w = fused_weights(rng)
    del w["mask"]
    twin = head_permuted_twin(w, rng)
    a, b = einsum_attention_model(w), einsum_attention_model(twin)
    an = analyse(a)
    assert not an.blocked_reasons, an.blocked_reasons
    sq, sk, sv = (an.nodes[i].out_space.space for i in an.weighted[:3])
    assert sq == sk != sv
    assert list(an.spaces[sq].partition) == [h for h in range(2) for _ in range(8)]
    x = rng.randn(256, 4, 16).astype(np.float32)
    assert_twins_merge_exactly(a, b, x, zipped=4)
    from onnxzip.evaluate import count_macs  # 3 projections, 2 products of 2 heads x 4 x 4 x 8, output, head
    assert count_macs(a) == 3 * 4 * 16 * 16 + 2 * (2 * 4 * 4 * 8) + 4 * 16 * 16 + 16 * 5

    other = analyse(einsum_attention_model(w, scores="bhid,bhjd->bhji"))  # scores transposed: not followed
    (i,) = [i for i, n in enumerate(other.model.graph.node) if n.op_type == "Einsum"][:1]
    assert other.nodes[i].kind == "unsupported" and "bhid,bhjd->bhji" in other.nodes[i].reason


# ---------------------------------------------------------------------------------------------------------------
# Swin V2's attention: cosine similarity of queries and keys, a learned logit scale per head, a continuous
# position bias (an MLP of a constant table), a qkv bias whose keys' part is zeroed (ScatterND)
# ---------------------------------------------------------------------------------------------------------------

def cosine_attention_model(weights, shape_from_input=False):
    """x (N, 4, 16) -> qkv = x W + ScatterND(b, keys' part, 0) -> (N, 4, 3, 2, 8) -> q, k, v (N, 2, 4, 8) ->
    q / max(||q||, eps) and k likewise (ReduceL2 over each head's features, Clip, Expand, Div) -> q kᵀ times
    exp(clip(logit_scale)) (2, 1, 1), plus 16·sigmoid(relu(table W1) W2) reshaped (2, 4, 4) -> Softmax -> times v ->
    (N, 4, 16) -> MatMul + bias -> mean over tokens -> Gemm head. `shape_from_input`: the position bias is reshaped
    to (2, T, T) with T from the input's shape, as TorchScript writes `.view(t, t, -1)`: the lookup is folded, the
    Reshape, Sigmoid and Mul after it are not."""
    from onnx import helper
    n = helper.make_node
    nodes = [n("ScatterND", ["qkv.b", "k_rows", "zeros"], ["qkv.b0"]),
             n("MatMul", ["x", "qkv.w"], ["qkv0"]), n("Add", ["qkv0", "qkv.b0"], ["qkv1"]),
             n("Reshape", ["qkv1", "split"], ["qkv2"]), n("Transpose", ["qkv2"], ["qkv"], perm=[2, 0, 3, 1, 4])]
    for j, p in enumerate("qkv"):
        nodes.append(n("Gather", ["qkv", f"i{j}"], [p], axis=0))
    for p in "qk":
        nodes += [n("ReduceL2", [p, "last"], [f"{p}n"], keepdims=1), n("Clip", [f"{p}n", "eps"], [f"{p}c"]),
                  n("Shape", [p], [f"{p}s"]), n("Expand", [f"{p}c", f"{p}s"], [f"{p}e"]),
                  n("Div", [p, f"{p}e"], [f"{p}u"])]
    nodes += [n("Transpose", ["ku"], ["kt"], perm=[0, 1, 3, 2]), n("MatMul", ["qu", "kt"], ["s0"]),
              n("Clip", ["logit_scale", "", "max_log"], ["ls0"]), n("Exp", ["ls0"], ["ls"]),
              n("Mul", ["s0", "ls"], ["s1"]),
              n("MatMul", ["table", "cpb.w1"], ["c0"]), n("Relu", ["c0"], ["c1"]),
              n("MatMul", ["c1", "cpb.w2"], ["c2"]),
              n("Transpose", ["c2"], ["c3"], perm=[1, 0]),
              n("Reshape", ["c3", "bias_from_input" if shape_from_input else "bias_shape"], ["c4"]),
              n("Sigmoid", ["c4"], ["c5"]), n("Mul", ["c5", "sixteen"], ["cpb"]),
              n("Add", ["s1", "cpb"], ["s"]), n("Softmax", ["s"], ["p"], axis=-1), n("MatMul", ["p", "v"], ["a0"]),
              n("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]), n("Reshape", ["a1", "tokens_shape"], ["att"]),
              n("MatMul", ["att", "o.w"], ["o0"]), n("Add", ["o0", "o.b"], ["o"]),
              n("ReduceMean", ["o", "tokens"], ["pool"], keepdims=0),
              n("Gemm", ["pool", "head.w", "head.b"], ["logits"])]
    consts = {"k_rows": np.arange(16, 32, dtype=np.int64)[:, None], "zeros": np.zeros(16, np.float32),
              "split": np.array([0, 4, 3, 2, 8], np.int64), "i0": np.array(0, np.int64), "i1": np.array(1, np.int64),
              "i2": np.array(2, np.int64), "eps": np.array(1e-12, np.float32),
              "max_log": np.array(np.log(100.0), np.float32), "table": np.linspace(-1, 1, 32).reshape(16, 2)
              .astype(np.float32), "bias_shape": np.array([2, 4, 4], np.int64), "sixteen": np.array(16, np.float32),
              "tokens_shape": np.array([0, 4, 16], np.int64), "tokens": np.array([1], np.int64),
              "last": np.array([-1], np.int64)}
    if shape_from_input:
        nodes[:0] = [n("Shape", ["x"], ["xs"]), n("Gather", ["xs", "i1"], ["t0"], axis=0),
                     n("Unsqueeze", ["t0", "zero_axis"], ["t"]),
                     n("Concat", ["two", "t", "t"], ["bias_from_input"], axis=0)]
        consts.update({"zero_axis": np.array([0], np.int64), "two": np.array([2], np.int64)})
    return tokens_model("cosine", nodes, weights, consts)


def cosine_weights(rng):
    return {"qkv.w": rng.randn(16, 48) / 4, "qkv.b": rng.uniform(0, 0.2, 48), "logit_scale": np.log(
        10 * rng.uniform(0.5, 1.5, (2, 1, 1))), "cpb.w1": rng.randn(2, 8), "cpb.w2": rng.randn(8, 2) / 3,
        "o.w": rng.randn(16, 16) / 4, "o.b": rng.uniform(0, 0.2, 16), "head.w": rng.randn(16, 5) / 4,
        "head.b": rng.uniform(0, 0.2, 5)}


def test_swin_v2_cosine_attention_merges_twins_exactly_and_averages_its_scale_and_bias():
    """The norm of each head's queries (and keys) is computed once on the merged features, one value for every
    feature of the head, so queries and keys are still matched inside their heads; the computed qkv bias, logit
    scale and position bias are folded to constants, the last two averaged where the models differ."""
    rng = np.random.RandomState(11)
    w = cosine_weights(rng)
    pqk = np.concatenate([h * 8 + rng.permutation(8) for h in range(2)])
    pv = np.concatenate([h * 8 + rng.permutation(8) for h in range(2)])
    rows = np.concatenate([pqk, 16 + pqk, 32 + pv])
    twin = dict(w, **{"qkv.w": w["qkv.w"][:, rows], "qkv.b": w["qkv.b"][rows], "o.w": w["o.w"][pv]})
    a, b = cosine_attention_model(w), cosine_attention_model(twin)
    an = analyse(a)
    assert not an.blocked_reasons, an.blocked_reasons
    qkv = an.nodes[an.weighted[0]].out_space.space
    assert an.spaces[qkv].blocks == 6 and len(an.spaces[qkv].alike) == 1
    assert not any(n.op_type in ("ScatterND", "Exp", "Sigmoid") for n in an.model.graph.node)  # folded
    x = rng.randn(256, 4, 16).astype(np.float32)
    assert_twins_merge_exactly(a, b, x, zipped=2)

    other = cosine_weights(np.random.RandomState(12))
    res = onnxzip.merge(a, cosine_attention_model(other), {"x": x})
    assert not res.card["unmerged"] and not res.card["zipped_nothing"]
    assert sorted(c["why"] for c in res.card["averaged_constants"]) == [
        "a learned bias added to attention scores", "a learned scale of attention scores"]


def test_a_position_bias_reshaped_to_the_input_s_shape_is_averaged_through_its_sigmoid():
    """Where the position bias is reshaped to a shape read from the input, only its lookup folds: the table is
    averaged before the Reshape, Sigmoid and Mul that follow it (the merged bias is 16·sigmoid of the average, an
    approximation like every average). Twins still merge exactly, and two models merge with nothing unmerged (the
    table used to be a constant that differs, which left the attention unmerged)."""
    rng = np.random.RandomState(13)
    w = cosine_weights(rng)
    pqk = np.concatenate([h * 8 + rng.permutation(8) for h in range(2)])
    rows = np.concatenate([pqk, 16 + pqk, 32 + np.arange(16)])
    twin = dict(w, **{"qkv.w": w["qkv.w"][:, rows], "qkv.b": w["qkv.b"][rows]})
    a, b = cosine_attention_model(w, True), cosine_attention_model(twin, True)
    an = analyse(a)
    assert not an.blocked_reasons, an.blocked_reasons
    assert any(n.op_type == "Sigmoid" for n in an.model.graph.node)  # not folded
    x = rng.randn(256, 4, 16).astype(np.float32)
    assert_twins_merge_exactly(a, b, x, zipped=2)
    res = onnxzip.merge(a, cosine_attention_model(cosine_weights(np.random.RandomState(14)), True), {"x": x})
    assert not res.card["unmerged"] and not res.card["zipped_nothing"]
    assert sorted(c["why"] for c in res.card["averaged_constants"]) == [
        "a learned bias added to attention scores", "a learned scale of attention scores"]
