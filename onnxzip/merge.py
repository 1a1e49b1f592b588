"""The Python API: `merge` runs the stages (graph analysis, calibration, solving, surgery, repair, verification).

Never a wrong model, never a lost file. The order of the work is part of the contract:

1. Pre-flight, cheapest first and before any model runs: the option values; the output path (an existing file is
   kept unless `force`); both models load and pass the ONNX checker and hold no NaN weights; the two graphs match
   node for node; the calibration data is readable, non-empty, finite and fits the model inputs (rank, shapes,
   dtypes). Each failure is one `onnxzip.errors` error naming the thing at fault, with its exit code.
2. Calibration, matching, surgery, statistics repair.
3. The result is checked before anything is written: no NaN (nor inf, unless an original holds inf) in any weight,
   the ONNX checker, and with `verify` the merged model against both originals on held-back samples.
4. The model and its card are written to temporary files beside the output and renamed into place together; on any
   failure (KeyboardInterrupt included) both temporary files go, and files that were there before are restored.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import numbers
import os
import re
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from . import __version__
from .calibration import (CalibrationData, FeatureRequest, calibration_from_arrays, collect_stats, input_specs,
                          load_calibration, run_model)
from .errors import (CalibrationDataError, ModelError, OutputError, UnsupportedModelError, UsageError,
                     VerificationError)
from .evaluate import count_parameters
from .graph import Analysis, analyse, match, trunk_nodes, unsupported_report
from .onnx_io import check_model
from .refit import REFIT_METHODS, refit as refit_layers
from .repair import REPAIR_TARGETS, repair as repair_statistics, repair_points
from .runtime import onnxruntime_errors
from .solver import solve_blocks
from .surgery import ZipPlan, build, merge_points, why_nothing_zipped, zipped_spaces

log = logging.getLogger("onnxzip")

METHODS = ("zip", "permute", "average", "ensemble")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)

# Verification (ISSUE 5). A head "computes nothing like" its original when BOTH hold on the held-back samples:
# - its relative error ||merged - original|| / ||original|| exceeds VERIFY_MAX_RELATIVE_ERROR (10: the outputs are
#   an order of magnitude further from the original than the original is from zero), and
# - its top-1 predictions agree with the original's no better than chance: Cohen's kappa, the agreement beyond what
#   two independent predictors with the same class frequencies would reach, is at most VERIFY_MAX_KAPPA.
# Either alone happens to honest merges (a full zip of two unrelated models may lose much accuracy; a merge that
# rescales logits keeps every prediction), both together only to a broken model. The run fails if any head is
# broken: a merged model with one head computing noise is a wrong model for that task.
VERIFY_MAX_RELATIVE_ERROR = 10.0
VERIFY_MAX_KAPPA = 0.1
# Held-back verification samples: a fifth of the data, at most this many.
VERIFY_MAX_SAMPLES = 256
# Correlations are rounded to this many decimals before matching. onnxruntime's threads may sum in another order
# from run to run, which moves statistics in their last bits; on a (near-)tie that could flip which pair the greedy
# zip or the assignment takes, and the same inputs would give another model. On the 1e-9 grid ties are exact and
# go to the lowest index; differences below 1e-9 carry no information about which features belong together.
CORRELATION_DECIMALS = 9
# Measured figures in the card are rounded to this many significant digits, so the card mirrored in the model's
# metadata (and so the model file) does not change with the last bits of onnxruntime's arithmetic either.
CARD_DIGITS = 6


@dataclass
class MergeResult:
    model: onnx.ModelProto
    output_path: str | None
    card: dict = field(default_factory=dict)

    def summary_lines(self) -> list:
        c = self.card
        lines = [f"merged with {c['method']}: {c['trunk']['weighted_layers_zipped']} of "
                 f"{c['trunk']['weighted_layers']} weighted layers in the shared trunk, "
                 f"{len(c['spaces'])} feature space(s) zipped"]
        lines.append(f"parameters: {c['parameters']['merged']:,} merged vs {c['parameters']['a']:,} + "
                     f"{c['parameters']['b']:,} in the two models")
        if c.get("zipped_nothing") and c["method"] != "ensemble" and c.get("stop_at") not in ("input", 0):
            lines.append(f"warning: NOTHING IS ZIPPED ({c['zipped_nothing_reason']}): the merged model is both models "
                         "side by side, at twice the cost of one")
        thin = [s["space"] for s in c.get("spaces", []) if s.get("thin_statistics")]
        if thin:  # the warning itself went to the log (stderr) as the merge found it
            lines.append(f"thin statistics in {len(thin)} feature space(s) (see stderr)")
        if c.get("unmerged"):
            lines.append(f"left unmerged: {len(c['unmerged'])} region(s) (see the card)")
        if c.get("repair", {}).get("layers"):
            lines.append(f"statistics repaired on {c['repair']['layers']} layer(s)")
        fitted = c.get("refit", {}).get("layers") or []
        if fitted:
            held = sorted(x["r2_held_back"] for x in fitted if x.get("r2_held_back") is not None)
            r2 = f", median held-back R² {held[len(held) // 2]:.3f}" if held else ""
            lines.append(f"refitted {len(fitted)} layer(s) by least squares in {c['refit']['passes']} onnxruntime "
                         f"pass(es){r2}")
        verification = c.get("verification") or {}
        if verification.get("heads"):
            held = "held-back" if verification.get("held_back") else "calibration"
            lines.append(f"verified on {verification['samples']} {held} sample(s):")
        for head in verification.get("heads", []):
            agree = head.get("top1_agreement")
            rel = head.get("relative_error")
            if "exact_match" in head:
                lines.append(f"  {head['output']}: equal to {head['model']}'s output on "
                             f"{_pct(head['exact_match'])} of the values")
                continue
            lines.append(f"  {head['output']}: top-1 agreement with {head['model']} "
                         f"{'n/a' if agree is None else f'{agree:.3f}'}, relative error "
                         f"{'n/a' if rel is None else f'{rel:.3g}'}")
        fp16 = c.get("fp16")
        if fp16:
            lines.append(f"float16: checked against the float32 merge on {fp16['samples']} {fp16['sample_source']} "
                         "sample(s):")
            for head in fp16["heads"]:
                lines.append(f"  {head['output']}: top-1 agreement {head['top1_agreement']:.4f}, max relative error "
                             f"{head['max_relative_error']:.3g}")
        if self.output_path:
            lines.append(f"wrote {self.output_path} and {self.output_path}.json")
        return lines


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


# ---------------------------------------------------------------------------------------------------------------
# Pre-flight
# ---------------------------------------------------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _check_flag(name: str, value) -> bool:
    if isinstance(value, (bool, np.bool_)) or (_is_int(value) and value in (0, 1)):
        return bool(value)
    raise UsageError(f"{name} must be True or False, got {value!r}")


def _check_options(method, alpha, beta, batch_size, num_samples, names, device, seed, progress) -> dict:
    """Validated, normalised option values (plain Python numbers, names as a tuple)."""
    if not isinstance(method, str) or method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not _is_real(alpha) or not math.isfinite(alpha):
        raise UsageError(f"--alpha must be a finite number, got {alpha!r}")
    if not _is_real(beta) or not 0 <= beta <= 1:
        raise UsageError(f"--beta must be between 0 and 1, got {beta!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise UsageError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
    if num_samples is not None and (not _is_int(num_samples) or num_samples < 2):
        raise UsageError(f"--num-samples must be a whole number >= 2, got {num_samples!r}")
    if isinstance(names, (list, tuple)):
        names = tuple(names)
    if (not isinstance(names, tuple) or len(names) != 2 or not all(isinstance(n, str) and _NAME.match(n) for n in names)
            or names[0] == names[1]):
        raise UsageError(f"--names must be two different names of letters, digits, '_', '.', '-', got {names!r}")
    if "zip" in names:
        raise UsageError("--names: 'zip' is the prefix of the shared trunk; choose other names")
    if not isinstance(device, str) or device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")
    if not _is_int(seed):
        raise UsageError(f"--seed must be a whole number, got {seed!r}")
    if not (isinstance(progress, (bool, np.bool_)) or callable(progress)):
        raise UsageError(f"progress must be True, False or a callable progress(done, total), got {progress!r}")
    return {"method": method, "alpha": float(alpha), "beta": float(beta), "batch_size": int(batch_size),
            "num_samples": None if num_samples is None else int(num_samples), "names": names, "device": device,
            "seed": int(seed), "progress": progress if callable(progress) else bool(progress)}


def _check_stop_at(stop_at):
    """None, 'heads', 'all', 'input' or a whole number K >= 0 (the range is checked once the model is read)."""
    if isinstance(stop_at, str) and stop_at.strip().lower() in ("heads", "all", "input"):
        return stop_at.strip().lower()
    if stop_at is None:
        return None
    k = None
    if _is_int(stop_at):
        k = int(stop_at)
    elif _is_real(stop_at) and math.isfinite(stop_at) and float(stop_at).is_integer():
        k = int(stop_at)
    elif isinstance(stop_at, str) and re.fullmatch(r"\s*[+-]?\d+\s*", stop_at):
        k = int(stop_at)
    if k is None or k < 0:
        raise UsageError(f"--stop-at must be 'input', 'heads' or a number of weighted layers >= 0, got {stop_at!r}")
    return k


def _check_logger(logger) -> logging.Logger:
    if logger is None:
        return log
    if not isinstance(logger, (logging.Logger, logging.LoggerAdapter)):
        raise UsageError(f"logger must be a logging.Logger, got {logger!r}")
    return logger


def _as_path(value, what: str, error) -> str:
    if isinstance(value, (str, bytes, os.PathLike)):
        try:
            path = os.fsdecode(value)
        except (TypeError, UnicodeError) as exc:
            raise error(f"{what} {value!r} is not a usable path: {exc}") from None
        if not isinstance(path, str):  # a PathLike whose __fspath__ returned something odd
            raise error(f"{what} {value!r} is not a usable path")
        if "\0" in path:
            raise error(f"{what} {path!r} is not a usable path (it holds a NUL character)")
        return path
    raise error(f"{what} must be a file path, got {type(value).__name__} {value!r}")


def _check_output(output, force: bool) -> str | None:
    """The output path, checked before any work: its folder exists and is writable, and neither the model file nor
    its card exists (unless `force`) nor is a directory."""
    if output is None:
        return None
    path = _as_path(output, "output", OutputError)
    if not path or path.endswith(("/", os.sep)) or os.path.basename(path) in (".", ".."):
        raise OutputError(f"output {path!r} is not a file name; give one such as merged.onnx")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path!r}: folder {folder!r} is not writable")
    for target, what in ((path, "output"), (path + ".json", "merge card")):
        if os.path.isdir(target):
            raise OutputError(f"{what} {target!r} is a directory; give another output file name")
        if os.path.lexists(target) and not force:
            raise OutputError(f"{what} {target!r} already exists; use --force to overwrite it")
    return path


def _same_file(p: str, q: str) -> bool:
    try:
        return os.path.samefile(p, q)
    except OSError:
        return os.path.realpath(p) == os.path.realpath(q)


def _load(model, what: str) -> tuple:
    """(checked ModelProto, path or None, sha256 of the file or of the serialised model)."""
    from .onnx_io import file_sha256, load_model, model_sha256
    if isinstance(model, onnx.ModelProto):
        try:
            check_model(model)
        except Exception as exc:  # noqa: BLE001 - the checker raises several types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{what} (an in-memory ModelProto) fails the ONNX checker: {first}") from exc
        return model, None, model_sha256(model)
    path = _as_path(model, what, ModelError)
    loaded = load_model(path, what)
    try:
        sha = file_sha256(path)
    except OSError as exc:
        raise ModelError(f"{what} {path!r} cannot be read: {exc.strerror or exc}") from exc
    return loaded, path, sha


def _check_weights(analysis: Analysis, label: str) -> bool:
    """Refuse NaN weights (they can only spread); return whether any weight is infinite (e.g. a -inf mask)."""
    has_inf = False
    for name, value in analysis.initializers.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fc":
            continue
        nan = int(np.isnan(value).sum())
        if nan:
            raise ModelError(f"{label}: initializer '{name}' holds {nan} NaN value(s); "
                             "a model with NaN weights cannot be merged")
        has_inf = has_inf or not np.isfinite(value).all()
    return has_inf


def _calibration(data, specs, num_samples, logger) -> CalibrationData:
    """Read and validate the calibration data (path, array, or dict input name -> array) against the inputs."""
    if isinstance(data, np.ndarray):
        return calibration_from_arrays(data, specs, num_samples, logger)
    if isinstance(data, dict):
        for key, value in data.items():
            if not isinstance(key, str):
                raise CalibrationDataError(f"calibration data: keys must be input names (str), got {key!r}")
            if not isinstance(value, np.ndarray):
                raise CalibrationDataError(f"calibration data for input {key!r} must be a numpy array, "
                                           f"got {type(value).__name__}")
        return calibration_from_arrays(data, specs, num_samples, logger)
    if isinstance(data, (str, bytes, os.PathLike)):
        return load_calibration(_as_path(data, "calibration data", CalibrationDataError), specs, num_samples, logger)
    raise CalibrationDataError("calibration data must be a .npy/.npz path, a numpy array or a dict input name -> "
                               f"array, got {type(data).__name__}")


def _fixed_batch(calib: CalibrationData) -> int:
    """The batch size the model fixes (1 where the batch dimension is dynamic)."""
    fixed = [s.shape[0] for s in calib.specs if s.shape and _is_int(s.shape[0]) and s.shape[0] > 0]
    return min(fixed) if fixed else 1


def _similarity(stats) -> np.ndarray:
    """The stacked correlation matrix of a feature space, ready for matching.

    Correlation says nothing about a constant feature (a dead ReLU, a saturated unit): it has correlation 0 with
    every other feature, so constants would be paired at random. Two constants of the same value are the same
    feature, though, and merging them loses nothing; they get similarity 1, like two perfectly correlated features
    (constants of different values keep 0). Rounded to CORRELATION_DECIMALS for determinism.
    """
    corr = stats.correlation()
    var, second = stats.variance(), stats.second_moment()
    # the rule of FeatureStats.correlation: std <= 1e-8, or a variance lost in float64 cancellation noise
    constant = np.flatnonzero((var <= 1e-16) | (var <= 1e-10 * second))
    if constant.size > 1:
        mean = stats.mean[constant]
        same = np.abs(mean[:, None] - mean[None, :]) <= 1e-6 * np.maximum(1.0, np.maximum(np.abs(mean)[:, None],
                                                                                          np.abs(mean)[None, :]))
        corr[np.ix_(constant, constant)] = np.where(same, 1.0, corr[np.ix_(constant, constant)])
    return np.round(corr, CORRELATION_DECIMALS)


def _rename_inputs(model: onnx.ModelProto, mapping: dict) -> onnx.ModelProto:
    """Copy of model B with its graph inputs named as model A's, so one feed serves both."""
    if all(k == v for k, v in mapping.items()):
        return model
    model = copy.deepcopy(model)
    for inp in model.graph.input:
        inp.name = mapping.get(inp.name, inp.name)
    for node in model.graph.node:
        for j, name in enumerate(node.input):
            if name in mapping:
                node.input[j] = mapping[name]
    return model




