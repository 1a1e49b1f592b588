"""Read an ONNX graph into feature spaces, task heads and stop points; check that two models match.

A *feature space* is a set of channels that must be transformed together (ZIPIT.md, "Feature spaces and merge
points"). Every operator's effect on channels is a fact about that operator and lives in exactly one handler of
``HANDLERS``; the result of the analysis is plain data (`Analysis`) that can be printed and tested without
running anything.

Every tensor is one of three kinds:
- a *space* tensor: carries channels, described by a `TensorSpace` (space id, channel axis, flatten factor);
- a *static* tensor: does not depend on the channel contents (initializers, shapes, constants computed from them);
- an *opaque* tensor: depends on the data in a way onnxzip does not follow (downstream of an unsupported node).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import MismatchError, ModelError
from .onnx_io import tensor_array, without_weights

IDENTITY = "identity"  # a space both models share as it is (the graph input): matched to itself


@dataclass(frozen=True)
class TensorSpace:
    """Where a tensor keeps its channels: `axis` holds `width * expand` entries, channel-major.

    `split`: the channels span len(split) axes, of these sizes, row-major (channel = ((i_1 * s_2) + i_2) * s_3 ...).
    Inside a channel shuffle (`axes` empty) they are consecutive from `axis` (Reshape (N, C, H, W) ->
    (N, G, C/G, H, W): split (G, C/G)). Split into attention heads (`axes` given) part k lies on axis `axes[k]`,
    anywhere, and `axis` is the last part's (the features inside a head): Reshape (N, T, D) -> (N, T, H, d) then
    Transpose to (N, H, T, d) is split (H, d) on axes (1, 3); a packed QKV projection (N, T, 3D) -> (N, T, 3, H, d)
    is split (3, H, d)."""

    space: int
    axis: int
    expand: int = 1
    split: tuple = ()
    axes: tuple = ()

    @property
    def heads(self) -> bool:
        """Split over several axes as attention heads (not inside a channel shuffle)."""
        return bool(self.axes)


@dataclass(frozen=True)
class WeightAxis:
    """One axis of one constant input of one node that lives in a feature space.

    role ``out``: merged with M (output channels of a weighted layer, per-channel parameters);
    role ``in``: unmerged with U (input channels of a weighted layer).
    """

    node: int
    input: int
    axis: int
    space: int
    role: str
    expand: int = 1
    groups: int = 1  # a grouped Conv's input axis: output-channel group g (along axis 0) reads input block g only


@dataclass
class FeatureSpace:
    id: int
    width: int
    identity: bool = False
    producers: list = field(default_factory=list)  # node indices of weighted layers writing it
    consumers: list = field(default_factory=list)  # node indices of weighted layers reading it
    carriers: list = field(default_factory=list)  # node indices that carry or tie it
    tensors: list = field(default_factory=list)  # tensor names in it
    parts: list = field(default_factory=list)  # a channel Concat: the spaces it is made of, in order
    # the blocks the channels fall into, one label per channel (None: one block): a grouped convolution's groups,
    # the channels a Slice keeps. Matching keeps every feature inside its block, block b of each model with block
    # b of the others, and numbers a block's merged features by the block's own positions (solver.solve_blocks)
    partition: tuple | None = None
    # a view (Slice, Split, channel shuffle): channel j is channel view[j][1] of space view[j][0]
    view: list | None = None
    # channels that must be matched alike: pairs (positions p, positions q) of this space, channel p[i] transformed
    # as channel q[i] (the queries and keys of one head, cut from one packed QKV projection: their dot product
    # must survive the merge). Each block of the partition maps onto a block (solver.solve_blocks)
    alike: list = field(default_factory=list)
    # queries of grouped-query attention matched as the view of their repeated key heads (`view`): a learned space
    # written by its own projection, whose matching is the keys'
    queries_of_keys: bool = False

    @property
    def composite(self) -> bool:
        """Derived from other spaces (a channel Concat, a view): matched through them, never solved itself."""
        return bool(self.parts) or self.view is not None

    @property
    def blocks(self) -> int:
        return 1 if self.partition is None else len(set(self.partition))


@dataclass
class BlockFamily:
    """Spaces whose blocks correspond position by position through grouped convolutions (output group g reads input
    block g only): a model's blocks may be matched to another model's in any order, as long as every space of the
    family uses the same order, so that each merged group still reads one merged block. `movable` False (with
    `why`) where the blocks must stay in place: a grouped layer reads the shared input, a view or a packed
    projection reads a space of the family, or a space is split into other blocks as well."""

    spaces: tuple  # space ids, each split into `blocks` contiguous equal blocks
    blocks: int
    layers: tuple  # node indices of the grouped layers linking them
    movable: bool = True
    why: str = ""


@dataclass
class NodeInfo:
    index: int
    name: str
    op_type: str
    kind: str  # weighted | carrier | static | opaque | unsupported
    reason: str = ""  # why unsupported
    data_input: str | None = None  # weighted layers: the tensor whose channels are the layer's input
    in_space: TensorSpace | None = None
    out_space: TensorSpace | None = None


@dataclass
class Analysis:
    """Everything onnxzip knows about one model's graph."""

    model: onnx.ModelProto  # normalised: Constant nodes turned into initializers, every node named
    nodes: list  # NodeInfo, in graph (topological) order
    spaces: dict  # id -> FeatureSpace
    tensor_spaces: dict  # tensor name -> TensorSpace
    static: set
    opaque: set
    weights: list  # WeightAxis
    initializers: dict  # name -> np.ndarray
    shapes: dict  # tensor name -> tuple of ints (batch dimension set to 1) where known
    producer: dict  # tensor name -> (node index, output index)
    consumers: dict  # tensor name -> list of (node index, input index)
    heads: list = field(default_factory=list)  # node indices of task heads
    blocked: set = field(default_factory=set)  # node indices that can never be in the trunk
    blocked_reasons: dict = field(default_factory=dict)  # node index -> reason (the roots only)
    folded_batchnorms: int = 0  # BatchNormalization nodes folded into the layer before them by `normalise`
    # tensor -> (gamma, beta) of the BatchNormalization that wrote it, folded or kept: where BN's output should sit
    # (mean beta, std |gamma|), which the paper's BN reset restores after merging
    batchnorm_params: dict = field(default_factory=dict)
    ranks: dict = field(default_factory=dict)  # tensor name -> rank where known (also where some dims are not)
    block_families: list = field(default_factory=list)  # BlockFamily: grouped layers' spaces, whose blocks move together
    # (node index, input index) -> why: constants the merged model takes as the models' average where they differ
    # (a learned bias added to attention scores, which the merged model computes once for both)
    averaged: dict = field(default_factory=dict)

    @property
    def weighted(self) -> list:
        return [n.index for n in self.nodes if n.kind == "weighted"]

    @property
    def input_names(self) -> list:
        init = set(self.initializers)
        return [i.name for i in self.model.graph.input if i.name not in init]

    @property
    def output_names(self) -> list:
        return [o.name for o in self.model.graph.output]

    def weight_axes(self, node: int, input_index: int) -> list:
        return [w for w in self.weights if w.node == node and w.input == input_index]

    def describe_node(self, index: int) -> str:
        n = self.nodes[index]
        return f"node {index} '{n.name}' ({n.op_type})"


# --------------------------------------------------------------------------------------------------------------
# Loading and normalising


