"""Least-squares refit: fit every merged layer, in network order, to what the source models computed.

Merging weights through M and U (surgery) is a guess at the merged layer; statistics repair only corrects each
channel's mean and spread. Once the matchings are fixed, each merged layer can instead be *fitted* (ZIPIT.md,
"Beyond the paper"; the closed forms of RegMean, arXiv 2212.09849, and PLeaS, arXiv 2407.02447):

- target: for a trunk layer, the merge-weighted combination ``T = sum_m M_m z_m`` of what each source model's same
  layer outputs on the same input, each source run on its own graph (the tensor as written: after a bias ``Add``
  and a kept BatchNorm, before the activation); for model m's copy of a layer after the stop point, z_m itself;
- regressors: the merged model's own input to the layer, with every earlier refit in place (errors do not
  compound), a constant column for the bias; a Conv regresses on the input patch of each output position, per
  group; a seeded subsample of rows where there are many more rows than regressors;
- residual joins: where the layer's output is added to another tensor, the layer is fitted so that the *sum*
  hits the merged target of the sum (the other operand as the merged model computes it is subtracted);
- solve: ridge regression towards the current weights, ``W = (XᵀT + λ W0ᵀ)ᵀ (XᵀX + λI)⁻¹``, in float64 from
  streamed sums (XᵀX, XᵀT), so memory is O(d²) per layer whatever the number of samples. λ is chosen per layer
  from a grid by the layer's error on held-back samples (no labels); the current weights are kept where no λ
  beats them there. A layer whose sums alone would exceed MAX_SUMS_BYTES (a head of millions of classes) is left
  as surgery made it.

Layers are grouped into levels (a layer's input and residual partner depend only on earlier levels); one
onnxruntime pass per level runs only the part of the merged graph that level needs. The source models run once,
for all targets, on the rows each layer samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .calibration import (CalibrationData, RowRequest, SourceRun, _progress_reporter, as_rows, expose_tensors,
                          pass_session, select_rows, subset_of_rows)
from .errors import VerificationError
from .graph import Analysis, TensorSpace, shape_batch
from .onnx_io import MAPPED_MIN_BYTES, tensor_array, without_weights
from .repair import _chain  # the layer, then its bias Add / BatchNorm: the same chain the repair corrects
from .surgery import Surgery, ZipPlan, zipped_spaces

log = logging.getLogger("onnxzip")

REFIT_METHODS = ("ls", "none")
# Ridge strengths, relative to the mean diagonal of XᵀX (so they do not depend on the features' scale).
LAMBDA_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Without held-back samples to choose from the grid.
DEFAULT_LAMBDA = 1e-4
# Rows (samples x output positions) kept per layer: at most this many per regressor, at least MIN_ROWS.
ROWS_PER_REGRESSOR = 32
MIN_ROWS = 20000
# The calibration pass keeps the source models' target rows for the refit up to this size in memory, and beyond it
# up to ROW_SPILL_BYTES (and half the free space there) in a temporary file (`calibration.RowSpill`); the rest are
# found by a source pass of the refit's own, which runs the source models over the samples again.
ROW_CACHE_BYTES = 1 << 30
ROW_SPILL_BYTES = 64 << 30
# Regressor and target rows a level holds before it takes their products (`_Pending`), and the most rows one
# product takes at a time (their float64 copies).
ROW_BUFFER_BYTES = 128 << 20
PRODUCT_BYTES = 64 << 20
# Activations kept between levels (so a level runs from earlier levels' tensors, not from the graph inputs).
CACHE_BYTES = 2 << 30
# A Gram matrix whose reciprocal condition number (LAPACK's 1-norm estimate) is below this is called singular in the
# card.
SINGULAR_RCOND = 1e-10
# A layer whose regression sums (XᵀX and XᵀT in float64, calibration and held-back) would take more than this is
# not refitted: it keeps the weights surgery gave it, and the card says why. Its targets and its solve take up to
# about twice as much again, so this bounds the refit's memory per layer whatever the layer's size (a
# 2-million-class head: 8 GiB of sums), above every layer of ResNet-50, ConvNeXt-T and ViT-B/16 (at most 0.38 GB:
# ResNet-50's 3x3 convolutions of 512 channels).
MAX_SUMS_BYTES = 512 << 20
# A group whose fitted W (outputs x regressors, float64) is larger than this is solved a block of outputs at a time
# (the λ scores summed block by block): its solve holds W0 and W, not half a dozen copies of the layer.
SOLVE_BLOCK_BYTES = 32 << 20


@dataclass
class RefitLayer:
    """One Conv/Gemm/MatMul of the merged model and what it is fitted to."""

    node: int  # node index in model A's (normalised) graph
    model: int | None  # None: the trunk; m: model m's copy after the stop point
    op: str
    merged_node: str  # its name in the merged graph
    chain: list  # A node indices: the layer, then a bias Add and/or a kept BatchNorm
    target: list  # per source model, the tensor fitted: the chain end, or at a residual join the sum
    end: list  # per source model, the chain end (the target once a join is not fitted through the sum)
    space: TensorSpace | None  # trunk layers: the space of the target (whose merge matrices make it)
    channel_axis: int  # channel axis of the layer's output (1 for Conv/Gemm, last for MatMul)
    partner: str | None = None  # merged tensor added to the chain end at a residual join
    output: str | None = None  # at a residual join: the merged chain-end tensor (the Add's operand)
    regressors: int = 0  # input channels x kernel positions per group
    level: int = 0
    key: int = 0  # position in the list
    rows_key: int = 0  # seeds the row sampling (`row_key`)

    def describe(self, plan: ZipPlan) -> str:
        where = "trunk" if self.model is None else plan.names[self.model]
        return f"{plan.a.nodes[self.node].name} ({where})"


@dataclass
class _Sums:
    """Streamed sums of one regression (one group of one layer): calibration and held-back parts."""

    gram: np.ndarray
    cross: np.ndarray
    t_sq: float = 0.0
    t_sum: np.ndarray | None = None
    rows: int = 0
    h_gram: np.ndarray | None = None
    h_cross: np.ndarray | None = None
    h_t_sq: float = 0.0
    h_t_sum: np.ndarray | None = None
    h_rows: int = 0


# ---------------------------------------------------------------------------------------------------------------
# Which layers, in which order
# ---------------------------------------------------------------------------------------------------------------

def _node_by_name(model: onnx.ModelProto) -> dict:
    return {n.name: n for n in model.graph.node}


def _residual(a: Analysis, tensor: str, same_side) -> tuple | None:
    """(Add node index, index of the other operand) where `tensor` is added to another computed tensor."""
    users = a.consumers.get(tensor, [])
    if len(users) != 1 or tensor in a.output_names:
        return None
    j, k = users[0]
    node = a.model.graph.node[j]
    if node.op_type not in ("Add", "Sum") or len(node.input) != 2 or not same_side(j):
        return None
    other = node.input[1 - k]
    if other in a.initializers or other not in a.tensor_spaces or other == tensor:
        return None
    return j, 1 - k


def _candidates(plan: ZipPlan) -> list:
    """(node index, owners, chain, chain end, residual join) of every layer to refit in `plan`'s trunk and branches
    (owners: [None] for a trunk layer, every model for a layer after the stop point); no merged model needed."""
    a = plan.a
    trunk = plan.trunk
    zipped = set(zipped_spaces(a, trunk))
    found = []

    def candidate(i: int) -> bool:
        node = a.model.graph.node[i]
        return (node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in a.initializers
                and node.input[1] not in a.producer and a.nodes[i].kind in ("weighted", "carrier", "opaque")
                and a.shapes.get(node.output[0]) is not None and a.shapes.get(node.input[0]) is not None
                and not (node.op_type == "Gemm" and (_attr(node, "transA", 0) or not _per_channel_c(a, node))))

    for i in range(len(a.nodes)):
        if not candidate(i):
            continue
        if i in trunk:
            ts = a.tensor_spaces.get(a.model.graph.node[i].output[0])
            # (the queries of grouped-query attention are a view of their key heads, merged with the keys' matching)
            if ts is None or (ts.space not in zipped and not a.spaces[ts.space].queries_of_keys):
                continue
            side = (lambda j: j in trunk)
            owners = [None]
        else:
            side = (lambda j: j not in trunk)
            owners = list(range(len(plan.analyses)))
        chain, end = _chain(a, i, side)
        found.append((i, owners, chain, end, _residual(a, end, side)))
    return found


def _channel_axis(a: Analysis, i: int, end: str) -> int:
    return 1 if a.model.graph.node[i].op_type != "MatMul" else len(a.shapes.get(end, (0, 0))) - 1


def _source_regressors(a: Analysis, i: int) -> tuple:
    """(input channels x kernel positions per group, kernel positions) of A's layer i."""
    node = a.model.graph.node[i]
    weight = a.initializers[node.input[1]]
    out_axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and _attr(node, "transB", 0)) else 1
    kernel = int(np.prod(weight.shape[2:])) if node.op_type == "Conv" else 1
    return weight.size // weight.shape[out_axis], kernel


