"""Every torchvision classification model, as exported by PyTorch (issue 13: "never a crash").

`tests/data/torchvision/` holds the graph of every torchvision classifier (TorchScript exporter, opset 17, random
weights, 10 classes; `tools/torchvision_graphs.py`), its large float initializers emptied to keep the repository
small. Each test fills them with seeded random values (He-scaled for weights, around 1 for vectors) and runs what a
user runs:

- graph analysis of the model against itself (`onnxzip inspect A A`): it must finish, find the two models alike,
  and zip every learned feature space outside the task heads, or leave exactly the spaces `PARTLY_ZIPPED` says
  and why;
- for three small models (`TWINS`), a twin merge with the defaults (zip and the least-squares
  refit): the merged model must compute the model again (1e-4 relative), or, where ZipIt's beta merged features
  of one model with each other (lossy by design), do so with beta 0.

With ONNXZIP_TEST_HEAVY=1 the analysis also runs on the models of more than `HEAVY_PARAMS` parameters (filled,
gigabytes), and the twin merges on every model of up to `HEAVY_TWIN_PARAMS`. Known: the random fill is crude (the
exports' BatchNorms are folded, so nothing normalises the activations again), and in deep residual networks the
activations explode (EfficientNetV2-S: logits of 2.8e5); the twin merges of EfficientNetV2-S and RegNetY-1.6GF
fail here (0.52 and, with vectors in ±0.1, 3.7e-4 with beta 0 and refit none), and whether that is the fill or
onnxzip is not known yet.
"""
import json
import os
import zlib

import numpy as np
import onnx
import pytest

import onnxzip
from onnxzip.inspect import inspect_models

import fixtures as F

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "torchvision")
with open(os.path.join(DATA, "manifest.json")) as _f:
    MANIFEST = json.load(_f)
MODELS = MANIFEST["models"]
HEAVY_PARAMS = 100_000_000
HEAVY_TWIN_PARAMS = 30_000_000
TWIN_RTOL = 1e-4
HEAVY = os.environ.get("ONNXZIP_TEST_HEAVY") == "1"
# models whose graphs analysis cannot follow everywhere yet: name -> (learned spaces left unzipped, why)
PARTLY_ZIPPED: dict = {}


def _param(name):
    marks = [] if MODELS[name]["params"] <= HEAVY_PARAMS or HEAVY else \
        [pytest.mark.skip(reason=f"{MODELS[name]['params'] / 1e6:.0f}M parameters: set ONNXZIP_TEST_HEAVY=1")]
    return pytest.param(name, marks=marks)


def filled(name: str, seed: int = 0) -> onnx.ModelProto:
    """The model of `name` with its emptied float initializers filled: weights (2-D and up) normal with variance
    2 / fan-in (the fan-in: every axis but the first), vectors uniform in [0.5, 1.5]; seeded by the tensor's
    name."""
    model = onnx.load(os.path.join(DATA, f"{name}.onnx"))
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or not len(init.dims) or init.raw_data or len(init.float_data):
            continue
        shape = tuple(int(d) for d in init.dims)
        rng = np.random.default_rng([seed, zlib.crc32(init.name.encode())])
        if len(shape) >= 2:
            value = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[1:])))
        else:
            value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        init.raw_data = value.tobytes()
    return model


def test_the_graphs_are_every_classifier_that_exports():
    """The manifest was written by the tool for every model it was given, and every one exported."""
    assert len(MODELS) >= 80 and not MANIFEST["failed"], MANIFEST["failed"]
    for name, entry in MODELS.items():
        assert os.path.isfile(os.path.join(DATA, f"{name}.onnx")), name
        assert entry["initializers_emptied"] > 0, name


@pytest.mark.parametrize("name", [_param(n) for n in sorted(MODELS)])
def test_analysis_zips_every_learned_space_outside_the_heads(name):
    model = filled(name)
    report = inspect_models(model, model)
    assert report["match"]["ok"], report["match"]
    zipped = report["a"]["spaces_zipped"]
    unmerged = [(u["node"], u["reason"]) for u in report["a"].get("unmerged", [])]
    if name in PARTLY_ZIPPED:
        left, why = PARTLY_ZIPPED[name]
        assert zipped["of"] - zipped["zipped"] == left, (why, unmerged)
    else:
        assert zipped["zipped"] == zipped["of"], unmerged


# small classifiers with the structures that broke merges before (a twin merge takes 10-30 s each here): channel
# Concat (SqueezeNet), channel shuffle and Split (ShuffleNetV2), depthwise convolutions, squeeze-and-excitation
# and hardswish (MobileNetV3); ONNXZIP_TEST_HEAVY=1: every model of up to HEAVY_TWIN_PARAMS parameters
TWINS = sorted(n for n, e in MODELS.items() if e["params"] <= HEAVY_TWIN_PARAMS) if HEAVY else \
    ["mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1"]


@pytest.mark.parametrize("name", TWINS)
def test_twins_merge_back_into_the_model(name):
    model = filled(name)
    size = MODELS[name]["size"]
    x = np.random.default_rng(0).standard_normal((40, 3, size, size)).astype(np.float32)
    want = F.run(model, x[:16])["logits"]
    res = onnxzip.merge(model, model, x)
    merges = sum(s["within_model_merges"][0] for s in res.card["spaces"])
    got = F.run(res.model, x[:16])
    error = max(np.linalg.norm(v - want) / np.linalg.norm(want) for v in got.values())
    if error > TWIN_RTOL and merges:  # beta: each model may merge features with its own (lossy by design)
        res = onnxzip.merge(model, model, x, beta=0.0)
        got = F.run(res.model, x[:16])
        error = max(np.linalg.norm(v - want) / np.linalg.norm(want) for v in got.values())
    assert error <= TWIN_RTOL, (error, merges)
    assert not res.card["unmerged"] and not res.card["zipped_nothing"]
