"""Evaluation of a (merged) model: per-task accuracy, joint accuracy, parameters, MACs and latency.

The accuracies follow the paper (ZIPIT.md, "Evaluation used by the paper"):

- **Per-task accuracy** of task t: head t on the images whose label is one of t's classes, argmax over head t's
  own outputs.
- **Joint accuracy**: every image of every task, classified over the union of the classes of the heads the
  model has, by the argmax over those heads' outputs placed side by side. A model with only task a's head still
  gets one (it can only ever answer a's classes): the paper's "Model A" row.

- **Task routing accuracy** (two or more heads): the share of those images whose joint argmax lies in their own
  task's head, whatever class it picks. Joint accuracy is at most this; it tells apart a merge whose heads each
  stay accurate but whose logits stopped being comparable from one whose heads lost accuracy.

Heads' outputs are compared as they are (logits, or probabilities if the model ends in a softmax): they are *not*
softmax-normalised per head before the joint argmax, as in the paper.

`tasks[t]` lists the global class ids in head order: output k of task t's head means class `tasks[t][k]`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .errors import CalibrationDataError, ModelError, UsageError
from .onnx_io import FLOAT_TYPES, without_weights

log = logging.getLogger(__name__)


@dataclass
class EvalReport:
    """What `evaluate` measured. Accuracies are fractions in [0, 1]; `latency_ms` is None when not measured."""

    per_task_accuracy: dict  # task -> accuracy of its head on its own images (tasks with a head only)
    joint_accuracy: float  # over the images of all tasks, argmax over all heads side by side
    num_images: dict  # task -> number of evaluation images of that task (every task of `tasks`)
    params: int
    macs: int  # multiply-accumulates per image
    latency_ms: float | None  # median milliseconds per image
    heads: dict = field(default_factory=dict)  # task -> graph output used as its head
    # over the images of all tasks: the share whose joint argmax falls in their own task's head (the joint accuracy
    # is at most this: it measures how comparable the heads' logits are, apart from each head's own accuracy);
    # None with a single head
    task_routing_accuracy: float | None = None
    runtime: str = "onnxruntime"
    # images per second at batch sizes 1, 8, 64 (`measure_throughput`); None when not measured
    throughput: dict | None = None

    @property
    def num_joint_images(self) -> int:
        return int(sum(self.num_images.values()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_joint_images"] = self.num_joint_images
        return d


# --------------------------------------------------------------------------------------------------------------
# Cost: parameters and MACs
# --------------------------------------------------------------------------------------------------------------


def count_parameters(model: onnx.ModelProto) -> int:
    """Number of floating-point elements in the main graph's initializers and Constant nodes.

    Integer tensors (shapes, axes, Gather indices) are not parameters and are not counted.
    """
    total = 0
    for init in model.graph.initializer:
        if init.data_type in FLOAT_TYPES:
            total += int(np.prod(init.dims, dtype=np.int64))
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type in FLOAT_TYPES:
                total += int(np.prod(attr.t.dims, dtype=np.int64))
            elif attr.name == "value_float":
                total += 1
            elif attr.name == "value_floats":
                total += len(attr.floats)
    return total


def _attention_macs(node, known) -> int | None:
    """Q·Kᵀ and P·V of ONNX's Attention op (inputs (N, H, T, d), or (N, T, H·d) with `q_num_heads` and
    `kv_num_heads`; a past key/value cache lengthens the keys); None where a shape is unknown."""
    q, k, v = (known(name) for name in node.input[:3])
    past = known(node.input[4]) if len(node.input) > 4 and node.input[4] else [0, 0, 0, 0]
    if q is None or k is None or v is None or past is None or len(q) not in (3, 4):
        return None
    if len(q) == 4:
        heads, tokens, d, keys, dv = q[1], q[2], q[3], k[2] + past[2], v[3]
    else:
        attrs = {a.name: a.i for a in node.attribute}
        heads, kv_heads = attrs.get("q_num_heads", 0), attrs.get("kv_num_heads", 0)
        if heads < 1 or kv_heads < 1:
            return None
        tokens, d, keys, dv = q[1], q[2] // heads, k[1] + past[2], v[2] // kv_heads
    return int(q[0]) * int(heads) * int(tokens) * int(keys) * int(d + dv)


def _einsum_macs(node, known) -> int | None:
    """An Einsum of two operands: one multiply-accumulate per combination of its letters' values (the product of
    every letter's size); None where a shape is unknown or the equation has an ellipsis or another operand count."""
    equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "").replace(" ", "")
    operands = equation.split("->")[0].split(",")
    shapes = [known(name) for name in node.input]
    if len(operands) != 2 or "." in equation or any(s is None for s in shapes):
        return None
    sizes = {}
    for letters, shape in zip(operands, shapes):
        if len(letters) != len(shape):
            return None
        for letter, size in zip(letters, shape):
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    return int(np.prod(list(sizes.values()), dtype=np.int64))


