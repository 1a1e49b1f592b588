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
since correcting one layer changes the statistics of every layer after it (one pass with in-graph probes when the
repair set fits in memory as one batch, else one pass per layer).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .calibration import CalibrationData, FeatureRequest, collect_stats, make_session
from .graph import Analysis, TensorSpace, weight_input
from .onnx_io import MAPPED_MIN_BYTES, tensor_array
from .surgery import Surgery, ZipPlan, zipped_spaces

log = logging.getLogger("onnxzip")


@dataclass
class RepairPoint:
    """One weighted layer and the tensor where its per-channel statistics are corrected.

    `model` None: a trunk layer, corrected towards the merge-weighted average of the source channels' statistics.
    `model` m: model m's copy of a layer after the stop point, corrected back to model m's own statistics (the
    paper resets every BatchNorm of the merged model, the unmerged layers' included: they now read unmerged
    features, whose statistics drifted)."""

    layer: int  # node index of the weighted layer
    chain: list  # node indices from the layer to the tensor: the layer, then Add-bias and/or BN nodes
    tensor: str  # model A's name of the corrected tensor
    space: TensorSpace
    model: int | None = None

    @property
    def key(self) -> str:
        return f"repair:{self.tensor}"


def _chain(a: Analysis, i: int, same_side) -> tuple:
    """The layer's output and the per-channel affine nodes (bias Add, BatchNorm) that follow it on its side."""
    chain = [i]
    tensor = a.model.graph.node[i].output[0]
    while True:
        users = a.consumers.get(tensor, [])
        if len(users) != 1 or tensor in a.output_names:
            break
        j, _ = users[0]
        nxt = a.model.graph.node[j]
        if not same_side(j):
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
    return chain, tensor


def repair_points(a: Analysis, trunk: set, branches: bool = False, num_models: int = 2) -> list:
    """Every weighted trunk layer whose output is a zipped space; with `branches`, also each model's copy of every
    weighted layer after the stop point that reads (directly or not) the trunk, task heads excepted."""
    zipped = set(zipped_spaces(a, trunk))
    points = []
    for i in sorted(trunk):
        info = a.nodes[i]
        if info.kind != "weighted" or info.out_space.space not in zipped:
            continue
        chain, tensor = _chain(a, i, lambda j: j in trunk)
        points.append(RepairPoint(i, chain, tensor, a.tensor_spaces[tensor]))
    if branches and points:
        for i in a.weighted:
            if i in trunk or i in a.heads or a.nodes[i].out_space is None:
                continue
            if not any(wa.role == "out" for wa in a.weight_axes(i, weight_input(a.nodes[i].op_type))):
                continue
            chain, tensor = _chain(a, i, lambda j: j not in trunk)
            if tensor not in a.tensor_spaces:
                continue
            for m in range(num_models):
                points.append(RepairPoint(i, chain, tensor, a.tensor_spaces[tensor], m))
    return points


def target_requests(plan: ZipPlan, points: list) -> list:
    """Moments of the corrected tensors in every source model (collected with the calibration pass)."""
    unique = {p.key: p for p in points}
    return [FeatureRequest(p.key, plan.tensor_names(p.tensor), p.space.axis, p.space.expand, full=False)
            for p in unique.values()]


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    for init in model.graph.initializer:
        if init.name == name:
            return init
    raise KeyError(name)


def _scale_initializer(model, name, axis, scale, shift=None, weights=None):
    """value * scale (+ shift) along `axis`, written back in place (a large one into `weights`, the merged model's
    WeightFile, where it has one)."""
    init = _initializer(model, name)
    value = tensor_array(init).astype(np.float64)
    shape = [1] * value.ndim
    shape[axis] = -1
    value = value * scale.reshape(shape)
    if shift is not None:
        value = value + shift.reshape(shape)
    value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
    if weights is not None and value.nbytes >= MAPPED_MIN_BYTES:
        init.CopyFrom(weights.add(name, value))
    else:
        init.CopyFrom(numpy_helper.from_array(value, name))


