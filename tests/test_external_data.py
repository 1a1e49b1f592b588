"""Large models: a model stored with external data merges, and a merged model over the threshold is written with
its weights in `<file>.data` beside it (the threshold is lowered here: the code path is the one a >2 GB model
takes). Their weights are mapped from files (onnx_io's mapped weights), shared by every onnxruntime session and
streamed when written; the merge computes what it computes in memory. Peak memory itself: test_memory.py."""

import os
import tempfile

import numpy as np
import onnx
import onnxruntime

import onnxzip
from onnxzip import onnx_io

import fixtures as F


def test_external_data_in_and_out(tmp_path, monkeypatch):
    a, pa = F.vgg()
    b, _ = F.permuted_twin(pa)
    paths = []
    for name, model in (("a", a), ("b", b)):
        path = tmp_path / f"{name}.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # onnx.save moves the weights of the proto it is given out to the file
        onnx.save(copy, str(path), save_as_external_data=True, location=f"{name}.onnx.data", size_threshold=0)
        assert (tmp_path / f"{name}.onnx.data").exists()
        paths.append(str(path))
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "out" / "merged.onnx"
    out.parent.mkdir()
    x = F.calib(a, 64, seed=9)
    res = onnxzip.merge(paths[0], paths[1], F.calib(a, 256), str(out), method="permute")
    assert sorted(os.listdir(out.parent)) == ["merged.onnx", "merged.onnx.data", "merged.onnx.json"]
    stored = onnx.load(str(out), load_external_data=False)
    big = [t for t in stored.graph.initializer if np.prod(t.dims) * 4 >= 1024]  # onnx keeps smaller ones inline
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big), \
        "every weight above 1 KB of the merged model is in merged.onnx.data"
    loaded = onnx_io.load_model(str(out))
    want = F.run(a, x)["logits"]
    got = F.run(loaded, x)
    np.testing.assert_allclose(got["a/logits"], want, atol=1e-4)
    np.testing.assert_allclose(got["b/logits"], want, atol=1e-4)
    assert res.card["trunk"]["weighted_layers_zipped"] == res.card["trunk"]["weighted_layers"] - 1


def test_large_models_are_never_serialised_whole(tmp_path, monkeypatch):
    """Above protobuf's 2 GiB no model can be serialised: onnxruntime then gets the weights as OrtValues beside a
    weightless skeleton, shape inference and the checker see shapes only. With the limit lowered, every model of a
    merge takes that path, and the merge is the same as the ordinary one."""
    (a, _), (b, _) = F.random_pair("resnet", seed=3)
    calib, x = F.calib(a, 256), F.calib(a, 32, seed=9)
    want = onnxzip.merge(a, b, calib, method="zip")

    used = []
    real = onnx_io.without_weights

    def spy(model, external=False, min_bytes=1024):
        used.append(external)
        return real(model, external, min_bytes)

    monkeypatch.setattr(onnx_io, "without_weights", spy)
    monkeypatch.setattr(onnx_io, "IN_MEMORY_LIMIT", 1000)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    assert onnx_io.is_large(a)
    out = tmp_path / "merged.onnx"
    got = onnxzip.merge(a, b, calib, str(out), method="zip")
    assert used.count(True) >= 3, "calibration, repair and verification sessions got their weights as OrtValues"
    assert (tmp_path / "merged.onnx.data").exists()
    assert got.card["verification"] == want.card["verification"]
    for model in (got.model, onnx_io.load_model(str(out))):
        session = onnx_io.inference_session(model, onnxruntime.SessionOptions(), ["CPUExecutionProvider"])
        assert hasattr(session, "_onnxzip_weights")
        outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))
        ref = F.run(want.model, x)
        for k in ref:
            np.testing.assert_allclose(outs[k], ref[k], rtol=1e-5, atol=1e-5)
    assert onnx_io.model_sha256(a) != onnx_io.model_sha256(b)
    onnx_io.check_model(got.model)