def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------------------------

def merge(model_a, model_b, data, output=None, *, method: str = "zip", alpha: float = 0.3, beta: float = 0.125,
          stop_at=None, num_samples: int | None = None, batch_size: int = 64, device: str = "auto",
          names=("a", "b"), seed: int = 0, force: bool = False, repair: bool = True, verify: bool = True,
          strict: bool = False, fold_batchnorm: bool = True, refit: str = "ls", repair_targets: str = "measured",
          fp16: bool = False, progress=False, logger: logging.Logger | None = None) -> MergeResult:
    """Merge two models of the same architecture trained on different tasks into one (ZipIt!).

    model_a, model_b: paths to .onnx files or onnx.ModelProto. data: a .npy/.npz path, a numpy array (one input)
    or a dict input name -> array, of unlabeled calibration inputs. output: where to write the merged model (and
    its card, `output + '.json'`); None writes nothing. method: zip | permute | average | ensemble. alpha, beta:
    ZipIt!'s knobs (paper defaults). stop_at: None/'heads' (zip everything but the task heads), 'input' or 0
    (nothing: the ensemble), or K (the first K weighted layers). The result's graph has the original inputs, then
    model A's outputs named '<names[0]>/<output>', then model B's.
    fold_batchnorm (default): fold every inference BatchNormalization into the Conv/Gemm before it first, so a
    BN-kept export merges exactly like the BN-folded one; False merges BatchNorm's parameters per channel instead
    (what the paper does with PyTorch state dicts; it changes what `average` computes, see docs/EXPORTERS.md).
    fp16: write the merged model in float16 (onnxconverter-common, float32 inputs and outputs kept), checked against
    the float32 merge on the held-back samples (the card's "fp16": top-1 agreement and max relative error per head);
    below `onnxzip.deploy.FP16_MIN_AGREEMENT` on a head it is a `VerificationError`, unless `force`.

    Every problem raises an `onnxzip.errors.OnnxzipError` subclass (whose `exit_code` the CLI returns) and leaves
    no file behind; problems with the options, files, models and data are found before any model runs.
    `verify` (default) fails the run with `VerificationError` if the merged model's outputs are not finite or a
    head computes nothing like its original (see VERIFY_MAX_RELATIVE_ERROR and VERIFY_MAX_KAPPA).
    """
    # 1. pre-flight, cheapest first
    logger = _check_logger(logger)
    times = {}
    t0 = time.perf_counter()
    opts = _check_options(method, alpha, beta, batch_size, num_samples, names, device, seed, progress)
    method, alpha, beta, batch_size = opts["method"], opts["alpha"], opts["beta"], opts["batch_size"]
    num_samples, names, device, progress = opts["num_samples"], opts["names"], opts["device"], opts["progress"]
    seed = opts["seed"]
    force, repair = _check_flag("force", force), _check_flag("repair", repair)
    verify, strict = _check_flag("verify", verify), _check_flag("strict", strict)
    fold_batchnorm = _check_flag("fold_batchnorm", fold_batchnorm)
    fp16 = _check_flag("fp16", fp16)
    stop_at = _check_stop_at(stop_at)
    if not isinstance(refit, str) or refit not in REFIT_METHODS:
        raise UsageError(f"--refit must be one of {', '.join(REFIT_METHODS)}, got {refit!r}")
    if not isinstance(repair_targets, str) or repair_targets not in REPAIR_TARGETS:
        raise UsageError(f"--repair-targets must be one of {', '.join(REPAIR_TARGETS)}, got {repair_targets!r}")
    output = _check_output(output, force)

    model_a, path_a, sha_a = _load(model_a, "model A")
    model_b, path_b, sha_b = _load(model_b, "model B")
    data_path = None if isinstance(data, (np.ndarray, dict)) else data
    if output is not None:
        sources = [(path_a, "model A"), (path_b, "model B")]
        if isinstance(data_path, (str, bytes, os.PathLike)):
            sources.append((_as_path(data_path, "calibration data", CalibrationDataError), "the calibration data"))
        for source, what in sources:
            if source is not None and os.path.exists(output) and _same_file(output, source):
                raise OutputError(f"output {output!r} is {what}; write the merged model to another file")
    label_a = path_a or names[0]
    label_b = path_b or names[1]
    a, b = analyse(model_a, fold_batchnorm), analyse(model_b, fold_batchnorm)
    inf_a = _check_weights(a, f"model A {label_a!r}")
    inf_b = _check_weights(b, f"model B {label_b!r}")
    corr = match(a, b, (label_a, label_b))
    unmerged = unsupported_report(a)
    if unmerged and strict:
        i, reason = unmerged[0]
        raise UnsupportedModelError(f"{label_a}: {a.describe_node(i)} cannot be merged: {reason} "
                                    f"({len(unmerged)} such node(s); without --strict they are left unmerged)")
    if isinstance(stop_at, int) and stop_at > len(a.weighted):
        raise UsageError(f"--stop-at {stop_at} is out of range: the model has {len(a.weighted)} weighted layers")
    for i, reason in unmerged:
        logger.warning("left unmerged from %s on: %s", a.describe_node(i), reason)
    trunk = set() if method == "ensemble" else trunk_nodes(a, stop_at)
    if method == "ensemble":
        nothing_zipped = "--method ensemble asks for both models side by side"
    elif stop_at in ("input", 0):
        nothing_zipped = f"--stop-at {stop_at} asks for both models side by side"
    else:
        nothing_zipped = why_nothing_zipped(a, trunk)
        if nothing_zipped is not None:
            # asked to zip, got an ensemble: never silently (issue 13, "say what happened")
            if strict:
                raise UnsupportedModelError(f"{label_a}: nothing can be zipped: {nothing_zipped}; the merged model "
                                            "would be both models side by side (without --strict it is written "
                                            "anyway, as that ensemble)")
            logger.warning("NOTHING IS ZIPPED: %s. The merged model is both models side by side (an ensemble, at "
                           "twice the cost of one); --strict makes this an error", nothing_zipped)

    specs = input_specs(a.model)
    calib = _calibration(data, specs, None, logger)
    if num_samples is not None and num_samples < calib.num_samples:
        # --seed picks which samples are used (and so which are held back to verify): a random subset, kept in
        # file order; the same seed picks the same samples
        calib = calib.subset(num_samples, seed)
    elif num_samples is not None and num_samples > calib.num_samples:
        logger.warning("%s: %d calibration samples asked for, but there are %d; using all of them", calib.path,
                       num_samples, calib.num_samples)
    fixed = _fixed_batch(calib)
    if calib.num_samples < max(2, fixed):
        raise CalibrationDataError(f"{calib.path}: {calib.num_samples} calibration sample(s); at least "
                                   f"{max(2, fixed)} are needed" + (f" (the model fixes its batch to {fixed})"
                                                                    if fixed > 1 else ""))
    # held back: to verify the result, and to choose the refit's ridge strengths
    holdout = min(VERIFY_MAX_SAMPLES, calib.num_samples // 5) if verify or refit == "ls" else 0
    holdout -= holdout % fixed  # whole batches only: a model with a fixed batch size skips a partial one
    if calib.num_samples - holdout < fixed:
        holdout = 0
    if verify and not holdout:
        logger.warning("%s: too few calibration samples (%d) to hold any back; verifying on the calibration "
                       "samples themselves", calib.path, calib.num_samples)
    calib_data, held_data = calib.split(holdout) if holdout else (calib, None)
    verify_data = held_data if verify else None
    b_model = _rename_inputs(b.model, corr.inputs)
    times["analyse"] = time.perf_counter() - t0

    # 2. statistics
    t = time.perf_counter()
    plan = ZipPlan(a, b, corr, trunk, {}, names)
    spaces = zipped_spaces(a, trunk)
    points = merge_points(a, trunk)
    requests = []
    for sid in spaces:
        for name in points[sid]:
            ts = a.tensor_spaces[name]
            requests.append(FeatureRequest(f"space:{sid}", [name, corr.tensors[name]], ts.axis, ts.expand))
    # the least-squares refit fits every layer the repair would correct (scale and shift included)
    do_repair = repair and refit == "none" and method != "ensemble" and bool(spaces)
    stats = {}
    if requests:
        logger.info("calibrating on %d samples (%d feature spaces)", calib_data.num_samples, len(spaces))
        try:
            stats = collect_stats([a.model, b_model], requests, calib_data, batch_size, device, progress=progress,
                                  desc="calibrating")
        except onnxruntime_errors() as exc:
            raise CalibrationDataError(f"{calib.path}: onnxruntime cannot run the models on the calibration data: "
                                       f"{_first_line(exc)}") from exc
    times["calibrate"] = time.perf_counter() - t

    # matching
    t = time.perf_counter()
    card_spaces = []
    for sid in spaces:
        width = a.spaces[sid].width
        key = f"space:{sid}"
        correlation = _similarity(stats[key]) if method in ("zip", "permute") else None
        matching = solve_blocks(method, correlation, width, a.spaces[sid].partition or 1, 2, alpha, beta)
        plan.matchings[sid] = matching
        samples = int(stats[key].count)
        # The 2F x 2F correlation of a space of width F needs more than 2F samples to be of full rank.
        thin = samples < 2 * width
        if thin:
            logger.warning("feature space %d (width %d, at %s) has only %d samples for %d stacked features: its "
                           "statistics are too thin to trust; give more calibration samples", sid, width,
                           ", ".join(points[sid]), samples, 2 * width)
        card_spaces.append({"space": sid, "width": width, "blocks": a.spaces[sid].blocks,
                            "merge_points": list(points[sid]), "samples": samples,
                            "thin_statistics": thin,
                            "cross_model_merges": int(matching.cross_merges),
                            "within_model_merges": [int(x) for x in matching.within_merges],
                            "forced_merges": int(getattr(matching, "forced_merges", 0)),
                            "mean_merged_correlation": _measured(matching.mean_merge_correlation)})
    times["solve"] = time.perf_counter() - t

    t = time.perf_counter()
    surgery = build(plan)
    times["surgery"] = time.perf_counter() - t
    repair_summary = {"applied": False}
    if repair and refit != "none":
        repair_summary["superseded_by_refit"] = True
    if do_repair:
        t = time.perf_counter()
        logger.info("repairing statistics of %d layers", len(repair_points(a, trunk)))
        try:
            repair_summary = repair_statistics(plan, surgery, calib_data, [a.model, b_model], batch_size, device,
                                               target_kind=repair_targets)
        except onnxruntime_errors() as exc:
            raise VerificationError(f"internal error: the merged model does not run in onnxruntime during "
                                    f"statistics repair: {_first_line(exc)}") from exc
        repair_summary["applied"] = True
        times["repair"] = time.perf_counter() - t
    refit_summary = {"applied": False, "method": refit}
    if refit == "ls" and method != "ensemble" and spaces:
        t = time.perf_counter()
        logger.info("refitting the merged layers by least squares")
        try:
            # rows are subsampled with a fixed seed: --seed only picks the calibration samples
            refit_summary = refit_layers(plan, surgery, calib_data, held_data, [a.model, b_model], batch_size,
                                         device, seed=0, progress=progress, logger=logger)
        except onnxruntime_errors() as exc:
            raise VerificationError(f"internal error: the merged model does not run in onnxruntime during the "
                                    f"least-squares refit: {_first_line(exc)}") from exc
        times["refit"] = time.perf_counter() - t
    merged = surgery.model

    # 3. checks on the result
    _check_merged_weights(merged, allow_inf=inf_a or inf_b)
    try:
        check_model(merged)
    except Exception as exc:  # noqa: BLE001 - the checker raises several types
        raise ModelError(f"internal error: the merged model fails the ONNX checker: {_first_line(exc)}") from exc
    verification = {}
    if verify:
        t = time.perf_counter()
        verification = _verify(merged, [a.model, b_model], names, verify_data or calib_data, batch_size, device)
        verification["held_back"] = verify_data is not None
        times["verify"] = time.perf_counter() - t
        for head in verification["heads"]:
            logger.debug("verify %s against %s: %s", head["output"], head["model"],
                         ", ".join(f"{k} {v}" for k, v in head.items() if k not in ("output", "model")))

    fp16_check = None
    if fp16:
        from .deploy import check_fp16, to_fp16

        t = time.perf_counter()
        half = to_fp16(merged)
        check_data = held_data or calib_data
        samples = {k: np.asarray(v) for k, v in check_data.arrays.items()}
        fp16_check = check_fp16(merged, half, samples, "held-back" if held_data is not None else "calibration",
                                force, batch_size, device, logger)
        merged = half
        times["fp16"] = time.perf_counter() - t

    card = {
        "tool": "onnxzip", "version": __version__,
        "inputs": {names[0]: {"path": path_a, "sha256": sha_a}, names[1]: {"path": path_b, "sha256": sha_b}},
        "method": method, "alpha": alpha, "beta": beta, "stop_at": stop_at, "seed": seed,
        "options": {"repair": repair, "repair_targets": repair_targets, "refit": refit, "verify": verify, "strict": strict, "fold_batchnorm": fold_batchnorm,
                    "batchnorms_folded": [a.folded_batchnorms, b.folded_batchnorms], "num_samples": num_samples,
                    "batch_size": batch_size, "device": device, "names": list(names), "fp16": fp16},
        "calibration": {"source": None if data_path is None else os.fsdecode(data_path),
                        "samples": calib_data.num_samples, "verification_samples": holdout if verify else 0,
                        "held_back_samples": holdout},
        "trunk": {"weighted_layers": len(a.weighted),
                  "weighted_layers_zipped": sum(1 for i in a.weighted if i in trunk),
                  "nodes": len(trunk), "task_heads": [a.nodes[i].name for i in a.heads]},
        "unmerged": [{"node": a.nodes[i].name, "op": a.nodes[i].op_type, "reason": r} for i, r in unmerged],
        "zipped_nothing": nothing_zipped is not None,
        "zipped_nothing_reason": nothing_zipped,
        "spaces": card_spaces,
        "parameters": {"merged": count_parameters(merged), "a": count_parameters(model_a),
                       "b": count_parameters(model_b)},
        "repair": _round_figures(repair_summary),
        "refit": _round_refit(refit_summary),
        "verification": verification,
        "fp16": fp16_check,
    }
    card = _plain(card)
    # Wall times stay out of the model's metadata: the same inputs and seed must give a byte-identical model.
    merged.metadata_props.add(key="onnxzip.card", value=json.dumps(card, sort_keys=True, allow_nan=False))
    times["total"] = time.perf_counter() - t0
    card["seconds"] = {k: round(v, 3) for k, v in times.items()}
    if output is not None:
        _write(merged, json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n", output, force)
    return MergeResult(merged, output, card)


# ---------------------------------------------------------------------------------------------------------------
# Checks on the result
# ---------------------------------------------------------------------------------------------------------------

def _check_merged_weights(model: onnx.ModelProto, allow_inf: bool) -> None:
    """No NaN can reach a weight; inf only where an original holds inf too (a -inf mask, an unbounded Clip)."""
    for init in model.graph.initializer:
        if init.data_type not in _FLOAT_TYPES:
            continue
        value = numpy_helper.to_array(init)
        nan = int(np.isnan(value).sum())
        inf = int(np.isinf(value).sum())
        if nan or (inf and not allow_inf):
            raise VerificationError(f"internal error: weight '{init.name}' of the merged model holds {nan} NaN and "
                                    f"{inf} infinite value(s); nothing was written (please report this)")


def _kappa(got: np.ndarray, want: np.ndarray) -> tuple:
    """(top-1 agreement, Cohen's kappa) of two (samples, classes) score arrays."""
    pg, pw = got.argmax(1), want.argmax(1)
    agreement = float(np.mean(pg == pw))
    k = got.shape[1]
    chance = float(np.dot(np.bincount(pg, minlength=k), np.bincount(pw, minlength=k))) / (len(pg) ** 2)
    if chance >= 1.0:  # both always predict the one same class: they agree completely
        return agreement, 1.0
    return agreement, (agreement - chance) / (1.0 - chance)


def _verify(merged, models, names, data: CalibrationData, batch_size, device) -> dict:
    """Per head: top-1 agreement, Cohen's kappa and relative error of the merged model against the original it
    stands for. Raises VerificationError on non-finite outputs or a head that computes nothing like its original."""
    try:
        out = run_model(merged, data, batch_size, device)
    except onnxruntime_errors() as exc:
        raise VerificationError(f"the merged model does not run in onnxruntime: {_first_line(exc)}") from exc
    heads, broken = [], []
    for m, model in enumerate(models):
        ref = run_model(model, data, batch_size, device)
        for o in model.graph.output:
            name = f"{names[m]}/{o.name}"
            got, want = out[name], ref[o.name]
            if got.shape != want.shape:
                raise VerificationError(f"the merged model's output '{name}' has shape {got.shape} on held-back "
                                        f"samples, the original's '{o.name}' has {want.shape}")
            if got.dtype.kind not in "fc":
                heads.append({"output": name, "model": names[m], "exact_match": _measured(np.mean(got == want))})
                continue
            if not np.isfinite(got).all():
                raise VerificationError(f"the merged model's output '{name}' is not finite (NaN or inf) "
                                        "on held-back calibration samples")
            g = got.reshape(len(got), -1).astype(np.float64)
            w = want.reshape(len(want), -1).astype(np.float64)
            rel = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-12))
            agreement, kappa = _kappa(g, w) if len(g) else (1.0, 1.0)
            heads.append({"output": name, "model": names[m], "top1_agreement": _measured(agreement),
                          "kappa": _measured(kappa), "relative_error": _measured(rel)})
            if rel > VERIFY_MAX_RELATIVE_ERROR and kappa <= VERIFY_MAX_KAPPA:
                broken.append(f"'{name}' (relative error {rel:.3g}, top-1 agreement {agreement:.3f}, "
                              f"kappa {kappa:.2f})")
    if broken:
        raise VerificationError(
            f"the merged model computes nothing like the original on {', '.join(broken)}: relative error above "
            f"{VERIFY_MAX_RELATIVE_ERROR:g} and top-1 agreement no better than chance (kappa <= {VERIFY_MAX_KAPPA:g}) "
            "on held-back samples; nothing was written. Try --stop-at with fewer layers, --method permute, or "
            "--no-verify to keep it anyway")
    return {"samples": int(data.num_samples), "heads": heads}


