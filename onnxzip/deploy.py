"""Deployment: a merged model as a Triton Inference Server model repository, optionally in float16 or another opset.

`deploy` writes ``REPO/NAME/config.pbtxt``, ``REPO/NAME/V/model.onnx`` (and its card, ``model.onnx.json``) and one
label file per task head whose classes are known, for Triton's `onnxruntime` backend. The steps, each checked before
anything is written:

1. Read the model and its merge card (metadata key ``onnxzip.card``, else ``MODEL.json`` beside it). A model without
   one is not an onnxzip merge: it still deploys, its outputs keep their names, and a warning says so.
2. Optional conversions, each verified against the float32 model on samples: `to_fp16` (onnxconverter-common's
   converter, float32 inputs and outputs kept; argmax agreement and max relative error per head, `FP16_MIN_AGREEMENT`)
   and `convert_opset` (onnx.version_converter; outputs must stay within `OPSET_MAX_RELATIVE_ERROR`). The samples
   are the ones `merge` held back to verify (found again from the card's calibration source, sample count and
   seed), or `data` when given.
3. `triton_config`: inputs and outputs with data types and dims, the batch axis folded into ``max_batch_size``
   (refused where the graph fixes it), dynamic batching, instance groups, a ``label_filename`` per head.
4. The final model is loaded and run once in onnxruntime, then the model folder is written under a temporary name
   and renamed into place: never half-written, never over an existing folder without `force`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import (CalibrationDataError, InstallError, ModelError, OutputError, UnsupportedModelError, UsageError,
                     VerificationError)

log = logging.getLogger("onnxzip")

CARD_KEY = "onnxzip.card"
# fp16: every head's top-1 must agree with the float32 model on at least this share of the samples.
FP16_MIN_AGREEMENT = 0.99
# --target-opset: the converted model's outputs may differ from the original's by at most this, relative to the
# largest absolute output of each head (conversion rewrites operators, it must not change what they compute).
OPSET_MAX_RELATIVE_ERROR = 1e-5
DEFAULT_MAX_BATCH_SIZE = 64
# Samples run for the fp16 / opset checks when no held-back samples are found and `data` is given: all of them up
# to this many.
MAX_CHECK_SAMPLES = 256
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

# ONNX element type -> Triton data type (model_config.proto's DataType)
TRITON_TYPES = {
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32", onnx.TensorProto.UINT64: "TYPE_UINT64", onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.STRING: "TYPE_STRING", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
}


@dataclass
class DeployResult:
    model_dir: str  # REPO/NAME
    model_path: str  # REPO/NAME/V/model.onnx
    config_path: str  # REPO/NAME/config.pbtxt
    config: str  # the text of config.pbtxt
    card: dict  # the deployed model's card (the merge card, if any, plus "deploy")
    label_files: dict = field(default_factory=dict)  # output name -> label file name in the model folder
    warnings: list = field(default_factory=list)

    def summary_lines(self) -> list:
        d = self.card["deploy"]
        lines = [f"model {d['name']!r} version {d['version']}: {len(d['outputs'])} output(s) "
                 f"({', '.join(d['outputs'])}), max_batch_size {d['max_batch_size']}, "
                 f"instances {d['instances']}, opset {d['opset']}, IR version {d['ir_version']}"]
        for output, name in self.label_files.items():
            lines.append(f"  {output}: labels in {name}")
        for check in ("fp16", "opset_conversion"):
            c = d.get(check)
            if not c:
                continue
            what = "fp16" if check == "fp16" else f"opset {c['from']} -> {c['to']}"
            lines.append(f"{what}: checked on {c['samples']} {c['sample_source']} sample(s):")
            for head in c["heads"]:
                lines.append(f"  {head['output']}: top-1 agreement {head['top1_agreement']:.4f}, max relative "
                             f"error {head['max_relative_error']:.3g}")
        lines.append(f"wrote {self.model_dir} ({os.path.relpath(self.model_path, self.model_dir)}, config.pbtxt"
                     + "".join(f", {n}" for n in self.label_files.values()) + ")")
        return lines


# ---------------------------------------------------------------------------------------------------------------
# Cards
# ---------------------------------------------------------------------------------------------------------------

def read_merge_card(model: onnx.ModelProto, path: str | None = None) -> dict | None:
    """The merge card of an onnxzip merge: the model's metadata (key ``onnxzip.card``), else ``path + '.json'``;
    None when neither is there (not an onnxzip merge)."""
    for prop in model.metadata_props:
        if prop.key == CARD_KEY:
            try:
                card = json.loads(prop.value)
            except ValueError as exc:
                raise ModelError(f"model {path or ''!r}: its metadata {CARD_KEY!r} is not valid JSON: {exc}") from exc
            if isinstance(card, dict):
                return card
    if path is not None and os.path.isfile(path + ".json"):
        try:
            with open(path + ".json", encoding="utf-8") as f:
                card = json.load(f)
        except (OSError, ValueError) as exc:
            raise ModelError(f"merge card {path + '.json'!r} is not a readable JSON file: {exc}") from exc
        if isinstance(card, dict) and card.get("tool") == "onnxzip":
            return card
    return None


def read_task_card(path) -> tuple:
    """(tasks, class names or None) from a card.json such as the bundled pairs' ones: ``"tasks"`` maps each task to
    its class ids in head order, the optional ``"class_names"`` lists the names of the class ids. Raises
    `UsageError` naming the file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            card = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--card {path!r}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"--card {path!r} is not a readable JSON file: {exc}") from exc
    tasks = card.get("tasks") if isinstance(card, dict) else None
    if not isinstance(tasks, dict) or not tasks or not all(
            isinstance(c, list) and c and all(isinstance(i, int) and not isinstance(i, bool) for i in c)
            for c in tasks.values()):
        raise UsageError(f"--card {path!r} has no \"tasks\" entry of the form "
                         "{\"a\": [class ids], \"b\": [class ids]}")
    names = card.get("class_names")
    if names is not None:
        top = max(max(c) for c in tasks.values())
        if (not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) <= top
                or min(min(c) for c in tasks.values()) < 0):
            raise UsageError(f"--card {path!r}: \"class_names\" must be a list of strings naming every class id of "
                             f"\"tasks\" (ids up to {top})")
    return tasks, names