def _save_external(model, path):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save moves the weights of the proto it is given out to the file
    onnx.save(copy, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return str(path)


def test_mapped_merge_computes_what_the_in_memory_merge_does(tmp_path):
    """Models stored with external data are merged with their weights left in their files (mapped): the same
    matchings and, to float32 rounding, the same model as from the models in memory. The result names its weights in
    the written file, and the merge's own weight files are gone."""
    (a, _), (b, _) = F.random_pair("resnet", seed=4)
    calib, x = F.calib(a, 256), F.calib(a, 32, seed=9)
    want = onnxzip.merge(a, b, calib, method="zip")
    paths = [_save_external(m, tmp_path / f"{k}.onnx") for k, m in (("a", a), ("b", b))]
    out = tmp_path / "out" / "merged.onnx"
    out.parent.mkdir()
    got = onnxzip.merge(paths[0], paths[1], calib, str(out), method="zip")
    assert sorted(os.listdir(out.parent)) == ["merged.onnx", "merged.onnx.json"], "no weight folder left behind"
    assert [s["cross_model_merges"] for s in got.card["spaces"]] == [s["cross_model_merges"]
                                                                       for s in want.card["spaces"]]
    mapped = [t for t in got.model.graph.initializer if onnx_io.is_mapped(t)]
    assert mapped and all(onnx_io._location(t)[0] == str(out) for t in mapped), \
        "the result's large weights are read from the written file"
    written = onnx_io.load_model(str(out))
    for t in mapped:
        np.testing.assert_array_equal(onnx_io.tensor_array(t), onnx.numpy_helper.to_array(
            next(u for u in written.graph.initializer if u.name == t.name)))
    ref = F.run(want.model, x)
    for model in (got.model, written):
        session = onnx_io.inference_session(model, onnxruntime.SessionOptions(), ["CPUExecutionProvider"])
        outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))
        for k in ref:
            np.testing.assert_allclose(outs[k], ref[k], rtol=1e-4, atol=1e-4)


def test_sessions_share_mapped_weights(tmp_path):
    """A mapped weight reaches onnxruntime as an OrtValue over the file's one mapping (add_initializer: not copied),
    however many sessions there are; a copy in a session would be a third copy of the model at a merge's peak."""
    a, _ = F.vgg()
    folder = onnx_io.WeightFolder(str(tmp_path))
    mapped = onnx_io.map_weights(a, folder.new_file("a"))
    big = [t for t in mapped.graph.initializer
           if onnx_io.is_mapped(t) and onnx_io.tensor_array(t).nbytes >= onnx_io.SHARED_MIN_BYTES]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT for t in big)
    x = F.calib(a, 8, seed=1)
    sessions = [onnx_io.inference_session(mapped, onnxruntime.SessionOptions(), ["CPUExecutionProvider"])
                for _ in range(2)]
    for session in sessions:
        arrays = session._onnxzip_weights[0]
        assert len(arrays) == len(big)
        for array, t in zip(arrays, big):
            assert np.shares_memory(array, onnx_io.tensor_array(t)), f"{t.name} was copied"
        np.testing.assert_allclose(session.run(None, {"input": x})[0], F.run(a, x)["logits"], atol=1e-5)
    onnx_io.check_model(mapped)
    folder.close()
    assert os.listdir(tmp_path) == []


