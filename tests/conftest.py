"""Shared pytest fixtures.

`logits_model` builds a tiny model whose outputs are slices of its input, so a test chooses the logits a model
"predicts" by choosing its input: ``logits_model({"a/logits": (0, 3), "b/logits": (3, 5)}, width=5)``.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def build_logits_model(heads: dict, width: int) -> onnx.ModelProto:
    """Input `input` (N, width) float32; output `name` = input[:, start:stop] for each name -> (start, stop)."""
    nodes, inits, outputs = [], [], []
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    inits.append(axes)
    for i, (name, (start, stop)) in enumerate(heads.items()):
        inits.append(numpy_helper.from_array(np.array([start], np.int64), f"start{i}"))
        inits.append(numpy_helper.from_array(np.array([stop], np.int64), f"stop{i}"))
        nodes.append(helper.make_node("Slice", ["input", f"start{i}", f"stop{i}", "axes"], [name], name=f"slice{i}"))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", stop - start]))
    graph = helper.make_graph(nodes, "logits", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                             ["N", width])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def logits_model():
    return build_logits_model


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """(models dir, output dir, temp dir); the temp dir is where `tempfile` writes during the test, so a test can
    check that a failed merge left nothing behind anywhere."""
    import tempfile

    models, out, tmp = tmp_path / "models", tmp_path / "out", tmp_path / "tmp"
    for d in (models, out, tmp):
        d.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return models, out, tmp


@pytest.fixture(scope="session")
def merged_mlp(tmp_path_factory):
    """The bundled MLP pair zipped on 300 calibration samples (60 held back), written once per test session:
    (path of the merged .onnx, MergeResult)."""
    import os

    import onnxzip

    models = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
    out = tmp_path_factory.mktemp("merged_mlp") / "mlp.onnx"
    result = onnxzip.merge(os.path.join(models, "mlp-s0", "a.onnx"), os.path.join(models, "mlp-s0", "b.onnx"),
                           os.path.join(models, "data", "calib.npy"), str(out), num_samples=300, device="cpu")
    return str(out), result