def layer_places(a: Analysis) -> dict:
    """Each layer with constant weights (node index) -> its place among them, in graph order."""
    order = [j for j, node in enumerate(a.model.graph.node) if node.op_type in ("Conv", "Gemm", "MatMul")
             and len(node.input) > 1 and node.input[1] in a.initializers]
    return {j: k for k, j in enumerate(order)}


def row_key(places: dict, i: int, join: bool) -> int:
    """The seed of the rows drawn for layer i's target (the sum at its residual join, or its own output): the same
    in every plan and pass, and in every export of the model (from the layer's place among the layers with
    constant weights, `layer_places`, not from tensor names)."""
    return 2 * places[i] + int(join)


def _fraction(regressors: int, num_samples: int, positions: int) -> float:
    """Share of a layer's rows kept: ROWS_PER_REGRESSOR per regressor, at least MIN_ROWS."""
    return min(1.0, max(MIN_ROWS, ROWS_PER_REGRESSOR * regressors) / max(num_samples * positions, 1))


def sums_bytes(regressors: int, outputs: int, groups: int, held: bool) -> int:
    """Bytes of a layer's streamed sums: per group XᵀX (d × d) and XᵀT (d × its outputs), float64, for the
    calibration samples and (with `held`) the held-back ones. Above MAX_SUMS_BYTES the layer is not refitted."""
    return (2 if held else 1) * groups * (regressors * regressors + regressors * (outputs // groups)) * 8


def spill_room(directory: str | None = None) -> int:
    """Bytes of target rows the calibration pass may write to a temporary file in `directory` (default: Python's
    temporary directory): ROW_SPILL_BYTES, or half the free space there where that is less."""
    import shutil
    import tempfile
    try:
        free = shutil.disk_usage(directory or tempfile.gettempdir()).free
    except OSError:
        return 0
    return min(ROW_SPILL_BYTES, free // 2)


def target_row_requests(plans: list, num_samples: int, held_samples: int, width: float,
                        budget_bytes: int | None = None, spill_bytes: int | None = None) -> list:
    """What the calibration pass keeps of the source models for the refit's targets (`calibration.RowRequest`),
    for every plan (a budget tries several) and widths up to `width`: each possible target tensor of every layer
    to refit, at the largest share of rows the layer can need, in network order while the rows fit in
    `budget_bytes` (default ROW_CACHE_BYTES) in memory, then in `spill_bytes` (default `spill_room()`) in a
    temporary file. The refit finds the rest with a source pass of its own."""
    budget_bytes = ROW_CACHE_BYTES if budget_bytes is None else budget_bytes
    spill_bytes = spill_room() if spill_bytes is None else spill_bytes
    requests, size, spilled = {}, 0, 0
    for plan in plans:
        a = plan.a
        places = layer_places(a)
        for i, owners, chain, end, join in _candidates(plan):
            d, kernel = _source_regressors(a, i)
            # merged input channels per group <= round(W x C): at most ceil(W x d) + one kernel, + the bias column
            upper = int(np.ceil(width * d)) + (kernel if width > 1 else 0) + 1
            for target in ([a.model.graph.node[join[0]].output[0]] if join else []) + [end]:
                key = row_key(places, i, target != end)
                shape = a.shapes.get(target)
                if key in requests or shape is None:
                    continue
                axis = _channel_axis(a, i, end)
                groups = int(_attr(a.model.graph.node[i], "group", 1))
                if sums_bytes(d, shape[axis], groups, held_samples > 0) > MAX_SUMS_BYTES:
                    continue  # too large to refit even at width 1 (with its bias column, larger still)
                positions = _positions(shape, axis, shape_batch(a))
                fraction = _fraction(upper, num_samples, positions)
                nbytes = int(fraction * (num_samples + held_samples) * positions) * shape[axis] * 4 * len(plan.analyses)
                spill = size + nbytes > budget_bytes
                if spill and spilled + nbytes > spill_bytes:
                    continue
                if spill:
                    spilled += nbytes
                else:
                    size += nbytes
                requests[key] = RowRequest(key, plan.tensor_names(target), axis, fraction, spill, nbytes)
    return list(requests.values())


def refit_layers(plan: ZipPlan, surgery: Surgery) -> list:
    """Every Conv/Gemm/MatMul with constant weights to refit: trunk layers writing a zipped space, and each model's
    copy of every layer after the stop point; with their targets, residual partners and levels."""
    a = plan.a
    merged_nodes = _node_by_name(surgery.model)
    layers = []
    for i, owners, chain, end, join in _candidates(plan):
        for m in owners:
            merged_name = surgery.trunk_nodes[i] if m is None else surgery.branch_nodes.get((m, i))
            if merged_name is None:
                continue
            target_a = a.model.graph.node[join[0]].output[0] if join else end
            partner = output = None
            if join:
                merged_add = merged_nodes[surgery.trunk_nodes[join[0]] if m is None
                                          else surgery.branch_nodes[(m, join[0])]]
                partner, output = merged_add.input[join[1]], merged_add.input[1 - join[1]]
            target = [_source_name(plan, target_a, k) for k in range(len(plan.analyses))]
            space = a.tensor_spaces.get(target_a) if m is None else None  # an Add ties: the same for the end
            if m is None and (space is None or space.expand != 1):
                continue
            op = a.model.graph.node[i].op_type
            layers.append(RefitLayer(i, m, op, merged_name, chain, target,
                                     [_source_name(plan, end, k) for k in range(len(plan.analyses))], space,
                                     _channel_axis(a, i, end), partner, output, _source_regressors(a, i)[0]))
    _levels(surgery.model, layers)
    places = layer_places(plan.a)
    for k, layer in enumerate(layers):
        layer.key = k
        # rows are drawn by layer and target alone, so the calibration pass can keep them beforehand
        layer.rows_key = row_key(places, layer.node, layer.target != layer.end)
    return layers


def _per_channel_c(a: Analysis, node: onnx.NodeProto) -> bool:
    """A Gemm's C is a per-output-channel bias (or absent): the only kind the refit writes."""
    if len(node.input) < 3 or not node.input[2]:
        return True
    c, weight = a.initializers.get(node.input[2]), a.initializers[node.input[1]]
    return c is not None and c.size in (1, weight.shape[0 if _attr(node, "transB", 0) else 1])


def _source_name(plan: ZipPlan, tensor_a: str, m: int) -> str:
    return plan.tensor_name(tensor_a, m)


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _levels(model: onnx.ModelProto, layers: list) -> None:
    """Each layer's level: 1 + the latest level of any refit layer upstream of its input or residual partner."""
    producers = {t: n for n in model.graph.node for t in n.output if t}
    # a partner computed from the layer's own output is no partner (y + f(y)): the layer fits its own output
    for layer in layers:
        if layer.partner and _depends_on(producers, layer.partner, layer.merged_node):
            layer.partner, layer.target = None, layer.end
    # two refit layers added together (a block's last conv and a shortcut conv): the smaller one is fitted first
    # to its own target, the larger one then fits the sum
    by_output = {layer.output: layer for layer in layers if layer.output}
    for layer in layers:
        other = by_output.get(layer.partner)
        if other is not None and other.partner == layer.output and other.model == layer.model:
            smaller = min((layer, other), key=lambda x: (x.regressors, x.node))
            smaller.partner, smaller.target = None, smaller.end
    by_node = {layer.merged_node: layer for layer in layers}
    changed = True
    while changed:  # a partner may come after the layer in graph order: repeat until nothing moves
        changed = False
        depth = {}  # tensor -> level of the latest refit it depends on
        for node in model.graph.node:
            incoming = max((depth.get(t, 0) for t in node.input if t), default=0)
            layer = by_node.get(node.name)
            if layer is not None:
                partner_level = depth.get(layer.partner, 0) if layer.partner else 0
                partner_level = max(partner_level, layer.level - 1)
                level = 1 + max(depth.get(node.input[0], 0), partner_level)
                changed |= level != layer.level
                layer.level = level
                incoming = max(incoming, level)
            for t in node.output:
                if t:
                    depth[t] = incoming


def _depends_on(producers: dict, tensor: str, node_name: str) -> bool:
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        node = producers.get(t)
        if node is None:
            continue
        if node.name == node_name:
            return True
        stack.extend(x for x in node.input if x)
    return False


# ---------------------------------------------------------------------------------------------------------------
# Layers as regressions: weights <-> a (F_out x d) matrix per group, and input rows
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class _Geometry:
    """How a Conv reads its input: kernel, strides, dilations, the padding before each spatial axis, groups."""

    kernel: tuple
    strides: tuple
    dilations: tuple
    pad_begin: tuple
    group: int


def conv_geometry(node: onnx.NodeProto, weight_shape: tuple, in_spatial: tuple, out_spatial: tuple) -> _Geometry:
    kernel = tuple(int(k) for k in weight_shape[2:])
    n = len(kernel)
    strides = tuple(_attr(node, "strides", None) or [1] * n)
    dilations = tuple(_attr(node, "dilations", None) or [1] * n)
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin = []
        for k in range(n):
            total = max(0, (out_spatial[k] - 1) * strides[k] + (kernel[k] - 1) * dilations[k] + 1 - in_spatial[k])
            begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
        pad_begin = tuple(begin)
    elif auto_pad == "VALID":
        pad_begin = (0,) * n
    else:
        pads = _attr(node, "pads", None) or [0] * (2 * n)
        pad_begin = tuple(int(p) for p in pads[:n])
    return _Geometry(kernel, strides, dilations, pad_begin, int(_attr(node, "group", 1)))


def conv_patches(x: np.ndarray, geometry: _Geometry, out_spatial: tuple, rows: np.ndarray) -> list:
    """Input patches of a Conv at the given output rows, one block per group: (len(rows), C_in/group * prod(kernel))
    C-ordered, column c*K + k, the order of the group's ``weight.reshape(C_out / group, -1)``; zero where the patch
    reaches into the padding.

    `rows` index the flattened (sample, output position...) grid, positions in C order.

    A grouped Conv's patches are gathered channel-major, (C_in, rows, K) in one take: a depthwise Conv's groups are
    then its slices as they lie (ConvNeXt's 7x7 depthwise layers, 384 groups of 49 regressors: 4x faster than
    copying each group's columns out of a (rows, C_in·K) block), and a group of several channels takes one
    transposing copy. An ungrouped one gathers each (row, kernel offset)'s channels, with no channel-major copy of
    the input first (a 3x3 Conv of 256 channels: 0.12 s against 0.23 s channel-major)."""
    n_out = int(np.prod(out_spatial)) if out_spatial else 1
    sample = rows // n_out
    coords = np.unravel_index(rows % n_out, out_spatial) if out_spatial else ()
    batch, channels, in_spatial = x.shape[0], x.shape[1], x.shape[2:]
    offsets = np.array(list(np.ndindex(*geometry.kernel)), dtype=np.int64).reshape(-1, len(geometry.kernel))
    # pad once so that every patch lies inside the padded input: one gather for every kernel offset at once
    pads = [(0, 0), (0, 0)]
    for ax in range(len(in_spatial)):
        last = (out_spatial[ax] - 1) * geometry.strides[ax] + (geometry.kernel[ax] - 1) * geometry.dilations[ax]
        pads.append((geometry.pad_begin[ax], max(0, last + 1 - geometry.pad_begin[ax] - in_spatial[ax])))
    padded = np.pad(x, pads) if any(p != (0, 0) for p in pads) else x
    # each (row, kernel offset)'s place in the flattened (sample, padded position) grid
    place = np.zeros((len(rows), offsets.shape[0]), dtype=np.int64)
    for ax, size in enumerate(padded.shape[2:]):
        place = place * size + (coords[ax][:, None] * geometry.strides[ax]
                                + offsets[None, :, ax] * geometry.dilations[ax])
    group, k = geometry.group, offsets.shape[0]
    positions = int(np.prod(padded.shape[2:]))
    if group == 1:
        # (rows, K, C_in) with the channels last, then C_in before K
        patches = padded.reshape(batch, channels, positions)[sample[:, None], :, place]
        return [np.ascontiguousarray(patches.transpose(0, 2, 1)).reshape(len(rows), -1)]
    place += sample[:, None] * positions
    by_channel = np.moveaxis(padded.reshape(batch, channels, positions), 1, 0).reshape(channels, -1)
    patches = np.take(by_channel, place, axis=1)  # (C_in, rows, K)
    per = channels // group
    # (group, rows, C_in/group, K): a copy only where a group holds several channels
    grouped = np.ascontiguousarray(patches.reshape(group, per, len(rows), k).transpose(0, 2, 1, 3))
    return [grouped[g].reshape(len(rows), per * k) for g in range(group)]


class _Layout:
    """A refit layer's weights as regression matrices (one per group: F_out_g x d, bias column last) and back."""

    def __init__(self, layer: RefitLayer, merged_nodes: dict, inits: dict, plan: ZipPlan, surgery: Surgery):
        self.layer = layer
        node = merged_nodes[layer.merged_node]
        self.node = node
        self.inits = inits
        self.weights = surgery.weights  # where large fitted weights go (a mapped merge), None: into the protobuf
        self.op = layer.op
        self.weight = tensor_array(inits[node.input[1]])
        self.alpha = float(_attr(node, "alpha", 1.0)) if layer.op == "Gemm" else 1.0
        self.beta = float(_attr(node, "beta", 1.0)) if layer.op == "Gemm" else 1.0
        self.trans_b = int(_attr(node, "transB", 0)) if layer.op == "Gemm" else 0
        self.group = int(_attr(node, "group", 1)) if layer.op == "Conv" else 1
        self.bias = None  # the layer's own bias (Conv, Gemm)
        if layer.op in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
            self.bias = tensor_array(inits[node.input[2]])
        self.adds = []  # (node, input index, value) of constant bias Adds after the layer
        self.batchnorm = None
        for i in layer.chain[1:]:
            name = surgery.trunk_nodes.get(i) if layer.model is None else surgery.branch_nodes.get((layer.model, i))
            chained = merged_nodes.get(name)
            if chained is None:
                continue
            if chained.op_type == "BatchNormalization":
                self.batchnorm = chained
            elif chained.op_type == "Add":
                k = next(k for k, t in enumerate(chained.input) if t in inits)
                self.adds.append((chained, k, tensor_array(inits[chained.input[k]])))
        if layer.op == "Conv":
            self.out_channels = self.weight.shape[0]
        elif layer.op == "Gemm":
            self.out_channels = self.weight.shape[0 if self.trans_b else 1]
        else:
            self.out_channels = self.weight.shape[1]
        # a bias column where the layer can carry one: Conv and Gemm (added where missing; not where Gemm's beta is
        # 0 or its C is no per-channel bias), any layer with a bias Add or a kept BatchNorm after it
        self.own_bias = layer.op == "Conv" or (layer.op == "Gemm" and self.beta != 0)
        self.has_bias = self.own_bias or bool(self.adds) or self.batchnorm is not None

    @property
    def regressors(self) -> int:
        """Columns of each group's regression (`matrices()[0].shape[1]`), from the weight's shape alone."""
        shape = self.weight.shape
        if self.op == "Conv":
            d = int(np.prod(shape[1:], dtype=np.int64))
        elif self.op == "Gemm":
            d = shape[1] if self.trans_b else shape[0]
        else:
            d = shape[0]
        return int(d) + int(self.has_bias)

    def sums_bytes(self, held: bool) -> int:
        return sums_bytes(self.regressors, self.out_channels, self.group, held)

    def _batchnorm_affine(self) -> tuple:
        node = self.batchnorm
        scale, bias, mean, var = (tensor_array(self.inits[node.input[j]]).astype(np.float64)
                                  for j in range(1, 5))
        s = scale / np.sqrt(var + float(_attr(node, "epsilon", 1e-5)))
        return s, bias - s * mean

    def _channels(self, value: np.ndarray) -> np.ndarray:
        return np.broadcast_to(value.astype(np.float64).reshape(-1), (self.out_channels,))

    def matrices(self) -> list:
        """Per group, the (F_out_g x d) matrix the layer computes now (a kept BatchNorm's map folded in)."""
        w = self.weight.astype(np.float64)
        if self.op == "Conv":
            per = w.shape[0] // self.group
            mats = [w[g * per:(g + 1) * per].reshape(per, -1) for g in range(self.group)]
        elif self.op == "Gemm":
            mats = [self.alpha * (w if self.trans_b else w.T)]
        else:
            mats = [w.T]
        bias = np.zeros(self.out_channels)
        if self.bias is not None and self.own_bias:
            bias = bias + self._channels(self.bias) * self.beta
        for _, _, value in self.adds:
            bias = bias + self._channels(value)
        if self.batchnorm is not None:
            scale, shift = self._batchnorm_affine()
            per = self.out_channels // len(mats)
            mats = [m * scale[g * per:(g + 1) * per, None] for g, m in enumerate(mats)]
            bias = bias * scale + shift
        if not self.has_bias:
            return mats
        per = self.out_channels // len(mats)
        return [np.concatenate([m, bias[g * per:(g + 1) * per, None]], axis=1) for g, m in enumerate(mats)]

    def write(self, model: onnx.ModelProto, mats: list) -> None:
        """Fitted matrices back into the layer (new initializers; the old ones are dropped at the end if unused)."""
        inits = self.inits
        weights = [m[:, :-1] if self.has_bias else m for m in mats]
        if self.op == "Conv":
            weight = np.concatenate(weights, axis=0).reshape(self.weight.shape)
        elif self.op == "Gemm":
            weight = weights[0] / self.alpha
            weight = weight if self.trans_b else weight.T
        else:
            weight = weights[0].T
        _set_input(model, inits, self.node, 1, weight.astype(self.weight.dtype), f"{self.node.name}/refit/weight",
                   self.weights)
        if not self.has_bias:
            return
        bias = np.concatenate([m[:, -1] for m in mats])
        # the whole fitted bias goes to one place: a kept BatchNorm (which becomes y = x + b), else the layer's own
        # bias, else the first bias Add; every other additive constant of the chain becomes 0
        places = ([("batchnorm", None)] if self.batchnorm is not None else []) + \
            ([("own", None)] if self.own_bias else []) + [("add", k) for k in range(len(self.adds))]
        target = places[0]
        if self.batchnorm is not None:
            _shift_batchnorm(model, inits, self.batchnorm, bias)
        if self.own_bias and (self.bias is not None or target[0] == "own"):
            value = bias / self.beta if target[0] == "own" else np.zeros_like(bias)
            dtype = self.bias.dtype if self.bias is not None else self.weight.dtype
            while len(self.node.input) < 3:
                self.node.input.append("")
            _set_input(model, inits, self.node, 2, value.astype(dtype), f"{self.node.name}/refit/bias")
        for k, (node, j, old) in enumerate(self.adds):
            value = bias if target == ("add", k) else np.zeros_like(bias)
            shape = old.shape if old.size == self.out_channels else (self.out_channels,)
            _set_input(model, inits, node, j, value.reshape(shape).astype(old.dtype), f"{node.name}/refit/bias")


def _set_input(model, inits, node, j, value, name, weights=None) -> None:
    base, k = name, 1
    while name in inits:
        name = f"{base}#{k}"
        k += 1
    if weights is not None and value.nbytes >= MAPPED_MIN_BYTES:
        tensor = weights.add(name, value)
    else:
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
    model.graph.initializer.append(tensor)
    inits[name] = tensor
    node.input[j] = name


def _shift_batchnorm(model, inits, node, bias: np.ndarray) -> None:
    """Make a kept BatchNormalization y = x + bias (the fitted layer before it writes the normalised output)."""
    eps = float(_attr(node, "epsilon", 1e-5))
    scale = tensor_array(inits[node.input[1]])
    c, dtype = scale.shape[0], scale.dtype
    values = [np.ones(c), bias, np.zeros(c), np.full(c, 1.0 - eps)]
    for j, value in zip(range(1, 5), values):
        _set_input(model, inits, node, j, value.astype(dtype), f"{node.name}/refit/{j}")


# ---------------------------------------------------------------------------------------------------------------
# Rows: which (sample, position) pairs each layer regresses on
# ---------------------------------------------------------------------------------------------------------------

def _positions(shape: tuple, axis: int, batch: int = 1) -> int:
    """Positions per sample of a layer output: every index of every axis but the channel axis, over the batch in
    graph analysis's shapes (`batch`: 1, or a model's fixed batch size). Wherever the batch sits: nn.MultiheadAttention
    computes on (T, N, D) and (T·N, D), where the first axis is the tokens (counted as N there, they made the rows
    of a ViT-B/16 layer 197× more than estimated: memory meant for 1 GiB of target rows took 16 GB)."""
    return max(1, int(np.prod(shape, dtype=np.int64)) // max(int(shape[axis % len(shape)]), 1) // max(batch, 1))


# ---------------------------------------------------------------------------------------------------------------
# The refit
# ---------------------------------------------------------------------------------------------------------------

def _prune(model: onnx.ModelProto, outputs: list, types: dict, known: dict | None = None) -> onnx.ModelProto:
    """The part of `model` that computes `outputs` (onnxruntime always runs a whole graph), starting from the
    tensors in `known` (name -> an example value) where the walk back reaches them: they become graph inputs."""
    known = known or {}
    producers = {t: n for n in model.graph.node for t in n.output if t}
    keep, stack, cut = set(), list(outputs), []
    while stack:
        t = stack.pop()
        if t in known:
            cut.append(t)
            continue
        node = producers.get(t)
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        stack.extend(x for x in node.input if x)
    nodes = [n for n in model.graph.node if id(n) in keep]
    # a node with several outputs (Split) may be kept for one while another is known: that one stays its output
    produced = {t for n in nodes for t in n.output}
    cut = [t for t in cut if t not in produced]
    used = {x for n in nodes for x in n.input}
    inputs = [i for i in model.graph.input if i.name in used]
    inputs += [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(known[t].dtype), None)
               for t in dict.fromkeys(cut)]
    graph = helper.make_graph(nodes, model.graph.name, inputs,
                              [types.get(t) or helper.make_empty_tensor_value_info(t) for t in outputs],
                              [i for i in model.graph.initializer if i.name in used])
    pruned = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="onnxzip")
    pruned.ir_version = model.ir_version
    return pruned


def _value_types(model: onnx.ModelProto) -> dict:
    types = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model)[0])
        for v in list(inferred.graph.value_info) + list(inferred.graph.output):
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                types[v.name] = helper.make_tensor_value_info(v.name, v.type.tensor_type.elem_type, None)
    except Exception as exc:  # noqa: BLE001 - custom ops; onnxruntime infers types itself
        log.debug("shape inference failed (%s); pruned models declare outputs without types", exc)
    return types