# ---------------------------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------------------------

def _measured(x):
    """A measured figure for the card: CARD_DIGITS significant digits, None for NaN or inf (JSON has neither)."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{CARD_DIGITS}g}")


def _round_refit(summary: dict) -> dict:
    out = _round_figures(summary)
    if "layers" in out:
        out["layers"] = [_round_figures(layer) for layer in out["layers"]]
    return out


def _round_figures(summary: dict) -> dict:
    return {k: _measured(v) if isinstance(v, (float, np.floating)) else v for k, v in summary.items()}


def _plain(x):
    """JSON-ready copy: numpy scalars to Python, tuples to lists, non-finite floats to None."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        return float(x) if math.isfinite(x) else None
    return x


# ---------------------------------------------------------------------------------------------------------------
# Writing: model and card together
# ---------------------------------------------------------------------------------------------------------------

def _temp_file(folder: str, name: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes 0600 files; give the output the permissions a plain open() would have
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def _remove(path) -> None:
    try:
        if path:
            os.remove(path)
    except OSError:
        pass


def _write(model: onnx.ModelProto, card_text: str, output: str, force: bool) -> None:
    """Write the model and its card so that both appear together or neither does.

    Both are written in full to temporary files in the target folder, then renamed into place. If anything fails
    (KeyboardInterrupt included), the temporary files are removed, a file this run put in place is removed, and a
    file that `force` was replacing is restored from a hard link kept until both renames are done.
    """
    from .onnx_io import EXTERNAL_DATA_THRESHOLD, save_model_atomic
    folder, name = os.path.split(os.path.abspath(output))
    card_path = output + ".json"
    temps, backups, placed = [], {}, []
    try:
        try:
            card_tmp = _temp_file(folder, name + ".json")
            temps.append(card_tmp)
            with open(card_tmp, "w", encoding="utf-8") as f:
                f.write(card_text)
                f.flush()
                os.fsync(f.fileno())
            if model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
                # The weights go to a side file named after the model, so save_model_atomic writes the model under
                # its final name (atomically); only the card is renamed after it.
                existed = os.path.lexists(output)
                save_model_atomic(model, output, force=force)
                if not existed:
                    placed.append(output)
                pairs = [(card_tmp, card_path)]
            else:
                model_tmp = _temp_file(folder, name)
                temps.append(model_tmp)
                save_model_atomic(model, model_tmp, force=True)
                pairs = [(model_tmp, output), (card_tmp, card_path)]
            for _, final in pairs:
                if os.path.lexists(final):
                    if not force:  # appeared while we were working
                        raise OutputError(f"{final!r} appeared while merging; use --force to overwrite it")
                    backups[final] = _backup(folder, final)
            for tmp, final in pairs:
                os.replace(tmp, final)
                temps.remove(tmp)
                placed.append(final)
        except OSError as exc:
            raise OutputError(f"cannot write {output!r}: {exc.strerror or exc}") from exc
    except BaseException:
        for final in placed:
            if backups.get(final):
                try:
                    os.replace(backups.pop(final), final)
                except OSError:
                    pass
            else:
                _remove(final)
        for tmp in temps:
            _remove(tmp)
        for backup in backups.values():
            _remove(backup)
        raise
    for backup in backups.values():
        _remove(backup)


def _backup(folder: str, path: str) -> str | None:
    """A hard link to `path` under a temporary name (None where the file system has no hard links)."""
    for _ in range(100):
        candidate = os.path.join(folder, f".{os.path.basename(path)}.{os.urandom(6).hex()}.old")
        try:
            os.link(path, candidate)
            return candidate
        except FileExistsError:
            continue
        except OSError:
            return None
    return None
