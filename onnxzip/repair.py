"""Statistics repair: make each merged channel's mean and spread match those of the features it stands for.

Averaging features shifts and shrinks their distributions (ZIPIT.md, "Repairing statistics"). The paper resets
BatchNorm statistics; REPAIR (Jordan et al., 2023) generalises this: after merging, each merged channel should
have the mean and standard deviation of the average of its source channels, ``mu_t = sum_m M_m mu_m`` and
``sigma_t = sum_m M_m sigma_m``. The correction is the per-channel affine map ``y -> a*y + c`` with
``a = sigma_t / sigma_merged`` and ``c = mu_t - a*mu_merged``, folded into the trunk's weights:

- where a BatchNormalization node follows the weighted layer (BN kept by the exporter), into its scale and bias;
- where the exporter folded BN into the layer (the default of both PyTorch exporters), into the layer's output
  channels and its bias (and the bias of a following ``Add``, for MatMul + Add linear layers).

Layers are corrected in graph order, each measured on the merged model with every earlier correction in place,
since correcting one layer changes the statistics of every layer after it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .calibration import CalibrationData, FeatureRequest, collect_stats
from .graph import Analysis, TensorSpace
from .surgery import Surgery, ZipPlan, zipped_spaces

log = logging.getLogger("onnxzip")


@dataclass
class RepairPoint:
    """One weighted trunk layer and the tensor where its per-channel statistics are corrected."""

    layer: int  # node index of the weighted layer
    chain: list  # node indices from the layer to the tensor: the layer, then Add-bias and/or BN nodes
    tensor: str  # model A's name of the corrected tensor
    space: TensorSpace

    @property
    def key(self) -> str:
        return f"repair:{self.tensor}"


def repair_points(a: Analysis, trunk: set) -> list:
    """Every weighted trunk layer whose output is a zipped space, with the affine chain that follows it."""
    zipped = set(zipped_spaces(a, trunk))
    points = []
    for i in sorted(trunk):
        info = a.nodes[i]
        if info.kind != "weighted" or info.out_space.space not in zipped:
            continue
        chain = [i]
        tensor = a.model.graph.node[i].output[0]
        while True:
            users = a.consumers.get(tensor, [])
            if len(users) != 1 or tensor in a.output_names:
                break
            j, _ = users[0]
            nxt = a.model.graph.node[j]
            if j not in trunk:
                break
            if nxt.op_type == "BatchNormalization":
                chain.append(j)
                tensor = nxt.output[0]
                break
            is_bias = nxt.op_type == "Add" and any(wa.role == "out" for k in range(2) for wa in a.weight_axes(j, k))
            if not is_bias or a.nodes[chain[-1]].op_type == "BatchNormalization":
                break
            chain.append(j)
            tensor = nxt.output[0]
        points.append(RepairPoint(i, chain, tensor, a.tensor_spaces[tensor]))
    return points


def target_requests(plan: ZipPlan, points: list) -> list:
    """Moments of the corrected tensors in both source models (collected with the calibration pass)."""
    b_name = plan.correspondence.tensors
    return [FeatureRequest(p.key, [p.tensor, b_name[p.tensor]], p.space.axis, p.space.expand, full=False)
            for p in points]


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    for init in model.graph.initializer:
        if init.name == name:
            return init
    raise KeyError(name)


def _scale_initializer(model, name, axis, scale, shift=None):
    """value * scale (+ shift) along `axis`, written back in place."""
    init = _initializer(model, name)
    value = numpy_helper.to_array(init).astype(np.float64)
    shape = [1] * value.ndim
    shape[axis] = -1
    value = value * scale.reshape(shape)
    if shift is not None:
        value = value + shift.reshape(shape)
    init.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(init).dtype), name))


def fold_correction(plan: ZipPlan, surgery: Surgery, point: RepairPoint, scale: np.ndarray, shift: np.ndarray) -> bool:
    """Fold y -> scale*y + shift into the trunk nodes of `point`. False where no bias can take the shift."""
    a = plan.a
    model = surgery.model
    last = point.chain[-1]
    if a.nodes[last].op_type == "BatchNormalization":
        _scale_initializer(model, surgery.trunk_inputs[(last, 1)], 0, scale)
        _scale_initializer(model, surgery.trunk_inputs[(last, 2)], 0, scale, shift)
        return True
    space = point.space.space
    layer = point.layer
    node = model.graph.node[[n.name for n in model.graph.node].index(surgery.trunk_nodes[layer])]
    (wa,) = [w for w in a.weight_axes(layer, 1) if w.role == "out"]
    _scale_initializer(model, surgery.trunk_inputs[(layer, 1)], wa.axis, scale)
    biases = []  # (node index, input index, axis) of per-channel additive constants along the chain
    for i in point.chain:
        for k in range(len(a.model.graph.node[i].input)):
            if i == layer and k == 1:
                continue
            for w in a.weight_axes(i, k):
                if w.role == "out" and w.space == space:
                    biases.append((i, k, w.axis))
    for n, (i, k, axis) in enumerate(biases):
        last_bias = n == len(biases) - 1
        _scale_initializer(model, surgery.trunk_inputs[(i, k)], axis, scale, shift if last_bias else None)
    if biases:
        return True
    op = a.nodes[layer].op_type
    if op in ("Conv", "Gemm"):
        # no bias to absorb the shift: give the layer one
        beta = 1.0
        for attr in node.attribute:
            if attr.name == "beta":
                beta = attr.f
        dtype = numpy_helper.to_array(_initializer(model, surgery.trunk_inputs[(layer, 1)])).dtype
        name = f"{surgery.trunk_nodes[layer]}/repair_bias"
        model.graph.initializer.append(numpy_helper.from_array((shift / beta).astype(dtype), name))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        surgery.trunk_inputs[(layer, 2)] = name
        return True
    return False


def repair(plan: ZipPlan, surgery: Surgery, targets: dict, data: CalibrationData, batch_size: int = 64,
           device: str = "auto", progress=False, eps: float = 1e-6) -> dict:
    """Correct every repair point in graph order; returns a summary for the merge card."""
    points = repair_points(plan.a, plan.trunk)
    summary = {"layers": 0, "samples": data.num_samples, "mean_abs_log_scale": 0.0, "unshifted": []}
    log_scales = []
    for n, point in enumerate(points):
        if callable(progress):
            progress(n, len(points))
        stats = collect_stats([surgery.model], [FeatureRequest(point.key, [surgery.trunk_tensors[point.tensor]],
                                                               point.space.axis, point.space.expand, full=False)],
                              data, batch_size, device)[point.key]
        width = plan.a.spaces[point.space.space].width
        source = targets[point.key]
        mu_src, sd_src = source.mean, source.std()
        matching = plan.matching(point.space.space)
        mu_t = sum(matching.merge[m] @ mu_src[m * width:(m + 1) * width] for m in range(len(matching.merge)))
        sd_t = sum(matching.merge[m] @ sd_src[m * width:(m + 1) * width] for m in range(len(matching.merge)))
        mu, sd = stats.mean, stats.std()
        # a channel that the merge left (nearly) constant cannot be rescaled meaningfully: only shift it
        ok = sd > eps * max(1.0, float(np.max(sd_t)))
        scale = np.where(ok, sd_t / np.where(ok, sd, 1.0), 1.0)
        shift = mu_t - scale * mu
        if not fold_correction(plan, surgery, point, scale, shift):
            summary["unshifted"].append(plan.a.nodes[point.layer].name)
        log_scales.append(np.abs(np.log(np.maximum(scale, 1e-12))).mean())
        summary["layers"] += 1
    if callable(progress):
        progress(len(points), len(points))
    if log_scales:
        summary["mean_abs_log_scale"] = float(np.mean(log_scales))
    return summary
