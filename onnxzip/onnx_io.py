"""Reading and writing ONNX files: checked loads, atomic saves, file hashes.

Every failure is an `onnxzip.errors` error that names the file and what to do about it:
`ModelError` for what we read, `OutputError` for what we write.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import onnx
from onnx import external_data_helper

from .errors import ModelError, OutputError

_T = onnx.TensorProto
# Element types of weights (parameters): what `without_weights` strips and `evaluate.count_parameters` counts.
FLOAT_TYPES = frozenset({_T.FLOAT, _T.DOUBLE, _T.FLOAT16, _T.BFLOAT16,
                         _T.FLOAT8E4M3FN, _T.FLOAT8E4M3FNUZ, _T.FLOAT8E5M2, _T.FLOAT8E5M2FNUZ})

# Protobuf cannot serialise a message of 2 GiB or more; stay well below it and move the weights to a side file.
EXTERNAL_DATA_THRESHOLD = int(1.8e9)
# Above this size a model is never serialised whole: onnxruntime gets its weights as OrtValues, the checker and
# shape inference see them as shapes only (see `is_large`).
IN_MEMORY_LIMIT = EXTERNAL_DATA_THRESHOLD
_PROTOBUF_LIMIT = 2**31 - 1
_IN_MEMORY_LOCATION = "onnxzip-in-memory"  # the external-data location written into a session's skeleton


def load_model(path, what: str = "model") -> onnx.ModelProto:
    """Read, check and return the ONNX model at `path`.

    `what` names the file in messages ("model A", "merged model"). Weights stored as external data
    (`model.onnx` + a `.data` file beside it) are loaded from the model's folder.
    Raises `ModelError` if the file is missing, is a directory, is not ONNX, or fails
    `onnx.checker.check_model(full_check=True)`.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelError(f"{what} {path!r}: no such file")
    if os.path.isdir(path):
        raise ModelError(f"{what} {path!r} is a directory, not an .onnx file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf DecodeError, OSError, ... all mean "not a readable ONNX file"
        raise ModelError(f"{what} {path!r} is not a readable ONNX model: {_first_line(e)}") from e
    if not model.graph.node and not model.graph.output:
        # Protobuf parses many non-ONNX files (even empty ones) into an empty message without complaint.
        raise ModelError(f"{what} {path!r} is not an ONNX model (no graph found in it)")
    try:
        external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    except Exception as e:
        raise ModelError(f"{what} {path!r}: cannot load its external weight data "
                         f"(it must lie beside the model file): {_first_line(e)}") from e
    try:
        if model.ByteSize() < _PROTOBUF_LIMIT:
            onnx.checker.check_model(model, full_check=True)
        else:
            # Above protobuf's limit only the checker on a path works; its shape inference cannot read external
            # tensors (exporters keep small ones such as Reshape shapes inline, so this rarely matters).
            onnx.checker.check_model(path, full_check=True)
    except Exception as e:
        raise ModelError(f"{what} {path!r} fails the ONNX checker: {_first_line(e)}") from e
    return model


def save_model_atomic(model: onnx.ModelProto, path, force: bool = False) -> str:
    """Write `model` to `path` so that `path` is either the old file or the complete new one, never half-written.

    Refuses an existing `path` unless `force`. The model is written to a temporary file in the target folder
    and moved into place with `os.replace`; the temporary file is removed on any error or KeyboardInterrupt.
    Models over 1.8 GB are saved with their weights in one external data file `<file name>.data` beside `path`.
    Returns the path written. Raises `OutputError`.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    if os.path.isdir(path):
        raise OutputError(f"output {path!r} is a directory; give a file name such as {path.rstrip('/')}/merged.onnx")
    if os.path.exists(path) and not force:
        raise OutputError(f"output {path!r} already exists; use --force to overwrite it")
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path!r}: folder {folder!r} is not writable")

    external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    data_name = name + ".data"
    if external and os.path.exists(os.path.join(folder, data_name)) and not force:
        raise OutputError(f"weight file {os.path.join(folder, data_name)!r} already exists; "
                          "use --force to overwrite it")
    try:
        if external:
            _save_external(model, folder, name, data_name)
        else:
            _save_single(model, folder, name)
    except OSError as e:
        raise OutputError(f"cannot write {path!r}: {e.strerror or e}") from e
    return path


def _save_single(model: onnx.ModelProto, folder: str, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        _chmod_default(tmp)
        os.replace(tmp, os.path.join(folder, name))
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        _remove_quietly(tmp)
        raise


def _save_external(model: onnx.ModelProto, folder: str, name: str, data_name: str) -> None:
    # The model refers to its data file by name, so both are written under their final names into a temporary
    # folder and then moved into place.
    tmpdir = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        try:
            onnx.save_model(model, os.path.join(tmpdir, name), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        finally:
            # onnx.save_model moves the caller's weights out of the proto into the data file; put them back.
            _restore_external_weights(model, tmpdir)
        # Data first: a reader never sees a new model next to a missing or old data file. (No data file is
        # written when every tensor is small enough to stay inline.)
        for f in (data_name, name):
            if os.path.exists(os.path.join(tmpdir, f)):
                _chmod_default(os.path.join(tmpdir, f))
                os.replace(os.path.join(tmpdir, f), os.path.join(folder, f))
    finally:  # KeyboardInterrupt included
        shutil.rmtree(tmpdir, ignore_errors=True)


def _restore_external_weights(model: onnx.ModelProto, data_folder: str) -> None:
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        if tensor.HasField("raw_data"):  # marked external but not yet written out when saving stopped
            tensor.ClearField("data_location")
            del tensor.external_data[:]
        else:
            external_data_helper.load_external_data_for_tensor(tensor, data_folder)
            tensor.ClearField("data_location")
            del tensor.external_data[:]


def is_large(model: onnx.ModelProto) -> bool:
    """True where the model is too big to pass around serialised (protobuf's 2 GiB limit, with a margin)."""
    return model.ByteSize() > IN_MEMORY_LIMIT


def _copy_except(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, (str, bytes, int, float)):
            setattr(dst, field.name, value)
        elif hasattr(value, "CopyFrom"):
            getattr(dst, field.name).CopyFrom(value)
        else:  # a repeated field
            getattr(dst, field.name).extend(value)


def without_weights(model: onnx.ModelProto, external: bool = False, min_bytes: int = 1024):
    """(skeleton, weights): a copy of `model` in which every float initializer of `min_bytes` or more keeps only its
    name, type and shape, and those weights as numpy arrays. Small tensors (shapes, Resize scales) stay whole, so
    shape inference with data propagation still works on the skeleton. With `external`, the stripped initializers
    are marked as external data, which is what onnxruntime's `SessionOptions.add_external_initializers` replaces;
    without it, `weights` is left empty (the shapes are all shape inference needs)."""
    skeleton = onnx.ModelProto()
    _copy_except(model, skeleton, "graph")
    _copy_except(model.graph, skeleton.graph, "initializer")
    weights = {}
    for init in model.graph.initializer:
        if init.data_type not in FLOAT_TYPES or init.ByteSize() < min_bytes:
            skeleton.graph.initializer.add().CopyFrom(init)
            continue
        stub = skeleton.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)
        if external:
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value=_IN_MEMORY_LOCATION)
            weights[init.name] = onnx.numpy_helper.to_array(init)
    return skeleton, weights