# ---------------------------------------------------------------------------------------------------------------
# Conversions and their checks
# ---------------------------------------------------------------------------------------------------------------

def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and compute in float16, float32 graph inputs and outputs kept: onnxconverter-common's converter
    (``keep_io_types=True``). The IR version and opsets are those of `model` (servers with older onnxruntime builds
    must load what they loaded before)."""
    try:
        from onnxconverter_common import float16
    except Exception as exc:  # noqa: BLE001 - an ImportError, or onnxruntime failing inside its __init__
        raise InstallError(f"onnxconverter-common cannot be used: {_first_line(exc)}; install it with "
                           "pip install onnxconverter-common") from exc
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        raise UsageError("the model already holds float16 weights; --fp16 converts a float32 model")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter warns about values clipped to fp16's range on every model
        try:
            half = float16.convert_float_to_float16(model, keep_io_types=True)
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedModelError(f"onnxconverter-common cannot convert the model to float16: "
                                        f"{_first_line(exc)}") from exc
    half.ir_version = min(half.ir_version, model.ir_version)
    if _opsets(half) != _opsets(model):
        del half.opset_import[:]
        half.opset_import.extend(model.opset_import)
    _check(half, "the float16 model")
    return half


def convert_opset(model: onnx.ModelProto, target_opset: int, ir_version: int | None = None) -> onnx.ModelProto:
    """`model` converted to default-domain opset `target_opset` with onnx.version_converter, its IR version set to
    `ir_version` or, by default, to the one the ONNX release that introduced that opset wrote (an onnxruntime build
    that runs the opset loads that IR version)."""
    current = _opsets(model).get("", None)
    if current is None:
        raise UnsupportedModelError("the model imports no default-domain (ai.onnx) opset; nothing to convert")
    if not isinstance(target_opset, int) or target_opset < 7:
        raise UsageError(f"--target-opset must be a whole number >= 7, got {target_opset!r}")
    converted = model
    if target_opset != current:
        from onnx import version_converter

        try:
            converted = version_converter.convert_version(model, target_opset)
        except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError/ValueError with C++ text
            raise UnsupportedModelError(f"onnx.version_converter cannot convert the model from opset {current} to "
                                        f"{target_opset}: {_converter_message(exc)}") from exc
    ir = ir_version if ir_version is not None else ir_version_for_opset(target_opset)
    if not isinstance(ir, int) or ir < 3:
        raise UsageError(f"--ir-version must be a whole number >= 3, got {ir!r}")
    converted.ir_version = ir
    _check(converted, f"the model converted to opset {target_opset} (IR version {ir})")
    return converted


def ir_version_for_opset(opset: int) -> int:
    """The IR version of the first ONNX release whose default-domain opset is `opset` (onnx.helper.VERSION_TABLE)."""
    for _release, ir, ai_onnx, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return ir
    return onnx.IR_VERSION


def compare_outputs(reference: onnx.ModelProto, candidate: onnx.ModelProto, samples: dict, batch_size: int = 64,
                    device: str = "cpu") -> list:
    """Per float output: top-1 agreement of `candidate` with `reference` on `samples` (input name -> array) and
    the max relative error, max |candidate - reference| / max |reference| over the samples (elementwise relative
    errors explode on logits near zero; this is the error on the scale of the head's output)."""
    ref = _run(reference, samples, batch_size, device)
    got = _run(candidate, samples, batch_size, device)
    heads = []
    for out in reference.graph.output:
        r, g = ref[out.name], got[out.name]
        if r.dtype.kind not in "fc":
            heads.append({"output": out.name, "top1_agreement": float(np.mean(r == g)), "max_relative_error": 0.0})
            continue
        r = r.reshape(len(r), -1).astype(np.float64)
        g = g.reshape(len(g), -1).astype(np.float64)
        if not np.isfinite(g).all():
            raise VerificationError(f"output {out.name!r} of the converted model is not finite (NaN or inf) on the "
                                    "check samples")
        scale = max(float(np.abs(r).max()), 1e-12)
        heads.append({"output": out.name, "top1_agreement": float(np.mean(r.argmax(1) == g.argmax(1))),
                      "max_relative_error": float(np.abs(g - r).max() / scale)})
    return heads


def _run(model: onnx.ModelProto, samples: dict, batch_size: int, device: str) -> dict:
    from .calibration import make_session
    from .runtime import onnxruntime_errors

    from .calibration import input_specs

    session = make_session(model, device, "basic")
    names = [o.name for o in model.graph.output]
    dtypes = {spec.name: spec.dtype for spec in input_specs(model)}
    n = len(next(iter(samples.values())))
    chunks = {name: [] for name in names}
    try:
        for lo in range(0, n, batch_size):
            feed = {k: np.ascontiguousarray(v[lo:lo + batch_size], dtype=dtypes.get(k)) for k, v in samples.items()}
            for name, value in zip(names, session.run(names, feed)):
                chunks[name].append(np.asarray(value))
    except onnxruntime_errors() as exc:
        raise ModelError(f"onnxruntime cannot run the model on the check samples: {_first_line(exc)}") from exc
    return {name: np.concatenate(c) for name, c in chunks.items()}


def check_samples(model: onnx.ModelProto, card: dict | None, data=None, logger: logging.Logger | None = None) -> tuple:
    """(samples as input name -> array, where they come from) for the fp16 and opset checks.

    `data` (a .npy/.npz path or an array) when given: at most MAX_CHECK_SAMPLES of it. Otherwise the samples the
    merge held back to verify, found again from the card: its calibration source, sample count and seed select the
    same subset, whose last ``verification_samples`` were held back (or the calibration samples themselves when the
    merge held none back). Raises `UsageError` when there is neither."""
    from .calibration import calibration_from_arrays, input_specs, load_calibration

    logger = logger or log
    specs = input_specs(model)
    if data is not None:
        if isinstance(data, np.ndarray):
            calib = calibration_from_arrays(data, specs, None, logger)
            source = "given"
        else:
            calib = load_calibration(os.fspath(data), specs, None, logger)
            source = f"{os.fspath(data)}"
        n = min(calib.num_samples, MAX_CHECK_SAMPLES)
        return {k: np.asarray(v[:n]) for k, v in calib.arrays.items()}, source
    calibration = (card or {}).get("calibration") or {}
    path = calibration.get("source")
    if not path:
        raise UsageError("the checks after --fp16 / --target-opset need samples: the model has no merge card naming "
                         "its calibration data; give --data PATH (.npy/.npz)")
    if not os.path.isfile(path):
        raise UsageError(f"the checks after --fp16 / --target-opset need samples: the calibration data the merge "
                         f"card names, {path!r}, is not there (paths are relative to where merge ran); "
                         "give --data PATH")
    try:
        calib = load_calibration(path, specs, None, logger)
    except CalibrationDataError as exc:
        raise UsageError(f"the calibration data the merge card names cannot serve the checks ({exc}); "
                         "give --data PATH") from exc
    options = card.get("options") or {}
    if options.get("num_samples") is not None:
        calib = calib.subset(int(options["num_samples"]), int(card.get("seed") or 0))
    held = int(calibration.get("verification_samples") or 0)
    if held and held < calib.num_samples:
        _, held_back = calib.split(held)
        return dict(held_back.arrays), f"held-back ({path})"
    n = min(calib.num_samples, MAX_CHECK_SAMPLES)
    return {k: np.asarray(v[:n]) for k, v in calib.arrays.items()}, f"calibration ({path})"


def check_fp16(model: onnx.ModelProto, half: onnx.ModelProto, samples: dict, source: str, force: bool = False,
               batch_size: int = 64, device: str = "cpu", logger: logging.Logger | None = None) -> dict:
    """The card's "fp16" entry: per head, top-1 agreement and max relative error of `half` against `model` on
    `samples`. Below FP16_MIN_AGREEMENT on any head: `VerificationError`, or with `force` a warning."""
    logger = logger or log
    heads = compare_outputs(model, half, samples, batch_size, device)
    low = [h for h in heads if h["top1_agreement"] < FP16_MIN_AGREEMENT]
    result = {"converter": _converter_version(), "keep_io_types": True, "samples": _num(samples),
              "sample_source": source, "min_agreement": FP16_MIN_AGREEMENT, "heads": _rounded(heads),
              "accepted_below_min": bool(low)}
    if low:
        what = ", ".join(f"{h['output']!r} {h['top1_agreement']:.4f}" for h in low)
        message = (f"the float16 model's top-1 agrees with the float32 model's below {FP16_MIN_AGREEMENT:g} on "
                   f"{what} ({_num(samples)} {source} samples)")
        if not force:
            raise VerificationError(f"{message}; nothing was written. Deploy in float32, or use --force to keep it")
        logger.warning("%s; kept because of --force", message)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------------------------

def parse_instances(text: str) -> tuple:
    """'cpu', 'gpu', 'cpu:K' or 'gpu:K' -> (Triton instance kind, count K >= 1)."""
    if not isinstance(text, str):
        raise UsageError(f"--instances must be cpu, gpu, cpu:K or gpu:K, got {text!r}")
    kind, sep, count = text.strip().lower().partition(":")
    if kind not in ("cpu", "gpu") or (sep and not count.isdigit()) or (sep and int(count) < 1):
        raise UsageError(f"--instances {text!r}: write cpu, gpu, cpu:K or gpu:K with K >= 1 instances")
    return ("KIND_CPU" if kind == "cpu" else "KIND_GPU"), (int(count) if sep else 1)


def _tensor_entry(value: onnx.ValueInfoProto, batched: bool, what: str) -> dict:
    t = value.type.tensor_type
    if value.type.WhichOneof("value") != "tensor_type":
        raise UnsupportedModelError(f"{what} {value.name!r} is not a tensor; Triton's onnxruntime backend serves "
                                    "tensors only")
    if t.elem_type not in TRITON_TYPES:
        raise UnsupportedModelError(f"{what} {value.name!r} has ONNX element type "
                                    f"{onnx.TensorProto.DataType.Name(t.elem_type)}, which Triton has no type for")
    if not t.HasField("shape"):
        raise UnsupportedModelError(f"{what} {value.name!r} has no shape in the graph; Triton needs its rank")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    if batched:
        if not dims or dims[0] != -1:
            fixed = "no batch axis" if not dims else f"a fixed batch dimension of {dims[0]}"
            raise UnsupportedModelError(
                f"{what} {value.name!r} has {fixed}: Triton batches a model only along a dynamic first axis; "
                "re-export the models with a dynamic batch axis, or deploy without batching (--max-batch-size 0)")
        dims = dims[1:]
    return {"name": value.name, "data_type": TRITON_TYPES[t.elem_type], "dims": dims}


def triton_config(model: onnx.ModelProto, name: str, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                  instances: str = "cpu", label_files: dict | None = None) -> str:
    """config.pbtxt (Triton's ModelConfig in protobuf text format) for `model` served by the onnxruntime backend.

    With `max_batch_size` > 0 the first axis of every input and output must be dynamic (it becomes Triton's batch
    dimension and is left out of ``dims``) and dynamic batching is on; 0 serves the model as it is, full shapes, no
    batching. `label_files` maps an output name to its label file (one class per line, in output order)."""
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 0:
        raise UsageError(f"--max-batch-size must be a whole number >= 0, got {max_batch_size!r}")
    kind, count = parse_instances(instances)
    batched = max_batch_size > 0
    initializers = {i.name for i in model.graph.initializer}
    inputs = [_tensor_entry(v, batched, "input") for v in model.graph.input if v.name not in initializers]
    outputs = [_tensor_entry(v, batched, "output") for v in model.graph.output]
    label_files = label_files or {}
    lines = [f"name: {_quote(name)}", 'backend: "onnxruntime"', f"max_batch_size: {max_batch_size}"]
    for section, entries in (("input", inputs), ("output", outputs)):
        lines.append(f"{section} [")
        for i, e in enumerate(entries):
            lines.append("  {")
            lines.append(f"    name: {_quote(e['name'])}")
            lines.append(f"    data_type: {e['data_type']}")
            if e["dims"]:
                lines.append(f"    dims: [ {', '.join(str(d) for d in e['dims'])} ]")
            else:  # a batched scalar per sample: Triton wants a non-empty dims; reshape to the model's rank-1 tensor
                lines.append("    dims: [ 1 ]")
                lines.append("    reshape: { shape: [ ] }")
            if e["name"] in label_files:
                lines.append(f"    label_filename: {_quote(label_files[e['name']])}")
            lines.append("  }" + ("," if i < len(entries) - 1 else ""))
        lines.append("]")
    lines.append("instance_group [")
    lines.append(f"  {{ count: {count} kind: {kind} }}")
    lines.append("]")
    if batched:
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid protobuf text-format string (escapes included)


def head_labels(model: onnx.ModelProto, tasks: dict, class_names: list | None) -> dict:
    """Output name -> label file lines for each head named ``<task>/...`` of a task in `tasks`: the class names
    (class ids without names) in head order. Raises `UsageError` when no head is a task's or a head's width is not
    its task's class count."""
    labels = {}
    for out in model.graph.output:
        task = out.name.split("/", 1)[0] if "/" in out.name else None
        if task not in tasks:
            continue
        classes = tasks[task]
        dims = out.type.tensor_type.shape.dim
        width = dims[-1].dim_value if len(dims) and dims[-1].HasField("dim_value") else None
        if width is not None and width != len(classes):
            raise UsageError(f"head {out.name!r} has {width} outputs, but task {task!r} of --card has "
                             f"{len(classes)} classes; is it the card of this model?")
        labels[out.name] = [class_names[c] if class_names else str(c) for c in classes]
    if not labels:
        raise UsageError(f"--card tasks {', '.join(tasks)} name no output of the model "
                         f"(outputs: {', '.join(o.name for o in model.graph.output)}; heads are matched as TASK/...)")
    return labels


def _label_file_name(output: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", output).strip("_") + ".labels.txt"


# ---------------------------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------------------------

def deploy(model, repository, *, name: str | None = None, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
           instances: str = "cpu", fp16: bool = False, version: int = 1, force: bool = False,
           target_opset: int | None = None, ir_version: int | None = None, card=None, data=None,
           batch_size: int = 64, device: str = "cpu", logger: logging.Logger | None = None) -> DeployResult:
    """Write `model` (a path or ModelProto) as model `name` of the Triton model repository `repository`.

    name: the model's folder (default: the model file's name without .onnx). max_batch_size: Triton's, the batch
    axis folded into it (0: no batching, full shapes). instances: 'cpu', 'gpu', 'cpu:K', 'gpu:K'. fp16: convert
    with onnxconverter-common and check (below FP16_MIN_AGREEMENT top-1 agreement on any head: an error, unless
    `force`). version: the version folder. force: replace an existing model folder (and accept a low fp16
    agreement). target_opset / ir_version: convert with onnx.version_converter and check the outputs did not change.
    card: a card.json with "tasks" (and "class_names") for the heads' label files. data: samples for the checks
    (default: the merge's held-back samples, found again through the card). Returns a `DeployResult`; every problem
    is an `onnxzip.errors` error, found before anything is written.
    """
    from .onnx_io import load_model

    logger = logger or log
    warnings_ = []
    # 1. options, cheapest first
    for flag, value in (("fp16", fp16), ("force", force)):
        if not isinstance(value, (bool, np.bool_)):
            raise UsageError(f"{flag} must be True or False, got {value!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UsageError(f"--version must be a whole number >= 1, got {version!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
    if ir_version is not None and target_opset is None:
        raise UsageError("--ir-version goes with --target-opset (give the opset to convert to)")
    parse_instances(instances)
    path = None
    if isinstance(model, onnx.ModelProto):
        source = model
    else:
        path = os.fspath(model)
        source = load_model(path, "model")
    if name is None:
        if path is None:
            raise UsageError("give a name for an in-memory model (--name)")
        name = re.sub(r"\.onnx$", "", os.path.basename(path))
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise UsageError(f"--name {name!r}: a Triton model name is letters, digits, '_', '.' and '-'")
    repository = os.fspath(repository)
    model_dir = os.path.join(repository, name)
    if os.path.exists(repository) and not os.path.isdir(repository):
        raise OutputError(f"--triton {repository!r} is a file, not a model repository folder")
    if os.path.lexists(model_dir) and not force:
        raise OutputError(f"model folder {model_dir!r} already exists; use --force to replace it")
    if os.path.lexists(model_dir) and not os.path.isdir(model_dir):
        raise OutputError(f"{model_dir!r} exists and is not a folder; remove it or choose another --name")
    tasks, class_names = read_task_card(card) if card is not None else (None, None)

    merge_card = read_merge_card(source, path)
    if merge_card is None:
        message = (f"{path or 'the model'} is not an onnxzip merge (no card in its metadata nor beside it): its "
                   "outputs are deployed under their own names, one per graph output")
        logger.warning("%s", message)
        warnings_.append(message)
    max_batch_size = int(max_batch_size) if isinstance(max_batch_size, (int, np.integer)) else max_batch_size
    label_lines = head_labels(source, tasks, class_names) if tasks else {}
    label_files = {out: _label_file_name(out) for out in label_lines}
    # the config is made (and so the batch axis checked) before any conversion runs
    triton_config(source, name, max_batch_size, instances, label_files)

    # 2. conversions, each checked against the float32 model
    deployed = source
    deploy_card = {}
    if fp16 or target_opset is not None:
        samples, sample_source = check_samples(source, merge_card, data, logger)
    if target_opset is not None:
        before = _opsets(source).get("")
        converted = convert_opset(source, target_opset, ir_version)
        heads = compare_outputs(source, converted, samples, batch_size, device)
        worst = max((h["max_relative_error"] for h in heads), default=0.0)
        if worst > OPSET_MAX_RELATIVE_ERROR:
            raise VerificationError(f"the model converted to opset {target_opset} computes other outputs (max "
                                    f"relative error {worst:.3g} > {OPSET_MAX_RELATIVE_ERROR:g} on {_num(samples)} "
                                    "samples); nothing was written")
        deploy_card["opset_conversion"] = {"from": before, "to": target_opset, "samples": _num(samples),
                                           "sample_source": sample_source, "heads": _rounded(heads)}
        deployed = converted
    if fp16:
        half = to_fp16(deployed)
        deploy_card["fp16"] = check_fp16(deployed, half, samples, sample_source, force, batch_size, device, logger)
        deployed = half
    config = triton_config(deployed, name, max_batch_size, instances, label_files)

    # 3. it must load and run, with the shapes the config promises
    _smoke_test(deployed, device)

    card_out = dict(merge_card or {})
    card_out["deploy"] = {"name": name, "version": version, "max_batch_size": max_batch_size,
                          "instances": instances, "backend": "onnxruntime", "fp16": None, "opset_conversion": None,
                          "opset": _opsets(deployed).get(""), "ir_version": deployed.ir_version,
                          "outputs": [o.name for o in deployed.graph.output], "label_files": label_files,
                          "onnxzip_merge": merge_card is not None, **deploy_card}
    deployed = _with_card(deployed, card_out)
    _write_repository(deployed, card_out, config, label_lines, label_files, repository, name, version, force)
    model_path = os.path.join(model_dir, str(version), "model.onnx")
    return DeployResult(model_dir, model_path, os.path.join(model_dir, "config.pbtxt"), config, card_out,
                        label_files, warnings_)


def _smoke_test(model: onnx.ModelProto, device: str) -> None:
    """Run the model once on two samples of zeros (symbolic dims as 2) in onnxruntime."""
    from .calibration import input_specs

    feed = {}
    for spec in input_specs(model):
        shape = [d if isinstance(d, int) and d > 0 else 2 for d in (spec.shape or ())]
        feed[spec.name] = np.zeros(shape, spec.dtype)
    _run(model, feed, 64, device)


def _with_card(model: onnx.ModelProto, card: dict) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i in reversed(range(len(out.metadata_props))):
        if out.metadata_props[i].key == CARD_KEY:
            del out.metadata_props[i]
    out.metadata_props.add(key=CARD_KEY, value=json.dumps(_plain(card), sort_keys=True, allow_nan=False))
    return out


def _write_repository(model, card, config, label_lines, label_files, repository, name, version, force) -> None:
    """The model folder is written whole under a temporary name inside the repository, then renamed into place; an
    existing folder (with `force`) is moved aside first and restored if the rename fails."""
    from .onnx_io import save_model_atomic

    try:
        os.makedirs(repository, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create model repository {repository!r}: {exc.strerror or exc}") from exc
    final = os.path.join(repository, name)
    tmp = old = None
    try:
        try:
            tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=repository)
            os.chmod(tmp, 0o777 & ~_umask())
            version_dir = os.path.join(tmp, str(version))
            os.mkdir(version_dir)
            save_model_atomic(model, os.path.join(version_dir, "model.onnx"))
            _write_text(os.path.join(version_dir, "model.onnx.json"),
                        json.dumps(_plain(card), indent=2, sort_keys=True, allow_nan=False) + "\n")
            _write_text(os.path.join(tmp, "config.pbtxt"), config)
            for output, file_name in label_files.items():
                _write_text(os.path.join(tmp, file_name), "\n".join(label_lines[output]) + "\n")
            if os.path.lexists(final):
                if not force:  # appeared while we were working
                    raise OutputError(f"model folder {final!r} appeared while deploying; use --force to replace it")
                old = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=repository)
                os.rmdir(old)
                os.rename(final, old)
            os.rename(tmp, final)
            tmp = None
        except OSError as exc:
            raise OutputError(f"cannot write model folder {final!r}: {exc.strerror or exc}") from exc
    except BaseException:
        if old is not None and not os.path.lexists(final):
            try:
                os.rename(old, final)
                old = None
            except OSError:
                pass
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None and os.path.lexists(final):
            shutil.rmtree(old, ignore_errors=True)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# ---------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------

def _opsets(model: onnx.ModelProto) -> dict:
    return {o.domain: o.version for o in model.opset_import}


def _check(model: onnx.ModelProto, what: str) -> None:
    from .onnx_io import check_model

    try:
        check_model(model)
    except Exception as exc:  # noqa: BLE001 - the checker raises several types
        raise ModelError(f"internal error: {what} fails the ONNX checker: {_first_line(exc)}") from exc


def _converter_version() -> str:
    try:
        from importlib.metadata import version

        return f"onnxconverter-common {version('onnxconverter-common')}"
    except Exception:  # noqa: BLE001
        return "onnxconverter-common"


def _converter_message(exc: BaseException) -> str:
    # the C++ assertion text: "...BaseConverter.h:66: adapter_lookup: Assertion `false` failed: No Adapter ..."
    text = _first_line(exc)
    return text.split("failed: ", 1)[-1] if "failed: " in text else text


def _num(samples: dict) -> int:
    return int(len(next(iter(samples.values())))) if samples else 0


def _rounded(heads: list) -> list:
    return [{k: (float(f"{v:.6g}") if isinstance(v, float) and math.isfinite(v) else v) for k, v in h.items()}
            for h in heads]


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