def count_macs(model: onnx.ModelProto, input_shapes: dict | None = None) -> int:
    """Multiply-accumulates of one forward pass for ONE input sample, from ONNX shape inference.

    Counted: Conv (output elements × Cin/group × kernel area), ConvTranspose (input elements × Cout/group ×
    kernel area), Gemm and MatMul (M·K·N, batched MatMul included), the fused Attention op (its Q·Kᵀ and P·V:
    query heads × query tokens × key tokens × (query head size + value head size)), an Einsum of two operands (the
    product of its letters' sizes). Every other operator (activations, pooling,
    Add, BatchNorm, Gather, ...) counts 0: they are cheap next to these and have no agreed MAC count.
    Operators inside subgraphs (If, Loop) are not counted.

    The batch dimension (axis 0) of every graph input is set to 1 where it is symbolic. `input_shapes` maps an
    input name to a full shape and overrides this (needed when other axes are symbolic). If an input's batch
    dimension is fixed at B > 1, the total is divided by B. Where ONNX's shape inference stops (TorchScript computes
    attention's Reshape targets from `Shape` through `Div`, which its data propagation does not evaluate), the small
    computations on shapes and constants are evaluated as graph analysis does (`graph.infer_shapes_folding`), so the
    attention MatMuls of exported and merged transformers are counted. Nodes whose shapes still cannot be inferred
    are skipped with a warning.
    """
    m, _ = without_weights(model)  # shapes only: models of any size
    input_shapes = dict(input_shapes or {})
    initializers = {init.name for init in m.graph.initializer}
    batch = 1
    for value in m.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if value.name in input_shapes:
            shape = list(input_shapes.pop(value.name))
            del dims[:]
            for d in shape:
                dims.add().dim_value = int(d)
        elif len(dims):
            if dims[0].HasField("dim_value") and dims[0].dim_value > 1:
                batch = max(batch, dims[0].dim_value)
            else:
                dims[0].Clear()
                dims[0].dim_value = 1
    if input_shapes:
        raise UsageError(f"input_shapes names {sorted(input_shapes)}, which are not inputs of the model")
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception as e:
        raise ModelError(f"ONNX shape inference failed, cannot count MACs: {e}") from e
    from .graph import infer_shapes_folding, known_shapes

    layers = [node for node in m.graph.node if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
              or node.op_type in ("Attention", "Einsum") and node.domain in ("", "ai.onnx")]
    shapes = known_shapes(inferred)
    if any(name not in shapes for node in layers for name in (*node.input[:3], node.output[0]) if name):
        try:
            shapes = known_shapes(infer_shapes_folding(inferred)[0])
        except ModelError as e:
            log.warning("count_macs: evaluating the shape computations failed (%s); counting what is known", e)

    def known(name):
        s = shapes.get(name)
        return list(s) if s is not None else None

    total = 0
    for node in layers:
        if node.op_type in ("Attention", "Einsum"):
            macs = (_attention_macs if node.op_type == "Attention" else _einsum_macs)(node, known)
            if macs is None:
                log.warning("count_macs: shapes around %s node %r are unknown; its MACs are not counted",
                            node.op_type, node.name)
            total += macs or 0
            continue
        x = known(node.input[0])
        w = known(node.input[1])
        y = known(node.output[0])
        if x is None or w is None or y is None:
            log.warning("count_macs: shapes around %s node %r are unknown; its MACs are not counted",
                        node.op_type, node.name)
            continue
        if node.op_type == "Conv":
            # weight (Cout, Cin/group, k...): each output element takes Cin/group × kernel-area products
            total += int(np.prod(y, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
        elif node.op_type == "ConvTranspose":
            # weight (Cin, Cout/group, k...): each input element scatters into Cout/group × kernel-area outputs
            total += int(np.prod(x, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            k = x[0] if trans_a else x[1]
            total += int(np.prod(y, dtype=np.int64)) * int(k)  # M·N outputs, K products each
        else:  # MatMul, numpy semantics: (..., M, K) @ (..., K, N)
            total += int(np.prod(y, dtype=np.int64)) * int(x[-1])
    return total // batch


# --------------------------------------------------------------------------------------------------------------
# Running models
# --------------------------------------------------------------------------------------------------------------


def _make_session(model: onnx.ModelProto, device: str, optimization: str, runtime: str = "onnxruntime",
                  spin: bool = True):
    """A session with `run(output_names, feed)` (see `onnxzip.runtime.make_runner`)."""
    from .runtime import make_runner

    return make_runner(model, runtime, device, optimization, spin)


def _single_input(model: onnx.ModelProto):
    """(name, shape with None for symbolic dims, numpy dtype) of the model's only real input."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if len(inputs) != 1:
        raise UsageError(f"evaluation needs a model with exactly one input; this one has {len(inputs)}: "
                         f"{[v.name for v in inputs]}")
    t = inputs[0].type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else None
    return inputs[0].name, shape, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))


def measure_latency(model: onnx.ModelProto, batch_size: int = 1, repeats: int = 50, warmup: int = 5,
                    device: str = "cpu", input_shape: tuple | None = None, runtime: str = "onnxruntime") -> float:
    """Median milliseconds per image of `repeats` timed runs on random input (after `warmup` untimed runs).

    Runs in onnxruntime on `device` ('cpu' by default) with full graph optimisation (operator fusion, as a
    deployed model would run). `input_shape` gives the per-sample shape (without batch) when the model's input
    has symbolic dimensions beyond the batch.
    """
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise UsageError("measure_latency: batch_size and repeats must be ≥ 1 and warmup ≥ 0")
    name, shape, dtype = _single_input(model)
    if input_shape is not None:
        sample = list(input_shape)
    else:
        if shape is None or any(d is None for d in shape[1:]):
            raise UsageError(f"input {name!r} has shape {shape} with unknown dimensions; give input_shape")
        sample = shape[1:]
    if shape and shape[0] is not None and shape[0] != batch_size:
        batch_size = shape[0]  # the model was exported with a fixed batch
    rng = np.random.default_rng(0)
    x = rng.standard_normal([batch_size, *sample]).astype(dtype)
    session = _make_session(model, device, "all", runtime)
    feed = {name: x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000.0 / batch_size


THROUGHPUT_BATCH_SIZES = (1, 8, 64)


def measure_throughput(models, batch_sizes=THROUGHPUT_BATCH_SIZES, device: str = "cpu", runtime: str = "onnxruntime",
                       input_shape: tuple | None = None, seconds: float = 1.0, min_repeats: int = 3,
                       max_repeats: int = 200) -> dict:
    """Images per second at each batch size: {batch size: images/s}.

    `models` is one model or a list of models that all read the same input; a list is run one after the other on
    each batch, as a server holding the original models side by side would (the time of one step is the sum).
    Each batch size is timed for about `seconds` (at least `min_repeats`, at most `max_repeats` runs, after one
    untimed warm-up run), on random input, with full graph optimisation; the figure is the batch size over the median
    step time. onnxruntime's worker threads do not spin between runs (`make_session(spin=False)`). A model whose
    batch is fixed is refused (`UsageError`): only a dynamic batch axis can be timed at
    several batch sizes.
    """
    models = [models] if isinstance(models, onnx.ModelProto) else list(models)
    if not models:
        raise UsageError("measure_throughput: no model given")
    if seconds <= 0 or min_repeats < 1 or max_repeats < min_repeats:
        raise UsageError("measure_throughput: seconds must be > 0 and 1 <= min_repeats <= max_repeats")
    feeds, sessions = [], []
    for model in models:
        name, shape, dtype = _single_input(model)
        if shape and shape[0] is not None:
            raise UsageError(f"input {name!r} has a fixed batch size of {shape[0]}; throughput at batch sizes "
                             f"{', '.join(map(str, batch_sizes))} needs a dynamic batch axis (use --no-throughput)")
        if input_shape is not None:
            sample = list(input_shape)
        elif shape is None or any(d is None for d in shape[1:]):
            raise UsageError(f"input {name!r} has shape {shape} with unknown dimensions; give input_shape")
        else:
            sample = shape[1:]
        feeds.append((name, sample, dtype))
        # no thread spinning: with two sessions taking turns, one's spinning threads would slow the other (by 10x
        # at batch 1 on 2 cores); off for a single model too, so the figures compare
        sessions.append(_make_session(model, device, "all", runtime, False))
    rng = np.random.default_rng(0)
    result = {}
    for batch in batch_sizes:
        if int(batch) < 1:
            raise UsageError(f"measure_throughput: batch sizes must be >= 1, got {batch}")
        inputs = [{name: rng.standard_normal([int(batch), *sample]).astype(dtype)} for name, sample, dtype in feeds]

        def step():
            for session, feed in zip(sessions, inputs):
                session.run(None, feed)

        step()  # warm-up: first-run allocations
        times = []
        deadline = time.perf_counter() + seconds
        while len(times) < min_repeats or (len(times) < max_repeats and time.perf_counter() < deadline):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        result[int(batch)] = float(int(batch) / np.median(times))
    return result


# --------------------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------------------


def resolve_heads(model: onnx.ModelProto, tasks: dict, heads: dict | None = None) -> dict:
    """Task -> graph output name of its head.

    Given `heads`, check it. Otherwise, for each task, the first output named `<task>/...` (a merged model's
    `a/logits`, `b/logits`); tasks without such an output have no head. Raises `UsageError` if no task has one.
    """
    outputs = [o.name for o in model.graph.output]
    if heads is not None:
        for task, out in heads.items():
            if task not in tasks:
                raise UsageError(f"head given for task {task!r}, which is not a task of the card "
                                 f"(tasks: {', '.join(tasks)})")
            if out not in outputs:
                raise UsageError(f"head {task}={out}: the model has no output {out!r} (outputs: {', '.join(outputs)})")
        if not heads:
            raise UsageError("no heads given")
        return dict(heads)
    found = {}
    for task in tasks:
        match = next((o for o in outputs if o.startswith(f"{task}/")), None)
        if match is not None:
            found[task] = match
    if not found:
        raise UsageError(f"no model output is named after a task (<task>/..., tasks: {', '.join(tasks)}; "
                         f"outputs: {', '.join(outputs)}); say which output is which task's head "
                         "(--head TASK=OUTPUT, or --task TASK for a single-head model)")
    return found


def _check_tasks(tasks: dict) -> None:
    if not tasks:
        raise UsageError("no tasks given")
    owner = {}
    for task, classes in tasks.items():
        if len(classes) == 0:
            raise UsageError(f"task {task!r} has no classes")
        for c in classes:
            if c in owner:
                raise UsageError(f"class {c} belongs to both task {owner[c]!r} and task {task!r}; "
                                 "tasks must be disjoint")
            owner[c] = task


def _run_outputs(model, x, names, batch_size, device, runtime="onnxruntime"):
    """Run `model` on `x` in batches and return {output name: (N, K) array}."""
    input_name, shape, dtype = _single_input(model)
    if shape is not None:
        if len(shape) != x.ndim or any(d is not None and d != s for d, s in zip(shape[1:], x.shape[1:])):
            raise CalibrationDataError(
                f"evaluation images have shape {tuple(x.shape[1:])} per image; model input {input_name!r} expects "
                f"{tuple('?' if d is None else d for d in shape[1:])}")
    fixed = shape[0] if shape and shape[0] is not None and shape[0] > 0 else None
    step = fixed or batch_size
    session = _make_session(model, device, "basic", runtime)
    chunks = {n: [] for n in names}
    for start in range(0, len(x), step):
        batch = np.ascontiguousarray(x[start:start + step], dtype=dtype)
        n = len(batch)
        if fixed and n < fixed:  # a model exported with a fixed batch: pad the last batch, drop the padding after
            batch = np.concatenate([batch, np.zeros((fixed - n, *batch.shape[1:]), dtype)])
        for name, out in zip(names, session.run(names, {input_name: batch})):
            chunks[name].append(np.asarray(out)[:n].reshape(n, -1))
    return {n: np.concatenate(c) if c else np.zeros((0, 0)) for n, c in chunks.items()}


def evaluate(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, tasks: dict, heads: dict | None = None,
             batch_size: int = 256, *, device: str = "cpu", latency: bool = True, throughput: bool = False,
             runtime: str = "onnxruntime") -> EvalReport:
    """Evaluate `model` on images `x` with global labels `y` (see the module docstring for the definitions).

    `tasks` maps task -> global class ids in head order; `heads` maps task -> graph output name (default: see
    `resolve_heads`). Images whose label belongs to no task are ignored. `latency=False` skips the latency
    measurement (`latency_ms` is then None); `throughput=True` adds images per second at batch 1, 8 and 64.
    `runtime` is 'onnxruntime' or 'openvino' (OpenVINO's CPU plugin in float32 precision).
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be ≥ 1, got {batch_size}")
    tasks = {t: [int(c) for c in classes] for t, classes in tasks.items()}
    _check_tasks(tasks)
    heads = resolve_heads(model, tasks, heads)
    x = np.asarray(x)
    y = np.asarray(y).reshape(-1)
    if len(x) != len(y):
        raise CalibrationDataError(f"evaluation data has {len(x)} images but {len(y)} labels")

    in_task = {t: np.isin(y, classes) for t, classes in tasks.items()}
    union = np.logical_or.reduce(list(in_task.values()))
    if not union.any():
        raise CalibrationDataError("no evaluation image has a label of any task "
                                   f"(labels seen: {sorted(set(y.tolist()))[:20]})")
    ignored = int((~union).sum())
    if ignored:
        log.info("evaluation: %d images with labels outside every task are ignored", ignored)
    xs, ys = x[union], y[union]
    input_name, input_shape, _ = _single_input(model)
    # Symbolic dimensions besides the batch: count MACs at the evaluation images' size.
    symbolic = input_shape is None or any(d is None for d in input_shape[1:])
    input_shapes = {input_name: (1, *x.shape[1:])} if symbolic else None
    head_tasks = list(heads)
    outs = _run_outputs(model, xs, [heads[t] for t in head_tasks], batch_size, device, runtime)
    for t in head_tasks:
        width = outs[heads[t]].shape[1]
        if width != len(tasks[t]):
            raise UsageError(f"head {heads[t]!r} of task {t!r} has {width} outputs per image, but the task has "
                             f"{len(tasks[t])} classes; is it the right head / card?")

    per_task = {}
    for t in head_tasks:
        mask = in_task[t][union]
        if mask.any():
            pred = np.asarray(tasks[t])[outs[heads[t]][mask].argmax(1)]
            per_task[t] = float((pred == ys[mask]).mean())
        else:
            per_task[t] = float("nan")
            log.warning("evaluation: no image of task %r; its accuracy is undefined", t)
    joint_logits = np.concatenate([outs[heads[t]] for t in head_tasks], axis=1)
    joint_classes = np.concatenate([np.asarray(tasks[t]) for t in head_tasks])
    winner = joint_logits.argmax(1)
    joint = float((joint_classes[winner] == ys).mean())
    routing = None
    if len(head_tasks) > 1:
        column_task = np.concatenate([np.full(len(tasks[t]), i) for i, t in enumerate(head_tasks)])
        true_task = np.full(len(ys), -1)
        for i, t in enumerate(head_tasks):
            true_task[np.isin(ys, tasks[t])] = i
        routing = float((column_task[winner] == true_task).mean())

    return EvalReport(
        per_task_accuracy=per_task,
        joint_accuracy=joint,
        num_images={t: int(in_task[t].sum()) for t in tasks},
        params=count_parameters(model),
        macs=count_macs(model, input_shapes),
        latency_ms=measure_latency(model, device=device, input_shape=x.shape[1:], runtime=runtime) if latency else None,
        heads=heads,
        task_routing_accuracy=routing,
        runtime=runtime,
        throughput=(measure_throughput(model, device=device, runtime=runtime, input_shape=x.shape[1:])
                    if throughput else None),
    )


def load_eval_data(path) -> tuple[np.ndarray, np.ndarray]:
    """Read an `.npz` with arrays `x` (images, first axis = image) and `y` (integer labels). Raises
    `CalibrationDataError` naming the file for a missing/unreadable file, missing keys, mismatched lengths,
    non-integer labels or no images."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CalibrationDataError(f"evaluation data {path!r}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise CalibrationDataError(f"evaluation data {path!r} is not a readable .npz file: {e}") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CalibrationDataError(f"evaluation data {path!r} is a single array; "
                                   "it must be an .npz with arrays 'x' (images) and 'y' (labels)")
    with data:
        missing = [k for k in ("x", "y") if k not in data.files]
        if missing:
            raise CalibrationDataError(f"evaluation data {path!r} has no array {' or '.join(map(repr, missing))} "
                                       f"(it has: {', '.join(data.files) or 'nothing'}); "
                                       "it needs 'x' (images) and 'y' (labels)")
        try:
            x, y = data["x"], data["y"]
        except Exception as e:
            raise CalibrationDataError(f"evaluation data {path!r}: cannot read its arrays: {e}") from e
    if y.ndim != 1:
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        else:
            raise CalibrationDataError(f"evaluation data {path!r}: 'y' must be a 1-D array of labels, "
                                       f"got shape {y.shape}")
    if len(x) != len(y):
        raise CalibrationDataError(f"evaluation data {path!r}: 'x' has {len(x)} images but 'y' has {len(y)} labels")
    if len(x) == 0:
        raise CalibrationDataError(f"evaluation data {path!r} holds no images")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise CalibrationDataError(f"evaluation data {path!r}: labels 'y' must be integers, got {y.dtype}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise CalibrationDataError(f"evaluation data {path!r}: images 'x' must be numeric, got {x.dtype}")
    return x, y
