"""The Python API: `merge_models` (and its two-model form `merge`) runs the stages: read and analyse the models,
calibrate, match, rewrite (surgery), refit or repair, verify, write the model and its card.

Never a wrong model, never a lost file. The order of the work is part of the contract:

1. Pre-flight, cheapest first and before any model runs: the option values (`MergeOptions.checked`); the output
   path (an existing file is kept unless `force`); every model loads, passes the ONNX checker and holds no NaN
   weights; every graph matches model 0's node for node (the message names the model at fault); the calibration
   data is readable, non-empty, finite and fits the model inputs (rank, shapes, dtypes); a `budget` that no stop
   point reaches. Each failure is one `onnxzip.errors` error naming the thing at fault, with its exit code.
2. Calibration, matching, surgery, least-squares refit or statistics repair (under a budget: for each candidate).
3. The result is checked before anything is written: no NaN (nor inf, unless an original holds inf) in any weight,
   the ONNX checker, and with `verify` the merged model against every original on held-back samples.
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
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from . import __version__
from .calibration import (CalibrationData, FeatureRequest, SourceRun, StatsSampling, calibration_from_arrays,
                          deferred_stats, input_specs, load_calibration, run_model, run_sources)
from .errors import (CalibrationDataError, ModelError, OnnxzipError, OutputError, UnsupportedModelError, UsageError,
                     VerificationError)
from .evaluate import count_macs, count_parameters
from .graph import Analysis, analyse, averaged_report, match, shape_batch, stop_points, trunk_nodes, unsupported_report
from .onnx_io import check_model
from .refit import REFIT_METHODS, refit as refit_layers, spill_room, target_row_requests
from .repair import REPAIR_TARGETS, repair as repair_statistics, repair_points
from .runtime import onnxruntime_errors
from .solver import block_labels, match_blocks, matching_from_clusters, solve_blocks
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
# Correlation statistics from a seeded subsample of rows where a space has far more rows (samples x positions) than
# it needs (calibration.StatsSampling: about max(100,000, 1,000 x stacked width) rows per merge point).
STATS_SAMPLING = StatsSampling()
# Seeds the rows the refit draws (--seed only picks the calibration samples).
REFIT_SEED = 0
# The feature statistics held at once at most (each space's (N·F)² float64 co-moment): beyond it the spaces are
# calibrated in groups, each group solved and dropped before the next (`_source_pass`): the later groups' features
# go to a temporary file in the one pass of the sources and are added from it after (a pass per group where the
# file has no room, and under --ray). A ViT-B/16 pair's 25 spaces take 5.4 GB: three groups.
STATS_BYTES = 2 << 30
# The activations a batch of the source pass holds at most (every model's merge points and layer inputs and outputs,
# float32): beyond it the merge runs in smaller batches than --batch-size (`_fitting_batch_size`). A ResNet-50 pair at
# 224×224 exposes 153 MB a sample: 9.8 GB a batch of 64.
ACTIVATION_BYTES = 2 << 30


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
        sizes = [v for k, v in c["parameters"].items() if k != "merged"]
        lines.append(f"parameters: {c['parameters']['merged']:,} merged vs {' + '.join(f'{v:,}' for v in sizes)} in "
                     f"the {'two' if len(sizes) == 2 else len(sizes)} models")
        budget = c.get("budget")
        if budget:
            chosen = budget["chosen"]
            lines.append(f"budget {budget['kind']}={budget['fraction']:g}: chose stop at {chosen['stop_at']}, width "
                         f"{chosen['width']:g} ({chosen['fraction']} of the ensemble's {budget['kind']}) of "
                         f"{len(budget['candidates'])} tried")
        elif c.get("width", 1) != 1:
            lines.append(f"width {c['width']:g}: each zipped feature space keeps round({c['width']:g}·F) features")
        if c.get("zipped_nothing") and c["method"] != "ensemble" and c.get("stop_at") not in ("input", 0):
            n = c.get("num_models", 2)
            lines.append(f"warning: NOTHING IS ZIPPED ({c['zipped_nothing_reason']}): the merged model is "
                         f"{_side_by_side(n)}, at {'twice' if n == 2 else f'{n} times'} the cost of one")
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
            large = sum(1 for x in fitted if str(x.get("skipped", "")).startswith("too large"))
            kept = f"; {large} too large to refit kept surgery's weights (see the card)" if large else ""
            lines.append(f"refitted {len(fitted) - large} layer(s) by least squares in {c['refit']['passes']} "
                         f"onnxruntime pass(es){r2}{kept}")
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


def default_names(num_models: int) -> tuple:
    """a, b, c, …, z, then m26, m27, …: the default names of N models."""
    return tuple(chr(ord("a") + m) if m < 26 else f"m{m}" for m in range(num_models))


def _check_names(names, num_models: int) -> tuple:
    if names is None:
        return default_names(num_models)
    if isinstance(names, str):
        names = tuple(n.strip() for n in names.split(","))
    if isinstance(names, list):
        names = tuple(names)
    if (not isinstance(names, tuple) or len(names) != num_models
            or not all(isinstance(n, str) and _NAME.match(n) for n in names) or len(set(names)) != num_models):
        raise UsageError(f"--names must be {num_models} different names (one per model) of letters, digits, '_', "
                         f"'.', '-', got {names!r}")
    if "zip" in names:
        raise UsageError("--names: 'zip' is the prefix of the shared trunk; choose other names")
    return names


@dataclass(frozen=True)
class Budget:
    """A cost budget: `fraction` of the N-model ensemble's parameters ('params') or multiply-accumulates ('macs')."""

    kind: str
    fraction: float

    def __str__(self) -> str:
        return f"{self.kind}={self.fraction:g}"


BUDGET_KINDS = ("params", "macs")


def parse_budget(value) -> Budget | None:
    """None, a `Budget`, 'macs=R' / 'params=R' or a (kind, R) pair, R > 0 a fraction of the ensemble's cost."""
    if value is None:
        return None
    kind = fraction = None
    if isinstance(value, Budget):
        kind, fraction = value.kind, value.fraction
    elif isinstance(value, str):
        text, sep, number = value.strip().partition("=")
        kind = text.strip().lower()
        try:
            fraction = float(number) if sep else None
        except ValueError:
            pass
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        kind, fraction = value
    if (kind not in BUDGET_KINDS or not _is_real(fraction) or not math.isfinite(fraction) or fraction <= 0):
        raise UsageError(f"--budget must be params=R or macs=R with R > 0 a fraction of the ensemble's cost "
                         f"(e.g. macs=0.5), got {value!r}")
    return Budget(kind, float(fraction))


