"""Reading and writing ONNX files: checked loads, atomic saves, file hashes; weights mapped from files.

Every failure is an `onnxzip.errors` error that names the file and what to do about it:
`ModelError` for what we read, `OutputError` for what we write.

**Mapped weights.** A merge of large models never holds their weights as protobuf bytes: each large weight stays in
a file (the model's own external data, or a `WeightFile` onnxzip writes) and is read as a read-only `np.memmap`
view (`tensor_array`). In the ModelProto such a weight is an external-data stub whose `location` is the file's
absolute path (`is_mapped`): onnxzip's internal form, which `save_model_atomic` turns into ordinary ONNX (a
`.data` file beside the model, or a single file) by streaming the bytes. onnxruntime sessions get these weights as
OrtValues over the same memory (`inference_session`), so any number of sessions share one copy, and each file is
mapped once however many arrays view it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import weakref

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

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
# A merge maps the weights of every model stored with external data, and of every model whose weights take more
# than this (they are written once to a temporary weight file); smaller models stay in memory as protobuf.
MAPPED_THRESHOLD = 16 << 20
# Float initializers of at least this many bytes are mapped; smaller ones (and shapes, indices) stay inline.
MAPPED_MIN_BYTES = 1024
# Mapped weights smaller than this go into a session's graph as ordinary initializers rather than shared arrays.
SHARED_MIN_BYTES = 16 << 10
# Tensors of at least this many bytes go to the data file when a model is saved with external data (onnx's rule).
EXTERNAL_MIN_BYTES = 1024
# Offsets in the files onnxzip writes: page-aligned for large tensors (np.memmap, onnxruntime map pages), 64 bytes
# for the rest (aligned for any vector load).
_PAGE, _SMALL_ALIGN, _PAGE_ALIGN_FROM = 4096, 64, 64 << 10
# Bytes copied per step when streaming a mapped weight to a file or hashing it.
_STREAM_BYTES = 64 << 20


def load_model(path, what: str = "model", mapped: bool = False) -> onnx.ModelProto:
    """Read, check and return the ONNX model at `path`.

    `what` names the file in messages ("model A", "merged model"). Weights stored as external data
    (`model.onnx` + a `.data` file beside it) are loaded from the model's folder; with `mapped`, its large float
    weights are left in their file instead, as mapped stubs (`tensor_array` reads them), and nothing of them is read.
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
    folder = os.path.dirname(os.path.abspath(path))
    try:
        if mapped:
            _map_external_data(model, folder)
        else:
            external_data_helper.load_external_data_for_model(model, folder)
    except Exception as e:
        raise ModelError(f"{what} {path!r}: cannot load its external weight data "
                         f"(it must lie beside the model file): {_first_line(e)}") from e
    try:
        if not has_mapped_weights(model) and model.ByteSize() < _PROTOBUF_LIMIT:
            onnx.checker.check_model(model, full_check=True)
        else:
            # Above protobuf's limit, and for weights left in their file, only the checker on a path works; its
            # shape inference cannot read external tensors (exporters keep small ones such as Reshape shapes
            # inline, so this rarely matters).
            onnx.checker.check_model(path, full_check=True)
    except Exception as e:
        raise ModelError(f"{what} {path!r} fails the ONNX checker: {_first_line(e)}") from e
    return model


def _map_external_data(model: onnx.ModelProto, folder: str) -> None:
    """Turn the main graph's external float initializers of MAPPED_MIN_BYTES or more into mapped stubs (absolute
    location, offset and length checked against the file); load every other external tensor inline."""
    root = os.path.realpath(folder)
    for tensor in model.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        file = os.path.realpath(os.path.join(folder, info.location))
        if os.path.isabs(info.location) or os.path.commonpath([file, root]) != root:
            raise ModelError(f"tensor {tensor.name!r}: its data file {info.location!r} is not inside the model's "
                             "folder")
        nbytes = _nbytes(tensor)
        if tensor.data_type not in FLOAT_TYPES or nbytes is None or nbytes < MAPPED_MIN_BYTES:
            continue
        offset = int(info.offset or 0)
        length = nbytes if info.length is None else int(info.length)
        size = os.path.getsize(file)
        if length != nbytes or offset < 0 or offset + length > size:
            raise ModelError(f"tensor {tensor.name!r}: {length} bytes at offset {offset} of {info.location!r} "
                             f"({size} bytes) do not hold its {nbytes} bytes")
        _set_location(tensor, file, offset, length)
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor) and not is_mapped(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, folder)
            tensor.ClearField("data_location")
            del tensor.external_data[:]