def test_large_in_memory_models_are_mapped_and_merge_alike(tmp_path, monkeypatch):
    """Above MAPPED_THRESHOLD a model held in memory has its weights written once to a temporary weight file and
    mapped; without an output the result is an ordinary in-memory model again. Surgery computes large weights a
    slice at a time (CHUNK_BYTES), to float64 rounding what it computes whole."""
    from onnxzip import surgery

    (a, _), (b, _) = F.random_pair("mlp", seed=5)
    calib, x = F.calib(a, 256), F.calib(a, 32, seed=9)
    want = onnxzip.merge(a, b, calib, method="zip")
    monkeypatch.setattr(onnx_io, "MAPPED_THRESHOLD", 0)
    monkeypatch.setattr(surgery, "CHUNK_BYTES", 64)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    got = onnxzip.merge(a, b, calib, method="zip")
    assert not onnx_io.has_mapped_weights(got.model)
    assert os.listdir(tmp_path) == [], "the merge's weight folder is removed"
    ref, outs = F.run(want.model, x), F.run(got.model, x)
    for k in ref:
        np.testing.assert_allclose(outs[k], ref[k], rtol=1e-4, atol=1e-4)


def test_single_file_writes_stream_mapped_weights(tmp_path):
    """A mapped model below the external-data threshold is written as one ordinary .onnx file, its weights streamed
    from their files; `written_model` names each weight's bytes inside that file."""
    a, _ = F.vgg()
    folder = onnx_io.WeightFolder(str(tmp_path))
    mapped = onnx_io.map_weights(a, folder.new_file("a"))
    path = tmp_path / "single.onnx"
    onnx_io.save_model_atomic(mapped, path)
    assert onnx.load(str(path)) == a
    again = onnx_io.written_model(mapped, path)
    folder.close()
    for t, u in zip(again.graph.initializer, a.graph.initializer):
        np.testing.assert_array_equal(onnx_io.tensor_array(t), onnx.numpy_helper.to_array(u))


def test_refit_leaves_layers_over_its_memory_budget(monkeypatch):
    """A layer whose regression sums would exceed refit.MAX_SUMS_BYTES keeps surgery's weights, and the card says
    why (a 2-million-class head would need 8 GiB of sums)."""
    from onnxzip import refit

    a, pa = F.mlp()
    b, _ = F.permuted_twin(pa)
    monkeypatch.setattr(refit, "MAX_SUMS_BYTES", 0)
    res = onnxzip.merge(a, b, F.calib(a, 256), method="permute")
    layers = res.card["refit"]["layers"]
    assert layers and all(x["skipped"].startswith("too large to refit") for x in layers)
    assert any("too large to refit kept surgery's weights" in line for line in res.summary_lines())
    x = F.calib(a, 32, seed=9)
    out = F.run(res.model, x)
    np.testing.assert_allclose(out["a/logits"], F.run(a, x)["logits"], atol=1e-4)


def test_inspect_leaves_external_weights_in_their_files(tmp_path, monkeypatch):
    """`onnxzip inspect` of models stored with external data reports what it reports for the models in memory,
    with the weights mapped from their files (read-only), not loaded: a 537 MB VGG-16 pair took 4.0 GB and 27 s
    loaded, 61 MB and 1.2 s mapped."""
    import json

    from click.testing import CliRunner

    from onnxzip.cli import cli
    from onnxzip.inspect import inspect_models
    a, pa = F.vgg()
    b, _ = F.permuted_twin(pa)
    paths = []
    for name, model in (("a", a), ("b", b)):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save(copy, str(tmp_path / f"{name}.onnx"), save_as_external_data=True, location=f"{name}.onnx.data",
                  size_threshold=0)
        paths.append(str(tmp_path / f"{name}.onnx"))
    loads = []
    real = onnx_io.load_model

    def spy(path, what="model", mapped=False):
        model = real(path, what, mapped)
        loads.append(sum(onnx_io.is_mapped(t) for t in model.graph.initializer))
        return model

    monkeypatch.setattr(onnx_io, "load_model", spy)
    result = CliRunner().invoke(cli, ["inspect", "--json", *paths])
    assert result.exit_code == 0, result.output
    assert len(loads) == 2 and all(n > 0 for n in loads), "the weights are left in their files"
    want = inspect_models(a, b, paths[0], paths[1])
    assert json.loads(result.output) == json.loads(json.dumps(want))
