"""Graph surgery: rewrite weights through merge/unmerge matrices and emit one model with a shared trunk.

Trunk nodes are emitted once, from model A's graph, with weights
``W* = sum_m M_m(out) . W_m . U_m(in)`` (ZIPIT.md, "Applying the matrices to weights"). Every other node is
emitted once per model under the model's name (``a/...``, ``b/...``) with that model's own weights. Where a branch
node reads a trunk tensor, the unmerge U_m is folded into its weights when it is a weighted layer reading its
data input, and applied by a ``Gather`` along the channel axis otherwise (U is a 0/1 copy matrix).

With a `WeightFile` (models whose weights are mapped, see `onnxzip.onnx_io`), every large weight of the merged
model is written to it and mapped instead of held as protobuf bytes; a weight larger than CHUNK_BYTES (as float64)
is computed a slice at a time straight into the file, and a weight copied unchanged from a mapped source model
names the source's bytes (nothing is copied).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import Analysis, descendants
from .onnx_io import MAPPED_MIN_BYTES, WeightFile, is_mapped, tensor_array
from .solver import Matching, concat_matchings, contract, identity_match, view_matching

TRUNK_PREFIX = "zip"
# A merged weight whose float64 working copy would exceed this is computed a slice at a time (of about this size);
# smaller ones are computed whole.
CHUNK_BYTES = 64 << 20


@dataclass
class ZipPlan:
    """Everything surgery needs: the N analyses (model 0's graph is the reference), how each model's names map onto
    model 0's, the trunk and one matching per space."""

    analyses: list  # Analysis per model; analyses[0] is the reference every other model was matched to
    correspondences: list  # Correspondence per model (None for model 0): its names onto model 0's
    trunk: set
    matchings: dict  # space id -> Matching (zipped, non-identity spaces only)
    names: tuple = ("a", "b")

    @property
    def a(self) -> Analysis:
        return self.analyses[0]

    @property
    def num_models(self) -> int:
        return len(self.analyses)

    def tensor_name(self, tensor_a: str, m: int) -> str:
        """Model m's name of model 0's tensor `tensor_a`."""
        return tensor_a if m == 0 else self.correspondences[m].tensors[tensor_a]

    def tensor_names(self, tensor_a: str) -> list:
        """Every model's name of model 0's tensor `tensor_a`, in model order."""
        return [self.tensor_name(tensor_a, m) for m in range(self.num_models)]

    def matching(self, space: int) -> Matching:
        """The matching of a space: solved ones from `matchings`; the shared input matched to itself; a channel
        Concat block-diagonal over its parts; a view (Slice, Split, shuffle) from the spaces it reads."""
        if space not in self.matchings:
            info = self.a.spaces[space]
            if info.view is not None:
                sources = {sp: self.matching(sp) for sp in {sp for sp, _ in info.view}}
                self.matchings[space] = view_matching(info.view, sources)
            elif info.composite:
                self.matchings[space] = concat_matchings([self.matching(p) for p in info.parts])
            elif info.identity:
                self.matchings[space] = identity_match(info.width, len(self.analyses))
            else:
                raise KeyError(f"feature space {space} was not solved")
        return self.matchings[space]


@dataclass
class Surgery:
    """The merged model and where each piece of the trunk ended up (statistics repair needs it)."""

    model: onnx.ModelProto
    weights: WeightFile | None = None  # where its large weights are written (mapped models), None: in memory
    trunk_tensors: dict = field(default_factory=dict)  # A tensor name -> merged tensor name
    trunk_inputs: dict = field(default_factory=dict)  # (node index, input index) -> merged initializer name
    trunk_nodes: dict = field(default_factory=dict)  # node index -> merged node name
    branch_inputs: dict = field(default_factory=dict)  # (model, node index, input index) -> merged initializer
    branch_nodes: dict = field(default_factory=dict)  # (model, node index) -> merged node name


def zipped_spaces(a: Analysis, trunk: set) -> list:
    """Ids of the spaces to solve: learned (not the shared input), not a channel Concat of others (those follow
    their parts), with a tensor computed in the trunk; in graph order."""
    out = []
    for i in sorted(trunk):
        for name in a.model.graph.node[i].output:
            ts = a.tensor_spaces.get(name)
            if ts is None or ts.space in out:
                continue
            space = a.spaces[ts.space]
            if not space.identity and not space.composite:
                out.append(ts.space)
    return out


def why_nothing_zipped(a: Analysis, trunk: set) -> str | None:
    """None when the trunk zips at least one feature space; otherwise why it zips none, naming the node at fault
    (the merged model is then the ensemble of the models, at N times the cost of one)."""
    if zipped_spaces(a, trunk):
        return None
    if not a.weighted:
        return "the model has no weighted layer (Conv, Gemm, MatMul by a constant)"
    first = a.weighted[0]
    if first in trunk:
        return (f"no feature space is computed in the shared trunk (the first weighted layer, "
                f"{a.describe_node(first)}, writes none that is read there)")
    if first in a.heads and all(i in a.heads for i in a.weighted):
        heads = ", ".join(a.describe_node(i) for i in a.heads)
        return (f"every weighted layer is taken for a task head (a weighted layer with no weighted layer after it): "
                f"{heads}")
    roots = sorted(i for i in a.blocked_reasons if i not in a.heads and first in descendants(a, [i]))
    if roots:
        return (f"the first weighted layer, {a.describe_node(first)}, comes after {a.describe_node(roots[0])}, "
                f"which is left unmerged: {a.blocked_reasons[roots[0]]}")
    return f"the first weighted layer, {a.describe_node(first)}, is not in the shared trunk"


def is_trunk_tensor(a: Analysis, trunk: set, name: str) -> bool:
    if name in a.producer:
        return a.producer[name][0] in trunk
    return name in a.input_names or name in a.initializers


def merge_points(a: Analysis, trunk: set) -> dict:
    """Per zipped space, the trunk tensors where its features are consumed (ZIPIT.md: statistics are taken where
    the features are read by the next weighted layer, or leave the trunk, or leave the graph)."""
    outputs = set(a.output_names)
    points = {}
    for sid in zipped_spaces(a, trunk):
        for name in a.spaces[sid].tensors:
            if not is_trunk_tensor(a, trunk, name) or name in a.input_names:
                continue
            if a.tensor_spaces[name].split:
                continue  # inside a channel shuffle: measured on the tensor before it
            ends = name in outputs
            for j, _ in a.consumers.get(name, []):
                info = a.nodes[j]
                if j not in trunk or (info.kind == "weighted" and info.data_input == name):
                    ends = True
                elif any(_derived(a, out) for out in a.model.graph.node[j].output if out):
                    # read into a channel Concat, a slice or a shuffle: what reads those sees these features as
                    # they are
                    ends = True
            if ends:
                points.setdefault(sid, []).append(name)
        if sid not in points:  # read by nothing that ends it: fall back to every trunk tensor of the space
            points[sid] = [n for n in a.spaces[sid].tensors if is_trunk_tensor(a, trunk, n)
                           and not a.tensor_spaces[n].split]
    return points


def _derived(a: Analysis, name: str) -> bool:
    """Whether tensor `name` holds a Concat, a view or channels split over two axes (not a space of its own)."""
    ts = a.tensor_spaces.get(name)
    return ts is not None and (bool(ts.split) or a.spaces[ts.space].composite)


def transform_axis(value: np.ndarray, axis: int, expand: int, matrix: np.ndarray, groups: int = 1) -> np.ndarray:
    """Contract `axis` of `value` (size F*expand, channel-major) with `matrix` (F' x F) -> size F'*expand.

    `groups` > 1: a grouped Conv's weight, whose output-channel group g (along axis 0, already in merged order) holds
    only the F/groups input channels of one input block on `axis`; `matrix` must map each source block into one
    block of merged channels (`block_map`), and group g's slice is contracted with the part of `matrix` that fills
    merged block g: block g of the matrix's diagonal, or, where a model's groups were matched across positions
    (solver.match_blocks), the block its group came from."""
    if groups > 1:
        f_out, f_in = matrix.shape
        if f_out % groups or f_in % groups:
            raise ValueError(f"a {f_out}x{f_in} matrix does not split into {groups} groups")
        bo, bi = f_out // groups, f_in // groups
        chunks = np.split(np.asarray(value, dtype=np.float64), groups, axis=0)
        source = block_map(matrix, groups)
        return np.concatenate([transform_axis(chunk, axis, expand, matrix[g * bo:(g + 1) * bo,
                                                                          source[g] * bi:(source[g] + 1) * bi])
                               for g, chunk in enumerate(chunks)], axis=0)
    x = np.moveaxis(np.asarray(value, dtype=np.float64), axis, 0)
    rest = x.shape[1:]
    y = contract(matrix, x.reshape(matrix.shape[1], -1))  # a gather and sums: one nonzero per column
    return np.moveaxis(y.reshape((matrix.shape[0] * expand,) + rest), 0, axis)


def block_map(matrix: np.ndarray, groups: int) -> list:
    """For a matrix (F' x F) between spaces split into `groups` contiguous equal blocks: the source block each
    block of rows reads, which must be one block, a different one for every row block (a permutation of the blocks).
    Graph analysis split the spaces into these blocks and linked them: a bug if not."""
    f_out, f_in = matrix.shape
    bo, bi = f_out // groups, f_in // groups
    reads = np.abs(matrix).reshape(groups, bo, groups, bi).sum(axis=(1, 3)) > 0
    source = [int(np.flatnonzero(row)[0]) if row.sum() == 1 else -1 for row in reads]
    if -1 in source or sorted(source) != list(range(groups)):
        raise ValueError(f"the matching of a grouped layer's input does not map its {groups} groups onto "
                         "merged groups one to one")
    return source


def _merge_matrix(plan: ZipPlan, space: int, m: int) -> np.ndarray:
    return plan.matching(space).merge[m]


def _unmerge_matrix(plan: ZipPlan, space: int, m: int) -> np.ndarray:
    return plan.matching(space).unmerge[m]


def _const(plan: ZipPlan, m: int, node: int, j: int) -> np.ndarray:
    analysis = plan.analyses[m]
    return analysis.initializers[analysis.model.graph.node[node].input[j]]


def _transforms(plan: ZipPlan, node: int, j: int, m: int, trunk: bool) -> list:
    """(axis, expand, matrix, groups) applied to model m's constant: M on `out` axes and Uᵀ on `in` axes for a
    trunk node; for a branch node Uᵀ on the `in` axes that read the trunk."""
    out = []
    for wa in plan.a.weight_axes(node, j):
        if wa.role == "out":
            if trunk:
                out.append((wa.axis, wa.expand, _merge_matrix(plan, wa.space, m), 1))
        elif trunk or not plan.a.spaces[wa.space].identity:
            out.append((wa.axis, wa.expand, _unmerge_matrix(plan, wa.space, m).T, wa.groups))
    return out


def _check_groups(plan: ZipPlan, node: int, j: int, m: int, trunk: bool) -> None:
    """A grouped layer's groups of model m are merged whole, in the order of the blocks they read (graph analysis
    and the solver make it so: a bug if not)."""
    axes = plan.a.weight_axes(node, j)
    grouped = [wa for wa in axes if wa.groups > 1]
    if not grouped:
        return
    if trunk:  # each merged group takes a whole group of model m: its outputs and the block its inputs read
        out, = [wa for wa in axes if wa.role == "out"]
        if block_map(_merge_matrix(plan, out.space, m), grouped[0].groups) != \
                block_map(_unmerge_matrix(plan, grouped[0].space, m).T, grouped[0].groups):
            raise ValueError(f"{plan.a.describe_node(node)}: model {m}'s groups are merged in another order "
                             "than the blocks they read")
        return
    for wa in grouped:
        if wa.role == "in" and not plan.a.spaces[wa.space].identity and \
                block_map(_unmerge_matrix(plan, wa.space, m).T, wa.groups) != list(range(wa.groups)):
            # model m's group g reads merged block g only if its blocks were not matched across positions
            raise ValueError(f"{plan.a.describe_node(node)}: a grouped layer after the trunk reads blocks matched in "
                             "another order")


def trunk_weight(plan: ZipPlan, node: int, j: int) -> np.ndarray:
    """Sum over models of M_m(out) . W_m . U_m(in) for one constant input of a trunk node."""
    total = None
    for m in range(len(plan.analyses)):
        value = _const(plan, m, node, j)
        _check_groups(plan, node, j, m, True)
        for axis, expand, matrix, groups in _transforms(plan, node, j, m, True):
            value = transform_axis(value, axis, expand, matrix, groups)
        total = value if total is None else total + value
    return total


def branch_weight(plan: ZipPlan, m: int, node: int, j: int) -> np.ndarray | None:
    """Model m's constant with U_m folded into its input axis where that input comes from the trunk.

    None when nothing changes (the constant is used as it is)."""
    info = plan.a.nodes[node]
    if info.kind != "weighted" or not is_trunk_tensor(plan.a, plan.trunk, info.data_input):
        return None
    transforms = _transforms(plan, node, j, m, False)
    if not transforms:
        return None
    value = _const(plan, m, node, j)
    _check_groups(plan, node, j, m, False)
    for axis, expand, matrix, groups in transforms:
        value = transform_axis(value, axis, expand, matrix, groups)
    return value


def _changes(plan: ZipPlan, m: int, node: int, j: int) -> bool:
    """Whether `branch_weight` changes model m's constant (without computing it)."""
    info = plan.a.nodes[node]
    return (info.kind == "weighted" and is_trunk_tensor(plan.a, plan.trunk, info.data_input)
            and bool(_transforms(plan, node, j, m, False)))


def _transformed_shape(shape: tuple, transforms: list) -> tuple:
    shape = list(shape)
    for axis, expand, matrix, groups in transforms:
        shape[axis] = matrix.shape[0] // groups * expand  # a grouped layer's input axis holds one group
    return tuple(shape)


def _chunk_plan(shape: tuple, per_model: list) -> tuple | None:
    """(axis, unit, bounds): slices of the output along one axis, each about CHUNK_BYTES as float64 (None when the
    whole fits, or no axis can be cut). The axis is the longest that each model transforms at most once; a
    transformed axis is cut in whole channels (`unit` = its expand). With a grouped layer's weight only an axis no
    matrix touches, other than the groups' axis 0, is cut."""
    total = int(np.prod(shape, dtype=np.int64)) * 8
    if total <= CHUNK_BYTES:
        return None
    grouped = any(t[3] > 1 for ts in per_model for t in ts)
    best = None
    for axis, size in enumerate(shape):
        counts = [sum(1 for t in ts if t[0] == axis) for ts in per_model]
        if max(counts) > 1 or (grouped and (axis == 0 or max(counts))):
            continue
        unit = next((t[1] for ts in per_model for t in ts if t[0] == axis), 1)
        if best is None or size // unit > shape[best[0]] // best[1]:
            best = (axis, unit)
    if best is None:
        return None
    axis, unit = best
    units = shape[axis] // unit
    pieces = min(units, -(-total // CHUNK_BYTES))
    edges = np.linspace(0, units, pieces + 1).round().astype(int)
    return axis, unit, [(int(lo) * unit, int(hi) * unit) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def _fill_chunked(out: np.ndarray, values: list, per_model: list, chunks: tuple) -> None:
    """out = Σ_m (transforms of model m applied to values[m]), a slice along the chunk axis at a time. A slice of
    a transformed axis is that matrix's rows, applied first (matrices on different axes commute), so that no
    intermediate is larger than the slice."""
    axis, unit, bounds = chunks
    for lo, hi in bounds:
        total = None
        for value, transforms in zip(values, per_model):
            on_axis = [t for t in transforms if t[0] == axis]
            part = value if on_axis else value[(slice(None),) * axis + (slice(lo, hi),)]
            for t_axis, expand, matrix, groups in on_axis + [t for t in transforms if t[0] != axis]:
                if t_axis == axis:
                    matrix = matrix[lo // unit:hi // unit]
                part = transform_axis(part, t_axis, expand, matrix, groups)
            total = part if total is None else total + part
        out[(slice(None),) * axis + (slice(lo, hi),)] = total


def unmerge_indices(matching: Matching, m: int, expand: int) -> np.ndarray:
    """Gather indices that restore model m's features (each a copy of its cluster) from merged features."""
    clusters = np.asarray(matching.unmerge_index(m), dtype=np.int64)
    if expand == 1:
        return clusters
    return (clusters[:, None] * expand + np.arange(expand)[None, :]).reshape(-1)


class _Emitter:
    def __init__(self, plan: ZipPlan, weights: WeightFile | None = None, shapes_only: bool = False):
        self.plan = plan
        self.weights = weights
        self.shapes_only = shapes_only
        self.nodes = []
        self.initializers = {}
        self.unmerged = {}  # (A tensor, model) -> merged-graph name
        self.surgery = None
        self.sources = [{t.name: t for t in analysis.model.graph.initializer} for analysis in plan.analyses]

    def _name(self, name: str, array=None) -> str | None:
        """`name`, or a free variant of it; None when `name` already holds `array`."""
        if name in self.initializers:
            if array is not None and np.array_equal(tensor_array(self.initializers[name]), array):
                return None
            k = 1
            while f"{name}#{k}" in self.initializers:
                k += 1
            name = f"{name}#{k}"
        return name

    def _mapped(self, array: np.ndarray) -> bool:
        return self.weights is not None and array.dtype.kind == "f" and array.nbytes >= MAPPED_MIN_BYTES

    def init(self, name: str, value: np.ndarray, like: np.ndarray, source: onnx.TensorProto | None = None) -> str:
        """An initializer holding `value` in `like`'s dtype. `source`: the source model's tensor that `value` is,
        unchanged (a mapped one is named, not copied)."""
        if source is not None and is_mapped(source) and np.asarray(value).dtype == like.dtype:
            free = self._name(name, value)
            if free is None:
                return name
            stub = onnx.TensorProto()
            stub.CopyFrom(source)
            stub.name = free
            self.initializers[free] = stub
            return free
        array = np.asarray(value).astype(like.dtype)
        free = self._name(name, array)
        if free is None:
            return name
        self.initializers[free] = (self.weights.add(free, array) if self._mapped(array)
                                   else numpy_helper.from_array(array, free))
        return free

    def computed(self, name: str, node: int, j: int, like: np.ndarray, models: list, trunk: bool) -> str:
        """The initializer Σ over `models` of their transformed constants (a trunk weight: every model; a branch
        weight with U folded in: one), computed a slice at a time into the weight file when it is large."""
        plan = self.plan
        per_model = [_transforms(plan, node, j, m, trunk) for m in models]
        shape = _transformed_shape(like.shape, per_model[0])
        if self.shapes_only:  # type and shape, no data: all that counting parameters and MACs reads
            free = self._name(name)
            self.initializers[free] = onnx.TensorProto(
                name=free, data_type=helper.np_dtype_to_tensor_dtype(like.dtype), dims=shape)
            return free
        chunks = _chunk_plan(shape, per_model)
        if chunks is None:
            value = trunk_weight(plan, node, j) if trunk else branch_weight(plan, models[0], node, j)
            return self.init(name, value, like)
        for m in models:
            _check_groups(plan, node, j, m, trunk)
        free = self._name(name)
        if self.weights is not None:
            stub, out = self.weights.allocate(free, shape, like.dtype)
            _fill_chunked(out, [_const(plan, m, node, j) for m in models], per_model, chunks)
            out.flush()
            del out
            self.initializers[free] = stub
        else:
            out = np.empty(shape, like.dtype)
            _fill_chunked(out, [_const(plan, m, node, j) for m in models], per_model, chunks)
            self.initializers[free] = numpy_helper.from_array(out, free)
        return free

    def unmerge(self, tensor_a: str, m: int) -> str:
        """A trunk tensor seen in model m's own feature basis."""
        plan = self.plan
        merged = self.surgery.trunk_tensors[tensor_a]
        ts = plan.a.tensor_spaces.get(tensor_a)
        if ts is None or plan.a.spaces[ts.space].identity:
            return merged
        key = (tensor_a, m)
        if key not in self.unmerged:
            prefix = plan.names[m]
            name = f"{prefix}/unmerge/{tensor_a}"
            idx = self.init(f"{prefix}/unmerge/{tensor_a}/indices",
                            unmerge_indices(plan.matching(ts.space), m, ts.expand), np.zeros(0, np.int64))
            self.nodes.append(helper.make_node("Gather", [merged, idx], [name], name=name, axis=ts.axis))
            self.unmerged[key] = name
        return self.unmerged[key]


def build(plan: ZipPlan, weights: WeightFile | None = None, shapes_only: bool = False) -> Surgery:
    """Emit the merged model: shared inputs, trunk, one branch per model, outputs named <name>/<output>. With
    `weights`, its large weights are written there and mapped (see the module's docstring). `shapes_only`: the
    weights that surgery computes get their type and shape but no values (a graph to count, not to run)."""
    a = plan.a
    em = _Emitter(plan, weights, shapes_only)
    surgery = Surgery(model=None, weights=weights)
    em.surgery = surgery
    for name in a.input_names:
        surgery.trunk_tensors[name] = name
    to_a = [None] + [{v: k for k, v in c.tensors.items() if isinstance(k, str)} for c in plan.correspondences[1:]]

    for i, info in enumerate(a.nodes):
        if i in plan.trunk:
            node = a.model.graph.node[i]
            inputs = []
            for j, name in enumerate(node.input):
                if not name:
                    inputs.append("")
                elif name in a.initializers and name not in a.producer:
                    if a.weight_axes(i, j):
                        merged = em.computed(f"{TRUNK_PREFIX}/{node.name}/{j}", i, j, a.initializers[name],
                                             list(range(plan.num_models)), trunk=True)
                    elif (i, j) in a.averaged:  # the models' average (the same value where they agree)
                        mean = np.mean([_const(plan, m, i, j).astype(np.float64) for m in range(plan.num_models)],
                                       axis=0)
                        merged = em.init(f"{TRUNK_PREFIX}/{name}", mean, a.initializers[name])
                    else:
                        merged = em.init(f"{TRUNK_PREFIX}/{name}", a.initializers[name], a.initializers[name],
                                         em.sources[0].get(name))
                    surgery.trunk_inputs[(i, j)] = merged
                    inputs.append(merged)
                else:
                    inputs.append(surgery.trunk_tensors[name])
            outputs = []
            for name in node.output:
                if name:
                    surgery.trunk_tensors[name] = f"{TRUNK_PREFIX}/{name}"
                outputs.append(surgery.trunk_tensors.get(name, ""))
            new = helper.make_node(node.op_type, inputs, outputs, name=f"{TRUNK_PREFIX}/{node.name}",
                                   domain=node.domain)
            new.attribute.extend(node.attribute)
            em.nodes.append(new)
            surgery.trunk_nodes[i] = new.name
            continue
        for m, analysis in enumerate(plan.analyses):
            prefix = plan.names[m]
            node = analysis.model.graph.node[i]
            inputs = []
            for j, name in enumerate(node.input):
                if not name:
                    inputs.append("")
                    continue
                if name in analysis.initializers and name not in analysis.producer:
                    value, source = analysis.initializers[name], em.sources[m].get(name)
                    if _changes(plan, m, i, j):  # a weight of this node alone: repair may rescale it in place
                        merged = em.computed(f"{prefix}/{node.name}/{j}", i, j, value, [m], trunk=False)
                    elif not a.weight_axes(i, j):
                        merged = em.init(f"{prefix}/{name}", value, value, source)
                    else:  # a weight of this node alone: statistics repair may rescale it in place
                        merged = em.init(f"{prefix}/{node.name}/{j}", value, value, source)
                    surgery.branch_inputs[(m, i, j)] = merged
                    inputs.append(merged)
                    continue
                tensor_a = name if m == 0 else to_a[m].get(name, name)
                if is_trunk_tensor(a, plan.trunk, tensor_a):
                    if info.kind == "weighted" and tensor_a == info.data_input:
                        inputs.append(surgery.trunk_tensors[tensor_a])  # U_m is folded into the weights
                    else:
                        inputs.append(em.unmerge(tensor_a, m))
                else:
                    inputs.append(f"{prefix}/{name}")
            outputs = [f"{prefix}/{name}" if name else "" for name in node.output]
            new = helper.make_node(node.op_type, inputs, outputs, name=f"{prefix}/{node.name}", domain=node.domain)
            new.attribute.extend(node.attribute)
            em.nodes.append(new)
            surgery.branch_nodes[(m, i)] = new.name

    outputs = []
    for m, analysis in enumerate(plan.analyses):
        prefix = plan.names[m]
        for k, out in enumerate(analysis.model.graph.output):
            tensor_a = a.model.graph.output[k].name
            name = f"{prefix}/{out.name}"
            if is_trunk_tensor(a, plan.trunk, tensor_a):
                source = em.unmerge(tensor_a, m)
                em.nodes.append(helper.make_node("Identity", [source], [name], name=f"{name}/output"))
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(out)
            vi.name = name
            outputs.append(vi)

    graph = helper.make_graph(em.nodes, "onnxzip_merged",
                              [i for i in a.model.graph.input if i.name not in a.initializers],
                              outputs, list(em.initializers.values()))
    opsets = {}
    for analysis in plan.analyses:
        for op in analysis.model.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                              producer_name="onnxzip")
    model.ir_version = ir_version_for(model, a.model.ir_version)
    surgery.model = model
    return surgery


def ir_version_for(model: onnx.ModelProto, source_ir: int) -> int:
    """IR 10 at most (the current onnxruntime-gpu rejects newer), but never below what the opsets need."""
    try:
        needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except TypeError:  # older onnx without ignore_unknown
        needed = helper.find_min_ir_version_for(list(model.opset_import))
    return max(needed, min(source_ir or 10, 10))