def _nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of a tensor's data by its type and shape (None for strings and unknown types)."""
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except Exception:  # noqa: BLE001 - an undefined or future element type
        return None
    if dtype.kind in "OUS":
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize


def _set_location(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def _location(tensor: onnx.TensorProto) -> tuple:
    """(path, offset, length) of a mapped stub."""
    info = {e.key: e.value for e in tensor.external_data}
    return info["location"], int(info.get("offset", 0)), int(info["length"])


def is_mapped(tensor: onnx.TensorProto) -> bool:
    """Whether `tensor` is a mapped weight: an external-data stub naming its file by absolute path."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return False
    return any(e.key == "location" and os.path.isabs(e.value) for e in tensor.external_data)


def has_mapped_weights(model: onnx.ModelProto) -> bool:
    return any(is_mapped(t) for t in model.graph.initializer)


def weight_bytes(model: onnx.ModelProto) -> int:
    """The model's size as ONNX: its serialised size, mapped weights counted in full."""
    return model.ByteSize() + sum(_location(t)[2] for t in model.graph.initializer if is_mapped(t))


# Every file with mapped weights is mapped once (read-only), however many arrays view it: mapping it again would
# only add address space, and count the same pages twice in the process's resident size. Keyed by (path, size):
# a weight file that grew is mapped anew. An entry lives as long as some view of it does.
_FILE_MAPS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def _file_map(path: str) -> np.ndarray:
    size = os.path.getsize(path)
    key = (path, size)
    whole = _FILE_MAPS.get(key)
    if whole is None:
        whole = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        _FILE_MAPS[key] = whole
    return whole


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The value of an initializer: for a mapped weight a read-only view of its file (nothing is copied), else
    `numpy_helper.to_array`."""
    if not is_mapped(tensor):
        return numpy_helper.to_array(tensor)
    path, offset, length = _location(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    whole = _file_map(path)
    if offset + length > whole.size:
        raise ModelError(f"weight {tensor.name!r}: {path!r} holds {whole.size} bytes, not {offset + length}")
    return np.asarray(whole[offset:offset + length]).view(dtype).reshape(tuple(tensor.dims))


class WeightFile:
    """A file of weights written once each, for models whose weights are mapped: `add` writes an array (or
    `allocate` reserves room to fill in place) at an aligned offset and returns the mapped stub that names it.
    The file only grows; it is removed with the folder that holds it (`WeightFolder`)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        with open(self.path, "wb"):
            pass
        self.size = 0

    def _reserve(self, nbytes: int) -> int:
        align = _PAGE if nbytes >= _PAGE_ALIGN_FROM else _SMALL_ALIGN
        offset = -(-self.size // align) * align
        self.size = offset + nbytes
        return offset

    def add(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """Write `array` (any layout, a memmap too) and return its stub named `name`."""
        array = np.asarray(array)
        offset = self._reserve(array.nbytes)
        with open(self.path, "r+b") as f:
            f.seek(offset)
            _write_array(f, array)
            f.truncate(self.size)
        return _stub(name, array.dtype, array.shape, self.path, offset, array.nbytes)

    def allocate(self, name: str, shape: tuple, dtype) -> tuple:
        """(stub, writable np.memmap): room for an array of `shape` and `dtype`, to fill in place (then drop the
        memmap: its pages are the file's)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        offset = self._reserve(nbytes)
        with open(self.path, "r+b") as f:
            f.truncate(self.size)
        out = np.memmap(self.path, dtype=dtype, mode="r+", offset=offset, shape=tuple(shape)) if nbytes else \
            np.zeros(shape, dtype)
        return _stub(name, dtype, shape, self.path, offset, nbytes), out


class WeightFolder:
    """A temporary folder for the weight files of one merge (beside `near`, else in the system's temporary folder),
    made on first use; `close` removes it and everything in it."""

    def __init__(self, near: str | None = None):
        self.near = near
        self.path = None
        self._count = 0

    def new_file(self, name: str) -> WeightFile:
        if self.path is None:
            self.path = tempfile.mkdtemp(prefix=".onnxzip-weights.", dir=self.near)
        self._count += 1
        return WeightFile(os.path.join(self.path, f"{self._count:03d}-{name}.weights"))

    def close(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


def _stub(name: str, dtype, shape, path: str, offset: int, length: int) -> onnx.TensorProto:
    stub = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                            dims=[int(d) for d in shape])
    _set_location(stub, path, offset, length)
    return stub


def _write_array(f, array: np.ndarray) -> None:
    """Write an array's bytes (C order) in steps of about _STREAM_BYTES: a mapped array is never read whole."""
    if array.ndim == 0 or array.nbytes <= _STREAM_BYTES:
        f.write(np.ascontiguousarray(array).tobytes() if not array.flags.c_contiguous else memoryview(array).cast("B"))
        return
    rows = max(1, _STREAM_BYTES // max(1, array[0].nbytes))
    for lo in range(0, array.shape[0], rows):
        part = np.ascontiguousarray(array[lo:lo + rows])
        f.write(memoryview(part).cast("B"))


def map_weights(model: onnx.ModelProto, weights: WeightFile, min_bytes: int = MAPPED_MIN_BYTES) -> onnx.ModelProto:
    """A copy of `model` whose float initializers of `min_bytes` or more are written to `weights` and mapped (one at
    a time: the copy never holds a second full set). The caller drops `model` to free its protobuf bytes."""
    skeleton = onnx.ModelProto()
    _copy_except(model, skeleton, "graph")
    _copy_except(model.graph, skeleton.graph, "initializer")
    for init in model.graph.initializer:
        nbytes = _nbytes(init)
        if is_mapped(init) or init.data_type not in FLOAT_TYPES or nbytes is None or nbytes < min_bytes:
            skeleton.graph.initializer.add().CopyFrom(init)
            continue
        skeleton.graph.initializer.append(weights.add(init.name, numpy_helper.to_array(init)))
    return skeleton


def materialise(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every mapped weight read into the protobuf (for code that needs ordinary ONNX)."""
    if not has_mapped_weights(model):
        return model
    out = onnx.ModelProto()
    _copy_except(model, out, "graph")
    _copy_except(model.graph, out.graph, "initializer")
    for init in model.graph.initializer:
        if is_mapped(init):
            out.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(tensor_array(init)), init.name))
        else:
            out.graph.initializer.add().CopyFrom(init)
    return out


def save_model_atomic(model: onnx.ModelProto, path, force: bool = False) -> str:
    """Write `model` to `path` so that `path` is either the old file or the complete new one, never half-written.

    Refuses an existing `path` unless `force`. The model is written to a temporary file in the target folder
    and moved into place with `os.replace`; the temporary file is removed on any error or KeyboardInterrupt.
    Models over 1.8 GB are saved with their weights in one external data file `<file name>.data` beside `path`.
    Mapped weights (`is_mapped`) are streamed from their files into the one written (a model of any size).
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

    external = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
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
            if has_mapped_weights(model):
                _stream_single(f, model)
            else:
                f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        _chmod_default(tmp)
        os.replace(tmp, os.path.join(folder, name))
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        _remove_quietly(tmp)
        raise


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# Protobuf field numbers: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data (length-delimited, wire
# type 2).
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA, _LEN = 7, 5, 9, 2


def _stream_single(f, model: onnx.ModelProto, write_data: bool = True) -> dict:
    """Write `model` as one ordinary .onnx file without ever holding its weights as protobuf: the model without its
    initializers, then per initializer one more `graph` field holding just that initializer (protobuf merges
    repeated occurrences of a message field, appending repeated fields, so this parses as the whole model), a mapped
    weight's bytes streamed from its file as the tensor's raw_data. Returns where in the file each mapped weight's
    bytes are (name -> offset); `write_data=False` writes nothing of them (only the offsets are wanted)."""
    skeleton = onnx.ModelProto()
    _copy_except(model, skeleton, "graph")
    _copy_except(model.graph, skeleton.graph, "initializer")
    head = skeleton.SerializeToString()
    f.write(head)
    pos, offsets = len(head), {}
    for init in model.graph.initializer:
        nbytes = 0
        if is_mapped(init):
            nbytes = _location(init)[2]
            head = _tensor_head(init).SerializeToString() + _key(_TENSOR_RAW_DATA, _LEN) + _varint(nbytes)
        else:
            head = init.SerializeToString()
        piece = _key(_GRAPH_INITIALIZER, _LEN) + _varint(len(head) + nbytes)
        head = _key(_MODEL_GRAPH, _LEN) + _varint(len(piece) + len(head) + nbytes) + piece + head
        f.write(head)
        pos += len(head)
        if is_mapped(init):
            offsets[init.name] = pos
            if write_data:
                _write_array(f, tensor_array(init))
            pos += nbytes
    return offsets


class _Nowhere:
    def write(self, data) -> None:
        pass


def written_model(model: onnx.ModelProto, path) -> onnx.ModelProto:
    """`model` as `save_model_atomic(model, path)` wrote it, each mapped weight now naming its bytes in the written
    file (`path` itself, or its `.data` file): nothing is read, and the model no longer needs the files its weights
    were mapped from."""
    path = os.path.abspath(os.fspath(path))
    if not has_mapped_weights(model):
        return model
    if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        return load_model(path, "merged model", mapped=True)
    offsets = _stream_single(_Nowhere(), model, write_data=False)
    out = onnx.ModelProto()
    out.CopyFrom(model)  # stubs: small
    for init in out.graph.initializer:
        if init.name in offsets:
            _set_location(init, path, offsets[init.name], _location(init)[2])
    return out


def _tensor_head(init: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor's name, type, shape and doc string: everything but its data and where the data is."""
    head = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims)
    if init.HasField("doc_string"):
        head.doc_string = init.doc_string
    return head


def _save_external(model: onnx.ModelProto, folder: str, name: str, data_name: str) -> None:
    # The model refers to its data file by name, so both are written under their final names into a temporary
    # folder and then moved into place.
    tmpdir = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        _write_external(model, tmpdir, name, data_name)
        # Data first: a reader never sees a new model next to a missing or old data file. (No data file is
        # written when every tensor is small enough to stay inline.)
        for f in (data_name, name):
            if os.path.exists(os.path.join(tmpdir, f)):
                _chmod_default(os.path.join(tmpdir, f))
                os.replace(os.path.join(tmpdir, f), os.path.join(folder, f))
    finally:  # KeyboardInterrupt included
        shutil.rmtree(tmpdir, ignore_errors=True)


def _write_external(model: onnx.ModelProto, folder: str, name: str, data_name: str) -> None:
    """`folder/name` + `folder/data_name`: every initializer of EXTERNAL_MIN_BYTES or more goes to the data file
    (one at a time, a mapped one streamed from its own file), the rest stays inline. The caller's model is left as
    it is."""
    skeleton = onnx.ModelProto()
    _copy_except(model, skeleton, "graph")
    _copy_except(model.graph, skeleton.graph, "initializer")
    size = 0
    data = None
    try:
        for init in model.graph.initializer:
            nbytes = _location(init)[2] if is_mapped(init) else _nbytes(init)
            if nbytes is None or nbytes < EXTERNAL_MIN_BYTES or (init.data_location == onnx.TensorProto.EXTERNAL
                                                                 and not is_mapped(init)):
                skeleton.graph.initializer.add().CopyFrom(init)
                continue
            if data is None:
                data = open(os.path.join(folder, data_name), "wb")
            align = _PAGE if nbytes >= _PAGE_ALIGN_FROM else _SMALL_ALIGN
            offset = -(-size // align) * align
            data.write(b"\0" * (offset - size))
            if is_mapped(init):
                _write_array(data, tensor_array(init))
            elif init.HasField("raw_data"):
                data.write(init.raw_data)
            else:
                data.write(np.ascontiguousarray(numpy_helper.to_array(init)).tobytes())
            size = offset + nbytes
            stub = skeleton.graph.initializer.add()
            stub.CopyFrom(_tensor_head(init))
            _set_location(stub, data_name, offset, nbytes)
        if data is not None:
            data.flush()
            os.fsync(data.fileno())
    finally:
        if data is not None:
            data.close()
    with open(os.path.join(folder, name), "wb") as f:
        f.write(skeleton.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


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
    """An onnxruntime InferenceSession of `model` built in memory, whatever its size. Mapped weights are shared with
    the session, uncopied (`add_initializer` of OrtValues over the mapped arrays); a large model's other weights go
    to onnxruntime as OrtValues beside a weightless skeleton (`add_external_initializers`, which copies them)."""
    import onnxruntime as ort

    if has_mapped_weights(model):
        return _mapped_session(model, options, providers)
    if not is_large(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    skeleton, weights = without_weights(model, external=True)
    values = [ort.OrtValue.ortvalue_from_numpy(w) for w in weights.values()]
    options.add_external_initializers(list(weights), values)
    session = ort.InferenceSession(skeleton.SerializeToString(), options, providers=providers)
    session._onnxzip_weights = (weights, values)  # the OrtValues share the arrays' memory: keep both alive
    return session


def _mapped_session(model: onnx.ModelProto, options, providers):
    """A session whose mapped weights are the arrays themselves. onnxruntime copies initializers given by
    `add_external_initializers`, and packs a second copy of MatMul/Gemm weights unless prepacking is off; an
    initializer given by `add_initializer` it uses as it is, in every session that gets it. The graph keeps each
    mapped weight as an external-data stub naming its real file (relative to the root folder, which onnxruntime is
    told to resolve them from): onnxruntime insists that the file exists, and reads it where a graph optimisation
    (constant folding) needs the value; everywhere else it uses the OrtValue."""
    import onnxruntime as ort

    skeleton = onnx.ModelProto()
    _copy_except(model, skeleton, "graph")
    _copy_except(model.graph, skeleton.graph, "initializer")
    arrays, values = [], []
    for init in model.graph.initializer:
        stub = skeleton.graph.initializer.add()
        stub.CopyFrom(init)
        if not is_mapped(init):
            continue
        if _nbytes(init) < SHARED_MIN_BYTES:
            # small: inline (nothing to save); onnxruntime 1.31 failed to broadcast ConvNeXt's (384, 1, 1) layer
            # scale, read by nine blocks through Identity nodes, when it came through add_initializer
            stub.CopyFrom(numpy_helper.from_array(np.array(tensor_array(init)), init.name))
            continue
        path, offset, length = _location(init)
        _set_location(stub, os.path.relpath(path, os.sep), offset, length)
        array = tensor_array(init)
        if array.ctypes.data % _SMALL_ALIGN:  # a small weight at an odd offset of someone's data file
            array = np.array(array)
        arrays.append(array)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
        options.add_initializer(init.name, values[-1])
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", os.sep)
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = ort.InferenceSession(skeleton.SerializeToString(), options, providers=providers)
    session._onnxzip_weights = (arrays, values, options)  # onnxruntime uses their memory: keep them alive
    return session


def check_model(model: onnx.ModelProto) -> None:
    """onnx.checker.check_model(full_check=True) for a model of any size (a large one is checked from a temporary
    external-data copy, a mapped one from its skeleton). Raises what the checker raises."""
    if has_mapped_weights(model):
        _check_mapped(model)
        return
    if not is_large(model):
        onnx.checker.check_model(model, full_check=True)
        return
    tmpdir = tempfile.mkdtemp(prefix=".onnxzip-check.")
    try:
        _save_external(model, tmpdir, "model.onnx", "model.onnx.data")
        onnx.checker.check_model(os.path.join(tmpdir, "model.onnx"), full_check=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _check_mapped(model: onnx.ModelProto) -> None:
    # The checker takes external data only from regular files beside a model file, and only checks that each lies
    # within its file (it reads no weight; `tensor_array` checks the real files' bounds): the skeleton is checked
    # beside empty sparse files of the weight files' sizes.
    tmpdir = tempfile.mkdtemp(prefix=".onnxzip-check.")
    try:
        files = {}
        skeleton = onnx.ModelProto()
        skeleton.CopyFrom(model)  # stubs: small
        for init in skeleton.graph.initializer:
            if is_mapped(init):
                path, offset, length = _location(init)
                if path not in files:
                    files[path] = f"weights{len(files)}"
                    with open(os.path.join(tmpdir, files[path]), "wb") as f:
                        f.truncate(os.path.getsize(path))
                _set_location(init, files[path], offset, length)
        with open(os.path.join(tmpdir, "model.onnx"), "wb") as f:
            f.write(skeleton.SerializeToString())
        onnx.checker.check_model(os.path.join(tmpdir, "model.onnx"), full_check=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def model_sha256(model: onnx.ModelProto) -> str:
    """Hex SHA-256 of an in-memory model: of its serialisation, or for a large or mapped model of its weightless
    skeleton followed by each stripped weight's bytes."""
    if not is_large(model) and not has_mapped_weights(model):
        return hashlib.sha256(model.SerializeToString()).hexdigest()
    skeleton, weights = without_weights(model, external=True)
    h = hashlib.sha256(skeleton.SerializeToString())
    for name, value in weights.items():
        h.update(name.encode())
        h.update(value.tobytes())
    for init in model.graph.initializer:
        if is_mapped(init):
            h.update(init.name.encode())
            flat = tensor_array(init).reshape(-1).view(np.uint8)
            for lo in range(0, flat.size, _STREAM_BYTES):
                h.update(flat[lo:lo + _STREAM_BYTES])
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