def merged_tensor(plan: ZipPlan, surgery: Surgery, point: RepairPoint) -> str:
    """The name in the merged graph of the tensor `point` corrects."""
    if point.model is None:
        return surgery.trunk_tensors[point.tensor]
    name = plan.tensor_name(point.tensor, point.model)
    return f"{plan.names[point.model]}/{name}"


def _input(surgery: Surgery, point: RepairPoint, node: int, j: int) -> str:
    if point.model is None:
        return surgery.trunk_inputs[(node, j)]
    return surgery.branch_inputs[(point.model, node, j)]


def fold_correction(plan: ZipPlan, surgery: Surgery, point: RepairPoint, scale: np.ndarray, shift: np.ndarray) -> bool:
    """Fold y -> scale*y + shift into the nodes of `point`. False where no bias can take the shift."""
    a = plan.a
    model = surgery.model
    last = point.chain[-1]
    if a.nodes[last].op_type == "BatchNormalization":
        _scale_initializer(model, _input(surgery, point, last, 1), 0, scale, weights=surgery.weights)
        _scale_initializer(model, _input(surgery, point, last, 2), 0, scale, shift, weights=surgery.weights)
        return True
    space = point.space.space
    layer = point.layer
    node_name = surgery.trunk_nodes[layer] if point.model is None else surgery.branch_nodes[(point.model, layer)]
    node = model.graph.node[[n.name for n in model.graph.node].index(node_name)]
    k_weight = weight_input(a.nodes[layer].op_type)
    (wa,) = [w for w in a.weight_axes(layer, k_weight) if w.role == "out"]
    _scale_initializer(model, _input(surgery, point, layer, k_weight), wa.axis, scale, weights=surgery.weights)
    biases = []  # (node index, input index, axis) of per-channel additive constants along the chain
    for i in point.chain:
        for k in range(len(a.model.graph.node[i].input)):
            if i == layer and k == k_weight:
                continue
            for w in a.weight_axes(i, k):
                if w.role == "out" and w.space == space:
                    biases.append((i, k, w.axis))
    for n, (i, k, axis) in enumerate(biases):
        last_bias = n == len(biases) - 1
        _scale_initializer(model, _input(surgery, point, i, k), axis, scale, shift if last_bias else None,
                           weights=surgery.weights)
    if biases:
        return True
    op = a.nodes[layer].op_type
    if op == "Gather":
        # an embedding table: each output is one row of it, so the shift folds into every row exactly
        _scale_initializer(model, _input(surgery, point, layer, k_weight), wa.axis, np.ones_like(scale), shift,
                           weights=surgery.weights)
        return True
    if op in ("Conv", "Gemm"):
        # no bias to absorb the shift: give the layer one
        beta = 1.0
        for attr in node.attribute:
            if attr.name == "beta":
                beta = attr.f
        dtype = onnx.helper.tensor_dtype_to_np_dtype(_initializer(model, _input(surgery, point, layer, 1)).data_type)
        name = f"{node_name}/repair_bias"
        model.graph.initializer.append(numpy_helper.from_array((shift / beta).astype(dtype), name))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = name
        if point.model is None:
            surgery.trunk_inputs[(layer, 2)] = name
        else:
            surgery.branch_inputs[(point.model, layer, 2)] = name
        return True
    return False


def _batchnorm_targets(plan: ZipPlan, point: RepairPoint) -> tuple | None:
    """The paper's BN reset, where every model's BatchNorm parameters at the point are known (BN kept, or recorded
    before folding): after a reset, BN writes mean beta and std |gamma| of the merged BatchNorm, whose parameters
    are merged per channel with M (``gamma* = sum_m M_m gamma_m``). For a layer after the stop point, its own
    model's BatchNorm. None where they are not known."""
    names = [point.tensor] + [c.tensors.get(point.tensor) for c in plan.correspondences[1:]]
    params = [analysis.batchnorm_params.get(name) for analysis, name in zip(plan.analyses, names)]
    width = plan.a.spaces[point.space.space].width
    if point.space.expand != 1 or any(p is None or p[0].shape != (width,) for p in params):
        return None
    if point.model is not None:
        gamma, beta = params[point.model]
        return beta, np.abs(gamma)
    matching = plan.matching(point.space.space)
    gamma = sum(matching.merge[m] @ params[m][0] for m in range(len(matching.merge)))
    beta = sum(matching.merge[m] @ params[m][1] for m in range(len(matching.merge)))
    return beta, np.abs(gamma)