def normalise(model: onnx.ModelProto, fold_batchnorm: bool = True, batchnorms: dict | None = None) -> onnx.ModelProto:
    """Copy of the model with Constant nodes (and Identity nodes of constants) turned into initializers, every node
    computed from constants alone folded to its value (`_fold_constant_node`), every node named and, with
    `fold_batchnorm`, every inference BatchNormalization folded into the Conv or Gemm before it.

    Weights can arrive as initializers or as Constant nodes depending on the exporter; treating both alike keeps
    every handler simple. Folding BatchNorm makes a BN-kept export the same graph as a BN-folded one (what PyTorch's
    exporters write by default), so that every export of a model merges alike. `batchnorms`, if given, receives
    output tensor -> (gamma, beta) of every inference BatchNormalization, folded or not.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    kept = []
    outputs = {o.name for o in graph.output}
    constants = {t.name: tensor_array(t) for t in graph.initializer}
    learned = set(constants)  # the model's own tables (a Gather from one is an embedding lookup, kept)
    opsets = {op.domain: op.version for op in model.opset_import}
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            value = None
            if attr.name == "value":
                value = numpy_helper.to_array(attr.t)
            elif attr.name == "value_float":
                value = np.array(attr.f, dtype=np.float32)
            elif attr.name == "value_floats":
                value = np.array(list(attr.floats), dtype=np.float32)
            elif attr.name == "value_int":
                value = np.array(attr.i, dtype=np.int64)
            elif attr.name == "value_ints":
                value = np.array(list(attr.ints), dtype=np.int64)
            if value is not None:
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                constants[node.output[0]] = value
                continue
        if (node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input[0] in constants
                and node.output[0] not in outputs):
            # an exporter that stores equal parameters once writes the others as Identity of it (TorchScript with
            # BatchNorm kept): a constant all the same
            value = constants[node.input[0]]
            graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            constants[node.output[0]] = value
            continue
        folded = _fold_constant_node(node, constants, learned, outputs, opsets)
        if folded is not None:
            for name, value in zip(node.output, folded):
                graph.initializer.append(numpy_helper.from_array(value, name))
                constants[name] = value
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    if batchnorms is not None:
        for node in graph.node:
            if (node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx") and len(node.input) >= 5
                    and node.input[1] in constants and node.input[2] in constants and node.output[0]):
                batchnorms[node.output[0]] = (constants[node.input[1]].astype(np.float64),
                                              constants[node.input[2]].astype(np.float64))
    if fold_batchnorm:
        _fold_batchnorms(model)
    return model


# a computation on constants alone with a larger output is left to the model (a weight transposed, a table tiled)
FOLD_CONSTANT_ELEMENTS = 1 << 18
# operators whose output is not a function of their inputs' values alone: never evaluated ahead of the model
_RANDOM_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")
_NOT_FOLDED = _RANDOM_OPS + ("Constant", "If", "Loop", "Scan")


def _evaluate(node, values: dict, opsets: dict) -> list | None:
    """The outputs of one node on the given input values (onnx's reference evaluator), as arrays; None where it
    cannot run the node."""
    from onnx.reference import ReferenceEvaluator
    try:
        results = ReferenceEvaluator(node, opsets=opsets).run(None, {n: values[n] for n in node.input if n})
    except Exception:  # noqa: BLE001 - an operator the reference evaluator cannot run is left as it is
        return None
    return [np.asarray(v) for v in results]


def _fold_constant_node(node, constants: dict, learned: set, outputs: set, opsets: dict) -> list | None:
    """The values of a node computed from constants alone (Swin V2's qkv bias with the keys' part zeroed by
    ScatterND, its continuous position bias: an MLP of a constant table, the clamped exponential of its logit
    scale), as constants for the analysis to read like any other: None where it reads a tensor that is not a
    constant, is a lookup in one of the model's own tables (an embedding: kept, it is a layer), writes a graph
    output, or reads or gives more than FOLD_CONSTANT_ELEMENTS values."""
    inputs = [n for n in node.input if n]
    if (not inputs or node.domain not in ("", "ai.onnx") or node.op_type in _NOT_FOLDED
            or any(n not in constants for n in inputs) or any(o in outputs for o in node.output)
            or any(constants[n].size > FOLD_CONSTANT_ELEMENTS for n in inputs)  # a weight transposed, cast, ...
            or (node.op_type == "Gather" and node.input[0] in learned and constants[node.input[0]].ndim >= 2
                and constants[node.input[0]].dtype.kind == "f")):
        return None
    values = _evaluate(node, constants, opsets)
    if values is None or len(values) != len(node.output) or not all(node.output) or any(
            v.size > FOLD_CONSTANT_ELEMENTS for v in values):
        return None
    return values


def _fold_batchnorms(model: onnx.ModelProto) -> int:
    """Fold each inference BatchNormalization whose input is the only use of a Conv's or Gemm's output into that
    layer's weights and bias (in float64, stored in the weights' type). Returns how many were folded."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for o in graph.output:
        uses[o.name] = uses.get(o.name, 0) + 1
    producer = {out: node for node in graph.node for out in node.output}
    drop, gone = set(), set()
    for index, bn in enumerate(graph.node):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.input) < 5:
            continue
        if any(a.name == "training_mode" and a.i for a in bn.attribute) or len([o for o in bn.output if o]) != 1:
            continue
        layer = producer.get(bn.input[0])
        if layer is None or layer.op_type not in ("Conv", "Gemm") or layer.domain not in ("", "ai.onnx"):
            continue
        if uses.get(bn.input[0], 0) != 1 or len(layer.input) < 2 or layer.input[1] not in inits:
            continue
        has_bias = len(layer.input) > 2 and bool(layer.input[2])
        if has_bias and layer.input[2] not in inits:
            continue
        if any(name not in inits for name in bn.input[1:5]):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in layer.attribute}
        weight = tensor_array(inits[layer.input[1]])
        if weight.dtype.kind != "f" or (layer.op_type == "Gemm" and (attrs.get("transA", 0) or weight.ndim != 2)):
            continue
        out_axis = 0 if layer.op_type == "Conv" or attrs.get("transB", 0) else 1
        scale, shift, mean, var = (tensor_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        width = weight.shape[out_axis]
        if any(v.shape != (width,) for v in (scale, shift, mean, var)):
            continue
        if layer.op_type == "Gemm" and (attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        factor = scale / np.sqrt(var + eps)
        bias = tensor_array(inits[layer.input[2]]).astype(np.float64) if has_bias else np.zeros(width)
        if bias.shape != (width,):
            continue
        shape = [1] * weight.ndim
        shape[out_axis] = width
        new_w = (weight.astype(np.float64) * factor.reshape(shape)).astype(weight.dtype)
        new_b = ((bias - mean) * factor + shift).astype(weight.dtype)
        w_name, b_name = f"{bn.output[0]}/folded_weight", f"{bn.output[0]}/folded_bias"
        graph.initializer.extend([numpy_helper.from_array(new_w, w_name), numpy_helper.from_array(new_b, b_name)])
        del layer.input[1:]
        layer.input.extend([w_name, b_name])
        gone.add(layer.output[0])
        layer.output[0] = bn.output[0]
        drop.add(index)
    if drop:
        kept = [n for i, n in enumerate(graph.node) if i not in drop]
        del graph.node[:]
        graph.node.extend(kept)
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        keep_inits = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep_inits)
        names = {t.name for t in keep_inits}
        kept_inputs = [i for i in graph.input if i.name not in inits or i.name in names]
        del graph.input[:]
        graph.input.extend(kept_inputs)
        infos = [v for v in graph.value_info if v.name not in gone]
        del graph.value_info[:]
        graph.value_info.extend(infos)
    return len(drop)


def _concrete_shapes(model: onnx.ModelProto) -> tuple[dict, dict, dict, dict]:
    """Shapes (batch dimension set to 1), element types and ranks of every tensor that shape inference can reach,
    and the values of the small computations on shapes and constants that were evaluated to get there.
    Inference runs on the model without its weights (shapes are all it needs), so models of any size work.

    ONNX's data propagation stops at operators it does not evaluate (TorchScript computes a channel shuffle's
    Reshape target as Shape -> Gather -> Div -> Cast -> Unsqueeze -> Concat, and Div is not propagated), which
    leaves everything after it without a shape. So small computations on shapes and constants are evaluated here
    (`_fold_shape_computations`) and inference runs again on a copy that holds their values as constants; the
    model itself keeps computing them (its batch dimension stays dynamic)."""
    m, _ = without_weights(model)
    for inp in m.graph.input:
        dims = inp.type.tensor_type.shape.dim
        for d in dims:
            if not d.HasField("dim_value"):
                d.ClearField("dim_param")
                d.dim_value = 1
    del m.graph.value_info[:]
    m, values = infer_shapes_folding(_infer_shapes(m))
    return _collect_shapes(m) + (values,)


def shape_batch(a: "Analysis") -> int:
    """The batch size of analysis's shapes: the model's fixed batch, else 1 (`_concrete_shapes` sets a dynamic one
    to 1)."""
    for i in a.model.graph.input:
        if i.name not in a.initializers:
            dims = i.type.tensor_type.shape.dim
            return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else 1
    return 1


def infer_shapes_folding(m: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Rounds of `_fold_shape_computations` and shape inference on `m` (already shape-inferred, inputs of concrete
    shape, weights possibly stripped to their shapes) until nothing more folds: the model whose value infos hold
    every shape that small computations on shapes and constants decide, and the values so computed."""
    values = {}
    constants = _small_constants(m)  # read once: later rounds only add what the earlier ones folded
    for _ in range(_FOLD_ROUNDS):
        folded = _fold_shape_computations(m, _collect_shapes(m)[0], values, constants)
        if folded is None:
            break
        m = _infer_shapes(folded)
    return m, values


def known_shapes(m: onnx.ModelProto) -> dict:
    """Tensor name -> shape, for every tensor of `m` whose shape is fully known (value infos and initializers)."""
    return _collect_shapes(m)[0]


# rounds of folding and inference at most: each round can resolve the Reshapes whose output shapes the next
# computations read (a channel shuffle per block: a round per block)
_FOLD_ROUNDS = 64
# computations on shapes are small; a constant computation larger than this is left to the model
_FOLD_MAX_ELEMENTS = 4096


def _infer_shapes(m: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - shape inference errors are many and unexported
        raise ModelError(f"ONNX shape inference failed: {exc}") from exc


def _collect_shapes(m: onnx.ModelProto) -> tuple[dict, dict, dict]:
    shapes, types, ranks = {}, {}, {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        tt = vi.type.tensor_type
        types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
            ranks[vi.name] = len(dims)
            if all(d is not None for d in dims):
                shapes[vi.name] = dims
    for init in m.graph.initializer:
        shapes[init.name] = tuple(init.dims)
        types[init.name] = init.data_type
        ranks[init.name] = len(init.dims)
    return shapes, types, ranks


def _small_constants(m: onnx.ModelProto) -> dict:
    """Name -> value of every initializer of at most _FOLD_MAX_ELEMENTS values that has its data."""
    values = {}
    for t in m.graph.initializer:
        size = 1
        for d in t.dims:
            size *= d
        if size > _FOLD_MAX_ELEMENTS:
            continue
        try:
            value = tensor_array(t)
        except Exception:  # noqa: BLE001 - a weight stripped to its shape by without_weights
            continue
        if value.size == size:
            values[t.name] = value
    return values


def _fold_shape_computations(m: onnx.ModelProto, shapes: dict, found: dict,
                             constants: dict | None = None) -> onnx.ModelProto | None:
    """A copy of `m` (batch 1) in which every small node computed from constants and known shapes alone is replaced
    by its value as an initializer (added to `found` too); None when there is nothing new to fold. `constants`:
    `_small_constants` of the model the rounds started from (the initializers of `m` are those and `found`)."""

    opsets = {op.domain: op.version for op in m.opset_import}
    values = _small_constants(m) if constants is None else {**constants, **found}
    folded = {}
    for node in m.graph.node:
        if node.domain not in ("", "ai.onnx") or not node.output or not node.output[0]:
            continue
        if node.op_type in ("Shape", "Size") and node.input[0] in shapes:
            if node.op_type == "Size":
                value = np.array(int(np.prod(shapes[node.input[0]], dtype=np.int64)), dtype=np.int64)
            else:
                dims = np.array(shapes[node.input[0]], dtype=np.int64)
                rank = len(dims)
                start = next((a.i for a in node.attribute if a.name == "start"), 0)
                end = next((a.i for a in node.attribute if a.name == "end"), rank)
                value = dims[slice(start, end)]  # negative and out-of-range bounds clamp like Python's
            folded[node.output[0]] = values[node.output[0]] = value
            continue
        inputs = [n for n in node.input if n]
        if (not inputs and node.op_type != "Constant") or node.op_type in _RANDOM_OPS:
            continue  # a Constant node (a model not normalised: count_macs) is a small constant like any other
        if not all(n in values for n in inputs) or any(o in values for o in node.output if o):
            continue
        results = _evaluate(node, values, opsets)
        for name, value in zip(node.output, results or ()):
            if name and value.size <= _FOLD_MAX_ELEMENTS:
                folded[name] = values[name] = value
    gone = [n for n in m.graph.node if n.output and all(o in folded for o in n.output if o)]
    if not gone:
        return None
    names = {o for n in gone for o in n.output if o}
    out = copy.deepcopy(m)
    kept = [n for n in out.graph.node if not (n.output and all(o in names for o in n.output if o))]
    del out.graph.node[:]
    out.graph.node.extend(kept)
    infos = [v for v in out.graph.value_info if v.name not in names]
    del out.graph.value_info[:]
    out.graph.value_info.extend(infos)
    out.graph.initializer.extend(numpy_helper.from_array(np.asarray(folded[name]), name) for name in sorted(names))
    found.update(folded)
    return out


# --------------------------------------------------------------------------------------------------------------
# The walk


def refine_partition(a, b) -> np.ndarray:
    """The coarsest partition finer than both label arrays (None: one block), labelled 0, 1, ... in order of first
    appearance."""
    if a is None:
        a = np.zeros(len(b), dtype=np.int64)
    pairs = np.asarray(a, dtype=np.int64) * (int(np.max(b)) + 1) + np.asarray(b, dtype=np.int64)
    _, first, inverse = np.unique(pairs, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse.reshape(-1)]


def _alike_blocks(labels: np.ndarray, pairs: list) -> np.ndarray:
    """Refine a partition until channels matched alike (p[i] as q[i], for each pair (p, q)) fall into blocks alike:
    p[i] and p[j] share a block exactly when q[i] and q[j] do, so that each block maps onto one block."""
    labels = np.asarray(labels, dtype=np.int64)
    while True:
        count = len(np.unique(labels))
        for p, q in pairs:
            p, q = np.asarray(p), np.asarray(q)
            key = np.unique(labels[p] * (int(labels.max()) + 1) + labels[q], return_inverse=True)[1].reshape(-1)
            extra = np.zeros(len(labels), dtype=np.int64)
            extra[p] = extra[q] = 1 + key
            labels = refine_partition(labels, extra)
        if len(np.unique(labels)) == count:
            return labels


class _Unsupported(Exception):
    """Raised by a handler: this node cannot be followed (the reason says why)."""


class _Walk:
    """State of one pass over the graph; handlers read and write it through small verbs."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.graph_inputs = {i.name for i in self.graph.input}
        self.graph_outputs = {o.name for o in self.graph.output}
        self.initializers = {t.name: tensor_array(t) for t in self.graph.initializer}
        self.shapes, self.types, self.ranks, self.values = _concrete_shapes(model)
        self.tensor_spaces: dict = {}
        self.static: set = set(self.initializers)
        self.opaque: set = set()
        self.weights: list = []
        self.parent: dict = {}  # union-find over space ids
        self.widths: dict = {}
        self.identity: set = set()
        self.parts: dict = {}  # composite space id -> the space ids it concatenates
        self.partitions: dict = {}  # space id -> block label of each channel (matching stays inside blocks)
        self.views: dict = {}  # view space id -> [(space id, channel), ...] over spaces that are not derived
        self.alike: list = []  # ([(space, channel), ...], [(space, channel), ...]): matched alike, pair by pair
        self.group_links: list = []  # (input space or None: the shared input, output space, groups, node index)
        self.scores: set = set()  # attention scores (Q Kᵀ) and what is computed from them before the softmax
        # statistics of each head's features (a norm over them), one value for every feature of a head
        self.per_head: set = set()
        # query spaces matched as a view of their (repeated) key heads: grouped-query attention without a pin
        self.queries_of: set = set()
        self.averaged: dict = {}  # (node index, input index) -> why (Analysis.averaged)
        self.readers: dict = {}  # tensor name -> nodes reading it
        self.producers: dict = {}  # tensor name -> (node index, node) writing it
        for i, node in enumerate(self.graph.node):
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
            for name in node.output:
                self.producers[name] = (i, node)
        self.node_index = -1

    # union-find ------------------------------------------------------------------------------------------------
    def new_space(self, width: int, identity: bool = False) -> int:
        sid = len(self.parent)
        self.parent[sid] = sid
        self.widths[sid] = int(width)
        if identity:
            self.identity.add(sid)
        return sid

    def find(self, sid: int) -> int:
        while self.parent[sid] != sid:
            self.parent[sid] = self.parent[self.parent[sid]]
            sid = self.parent[sid]
        return sid

    def tie(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra in self.parts or rb in self.parts:
            raise _Unsupported("ties a concatenation of channels to another feature space")
        if ra in self.views or rb in self.views:
            raise _Unsupported("ties a slice or shuffle of channels to another feature space")
        if self.widths[ra] != self.widths[rb]:
            raise _Unsupported(f"ties spaces of different widths ({self.widths[ra]} and {self.widths[rb]})")
        if (ra in self.identity) != (rb in self.identity):
            # an input-derived space tied to a learned one: nothing is gained by treating it as identity
            raise _Unsupported("adds a learned feature space to the graph input")
        self.parent[rb] = ra

    def split_into_blocks(self, sid: int, blocks: int) -> None:
        """Features of space `sid` may only be matched inside `blocks` contiguous equal blocks (on top of any
        blocks already required)."""
        if self.find(sid) in self.parts or self.find(sid) in self.views:
            raise _Unsupported("splits a concatenation, slice or shuffle of channels into groups")
        width = self.widths[sid]
        self.refine(sid, np.arange(width) // (width // blocks))

    def refine(self, sid: int, labels: np.ndarray) -> None:
        """Features of space `sid` may only be matched inside the blocks of `labels` (and of earlier partitions)."""
        self.partitions[sid] = refine_partition(self.partitions.get(sid), labels)

    def pin(self, sid: int) -> None:
        """Every feature of space `sid` (of the spaces it is a view of) is matched only at its own place: feature j
        of model 0 with feature j of each other model. Rotary position embeddings (RoPE) rotate feature pairs of a
        head by angles that differ per feature: a merge commutes with them only when it keeps every feature in
        place."""
        for space in {sp for sp, _ in self.channels(sid)}:
            if self.find(space) not in self.identity:
                self.refine(space, np.arange(self.widths[space]))

    def channels(self, sid: int) -> list:
        """Channel j of space `sid` as (space, channel) of a space that is not derived (a Concat's parts, a view's
        sources, followed down)."""
        sid = self.find(sid)
        if sid in self.views:
            return list(self.views[sid])
        if sid in self.parts:
            return [pair for part in self.parts[sid] for pair in self.channels(part)]
        return [(sid, c) for c in range(self.widths[sid])]

    def new_view(self, channels: list, repeats: bool = False) -> int:
        """A space whose channel j is channels[j] = (space, channel). Each space it reads only part of is
        partitioned so that the part read is whole blocks: every cluster of a feature read stays inside the view.
        `repeats`: a channel may be read more than once (grouped-query attention's keys and values, each head
        repeated over its group of query heads), every channel as often, each copy in order (copy k of a channel
        goes with copy k of the channels it is merged with: `solver.view_matching`)."""
        if len(set(channels)) != len(channels) and (not repeats or len(set(Counter(channels).values())) != 1):
            raise _Unsupported("reads a channel twice")
        read: dict = {}
        for space, c in channels:
            read.setdefault(space, []).append(c)
        for space, cs in read.items():
            if len(cs) < self.widths[space] and self.find(space) not in self.identity:
                labels = np.zeros(self.widths[space], dtype=np.int64)
                labels[cs] = 1
                self.refine(space, labels)
        sid = self.new_space(len(channels))
        self.views[sid] = list(channels)
        return sid

    def value(self, name: str):
        """A constant, or a value computed from shapes and constants alone (see `_fold_shape_computations`)."""
        value = self.initializers.get(name)
        return self.values.get(name) if value is None else value

    # tensor verbs ----------------------------------------------------------------------------------------------
    def space_of(self, name: str) -> TensorSpace | None:
        return self.tensor_spaces.get(name)

    def const(self, name: str):
        return self.initializers.get(name)

    def shape(self, name: str):
        return self.shapes.get(name)

    def rank(self, name: str) -> int:
        shape = self.shape(name)
        if shape is None:
            raise _Unsupported(f"the shape of tensor '{name}' is unknown to ONNX shape inference")
        return len(shape)

    def width(self, ts: TensorSpace) -> int:
        return self.widths[self.find(ts.space)]

    def set_space(self, name: str, ts: TensorSpace) -> None:
        self.tensor_spaces[name] = ts

    def add_weight(self, input_index: int, axis: int, space: int, role: str, expand: int = 1,
                   groups: int = 1) -> None:
        self.weights.append(WeightAxis(self.node_index, input_index, axis, space, role, expand, groups))

    def attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def _extra_outputs_opaque(w: _Walk, node) -> None:
    """Outputs after the first (BatchNorm's running statistics, Dropout's mask, MaxPool's indices) carry no
    channels onnxzip follows."""
    for extra in node.output[1:]:
        if extra:
            w.opaque.add(extra)


def _require_const(w: _Walk, node, i: int, what: str) -> np.ndarray:
    if i >= len(node.input) or not node.input[i]:
        raise _Unsupported(f"has no {what}")
    value = w.const(node.input[i])
    if value is None:
        raise _Unsupported(f"its {what} '{node.input[i]}' is computed, not a constant")
    return value


def _channel_param(w: _Walk, node, i: int, ts: TensorSpace, out_rank: int) -> None:
    """A constant input broadcast against a space tensor: per-channel where it varies along the channel axis."""
    name = node.input[i]
    value = w.const(name)
    if value is None:
        shape = w.shape(name)
        if shape is None:
            raise _Unsupported(f"input '{name}' is computed and of unknown shape")
        k = ts.axis - (out_rank - len(shape))
        if k >= 0 and shape[k] != 1:
            raise _Unsupported(f"input '{name}' is computed and varies along the channel axis")
        return
    k = ts.axis - (out_rank - value.ndim)
    if k < 0 or value.shape[k] == 1:
        return  # the same value for every channel: nothing to merge
    if value.shape[k] != w.width(ts) * ts.expand:
        raise _Unsupported(f"constant '{name}' of shape {list(value.shape)} does not match the channel axis")
    w.add_weight(i, k, ts.space, "out", ts.expand)


# --------------------------------------------------------------------------------------------------------------
# Handlers: one per operator type. Each reads the node's inputs and sets its outputs' spaces, or raises
# _Unsupported. A handler is only called when at least one input is a space tensor and none is opaque.


def _conv(w: _Walk, node):
    x = w.space_of(node.input[0])
    if x is None or x.axis != 1 or x.expand != 1:
        raise _Unsupported("its input does not hold channels on axis 1")
    weight = _require_const(w, node, 1, "weight")
    group = w.attr(node, "group", 1)
    c_in = w.width(x)
    if group == 1:
        out = w.new_space(weight.shape[0])
        w.add_weight(1, 0, out, "out")
        w.add_weight(1, 1, x.space, "in")
        if len(node.input) > 2 and node.input[2]:
            _require_const(w, node, 2, "bias")
            w.add_weight(2, 0, out, "out")
        w.set_space(node.output[0], TensorSpace(out, 1))
        return "weighted", node.input[0], x, TensorSpace(out, 1)
    if group == c_in and weight.shape[0] == c_in:
        # depthwise: one filter per channel, so it carries the space with per-channel weights
        w.add_weight(1, 0, x.space, "out")
        if len(node.input) > 2 and node.input[2]:
            _require_const(w, node, 2, "bias")
            w.add_weight(2, 0, x.space, "out")
        w.set_space(node.output[0], x)
        return "carrier", None, x, x
    if c_in % group or weight.shape[0] % group or weight.shape[1] != c_in // group:
        raise _Unsupported(f"grouped convolution (group={group}) of {c_in} input and {weight.shape[0]} output "
                           "channels that do not split into equal groups")
    if c_in // group < 2:
        raise _Unsupported(f"grouped convolution with one input channel per group (group={group}) and "
                           f"{weight.shape[0] // group} outputs per group: its input channels cannot be matched")
    # grouped: output group g reads input block g only. Both spaces are split into `group` blocks and matched
    # block by block, so the merged layer keeps its groups; the link lets whole groups be matched across positions
    # (one order for both spaces: `BlockFamily`)
    w.split_into_blocks(x.space, group)
    out = w.new_space(weight.shape[0])
    w.split_into_blocks(out, group)
    w.group_links.append((x.space, out, group, w.node_index))
    w.add_weight(1, 0, out, "out")
    w.add_weight(1, 1, x.space, "in", groups=group)
    if len(node.input) > 2 and node.input[2]:
        _require_const(w, node, 2, "bias")
        w.add_weight(2, 0, out, "out")
    w.set_space(node.output[0], TensorSpace(out, 1))
    return "weighted", node.input[0], x, TensorSpace(out, 1)


def _gemm(w: _Walk, node):
    x = w.space_of(node.input[0])
    if x is None or w.attr(node, "transA", 0) or x.axis != 1 or w.rank(node.input[0]) != 2:
        raise _Unsupported("its first input does not hold features on axis 1")
    weight = _require_const(w, node, 1, "weight")
    trans_b = w.attr(node, "transB", 0)
    out_axis, in_axis = (0, 1) if trans_b else (1, 0)
    out = w.new_space(weight.shape[out_axis])
    w.add_weight(1, out_axis, out, "out")
    w.add_weight(1, in_axis, x.space, "in", x.expand)
    if len(node.input) > 2 and node.input[2]:
        bias = _require_const(w, node, 2, "bias")
        if bias.size > 1:
            w.add_weight(2, bias.ndim - 1, out, "out")
    w.set_space(node.output[0], TensorSpace(out, 1))
    return "weighted", node.input[0], x, TensorSpace(out, 1)


def _matmul(w: _Walk, node):
    x = w.space_of(node.input[0])
    y = w.space_of(node.input[1])
    if x is not None and y is not None and w.find(y.space) not in w.identity:
        if w.find(x.space) in w.identity:
            return _attention_values(w, node, x, y)
        return _attention_scores(w, node, x, y)
    if x is None or y is not None:
        raise _Unsupported("only MatMul of features by a constant matrix is supported")
    if x.heads:
        raise _Unsupported("multiplies features split into attention heads by a constant")
    weight = _require_const(w, node, 1, "weight")
    rank = w.rank(node.input[0])
    if weight.ndim != 2 or x.axis != rank - 1:
        raise _Unsupported("only MatMul by a 2-D constant on the features' last axis is supported")
    out = w.new_space(weight.shape[1])
    w.add_weight(1, 1, out, "out")
    w.add_weight(1, 0, x.space, "in", x.expand)
    ts = TensorSpace(out, rank - 1)
    w.set_space(node.output[0], ts)
    return "weighted", node.input[0], x, ts


def _feature_part(ts: TensorSpace) -> tuple:
    """(axis of the features inside a head, heads as [(axis, size), ...]) of a tensor, split into heads or not."""
    if ts.heads:
        parts = _parts(ts)
        return parts[-1][0], parts[:-1]
    return ts.axis, []


def _head_blocks(w: _Walk, ts: TensorSpace, d: int | None = None) -> None:
    """Features of different heads of `ts` are never matched together: each head is a block of the spaces its
    channels come from (channel j of the tensor is in head j // d; `d`: the head size of a tensor whose heads are
    not split out on axes of their own, the fused Attention op's (N, T, H·d) inputs)."""
    if d is None:
        if not ts.heads:
            return
        d = ts.split[-1]
    source = w.channels(ts.space)
    labels: dict = {}
    for j, (space, c) in enumerate(source):
        labels.setdefault(space, np.zeros(w.widths[space], dtype=np.int64))[c] = 1 + j // d
    for space, lab in labels.items():
        w.refine(space, lab)


def _attention_scores(w: _Walk, node, q: TensorSpace, k: TensorSpace, keys_transposed: bool = True):
    """Q Kᵀ of two feature tensors (queries (…, T, d), keys (…, d, T), or (…, T, d) where not `keys_transposed`:
    an Einsum's "…id,…jd->…ij"): the dot product over the features of each head must survive the merge, so feature
    j of the queries and feature j of the keys share one transform (their spaces are tied, or matched alike where
    both are cut from one packed projection), and every head is a block. The scores carry no channels: like the
    shared input, the merged model computes them once for both models (for a permutation exactly, for zipped
    features approximately)."""
    rank = w.rank(node.input[0])
    if w.rank(node.input[1]) != rank or rank < 2 or q.expand != 1 or k.expand != 1:
        raise _Unsupported("multiplies two feature tensors that are not queries (…, T, d) and keys (…, d, T)")
    (qa, q_heads), (ka, k_heads) = _feature_part(q), _feature_part(k)
    if qa != rank - 1 or ka != rank - (2 if keys_transposed else 1):
        raise _Unsupported("multiplies two feature tensors over an axis that does not hold the features of both")
    if len(q_heads) == 1 and q_heads[0][0] < rank - 2 and q.split[-1] == w.width(k) and q_heads[0][1] > 1 \
            and (not k_heads or k_heads == [(q_heads[0][0], 1)]):
        # multi-query attention: one key head for every query head (broadcast by the MatMul)
        k = _one_head_for_all(w, k, q_heads[0])
        k_heads = q_heads
    if q_heads != k_heads or any(ax >= rank - 2 for ax, _ in q_heads):
        raise _Unsupported("multiplies queries and keys whose heads do not line up")
    if w.width(q) != w.width(k):
        raise _Unsupported(f"multiplies {w.width(q)} query features by {w.width(k)} key features")
    _queries_with_keys(w, q, k)
    _set_shared(w, node.output[0])
    w.scores.add(node.output[0])
    return "carrier", None, q, w.space_of(node.output[0])


def _one_head_for_all(w: _Walk, x: TensorSpace, head: tuple) -> TensorSpace:
    """Keys or values of one head used by every one of `head` = (axis, H) query heads: a view reading each channel H
    times, split into the H heads on that axis."""
    view = _repeated_view(w, x.space, (1, w.width(x)), 0, head[1])
    return TensorSpace(view, x.axis, 1, (head[1], w.width(x)), (head[0], x.axis))


def _queries_with_keys(w: _Walk, q: TensorSpace, k: TensorSpace, d: int | None = None) -> None:
    """Feature j of the queries and feature j of the keys share one transform: their spaces are tied, or matched
    alike where both are cut from one packed projection; every head (of `d` features where given) is a block."""
    qs, ks = w.find(q.space), w.find(k.space)
    derived = [sid for sid in (qs, ks) if sid in w.views or sid in w.parts]
    if not derived:
        _head_blocks(w, q, d)
        _head_blocks(w, k, d)
        w.tie(qs, ks)
    elif qs != ks:
        cq, ck = w.channels(qs), w.channels(ks)
        if len({w.find(sp) for sp, _ in cq + ck}) == 1 and not set(cq) & set(ck):
            _head_blocks(w, q, d)
            _head_blocks(w, k, d)
            w.alike.append((cq, ck))
        elif _is_pinned(w, qs) and _is_pinned(w, ks):
            # a rotary embedding pinned every feature of both in place (each matched only with itself in the other
            # models): queries and keys share one transform without a tie, also where the keys are a view of another
            # width (grouped-query attention: each key head repeated over its group of query heads)
            _head_blocks(w, q, d)
            _head_blocks(w, k, d)
        elif qs not in w.views and qs not in w.parts and qs not in w.identity and ks in w.views \
                and len(set(w.views[ks])) < len(w.views[ks]) and w.widths[qs] == len(w.views[ks]) \
                and q.split == k.split and qs not in w.queries_of:
            # grouped-query attention: the keys are a view repeating each key head over its group of query heads.
            # The queries of a group must share the transform of their key head, across two spaces of different
            # widths: the queries become that view of the keys (channel j of the queries matched as channel j of
            # the repeated keys, each copy in its own head), so their weights are merged with the keys' matching
            _head_blocks(w, k, d)
            w.views[qs] = list(w.views[ks])
            w.queries_of.add(qs)
        else:
            raise _Unsupported("multiplies queries and keys cut from different projections")
    else:
        _head_blocks(w, q, d)


def _einsum_form(equation: str) -> str | None:
    """'scores' for a batched Q Kᵀ ("…id,…jd->…ij"), 'product' for a batched matrix product ("…ij,…jd->…id"),
    with the same batch letters in all three places; None for any other equation."""
    text = equation.replace(" ", "")
    if "->" not in text or "." in text:
        return None
    ins, out = text.split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    r = len(out)
    if r < 2 or len(a) != r or len(b) != r or len(set(out)) != r or not (a[:-2] == b[:-2] == out[:-2]):
        return None
    i, j = out[-2], out[-1]
    if a[-2] == i and b[-2] == j and a[-1] == b[-1] and a[-1] not in out:
        return "scores"
    if a[-2] == i and a[-1] == b[-2] and b[-1] == j and a[-1] not in out:
        return "product"
    return None


def _einsum(w: _Walk, node):
    """Einsum of two feature tensors written as attention's products (torchvision's MaxViT): "…id,…jd->…ij" is
    Q Kᵀ with the keys (…, T, d), "…ij,…jd->…id" is the attention weights times the values."""
    equation = w.attr(node, "equation", b"")
    equation = equation.decode() if isinstance(equation, bytes) else str(equation)
    form = _einsum_form(equation)
    x = w.space_of(node.input[0]) if len(node.input) == 2 else None
    y = w.space_of(node.input[1]) if len(node.input) == 2 else None
    if form is None or x is None or y is None:
        raise _Unsupported(f"Einsum '{equation}' is not an attention product of two computed tensors "
                           "(…id,…jd->…ij or …ij,…jd->…id)")
    shared = w.find(x.space) in w.identity, w.find(y.space) in w.identity
    if form == "scores" and not any(shared):
        return _attention_scores(w, node, x, y, keys_transposed=False)
    if form == "product" and shared == (True, False):
        return _attention_values(w, node, x, y)
    raise _Unsupported(f"Einsum '{equation}' multiplies features in a way attention does not")


def _attention_values(w: _Walk, node, p: TensorSpace, v: TensorSpace):
    """P V: attention weights (computed once, like the scores) times values (…, T, d): each head's features are
    mixed over tokens by their own head's weights, so the values' space carries through, every head a block."""
    rank = w.rank(node.input[1])
    if w.rank(node.input[0]) != rank or rank < 2 or v.expand != 1:
        raise _Unsupported("multiplies features by a computed matrix that is not attention weights (…, T, T)")
    va, heads = _feature_part(v)
    if va != rank - 1 or any(ax >= rank - 2 for ax, _ in heads):
        raise _Unsupported("multiplies features by a computed matrix over their feature axis")
    out_shape, v_shape = w.shape(node.output[0]), w.shape(node.input[1])
    if heads in ([], [(1, 1)]) and rank == 4 and out_shape is not None and v_shape is not None \
            and out_shape[1] > 1 and v_shape[1] in (1, out_shape[1]):
        # multi-query attention: one value head for every query head (broadcast by the MatMul)
        v = _one_head_for_all(w, v, (1, int(out_shape[1])))
    _head_blocks(w, v)
    w.set_space(node.output[0], v)
    return "carrier", None, v, v


def _attention_op(w: _Walk, node):
    """ONNX's fused Attention (opset 23 and up; the dynamo exporter writes it for scaled_dot_product_attention and
    nn.MultiheadAttention from opset 23): softmax(Q Kᵀ · scale + mask) V of inputs (N, H, T, d), split into heads
    as the written-out MatMul / Softmax / MatMul's are, or (N, T, H·d) split by the op itself (`q_num_heads`,
    `kv_num_heads`). As there, queries and keys of each head share one transform, the values carry through to the
    output, every head is a block. The mask is added to the scores: a constant one that differs between the
    models is averaged (`_follow_scores`), one computed from the inputs is the same in both."""
    inputs = list(node.input) + [""] * (7 - len(node.input))
    if inputs[4] or inputs[5]:
        raise _Unsupported("attends over a cache of past keys and values (past_key, past_value)")
    if any(node.output[1:]):
        raise _Unsupported("returns its keys, values or scores (present_key, present_value, qk_matmul_output)")
    q, k, v = (w.space_of(n) if n else None for n in inputs[:3])
    if q is None or k is None or v is None or any(w.find(ts.space) in w.identity for ts in (q, k, v)):
        raise _Unsupported("attends with queries, keys or values that are not features of the model")
    for j in (3, 6):
        extra = w.space_of(inputs[j]) if inputs[j] else None
        if extra is not None and w.find(extra.space) not in w.identity:
            raise _Unsupported(f"its {('mask', 'key lengths')[j == 6]} '{inputs[j]}' carries features")
    if any(ts.expand != 1 for ts in (q, k, v)):
        raise _Unsupported("attends with features repeated along their axis")
    rank = w.rank(inputs[0])
    if w.rank(inputs[1]) != rank or w.rank(inputs[2]) != rank or rank not in (3, 4):
        raise _Unsupported("attends with inputs of other ranks than (N, T, H·d) or (N, H, T, d)")
    if rank == 4:
        parts = [_feature_part(ts) for ts in (q, k, v)]
        if any(axis != 3 or [ax for ax, _ in heads] != [1] for axis, heads in parts) or parts[1][1] != parts[2][1]:
            raise _Unsupported("attends with queries, keys and values whose heads are not on axis 1 alike")
        heads, kv_heads = parts[0][1][0][1], parts[1][1][0][1]
        if heads % kv_heads or q.split[-1] != k.split[-1]:
            raise _Unsupported(f"attends with {heads} query heads of {q.split[-1]} features over {kv_heads} key "
                               f"heads of {k.split[-1]}")
        if kv_heads < heads:  # grouped-query attention: the op repeats each key/value head over its group
            k, v = _repeat_heads(w, k, 0, heads // kv_heads), _repeat_heads(w, v, 0, heads // kv_heads)
        _queries_with_keys(w, q, k)
        _head_blocks(w, v)
        out = v
    else:
        if any(ts.heads or ts.split or ts.axis != 2 for ts in (q, k, v)):
            raise _Unsupported("attends with (N, T, H·d) inputs whose features are not on their last axis")
        heads, kv_heads = w.attr(node, "q_num_heads", 0), w.attr(node, "kv_num_heads", 0)
        widths = [w.width(ts) for ts in (q, k, v)]
        if heads < 1 or kv_heads < 1 or heads % kv_heads or widths[0] % heads or widths[0] // heads * kv_heads != \
                widths[1] or widths[2] % kv_heads:
            raise _Unsupported(f"attends with {widths[0]} query and {widths[1]} key features in {heads} query heads "
                               f"over {kv_heads} key/value heads")
        d, dv = widths[0] // heads, widths[2] // kv_heads
        if kv_heads < heads:  # grouped-query attention: the op repeats each key/value head over its group
            k = TensorSpace(_repeated_view(w, k.space, (kv_heads, d), 0, heads // kv_heads), 2)
            v = TensorSpace(_repeated_view(w, v.space, (kv_heads, dv), 0, heads // kv_heads), 2)
        _queries_with_keys(w, q, k, d)
        _head_blocks(w, v, dv)
        out = TensorSpace(v.space, 2)
    if inputs[3]:
        _average_score_constants(w, inputs[3], w.node_index, 3, "a learned bias added to attention scores")
    w.set_space(node.output[0], out)
    return "carrier", None, v, out


def _batchnorm(w: _Walk, node):
    x = w.space_of(node.input[0])
    if x.axis != 1 or x.expand != 1:
        raise _Unsupported("normalises an axis that does not hold the channels")
    for i in range(1, 5):
        _require_const(w, node, i, "statistics")
        w.add_weight(i, 0, x.space, "out")
    w.set_space(node.output[0], x)
    _extra_outputs_opaque(w, node)
    return "carrier", None, x, x


def _instancenorm(w: _Walk, node):
    """InstanceNormalization on the channel axis: per-channel statistics, scale and bias. With the channels inside
    a normalised (spatial) axis, as in PyTorch's GroupNorm(1) decomposition, all channels share their statistics
    and the (size-1) scale and bias: like LayerNorm, exact for permutations, an approximation for zipped features."""
    x = w.space_of(node.input[0])
    if x.axis >= 2:
        for i in (1, 2):
            _require_const(w, node, i, "scale and bias")
        w.set_space(node.output[0], x)
        return "carrier", None, x, x
    if x.axis != 1 or x.expand != 1:
        raise _Unsupported("normalises an axis that does not hold the channels")
    for i in (1, 2):
        _require_const(w, node, i, "scale and bias")
        w.add_weight(i, 0, x.space, "out")
    w.set_space(node.output[0], x)
    return "carrier", None, x, x


def _unary(w: _Walk, node):
    """Element-wise on its first input; any other input must be one value for all channels (Clip's bounds)."""
    x = w.space_of(node.input[0])
    for name in node.input[1:]:
        if name and w.space_of(name) is not None:
            raise _Unsupported("a second input carries channels")
        if name:
            value = w.const(name)
            if value is not None and value.size > 1 and node.op_type != "Dropout":
                raise _Unsupported(f"input '{name}' is not a single value")
    w.set_space(node.output[0], x)
    _extra_outputs_opaque(w, node)
    return "carrier", None, x, x


def _elementwise(w: _Walk, node):
    """Broadcasting element-wise ops: space inputs are tied (a residual Add), constants are per-channel params."""
    _absorb_broadcast_constants(w, node)
    out_rank = max(w.rank(n) for n in node.input if n)
    spaced = [(i, w.space_of(n)) for i, n in enumerate(node.input) if n and w.space_of(n) is not None]
    learned = [(i, ts) for i, ts in spaced if w.find(ts.space) not in w.identity]
    if learned:
        spaced = [(i, ts) for i, ts in spaced if not _per_position(w, node, i, ts, learned[0], out_rank)]
    first_i, first = spaced[0]
    if any(ts.heads for _, ts in spaced):
        return _elementwise_heads(w, node, spaced, out_rank)
    axis = first.axis + out_rank - w.rank(node.input[first_i])
    for i, ts in spaced[1:]:
        if ts.axis + out_rank - w.rank(node.input[i]) != axis or ts.expand != first.expand:
            raise _Unsupported("its inputs hold channels on different axes")
        if w.width(ts) != w.width(first):
            raise _Unsupported(f"ties spaces of different widths ({w.width(first)} and {w.width(ts)})")
    out = TensorSpace(first.space, axis, first.expand)
    for i, name in enumerate(node.input):
        if name and w.space_of(name) is None:
            _channel_param(w, node, i, out, out_rank)
    for _, ts in spaced[1:]:  # tie only once nothing can fail any more
        w.tie(first.space, ts.space)
    w.set_space(node.output[0], out)
    return "carrier", None, first, out


def _per_position(w: _Walk, node, i: int, ts: TensorSpace, learned: tuple, out_rank: int) -> bool:
    """Whether input i (of space `ts`) is a shared tensor of one value per position, broadcast over the channels of
    the `learned` (index, space) input (RMSNorm's 1/rms(x), a token mask): it scales or shifts every channel alike,
    so it carries no channels."""
    j, ref = learned
    if w.find(ts.space) not in w.identity or ref.heads or ref.split:
        return False
    shape = w.shape(node.input[i])
    if shape is None:
        return False
    k = ref.axis + out_rank - w.rank(node.input[j]) - (out_rank - len(shape))  # the channel axis in input i
    return k < 0 or shape[k] == 1


def _elementwise_heads(w: _Walk, node, spaced: list, out_rank: int):
    """An element-wise op on a tensor split into heads by a tensor the same in every model and every head (a
    constant, or computed from shapes or the input): by one value for every entry (the 1/sqrt(d) scaling of queries
    and keys) it carries the split; `Mul` or `Div` by values that differ along the features inside a head (RoPE's
    cos and sin) pins the features in place (`_Walk.pin`). Two tensors split alike into heads whose features are
    all pinned, from one space (RoPE's q·cos + rotate_half(q)·sin), combine into the first one's space: every
    feature is merged with the same weights in place, so the combination commutes with the merge."""
    heads = [(i, ts) for i, ts in spaced if ts.heads and w.find(ts.space) not in w.identity]
    if len(heads) == 2 and node.op_type in ("Add", "Sub") and len(spaced) == 2:
        return _combine_pinned_heads(w, node, heads, out_rank)
    if len(heads) != 1:
        raise _Unsupported("combines two tensors split into attention heads")
    (i, x), = heads
    shift = out_rank - w.rank(node.input[i])
    out_parts = [(ax + shift, n) for ax, n in _parts(x)]
    pin = False
    for j, name in enumerate(node.input):
        if j == i or not name:
            continue
        value = w.value(name)
        shape = np.shape(value) if value is not None else w.shape(name)
        if shape is None:
            raise _Unsupported(f"the shape of input '{name}' is unknown")
        if int(np.prod(shape, dtype=np.int64)) == 1:
            continue
        full = (1,) * (out_rank - len(shape)) + tuple(shape)
        per_position = all(full[ax] == 1 for ax, _ in out_parts)
        per_feature = (all(full[ax] == 1 for ax, _ in out_parts[:-1]) and full[out_parts[-1][0]] == out_parts[-1][1]
                       and (node.op_type == "Mul" or (node.op_type == "Div" and j == 1)))
        if w.space_of(name) is not None and w.find(w.space_of(name).space) not in w.identity:
            raise _Unsupported(f"input '{name}' is learned features, not one value for every entry")
        if name in w.per_head and node.op_type in ("Mul", "Div"):
            continue  # a statistic of each head's features (its norm): the same for every feature of the head
        if per_feature:
            pin = True
        elif not per_position:
            raise _Unsupported(f"input '{name}' is not one value for every entry of a tensor split into attention "
                               "heads, nor one per feature the same in every head")
    if pin:
        w.pin(x.space)
    out = _split_space(x.space, out_parts)
    w.set_space(node.output[0], out)
    return "carrier", None, x, out


def _combine_pinned_heads(w: _Walk, node, heads: list, out_rank: int):
    (i, x), (j, y) = heads
    px = [(ax + out_rank - w.rank(node.input[i]), n) for ax, n in _parts(x)]
    py = [(ax + out_rank - w.rank(node.input[j]), n) for ax, n in _parts(y)]
    if px != py:
        raise _Unsupported("combines two tensors split into attention heads that do not line up")
    cx, cy = w.channels(x.space), w.channels(y.space)
    if set(cx) != set(cy):
        raise _Unsupported("combines two tensors split into attention heads from different features")
    if not (_is_pinned(w, x.space) and _is_pinned(w, y.space)):
        raise _Unsupported("combines two tensors split into attention heads (features not pinned by a rotary "
                           "embedding)")
    out = _split_space(x.space, px)
    w.set_space(node.output[0], out)
    return "carrier", None, x, out


def _is_pinned(w: _Walk, sid: int) -> bool:
    """Whether every feature space `sid` reads (itself, or the sources of a view) is pinned: each feature its own
    block (over the spaces tied to it too), or the shared input."""
    for space in {w.find(sp) for sp, _ in w.channels(sid)}:
        if space in w.identity:
            continue
        combined = None
        for sp, labels in w.partitions.items():
            if w.find(sp) == space:
                combined = refine_partition(combined, labels)
        if combined is None or len(np.unique(combined)) != w.widths[space]:
            return False
    return True


def _pool(w: _Walk, node):
    x = w.space_of(node.input[0])
    if x.axis != 1 or x.expand != 1:
        raise _Unsupported("pools an axis that holds the channels")
    w.set_space(node.output[0], x)
    _extra_outputs_opaque(w, node)
    return "carrier", None, x, x


def _axes(w: _Walk, node, rank: int):
    axes = w.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = w.const(node.input[1])
        if value is None:
            raise _Unsupported("its axes are computed, not constant")
        axes = value.tolist()
    if axes is None:
        return None
    return sorted(a % rank for a in axes)


def _reduce(w: _Walk, node):
    x = w.space_of(node.input[0])
    rank = w.rank(node.input[0])
    axes = _axes(w, node, rank)
    if axes is None:
        if w.attr(node, "noop_with_empty_axes", 0):
            w.set_space(node.output[0], x)
            return "carrier", None, x, x
        raise _Unsupported("reduces over every axis, the channels included")
    if x.axis in axes:
        return _channel_statistic(w, node, x, sorted(axes))
    if x.heads:
        raise _Unsupported("reduces a tensor split into attention heads over other axes than a head's features")
    if x.expand != 1 and any(a > x.axis for a in axes):
        raise _Unsupported("reduces inside a flattened channel axis")
    keep = w.attr(node, "keepdims", 1)
    out = TensorSpace(x.space, x.axis if keep else x.axis - sum(a < x.axis for a in axes), x.expand)
    w.set_space(node.output[0], out)
    return "carrier", None, x, out


def _channel_statistic(w: _Walk, node, x: TensorSpace, axes=None):
    """A reduction over the channel axis (RMSNorm's mean of squares, a mean over channels): one value per position
    that carries no channels. Like attention scores it is computed once in the trunk on the merged features, for
    both models: exact for permutations (the statistic does not depend on the channels' order), an approximation
    for zipped features, as LayerNorm's statistics are. Over the features of each attention head alone, keeping
    the axis (Swin V2's cosine attention normalises queries and keys, F.normalize): one value per head and
    position, the same for every feature of the head (`_Walk.per_head`)."""
    if x.heads and list(axes or ()) == [x.axis] and w.attr(node, "keepdims", 1):
        _set_shared(w, node.output[0])
        w.per_head.add(node.output[0])
        return "carrier", None, x, w.space_of(node.output[0])
    if x.heads or x.split:
        raise _Unsupported("reduces over attention heads or the channels of a shuffle")
    _set_shared(w, node.output[0])
    return "carrier", None, x, w.space_of(node.output[0])


# operators that keep a per-head statistic one value for every feature of a head, with scalar constants or (Expand)
# a target shape: its clamp, its broadcast back to the heads' shape, its square root or reciprocal
_PER_HEAD_OPS = ("Clip", "Max", "Min", "Expand", "Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Pow", "Cast",
                 "Identity", "Abs")


def _follow_per_head(w: _Walk, node) -> None:
    if node.op_type not in _PER_HEAD_OPS or not any(n in w.per_head for n in node.input if n):
        return
    for j, name in enumerate(node.input):
        if not name or name in w.per_head or (node.op_type == "Expand" and j == 1):
            continue
        value = w.value(name)
        if value is None or np.size(value) != 1:
            return  # varies along the features: no longer one value per head
    w.per_head.update(n for n in node.output if n)


def _flatten_like(w: _Walk, node, in_shape, out_shape):
    """Flatten/Reshape: follow the channels wherever the reshape keeps each channel's entries one contiguous block
    (row-major) after the same leading dimensions: flattening channel-major, splitting a flattened axis back into
    channels and space, or moving all channels into one axis behind a new unit axis (PyTorch's GroupNorm with one
    group: Reshape (N, C, H, W) -> (N, 1, C*H*W) -> InstanceNormalization -> Reshape back)."""
    x = w.space_of(node.input[0])
    a = x.axis
    if in_shape is None or out_shape is None:
        raise _Unsupported("the shapes around it are unknown to ONNX shape inference")
    if tuple(out_shape[: a + 1]) == tuple(in_shape[: a + 1]):
        w.set_space(node.output[0], x)  # channels and everything before them untouched
        return "carrier", None, x, x
    width = w.width(x)
    inner = x.expand * int(np.prod(in_shape[a + 1 :], dtype=np.int64))  # entries per channel
    lead = [d for d in in_shape[:a] if d != 1]
    for b, d in enumerate(out_shape):
        if a >= 1 and b == 0:
            continue  # never into the batch axis
        if d and d % width == 0 and [e for e in out_shape[:b] if e != 1] == lead and \
                (d // width) * int(np.prod(out_shape[b + 1 :], dtype=np.int64)) == inner:
            out = TensorSpace(x.space, b, d // width)
            break
    else:
        raise _Unsupported(f"reshapes {list(in_shape)} to {list(out_shape)} across the channel axis {a}")
    w.set_space(node.output[0], out)
    return "carrier", None, x, out


def _flatten(w: _Walk, node):
    x = w.space_of(node.input[0])
    in_shape = w.shape(node.input[0])
    if in_shape is None:
        raise _Unsupported("the shape of its input is unknown to ONNX shape inference")
    k = w.attr(node, "axis", 1) % max(len(in_shape), 1)
    if x.axis < k:
        raise _Unsupported("flattens the channel axis into the leading (batch) dimension")
    if any(d != 1 for d in in_shape[k : x.axis]):
        raise _Unsupported("flattens axes that come before the channels into them")
    # the output is 2-D; channel c of the input covers entries c*expand ... (c+1)*expand-1 of axis 1
    out = TensorSpace(x.space, 1, x.expand * int(np.prod(in_shape[x.axis + 1 :], dtype=np.int64)))
    w.set_space(node.output[0], out)
    return "carrier", None, x, out


def _reshape(w: _Walk, node):
    """Flatten-like reshapes (`_flatten_like`), and the two reshapes of a channel shuffle: (N, C, H, W) ->
    (N, G, C/G, H, W), whose output then holds the channels split over two axes, and back."""
    x = w.space_of(node.input[0])
    in_shape, out_shape = w.shape(node.input[0]), w.shape(node.output[0])
    if in_shape is None or out_shape is None:
        raise _Unsupported("the shapes around it are unknown to ONNX shape inference")
    a = x.axis
    if x.heads:
        repeated = _repeated_heads(w, x, in_shape, out_shape)
        if repeated is not None:
            w.set_space(node.output[0], repeated)
            return "carrier", None, x, repeated
        if any(n > 1 for n in x.split[:-1]):
            return _reshape_heads(w, node, x, in_shape, out_shape)
        x = TensorSpace(x.space, x.axis)  # one head (multi-query attention): a plain channel axis to a reshape
    if x.split:
        if tuple(out_shape) != tuple(in_shape[:a]) + (int(np.prod(x.split)),) + tuple(in_shape[a + len(x.split):]):
            raise _Unsupported(f"reshapes {list(in_shape)} to {list(out_shape)} inside a channel shuffle")
        out = TensorSpace(x.space, a, x.expand)
        w.set_space(node.output[0], out)
        return "carrier", None, x, out
    if x.expand == 1 and len(out_shape) == len(in_shape) + 1 and tuple(out_shape[:a]) == tuple(in_shape[:a]) \
            and tuple(out_shape[a + 2:]) == tuple(in_shape[a + 1:]) and out_shape[a] * out_shape[a + 1] == in_shape[a] \
            and out_shape[a] > 1 and out_shape[a + 1] > 1 and _shuffle_follows(w, node, a):
        out = TensorSpace(x.space, a, 1, (int(out_shape[a]), int(out_shape[a + 1])))
        w.set_space(node.output[0], out)
        return "carrier", None, x, out
    if x.expand == 1 and a == len(in_shape) - 1 and len(out_shape) == len(in_shape) + 1 and out_shape[-2] == 1 \
            and tuple(out_shape[:-2]) == tuple(in_shape[:-1]) and out_shape[-1] == in_shape[-1] \
            and _transposed_into_heads(w, node):
        # (N, T, d) -> (N, T, 1, d), then its head axis moved before the tokens: one attention head (multi-query
        # attention's keys and values), kept as a head part of size 1 so that the head is followed as one
        rank = len(out_shape)
        out = TensorSpace(x.space, rank - 1, 1, (1, int(in_shape[-1])), (rank - 2, rank - 1))
        w.set_space(node.output[0], out)
        return "carrier", None, x, out
    if x.expand == 1 and a == len(in_shape) - 1 and len(out_shape) >= 2 and out_shape[-1] == in_shape[-1]:
        # channels last, and last again: the leading axes merge or split (Hugging Face's Conv1D in GPT-2,
        # x.view(-1, C) before its addmm, and back); every entry keeps its channel
        out = TensorSpace(x.space, len(out_shape) - 1)
        w.set_space(node.output[0], out)
        return "carrier", None, x, out
    parts = _channel_split(x, in_shape, out_shape) if x.expand == 1 else None
    if parts is not None:
        # the channel axis split into heads (N, T, D) -> (N, T, H, d), or a packed projection into its parts and
        # heads (N, T, 3D) -> (N, T, 3, H, d): nothing moves yet; the heads become blocks where an attention MatMul
        # treats them apart
        out = _split_space(x.space, parts)
        w.set_space(node.output[0], out)
        return "carrier", None, x, out
    return _flatten_like(w, node, in_shape, out_shape)


def _transposed_into_heads(w: _Walk, node) -> bool:
    """Whether the output of `node` (N, T, 1, d) is read only by Transposes to (N, 1, T, d), as attention code
    splits the heads: x.view(N, T, H, d).transpose(1, 2)."""
    readers = w.readers.get(node.output[0], [])
    if len(w.shape(node.output[0])) != 4 or node.output[0] in w.graph_outputs:
        return False
    return bool(readers) and all(r.op_type == "Transpose" and list(w.attr(r, "perm") or []) == [0, 2, 1, 3]
                                 for r in readers)


def _channel_split(x: TensorSpace, in_shape, out_shape) -> list | None:
    """The (axis, size) parts a reshape splits the channel axis into, where it splits it into two or more axes and
    otherwise only adds or removes axes of size 1; None if it does not. Seen at batch 1: nn.MultiheadAttention's
    (T, N, D) -> (T, N*H, d) puts the heads into the batch axis from the inside (index n*H + h)."""
    big_in = [i for i, d in enumerate(in_shape) if d != 1]
    big_out = [i for i, d in enumerate(out_shape) if d != 1]
    if x.axis not in big_in:
        return None
    i = big_in.index(x.axis)
    before = [in_shape[j] for j in big_in[:i]]
    if [out_shape[j] for j in big_out[:i]] != before:
        return None
    after = [in_shape[j] for j in big_in[i + 1:]]
    for k in range(2, len(big_out) - i + 1):
        run = big_out[i:i + k]
        if int(np.prod([out_shape[j] for j in run], dtype=np.int64)) == in_shape[x.axis] \
                and [out_shape[j] for j in big_out[i + k:]] == after:
            return [(j, int(out_shape[j])) for j in run]
    return None


def _split_space(space: int, parts: list) -> TensorSpace:
    """A tensor of `space` whose channels span the (axis, size) `parts`, row-major, the last one the features inside
    a head. Parts of size 1 hold nothing and are dropped, except the last head part where it is the only one (one
    attention head: multi-query attention's keys and values); with one part left it is a plain channel axis."""
    kept = [(ax, n) for ax, n in parts[:-1] if n != 1] + [parts[-1]]
    if len(kept) == 1 and len(parts) > 1:
        kept = [parts[-2], parts[-1]]
    parts = kept
    if len(parts) == 1:
        return TensorSpace(space, parts[0][0])
    return TensorSpace(space, parts[-1][0], 1, tuple(n for _, n in parts), tuple(ax for ax, _ in parts))


def _parts(ts: TensorSpace) -> list:
    """(axis, size) of each part of a tensor split into heads, outermost first."""
    return list(zip(ts.axes, ts.split))


def _reshape_heads(w: _Walk, node, x: TensorSpace, in_shape, out_shape):
    """Reshape of a tensor split into heads: a reshape that only adds or removes axes of size 1 moves the parts
    with their axes (as analysis sees it, at batch 1: dynamo's SDPA decomposition reshapes the keys (N, H, T, d) ->
    (N*H, T, d) and back, the batch merging with the head axis from the outside); a reshape that merges the parts,
    consecutive and in order, back into one axis ends the split: (N, T, H, d) -> (N, T, D)."""
    parts = _parts(x)
    axes = [ax for ax, _ in parts]
    big_in = [i for i, d in enumerate(in_shape) if d != 1]
    big_out = [i for i, d in enumerate(out_shape) if d != 1]
    if [in_shape[i] for i in big_in] == [out_shape[i] for i in big_out] and all(ax in big_in for ax in axes):
        where = dict(zip(big_in, big_out))
        out = _split_space(x.space, [(where[ax], n) for ax, n in parts])
        w.set_space(node.output[0], out)
        return "carrier", None, x, out
    if all(ax in big_in for ax in axes):
        i, k = big_in.index(axes[0]), len(axes)
        dims = [in_shape[j] for j in big_in]
        if big_in[i:i + k] == axes and len(big_out) == len(big_in) - k + 1 \
                and [out_shape[j] for j in big_out] == dims[:i] + [int(np.prod(x.split))] + dims[i + k:]:
            out = TensorSpace(x.space, big_out[i])
            w.set_space(node.output[0], out)
            return "carrier", None, x, out
    raise _Unsupported(f"reshapes {list(in_shape)} to {list(out_shape)} across attention heads")


def _repeated_heads(w: _Walk, x: TensorSpace, in_shape, out_shape) -> TensorSpace | None:
    """A reshape merging a head axis with a neighbouring axis of copies into one axis, everything else in place:
    grouped-query attention's repeat of the key and value heads, (N, kvH, R, T, d) -> (N, kvH·R, T, d) after an
    Expand (each head repeated R times in a row; with the copies' axis first, (N, R, kvH, …), the heads in turn).
    The result is a view reading each channel R times; None for any other reshape."""
    parts = _parts(x)
    axes = [ax for ax, _ in parts]
    for p, (a, n) in enumerate(parts[:-1]):
        for r in (a + 1, a - 1):
            if r < 0 or r >= len(in_shape) or r in axes or in_shape[r] < 2:
                continue
            lo, hi = min(a, r), max(a, r)
            merged = list(in_shape[:lo]) + [in_shape[a] * in_shape[r]] + list(in_shape[hi + 1:])
            if list(out_shape) != merged:
                continue
            repeated = _repeat_heads(w, x, p, int(in_shape[r]), interleaved=r < a)
            return _split_space(repeated.space, [(lo if ax == a else ax - (ax > hi), size)
                                                 for ax, size in _parts(repeated)])
    return None


def _repeated_view(w: _Walk, space: int, split: tuple, p: int, copies: int, interleaved: bool = False) -> int:
    """A view of the channels of `space`, laid out row-major as `split` (heads, features), with part `p` repeated
    `copies` times, each entry `copies` times in a row ([h0, h0, h1, h1]: grouped-query attention's keys and values
    for their query heads) or, `interleaved`, the whole part in turn ([h0, h1, h0, h1]): it reads each channel
    `copies` times."""
    order = np.arange(int(np.prod(split))).reshape(split)
    order = np.concatenate([order] * copies, axis=p) if interleaved else np.repeat(order, copies, axis=p)
    source = w.channels(space)
    return w.new_view([source[c] for c in order.reshape(-1)], repeats=True)


def _repeat_heads(w: _Walk, x: TensorSpace, p: int, copies: int, interleaved: bool = False) -> TensorSpace:
    """`x`, split into heads, with part `p` repeated (`_repeated_view`), on the same axes."""
    view = _repeated_view(w, x.space, x.split, p, copies, interleaved)
    return TensorSpace(view, x.axis, x.expand, tuple(n * copies if i == p else n for i, n in enumerate(x.split)),
                       x.axes)


def _select_part(w: _Walk, x: TensorSpace, axis: int, indices: list, keep_axis: bool) -> TensorSpace:
    """Entries `indices` of `axis`, one of the parts of a tensor split into heads (q, k or v of a packed projection,
    some heads): a view of those channels, in order; `keep_axis` False: the axis is gone (a scalar index)."""
    parts = _parts(x)
    p = [ax for ax, _ in parts].index(axis)
    if p == len(parts) - 1:
        # features inside every head (RoPE's rotate_half): only where a rotary embedding pinned them in place
        if not _is_pinned(w, x.space):
            raise _Unsupported("selects features inside attention heads")
        if not keep_axis:
            raise _Unsupported("selects one feature inside attention heads")
        d = parts[-1][1]
        heads = int(np.prod(x.split[:-1]))
        source = w.channels(x.space)
        channels = [source[h * d + k] for h in range(heads) for k in indices]
        return _split_space(w.new_view(channels), parts[:-1] + [(axis, len(indices))])
    order = np.take(np.arange(int(np.prod(x.split))).reshape(x.split), indices, axis=p).reshape(-1)
    space = x.space
    if len(order) != w.width(x) or np.any(order != np.arange(len(order))):
        source = w.channels(x.space)
        space = w.new_view([source[c] for c in order])
    if keep_axis:
        new = [(ax, len(indices) if i == p else n) for i, (ax, n) in enumerate(parts)]
    else:
        new = [(ax - (ax > axis), n) for i, (ax, n) in enumerate(parts) if i != p]
    return _split_space(space, new)


def _shuffle_follows(w: _Walk, node, a: int) -> bool:
    """Whether the output of `node` (channels split over axes a, a+1) is read by exactly one Transpose that swaps
    those two axes and keeps every other in place, itself read by exactly one Reshape that merges them back: a
    channel shuffle (ShuffleNet). Only then are the channels split: nothing else reads a tensor so split."""
    outputs = w.graph_outputs
    readers = w.readers.get(node.output[0], [])
    if len(readers) != 1 or node.output[0] in outputs or readers[0].op_type != "Transpose":
        return False
    transpose = readers[0]
    rank = len(w.shape(node.output[0]))
    perm = list(w.attr(transpose, "perm") or reversed(range(rank)))
    swapped = list(range(rank))
    swapped[a], swapped[a + 1] = a + 1, a
    if perm != swapped:
        return False
    readers = w.readers.get(transpose.output[0], [])
    if len(readers) != 1 or transpose.output[0] in outputs or readers[0].op_type != "Reshape":
        return False
    before, after = w.shape(node.input[0]), w.shape(readers[0].output[0])
    return before is not None and tuple(before) == tuple(after or ())


def _shuffled(w: _Walk, x: TensorSpace, b: int) -> TensorSpace:
    """A Transpose swapping the two axes that hold the channels (G, K) -> (K, G): a view of the channels in the new
    row-major order, channel k*G + g of the output being channel g*K + k of the input."""
    g, k = x.split
    source = w.channels(x.space)
    order = [gi * k + ki for ki in range(k) for gi in range(g)]
    return TensorSpace(w.new_view([source[c] for c in order]), b, x.expand, (k, g))


def _channel_range(w: _Walk, x: TensorSpace, start: int, stop: int) -> TensorSpace:
    """Entries start..stop-1 of the channel axis: the space itself when that is all of them, else a view (of whole
    channels: a flattened axis is not cut)."""
    if start == 0 and stop == w.width(x) * x.expand:
        return x
    if x.expand != 1:
        raise _Unsupported("slices a flattened channel axis")
    return TensorSpace(w.new_view(w.channels(x.space)[start:stop]), x.axis)


def _slice(w: _Walk, node):
    """Slice: along other axes it carries the space (a crop); along the channel axis with step 1 it keeps a range
    of channels, a view (ShuffleNet's `chunk`: starts and ends are often computed from shapes)."""
    x = w.space_of(node.input[0])
    rank = w.rank(node.input[0])
    if len(node.input) > 1:  # opset >= 10: starts, ends, axes, steps as inputs
        parts = []
        for i in range(1, 5):
            if i < len(node.input) and node.input[i]:
                value = w.value(node.input[i])
                if value is None:
                    raise _Unsupported(f"its input '{node.input[i]}' is computed from the data")
                parts.append([int(v) for v in np.asarray(value).reshape(-1)])
            else:
                parts.append(None)
        starts, ends, axes, steps = parts
    else:
        starts, ends, axes, steps = w.attr(node, "starts"), w.attr(node, "ends"), w.attr(node, "axes"), None
    axes = list(range(len(starts))) if axes is None else [a % rank for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    out = x
    if x.heads:
        shape = w.shape(node.input[0])
        for start, end, axis, step in zip(starts, ends, axes, steps):
            if axis in out.axes:
                size = shape[axis]
                out = _select_part(w, out, axis, list(range(size))[slice(start, end, step)], keep_axis=True)
        w.set_space(node.output[0], out)
        return "carrier", None, x, out
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if axis != x.axis:
            continue
        size = w.width(x) * x.expand
        if step != 1:
            raise _Unsupported(f"slices the channel axis with step {step}")
        lo, hi = (max(0, min(size, v + size if v < 0 else v)) for v in (start, end))
        if hi <= lo:
            raise _Unsupported("slices the channel axis to nothing")
        out = _channel_range(w, x, lo, hi)
    w.set_space(node.output[0], out)
    return "carrier", None, x, out


def _split_sizes(w: _Walk, node, size: int, n: int) -> list:
    """A Split's output sizes along an axis of `size`: the `split` attribute or input (a constant), else n equal
    chunks, the last one smaller (opset 18's num_outputs)."""
    sizes = w.attr(node, "split")
    if sizes is None and len(node.input) > 1 and node.input[1]:
        value = w.value(node.input[1])
        if value is None:
            raise _Unsupported(f"its split sizes '{node.input[1]}' are computed from the data")
        sizes = [int(v) for v in np.asarray(value).reshape(-1)]
    if sizes is None:
        chunk = -(-size // n)
        sizes = [min(chunk, size - k * chunk) for k in range(n)]
    return sizes


def _split(w: _Walk, node):
    """Split: along other axes every output carries the space; along the channel axis each output is a view of its
    range of channels."""
    x = w.space_of(node.input[0])
    rank = w.rank(node.input[0])
    axis = w.attr(node, "axis", 0) % rank
    outputs = [o for o in node.output]
    if x.heads and axis in x.axes:
        size = w.shape(node.input[0])[axis]
        sizes = _split_sizes(w, node, size, len(outputs))
        if sum(sizes) != size or len(sizes) != len(outputs):
            raise _Unsupported(f"splits {size} heads into {list(sizes)}")
        _set_parts(w, outputs, sizes, lambda lo, hi: _select_part(w, x, axis, list(range(lo, hi)), keep_axis=True))
        return "carrier", None, x, None
    if axis != x.axis:
        for o in outputs:
            if o:
                w.set_space(o, x)
        return "carrier", None, x, x
    size = w.width(x) * x.expand
    sizes = _split_sizes(w, node, size, len(outputs))
    if sum(sizes) != size or len(sizes) != len(outputs):
        raise _Unsupported(f"splits {size} channels into {list(sizes)}")
    _set_parts(w, outputs, sizes, lambda lo, hi: _channel_range(w, x, lo, hi))
    return "carrier", None, x, None


def _set_parts(w, outputs: list, sizes: list, part) -> None:
    """Each (present) output of a Split gets `part(start, stop)` of the consecutive ranges `sizes` cut."""
    start = 0
    for o, n in zip(outputs, sizes):
        if o:
            w.set_space(o, part(start, start + n))
        start += n


def _squeeze(w: _Walk, node):
    x = w.space_of(node.input[0])
    in_rank = w.rank(node.input[0])
    out_rank = w.rank(node.output[0])
    if node.op_type == "Squeeze":
        axes = _axes(w, node, in_rank)
        if axes is None:
            shape = w.shape(node.input[0])
            axes = [i for i, d in enumerate(shape) if d == 1]
        if x.axis in axes or any(ax in axes for ax in x.axes):
            raise _Unsupported("squeezes the channel axis")
        out = TensorSpace(x.space, x.axis - sum(a < x.axis for a in axes), x.expand)
        if x.heads:
            out = _split_space(x.space, [(ax - sum(a < ax for a in axes), n) for ax, n in _parts(x)])
    else:
        axes = _axes(w, node, out_rank)

        def moved(axis):
            for a in axes:  # sorted: each inserted axis at or before the channel shifts it right
                if a <= axis:
                    axis += 1
            return axis

        out = TensorSpace(x.space, moved(x.axis), x.expand)
        if x.heads:
            out = _split_space(x.space, [(moved(ax), n) for ax, n in _parts(x)])
    w.set_space(node.output[0], out)
    return "carrier", None, x, out


def _expand(w: _Walk, node):
    """Expand of a feature tensor: numpy broadcasting to the target shape, new axes in front. The axes holding its
    channels must keep their size; its values repeat along the others (grouped-query attention repeats each key
    and value head over a new axis, then a Reshape merges it into the head axis: `_repeated_heads`)."""
    x = w.space_of(node.input[0])
    in_shape, out_shape = w.shape(node.input[0]), w.shape(node.output[0])
    if in_shape is None or out_shape is None or len(out_shape) < len(in_shape):
        raise _Unsupported("the shapes around it are unknown to ONNX shape inference")
    if x.split and not x.heads:
        raise _Unsupported("expands a tensor inside a channel shuffle")
    offset = len(out_shape) - len(in_shape)
    axes = [ax for ax, _ in _parts(x)] if x.heads else [x.axis]
    if any(out_shape[ax + offset] != in_shape[ax] for ax in axes):
        raise _Unsupported(f"broadcasts {list(in_shape)} to {list(out_shape)} along an axis of its channels")
    out = _split_space(x.space, [(ax + offset, n) for ax, n in _parts(x)]) if x.heads else \
        TensorSpace(x.space, x.axis + offset, x.expand)
    w.set_space(node.output[0], out)
    return "carrier", None, x, out


def _transpose(w: _Walk, node):
    x = w.space_of(node.input[0])
    rank = w.rank(node.input[0])
    perm = w.attr(node, "perm") or list(reversed(range(rank)))
    if x.heads:  # the parts move with their axes
        out = _split_space(x.space, [(list(perm).index(ax), n) for ax, n in _parts(x)])
        w.set_space(node.output[0], out)
        return "carrier", None, x, out
    if x.split:  # inside a channel shuffle (_shuffle_follows checked the permutation)
        out = _shuffled(w, x, x.axis)
        w.set_space(node.output[0], out)
        return "carrier", None, x, out
    out = TensorSpace(x.space, list(perm).index(x.axis), x.expand)
    w.set_space(node.output[0], out)
    return "carrier", None, x, out


def _absorb_broadcast_constants(w: _Walk, node) -> None:
    """Inputs that broadcast a constant to the batch (`Expand(constant, shape of the input)`: a ViT's class token,
    before it is concatenated to the patch tokens) next to a learned feature tensor: per-channel constants of that
    tensor's space, merged like biases (on the Expand's constant input), not constants that differ between the
    models. The broadcast's output then holds the learned space."""
    learned = [(i, w.space_of(n)) for i, n in enumerate(node.input) if n and w.space_of(n) is not None
               and w.find(w.space_of(n).space) not in w.identity]
    if len(learned) == 0 or learned[0][1].heads or learned[0][1].expand != 1:
        return
    ref_i, ref = learned[0]
    out_rank = max(w.rank(n) for n in node.input if n)
    axis = ref.axis + out_rank - w.rank(node.input[ref_i])
    for name in node.input:
        # computed from the input (a batch size from the input's shape) or from shapes of features (TorchScript)
        if not name or not (_is_shared(w, name) or name in w.static) or name not in w.producers:
            continue
        index, producer = w.producers[name]
        if producer.op_type != "Expand" or len(w.readers.get(name, [])) != 1 or producer.input[0] not in w.initializers:
            continue
        value = w.initializers[producer.input[0]]
        rank = w.rank(name)
        k = axis - (out_rank - rank)  # the channel axis in the broadcast output
        kc = k - (rank - value.ndim)  # and in the constant
        if k < 0 or kc < 0 or value.shape[kc] != w.width(ref):
            raise _Unsupported(f"broadcasts constant '{producer.input[0]}' of shape {list(value.shape)} that does "
                               "not hold one value per channel")
        w.weights.append(WeightAxis(index, 0, kc, ref.space, "out"))
        w.static.discard(name)
        w.set_space(name, TensorSpace(ref.space, k))


def _gather(w: _Walk, node):
    """Gather by constant indices: along another axis it carries the space (a ViT's class token, x[:, 0]); along
    the channel axis it keeps some channels (a view); along the heads of a tensor split into heads, some heads or
    one of q, k, v (nn.MultiheadAttention's packed projection)."""
    x = w.space_of(node.input[0])
    if x is None or (w.space_of(node.input[1]) is not None and w.value(node.input[1]) is None):
        raise _Unsupported("gathers with indices computed from the data")
    indices = w.value(node.input[1])
    if indices is None:
        raise _Unsupported("its indices are not constant")
    rank = w.rank(node.input[0])
    axis = w.attr(node, "axis", 0) % rank
    size = w.shape(node.input[0])[axis]
    indices = np.asarray(indices, dtype=np.int64)
    indices = np.where(indices < 0, indices + size, indices)
    shift = indices.ndim - 1  # the axes after `axis` move by this much
    if x.heads:
        if axis in x.axes:
            if indices.ndim > 1:
                raise _Unsupported("gathers attention heads with indices of more than one axis")
            out = _select_part(w, x, axis, indices.reshape(-1).tolist(), keep_axis=indices.ndim == 1)
        else:
            out = _split_space(x.space, [(ax + shift if ax > axis else ax, n) for ax, n in _parts(x)])
    elif axis == x.axis:
        if indices.ndim != 1 or x.expand != 1:
            raise _Unsupported("gathers channels with indices that are not one list")
        source = w.channels(x.space)
        out = TensorSpace(w.new_view([source[c] for c in indices.tolist()]), axis)
    else:
        out = TensorSpace(x.space, x.axis + shift if x.axis > axis else x.axis, x.expand)
    w.set_space(node.output[0], out)
    return "carrier", None, x, out


def _concat(w: _Walk, node):
    """Along another axis: the inputs share one space (tied). Along the channel axis: a composite space whose
    merge is block-diagonal over its parts (DenseNet / Inception)."""
    _absorb_broadcast_constants(w, node)
    rank = w.rank(node.output[0])
    axis = w.attr(node, "axis") % rank
    # inputs empty along the axis add nothing (a key/value cache with no past: cat([past, k], dim=-2))
    names = [n for n in node.input if n and not (w.shape(n) is not None and w.shape(n)[axis] == 0)]
    if len(names) == 1 and w.space_of(names[0]) is not None:
        x = w.space_of(names[0])
        w.set_space(node.output[0], x)
        return "carrier", None, x, x
    spaced = [w.space_of(n) for n in node.input]
    if any(ts is None for ts in spaced):
        raise _Unsupported("concatenates features with something else")
    fed = [n for n, ts in zip(node.input, spaced) if n in w.graph_inputs]
    if fed and any(w.find(ts.space) not in w.identity and ts.axis != axis for ts in spaced):
        # a graph input joined to learned features along another axis: a key/value cache (past_key_values), which
        # holds each model's own keys or values
        raise _Unsupported(f"concatenates graph input '{fed[0]}' with learned features (a key/value cache holds "
                           "each model's own features; export the model without a cache to merge it)")
    on_axis = [ts.axis == axis for ts in spaced]
    if any(ts.heads for ts in spaced):
        return _concat_heads(w, node, spaced, axis)
    if not any(on_axis):
        return _elementwise(w, node)
    if not all(on_axis):
        raise _Unsupported("concatenates tensors that hold channels on different axes")
    expand = spaced[0].expand
    if any(ts.expand != expand for ts in spaced):
        raise _Unsupported("concatenates flattened features of different spatial sizes")
    parts, widths = [], []
    for name, ts in zip(node.input, spaced):
        if w.find(ts.space) in w.identity:  # a shared tensor: its width along this axis is the tensor's own
            width = w.shape(name)[axis] if w.shape(name) else None
            if width is None:
                raise _Unsupported(f"the shape of '{name}' is unknown")
            parts.append(w.new_space(width, identity=True))
            widths.append(width)
        else:
            parts.append(ts.space)
            widths.append(w.width(ts))
    identity = all(w.find(p) in w.identity for p in parts)
    sid = w.new_space(sum(widths), identity=identity)
    w.parts[sid] = parts
    out = TensorSpace(sid, axis, expand)
    w.set_space(node.output[0], out)
    return "carrier", None, spaced[0], out


def _concat_heads(w: _Walk, node, spaced: list, axis: int):
    """Concat of tensors split alike into heads, along the features inside the heads, all pinned (RoPE's
    rotate_half: cat(-x2, x1)): a view whose head h holds each input's features of head h in turn."""
    outer = [_parts(ts)[:-1] for ts in spaced]
    if not all(ts.heads and ts.axis == axis for ts in spaced) or any(o != outer[0] for o in outer):
        raise _Unsupported("concatenates tensors split into attention heads other than along the features of "
                           "each head")
    if not all(_is_pinned(w, ts.space) for ts in spaced):
        raise _Unsupported("concatenates features inside attention heads (not pinned by a rotary embedding)")
    heads = int(np.prod([n for _, n in outer[0]]))
    sources = [w.channels(ts.space) for ts in spaced]
    sizes = [ts.split[-1] for ts in spaced]
    channels = [sources[k][h * sizes[k] + f] for h in range(heads) for k in range(len(spaced))
                for f in range(sizes[k])]
    out = _split_space(w.new_view(channels), outer[0] + [(axis, sum(sizes))])
    w.set_space(node.output[0], out)
    return "carrier", None, spaced[0], out


def _layernorm(w: _Walk, node):
    """LayerNormalization: per-channel scale and bias; RMSNormalization (opset 23): per-channel scale. Where the
    channel axis is among the normalised axes the statistics mix channels: exact for permutations, an approximation
    for zipped (averaged) features. Further outputs (mean, inverse std or rms) carry no channels onnxzip follows."""
    x = w.space_of(node.input[0])
    rank = w.rank(node.input[0])
    for i in (1, 2):
        if len(node.input) > i and node.input[i]:
            _channel_param(w, node, i, x, rank)
    w.set_space(node.output[0], x)
    _extra_outputs_opaque(w, node)
    return "carrier", None, x, x


def _groupnorm(w: _Walk, node):
    """GroupNormalization with one group (all channels together) or one group per channel; groups of several
    channels would be broken up by a merge."""
    x = w.space_of(node.input[0])
    groups = w.attr(node, "num_groups")
    width = w.width(x)
    if x.axis != 1 or x.expand != 1:
        raise _Unsupported("normalises an axis that does not hold the channels")
    if groups not in (1, width):
        raise _Unsupported(f"normalises groups of {width // max(groups, 1)} channels together (num_groups={groups})")
    for i in (1, 2):
        _require_const(w, node, i, "scale and bias")
        value = w.const(node.input[i])
        if value.size == width and value.ndim == 1:
            w.add_weight(i, 0, x.space, "out")
        elif value.size != 1:
            raise _Unsupported(f"its {'scale' if i == 1 else 'bias'} has shape {list(value.shape)}")
    w.set_space(node.output[0], x)
    return "carrier", None, x, x


def _pad(w: _Walk, node):
    x = w.space_of(node.input[0])
    rank = w.rank(node.input[0])
    pads = w.attr(node, "pads")
    if pads is None and len(node.input) > 1:
        value = w.value(node.input[1])  # a constant, or computed from shapes (Swin's window padding)
        pads = None if value is None else value.tolist()
    if pads is None:
        raise _Unsupported("its pads are computed")
    if len(node.input) > 3 and node.input[3]:
        raise _Unsupported("pads only some axes")
    if pads[x.axis] or pads[x.axis + rank]:
        raise _Unsupported("pads the channel axis")
    w.set_space(node.output[0], x)
    return "carrier", None, x, x


def _cast(w: _Walk, node):
    if w.attr(node, "to") not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                  onnx.TensorProto.BFLOAT16):
        raise _Unsupported("casts features to a non-float type")
    return _unary(w, node)


def _shape_op(w: _Walk, node):
    for out in node.output:
        w.static.add(out)
    return "static", None, None, None


# Operators that carry attention scores on to the softmax without mixing heads (reshapes for window attention's
# masks, a scale, a mask, a bias); a constant an Add or Sub adds to the scores is a bias, averaged where it differs.
_SCORE_OPS = ("Add", "Sub", "Mul", "Div", "Where", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Cast",
              "Identity", "Neg")


def _follow_scores(w: _Walk, i: int, node) -> None:
    """Attention scores read by `node` (node index `i`, computed once from the shared inputs and the scores): its
    output is scores too, and a constant an Add/Sub adds to them (a learned position bias: Swin's relative one,
    folded by the exporter, of the scores' shape per head) or a Mul/Div scales them by (Swin V2's logit scale per
    head) is merged as the models' average, like a bias, instead of blocking the attention as a constant that
    differs. Heads stay in place (merged head h holds every model's
    head h), so the average is element by element."""
    if node.op_type not in _SCORE_OPS or not any(n in w.scores for n in node.input if n):
        return
    w.scores.update(n for n in node.output if n)
    if node.op_type in ("Add", "Sub", "Mul", "Div"):
        for j, name in enumerate(node.input[:2]):
            if name in w.scores or (node.op_type == "Div" and j == 0):
                continue
            _average_score_constants(w, name, i, j, "a learned bias added to attention scores"
                                     if node.op_type in ("Add", "Sub") else "a learned scale of attention scores")


def _average_score_constants(w: _Walk, name: str, node: int, j: int, why: str) -> None:
    """The float constants input `j` of node `node` (tensor `name`) is selected from (`_selected_constants`), which
    act on the attention scores: merged as the models' average where they differ (`Analysis.averaged`)."""
    sources = _selected_constants(w, name, node, j) or []
    if all(w.initializers[w.model.graph.node[i].input[k]].dtype.kind == "f" for i, k in sources):
        for where in sources:
            w.averaged[where] = why


# Operators that only select, copy or rearrange the values of their data inputs (listed): the average of what they
# compute from several models' constants is what they compute from the constants' average. And element-wise ones
# (Swin V2's 16·sigmoid of its continuous position bias, looked up and reshaped to the scores' shape where the
# exporter leaves the shape to the input's): the merged model computes them from the average, an approximation of
# the average of what they compute, like every averaged constant.
_SELECT_INPUTS = {"Gather": (0,), "Reshape": (0,), "Transpose": (0,), "Unsqueeze": (0,), "Squeeze": (0,),
                  "Identity": (0,), "Slice": (0,), "Expand": (0,), "Tile": (0,), "Flatten": (0,), "Concat": None,
                  "Sigmoid": (0,), "Tanh": (0,), "Neg": (0,), "Cast": (0,), "Mul": None, "Div": None, "Add": None,
                  "Sub": None}


def _selected_constants(w: _Walk, name: str, node: int, j: int, depth: int = 0) -> list | None:
    """The (node, input) places of the constants that input `j` of node `node`, tensor `name`, is selected from
    through `_SELECT_INPUTS` operators (a relative position bias: a table looked up by constant indices, reshaped,
    transposed); None where it is computed otherwise (from the graph input's values: only the data inputs listed are
    followed, and they must end in constants), or where a tensor on the way is read by anything else (its average
    would change that reader too)."""
    if name in w.initializers and name not in w.producers:
        return [(node, j)] if w.initializers[name].size > 1 and len(w.readers.get(name, [])) == 1 else []
    # (shared, not static: reshaped to a shape read from the input, which is the same in every model)
    if depth > 16 or (name not in w.static and not _is_shared(w, name)) or name not in w.producers \
            or len(w.readers.get(name, [])) != 1:
        return None
    i, producer = w.producers[name]
    if producer.op_type not in _SELECT_INPUTS:
        return None
    data = _SELECT_INPUTS[producer.op_type]
    found = []
    for k in range(len(producer.input)) if data is None else data:
        more = _selected_constants(w, producer.input[k], i, k, depth + 1) if producer.input[k] else []
        if more is None:
            return None
        found += more
    return found


def _set_shared(w: _Walk, name: str) -> None:
    shape = w.shape(name) or ()
    axis = 1 if len(shape) >= 2 else 0
    width = shape[axis] if shape else 0
    w.tensor_spaces[name] = TensorSpace(w.new_space(width, identity=True), axis)


def _is_shared(w: _Walk, name: str) -> bool:
    ts = w.tensor_spaces.get(name)
    return ts is not None and w.find(ts.space) in w.identity


def _weighted_output_space(w: _Walk, node, shared_input: bool) -> TensorSpace | None:
    """A weighted layer whose input channels need no transform opens a learned space on its output, with its
    output-channel weights. `shared_input`: it reads a shared tensor (the first layer: both models read the same
    values) and joins the trunk; otherwise it reads an unmergeable region's output and stays per model.
    None where it is no such layer."""
    if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or _is_shared(w, node.input[1]):
        return None
    weight = w.const(node.input[1])
    if weight is None or weight.ndim < 2:
        return None
    group = 1
    if node.op_type == "Conv":
        group = w.attr(node, "group", 1)
        if weight.shape[0] % group:
            return None
        out_axis, axis = 0, 1
    elif node.op_type == "Gemm":
        if shared_input and w.attr(node, "transA", 0):
            return None
        out_axis, axis = (0 if w.attr(node, "transB", 0) else 1), 1
    else:
        shape = w.shape(node.output[0])
        if weight.ndim != 2 or shape is None:
            return None
        out_axis, axis = 1, len(shape) - 1
    bias = w.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if shared_input and len(node.input) > 2 and node.input[2] and bias is None:
        return None
    sid = w.new_space(weight.shape[out_axis])
    if group > 1:  # output group g reads input group g only: merge its output channels inside their group
        w.split_into_blocks(sid, group)
        w.group_links.append((None, sid, group, w.node_index))
    w.add_weight(1, out_axis, sid, "out")
    if bias is not None and bias.size > 1:
        w.add_weight(2, bias.ndim - 1, sid, "out")
    ts = TensorSpace(sid, axis)
    w.set_space(node.output[0], ts)
    return ts


def _embedding_table(w: _Walk, node) -> np.ndarray | None:
    """The table of an embedding lookup: `Gather` along axis 0 of a constant float matrix (entries x channels) by
    indices that depend on no learned feature (token ids from the graph input, positions computed from its shape,
    constants); None where `node` is no such lookup."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    table = w.const(node.input[0])
    if table is None or table.ndim != 2 or table.dtype.kind != "f" or w.attr(node, "axis", 0) % 2 != 0:
        return None
    indices = node.input[1]
    if not (indices in w.static or _is_shared(w, indices)) or w.ranks.get(indices) is None:
        return None
    return table


def _embedding(w: _Walk, node) -> TensorSpace:
    """An embedding lookup opens a learned space on the table's channel axis (axis 1), as a Linear layer does on its
    output: the table is a weight whose channel axis is merged with M (each output is one row of the table, so
    ``M (table[i])ᵀ = (table Mᵀ)[i]`` exactly). The output holds the channels on its last axis. Sums of embeddings
    (word + position + token type) tie their spaces like any residual Add."""
    table = w.const(node.input[0])
    sid = w.new_space(table.shape[1])
    w.add_weight(0, 1, sid, "out")
    ts = TensorSpace(sid, w.ranks[node.input[1]])
    w.set_space(node.output[0], ts)
    return ts


def weight_input(op_type: str) -> int:
    """Which input of a weighted layer holds its weight: a Conv's, Gemm's or MatMul's second, an embedding
    table (Gather) its first."""
    return 0 if op_type == "Gather" else 1


HANDLERS = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Attention": _attention_op,
    "Einsum": _einsum,
    "BatchNormalization": _batchnorm,
    "InstanceNormalization": _instancenorm,
    "Add": _elementwise,
    "Sub": _elementwise,
    "Mul": _elementwise,
    "Div": _elementwise,
    "Max": _elementwise,
    "Min": _elementwise,
    "Sum": _elementwise,
    "Mean": _elementwise,
    "PRelu": _elementwise,
    "Where": None,  # filled below: unsupported on purpose (data-dependent selection)
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _pool,
    "GlobalMaxPool": _pool,
    "LpPool": _pool,
    "GlobalLpPool": _pool,
    "ReduceMean": _reduce,
    "ReduceMax": _reduce,
    "ReduceMin": _reduce,
    "ReduceSum": _reduce,
    "ReduceL1": _reduce,
    "ReduceL2": _reduce,
    "ReduceSumSquare": _reduce,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Squeeze": _squeeze,
    "Unsqueeze": _squeeze,
    "Transpose": _transpose,
    "Expand": _expand,
    "Concat": _concat,
    "Slice": _slice,
    "Split": _split,
    "Gather": _gather,
    "LayerNormalization": _layernorm,
    "RMSNormalization": _layernorm,
    "GroupNormalization": _groupnorm,
    "Pad": _pad,
    "Cast": _cast,
    "Shape": _shape_op,
    "Size": _shape_op,
}
for _op in ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu", "HardSigmoid", "HardSwish",
            "Softplus", "Softsign", "Mish", "Erf", "Identity", "Dropout", "Clip", "Abs", "Neg", "Exp", "Log",
            "Sqrt", "Reciprocal", "Pow", "Sin", "Cos", "ThresholdedRelu", "Floor", "Ceil", "Round", "Sign"):
    HANDLERS[_op] = _unary
del HANDLERS["Where"]

WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
# what may read a tensor split into attention heads (each handler follows the parts)
HEAD_OPS = ("Transpose", "Reshape", "MatMul", "Mul", "Div", "Add", "Sub", "Squeeze", "Unsqueeze", "Slice", "Split",
            "Gather", "Shape", "Size", "Neg", "Concat", "Identity", "Attention", "Expand", "Einsum", "ReduceL1",
            "ReduceL2", "ReduceSumSquare", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")


def analyse(model: onnx.ModelProto, fold_batchnorm: bool = True) -> Analysis:
    """Find the feature spaces, weights, task heads and unmergeable regions of one model (with `fold_batchnorm`,
    of the model with its BatchNorms folded into the layers before them, see `normalise`)."""
    batchnorms = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    batchnorm_params = {}
    model = normalise(model, fold_batchnorm, batchnorm_params)
    w = _Walk(model)
    graph = model.graph
    infos = []
    producer, consumers = {}, {}
    for inp in graph.input:
        if inp.name not in w.initializers:
            _set_shared(w, inp.name)  # both models see the same inputs
    for i, node in enumerate(graph.node):
        w.node_index = i
        for j, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((i, j))
        for j, name in enumerate(node.output):
            producer[name] = (i, j)
        info = NodeInfo(i, node.name, node.op_type, "static")
        inputs = [n for n in node.input if n]
        if any(n in w.opaque for n in inputs):
            info.kind = "opaque"
            if node.op_type in WEIGHTED_OPS and node.input[0] in w.opaque:
                # a weighted layer after an unmergeable region: it is still a layer (the task heads and the
                # spaces after it are found as usual), it just never joins the trunk (it is blocked)
                out = _weighted_output_space(w, node, shared_input=False)
                if out is not None:
                    info.kind, info.data_input, info.out_space = "weighted", node.input[0], out
        elif _embedding_table(w, node) is not None:
            # a lookup in a constant table (word, position, token-type embeddings): a layer reading indices
            info.kind, info.data_input, info.out_space = "weighted", node.input[1], _embedding(w, node)
            info.in_space = w.space_of(node.input[1])  # the shared input's space; None for constant indices
        elif all(n in w.static for n in inputs):
            info.kind = "static"  # computes the same value in both models, whatever the data
            for out in node.output:
                w.static.add(out)
        elif all(n in w.static or _is_shared(w, n) for n in inputs):
            # computed from the shared inputs alone (preprocessing, a Cast, a Transpose to NCHW): the same in both
            # models wherever their constants agree (match() blocks the nodes where they don't), so its channel
            # axis never matters -- until a weighted layer reads it and opens a learned space
            out = _weighted_output_space(w, node, shared_input=True) if node.domain in ("", "ai.onnx") else None
            if out is not None:
                info.kind, info.data_input, info.out_space = "weighted", node.input[0], out
                info.in_space = w.space_of(node.input[0])
            else:
                info.kind = "carrier"
                for name in node.output:
                    if name:
                        _set_shared(w, name)
                _follow_scores(w, i, node)
                _follow_per_head(w, node)
        else:
            handler = HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            saved = (len(w.weights), dict(w.tensor_spaces), dict(w.partitions), dict(w.views))
            try:
                if handler is None:
                    raise _Unsupported(f"operator {node.domain + '.' if node.domain else ''}{node.op_type} "
                                       "is not one onnxzip knows how channels move through")
                for n in inputs:
                    ts = w.space_of(n)
                    if ts is not None and ts.split and not ts.heads and node.op_type not in ("Transpose", "Reshape"):
                        raise _Unsupported("its input holds the channels split over several axes (inside a channel "
                                           "shuffle)")
                    if ts is not None and ts.heads and node.op_type not in HEAD_OPS:
                        raise _Unsupported("its input holds the channels split into attention heads")
                kind, data_input, in_space, out_space = handler(w, node)
                info.kind, info.data_input, info.in_space, info.out_space = kind, data_input, in_space, out_space
            except _Unsupported as exc:
                del w.weights[saved[0]:]
                w.tensor_spaces, w.partitions, w.views = saved[1], saved[2], saved[3]
                info.kind, info.reason = "unsupported", str(exc)
        if info.kind in ("opaque", "unsupported"):
            for out in node.output:
                if out:
                    w.opaque.add(out)
                    w.tensor_spaces.pop(out, None)
        infos.append(info)

    # canonical space ids after all ties
    def canon(ts):
        return None if ts is None else TensorSpace(w.find(ts.space), ts.axis, ts.expand, ts.split, ts.axes)

    tensor_spaces = {k: canon(v) for k, v in w.tensor_spaces.items()}
    weights = [WeightAxis(x.node, x.input, x.axis, w.find(x.space), x.role, x.expand, x.groups) for x in w.weights]
    for info in infos:
        info.in_space, info.out_space = canon(info.in_space), canon(info.out_space)
    partitions = {}  # tied spaces share their blocks
    for sid, labels in w.partitions.items():
        root = w.find(sid)
        partitions[root] = refine_partition(partitions.get(root), labels)
    alike = {}  # root space -> [(positions, positions)]: queries and keys cut from one packed projection
    for cq, ck in w.alike:
        root = w.find(cq[0][0])
        alike.setdefault(root, []).append((tuple(c for _, c in cq), tuple(c for _, c in ck)))
    for root, pairs in alike.items():
        partitions[root] = _alike_blocks(partitions.get(root, np.zeros(w.widths[root], dtype=np.int64)), pairs)
    spaces = {}
    for sid in w.parent:
        root = w.find(sid)
        if root not in spaces:
            labels = partitions.get(root)
            view = w.views.get(root)
            spaces[root] = FeatureSpace(root, w.widths[root], identity=root in w.identity,
                                        parts=[w.find(p) for p in w.parts.get(root, [])],
                                        partition=None if labels is None or len(set(labels.tolist())) == 1
                                        else tuple(int(x) for x in labels),
                                        view=None if view is None else [(w.find(sp), c) for sp, c in view],
                                        alike=alike.get(root, []),
                                        queries_of_keys=root in w.queries_of and view is not None)
    for name, ts in tensor_spaces.items():
        spaces[ts.space].tensors.append(name)
    referenced = {p for v in spaces.values() for p in v.parts} | {sp for v in spaces.values() for sp, _ in v.view or []}
    spaces = {k: v for k, v in spaces.items() if v.tensors or k in referenced}
    for info in infos:
        if info.kind == "weighted":
            spaces[info.out_space.space].producers.append(info.index)
            if info.in_space is not None:
                spaces[info.in_space.space].consumers.append(info.index)
        elif info.kind == "carrier" and info.out_space is not None:
            spaces[info.out_space.space].carriers.append(info.index)

    analysis = Analysis(model, infos, spaces, tensor_spaces, w.static, w.opaque, weights, w.initializers,
                        w.shapes, producer, consumers)
    analysis.ranks = w.ranks
    analysis.averaged = dict(w.averaged)
    analysis.block_families = _block_families(w, spaces)
    analysis.folded_batchnorms = batchnorms - sum(n.op_type == "BatchNormalization" for n in graph.node)
    analysis.batchnorm_params = batchnorm_params
    _find_heads_and_blocked(analysis)
    return analysis


def _block_families(w: _Walk, spaces: dict) -> list:
    """Group the spaces linked by grouped layers (input block g <-> output block g) into `BlockFamily`s, and say
    which may have their blocks matched across positions."""
    parent: dict = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    links = [(None if i is None else w.find(i), w.find(o), g, node) for i, o, g, node in w.group_links]
    for i, o, _, _ in links:
        if i is not None:
            parent[find(i)] = find(o)
        find(o)
    viewed = {sp for v in spaces.values() for sp, _ in v.view or []}
    families: dict = {}
    for i, o, g, node in links:
        fam = families.setdefault(find(o), {"spaces": set(), "groups": set(), "layers": set(), "why": []})
        fam["spaces"].update(x for x in (i, o) if x is not None)
        fam["groups"].add(g)
        fam["layers"].add(node)
        if i is None:
            fam["why"].append(f"grouped layer '{w.graph.node[node].name}' reads the shared input")
    out = []
    for fam in families.values():
        why = fam["why"]
        if len(fam["groups"]) > 1:
            why.append(f"its grouped layers have different group counts ({sorted(fam['groups'])})")
        blocks = max(fam["groups"])
        for sid in sorted(fam["spaces"]):
            space = spaces[sid]
            labels = np.asarray(space.partition if space.partition is not None else np.zeros(space.width), np.int64)
            if sid in viewed:
                why.append(f"a slice, split or shuffle reads space {sid}")
            elif space.alike:
                why.append(f"space {sid} holds queries and keys matched alike")
            elif not np.array_equal(labels, np.arange(space.width) // (space.width // blocks)):
                why.append(f"space {sid} is split into other blocks as well")
        out.append(BlockFamily(tuple(sorted(fam["spaces"])), blocks, tuple(sorted(fam["layers"])), not why,
                               "; ".join(why)))
    return sorted(out, key=lambda f: f.layers)


def descendants(analysis: Analysis, roots) -> set:
    """Node indices downstream of (and including) the given nodes."""
    graph = analysis.model.graph
    out = set()
    stack = list(roots)
    while stack:
        i = stack.pop()
        if i in out:
            continue
        out.add(i)
        for name in graph.node[i].output:
            for j, _ in analysis.consumers.get(name, []):
                stack.append(j)
    return out


def _find_heads_and_blocked(analysis: Analysis) -> None:
    weighted = set(analysis.weighted)
    heads = []
    for i in sorted(weighted):
        if not (descendants(analysis, [i]) - {i}) & weighted:
            heads.append(i)
    analysis.heads = heads
    roots = {n.index: n.reason for n in analysis.nodes if n.kind == "unsupported"}
    analysis.blocked_reasons = roots
    analysis.blocked = descendants(analysis, list(roots) + heads)


def block(analysis: Analysis, nodes: dict) -> None:
    """Mark more nodes (index -> reason) as never in the trunk, with everything downstream of them."""
    for i, reason in nodes.items():
        analysis.blocked_reasons.setdefault(i, reason)
    analysis.blocked |= descendants(analysis, list(nodes))


def unsupported_report(analysis: Analysis) -> list:
    """(node index, reason) of unmergeable nodes that are not merely after a task head."""
    after_heads = descendants(analysis, analysis.heads)
    return [(i, r) for i, r in sorted(analysis.blocked_reasons.items()) if i not in after_heads]


# --------------------------------------------------------------------------------------------------------------
# Two models


@dataclass
class Correspondence:
    """How model B's names map onto model A's, node for node."""

    inputs: dict  # B input name -> A input name
    tensors: dict  # A tensor name -> B tensor name (graph inputs, node outputs, initializers by use)
    averaged: dict = field(default_factory=dict)  # (node, input) -> why: constants of A's Analysis.averaged that differ


def _source(analysis: Analysis, name: str):
    if not name:
        return ("none",)
    if name in analysis.producer:
        return ("node",) + analysis.producer[name]
    inputs = analysis.input_names
    if name in inputs:
        return ("input", inputs.index(name))
    if name in analysis.initializers:
        return ("const",)
    return ("unknown", name)


def match(a: Analysis, b: Analysis, names=("A", "B")) -> Correspondence:
    """Check that two models have the same structure and shapes (task heads aside); map B's names onto A's.

    Constants that differ between the models where they must not (a per-channel constant on the shared input,
    a scalar in the trunk) block those nodes from the trunk rather than failing.
    """
    na, nb = names
    ga, gb = a.model.graph, b.model.graph
    if len(a.input_names) != len(b.input_names):
        raise MismatchError(f"{na} has {len(a.input_names)} inputs, {nb} has {len(b.input_names)}")
    for ia, ib in zip(a.input_names, b.input_names):
        sa, sb = a.shapes.get(ia), b.shapes.get(ib)
        if sa != sb:
            raise MismatchError(f"input '{ia}' of {na} has shape {sa}, input '{ib}' of {nb} has {sb} "
                                "(batch dimension shown as 1)")
    if len(ga.output) != len(gb.output):
        raise MismatchError(f"{na} has {len(ga.output)} outputs, {nb} has {len(gb.output)}")
    if len(ga.node) != len(gb.node):
        first = next((i for i, (x, y) in enumerate(zip(ga.node, gb.node)) if x.op_type != y.op_type),
                     min(len(ga.node), len(gb.node)))
        raise MismatchError(f"{na} has {len(ga.node)} nodes, {nb} has {len(gb.node)}; they first differ at "
                            f"node {first}: {_node_text(ga, first)} vs {_node_text(gb, first)}")
    tensors = {ia: ib for ia, ib in zip(a.input_names, b.input_names)}
    after_heads = descendants(a, a.heads)
    differing, averaged = {}, {}
    for i, (x, y) in enumerate(zip(ga.node, gb.node)):
        where = f"node {i}: {na} '{x.name}' ({x.op_type}), {nb} '{y.name}' ({y.op_type})"
        if (x.op_type, x.domain) != (y.op_type, y.domain):
            raise MismatchError(f"the models differ at {where}")
        ax = {t.name: helper.get_attribute_value(t) for t in x.attribute}
        ay = {t.name: helper.get_attribute_value(t) for t in y.attribute}
        if _attr_key(ax) != _attr_key(ay):
            diff = sorted(k for k in set(ax) | set(ay) if _attr_key({k: ax.get(k)}) != _attr_key({k: ay.get(k)}))
            raise MismatchError(f"the models differ at {where}: attribute(s) {', '.join(diff)} differ")
        if len(x.input) != len(y.input) or len(x.output) != len(y.output):
            raise MismatchError(f"the models differ at {where}: different numbers of inputs or outputs")
        for j, (p, q) in enumerate(zip(x.input, y.input)):
            sp, sq = _source(a, p), _source(b, q)
            if sp != sq:
                raise MismatchError(f"the models differ at {where}: input {j} comes from different places")
            if sp[0] == "const":
                tensors[(i, j)] = q
                vp, vq = a.initializers[p], b.initializers[q]
                weight_axes = a.weight_axes(i, j)
                if vp.shape != vq.shape or vp.dtype != vq.dtype:
                    if i in after_heads or i in a.heads:
                        continue
                    raise MismatchError(f"the models differ at {where}: input {j} ('{p}') has shape "
                                        f"{list(vp.shape)} in {na} and {list(vq.shape)} in {nb}")
                shared_value = not weight_axes or all(a.spaces[wa.space].identity and wa.role == "out"
                                                      for wa in weight_axes)
                if shared_value and not np.array_equal(vp, vq) and i not in after_heads and i not in a.blocked:
                    if (i, j) in a.averaged:
                        averaged[(i, j)] = a.averaged[(i, j)]
                    else:
                        differing[i] = f"constant input '{p}' differs between the models"
        for p, q in zip(x.output, y.output):
            tensors[p] = q
    if differing:
        block(a, differing)
    for oa, ob in zip(ga.output, gb.output):
        tensors.setdefault(oa.name, ob.name)
    return Correspondence({ib: ia for ia, ib in zip(a.input_names, b.input_names)}, tensors, averaged)


def averaged_report(a: Analysis, correspondences: list, trunk: set | None = None) -> list:
    """The constants that differ between model A and the others (their `Correspondence.averaged`) and that a merge
    takes as their average, in `trunk` only where given: [{"node", "input", "why"}] (the card, inspect)."""
    found = {}
    for c in correspondences:
        if c is not None:
            found.update(c.averaged)
    return [{"node": a.nodes[i].name, "input": j, "why": why} for (i, j), why in sorted(found.items())
            if trunk is None or i in trunk]


def _attr_key(attrs: dict):
    out = []
    for k in sorted(attrs):
        v = attrs[k]
        if isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v).tobytes()
        elif isinstance(v, (list, tuple)):
            v = tuple(x if not isinstance(x, bytes) else x.decode(errors="replace") for x in v)
        elif isinstance(v, (onnx.GraphProto, onnx.TypeProto, onnx.SparseTensorProto)):
            v = v.SerializeToString()
        out.append((k, v))
    return tuple(out)


def _node_text(graph, i) -> str:
    if i >= len(graph.node):
        return "(end of graph)"
    return f"'{graph.node[i].name}' ({graph.node[i].op_type})"


# --------------------------------------------------------------------------------------------------------------
# Trunk selection


def trunk_nodes(analysis: Analysis, stop_at=None) -> set:
    """Node indices computed once on merged features.

    stop_at None/'heads'/'all': every node not blocked (the task heads, what follows them and unsupported
    regions are blocked); an integer K: only nodes before the (K+1)-th weighted layer; 'input' or 0: nothing
    but what acts on the shared input.
    """
    weighted = analysis.weighted
    if stop_at in (None, "heads", "all"):
        limit = len(analysis.nodes)
    else:
        k = 0 if stop_at == "input" else int(stop_at)
        limit = weighted[k] if k < len(weighted) else len(analysis.nodes)
    trunk = {i for i in range(limit) if i not in analysis.blocked}
    # a channel shuffle or a tensor split into heads is in the trunk whole or not at all: such tensors hold the
    # channels over several axes, which no unmerge into a branch can follow; and a node whose input is computed
    # outside the trunk is outside it too (RoPE's halves of the queries, once the queries times cos are not)
    graph = analysis.model.graph
    changed = True
    while changed:
        changed = False
        for i in sorted(trunk, reverse=True):
            for name in graph.node[i].output:
                ts = analysis.tensor_spaces.get(name)
                if ts is not None and ts.split and any(j not in trunk for j, _ in analysis.consumers.get(name, [])):
                    trunk.discard(i)
                    changed = True
        for i in sorted(trunk):
            if any(name in analysis.producer and analysis.producer[name][0] not in trunk
                   for name in graph.node[i].input if name):
                trunk.discard(i)
                changed = True
    return trunk


def stop_points(analysis: Analysis) -> list:
    """The values --stop-at accepts, as (value, description) pairs."""
    out = [("input", "nothing zipped: the ensemble of both models")]
    names = [analysis.nodes[i].name for i in analysis.weighted]
    trunk_max = trunk_nodes(analysis)
    for k in range(1, len(names) + 1):
        if analysis.weighted[k - 1] not in trunk_max:
            break
        out.append((str(k), f"zip the first {k} weighted layers (up to '{names[k - 1]}')"))
    out.append(("heads", "everything but the task heads (default)"))
    return out