def _output_positions(layer: RefitLayer, a: Analysis) -> int:
    """Rows per sample: the output positions of a Conv, the leading axes of a MatMul (the tokens of a sample), 1 for
    a Gemm over samples (T for one over nn.MultiheadAttention's T·N rows)."""
    shape = a.shapes[a.model.graph.node[layer.node].output[0]]
    return _positions(shape, layer.channel_axis, shape_batch(a))


def _target_rows(plan: ZipPlan, layers: list, models: list, data: CalibrationData, batch_size: int, device: str,
                 seed: int, fractions: dict, held: bool) -> dict:
    """Per layer, per batch: the target rows (float32), from one pass of each source model over `data`."""
    runs = []
    for m, model in enumerate(models):
        names = list(dict.fromkeys(layer.target[m] for layer in layers if layer.model in (None, m)))
        session = pass_session(_prune(expose_tensors(model, names), names, {}), device) if names else None
        runs.append((session, names))
    rows = {layer.key: [] for layer in layers}
    lo = 0
    for feed in data.batches(batch_size):
        n = next(iter(feed.values())).shape[0]
        values = [dict(zip(names, session.run(names, feed))) if session else {} for session, names in runs]
        for layer in layers:
            zs = []
            for m in (range(len(models)) if layer.model is None else [layer.model]):
                z = values[m][layer.target[m]]
                if not np.isfinite(z).all():
                    raise VerificationError(f"model {plan.names[m]}: tensor {layer.target[m]!r} is not finite on "
                                            f"calibration samples {lo}..{lo + n - 1}; the model or its inputs are "
                                            "broken")
                count = z.size // z.shape[layer.channel_axis]
                zs.append(as_rows(z, layer.channel_axis,
                                  select_rows(layer.rows_key, held, lo, count, fractions[layer.key], seed)))
            total = zs[0] if layer.model is not None else plan.matching(layer.space.space).merge_features(zs)
            rows[layer.key].append(np.ascontiguousarray(total, dtype=np.float32))
        lo += n
    return rows