def _targets(plan: ZipPlan, point: RepairPoint, targets: dict, kind: str = "measured") -> tuple:
    """The target per merged channel: REPAIR's, the merge-weighted average of the source channels' measured mean and
    std; with kind 'batchnorm', the paper's BN reset where BatchNorm parameters are known (`_batchnorm_targets`).
    For a layer after the stop point, its own model's."""
    reset = _batchnorm_targets(plan, point) if kind == "batchnorm" else None
    if reset is not None:
        return reset
    width = plan.a.spaces[point.space.space].width
    source = targets[point.key]
    mu_src, sd_src = source.mean, source.std()
    if point.model is not None:
        m = point.model
        return mu_src[m * width:(m + 1) * width], sd_src[m * width:(m + 1) * width]
    matching = plan.matching(point.space.space)
    n = len(matching.merge)
    mu_t = sum(matching.merge[m] @ mu_src[m * width:(m + 1) * width] for m in range(n))
    sd_t = sum(matching.merge[m] @ sd_src[m * width:(m + 1) * width] for m in range(n))
    return mu_t, sd_t


ACTIVATIONS = ("Relu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "ThresholdedRelu", "Elu", "Selu", "Celu",
               "Sigmoid", "Tanh", "Softplus", "Gelu", "Mish")


def _activation_after(a: Analysis, tensor: str) -> str | None:
    """The output of the activation that alone reads `tensor`, if any."""
    users = a.consumers.get(tensor, [])
    if len(users) == 1 and a.model.graph.node[users[0][0]].op_type in ACTIVATIONS:
        return a.model.graph.node[users[0][0]].output[0]
    return None


def activation_requests(plan: ZipPlan, points: list) -> list:
    """Moments after each point's activation in every source model: channels constant there (dead ReLUs) are
    left alone by repair."""
    out = {}
    for p in points:
        post = _activation_after(plan.a, p.tensor)
        if post is not None and f"post:{p.tensor}" not in out:
            out[f"post:{p.tensor}"] = FeatureRequest(f"post:{p.tensor}", plan.tensor_names(post),
                                                     p.space.axis, p.space.expand, full=False)
    return list(out.values())


def _frozen(plan: ZipPlan, point: RepairPoint, targets: dict) -> np.ndarray:
    """Channels to leave as they are: every source channel they stand for is constant after the activation (a dead
    unit). Their merged pre-activations may differ, and rescaling them towards the sources' spread would revive
    them; left alone, an average of dead units stays dead."""
    width = plan.a.spaces[point.space.space].width
    stats = targets.get(f"post:{point.tensor}")
    if stats is None:  # one flag per channel of the corrected tensor: merged channels in the trunk (--width)
        return np.zeros(width if point.model is not None else plan.matching(point.space.space).merged_width,
                        dtype=bool)
    constant = stats.std() <= 1e-7 * np.maximum(1.0, np.abs(stats.mean))
    if point.model is not None:
        return constant[point.model * width:(point.model + 1) * width].copy()
    matching = plan.matching(point.space.space)
    members = np.concatenate(matching.merge, axis=1) > 0  # merged channel x source channel
    return np.array([constant[row].all() for row in members])


REPAIR_TARGETS = ("measured", "batchnorm")


def _threshold(sd_t: np.ndarray, eps: float) -> float:
    # a channel that the merge left (nearly) constant cannot be rescaled meaningfully: it is only shifted
    return eps * max(1.0, float(np.max(sd_t)))


def _correction(mu, sd, mu_t, sd_t, eps):
    ok = sd > _threshold(sd_t, eps)
    scale = np.where(ok, sd_t / np.where(ok, sd, 1.0), 1.0)
    return scale, mu_t - scale * mu


