"""The Python API: `merge` runs the stages (graph analysis, calibration, solving, surgery, repair, verification)."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import __version__
from .calibration import (CalibrationData, FeatureRequest, calibration_from_arrays, collect_stats, input_specs,
                          load_calibration, run_model)
from .errors import ModelError, OutputError, UnsupportedModelError, UsageError, VerificationError
from .graph import Analysis, analyse, match, trunk_nodes, unsupported_report
from .repair import repair as repair_statistics, repair_points, target_requests
from .solver import solve
from .surgery import ZipPlan, build, merge_points, zipped_spaces

log = logging.getLogger("onnxzip")

METHODS = ("zip", "permute", "average", "ensemble")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


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
        if c.get("unmerged"):
            lines.append(f"left unmerged: {len(c['unmerged'])} region(s) (see the card)")
        if c.get("repair", {}).get("layers"):
            lines.append(f"statistics repaired on {c['repair']['layers']} layer(s)")
        for head in c.get("verification", {}).get("heads", []):
            lines.append(f"verify {head['output']}: top-1 agreement with {head['model']} {head['top1_agreement']:.3f}, "
                         f"relative error {head['relative_error']:.3g}")
        if self.output_path:
            lines.append(f"wrote {self.output_path} and {self.output_path}.json")
        return lines


def _load(model, what: str) -> tuple:
    """(ModelProto, path or None, sha256 or None)."""
    if isinstance(model, onnx.ModelProto):
        return model, None, hashlib.sha256(model.SerializeToString()).hexdigest()
    from .onnx_io import file_sha256, load_model
    path = os.fspath(model)
    return load_model(path, what), path, file_sha256(path)


def _check_options(method, alpha, beta, batch_size, num_samples, names, device):
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        raise UsageError(f"--alpha must be a finite number, got {alpha!r}")
    if not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise UsageError(f"--beta must be between 0 and 1, got {beta!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 2):
        raise UsageError(f"--num-samples must be a whole number >= 2, got {num_samples!r}")
    if len(names) != 2 or len(set(names)) != 2 or not all(isinstance(n, str) and _NAME.match(n) for n in names):
        raise UsageError(f"--names must be two different names of letters, digits, '_', '.', '-', got {names!r}")
    if "zip" in names:
        raise UsageError("--names: 'zip' is the prefix of the shared trunk; choose other names")
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")


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


def count_parameters(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                      onnx.TensorProto.BFLOAT16)))


def merge(model_a, model_b, data, output=None, *, method: str = "zip", alpha: float = 0.3, beta: float = 0.125,
          stop_at=None, num_samples: int | None = None, batch_size: int = 64, device: str = "auto",
          names=("a", "b"), seed: int = 0, force: bool = False, repair: bool = True, verify: bool = True,
          strict: bool = False, progress=False, logger: logging.Logger | None = None) -> MergeResult:
    """Merge two models of the same architecture trained on different tasks into one (ZipIt!).

    model_a, model_b: paths to .onnx files or onnx.ModelProto. data: a .npy/.npz path, a numpy array (one input)
    or a dict input name -> array, of unlabeled calibration inputs. output: where to write the merged model (and
    its card, `output + '.json'`); None writes nothing. method: zip | permute | average | ensemble. alpha, beta:
    ZipIt!'s knobs (paper defaults). stop_at: None/'heads' (zip everything but the task heads), 'input' or 0
    (nothing: the ensemble), or K (the first K weighted layers). The result's graph has the original inputs, then
    model A's outputs named '<names[0]>/<output>', then model B's.
    """
    logger = logger or log
    times = {}
    t0 = time.perf_counter()
    names = tuple(names)
    _check_options(method, alpha, beta, batch_size, num_samples, names, device)
    if output is not None:
        output = os.fspath(output)
        if os.path.exists(output) and not force:
            raise OutputError(f"output {output} exists; use --force to overwrite it")
        folder = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(folder):
            raise OutputError(f"output folder {folder} does not exist")

    model_a, path_a, sha_a = _load(model_a, "model A")
    model_b, path_b, sha_b = _load(model_b, "model B")
    label_a = path_a or names[0]
    label_b = path_b or names[1]
    a, b = analyse(model_a), analyse(model_b)
    corr = match(a, b, (label_a, label_b))
    unmerged = unsupported_report(a)
    if unmerged and strict:
        i, reason = unmerged[0]
        raise UnsupportedModelError(f"{label_a}: {a.describe_node(i)} cannot be merged: {reason} "
                                    f"({len(unmerged)} such node(s); without --strict they are left unmerged)")
    for i, reason in unmerged:
        logger.warning("left unmerged from %s on: %s", a.describe_node(i), reason)
    if stop_at not in (None, "heads", "all", "input"):
        try:
            stop_at = int(stop_at)
        except (TypeError, ValueError):
            raise UsageError(f"--stop-at must be 'input', 'heads' or a number of weighted layers, "
                             f"got {stop_at!r}") from None
        if not 0 <= stop_at <= len(a.weighted):
            raise UsageError(f"--stop-at {stop_at} is out of range: the model has {len(a.weighted)} weighted layers")
    trunk = set() if method == "ensemble" else trunk_nodes(a, stop_at)
    times["analyse"] = time.perf_counter() - t0

    specs = input_specs(a.model)
    if isinstance(data, (np.ndarray, dict)):
        calib = calibration_from_arrays(data, specs, num_samples, logger)
    else:
        calib = load_calibration(data, specs, num_samples, logger)
    if calib.num_samples < 2:
        raise UsageError("at least 2 calibration samples are needed")
    holdout = min(256, calib.num_samples // 5) if verify else 0
    calib_data, verify_data = calib.split(holdout) if holdout else (calib, None)
    b_model = _rename_inputs(b.model, corr.inputs)

    # statistics
    t = time.perf_counter()
    plan = ZipPlan(a, b, corr, trunk, {}, names)
    spaces = zipped_spaces(a, trunk)
    points = merge_points(a, trunk)
    requests = []
    for sid in spaces:
        for name in points[sid]:
            ts = a.tensor_spaces[name]
            requests.append(FeatureRequest(f"space:{sid}", [name, corr.tensors[name]], ts.axis, ts.expand))
    do_repair = repair and method != "ensemble" and bool(spaces)
    if do_repair:
        requests += target_requests(plan, repair_points(a, trunk))
    stats = {}
    if requests:
        logger.info("calibrating on %d samples (%d feature spaces)", calib_data.num_samples, len(spaces))
        stats = collect_stats([a.model, b_model], requests, calib_data, batch_size, device, progress=progress,
                              desc="calibrating")
    times["calibrate"] = time.perf_counter() - t

    # matching
    t = time.perf_counter()
    card_spaces = []
    for sid in spaces:
        width = a.spaces[sid].width
        key = f"space:{sid}"
        correlation = stats[key].correlation() if method in ("zip", "permute") else None
        matching = solve(method, correlation, width, 2, alpha, beta)
        plan.matchings[sid] = matching
        samples = int(stats[key].count)
        if samples < 2 * width:
            logger.warning("feature space %d (width %d) has only %d samples: its statistics are thin", sid, width,
                           samples)
        card_spaces.append({"space": sid, "width": width, "merge_points": points[sid], "samples": samples,
                            "cross_model_merges": int(matching.cross_merges),
                            "within_model_merges": [int(x) for x in matching.within_merges],
                            "mean_merged_correlation": None if np.isnan(matching.mean_merge_correlation)
                            else float(matching.mean_merge_correlation)})
    times["solve"] = time.perf_counter() - t

    t = time.perf_counter()
    surgery = build(plan)
    times["surgery"] = time.perf_counter() - t
    repair_summary = {"applied": False}
    if do_repair:
        t = time.perf_counter()
        logger.info("repairing statistics of %d layers", len(repair_points(a, trunk)))
        repair_summary = repair_statistics(plan, surgery, stats, calib_data, batch_size, device)
        repair_summary["applied"] = True
        times["repair"] = time.perf_counter() - t
    merged = surgery.model
    try:
        onnx.checker.check_model(merged, full_check=True)
    except Exception as exc:  # noqa: BLE001 - the checker raises several types
        raise ModelError(f"internal error: the merged model fails the ONNX checker: {exc}") from exc

    verification = {}
    if verify:
        t = time.perf_counter()
        verification = _verify(merged, [a.model, b_model], names, verify_data or calib_data, batch_size, device)
        times["verify"] = time.perf_counter() - t

    card = {
        "tool": "onnxzip", "version": __version__,
        "inputs": {names[0]: {"path": path_a, "sha256": sha_a}, names[1]: {"path": path_b, "sha256": sha_b}},
        "method": method, "alpha": alpha, "beta": beta, "stop_at": stop_at, "seed": seed,
        "calibration": {"source": None if isinstance(data, (np.ndarray, dict)) else os.fspath(data),
                        "samples": calib_data.num_samples, "verification_samples": holdout},
        "trunk": {"weighted_layers": len(a.weighted),
                  "weighted_layers_zipped": sum(1 for i in a.weighted if i in trunk),
                  "nodes": len(trunk), "task_heads": [a.nodes[i].name for i in a.heads]},
        "unmerged": [{"node": a.nodes[i].name, "op": a.nodes[i].op_type, "reason": r} for i, r in unmerged],
        "spaces": card_spaces,
        "parameters": {"merged": count_parameters(merged), "a": count_parameters(model_a),
                       "b": count_parameters(model_b)},
        "repair": repair_summary,
        "verification": verification,
    }
    merged.metadata_props.add(key="onnxzip.card", value=json.dumps(card, sort_keys=True))
    times["total"] = time.perf_counter() - t0
    card["seconds"] = {k: round(v, 3) for k, v in times.items()}
    if output is not None:
        from .onnx_io import save_model_atomic
        save_model_atomic(merged, output, force=force)
        tmp = output + ".json.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(card, f, indent=2, sort_keys=True)
            os.replace(tmp, output + ".json")
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    return MergeResult(merged, output, card)


def _verify(merged, models, names, data: CalibrationData, batch_size, device) -> dict:
    """Per head: top-1 agreement and relative error of the merged model against the original it stands for."""
    out = run_model(merged, data, batch_size, device)
    heads = []
    for m, model in enumerate(models):
        ref = run_model(model, data, batch_size, device)
        for o in model.graph.output:
            got = out[f"{names[m]}/{o.name}"]
            want = ref[o.name]
            if got.dtype.kind == "f" and not np.isfinite(got).all():
                raise VerificationError(f"the merged model's output '{names[m]}/{o.name}' is not finite (NaN or inf) "
                                        "on held-back calibration samples")
            if got.dtype.kind != "f":
                continue
            rel = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))
            agree = float(np.mean(got.reshape(len(got), -1).argmax(1) == want.reshape(len(want), -1).argmax(1)))
            heads.append({"output": f"{names[m]}/{o.name}", "model": names[m], "top1_agreement": agree,
                          "relative_error": rel})
    return {"samples": int(data.num_samples), "heads": heads}