def _kept_target_rows(plan: ZipPlan, layer: RefitLayer, run: SourceRun, fraction: float, held: bool) -> list:
    """Per batch, a layer's target rows (float32) from the rows the calibration pass kept (at a share of rows at
    least `fraction`: the layer's rows are among them, `subset_of_rows` says where)."""
    out = []
    matching = plan.matching(layer.space.space) if layer.model is None else None
    for lo, count, arrays in run.rows[layer.rows_key][held]:
        pick = subset_of_rows(layer.rows_key, held, lo, count, run.fractions[layer.rows_key], fraction, run.seed)
        if layer.model is not None:
            out.append(np.ascontiguousarray(arrays[layer.model][pick]))
            continue
        out.append(matching.merge_features([z[pick] for z in arrays]).astype(np.float32))
    return out


def refit(plan: ZipPlan, surgery: Surgery, calib: CalibrationData, held_back: CalibrationData | None,
          models: list, batch_size: int = 64, device: str = "auto", seed: int = 0, progress=None,
          logger: logging.Logger | None = None, cache_bytes: int = CACHE_BYTES,
          source_rows: SourceRun | None = None) -> dict:
    """Refit every layer of `refit_layers` in place in ``surgery.model``; returns the card's summary.

    `models`: the source models (inputs named as the merged model's). `held_back`: samples never fitted on, used
    to choose each layer's ridge strength (None or empty: DEFAULT_LAMBDA for every layer). `source_rows`: what
    the calibration pass kept of the sources (`target_row_requests`, over `calib` and `held_back` with the same
    batch size and `seed`); the sources run again only for the targets it does not hold."""
    logger = logger or log
    model = surgery.model
    layers = refit_layers(plan, surgery)
    use_held = held_back is not None and held_back.num_samples > 0
    summary = {"applied": True, "method": "ls", "layers": [], "passes": 0, "levels": 0,
               "lambda_grid": list(LAMBDA_GRID) if use_held else [DEFAULT_LAMBDA],
               "samples": int(calib.num_samples), "held_back_samples": int(held_back.num_samples) if use_held else 0}
    if not layers:
        return summary
    inits = {i.name: i for i in model.graph.initializer}
    a = plan.a

    fractions = {}  # share of each layer's rows kept
    merged_nodes = _node_by_name(model)
    too_large = []
    reads = {}  # the tensors each layer's pass fetches: its input and its residual partner
    for layer in layers:
        layout = _Layout(layer, merged_nodes, inits, plan, surgery)
        reads[layer.key] = [t for t in (layout.node.input[0], layer.partner) if t]
        if layout.sums_bytes(use_held) > MAX_SUMS_BYTES:
            why = (f"too large to refit: its sums would take {layout.sums_bytes(use_held) / 2**30:.1f} GiB, more "
                   f"than refit.MAX_SUMS_BYTES ({MAX_SUMS_BYTES / 2**30:g} GiB); it keeps surgery's weights")
            too_large.append({"layer": layer.describe(plan), "op": layer.op, "level": layer.level,
                              "residual": layer.partner is not None, "skipped": why})
            logger.warning("refit: %s is %s", too_large[-1]["layer"], why)
            continue
        fractions[layer.key] = _fraction(layout.regressors, calib.num_samples, _output_positions(layer, a))
    layers = [layer for layer in layers if layer.key in fractions]
    if not layers:
        summary["layers"] = too_large
        return summary
    # targets: from the rows the calibration pass kept where it kept enough, else from a source pass of our own
    kept = source_rows.rows if source_rows is not None and source_rows.seed == seed else {}
    cached = [layer for layer in layers if layer.rows_key in kept
              and source_rows.fractions[layer.rows_key] >= fractions[layer.key]
              and (not use_held or kept[layer.rows_key][True])]
    missing = [layer for layer in layers if layer not in cached]
    cached_keys = {layer.key for layer in cached}
    # the kept rows' targets are made when their level is fitted and dropped after it (below)
    targets, held_targets = {}, {} if use_held else None
    if missing:
        targets.update(_target_rows(plan, missing, models, calib, batch_size, device, seed, fractions, False))
        if use_held:
            held_targets.update(_target_rows(plan, missing, models, held_back, batch_size, device, seed, fractions,
                                             True))
        summary["passes"] += len(models) * (2 if use_held else 1)
    summary["targets_kept_by_calibration"] = len(cached)

    levels = sorted({layer.level for layer in layers})
    summary["levels"] = len(levels)
    parts = [("calibration", calib)] + ([("held_back", held_back)] if use_held else [])
    part_targets = {"calibration": targets, "held_back": held_targets}
    passes = _Passes(model, parts, batch_size, device, cache_bytes)
    update, close = _progress_reporter(progress, len(levels), "refitting")
    try:
        for level in levels:
            todo = [layer for layer in layers if layer.level == level]
            for layer in todo:
                if layer.key in cached_keys:
                    targets[layer.key] = _kept_target_rows(plan, layer, source_rows, fractions[layer.key], False)
                    if use_held:
                        held_targets[layer.key] = _kept_target_rows(plan, layer, source_rows, fractions[layer.key],
                                                                    True)
            merged_nodes = _node_by_name(model)
            layouts = {layer.key: _Layout(layer, merged_nodes, inits, plan, surgery) for layer in todo}
            fetch = [t for layer in todo for t in reads[layer.key]]
            later = {t for layer in layers if layer.level > level for t in reads[layer.key]}
            sums = {layer.key: None for layer in todo}
            pending = _Pending(sums)
            for part, lo, b, n, values in passes.run(fetch, later):
                for layer in todo:
                    pending.add(layer, layouts[layer.key], values, part_targets[part][layer.key][b],
                                part != "calibration", lo, n, fractions[layer.key], seed, a)
            pending.flush()
            for layer in todo:
                targets.pop(layer.key)
                if use_held:
                    held_targets.pop(layer.key)
                summary["layers"].append(_solve_and_write(layer, layouts[layer.key], sums[layer.key], model, plan,
                                                          use_held))
            update(1)
    finally:
        close()
    summary["passes"] += passes.count
    summary["layers"] += too_large
    singular = [x["layer"] for x in summary["layers"] if x.get("singular")]
    if singular:
        logger.warning("refit: the input of %d layer(s) is rank-deficient (dead or constant channels, or fewer "
                       "samples than regressors; first: %s); the ridge term keeps their fits finite",
                       len(singular), singular[0])
    _drop_unused(model)
    return summary