def _bytes_per_sample(a: Analysis, num_models: int = 2) -> int:
    """A rough bound on the memory one sample needs in one batch: every float tensor of every branch at once."""
    per_sample = sum(int(np.prod(shape[1:], dtype=np.int64)) for name, shape in a.shapes.items()
                     if shape and name not in a.initializers)
    return max(1, num_models * 4 * per_sample)


# one-pass repair needs at least this many samples in its batch (or all of them, if fewer) to be trusted;
# per-channel means and stds of conv features also average over every spatial position
MIN_ONE_PASS_SAMPLES = 128


def repair(plan: ZipPlan, surgery: Surgery, data: CalibrationData, models: list, batch_size: int = 64,
           device: str = "auto", progress=False, eps: float = 1e-6, max_batch_bytes: int = 2 << 30,
           target_kind: str = "measured") -> dict:
    """Correct every repair point; returns a summary for the merge card.

    When the repair set fits in memory as one batch, one pass does it: a probe normalises each repair point with
    the batch's own per-channel statistics on the way (as BatchNorm in training mode does), so every point is
    measured with all corrections before it in place. Otherwise one pass per point, in graph order. `models` are
    the source models (inputs named as the merged model's); the targets are measured on them over exactly the
    samples the merged model is measured on, so that merging a model with itself changes nothing.
    `target_kind` 'batchnorm': the paper's BN reset targets where BatchNorm parameters are known (see `_targets`).
    """
    points = repair_points(plan.a, plan.trunk, branches=True, num_models=len(plan.analyses))
    summary = {"layers": 0, "branch_layers": 0, "samples": data.num_samples, "mean_abs_log_scale": 0.0,
               "unshifted": [], "passes": 0}
    if not points:
        return summary
    # graph order of the merged model: each point is measured with every point before it corrected
    position = {out: k for k, node in enumerate(surgery.model.graph.node) for out in node.output}
    points.sort(key=lambda p: position[merged_tensor(plan, surgery, p)])
    fits = min(data.num_samples, max_batch_bytes // _bytes_per_sample(plan.a, plan.num_models))
    fixed_batch = data._fixed_batch() is not None  # a model that fixes its batch size can't take one big batch
    # the one-pass probes reduce over every axis but the channels, so they need each point's rank; where shape
    # inference does not know one (after an operator it cannot infer), every point is measured in its own pass
    ranks_known = all(point.tensor in plan.a.ranks for point in points)
    if not ranks_known:
        log.info("statistics repair: the rank of %s is unknown to shape inference; one pass per layer",
                 next(p.tensor for p in points if p.tensor not in plan.a.ranks))
    one_pass = ranks_known and not fixed_batch and fits >= min(data.num_samples, MIN_ONE_PASS_SAMPLES)
    if one_pass and fits < data.num_samples:
        data = data.split(data.num_samples - fits)[0]
    summary["samples"] = int(data.num_samples)
    requests = target_requests(plan, points) + activation_requests(plan, points)
    targets = collect_stats(models, requests, data, batch_size, device)
    goals = [_targets(plan, p, targets, target_kind) for p in points]
    if target_kind == "batchnorm":
        summary["batchnorm_targets"] = sum(_batchnorm_targets(plan, p) is not None for p in points)
    frozen = [_frozen(plan, p, targets) for p in points]
    summary["frozen_channels"] = int(sum(f.sum() for f in frozen))
    measured = None
    if one_pass:
        measured = _measure_in_one_pass(plan, surgery, points, goals, frozen, data, device, eps, data.num_samples)
        summary["passes"] = 1
    log_scales = []
    for n, point in enumerate(points):
        if callable(progress):
            progress(n, len(points))
        if measured is not None:
            mu, sd = measured[n]
        else:
            request = FeatureRequest(point.key, [merged_tensor(plan, surgery, point)], point.space.axis,
                                     point.space.expand, full=False)
            stats = collect_stats([surgery.model], [request], data, batch_size, device)[point.key]
            mu, sd = stats.mean, stats.std()
            summary["passes"] += 1
        scale, shift = _correction(mu, sd, *goals[n], eps)
        scale[frozen[n]], shift[frozen[n]] = 1.0, 0.0
        if not fold_correction(plan, surgery, point, scale, shift):
            summary["unshifted"].append(plan.a.nodes[point.layer].name)
        if point.model is None:
            log_scales.append(np.abs(np.log(np.maximum(scale, 1e-12))).mean())
            summary["layers"] += 1
        else:
            summary["branch_layers"] += 1
    if callable(progress):
        progress(len(points), len(points))
    if log_scales:
        summary["mean_abs_log_scale"] = float(np.mean(log_scales))
    return summary


def _measure_in_one_pass(plan, surgery, points, goals, frozen, data, device, eps, samples) -> list:
    """Per repair point, the per-channel mean and std it has once every earlier point is corrected."""
    model = copy.deepcopy(surgery.model)
    graph = model.graph
    opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 13)
    position = {out: k for k, node in enumerate(graph.node) for out in node.output}
    inserts, outputs = {}, []
    for n, (point, (mu_t, sd_t)) in enumerate(zip(points, goals)):
        tensor = merged_tensor(plan, surgery, point)
        rank = plan.a.ranks[point.tensor]
        axis = point.space.axis
        axes = [k for k in range(rank) if k != axis]
        shape = [1] * rank
        shape[axis] = -1
        p = f"repair_probe/{n}"
        consts = {f"{p}/mu_t": mu_t, f"{p}/sd_t": sd_t,
                  f"{p}/thr": np.full(1, _threshold(sd_t, eps)), f"{p}/one": np.ones(1)}
        for name, value in consts.items():
            value = np.asarray(value, dtype=np.float32)
            graph.initializer.append(numpy_helper.from_array(value.reshape(shape) if value.size > 1 else value,
                                                             name))
        graph.initializer.append(numpy_helper.from_array(np.asarray(frozen[n]).reshape(shape), f"{p}/frozen"))

        def reduce_mean(x, y):
            if opset >= 18:
                graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), f"{y}/axes"))
                return helper.make_node("ReduceMean", [x, f"{y}/axes"], [y], keepdims=1)
            return helper.make_node("ReduceMean", [x], [y], axes=axes, keepdims=1)

        nodes = [reduce_mean(tensor, f"{p}/mean"),
                 helper.make_node("Sub", [tensor, f"{p}/mean"], [f"{p}/centred"]),
                 helper.make_node("Mul", [f"{p}/centred", f"{p}/centred"], [f"{p}/sq"]),
                 reduce_mean(f"{p}/sq", f"{p}/var"),
                 helper.make_node("Sqrt", [f"{p}/var"], [f"{p}/std"]),
                 helper.make_node("Greater", [f"{p}/std", f"{p}/thr"], [f"{p}/ok"]),
                 helper.make_node("Max", [f"{p}/std", f"{p}/thr"], [f"{p}/safe"]),
                 helper.make_node("Div", [f"{p}/sd_t", f"{p}/safe"], [f"{p}/ratio"]),
                 helper.make_node("Where", [f"{p}/ok", f"{p}/ratio", f"{p}/one"], [f"{p}/scale"]),
                 helper.make_node("Mul", [f"{p}/centred", f"{p}/scale"], [f"{p}/scaled"]),
                 helper.make_node("Add", [f"{p}/scaled", f"{p}/mu_t"], [f"{p}/corrected"]),
                 helper.make_node("Where", [f"{p}/frozen", tensor, f"{p}/corrected"], [f"{p}/out"])]
        for node in graph.node:  # everything downstream reads the corrected tensor
            for k, name in enumerate(node.input):
                if name == tensor:
                    node.input[k] = f"{p}/out"
        inserts.setdefault(position[tensor], []).extend(nodes)
        outputs += [f"{p}/mean", f"{p}/std"]
    new_nodes = []
    for k, node in enumerate(graph.node):
        new_nodes.append(node)
        new_nodes.extend(inserts.get(k, []))
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs)
    session = make_session(model, device)
    feed = next(data.batches(samples))
    values = session.run(outputs, feed)
    return [(values[2 * n].astype(np.float64).reshape(-1), values[2 * n + 1].astype(np.float64).reshape(-1))
            for n in range(len(points))]