def inference_session(model: onnx.ModelProto, options, providers):
    """An onnxruntime InferenceSession of `model` built in memory, whatever its size: a large model's weights go to
    onnxruntime as OrtValues beside a weightless skeleton (`add_external_initializers`)."""
    import onnxruntime as ort

    if not is_large(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    skeleton, weights = without_weights(model, external=True)
    values = [ort.OrtValue.ortvalue_from_numpy(w) for w in weights.values()]
    options.add_external_initializers(list(weights), values)
    session = ort.InferenceSession(skeleton.SerializeToString(), options, providers=providers)
    session._onnxzip_weights = (weights, values)  # the OrtValues share the arrays' memory: keep both alive
    return session


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker.check_model(full_check=True) for a model of any size (a large one is checked from a temporary
    external-data copy, the only way the checker reads one). Raises what the checker raises."""
    if not is_large(model):
        onnx.checker.check_model(model, full_check=True)
        return
    tmpdir = tempfile.mkdtemp(prefix=".onnxzip-check.")
    try:
        _save_external(model, tmpdir, "model.onnx", "model.onnx.data")
        onnx.checker.check_model(os.path.join(tmpdir, "model.onnx"), full_check=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def model_sha256(model: onnx.ModelProto) -> str:
    """Hex SHA-256 of an in-memory model: of its serialisation, or for a large model of its weightless skeleton
    followed by each stripped weight's bytes."""
    if not is_large(model):
        return hashlib.sha256(model.SerializeToString()).hexdigest()
    skeleton, weights = without_weights(model, external=True)
    h = hashlib.sha256(skeleton.SerializeToString())
    for name, value in weights.items():
        h.update(name.encode())
        h.update(value.tobytes())
    return h.hexdigest()


def file_sha256(path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _chmod_default(path: str) -> None:
    # mkstemp creates 0600 files; give the output the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