class _Passes:
    """Runs the merged model for one level's tensors, from the tensors earlier passes computed where it can.

    Every tensor a level fetches (its layers' inputs and residual partners) depends only on layers fitted in
    earlier levels, and so does everything computed on the way to it: it is final. Each pass keeps its frontier,
    the tensors it or an earlier pass computed that a node not yet run reads (a residual join's other input, a
    shape), and the ones a later level fetches again, within `cache_bytes`; the next pass starts from them, so
    that the passes together run each node about once. Beyond the budget a pass starts further back (the graph
    inputs at worst): the same values, more work."""

    def __init__(self, model, parts, batch_size, device, cache_bytes):
        self.model, self.parts, self.batch_size, self.device = model, parts, batch_size, device
        self.cache_bytes = cache_bytes
        self.cache = {name: {} for name, _ in parts}  # part -> tensor -> per-batch values
        self.types = _value_types(model)
        self.graph_inputs = {i.name for i in model.graph.input}
        self.readers = {}  # tensor -> the output tensors of every node reading it (a node stands for its outputs)
        for node in model.graph.node:
            for t in node.input:
                if t:
                    self.readers.setdefault(t, []).append(tuple(o for o in node.output if o))
        self.computed = set()  # tensors some pass computed (kept or not)
        self.count = 0

    def _frontier(self, tensors, later: set) -> list:
        """Of `tensors` (computed), those a node not yet run reads, or a later level fetches."""
        return [t for t in tensors if t in later
                or any(not outputs or not self.computed.issuperset(outputs) for outputs in self.readers.get(t, ()))]

    def run(self, fetch: list, later: set = frozenset()):
        """Yield (part, first sample, batch index, samples, {tensor: value}) over every batch of every part.
        `later`: tensors a later level fetches, kept cached (within the budget) once fetched."""
        fetch = list(dict.fromkeys(fetch))
        cached = self.cache[self.parts[0][0]]
        run_names = [t for t in fetch if t not in cached and t not in self.graph_inputs]
        session, feeds, outputs = None, [], []
        if run_names:
            pruned = _prune(self.model, run_names, self.types, {t: v[0] for t, v in cached.items()})
            produced = [t for n in pruned.graph.node for t in n.output if t]
            self.computed.update(produced)
            # what this pass computes that later passes read: its outputs too (onnxruntime returns only outputs)
            extra = [t for t in self._frontier(produced, later) if t not in run_names]
            outputs = run_names + extra
            if extra:
                pruned.graph.output.extend(self.types.get(t) or helper.make_empty_tensor_value_info(t)
                                           for t in extra)
            session = pass_session(pruned, self.device)
            feeds = [i.name for i in pruned.graph.input]
            self.count += 1
        # the next level starts from this level's fetched tensors: kept first, then what later levels fetch, then
        # the rest of the frontier, within the budget
        keep = self._frontier(list(dict.fromkeys([*fetch, *cached, *outputs])), later)
        keep = [t for group in ([t for t in keep if t in fetch], [t for t in keep if t in later and t not in fetch],
                                [t for t in keep if t not in fetch and t not in later])
                for t in group if t not in self.graph_inputs]
        fetched = {name: {t: [] for t in keep} for name in self.cache}
        for part, data in self.parts:
            cache, lo = self.cache[part], 0
            for b, feed in enumerate(data.batches(self.batch_size)):
                n = next(iter(feed.values())).shape[0]
                values = {t: cache[t][b] if t in cache else feed[t] for t in fetch if t not in run_names}
                if session is not None:
                    inputs = {k: feed[k] if k in feed else cache[k][b] for k in feeds}
                    values.update(zip(outputs, session.run(outputs, inputs)))
                for t in keep:
                    fetched[part][t].append(values[t] if t in values else cache[t][b])
                yield part, lo, b, n, values
                lo += n
        kept, size = set(), 0
        for t in keep:
            nbytes = sum(v.nbytes for c in fetched.values() for v in c[t])
            if size + nbytes <= self.cache_bytes:
                kept.add(t)
                size += nbytes
        self.cache = {part: {t: v for t, v in c.items() if t in kept} for part, c in fetched.items()}