@dataclass(frozen=True)
class MergeOptions:
    """Every option of a merge, validated and normalised once (`MergeOptions.checked`); see `merge_models`."""

    num_models: int = 2
    method: str = "zip"
    alpha: float = 0.3
    beta: float = 0.125
    stop_at: object = None
    width: float = 1.0
    budget: Budget | None = None
    num_samples: int | None = None
    batch_size: int = 64
    device: str = "auto"
    names: tuple = ("a", "b")
    seed: int = 0
    force: bool = False
    repair: bool = True
    verify: bool = True
    strict: bool = False
    fold_batchnorm: bool = True
    refit: str = "ls"
    repair_targets: str = "measured"
    fp16: bool = False
    progress: object = False
    ray: str | None = None
    ray_workers: int | None = None

    @classmethod
    def checked(cls, num_models: int, *, method="zip", alpha=0.3, beta=0.125, stop_at=None, width=None, budget=None,
                num_samples=None, batch_size=64, device="auto", names=None, seed=0, force=False, repair=True,
                verify=True, strict=False, fold_batchnorm=True, refit="ls", repair_targets="measured", fp16=False,
                progress=False, ray=None, ray_workers=None) -> "MergeOptions":
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
        names = _check_names(names, num_models)
        if not isinstance(device, str) or device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")
        if not _is_int(seed):
            raise UsageError(f"--seed must be a whole number, got {seed!r}")
        if not (isinstance(progress, (bool, np.bool_)) or callable(progress)):
            raise UsageError(f"progress must be True, False or a callable progress(done, total), got {progress!r}")
        if not isinstance(refit, str) or refit not in REFIT_METHODS:
            raise UsageError(f"--refit must be one of {', '.join(REFIT_METHODS)}, got {refit!r}")
        if not isinstance(repair_targets, str) or repair_targets not in REPAIR_TARGETS:
            raise UsageError(f"--repair-targets must be one of {', '.join(REPAIR_TARGETS)}, got {repair_targets!r}")
        if ray is not None and (not isinstance(ray, str) or not ray.strip()):
            raise UsageError(f"--ray must be 'local', 'auto' or a Ray cluster address, got {ray!r}")
        if ray_workers is not None and (not _is_int(ray_workers) or ray_workers < 1):
            raise UsageError(f"--ray-workers must be a whole number >= 1, got {ray_workers!r}")
        if ray_workers is not None and ray is None:
            raise UsageError("--ray-workers needs --ray (local, auto or a cluster address)")
        stop_at = _check_stop_at(stop_at)
        budget = parse_budget(budget)
        if width is not None and (not _is_real(width) or not math.isfinite(width) or not 1 <= width <= num_models):
            raise UsageError(f"--width must be a number between 1 and the number of models ({num_models}), "
                             f"got {width!r}")
        if width is not None and float(width) != 1.0 and method != "zip":
            raise UsageError(f"--width {width:g} keeps more merged features than one model has, which only "
                             f"--method zip can do (--method {method} keeps one model's width)")
        if budget is not None:
            if method == "ensemble":
                raise UsageError("--budget chooses how far to zip; --method ensemble zips nothing")
            if stop_at is not None or width is not None:
                raise UsageError("--budget chooses the stop point and the width itself; give --budget, or "
                                 "--stop-at/--width, not both")
        return cls(num_models=num_models, method=method, alpha=float(alpha), beta=float(beta), stop_at=stop_at,
                   width=1.0 if width is None else float(width), budget=budget, num_samples=None if num_samples is None
                   else int(num_samples), batch_size=int(batch_size), device=device, names=names, seed=int(seed),
                   force=_check_flag("force", force), repair=_check_flag("repair", repair),
                   verify=_check_flag("verify", verify), strict=_check_flag("strict", strict),
                   fold_batchnorm=_check_flag("fold_batchnorm", fold_batchnorm), refit=refit,
                   repair_targets=repair_targets, fp16=_check_flag("fp16", fp16),
                   progress=progress if callable(progress) else bool(progress),
                   ray=None if ray is None else ray.strip(), ray_workers=None if ray_workers is None
                   else int(ray_workers))


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


def _load(model, what: str, weights) -> tuple:
    """(checked ModelProto, path or None, sha256 of the file or of the serialised model). A model stored with
    external data keeps its weights in their file (mapped); a larger one than MAPPED_THRESHOLD has its weights
    written to a file of `weights` (an `onnx_io.WeightFolder`) and mapped from there."""
    from .onnx_io import (MAPPED_THRESHOLD, file_sha256, has_mapped_weights, load_model, map_weights, model_sha256,
                          weight_bytes)
    if isinstance(model, onnx.ModelProto):
        try:
            check_model(model)
        except Exception as exc:  # noqa: BLE001 - the checker raises several types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{what} (an in-memory ModelProto) fails the ONNX checker: {first}") from exc
        sha = model_sha256(model)
        if weight_bytes(model) > MAPPED_THRESHOLD:
            model = map_weights(model, weights.new_file(what.replace(" ", "-")))
        return model, None, sha
    path = _as_path(model, what, ModelError)
    loaded = load_model(path, what, mapped=True)
    try:
        sha = file_sha256(path)
    except OSError as exc:
        raise ModelError(f"{what} {path!r} cannot be read: {exc.strerror or exc}") from exc
    if not has_mapped_weights(loaded) and weight_bytes(loaded) > MAPPED_THRESHOLD:
        loaded = map_weights(loaded, weights.new_file(what.replace(" ", "-")))  # the protobuf copy is dropped here
    return loaded, path, sha


def _count_bad(value: np.ndarray) -> tuple:
    """(NaN count, infinite count) of a float array, a slice at a time (a mapped weight is never copied whole)."""
    flat = value.reshape(-1)
    nan = inf = 0
    step = 1 << 24
    for lo in range(0, flat.size, step):
        part = flat[lo:lo + step]
        nan += int(np.isnan(part).sum())
        inf += int(np.isinf(part).sum())
    return nan, inf


def _check_weights(analysis: Analysis, label: str) -> bool:
    """Refuse NaN weights (they can only spread); return whether any weight is infinite (e.g. a -inf mask)."""
    has_inf = False
    for name, value in analysis.initializers.items():
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "fc":
            continue
        nan, inf = _count_bad(value)
        if nan:
            raise ModelError(f"{label}: initializer '{name}' holds {nan} NaN value(s); "
                             "a model with NaN weights cannot be merged")
        has_inf = has_inf or inf > 0
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
    constant = np.flatnonzero(stats.constant())
    if constant.size > 1:
        # equal to 1e-6 of the larger value or of the space's rms, whichever is larger: no absolute floor, so that
        # a space of tiny features (std 1e-9 in a randomly initialised deep network) is not one of equal constants
        mean = stats.mean[constant]
        scale = float(np.sqrt(np.mean(stats.second_moment())))
        size = np.maximum(np.maximum(np.abs(mean)[:, None], np.abs(mean)[None, :]), scale)
        same = np.abs(mean[:, None] - mean[None, :]) <= 1e-6 * size
        corr[np.ix_(constant, constant)] = np.where(same, 1.0, corr[np.ix_(constant, constant)])
    return np.round(corr, CORRELATION_DECIMALS, out=corr)


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

def merge(model_a, model_b, data, output=None, **options) -> MergeResult:
    """Merge two models of the same architecture trained on different tasks into one (ZipIt!): the two-model form
    of `merge_models` (``merge(a, b, data, out, **options)`` is ``merge_models([a, b], data, out, **options)``)."""
    return merge_models([model_a, model_b], data, output, **options)


