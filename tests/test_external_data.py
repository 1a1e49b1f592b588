"""Large models: a model stored with external data merges, and a merged model over the threshold is written with
its weights in `<file>.data` beside it (the threshold is lowered here: the code path is the one a >2 GB model
takes)."""

import os

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