def _regressors(layer: RefitLayer, layout: _Layout, x: np.ndarray, rows: np.ndarray, a: Analysis) -> list:
    """Per group, the (rows, d) regressor block, in the model's float type (without the bias column: `_add_products`
    adds it)."""
    if layer.op == "Conv":
        out_shape = a.shapes[a.model.graph.node[layer.node].output[0]]
        in_spatial, out_spatial = x.shape[2:], tuple(out_shape[2:])
        geometry = conv_geometry(layout.node, layout.weight.shape, in_spatial, out_spatial)
        blocks = conv_patches(x, geometry, out_spatial, rows)
    else:
        blocks = [as_rows(x, x.ndim - 1 if layer.op == "MatMul" else 1, rows)]
    return [np.ascontiguousarray(b) for b in blocks]


def _add_products(gram: np.ndarray, cross: np.ndarray, x: np.ndarray, t: np.ndarray, bias: bool) -> tuple:
    """Add rows' XᵀX to the upper triangle of `gram` and XᵀT to `cross` (both C-ordered float64, in place), for
    regressors X (rows, d) and targets T (rows, F), X with a column of ones appended where `bias`; returns the rows'
    (Σ t², Σ t).

    The products are taken in float64: the ridge's smallest strengths (1e-6 of the mean eigenvalue) are within reach
    of float32 rounding (~1e-7 of the largest), and fits from float32 products move with the last bits of their
    inputs (two exports of one model no longer merge alike). They go through scipy's BLAS only (syrk for XᵀX: half
    the work of a product): numpy and scipy each bring an OpenBLAS with its own worker threads, which spin for a
    while after each call, and products alternating between the two ran at half speed, each library's threads
    taking the cores the other's needed. BLAS adds them to the sums where they lie (a C-ordered matrix is its
    transpose in Fortran order), with no d x d temporary."""
    from scipy.linalg.blas import dgemm, dsyrk
    n, d = x.shape
    xa = np.empty((n, d + int(bias)))
    xa[:, :d] = x
    if bias:
        xa[:, d] = 1.0
    ta = np.ascontiguousarray(t, dtype=np.float64)
    # gramᵀ's lower triangle is gram's upper one; crossᵀ = Tᵀ X
    g = dsyrk(1.0, xa.T, beta=1.0, c=gram.T, trans=0, lower=1, overwrite_c=1)
    c = dgemm(1.0, ta.T, xa.T, trans_b=1, beta=1.0, c=cross.T, overwrite_c=1)
    if not np.may_share_memory(g, gram):  # a copy was made after all (another layout): the sums are its values
        gram.T[...] = g
    if not np.may_share_memory(c, cross):
        cross.T[...] = c
    return float(np.einsum("ij,ij->", ta, ta)), ta.sum(axis=0)