def merge_models(models, data, output=None, *, method: str = "zip", alpha: float = 0.3, beta: float = 0.125,
                 stop_at=None, width: float | None = None, budget=None, num_samples: int | None = None,
                 batch_size: int = 64, device: str = "auto", names=None, seed: int = 0, force: bool = False,
                 repair: bool = True, verify: bool = True, strict: bool = False, fold_batchnorm: bool = True,
                 refit: str = "ls", repair_targets: str = "measured", fp16: bool = False, progress=False,
                 ray: str | None = None, ray_workers: int | None = None,
                 logger: logging.Logger | None = None) -> MergeResult:
    """Merge N >= 2 models of the same architecture trained on different tasks into one (ZipIt!).

    models: a list of paths to .onnx files or onnx.ModelProto; the first is the reference every other is matched to
    node for node (task heads may differ in their number of classes). data: a .npy/.npz path, a numpy array (one
    input) or a dict input name -> array, of unlabeled calibration inputs. output: where to write the merged model
    (and its card, `output + '.json'`); None writes nothing. method: zip | permute | average | ensemble. alpha, beta:
    ZipIt!'s knobs (paper defaults; beta is each model's budget of same-model merges). stop_at: None/'heads' (zip
    everything but the task heads), 'input' or 0 (nothing: the ensemble), or K (the first K weighted layers).
    width (zip only, 1 <= W <= N, default 1): every zipped feature space keeps round(W·F) merged features instead
    of F, between one model's cost (1) and the ensemble's (N). budget: 'params=R' or 'macs=R' (R a fraction of the
    N-model ensemble's cost): onnxzip chooses the stop point and width that fit it and keep the merged heads closest
    to the original models' outputs on the held-back samples (no labels); the card's "budget" says what was chosen.
    names: one per model (default a, b, c, …). The result's graph has the original inputs, then model 0's outputs
    named '<names[0]>/<output>', then model 1's, and so on.
    fold_batchnorm (default): fold every inference BatchNormalization into the Conv/Gemm before it first, so a
    BN-kept export merges exactly like the BN-folded one; False merges BatchNorm's parameters per channel instead
    (what the paper does with PyTorch state dicts; it changes what `average` computes, see docs/EXPORTERS.md).
    fp16: write the merged model in float16 (onnxconverter-common, float32 inputs and outputs kept), checked against
    the float32 merge on the held-back samples (the card's "fp16": top-1 agreement and max relative error per head);
    below `onnxzip.deploy.FP16_MIN_AGREEMENT` on a head it is a `VerificationError`, unless `force`.

    ray: shard the pass of the source models over the calibration samples (statistics, the refit's targets,
    verification's references) over the workers of a Ray cluster: 'local' (a private local cluster with
    `ray_workers` CPUs), 'auto' (the cluster Ray finds, else a local one) or a cluster address; `ray_workers`
    shards (default: one per CPU of the cluster). The merge equals the single-process one to float64 rounding
    (`pip install 'onnxzip[distributed]'`).

    Every problem raises an `onnxzip.errors.OnnxzipError` subclass (whose `exit_code` the CLI returns) and leaves
    no file behind; problems with the options, files, models and data are found before any model runs.
    `verify` (default) fails the run with `VerificationError` if the merged model's outputs are not finite or a
    head computes nothing like its original (see VERIFY_MAX_RELATIVE_ERROR and VERIFY_MAX_KAPPA).
    """
    # 1. pre-flight, cheapest first: options, output path, models, structure, calibration data, budget
    logger = _check_logger(logger)
    times = {}
    t0 = time.perf_counter()
    if isinstance(models, (str, bytes, os.PathLike, onnx.ModelProto)) or not hasattr(models, "__len__"):
        raise UsageError(f"models must be a list of model paths or ModelProtos, got {type(models).__name__}")
    models = list(models)
    if len(models) < 2:
        raise UsageError(f"merging needs at least two models, got {len(models)}")
    opts = MergeOptions.checked(len(models), method=method, alpha=alpha, beta=beta, stop_at=stop_at, width=width,
                                budget=budget, num_samples=num_samples, batch_size=batch_size, device=device,
                                names=names, seed=seed, force=force, repair=repair, verify=verify, strict=strict,
                                fold_batchnorm=fold_batchnorm, refit=refit, repair_targets=repair_targets, fp16=fp16,
                                progress=progress, ray=ray, ray_workers=ray_workers)
    output = _check_output(output, opts.force)
    from .onnx_io import WeightFolder
    # the weight files of large models go beside the output (the disk it is written to), else to the temporary folder
    weights = WeightFolder(os.path.dirname(os.path.abspath(output)) if output is not None else None)
    try:
        return _merge(models, data, output, opts, logger, times, t0, weights)
    finally:
        weights.close()


