"""Inference runtimes behind one interface: onnxruntime (the default) and OpenVINO (`--runtime openvino`).

Both are imported only when a model is run, through `import_onnxruntime` / `import_openvino`, so that
`onnxzip --version`, `--help` and `inspect` work without them, and a missing or broken install is one
`InstallError` naming the package and what to do, not a traceback. onnxruntime sessions are built by
`onnxzip.calibration.make_session` (the one place they are configured); an OpenVINO model is wrapped in
`OpenVINOSession`, which answers `run(output_names, feed)` as an onnxruntime session does.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile

import numpy as np
import onnx

from .errors import InstallError, ModelError, UsageError

RUNTIMES = ("onnxruntime", "openvino")
# OpenVINO's CPU plugin computes in bfloat16 where the CPU supports it unless told otherwise; f32 keeps the model's
# own precision (an fp16 model's weights stay fp16 either way).
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}

_ORT_FIX = ("pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu "
            "(never both packages at once: they share the 'onnxruntime' import folder)")


def import_onnxruntime():
    """The `onnxruntime` module, or `InstallError` if it is missing or broken (e.g. plain `onnxruntime` installed
    over `onnxruntime-gpu`, which leaves a package without its InferenceSession)."""
    try:
        import onnxruntime as ort

        ort.InferenceSession  # noqa: B018 - a half-overwritten install imports but lacks this
        ort.GraphOptimizationLevel  # noqa: B018
    except Exception as exc:  # ImportError, OSError from a missing shared library, AttributeError, ...
        raise InstallError(f"onnxruntime cannot be used: {_first_line(exc)}; reinstall it: {_ORT_FIX}") from exc
    return ort


def import_openvino():
    """The `openvino` module, or `InstallError` saying how to get it."""
    try:
        import openvino as ov

        ov.Core  # noqa: B018
    except Exception as exc:
        raise InstallError(f"openvino cannot be used: {_first_line(exc)}; install it with "
                           "pip install openvino (or pip install 'onnxzip[test]')") from exc
    return ov


@functools.lru_cache(maxsize=None)
def onnxruntime_errors() -> tuple:
    """onnxruntime's own error types (not subclasses of anything more specific): a model that onnxruntime refuses to
    run on the data is reported as such, not as an internal error. Empty if onnxruntime cannot be imported."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state
    except Exception:  # noqa: BLE001 - a broken install is reported where a session is made
        return ()
    return tuple(c for c in vars(state).values() if isinstance(c, type) and issubclass(c, Exception))


class OpenVINOSession:
    """An ONNX model compiled by OpenVINO for its CPU plugin, run like an onnxruntime session.

    OpenVINO reads ONNX from a file (the external-data layout included), so the model is written to a temporary
    folder, read and compiled, and the folder removed.
    """

    def __init__(self, model: onnx.ModelProto, config: dict | None = None, device: str = "CPU"):
        ov = import_openvino()
        from .onnx_io import save_model_atomic

        self.config = dict(OPENVINO_CONFIG if config is None else config)
        tmpdir = tempfile.mkdtemp(prefix=".onnxzip-openvino.")
        try:
            path = os.path.join(tmpdir, "model.onnx")
            save_model_atomic(model, path)
            core = ov.Core()
            try:
                self.compiled = core.compile_model(core.read_model(path), device, self.config)
            except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError and its own types
                raise ModelError(f"OpenVINO cannot load the model: {_first_line(exc)}") from exc
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        self.request = self.compiled.create_infer_request()
        self.output_names = [o.name for o in model.graph.output]
        self._outputs = {o.name: self.compiled.output(o.name) for o in model.graph.output}

    def run(self, output_names, feed: dict) -> list:
        names = list(output_names) if output_names else self.output_names
        for name in names:
            if name not in self._outputs:
                raise UsageError(f"the model has no output {name!r} (outputs: {', '.join(self._outputs)})")
        try:
            result = self.request.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"OpenVINO cannot run the model: {_first_line(exc)}") from exc
        return [np.array(result[self._outputs[n]]) for n in names]


def make_runner(model: onnx.ModelProto, runtime: str = "onnxruntime", device: str = "cpu",
                optimization: str = "basic", spin: bool = True):
    """A session with `run(output_names, feed)`: onnxruntime on `device` with graph `optimization` (and thread
    spinning unless `spin` is False, see `make_session`), or OpenVINO's CPU plugin in float32 precision (`device`
    must then be 'cpu' or 'auto')."""
    if runtime == "onnxruntime":
        from .calibration import make_session

        return make_session(model, device, optimization, spin)
    if runtime == "openvino":
        if device == "cuda":
            raise UsageError("--runtime openvino runs on the CPU here; use --device cpu")
        return OpenVINOSession(model)
    raise UsageError(f"runtime {runtime!r} is unknown; choose one of {', '.join(RUNTIMES)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
