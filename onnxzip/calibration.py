"""Calibration: read calibration inputs, run models in onnxruntime, stream features into statistics.

Three parts, used in this order by the merge:

1. **Calibration data.** `load_calibration` reads a ``.npy`` (one input) or ``.npz`` (arrays keyed by input name)
   file and checks it against the model's inputs *before* anything runs. ``.npy`` files are memory-mapped, so a
   large file is never read whole; batches are read, converted and copied one at a time.
2. **Sessions.** `expose_tensors` makes intermediate tensors graph outputs (onnxruntime returns only declared
   outputs); `make_session` builds an `onnxruntime.InferenceSession` on CPU or CUDA.
3. **Streaming statistics.** `collect_stats` runs every batch through every model and feeds the features of each
   `FeatureRequest` into a `FeatureStats` (running float64 sums): memory does not grow with the number of samples.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import onnx
from onnxzip.errors import (CalibrationDataError, MismatchError, ModelError, OnnxzipError, UsageError,
                            VerificationError)
from onnxzip.onnx_io import has_mapped_weights, inference_session, without_weights
from onnxzip.runtime import import_onnxruntime

if TYPE_CHECKING:  # annotations only: onnxruntime is imported when a session is made
    import onnxruntime as ort
from onnxzip.stats import FeatureStats

log = logging.getLogger(__name__)

# Data kinds a float model input accepts with a conversion notice. uint8 is converted by value (0..255), not scaled.
_CONVERTIBLE_TO_FLOAT = {"f", "i", "u"}
# Read memory-mapped data in chunks of about this many bytes when checking it (finiteness), so that a file larger
# than memory is never loaded at once.
_CHUNK_BYTES = 64 << 20

# onnxruntime's GraphOptimizationLevel names (onnxruntime is imported only when a session is made)
_OPTIMIZATION_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
# onnxruntime's optimisation level for the merge's own passes (`pass_session`): the source models' calibration pass
# and the refit's passes of the merged model.
PASS_OPTIMIZATION = "all"


# --------------------------------------------------------------------------------------------------------------
# 1. Calibration data
# --------------------------------------------------------------------------------------------------------------


@dataclass
class InputSpec:
    """One graph input: its name, shape (ints for fixed dims, str or None for symbolic ones; None if the rank is
    unknown) and numpy dtype."""

    name: str
    shape: tuple | None
    dtype: np.dtype


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are real inputs (not initializers, which old exporters also list as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            raise ModelError(
                f"model input {value.name!r} is not a tensor ({value.type.WhichOneof('value')}); "
                "onnxzip can only feed tensor inputs"
            )
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(
                f"model input {value.name!r} has element type {tensor_type.elem_type} that numpy cannot hold"
            ) from exc
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(
                dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in tensor_type.shape.dim
            )
        specs.append(InputSpec(value.name, shape, dtype))
    return specs


class CalibrationData:
    """Validated calibration inputs: ``arrays`` maps each model input name to an array (a read-only memmap for
    ``.npy`` files) whose first axis holds the samples. The arrays keep the file's dtype; `batches` converts to the
    model's dtype one batch at a time."""

    def __init__(
        self,
        path: str,
        arrays: dict[str, np.ndarray],
        specs: list[InputSpec],
        logger: logging.Logger | None = None,
    ):
        self.path = str(path)
        self.arrays = dict(arrays)
        self.specs = list(specs)
        self._logger = logger or log
        self.num_samples = int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 0

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}: {tuple(a.shape)} {a.dtype}" for name, a in self.arrays.items())
        return f"CalibrationData({self.path!r}, num_samples={self.num_samples}, {shapes})"

    def __len__(self) -> int:
        return self.num_samples

    def _fixed_batch(self) -> int | None:
        """A batch dimension fixed in the model (e.g. exported with batch 1) forces the batch size."""
        fixed = {s.shape[0] for s in self.specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
        return min(fixed) if fixed else None

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{input name: contiguous array of the model's dtype}`` for samples ``start:stop`` in order.

        If the model fixes its batch dimension to k, batches have exactly k samples (a last partial batch is
        skipped with a notice)."""
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        stop = self.num_samples if stop is None else min(stop, self.num_samples)
        fixed = self._fixed_batch()
        if fixed is not None:
            if fixed != batch_size:
                self._logger.debug("model fixes its batch dimension to %d: using batches of %d", fixed, fixed)
            batch_size = fixed
        dtypes = {s.name: s.dtype for s in self.specs}
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            if fixed is not None and hi - lo != fixed:
                self._logger.warning(
                    "%s: the model's batch dimension is fixed to %d; the last %d sample(s) do not fill a batch "
                    "and are skipped",
                    self.path,
                    fixed,
                    hi - lo,
                )
                return
            yield {
                name: np.ascontiguousarray(array[lo:hi], dtype=dtypes.get(name, array.dtype))
                for name, array in self.arrays.items()
            }

    def subset(self, num_samples: int, seed: int) -> CalibrationData:
        """`num_samples` samples drawn at random by `seed`, kept in file order (all of them when there are no more).
        The same seed picks the same samples: `merge` calibrates on this subset and `deploy` finds the samples it
        held back again from the card's source, count and seed."""
        if num_samples >= self.num_samples:
            return self
        chosen = np.sort(np.random.default_rng(seed).choice(self.num_samples, num_samples, replace=False))
        return CalibrationData(self.path, {k: np.asarray(v[chosen]) for k, v in self.arrays.items()}, self.specs,
                               self._logger)

    def split(self, holdout: int) -> tuple[CalibrationData, CalibrationData]:
        """Split into (calibration part, held-out part): the last `holdout` samples are held back (for example for
        verification). ``holdout == 0`` gives an empty second part."""
        if holdout < 0:
            raise UsageError(f"holdout must be 0 or more, got {holdout}")
        if holdout >= self.num_samples and self.num_samples > 0:
            raise CalibrationDataError(
                f"{self.path}: holding back {holdout} sample(s) leaves none for calibration "
                f"(the data has {self.num_samples}); give more samples or hold back fewer"
            )
        cut = self.num_samples - holdout
        first = CalibrationData(self.path, {n: a[:cut] for n, a in self.arrays.items()}, self.specs, self._logger)
        second = CalibrationData(self.path, {n: a[cut:] for n, a in self.arrays.items()}, self.specs, self._logger)
        return first, second


def _read_file(path: str) -> dict[str, np.ndarray] | np.ndarray:
    """The .npy array (memory-mapped) or the .npz arrays by key. The format is recognised by its magic bytes."""
    if not os.path.exists(path):
        raise CalibrationDataError(f"calibration file {path} does not exist; give a .npy or .npz file")
    if os.path.isdir(path):
        raise CalibrationDataError(f"calibration file {path} is a directory; give a .npy or .npz file")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise CalibrationDataError(f"calibration file {path} cannot be read: {exc}") from exc
    try:
        if magic == b"\x93NUMPY":
            # mmap: a large file is read a batch at a time, never whole.
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if magic[:4] == b"PK\x03\x04" or magic[:4] == b"PK\x05\x06":
            # .npz members cannot be memory-mapped (they may be compressed); each is read once here.
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
    except ValueError as exc:
        if "object" in str(exc).lower() or "pickle" in str(exc).lower():
            raise CalibrationDataError(
                f"calibration file {path} holds Python objects (dtype object), which onnxzip does not load; "
                "save numeric arrays (e.g. float32)"
            ) from exc
        raise CalibrationDataError(f"calibration file {path} is not a valid .npy/.npz file: {exc}") from exc
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CalibrationDataError(f"calibration file {path} cannot be read as .npy/.npz: {exc}") from exc
    raise CalibrationDataError(
        f"calibration file {path} is not a .npy or .npz file (numpy's np.save / np.savez formats); "
        "save the inputs with numpy"
    )


def _match_inputs(path: str, content, specs: list[InputSpec], logger: logging.Logger) -> dict[str, np.ndarray]:
    """Assign the file's arrays to the model's inputs."""
    names = [s.name for s in specs]
    if not specs:
        raise CalibrationDataError(f"{path}: the model has no inputs to feed")
    if isinstance(content, np.ndarray):
        if len(specs) != 1:
            raise CalibrationDataError(
                f"{path}: a .npy file holds one array but the model has {len(specs)} inputs ({', '.join(names)}); "
                "give an .npz file with one array per input name (np.savez(path, **{name: array}))"
            )
        return {specs[0].name: content}
    if not content:
        raise CalibrationDataError(f"{path}: the .npz file holds no arrays; expected input(s) {', '.join(names)}")
    if len(specs) == 1 and len(content) == 1 and names[0] not in content:
        (key,) = content
        logger.warning("%s: using the only array %r for the model's only input %r", path, key, names[0])
        return {names[0]: content[key]}
    missing = [n for n in names if n not in content]
    if missing:
        raise CalibrationDataError(
            f"{path}: no array for model input(s) {', '.join(map(repr, missing))}; the file has "
            f"{', '.join(map(repr, content))}; save one array per model input name ({', '.join(names)})"
        )
    extra = [k for k in content if k not in names]
    if extra:
        logger.warning("%s: ignoring array(s) %s that are not model inputs", path, ", ".join(map(repr, extra)))
    return {n: content[n] for n in names}


def _check_dtype(path: str, spec: InputSpec, array: np.ndarray, logger: logging.Logger) -> None:
    """Refuse dtypes that make no sense as the model input; give a notice where values are converted."""
    have, want = array.dtype, spec.dtype
    where = f"{path}: input {spec.name!r}"
    if have.kind in "bcOSUVMm":
        raise CalibrationDataError(
            f"{where} has dtype {have}, which cannot be fed to a {want} model input; save {want} data"
        )
    if have == want:
        return
    if want.kind == "f" and have.kind in _CONVERTIBLE_TO_FLOAT:
        note = ""
        if have == np.uint8:
            note = " by value (0..255, not scaled to 0..1: normalise the data yourself if the model expects that)"
        logger.warning("%s has dtype %s; converting to %s%s", where, have, want, note)
        return
    if want.kind in "iu" and have.kind in "iu":
        logger.warning("%s has dtype %s; converting to %s", where, have, want)
        return
    raise CalibrationDataError(f"{where} has dtype {have}, but the model input is {want}; save {want} data")


def _check_shape(path: str, spec: InputSpec, array: np.ndarray) -> None:
    where = f"{path}: input {spec.name!r}"
    if array.ndim == 0 or array.shape[0] == 0:
        raise CalibrationDataError(f"{where} is empty (0 samples, shape {tuple(array.shape)}); expected at least one")
    if spec.shape is None:
        return
    expected = "(" + ", ".join("?" if d is None else str(d) for d in spec.shape) + ")"
    if array.ndim != len(spec.shape):
        raise CalibrationDataError(
            f"{where} has rank {array.ndim} (shape {tuple(array.shape)}), but the model input has rank "
            f"{len(spec.shape)} {expected}; the first axis holds the samples"
        )
    for axis in range(1, array.ndim):
        want, have = spec.shape[axis], array.shape[axis]
        fixed = isinstance(want, int) and want > 0
        if (fixed and have != want) or have < 1:
            raise CalibrationDataError(
                f"{where} has shape {tuple(array.shape)}, but the model input is {expected}: "
                f"dimension {axis} is {have}, expected {want if fixed else 'at least 1'}"
            )


def _check_finite(path: str, spec: InputSpec, array: np.ndarray) -> None:
    """Count non-finite values after conversion to the model's dtype (float64 values beyond float32's range become
    inf), reading the array in chunks."""
    if spec.dtype.kind not in "fc":
        return
    row_bytes = max(1, array[:1].nbytes)
    step = max(1, _CHUNK_BYTES // row_bytes)
    count, first = 0, None
    for lo in range(0, array.shape[0], step):
        with np.errstate(over="ignore", invalid="ignore"):  # the overflow to inf is what is being counted
            chunk = np.asarray(array[lo : lo + step], dtype=spec.dtype)
        bad = ~np.isfinite(chunk.reshape(chunk.shape[0], -1))
        n = int(bad.sum())
        if n:
            if first is None:
                first = lo + int(np.flatnonzero(bad.any(axis=1))[0])
            count += n
    if count:
        raise CalibrationDataError(
            f"{path}: input {spec.name!r} holds {count} non-finite value(s) (NaN or inf as {spec.dtype}), the first "
            f"in sample {first}; calibration data must be finite: clean or drop those samples"
        )


def load_calibration(
    path,
    specs: list[InputSpec],
    num_samples: int | None = None,
    logger: logging.Logger | None = None,
) -> CalibrationData:
    """Read and validate calibration inputs for a model with inputs `specs` (see `input_specs`).

    ``.npy``: one array (samples on axis 0) for a model with one input, memory-mapped. ``.npz``: one array per
    input name. Every problem is a `CalibrationDataError` raised here, before any model runs. `num_samples` keeps
    the first that many samples (all, with a notice, if fewer are available).
    """
    path = os.fspath(path)
    return calibration_from_arrays(_read_file(path), specs, num_samples, logger, source=path)


def calibration_from_arrays(
    content,
    specs: list[InputSpec],
    num_samples: int | None = None,
    logger: logging.Logger | None = None,
    source: str = "calibration arrays",
) -> CalibrationData:
    """Validate in-memory calibration inputs (one array, or a dict input name -> array) like `load_calibration`."""
    logger = logger or log
    path = source
    if num_samples is not None and num_samples < 1:
        raise UsageError(f"number of calibration samples must be at least 1, got {num_samples}")
    if not isinstance(content, (np.ndarray, dict)):
        raise CalibrationDataError(f"{source}: expected a numpy array or a dict of arrays, got {type(content).__name__}")
    arrays = _match_inputs(path, content, specs, logger)
    by_name = {s.name: s for s in specs}
    for name, array in arrays.items():
        _check_dtype(path, by_name[name], array, logger)
        _check_shape(path, by_name[name], array)
    counts = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{name!r}: {n}" for name, n in counts.items())
        raise CalibrationDataError(
            f"{path}: inputs have different numbers of samples ({listing}); every input needs one entry per sample"
        )
    available = next(iter(counts.values()))
    if num_samples is not None:
        if num_samples > available:
            logger.warning(
                "%s: %d calibration samples asked for, but the file has %d; using all %d",
                path,
                num_samples,
                available,
                available,
            )
        else:
            arrays = {name: a[:num_samples] for name, a in arrays.items()}
    for name, array in arrays.items():
        _check_finite(path, by_name[name], array)
    return CalibrationData(path, arrays, specs, logger)


# --------------------------------------------------------------------------------------------------------------
# 2. Sessions
# --------------------------------------------------------------------------------------------------------------


def expose_tensors(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs also include the tensors `names` (onnxruntime returns only declared
    graph outputs). Names that are already outputs are left as they are; graph inputs may be exposed too."""
    graph = model.graph
    produced = {out for node in graph.node for out in node.output if out}
    inputs = {v.name for v in graph.input}
    initializers = {init.name for init in graph.initializer}
    outputs = {v.name for v in graph.output}
    for name in names:
        if name not in produced and name not in inputs and name not in outputs:
            what = " (it is a constant initializer, not a computed tensor)" if name in initializers else ""
            raise ModelError(
                f"tensor {name!r} does not exist in graph {graph.name!r}{what}; "
                "it is not produced by any node nor a graph input"
            )
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    wanted = [n for n in dict.fromkeys(names) if n not in outputs]
    if not wanted:
        return exposed
    types = {v.name: v for v in graph.input}
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model)[0])
        types.update({v.name: v for v in inferred.graph.value_info})
        types.update({v.name: v for v in inferred.graph.input})
    except Exception as exc:  # shape inference fails on some custom ops; onnxruntime still infers types itself
        log.debug("shape inference failed (%s); exposing tensors without declared types", exc)
    for name in wanted:
        value = types.get(name)
        elem_type = value.type.tensor_type.elem_type if value is not None and value.type.HasField("tensor_type") else 0
        if elem_type:
            # Only the element type is declared: shapes (especially the batch size) may differ at run time.
            exposed.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
        else:
            exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return exposed


def _session_options(optimization: str, log_severity: int, spin: bool = True) -> ort.SessionOptions:
    if optimization not in _OPTIMIZATION_LEVELS:
        raise UsageError(
            f"optimization level {optimization!r} is unknown; choose one of {', '.join(_OPTIMIZATION_LEVELS)}"
        )
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPTIMIZATION_LEVELS[optimization])
    if not spin:  # idle worker threads sleep at once instead of spinning (see make_session)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = log_severity
    return options


def make_session(model: onnx.ModelProto, device: str = "auto", optimization: str = "basic",
                 spin: bool = True) -> ort.InferenceSession:
    """An onnxruntime session for `model` on `device` ('cpu', 'cuda' or 'auto': CUDA if it comes up, else CPU).

    `optimization` is onnxruntime's graph optimization level: 'disable', 'basic', 'extended' or 'all'. The default
    'basic' only folds constants and removes redundant nodes; 'extended'/'all' fuse operators (e.g. Conv+Add+Relu,
    GELU, attention) into kernels with a different order of floating-point operations, which changes activations
    at the rounding level (the merge's own passes choose their level in `pass_session`). `spin=False` stops
    onnxruntime's worker threads from spinning after a run: where two sessions take turns (timing two models one
    after the other), the spinning threads of one would otherwise hold the cores the other needs.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device {device!r} is unknown; choose 'auto', 'cpu' or 'cuda'")
    ort = import_onnxruntime()
    # Keep onnxruntime to errors only: its warnings (e.g. nodes placed on CPU) are noise for onnxzip users.
    ort.set_default_logger_severity(3)
    cpu = ["CPUExecutionProvider"]
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def create(providers: list[str], severity: int) -> ort.InferenceSession:
        try:
            return inference_session(model, _session_options(optimization, severity, spin), providers)
        except UsageError:
            raise
        except Exception as exc:
            raise ModelError(f"onnxruntime cannot load the model: {exc}") from exc

    if device == "cpu":
        return create(cpu, 3)
    if device == "cuda":
        # get_available_providers() lists CUDA whenever the package was built with it, GPU or not; only the
        # providers of a created session prove that CUDA came up. onnxruntime's own error (e.g. a missing
        # libcublas) stays visible here: it says what to install.
        try:
            session = create(cuda, 3)
        except ModelError as exc:
            raise UsageError(f"--device cuda: no usable CUDA: onnxruntime failed to create a CUDA session ({exc})")
        if session.get_providers()[0] != "CUDAExecutionProvider":
            raise UsageError(
                "--device cuda: no usable CUDA (onnxruntime fell back to CPU; see its message above for the missing "
                "library or driver); install a CUDA build of onnxruntime with matching CUDA/cuDNN, or use --device cpu"
            )
        return session
    # auto
    if "CUDAExecutionProvider" in ort.get_available_providers():
        # A failed CUDA load is logged by onnxruntime at ERROR level in red; in 'auto' mode the fallback is expected,
        # so silence everything below FATAL while trying.
        ort.set_default_logger_severity(4)
        try:
            session = create(cuda, 4)
            if session.get_providers()[0] == "CUDAExecutionProvider":
                log.debug("onnxruntime session on CUDA")
                return session
            log.debug("CUDA listed by onnxruntime but did not come up; using CPU")
        except ModelError as exc:
            log.debug("CUDA session failed (%s); using CPU", exc)
        finally:
            ort.set_default_logger_severity(3)
    return create(cpu, 3)


def provider_name(session: ort.InferenceSession) -> str:
    """'cuda' if the session runs on CUDA, else 'cpu'."""
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"


# --------------------------------------------------------------------------------------------------------------
# 3. Streaming statistics
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureRequest:
    """Features to collect into ``stats[key]``: ``tensors[m]`` is the tensor name in model m, its channels on
    `axis`. `expand` > 1: the channel axis was flattened channel-major from C x positions (size C*expand); it is
    read as (C, expand) and the positions count as samples. ``full=False`` collects per-channel moments only.
    ``defer``: the feature blocks go to the pass's temporary file instead, as the statistics would take them
    (`SourceRun.deferred`); `deferred_stats` makes the statistics from them later, the same sums in the same order.
    """

    key: str
    tensors: list[str]
    axis: int
    expand: int = 1
    full: bool = True
    number: int | None = None  # seeds its rows' subsample (default: its position in the list run_sources gets)
    defer: bool = False


@dataclass
class RowRequest:
    """Rows of one tensor of every model to keep whole (the least-squares refit's targets): ``tensors[m]`` in model
    m, channels on `axis`; each row (a sample, or a sample at one position) is kept as `select_rows(key, ...)`
    draws it with probability `fraction`."""

    key: int
    tensors: list[str]
    axis: int
    fraction: float
    spill: bool = False  # kept in a temporary file (`RowSpill`) instead of in memory
    nbytes: int = 0  # the rows' size as estimated from graph analysis's shapes (`refit.target_row_requests`)


class RowSpill:
    """Rows kept in an unnamed temporary file instead of in memory, and read back through a memory map: the kernel
    pages them in when they are read and can drop them again, so they hold none of the process's own memory. The
    file has no name (it is gone when the process ends, however it ends); its space is freed when the last array
    read from it is. `directory`: where the file goes (default: Python's temporary directory, $TMPDIR)."""

    def __init__(self, directory: str | None = None):
        self.directory = directory
        self.nbytes = 0
        self._file = None

    def write(self, array: np.ndarray) -> tuple:
        """Append `array` (as float32); returns its place in the file, for `reader`."""
        a = np.ascontiguousarray(array, dtype=np.float32)
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self.directory, prefix="onnxzip-rows-")
            self._file.write(a.tobytes() if a.size == 0 else memoryview(a).cast("B"))
        except OSError as exc:
            where = self.directory or tempfile.gettempdir()
            self.close()
            raise OnnxzipError(f"cannot keep the calibration pass's rows (the refit's targets, features for later "
                               f"statistics) in a temporary file in {where} ({exc}); free "
                               "space there, or point TMPDIR at a disk with room") from exc
        place = (self.nbytes, a.shape)
        self.nbytes += a.nbytes
        return place

    def reader(self) -> Callable[[tuple], np.ndarray]:
        """Stop writing; returns place -> the array written there (read-only, mapped from the file)."""
        if self._file is None or not self.nbytes:
            self.close()
            return lambda place: np.zeros(place[1], dtype=np.float32)
        self._file.flush()
        mapped = np.memmap(self._file, dtype=np.uint8, mode="r", shape=(self.nbytes,))
        self.close()  # the map holds the file open
        return lambda place: np.ndarray(place[1], dtype=np.float32, buffer=mapped, offset=place[0])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def select_rows(key: int, held: bool, lo: int, count: int, fraction: float, seed: int) -> np.ndarray:
    """The rows of one batch (`count` rows, the first sample's index `lo`) kept at `fraction`, seeded by (`seed`,
    `key`, `held`, `lo`) alone: every pass over the same samples draws the same rows, and the rows drawn at a smaller
    fraction are a subset of those drawn at a larger one (a row is kept when its uniform draw is below the
    fraction), so rows kept once at the largest fraction any later use needs serve every use."""
    if fraction >= 1.0:
        return np.arange(count)
    rng = np.random.default_rng([seed, key, int(held), lo])
    return np.flatnonzero(rng.random(count) < fraction)


def subset_of_rows(key: int, held: bool, lo: int, count: int, kept: float, wanted: float, seed: int):
    """Where the rows `select_rows` draws at fraction `wanted` sit among those it draws at `kept` >= `wanted` (an
    index array, or a slice of all of them when the two are the same rows: no draws needed)."""
    if wanted >= kept:
        return slice(None)
    u = np.random.default_rng([seed, key, int(held), lo]).random(count)
    return np.flatnonzero((u[u < kept] if kept < 1.0 else u) < wanted)


def as_rows(value: np.ndarray, axis: int, rows: np.ndarray | None = None) -> np.ndarray:
    """(rows, channels) of a tensor: every index of every axis but `axis` is a row, in C order; `rows` picks some
    (gathered directly, without a copy of the whole tensor)."""
    moved = np.moveaxis(value, axis, -1)
    if rows is None:
        return moved.reshape(-1, value.shape[axis])
    return moved[np.unravel_index(rows, moved.shape[:-1])] if moved.ndim > 1 else moved[rows]


def _channel_columns(value: np.ndarray, axis: int, rows: np.ndarray | None, out: np.ndarray) -> None:
    """Write ``as_rows(value, axis, rows)`` transposed, (channels, rows), into `out` (C-ordered)."""
    channels = value.shape[axis]
    before, after = int(np.prod(value.shape[:axis])), int(np.prod(value.shape[axis + 1:]))
    by_channel = value.reshape(before, channels, after).transpose(1, 0, 2)
    if rows is None:
        out.reshape(channels, before, after)[...] = by_channel
    else:
        i, j = np.divmod(rows, after)
        out[...] = by_channel[:, i, j]


def _channel_view(x: np.ndarray, request: FeatureRequest, model_index: int) -> tuple:
    """(x with a flattened channel axis unfolded to (C, expand), the channel axis) for one request."""
    tensor = request.tensors[model_index]
    if x.ndim == 0 or not -x.ndim <= request.axis < x.ndim:
        raise MismatchError(
            f"model {model_index}: tensor {tensor!r} has shape {x.shape}; it has no channel axis {request.axis}"
        )
    axis = request.axis % x.ndim
    if request.expand > 1:
        size = x.shape[axis]
        if size % request.expand:
            raise MismatchError(
                f"model {model_index}: tensor {tensor!r} axis {axis} has size {size}, which is not a multiple of the "
                f"flatten factor {request.expand}"
            )
        # channel-major flatten: index = c * expand + position
        x = x.reshape(x.shape[:axis] + (size // request.expand, request.expand) + x.shape[axis + 1 :])
    return x, axis


@dataclass(frozen=True)
class StatsSampling:
    """Statistics from a seeded subsample of rows where a feature space has far more rows (samples x positions)
    than it needs: each of a space's merge points (a tensor read for it) keeps about max(`min_rows`,
    `rows_per_feature` x the stacked width) rows over the calibration samples, drawn afresh in every batch
    (`select_rows`, seeded by `seed`); a space read at k tensors keeps up to k times as many."""

    min_rows: int = 100_000
    rows_per_feature: int = 1000
    seed: int = 0

    def fraction(self, width: int, total_rows: int) -> float:
        return min(1.0, max(self.min_rows, self.rows_per_feature * width) / max(total_rows, 1))


def _progress_reporter(progress, total: int, desc: str):
    """(update(n), close()) for a click progress bar on stderr, a callable progress(done, total), or nothing."""
    if progress is True and sys.stderr.isatty():
        # Not a terminal (a log file, CI): click would print the bare label once and nothing after it; the
        # logged "calibrating on N samples" line says the same.
        import click

        bar = click.progressbar(length=total, label=desc, file=sys.stderr)
        bar.__enter__()
        return bar.update, lambda: bar.__exit__(None, None, None)
    if callable(progress):
        done = [0]

        def update(n: int) -> None:
            done[0] += n
            progress(done[0], total)

        return update, lambda: None
    return (lambda n: None), (lambda: None)


def _check_requests(models: list[onnx.ModelProto], requests: list[FeatureRequest]) -> None:
    for request in requests:
        if len(request.tensors) != len(models):
            raise UsageError(
                f"feature request {request.key!r} names {len(request.tensors)} tensor(s) for {len(models)} model(s)"
            )
        if request.expand < 1:
            raise UsageError(f"feature request {request.key!r} has flatten factor {request.expand}; must be >= 1")


def collect_stats(
    models: list[onnx.ModelProto],
    requests: list[FeatureRequest],
    data: CalibrationData,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool | Callable[[int, int], None] = False,
    desc: str = "calibrating",
    sampling: StatsSampling | None = None,
) -> dict[str, FeatureStats]:
    """Run `data` through every model and accumulate, for each request key, the features of models 0..N-1 side by
    side (a (samples, N*C) block per batch) into a `FeatureStats`. Requests sharing a key accumulate into the same
    statistics. Memory does not depend on the number of samples. `sampling`: every row, or a seeded subsample.

    `progress`: True for a progress bar on stderr, a callable ``progress(samples_done, total)``, or False.
    """
    return run_sources(models, requests, data, batch_size, device, progress, desc, sampling=sampling).stats


@dataclass
class SourceRun:
    """What one pass of the source models over the calibration samples gives: the feature statistics (calibration
    part), the rows kept for the refit's targets (calibration and held-back parts) and the models' outputs on the
    held-back part (the references verification compares the merged heads with)."""

    stats: dict  # FeatureRequest key -> FeatureStats
    # RowRequest key -> {False: calibration, True: held back} -> per batch (first sample, rows drawn from,
    # [per model: the rows kept])
    rows: dict
    fractions: dict  # RowRequest key -> the fraction of rows kept
    outputs: list | None  # per model, {graph output name: array over the held-back samples}
    seed: int = 0
    # FeatureRequest key (deferred) -> (width, full, per batch and request: the block, mapped from the file)
    deferred: dict = field(default_factory=dict)


def deferred_stats(run: SourceRun, keys) -> dict:
    """The statistics of deferred requests' `keys` (FeatureRequest `defer`): each block read back from the file
    and added in the order the pass took them, as a pass with the request not deferred would have (the same
    float64 sums)."""
    stats = {}
    for key in keys:
        width, full, blocks = run.deferred[key]
        stats[key] = FeatureStats(width, full=full)
        for block in blocks:
            stats[key].update(block.astype(np.float64, order="K"), overwrite=True)
    return stats


def pass_session(model: onnx.ModelProto, device: str) -> ort.InferenceSession:
    """A session for one of the merge's own passes over the samples: at PASS_OPTIMIZATION, threads not spinning
    (numpy works on each batch between runs, on the cores spinning threads would hold).

    'all' lets onnxruntime run convolutions in its blocked channel layout (NCHWc) and fuse a Conv with its Add and
    activation: the same functions, in another order of float32 operations (rounding-level differences, as between
    two runtimes), in up to half the time of 'basic' on small convolutional models (the bundled ResNet-20 pair: a
    whole merge 20.5 s -> 17.4 s, calibration 5.6 -> 4.6 s and refit 14.3 -> 12.2 s, with held-back errors the same
    to six digits; on ResNet-50 at 224×224 a pass is only 10-15 % faster). A model whose weights are mapped from a
    file (a large one) runs at 'basic': the layout transformation writes a reordered copy of every convolution
    weight (a ResNet-50 session grows by 106-120 MB), a second copy of the model that the memory bound of large
    merges has no room for."""
    level = "basic" if PASS_OPTIMIZATION == "all" and has_mapped_weights(model) else PASS_OPTIMIZATION
    return make_session(model, device, level, spin=False)


def run_sources(
    models: list[onnx.ModelProto],
    requests: list[FeatureRequest],
    data: CalibrationData,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool | Callable[[int, int], None] = False,
    desc: str = "calibrating",
    *,
    rows: list | tuple = (),
    held: CalibrationData | None = None,
    outputs: bool = False,
    seed: int = 0,
    sampling: StatsSampling | None = None,
    first: tuple = (0, 0),
    fit_total: int | None = None,
) -> SourceRun:
    """One onnxruntime pass of every model over `data` and then `held`: statistics for `requests` (on `data`),
    the rows `rows` ask for (`RowRequest`, on both, as float32; in a temporary file where they ask to spill) and,
    with `outputs`, every model's graph outputs on `held`. Each model runs once per sample, whatever is asked of
    it.

    A shard of a larger pass (distributed.py): `first` numbers the first sample of `data` and of `held` as in the
    whole pass, and `fit_total` is the whole pass's number of calibration samples (rows are drawn by those)."""
    _check_requests(models, requests)
    for request in rows:
        if len(request.tensors) != len(models):
            raise UsageError(f"row request {request.key!r} names {len(request.tensors)} tensor(s) for "
                             f"{len(models)} model(s)")
    full_by_key: dict[str, bool] = {}
    for request in requests:
        full_by_key[request.key] = full_by_key.get(request.key, False) or request.full
    parts = [(False, data)] + ([(True, held)] if held is not None and held.num_samples else [])
    sessions, fetches = [], []
    for m, model in enumerate(models):
        row_names = [request.tensors[m] for request in rows]
        fit = list(dict.fromkeys([request.tensors[m] for request in requests] + row_names))
        late = list(dict.fromkeys(row_names + ([o.name for o in model.graph.output] if outputs else [])))
        names = list(dict.fromkeys(fit + late))
        sessions.append(pass_session(expose_tensors(model, names), device) if names else None)
        fetches.append({False: fit, True: late})
    stats: dict[str, FeatureStats] = {}
    width_of: dict[str, tuple[int, str]] = {}  # key -> (width, the tensor that set it)
    fractions: dict[tuple, float] = {}  # (request index) -> fraction of its rows used for statistics
    kept_rows = {request.key: {False: [], True: []} for request in rows}
    # the rows of requests with `spill` and the features of deferred ones (no file is made without them)
    spill = RowSpill()
    deferred: dict[str, tuple] = {}
    held_outputs = [{} for _ in models] if outputs else None
    fitted = 0
    update, close = _progress_reporter(progress, sum(part.num_samples for _, part in parts), desc)
    try:
        for is_held, part in parts:
            for lo, feed in _numbered(part.batches(batch_size), first[int(is_held)]):
                samples = next(iter(feed.values())).shape[0]
                values = []
                for m, session in enumerate(sessions):
                    names = fetches[m][is_held]
                    got = dict(zip(names, session.run(names, feed))) if names else {}
                    for name, value in got.items():
                        # (a non-tensor output, ZipMap's list of dicts, is only kept as a reference)
                        if isinstance(value, np.ndarray) and value.dtype.kind in "fc" and not np.isfinite(value).all():
                            raise VerificationError(
                                f"model {m}: tensor {name!r} is not finite (NaN or inf) on calibration samples "
                                f"{lo}..{lo + samples - 1} of {part.path}; the model or its inputs are broken"
                            )
                    values.append(got)
                if not is_held:
                    fitted += samples
                    for j, request in enumerate(requests):
                        _add_features(stats, width_of, full_by_key, fractions, j, request, values, lo, samples,
                                      fit_total or part.num_samples, sampling, deferred, spill)
                for request in rows:
                    tensors = [values[m][t] for m, t in enumerate(request.tensors)]
                    count = tensors[0].size // max(tensors[0].shape[request.axis], 1)
                    chosen = select_rows(request.key, is_held, lo, count, request.fraction, seed)
                    kept = [as_rows(t, request.axis, chosen).astype(np.float32, copy=False) for t in tensors]
                    if request.spill:
                        kept = [spill.write(k) for k in kept]
                    kept_rows[request.key][is_held].append((lo, count, kept))
                if is_held and outputs:
                    for m, model in enumerate(models):
                        for o in model.graph.output:
                            held_outputs[m].setdefault(o.name, []).append(values[m][o.name])
                update(samples)
        read = spill.reader()
        for width, full, blocks in deferred.values():
            # a block written as its transpose (a convolution's, `_add_features`) is read back as one
            blocks[:] = [read(place).T if transposed else read(place) for place, transposed in blocks]
        for request in rows:
            if request.spill:
                for entries in kept_rows[request.key].values():
                    entries[:] = [(lo, count, [read(place) for place in kept]) for lo, count, kept in entries]
    finally:
        close()
        spill.close()
    if (requests or rows) and not fitted:
        raise CalibrationDataError(f"{data.path}: no calibration samples to run (0 samples, or none fill a batch)")
    if held_outputs is not None:
        held_outputs = [{k: np.concatenate(v, axis=0) for k, v in out.items()} for out in held_outputs]
    return SourceRun(stats, kept_rows, {request.key: request.fraction for request in rows}, held_outputs, seed,
                     deferred)


def _add_features(stats, width_of, full_by_key, fractions, j, request, values, lo, samples, num_samples,
                  sampling, deferred=None, spill=None) -> None:
    """Feed one request's features of every model, side by side, into its statistics (a seeded subsample of the
    rows under `sampling`), or, for a deferred request, write them to `spill` (float32: the models' own values)."""
    views = [_channel_view(values[m][t], request, m) for m, t in enumerate(request.tensors)]
    if len({v.shape for v, _ in views}) > 1:
        shapes = ", ".join(f"model {m} {t!r} {values[m][t].shape}" for m, t in enumerate(request.tensors))
        raise MismatchError(f"feature space {request.key!r}: the models' tensors do not match ({shapes})")
    x, axis = views[0]
    channels = x.shape[axis]
    count = x.size // max(channels, 1)
    chosen = None
    if sampling is not None:
        if j not in fractions:
            positions = count / max(samples, 1)
            fractions[j] = sampling.fraction(channels * len(views), int(positions * num_samples))
        if fractions[j] < 1.0:
            key = zlib.crc32(f"{request.key}#{j if request.number is None else request.number}".encode())
            chosen = select_rows(key, False, lo, count, fractions[j], sampling.seed)
    # every model's rows side by side, written once into the float64 block the statistics shift in place
    width = channels * len(views)
    rows = count if chosen is None else len(chosen)
    if int(np.prod(x.shape[axis + 1:])) > 1:
        # channels before other axes (a convolution's NCHW): the block is written channel by channel, (width, rows),
        # each channel's values copied in the runs they lie in (a (rows, width) block would take them one by one,
        # 2-5x slower), and handed over as its transpose
        block = np.empty((width, rows))
        for k, (v, ax) in enumerate(views):
            _channel_columns(v, ax, chosen, block[k * channels:(k + 1) * channels])
        block = block.T
    else:
        block = np.empty((rows, width))
        for k, (v, ax) in enumerate(views):
            block[:, k * channels:(k + 1) * channels] = as_rows(v, ax, chosen)
    if request.key not in width_of:
        width_of[request.key] = (width, request.tensors[0])
        if request.defer:
            deferred[request.key] = (width, full_by_key[request.key], [])
        else:
            stats[request.key] = FeatureStats(width, full=full_by_key[request.key])
    elif width_of[request.key][0] != width:
        raise MismatchError(
            f"feature space {request.key!r}: tensor {request.tensors[0]!r} gives {width} features but "
            f"{width_of[request.key][1]!r} in the same space gave {width_of[request.key][0]}"
        )
    if request.defer:
        transposed = not block.flags.c_contiguous  # the transpose of a C block: written as that block
        deferred[request.key][2].append((spill.write(block.T if transposed else block), transposed))
    else:
        stats[request.key].update(block, overwrite=True)


def _numbered(batches: Iterator[dict[str, np.ndarray]], lo: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(index of the first sample, batch) pairs, the first batch's first sample numbered `lo`."""
    for batch in batches:
        yield lo, batch
        lo += next(iter(batch.values())).shape[0]


def run_model(
    model: onnx.ModelProto,
    data: CalibrationData,
    batch_size: int = 64,
    device: str = "auto",
    outputs: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run all of `data` through `model` and concatenate the `outputs` (default: the graph outputs) over batches.
    Everything is kept in memory: meant for verification and evaluation on small samples."""
    names = [v.name for v in model.graph.output] if outputs is None else list(outputs)
    session = make_session(expose_tensors(model, names), device)
    results: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feed in data.batches(batch_size):
        for name, value in zip(names, session.run(names, feed)):
            results[name].append(value)
    return {name: np.concatenate(parts, axis=0) if parts else np.empty((0,)) for name, parts in results.items()}