class _Pending:
    """One level's regressor and target rows, held until ROW_BUFFER_BYTES are pending and then multiplied at once.

    A pass alternates onnxruntime runs with numpy products; taken a batch at a time, every product is small, and
    BLAS's worker threads, which spin for a while after each call before they sleep, take the cores onnxruntime
    needs for the next batch (on the bundled ResNet-20 pair, 2 cores: the Gram products ran at 10 GFLOP/s inside a
    merge against 40 alone). Held back and taken in large blocks, the products run on every core at full speed, the
    runs between them are not disturbed, and the sums are the same to float64 rounding."""

    def __init__(self, sums: dict):
        self.sums = sums
        self.rows = {}  # (layer key, held) -> [(layer, layout, [regressor blocks], targets)]
        self.bytes = 0

    def add(self, layer, layout, values, target, held, lo, n, fraction, seed, a) -> None:
        x = values[layout.node.input[0]]
        # a Gemm/MatMul has a row per leading index of its input, however the batch sits among them
        # (nn.MultiheadAttention computes on (T*N, D): the batch merged with the tokens)
        count = (n * _output_positions(layer, a) if layer.op == "Conv"
                 else x.size // x.shape[x.ndim - 1 if layer.op == "MatMul" else 1])
        rows = select_rows(layer.rows_key, held, lo, count, fraction, seed)
        t = target.astype(np.float64)
        if layer.partner:
            t -= as_rows(values[layer.partner], layer.channel_axis, rows)
        blocks = _regressors(layer, layout, x, rows, a)
        self.rows.setdefault((layer.key, held), []).append((layer, layout, blocks, t))
        self.bytes += t.nbytes + sum(b.nbytes for b in blocks)
        if self.bytes >= ROW_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        for (key, held), parts in self.rows.items():
            layer, layout = parts[0][:2]
            blocks = [np.concatenate([p[2][g] for p in parts]) for g in range(len(parts[0][2]))]
            _accumulate(layer, layout, blocks, np.concatenate([p[3] for p in parts]), self.sums, held)
        self.rows, self.bytes = {}, 0


def _accumulate(layer, layout, blocks, t, sums, held) -> None:
    """Add rows (per group, regressor `blocks` and the targets `t` of every group side by side) to a layer's sums."""
    per = t.shape[1] // len(blocks)
    if sums[layer.key] is None:
        dims = [b.shape[1] + int(layout.has_bias) for b in blocks]
        sums[layer.key] = [_Sums(np.zeros((d, d)), np.zeros((d, per)), t_sum=np.zeros(per), h_gram=np.zeros((d, d)),
                                 h_cross=np.zeros((d, per)), h_t_sum=np.zeros(per)) for d in dims]
    for g, (s, xg) in enumerate(zip(sums[layer.key], blocks)):
        step = max(1, PRODUCT_BYTES // (8 * (xg.shape[1] + per)))  # rows a product takes (in float64)
        for lo in range(0, xg.shape[0], step):
            xb, tb = xg[lo:lo + step], t[lo:lo + step, g * per:(g + 1) * per]
            if held:
                t_sq, t_sum = _add_products(s.h_gram, s.h_cross, xb, tb, layout.has_bias)
                s.h_t_sq += t_sq
                s.h_t_sum += t_sum
                s.h_rows += xb.shape[0]
            else:
                t_sq, t_sum = _add_products(s.gram, s.cross, xb, tb, layout.has_bias)
                s.t_sq += t_sq
                s.t_sum += t_sum
                s.rows += xb.shape[0]


def _symmetrized(upper: np.ndarray) -> np.ndarray:
    """The symmetric matrix whose upper triangle `upper` holds, written over its lower triangle in place (in bands:
    no d x d temporary)."""
    d = upper.shape[0]
    for lo in range(0, d, 256):
        hi = min(lo + 256, d)
        band = upper[lo:hi, lo:hi]
        band[...] = np.triu(band) + np.triu(band, 1).T
        upper[hi:, lo:hi] = upper[lo:hi, hi:].T
    return upper


def _error(w: np.ndarray, gram: np.ndarray, cross: np.ndarray, t_sq: float) -> float:
    """||X Wᵀ - T||² from the sums (W: F x d); the product through scipy's BLAS (see `_add_products`)."""
    from scipy.linalg.blas import dsymm
    # gram is symmetric: its transpose is the same matrix in Fortran order, which BLAS takes without a copy
    return float(np.sum(dsymm(1.0, gram.T, w, side=1) * w) - 2 * np.sum(w * cross.T) + t_sq)


def _solve_and_write(layer, layout, sums, model, plan, use_held) -> dict:
    """Choose λ per group on the held-back samples, write the fit, and describe it for the card."""
    record = {"layer": layer.describe(plan), "op": layer.op, "level": layer.level,
              "residual": layer.partner is not None}
    if sums is None:
        record["skipped"] = "no samples"
        return record
    fitted, lambdas, singular, kept = [], [], False, 0
    err_cal = ss_cal = err_h = ss_h = 0.0
    grid = LAMBDA_GRID if use_held else (DEFAULT_LAMBDA,)
    for s, w0 in zip(sums, layout.matrices()):
        gram = _symmetrized(s.gram)
        h_gram = _symmetrized(s.h_gram) if use_held else None
        d = gram.shape[0]
        singular |= s.rows < d or _near_singular(gram)
        scale = max(float(np.trace(gram)) / d, 1e-300)  # the mean eigenvalue
        w, rel, e_cal, e_h = _ridge_solve(s, w0, gram, h_gram, scale, grid, use_held)
        fitted.append(w)
        lambdas.append(rel)
        kept += rel is None
        err_cal += e_cal
        ss_cal += s.t_sq - float(np.sum(s.t_sum ** 2)) / max(s.rows, 1)
        if use_held:
            err_h += e_h
            ss_h += s.h_t_sq - float(np.sum(s.h_t_sum ** 2)) / max(s.h_rows, 1)
    layout.write(model, fitted)
    chosen = [x for x in lambdas if x is not None]
    record.update({"rows": int(sum(s.rows for s in sums)), "regressors": int(sums[0].gram.shape[0]),
                   "groups": len(sums), "lambda": max(set(chosen), key=chosen.count) if chosen else None,
                   "kept_groups": kept, "singular": bool(singular),
                   "r2_calibration": _r2(err_cal, ss_cal), "r2_held_back": _r2(err_h, ss_h) if use_held else None})
    return record


def _near_singular(gram: np.ndarray) -> bool:
    """Whether XᵀX is singular to working precision: not positive definite, or LAPACK's estimate of its reciprocal
    condition number (1-norm, from the Cholesky factor) is below SINGULAR_RCOND."""
    from scipy.linalg import cho_factor
    from scipy.linalg.lapack import dpocon
    try:
        factor, _ = cho_factor(gram.T, lower=False, check_finite=False)  # the same matrix, in Fortran order
    except np.linalg.LinAlgError:
        return True
    rcond, info = dpocon(factor, float(np.abs(gram).sum(axis=0).max()), uplo="U")
    return info != 0 or rcond <= SINGULAR_RCOND


def _ridge_factor(gram: np.ndarray, lam: float, out: np.ndarray | None = None):
    """The Cholesky factor of XᵀX + λI, or None where it is not positive definite in floating point. `out`: a
    Fortran-ordered d x d array to factorise in (the factors of a group's ridge strengths in turn: one allocation,
    not one per strength)."""
    from scipy.linalg import cho_factor
    # factorised in place, in Fortran order: gram is symmetric, so its transpose (a Fortran-ordered view) is the same
    # matrix and the copy is a straight one, not a transposition
    g = np.empty(gram.shape, order="F") if out is None else out
    np.copyto(g, gram.T)
    g.flat[::g.shape[0] + 1] += lam
    try:
        return cho_factor(g, lower=False, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        return None


def _ridge_solve(s, w0, gram, h_gram, scale, grid, use_held) -> tuple:
    """Ridge fits W = (XᵀT + λW0ᵀ)ᵀ(XᵀX + λI)⁻¹ of one group for λ = rel · scale over `grid`; the one with the least
    error on the held-back samples is kept (the first of the least), or W0 where nothing beats it there.

    One Cholesky factorisation per λ (a sixth to a twentieth of an eigendecomposition's time); the solves and the
    scores go SOLVE_BLOCK_BYTES of W's rows (outputs) at a time: every output's fit is its own, and the errors that
    choose λ are sums over outputs, so a large layer holds W0 and W, not half a dozen copies of itself. Returns
    (W, λ or None where W0 is kept, calibration error, held-back error)."""
    from scipy.linalg import cho_solve
    f, d = w0.shape
    step = max(1, SOLVE_BLOCK_BYTES // (8 * d))
    blocks = [slice(lo, min(f, lo + step)) for lo in range(0, f, step)]
    whole = len(blocks) == 1  # then the best W is kept as it is found; else it is solved again at the end

    def fit(factor, lam, b):
        return cho_solve(factor, s.cross[:, b] + lam * w0[b].T, check_finite=False).T

    best = None  # (held-back error, k, W or None)
    work = np.empty(gram.shape, order="F")  # where each strength's factor is made (the last one's is not kept)
    for k, rel in enumerate(grid):
        factor = _ridge_factor(gram, rel * scale, work)
        if factor is None:
            continue
        score, finite, w = 0.0, True, None
        for b in blocks:
            w = fit(factor, rel * scale, b)
            finite &= bool(np.isfinite(w).all())
            if use_held:
                score += _error(w, h_gram, s.h_cross[:, b], 0.0)
        if finite and (best is None or score < best[0]):
            best = (score, k, w if whole else None)
    keep_score = sum(_error(w0[b], h_gram, s.h_cross[:, b], 0.0) for b in blocks) if use_held else 0.0
    if best is None or (use_held and keep_score <= best[0]):
        # nothing beats the weights as they are on the held-back samples: keep them
        err_cal = sum(_error(w0[b], gram, s.cross[:, b], 0.0) for b in blocks) + s.t_sq
        return w0, None, err_cal, keep_score + s.h_t_sq if use_held else 0.0
    score, k, w = best
    lam = grid[k] * scale
    if w is None:
        factor = _ridge_factor(gram, lam, work)
        w = np.empty_like(w0)
        for b in blocks:
            w[b] = fit(factor, lam, b)
    # the ridge solution satisfies W(G + λI) = Cᵀ + λW0, so WGWᵀ = W·(Cᵀ + λ(W0 − W)): the calibration error
    # ||XWᵀ − T||² = tr(WGWᵀ) − 2 tr(WC) + Σt² costs no product with G
    err_cal = float(np.sum(w * (lam * (w0 - w))) - np.sum(w * s.cross.T)) + s.t_sq
    return w, grid[k], err_cal, score + s.h_t_sq if use_held else 0.0


def _r2(err: float, ss: float):
    if ss <= 0:
        return None
    return 1.0 - err / ss


def _drop_unused(model: onnx.ModelProto) -> None:
    used = {x for n in model.graph.node for x in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