def _merge(models: list, data, output, opts: MergeOptions, logger, times: dict, t0: float, weights) -> MergeResult:
    """The stages of `merge_models`, its options and output path checked; `weights`: the merge's WeightFolder."""
    sources = read_models(models, data, output, opts, weights)
    unmerged = _check_structure(sources, opts, logger)
    samples = _read_samples(data, sources, opts, logger)
    plans = [(opts.stop_at, opts.width)]
    budget_report = None
    if opts.budget is not None:
        frontier, ensemble_cost = budget_frontier(sources, opts, samples.input_shapes)
        plans = [(c["stop_at"], c["width"]) for c in _spread(frontier, BUDGET_CANDIDATES)]
        budget_report = {"kind": opts.budget.kind, "fraction": opts.budget.fraction, "ensemble_cost": ensemble_cost,
                         "frontier": frontier}
        logger.info("--budget %s: %d configuration(s) fit (%s of the ensemble's %s); trying %d", opts.budget,
                    len(frontier), opts.budget.fraction, f"{ensemble_cost:,} {opts.budget.kind}", len(plans))
    trunks = {stop: _trunk(sources, opts, stop) for stop, _ in plans}
    nothing_zipped = _nothing_zipped(sources, opts, trunks[plans[0][0]], logger)
    asked_batch = opts.batch_size
    opts = replace(opts, batch_size=_fitting_batch_size(sources, samples, list(trunks.values()), opts, logger))
    times["analyse"] = time.perf_counter() - t0

    # 2. one pass of every model over the samples (in groups of spaces beyond STATS_BYTES): statistics (for every
    # trunk to try), the refit's targets and verification's references; each group's spaces are matched as soon as
    # their statistics are in
    solved = {plan: {} for plan in plans}

    def solve(stats):
        t_solve = time.perf_counter()
        for stop, w in plans:
            solved[(stop, w)].update(solve_spaces(sources, trunks[stop], w, stats, opts, logger))
        times["solve"] = times.get("solve", 0.0) + time.perf_counter() - t_solve

    t = time.perf_counter()
    run = _source_pass(sources, samples, list(trunks.values()), [w for _, w in plans], opts, logger, solve)
    times["calibrate"] = time.perf_counter() - t - times.get("solve", 0.0)

    # 3. surgery, repair or refit (per configuration to try, under a budget)
    if budget_report is None:
        stop, w = plans[0]
        zipped = zip_models(sources, samples, trunks[stop], w, run, opts, logger, times, solved[plans[0]])
    else:
        zipped = _choose_under_budget(sources, samples, plans, trunks, run, opts, logger, times, budget_report,
                                      solved)
        nothing_zipped = _nothing_zipped(sources, opts, zipped.plan.trunk, logger)
    merged = zipped.surgery.model

    # 4. checks on the result
    _check_merged_weights(merged, allow_inf=sources.has_inf)
    try:
        check_model(merged)
    except Exception as exc:  # noqa: BLE001 - the checker raises several types
        raise ModelError(f"internal error: the merged model fails the ONNX checker: {_first_line(exc)}") from exc
    verification = {}
    if opts.verify:
        t = time.perf_counter()
        # the sources' outputs on the held-back samples come from the calibration pass where it ran over them
        references = run.outputs if samples.verify is not None else None
        verification = _verify(merged, sources.run_models, opts.names, samples.verify or samples.fit,
                               opts.batch_size, opts.device, references)
        verification["held_back"] = samples.verify is not None
        times["verify"] = time.perf_counter() - t
        for head in verification["heads"]:
            logger.debug("verify %s against %s: %s", head["output"], head["model"],
                         ", ".join(f"{k} {v}" for k, v in head.items() if k not in ("output", "model")))

    fp16_check = None
    if opts.fp16:
        from .deploy import check_fp16, to_fp16

        t = time.perf_counter()
        if sources.mapped:
            from .onnx_io import materialise
            merged = materialise(merged)  # onnxconverter-common converts protobuf weights
        half = to_fp16(merged)
        check_data = samples.held or samples.fit
        arrays = {k: np.asarray(v) for k, v in check_data.arrays.items()}
        fp16_check = check_fp16(merged, half, arrays, "held-back" if samples.held is not None else "calibration",
                                opts.force, opts.batch_size, opts.device, logger)
        merged = half
        times["fp16"] = time.perf_counter() - t

    # 5. the card, and the files
    card = _card(sources, samples, opts, zipped, merged, unmerged, nothing_zipped, verification, fp16_check,
                 budget_report)
    if asked_batch != opts.batch_size:
        card["options"]["batch_size_asked"] = asked_batch  # batch_size: what ran (ACTIVATION_BYTES)
    # Wall times stay out of the model's metadata: the same inputs and seed must give a byte-identical model.
    merged.metadata_props.add(key="onnxzip.card", value=json.dumps(card, sort_keys=True, allow_nan=False))
    times["total"] = time.perf_counter() - t0
    card["seconds"] = {k: round(v, 3) for k, v in times.items()}
    if output is not None:
        _write(merged, json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n", output, opts.force)
    if sources.mapped:
        # the result must outlive the merge's weight files: its weights are then those of the written file
        from .onnx_io import materialise, written_model
        merged = written_model(merged, output) if output is not None else materialise(merged)
    return MergeResult(merged, output, card)


# ---------------------------------------------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------------------------------------------

def model_label(m: int) -> str:
    """How messages name the m-th model: model A, model B, …"""
    return f"model {chr(ord('A') + m)}" if m < 26 else f"model #{m + 1}"


@dataclass
class Sources:
    """The models as read, checked and analysed. Model 0 is the reference graph every other one was matched to."""

    models: list  # onnx.ModelProto as loaded
    paths: list  # file path or None (an in-memory model)
    shas: list
    labels: list  # path, or the model's name, for messages
    analyses: list  # graph.Analysis per model
    correspondences: list  # per model, graph.Correspondence of its names onto model 0's (None for model 0)
    run_models: list  # what runs: model 0, and every other model with its inputs renamed to model 0's
    has_inf: bool  # some original weight is infinite (a -inf mask): the merged model may hold inf too
    weights: object = None  # onnx_io.WeightFolder of the merge where its weights are mapped, else None

    @property
    def mapped(self) -> bool:
        """Whether the models' weights are mapped from files (and so the merged model's too)."""
        from .onnx_io import has_mapped_weights
        return any(has_mapped_weights(model) for model in self.models)

    @property
    def a(self) -> Analysis:
        return self.analyses[0]

    @property
    def num_models(self) -> int:
        return len(self.models)


def read_models(models: list, data, output: str | None, opts: MergeOptions, weights=None) -> Sources:
    """Load every model, refuse NaN weights, check each matches model 0 node for node (naming the one at fault).
    `weights`: the `onnx_io.WeightFolder` for the weights of large models (default: a new one in the temporary
    folder, `Sources.weights`, which the caller closes)."""
    from .onnx_io import WeightFolder
    weights = weights if weights is not None else WeightFolder()
    loaded = [_load(model, model_label(m), weights) for m, model in enumerate(models)]
    if output is not None:
        where = [(path, model_label(m)) for m, (_, path, _) in enumerate(loaded)]
        if isinstance(data, (str, bytes, os.PathLike)):
            where.append((_as_path(data, "calibration data", CalibrationDataError), "the calibration data"))
        for source, what in where:
            if source is not None and os.path.exists(output) and _same_file(output, source):
                raise OutputError(f"output {output!r} is {what}; write the merged model to another file")
    labels = [path or opts.names[m] for m, (_, path, _) in enumerate(loaded)]
    analyses = [analyse(model, opts.fold_batchnorm) for model, _, _ in loaded]
    has_inf = False
    for m, analysis in enumerate(analyses):
        has_inf = _check_weights(analysis, f"{model_label(m)} {labels[m]!r}") or has_inf
    correspondences = [None] + [match(analyses[0], analyses[m], (labels[0], labels[m]))
                                for m in range(1, len(analyses))]
    run_models = [analyses[0].model] + [_rename_inputs(analyses[m].model, correspondences[m].inputs)
                                        for m in range(1, len(analyses))]
    return Sources([x[0] for x in loaded], [x[1] for x in loaded], [x[2] for x in loaded], labels, analyses,
                   correspondences, run_models, has_inf, weights)


def _check_structure(sources: Sources, opts: MergeOptions, logger) -> list:
    """Unsupported regions (an error under --strict, a warning otherwise) and the --stop-at range; returns the
    unsupported regions as (node index, reason)."""
    a, label = sources.a, sources.labels[0]
    unmerged = unsupported_report(a)
    if unmerged and opts.strict:
        i, reason = unmerged[0]
        raise UnsupportedModelError(f"{label}: {a.describe_node(i)} cannot be merged: {reason} "
                                    f"({len(unmerged)} such node(s); without --strict they are left unmerged)")
    if isinstance(opts.stop_at, int) and opts.stop_at > len(a.weighted):
        raise UsageError(f"--stop-at {opts.stop_at} is out of range: the model has {len(a.weighted)} weighted layers")
    for i, reason in unmerged:
        logger.warning("left unmerged from %s on: %s", a.describe_node(i), reason)
    averaged = averaged_report(a, sources.correspondences)
    if averaged:
        logger.info("%d constant(s) that differ between the models are merged as their average (first: %s of %s, "
                    "%s)", len(averaged), f"input {averaged[0]['input']}", averaged[0]["node"], averaged[0]["why"])
    return unmerged


def _side_by_side(n: int) -> str:
    return "both models side by side" if n == 2 else f"the {n} models side by side"


def _trunk(sources: Sources, opts: MergeOptions, stop_at) -> set:
    return set() if opts.method == "ensemble" else trunk_nodes(sources.a, stop_at)


def _nothing_zipped(sources: Sources, opts: MergeOptions, trunk: set, logger) -> str | None:
    """Why the merge zips nothing (None when it zips something); a warning, or an error under --strict, when that
    was not asked for (issue 13, "say what happened")."""
    n = sources.num_models
    if opts.method == "ensemble":
        return f"--method ensemble asks for {_side_by_side(n)}"
    if opts.stop_at in ("input", 0):
        return f"--stop-at {opts.stop_at} asks for {_side_by_side(n)}"
    reason = why_nothing_zipped(sources.a, trunk)
    if reason is not None:
        if opts.strict:
            raise UnsupportedModelError(f"{sources.labels[0]}: nothing can be zipped: {reason}; the merged model "
                                        f"would be {_side_by_side(n)} (without --strict it is written anyway, as "
                                        "that ensemble)")
        times = "twice" if n == 2 else f"{n} times"
        logger.warning("NOTHING IS ZIPPED: %s. The merged model is %s (an ensemble, at %s the cost of one); "
                       "--strict makes this an error", reason, _side_by_side(n), times)
    return reason


@dataclass
class Samples:
    """The calibration samples: those that calibrate (and fit), and those held back (to verify, choose ridge
    strengths and, under a budget, configurations)."""

    calib: CalibrationData  # every sample used (after --num-samples)
    fit: CalibrationData
    held: CalibrationData | None
    verify: CalibrationData | None  # `held` when verifying
    holdout: int
    source: object  # the data path, or None for arrays

    @property
    def input_shapes(self) -> dict:
        """One sample's shape per input (batch 1), for counting MACs."""
        return {k: (1,) + tuple(np.shape(v)[1:]) for k, v in self.calib.arrays.items()}


def _read_samples(data, sources: Sources, opts: MergeOptions, logger) -> Samples:
    specs = input_specs(sources.a.model)
    calib = _calibration(data, specs, None, logger)
    _check_token_ids(calib, sources.a)
    num_samples = opts.num_samples
    if num_samples is not None and num_samples < calib.num_samples:
        # --seed picks which samples are used (and so which are held back to verify): a random subset, kept in
        # file order; the same seed picks the same samples
        calib = calib.subset(num_samples, opts.seed)
    elif num_samples is not None and num_samples > calib.num_samples:
        logger.warning("%s: %d calibration samples asked for, but there are %d; using all of them", calib.path,
                       num_samples, calib.num_samples)
    fixed = _fixed_batch(calib)
    if calib.num_samples < max(2, fixed):
        raise CalibrationDataError(f"{calib.path}: {calib.num_samples} calibration sample(s); at least "
                                   f"{max(2, fixed)} are needed" + (f" (the model fixes its batch to {fixed})"
                                                                    if fixed > 1 else ""))
    # held back: to verify the result, to choose the refit's ridge strengths and a budget's configuration
    wanted = opts.verify or opts.refit == "ls" or opts.budget is not None
    holdout = min(VERIFY_MAX_SAMPLES, calib.num_samples // 5) if wanted else 0
    holdout -= holdout % fixed  # whole batches only: a model with a fixed batch size skips a partial one
    if calib.num_samples - holdout < fixed:
        holdout = 0
    if opts.verify and not holdout:
        logger.warning("%s: too few calibration samples (%d) to hold any back; verifying on the calibration "
                       "samples themselves", calib.path, calib.num_samples)
    if opts.budget is not None and not holdout:
        raise CalibrationDataError(f"{calib.path}: too few calibration samples ({calib.num_samples}) to hold any "
                                   "back, and --budget chooses its configuration on held-back samples; give more")
    fit, held = calib.split(holdout) if holdout else (calib, None)
    source = None if isinstance(data, (np.ndarray, dict)) else os.fsdecode(data)
    return Samples(calib, fit, held, held if opts.verify else None, holdout, source)


def _check_token_ids(calib: CalibrationData, a: Analysis) -> None:
    """Integer inputs read straight by an embedding (Gather from a constant table) must index rows of its table
    (-rows..rows-1, as ONNX's Gather allows): found here, before any model runs, rather than as an onnxruntime error
    in the middle of a pass."""
    for name, array in calib.arrays.items():
        if array.dtype.kind not in "iu" or array.size == 0:
            continue
        for j, k in a.consumers.get(name, []):
            node = a.model.graph.node[j]
            if a.nodes[j].kind != "weighted" or node.op_type != "Gather" or k != 1:
                continue
            rows = a.initializers[node.input[0]].shape[0]
            lo, hi = int(array.min()), int(array.max())
            if lo < -rows or hi >= rows:
                raise CalibrationDataError(
                    f"{calib.path}: input {name!r} holds token ids from {lo} to {hi}, but node '{node.name}' looks "
                    f"them up in embedding table '{node.input[0]}' of {rows} rows (ids from {-rows} to {rows - 1})")


def _space_key(sid: int, points: list) -> str:
    return f"space:{sid}:" + "|".join(points)


def _source_pass(sources: Sources, samples: Samples, trunks: list, widths: list, opts: MergeOptions,
                 logger, solve) -> SourceRun:
    """One onnxruntime pass of every model over the calibration samples and then the held-back ones: the
    correlation statistics of every feature space zipped in any of `trunks` (at its merge points there), the rows
    of the refit's targets, and every model's outputs on the held-back samples (verification's references).

    `solve(stats)` turns statistics into matchings; the statistics are dropped after it (the run returned holds
    none). Where every space's statistics would take more than STATS_BYTES, the spaces are calibrated in groups
    that fit, one pass of the calibration samples each (the first also keeps the rows and outputs), and each group
    is solved before the next pass, so that the statistics held at once stay within the bound."""
    a = sources.a
    requests, spaces = {}, {}
    for trunk in trunks:
        points = merge_points(a, trunk)
        for sid in zipped_spaces(a, trunk):
            key = _space_key(sid, points[sid])
            spaces[key] = sid
            if key in requests:
                continue
            for name in points[sid]:
                ts = a.tensor_spaces[name]
                names = [name] + [c.tensors[name] for c in sources.correspondences[1:]]  # every model's name
                requests.setdefault(key, []).append(FeatureRequest(key, names, ts.axis, ts.expand))
    if not requests:
        return SourceRun({}, {}, {}, None)
    held = samples.held
    # numbered in one list, as a single pass takes them: the same rows are sampled whatever the grouping
    for number, request in enumerate(r for rs in requests.values() for r in rs):
        request.number = number
    groups = stats_groups(a, spaces, sources.num_models, STATS_BYTES)
    # The spaces beyond the first group: their features go to the pass's temporary file and their statistics are
    # made from it afterwards, where there is room (under Ray, a pass per group: the workers' files are not the
    # driver's). The file also takes the refit's target rows beyond memory; rows it has no room for cost one more
    # pass of the sources (the refit's own, for all of them), features it has no room for a pass per group: with
    # three groups or more the features go first.
    later = [r for keys in groups[1:] for key in keys for r in requests[key]]
    deferred = _feature_bytes(a, later, spaces, sources.num_models, samples.fit.num_samples)
    room = 0 if opts.ray is not None else spill_room()
    features_first = bool(later) and len(groups) >= 3 and deferred <= room
    rows = []
    if opts.refit == "ls" and opts.method != "ensemble":
        plans = [ZipPlan(sources.analyses, sources.correspondences, trunk, {}, opts.names) for trunk in trunks]
        # Ray workers return their rows through the object store: they keep them in memory (no file to share)
        rows = target_row_requests(plans, samples.fit.num_samples, held.num_samples if held is not None else 0,
                                   max(widths), spill_bytes=room - deferred if features_first else room)
    outputs = held is not None and (opts.verify or opts.budget is not None)
    defer = features_first or bool(later) and deferred <= room - sum(r.nbytes for r in rows if r.spill)
    for r in later:
        r.defer = defer
    logger.info("calibrating on %d samples (%d feature spaces%s)%s", samples.fit.num_samples,
                len(set(spaces.values())),
                "" if len(groups) == 1 else
                f"; their statistics would take more than {STATS_BYTES / 2**30:g} GiB at once: "
                + (f"the features of {len(groups) - 1} group(s) of spaces go to a temporary file "
                   f"({deferred / 1e9:.1f} GB) for later" if defer else f"in {len(groups)} passes"),
                f", then {held.num_samples} held back" if held is not None and (rows or outputs) else "")
    kept = None
    for g, keys in enumerate(groups[:1] if defer else groups):
        first = g == 0
        run = _calibrate(sources, samples, [r for key in (spaces if defer else keys) for r in requests[key]], opts,
                         rows if first else [], held if first and (rows or outputs) else None, outputs and first,
                         "calibrating" if len(groups) == 1 or defer else f"calibrating ({g + 1}/{len(groups)})",
                         logger)
        kept = run if first else kept
        solve(run.stats)
        run.stats = {}
    if defer:
        for keys in groups[1:]:
            solve(deferred_stats(kept, keys))
        kept.deferred = {}
    return kept


def _feature_bytes(a: Analysis, requests: list, spaces: dict, num_models: int, num_samples: int) -> int:
    """Bytes of the feature blocks `requests` would write to a pass's temporary file (float32, every model's
    features side by side, at the rows STATS_SAMPLING keeps). A sample's rows are its tensor's values over the
    space's width, wherever the batch sits in analysis's shapes (`graph.shape_batch`)."""
    batch = shape_batch(a)
    total = 0
    for r in requests:
        shape = a.shapes.get(r.tensors[0])
        if shape is None:
            return 1 << 62  # unknown: not deferred
        width = a.spaces[spaces[r.key]].width
        rows = int(np.prod(shape, dtype=np.int64)) // batch // max(width, 1) * num_samples
        total += int(STATS_SAMPLING.fraction(num_models * width, rows) * rows) * num_models * width * 4
    return total


def _fitting_batch_size(sources: Sources, samples: Samples, trunks: list, opts: MergeOptions, logger) -> int:
    """--batch-size, or fewer samples a batch where a batch of the source pass would hold more than
    ACTIVATION_BYTES of activations: every model's merge points and its trunk layers' inputs and outputs (what the
    statistics and the refit's targets read), float32, from the shapes graph analysis inferred. A model written for
    a fixed batch keeps it."""
    a = sources.a
    if samples.fit._fixed_batch() is not None:
        return opts.batch_size
    names = set()
    for trunk in trunks:
        points = merge_points(a, trunk)
        names.update(n for sid in zipped_spaces(a, trunk) for n in points[sid])
        names.update(t for i in a.weighted if i in trunk
                     for t in (a.nodes[i].data_input, a.model.graph.node[i].output[0]))
    per_sample = 4 * sources.num_models * sum(int(np.prod(a.shapes[n])) for n in names if n in a.shapes)
    if per_sample * opts.batch_size <= ACTIVATION_BYTES:
        return opts.batch_size
    size = max(1, ACTIVATION_BYTES // per_sample)
    logger.info("running batches of %d samples instead of --batch-size %d: a batch would hold %.1f GB of the models' "
                "activations (more than pipeline.ACTIVATION_BYTES, %g GiB)", size, opts.batch_size,
                per_sample * opts.batch_size / 1e9, ACTIVATION_BYTES / 2**30)
    return size


def stats_groups(a: Analysis, spaces: dict, num_models: int, budget: int) -> list:
    """The statistics keys (`spaces`: key -> space id) in groups whose co-moments ((N·F)² float64 each) take at
    most `budget` bytes together, in order; a key larger than the budget is a group of its own, and the spaces of
    a grouped layers' family (whose blocks are matched together) share a group."""
    family = {sid: k for k, f in enumerate(a.block_families) for sid in f.spaces}
    units = {}
    for key, sid in spaces.items():
        units.setdefault(("family", family[sid]) if sid in family else key, []).append(key)
    groups, size = [], 0
    for keys in units.values():
        nbytes = sum((num_models * a.spaces[spaces[key]].width) ** 2 * 8 for key in keys)
        if not groups or size + nbytes > budget:
            groups.append([])
            size = 0
        groups[-1].extend(keys)
        size += nbytes
    return groups


def _calibrate(sources: Sources, samples: Samples, requests: list, opts: MergeOptions, rows: list, held,
               outputs: bool, desc: str, logger) -> SourceRun:
    """One pass of the sources (`calibration.run_sources`, or sharded over Ray workers)."""
    try:
        if opts.ray is not None:
            from .distributed import run_sources_sharded

            return run_sources_sharded(opts.ray, opts.ray_workers, sources.run_models, requests, samples.fit,
                                       opts.batch_size, opts.device, rows=rows, held=held, outputs=outputs,
                                       seed=REFIT_SEED, sampling=STATS_SAMPLING, logger=logger)
        return run_sources(sources.run_models, requests, samples.fit, opts.batch_size, opts.device,
                           progress=opts.progress, desc=desc, rows=rows, held=held, outputs=outputs,
                           seed=REFIT_SEED, sampling=STATS_SAMPLING)
    except (ModelError, *onnxruntime_errors()) as exc:  # make_session raises ModelError for a graph it cannot load
        _blame_run_failure(sources, samples, opts, exc)


def _blame_run_failure(sources: Sources, samples: Samples, opts: MergeOptions, exc: BaseException) -> None:
    """Raise the error for an onnxruntime failure of the calibration pass, blaming what is at fault: a model
    onnxruntime cannot load (ModelError), a model that fails on the first batch of the data by itself
    (CalibrationDataError), or, when every model runs by itself, onnxzip's own copy of the models (OnnxzipError:
    a bug or limit of onnxzip, not of the user's input)."""
    from .calibration import make_session
    first = next(samples.fit.batches(opts.batch_size))
    for label, model in zip(sources.labels, sources.run_models):
        try:
            session = make_session(model, opts.device)
        except ModelError as own:
            raise ModelError(f"{label}: {_first_line(own)}") from own
        try:
            session.run(None, {i.name: first[i.name] for i in session.get_inputs()})
        except onnxruntime_errors() as own:
            raise CalibrationDataError(f"{samples.calib.path}: onnxruntime cannot run {label} on the calibration "
                                       f"data (first batch of {opts.batch_size}): {_first_line(own)}") from own
    raise OnnxzipError(f"onnxruntime failed on onnxzip's instrumented copy of the models, although every model "
                       f"runs on the calibration data by itself: {_first_line(exc)}. This is a bug or a limit of "
                       f"onnxzip, not a fault of the models or the data: please report it (with -v)") from exc


# Operators that compute across the channels of their input: more merged features than one model has (some features
# kept once per model) would change what they compute.
_ACROSS_CHANNELS = ("LayerNormalization", "GroupNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
                    "LRN", "LpNormalization", "MeanVarianceNormalization", "Softmax", "LogSoftmax", "Hardmax",
                    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd",
                    "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin", "TopK")


def fixed_width_spaces(a: Analysis) -> dict:
    """Spaces whose merged width must stay F under --width, with why: a view (Slice, Split, channel shuffle) reads
    them (its merged channels sit at fixed positions), a Reshape/Expand reads or writes one of their tensors (its
    target shape may spell out the width: heads of attention, a patch embedding, dynamo's global pooling), a grouped
    Conv does (widening its groups is not done yet), the fused Attention op does (its heads keep their size), or an
    operator that computes across channels reads them (LayerNorm, a softmax, a reduction: conservatively, whatever
    its axis)."""
    fixed = {}
    for space in a.spaces.values():
        for sp, _ in space.view or ():
            fixed.setdefault(sp, "a slice, split or channel shuffle reads it")
    for node in a.model.graph.node:
        grouped = node.op_type == "Conv" and any(at.name == "group" and at.i > 1 for at in node.attribute)
        if node.op_type in ("Reshape", "Expand", "Attention") or grouped or node.op_type in _ACROSS_CHANNELS:
            why = (f"grouped Conv '{node.name}' (its groups keep their size)" if grouped else
                   f"{node.op_type} '{node.name}' may spell out its width" if node.op_type in ("Reshape", "Expand")
                   else f"Attention '{node.name}' splits its inputs into heads of a fixed size"
                   if node.op_type == "Attention"
                   else f"{node.op_type} '{node.name}' mixes its channels (a merged feature kept twice would count "
                        "twice)")
            read = 3 if node.op_type == "Attention" else 1  # queries, keys and values
            for name in list(node.input[:read]) + list(node.output[:1]):
                ts = a.tensor_spaces.get(name)
                if ts is not None:
                    fixed.setdefault(ts.space, why)
    return fixed


def merged_width(a: Analysis, sid: int, width: float, fixed: dict) -> int:
    """round(W·F) merged features for space `sid` (per block for a grouped layer's contiguous equal blocks); F
    where the width is fixed (`fixed_width_spaces`) or the blocks are not contiguous and equal."""
    space = a.spaces[sid]
    f = space.width
    if width == 1.0 or sid in fixed:
        return f
    groups = _contiguous_blocks(a, sid)
    if groups is None:
        return f
    return groups * max(1, int(math.floor(width * f / groups + 0.5)))


def _contiguous_blocks(a: Analysis, sid: int) -> int | None:
    """The number of blocks of space `sid` when they are contiguous and equal (1 for an unpartitioned space), else
    None."""
    space = a.spaces[sid]
    f = space.width
    labels = block_labels(f, space.partition or 1)
    groups = len(np.unique(labels))
    if groups > 1 and (f % groups or not np.array_equal(labels, np.arange(f) // (f // groups))):
        return None
    return groups


class _Correlations:
    """The similarity matrices of spaces (`_similarity` of their statistics, `keys`: space id -> key of `stats`),
    made on first use; `pop` hands one over and forgets it, so that only the spaces in use are held."""

    def __init__(self, stats: dict, keys: dict):
        self.stats, self.keys, self.made = stats, keys, {}

    def __contains__(self, sid) -> bool:
        return sid in self.keys

    def __getitem__(self, sid) -> np.ndarray:
        if sid not in self.made:
            self.made[sid] = _similarity(self.stats[self.keys[sid]])
        return self.made[sid]

    def pop(self, sid) -> np.ndarray:
        corr = self[sid]
        del self.made[sid]
        return corr


def _block_orders(a: Analysis, trunk: set, correlations: _Correlations | None, n: int) -> dict:
    """Per space of a grouped layer's family (graph.BlockFamily) that may move: the order in which every model's
    groups are matched to model 0's (solver.match_blocks, from the family's summed block scores), the same for every
    space of the family. Only with correlations (zip, permute), and where the family's spaces are all zipped and its
    grouped layers all in the trunk (a grouped layer after the trunk reads its blocks in place)."""
    orders = {}
    for family in a.block_families:
        if correlations is None or not family.movable or not all(sid in correlations for sid in family.spaces) \
                or not set(family.layers) <= trunk:
            continue
        order = match_blocks([(correlations[sid], a.spaces[sid].width) for sid in family.spaces], family.blocks, n)
        orders.update({sid: order for sid in family.spaces})
    return orders


@dataclass
class Zipped:
    """One configuration merged: its plan (trunk, matchings), the surgery's model, and what was done."""

    plan: ZipPlan
    surgery: object  # surgery.Surgery
    width: float
    spaces: list  # card entries
    repair: dict
    refit: dict


def solve_spaces(sources: Sources, trunk: set, width: float, stats: dict, opts: MergeOptions, logger) -> dict:
    """The matchings of the spaces zipped in `trunk` at `width` whose statistics `stats` holds (key ->
    FeatureStats): space id -> (Matching, the card's entry)."""
    a, n = sources.a, sources.num_models
    points = merge_points(a, trunk)
    keys = {sid: _space_key(sid, points[sid]) for sid in zipped_spaces(a, trunk)}
    keys = {sid: key for sid, key in keys.items() if key in stats}
    fixed = fixed_width_spaces(a) if width != 1.0 else {}
    # Each space's (N·F)² correlation is made when its space is solved and dropped after (those a grouped layer's
    # block order needs, when that is found): a ViT-B/16 pair's 25 spaces would hold 5.4 GB of them at once.
    correlations = _Correlations(stats, keys) if opts.method in ("zip", "permute") else None
    orders = _block_orders(a, trunk, correlations, n)
    solved = {}
    for sid, key in keys.items():
        f = a.spaces[sid].width
        target = merged_width(a, sid, width, fixed)
        matching = solve_blocks(opts.method, correlations.pop(sid) if correlations is not None else None, f,
                                a.spaces[sid].partition or 1, n, opts.alpha, opts.beta,
                                target_width=None if target == f else target, alike=a.spaces[sid].alike,
                                block_order=orders.get(sid))
        entry = {"space": sid, "width": f, "blocks": a.spaces[sid].blocks, "merge_points": list(points[sid])}
        if sid in orders:
            entry["block_order"] = orders[sid].tolist()
        if target != f:
            entry["merged_width"] = int(matching.merged_width)
        elif width != 1.0:
            entry["merged_width"] = f
            entry["width_kept_because"] = fixed.get(sid, "its blocks are not contiguous and equal")
        samples_seen = int(stats[key].count)
        # The N·F x N·F correlation of a space of width F needs more than N·F samples to be of full rank.
        thin = samples_seen < n * f
        if thin:
            logger.warning("feature space %d (width %d, at %s) has only %d samples for %d stacked features: its "
                           "statistics are too thin to trust; give more calibration samples", sid, f,
                           ", ".join(points[sid]), samples_seen, n * f)
        entry.update({"samples": samples_seen, "thin_statistics": thin,
                      "cross_model_merges": int(matching.cross_merges),
                      "within_model_merges": [int(x) for x in matching.within_merges],
                      "forced_merges": int(getattr(matching, "forced_merges", 0)),
                      "mean_merged_correlation": _measured(matching.mean_merge_correlation)})
        solved[sid] = (matching, entry)
    return solved


def zip_models(sources: Sources, samples: Samples, trunk: set, width: float, run: SourceRun, opts: MergeOptions,
               logger, times: dict, solved: dict) -> Zipped:
    """Surgery, and then the statistics repair or the least-squares refit, for one trunk and width, from the
    matchings `solve_spaces` found (`solved`: space id -> (Matching, card entry), every space zipped in `trunk`)."""
    a = sources.a
    plan = ZipPlan(sources.analyses, sources.correspondences, trunk, {}, opts.names)
    spaces = zipped_spaces(a, trunk)
    card_spaces = []
    for sid in spaces:
        plan.matchings[sid], entry = solved[sid]
        card_spaces.append(entry)

    t = time.perf_counter()
    surgery = build(plan, sources.weights.new_file("merged") if sources.mapped else None)
    times["surgery"] = times.get("surgery", 0.0) + time.perf_counter() - t
    repair_summary = {"applied": False}
    if opts.repair and opts.refit != "none":
        repair_summary["superseded_by_refit"] = True
    # the least-squares refit fits every layer the repair would correct (scale and shift included)
    if opts.repair and opts.refit == "none" and opts.method != "ensemble" and spaces:
        t = time.perf_counter()
        logger.info("repairing statistics of %d layers", len(repair_points(a, trunk)))
        try:
            repair_summary = repair_statistics(plan, surgery, samples.fit, sources.run_models, opts.batch_size,
                                               opts.device, target_kind=opts.repair_targets)
        except onnxruntime_errors() as exc:
            raise VerificationError(f"internal error: the merged model does not run in onnxruntime during "
                                    f"statistics repair: {_first_line(exc)}") from exc
        repair_summary["applied"] = True
        times["repair"] = times.get("repair", 0.0) + time.perf_counter() - t
    refit_summary = {"applied": False, "method": opts.refit}
    if opts.refit == "ls" and opts.method != "ensemble" and spaces:
        t = time.perf_counter()
        logger.info("refitting the merged layers by least squares")
        try:
            # rows are subsampled with a fixed seed: --seed only picks the calibration samples
            refit_summary = refit_layers(plan, surgery, samples.fit, samples.held, sources.run_models,
                                         opts.batch_size, opts.device, seed=REFIT_SEED, progress=opts.progress,
                                         logger=logger, source_rows=run)
        except onnxruntime_errors() as exc:
            raise VerificationError(f"internal error: the merged model does not run in onnxruntime during the "
                                    f"least-squares refit: {_first_line(exc)}") from exc
        times["refit"] = times.get("refit", 0.0) + time.perf_counter() - t
    return Zipped(plan, surgery, width, card_spaces, repair_summary, refit_summary)


# ---------------------------------------------------------------------------------------------------------------
# A cost budget: which stop point and width
# ---------------------------------------------------------------------------------------------------------------

# Widths tried under a budget: 1, 1 + 1/8, …, N.
BUDGET_WIDTH_STEP = 0.125
# At most this many configurations of the budget frontier (the widest fitting width per stop point) are merged and
# compared on the held-back samples, spread evenly over the stop points (the deepest and shallowest included).
BUDGET_CANDIDATES = 5


def model_cost(model: onnx.ModelProto, kind: str, input_shapes: dict) -> int:
    return count_parameters(model) if kind == "params" else count_macs(model, input_shapes)


def _shape_matching(a: Analysis, sid: int, target: int, n: int):
    """A matching of the right widths and nothing else (the cost of a merged model depends only on its widths)."""
    f = a.spaces[sid].width
    if target == f:
        return solve_blocks("average", None, f, a.spaces[sid].partition or 1, n)
    groups = _contiguous_blocks(a, sid)  # not None: merged_width widened the space
    per_block, size = target // groups, f // groups
    stacked = np.arange(n * size)
    clusters = np.concatenate([np.concatenate([b * per_block + stacked[m * size:(m + 1) * size] % per_block
                                               for b in range(groups)]) for m in range(n)])
    return matching_from_clusters(clusters, n, target)


def configuration_cost(sources: Sources, trunk: set, width: float, kind: str, input_shapes: dict) -> int:
    """The cost (parameters, or MACs per sample) of the merged model with this trunk and width, from the graph
    surgery builds (no statistics are needed, nor the weights' values: the cost depends only on the widths)."""
    a = sources.a
    plan = ZipPlan(sources.analyses, sources.correspondences, trunk, {}, default_names(sources.num_models))
    fixed = fixed_width_spaces(a)
    for sid in zipped_spaces(a, trunk):
        target = merged_width(a, sid, width, fixed)
        plan.matchings[sid] = _shape_matching(a, sid, target, sources.num_models)
    return model_cost(build(plan, shapes_only=True).model, kind, input_shapes)


def budget_frontier(sources: Sources, opts: MergeOptions, input_shapes: dict) -> tuple:
    """([{stop_at, width, cost, fraction}, …], ensemble cost): for each stop point, the widest width on the
    BUDGET_WIDTH_STEP grid whose merged model fits the budget. The ensemble's cost is that of the models as merged
    (BatchNorms folded, as `--method ensemble` writes them). A UsageError, before any model runs, when none fits."""
    kind, fraction = opts.budget.kind, opts.budget.fraction
    ensemble = sum(model_cost(model, kind, input_shapes) for model in sources.run_models)
    allowed = fraction * ensemble
    n = sources.num_models
    grid = [1.0 + BUDGET_WIDTH_STEP * k for k in range(int(round((n - 1) / BUDGET_WIDTH_STEP)) + 1)]
    stops = [int(v) if v.isdigit() else v for v, _ in stop_points(sources.a) if v != "input"]
    frontier, cheapest, seen = [], None, set()
    for stop in reversed(stops):  # 'heads' first: it names the full zip, whichever K has the same trunk
        trunk = trunk_nodes(sources.a, stop)
        if not zipped_spaces(sources.a, trunk) or frozenset(trunk) in seen:
            continue  # nothing zipped, or the same trunk as an earlier stop point (K = the full zip's layers)
        seen.add(frozenset(trunk))
        cost = configuration_cost(sources, trunk, 1.0, kind, input_shapes)
        cheapest = cost if cheapest is None else min(cheapest, cost)
        if cost > allowed:
            continue
        lo, hi, best = 1, len(grid) - 1, (1.0, cost)  # binary search: the cost grows with the width
        while lo <= hi:
            mid = (lo + hi) // 2
            c = configuration_cost(sources, trunk, grid[mid], kind, input_shapes)
            if c <= allowed:
                best, lo = (grid[mid], c), mid + 1
            else:
                hi = mid - 1
        frontier.append({"stop_at": stop, "width": best[0], "cost": int(best[1]),
                         "fraction": _measured(best[1] / ensemble)})
    frontier.reverse()  # shallowest stop point first, the full zip last
    if not frontier:
        reach = "no stop point zips anything" if cheapest is None else (
            f"the cheapest merge (a full zip at width 1) costs {cheapest / ensemble:.3f} of it ({cheapest:,})")
        raise UsageError(f"--budget {opts.budget}: {fraction:g} of the ensemble's {ensemble:,} {kind} is below what "
                         f"any stop point can reach: {reach}")
    return frontier, int(ensemble)


def _spread(items: list, k: int) -> list:
    """At most k of `items`, evenly spread, first and last included."""
    if len(items) <= k:
        return list(items)
    picks = sorted({int(round(j * (len(items) - 1) / (k - 1))) for j in range(k)})
    return [items[j] for j in picks]


def head_error(merged: onnx.ModelProto, references: list, names: tuple, data: CalibrationData, batch_size: int,
               device: str) -> float:
    """The mean over every head of ||merged - original|| / ||original|| on `data` (no labels)."""
    out = run_model(merged, data, batch_size, device)
    errors = []
    for m, ref in enumerate(references):
        for key, want in ref.items():
            got = out[f"{names[m]}/{key}"]
            if got.dtype.kind not in "fc":
                continue
            g, w = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
            errors.append(float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-12)))
    return float(np.mean(errors)) if errors else 0.0


def _choose_under_budget(sources: Sources, samples: Samples, plans: list, trunks: dict, run: SourceRun,
                         opts: MergeOptions, logger, times: dict, report: dict, solved: dict) -> Zipped:
    """Merge every candidate configuration; keep the one whose heads are closest to the originals' on the held-back
    samples."""
    references = run.outputs or [run_model(model, samples.held, opts.batch_size, opts.device)
                                 for model in sources.run_models]
    best, best_error, tried = None, None, []
    costs = {(c["stop_at"], c["width"]): c for c in report["frontier"]}
    for stop, width in plans:
        zipped = zip_models(sources, samples, trunks[stop], width, run, opts, logger, times, solved[(stop, width)])
        try:
            error = head_error(zipped.surgery.model, references, opts.names, samples.held, opts.batch_size,
                               opts.device)
        except onnxruntime_errors() as exc:
            raise VerificationError(f"internal error: a merged candidate does not run in onnxruntime: "
                                    f"{_first_line(exc)}") from exc
        entry = dict(costs[(stop, width)], held_back_error=_measured(error))
        tried.append(entry)
        logger.info("  stop at %s, width %g: %s of the ensemble's %s, held-back error %.4f", stop, width,
                    entry["fraction"], opts.budget.kind, error)
        if best_error is None or error < best_error:
            best, best_error, report["chosen"] = zipped, error, entry
    report["candidates"] = tried
    return best


# ---------------------------------------------------------------------------------------------------------------
# The card
# ---------------------------------------------------------------------------------------------------------------

def _card(sources: Sources, samples: Samples, opts: MergeOptions, zipped: Zipped, merged, unmerged: list,
          nothing_zipped, verification: dict, fp16_check, budget_report) -> dict:
    """How the model was made, as plain JSON data (mirrored in the model's metadata). Keys an N = 2 merge at width 1
    without budget does not use (width, budget, num_models) appear only where they say something."""
    a, names, n = sources.a, opts.names, sources.num_models
    trunk = zipped.plan.trunk
    keys = default_names(n)  # the card's per-model lists are by position: a, b, c, …
    parameters = {"merged": count_parameters(merged)}
    for m, model in enumerate(sources.models):
        parameters[keys[m]] = count_parameters(model)
    card = {
        "tool": "onnxzip", "version": __version__,
        "inputs": {names[m]: {"path": sources.paths[m], "sha256": sources.shas[m]} for m in range(n)},
        "method": opts.method, "alpha": opts.alpha, "beta": opts.beta,
        "stop_at": opts.stop_at if budget_report is None else budget_report["chosen"]["stop_at"], "seed": opts.seed,
        "options": {"repair": opts.repair, "repair_targets": opts.repair_targets, "refit": opts.refit,
                    "verify": opts.verify, "strict": opts.strict, "fold_batchnorm": opts.fold_batchnorm,
                    "batchnorms_folded": [x.folded_batchnorms for x in sources.analyses],
                    "num_samples": opts.num_samples, "batch_size": opts.batch_size, "device": opts.device,
                    "names": list(names), "fp16": opts.fp16},
        "calibration": {"source": samples.source, "samples": samples.fit.num_samples,
                        "verification_samples": samples.holdout if opts.verify else 0,
                        "held_back_samples": samples.holdout},
        "trunk": {"weighted_layers": len(a.weighted),
                  "weighted_layers_zipped": sum(1 for i in a.weighted if i in trunk),
                  "nodes": len(trunk), "task_heads": [a.nodes[i].name for i in a.heads]},
        "unmerged": [{"node": a.nodes[i].name, "op": a.nodes[i].op_type, "reason": r} for i, r in unmerged],
        "averaged_constants": averaged_report(a, sources.correspondences, trunk),
        "zipped_nothing": nothing_zipped is not None,
        "zipped_nothing_reason": nothing_zipped,
        "spaces": zipped.spaces,
        "parameters": parameters,
        "repair": _round_figures(zipped.repair),
        "refit": _round_refit(zipped.refit),
        "verification": verification,
        "fp16": fp16_check,
    }
    if n != 2:
        card["num_models"] = n
    if zipped.width != 1.0:
        card["width"] = zipped.width
    if budget_report is not None:
        card["budget"] = budget_report
    return _plain(card)


# ---------------------------------------------------------------------------------------------------------------
# Checks on the result
# ---------------------------------------------------------------------------------------------------------------

def _check_merged_weights(model: onnx.ModelProto, allow_inf: bool) -> None:
    """No NaN can reach a weight; inf only where an original holds inf too (a -inf mask, an unbounded Clip)."""
    from .onnx_io import tensor_array
    for init in model.graph.initializer:
        if init.data_type not in _FLOAT_TYPES:
            continue
        nan, inf = _count_bad(tensor_array(init))
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


def _verify(merged, models, names, data: CalibrationData, batch_size, device, references: list | None = None) -> dict:
    """Per head: top-1 agreement, Cohen's kappa and relative error of the merged model against the original it
    stands for (`references`: the originals' outputs on `data`, else they are run). Raises VerificationError on
    non-finite outputs or a head that computes nothing like its original."""
    try:
        out = run_model(merged, data, batch_size, device)
    except onnxruntime_errors() as exc:
        raise VerificationError(f"the merged model does not run in onnxruntime: {_first_line(exc)}") from exc
    heads, broken = [], []
    for m, model in enumerate(models):
        ref = references[m] if references is not None else run_model(model, data, batch_size, device)
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
    from .onnx_io import EXTERNAL_DATA_THRESHOLD, save_model_atomic, weight_bytes
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
            if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD:
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
