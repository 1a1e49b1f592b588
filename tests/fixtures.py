"""Small ONNX models built by hand with `onnx.helper` + numpy, for checking onnxzip from the outside.

Every builder returns ``(model, params)``. ``params`` is plain data: the architecture name, its options and a dict
of numpy weights; ``build(params)`` turns it back into a ModelProto. Because the weights are plain arrays and each
architecture lists its own feature spaces by hand (``_SPACES``), ``permuted_twin`` can permute hidden units without
any of onnxzip's graph analysis -- that analysis is what the tests check.

Conventions: opset 17, ir_version 10, one input named ``input`` with a dynamic batch dim ``N``, one output named
``logits``, float32 weights with He init and small positive biases so that activations are O(1) and ReLUs live.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 10
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _rng(seed_or_rng):
    if isinstance(seed_or_rng, np.random.RandomState):
        return seed_or_rng
    return np.random.RandomState(seed_or_rng)


def _he(rng, shape, fan_in, gain=1.0):
    return (rng.randn(*shape) * gain * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _bias(rng, n, lo=0.0, hi=0.2):
    return rng.uniform(lo, hi, size=n).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Architectures: params -> ModelProto
# ---------------------------------------------------------------------------------------------------------------

class _Graph:
    """Tiny helper that collects nodes and initializers."""

    def __init__(self, weights):
        self.weights = weights
        self.nodes = []
        self.used = []

    def w(self, name):
        if name not in self.used:
            self.used.append(name)
        return name

    def node(self, op, inputs, name, **attrs):
        out = name + ".out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def model(self, in_shape, out_name, classes):
        # rename the last node's output to the graph output name
        last = self.nodes[-1]
        last.output[0] = out_name
        inits = [numpy_helper.from_array(np.ascontiguousarray(self.weights[n]), name=n) for n in self.used]
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])],
            [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", classes])],
            initializer=inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="onnxzip-tests")
        model.ir_version = IR_VERSION
        return model


def _build_mlp(p):
    g = _Graph(p["w"])
    x = g.node("Flatten", ["input"], "flatten", axis=1)
    x = g.node("Gemm", [x, g.w("fc1.weight"), g.w("fc1.bias")], "fc1", transB=1)
    x = g.node("Relu", [x], "relu1")
    x = g.node("MatMul", [x, g.w("fc2.weight")], "fc2")
    x = g.node("Add", [x, g.w("fc2.bias")], "fc2_add")
    x = g.node("Relu", [x], "relu2")
    g.node("Gemm", [x, g.w("fc3.weight"), g.w("fc3.bias")], "fc3", transB=0)
    return g.model((1, 8, 8), "logits", p["classes"])


def _build_vgg(p):
    g = _Graph(p["w"])
    x = g.node("Conv", ["input", g.w("conv1.weight"), g.w("conv1.bias")], "conv1", pads=[1, 1, 1, 1],
               kernel_shape=[3, 3])
    if p["lrn"]:
        x = g.node("LRN", [x], "lrn1", size=3, alpha=0.5, beta=0.75, bias=1.0)
    x = g.node("Relu", [x], "relu1")
    x = g.node("Conv", [x, g.w("conv2.weight")], "conv2", pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    x = g.node("BatchNormalization", [x, g.w("bn2.scale"), g.w("bn2.bias"), g.w("bn2.mean"), g.w("bn2.var")],
               "bn2", epsilon=1e-5)
    x = g.node("Relu", [x], "relu2")
    x = g.node("MaxPool", [x], "pool2", kernel_shape=[2, 2], strides=[2, 2])
    x = g.node("Conv", [x, g.w("conv3.weight"), g.w("conv3.bias")], "conv3", pads=[1, 1, 1, 1],
               kernel_shape=[3, 3])
    x = g.node("Relu", [x], "relu3")
    x = g.node("Flatten", [x], "flatten", axis=1)
    x = g.node("Gemm", [x, g.w("fc1.weight"), g.w("fc1.bias")], "fc1", transB=1)
    x = g.node("Relu", [x], "relu4")
    g.node("Gemm", [x, g.w("fc2.weight"), g.w("fc2.bias")], "fc2", transB=1)
    return g.model((3, 12, 12), "logits", p["classes"])


def _build_resnet(p):
    g = _Graph(p["w"])
    conv3 = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    x = g.node("Conv", ["input", g.w("stem.weight"), g.w("stem.bias")], "stem", **conv3)
    x = g.node("Relu", [x], "stem_relu")
    # per-channel constant Mul on the residual stream of stage 1
    x = g.node("Mul", [x, g.w("stem.scale")], "stem_scale")
    for b in ("b1", "b2"):
        h = g.node("Conv", [x, g.w(f"{b}c1.weight"), g.w(f"{b}c1.bias")], f"{b}c1", **conv3)
        if b == "b2":
            # per-channel constant Add inside a block
            h = g.node("Add", [h, g.w("b2.shift")], "b2_shift")
        h = g.node("Relu", [h], f"{b}_relu1")
        h = g.node("Conv", [h, g.w(f"{b}c2.weight"), g.w(f"{b}c2.bias")], f"{b}c2", **conv3)
        x = g.node("Add", [h, x], f"{b}_add")
        x = g.node("Relu", [x], f"{b}_relu2")
    h = g.node("Conv", [x, g.w("b3c1.weight"), g.w("b3c1.bias")], "b3c1", strides=[2, 2], **conv3)
    h = g.node("Relu", [h], "b3_relu1")
    h = g.node("Conv", [h, g.w("b3c2.weight"), g.w("b3c2.bias")], "b3c2", **conv3)
    s = g.node("Conv", [x, g.w("b3sc.weight"), g.w("b3sc.bias")], "b3sc", kernel_shape=[1, 1], strides=[2, 2])
    x = g.node("Add", [h, s], "b3_add")
    x = g.node("Relu", [x], "b3_relu2")
    x = g.node("GlobalAveragePool", [x], "gap")
    x = g.node("Flatten", [x], "flatten", axis=1)
    g.node("Gemm", [x, g.w("fc.weight"), g.w("fc.bias")], "fc", transB=1)
    return g.model((3, 8, 8), "logits", p["classes"])


_BUILDERS = {"mlp": _build_mlp, "vgg": _build_vgg, "resnet": _build_resnet}


# Feature spaces, listed by hand: space -> [(weight, axis, expand)]. `expand` > 1 means the axis holds
# channel blocks of `expand` positions (a flattened C x H x W map). Input channels and classes are never listed.
def _spaces_mlp(p):
    return {
        "h1": [("fc1.weight", 0, 1), ("fc1.bias", 0, 1), ("fc2.weight", 0, 1)],
        "h2": [("fc2.weight", 1, 1), ("fc2.bias", 0, 1), ("fc3.weight", 0, 1)],
    }


def _spaces_vgg(p):
    return {
        "c1": [("conv1.weight", 0, 1), ("conv1.bias", 0, 1), ("conv2.weight", 1, 1)],
        "c2": [("conv2.weight", 0, 1), ("bn2.scale", 0, 1), ("bn2.bias", 0, 1), ("bn2.mean", 0, 1),
               ("bn2.var", 0, 1), ("conv3.weight", 1, 1)],
        "c3": [("conv3.weight", 0, 1), ("conv3.bias", 0, 1), ("fc1.weight", 1, 36)],
        "f1": [("fc1.weight", 0, 1), ("fc1.bias", 0, 1), ("fc2.weight", 1, 1)],
    }


def _spaces_resnet(p):
    return {
        # the whole residual stream of stage 1 shares one space
        "s1": [("stem.weight", 0, 1), ("stem.bias", 0, 1), ("stem.scale", 1, 1),
               ("b1c1.weight", 1, 1), ("b1c2.weight", 0, 1), ("b1c2.bias", 0, 1),
               ("b2c1.weight", 1, 1), ("b2c2.weight", 0, 1), ("b2c2.bias", 0, 1),
               ("b3c1.weight", 1, 1), ("b3sc.weight", 1, 1)],
        "b1": [("b1c1.weight", 0, 1), ("b1c1.bias", 0, 1), ("b1c2.weight", 1, 1)],
        "b2": [("b2c1.weight", 0, 1), ("b2c1.bias", 0, 1), ("b2.shift", 1, 1), ("b2c2.weight", 1, 1)],
        "b3": [("b3c1.weight", 0, 1), ("b3c1.bias", 0, 1), ("b3c2.weight", 1, 1)],
        "s2": [("b3c2.weight", 0, 1), ("b3c2.bias", 0, 1), ("b3sc.weight", 0, 1), ("b3sc.bias", 0, 1),
               ("fc.weight", 1, 1)],
    }


_SPACES = {"mlp": _spaces_mlp, "vgg": _spaces_vgg, "resnet": _spaces_resnet}


def build(params, check=True):
    """ModelProto for `params` (checked with the full ONNX checker)."""
    model = _BUILDERS[params["arch"]](params)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


# Data-dependent bias init: (pre-activation tensor, parameter that shifts it), in topological order. Each bias is
# set so that its pre-activation has per-channel mean +0.2 std on a reference batch: no ReLU is dead or always on,
# which matters because a dead unit (zero variance) has no correlation to match it by.
_CENTER = {
    "mlp": [("fc1.out", "fc1.bias"), ("fc2_add.out", "fc2.bias")],
    "vgg": [("conv2.out", "bn2.mean"), ("conv3.out", "conv3.bias"), ("fc1.out", "fc1.bias")],
    "resnet": [("stem.out", "stem.bias"), ("b1c1.out", "b1c1.bias"), ("b2_shift.out", "b2c1.bias"),
               ("b3c1.out", "b3c1.bias"), ("b3_add.out", "b3sc.bias")],
}


def _center(params, rng):
    ref = None
    for tensor, name in _CENTER[params["arch"]]:
        model = build(params, check=False)
        if ref is None:
            ref = np.random.RandomState(12345).randn(*input_shape(model, 256)).astype(np.float32)
        v = hidden_activations(model, ref)[tensor].astype(np.float64)
        axes = (0,) + tuple(range(2, v.ndim))
        mean, std = v.mean(axis=axes), v.std(axis=axes)
        p = params["w"][name]
        if name.endswith(".mean"):  # BatchNormalization: normalise with (about) the true statistics
            var_name = name[:-len("mean")] + "var"
            params["w"][name] = (mean - 0.2 * std).astype(np.float32).reshape(p.shape)
            params["w"][var_name] = (std**2 * rng.uniform(0.7, 1.4, std.shape)).astype(np.float32)
        else:
            params["w"][name] = (p - (mean - 0.2 * std).reshape(p.shape)).astype(np.float32)
    return params


def spaces(params):
    """The hand-written feature spaces of `params`' architecture: name -> [(weight, axis, expand)]."""
    return _SPACES[params["arch"]](params)


# ---------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------

def mlp(seed=0, classes=5, hidden=(16, 16)):
    """input (N,1,8,8) -> Flatten -> Gemm(transB=1) -> Relu -> MatMul+Add -> Relu -> Gemm(transB=0) -> logits."""
    rng = _rng(seed)
    h1, h2 = hidden
    w = {
        "fc1.weight": _he(rng, (h1, 64), 64),           # (out, in): transB=1
        "fc1.bias": _bias(rng, h1),
        "fc2.weight": _he(rng, (h1, h2), h1),           # (in, out): MatMul
        "fc2.bias": _bias(rng, h2),
        "fc3.weight": _he(rng, (h2, classes), h2, 0.5),  # (in, out): transB=0
        "fc3.bias": _bias(rng, classes, -0.1, 0.1),
    }
    params = _center({"arch": "mlp", "classes": classes, "w": w}, rng)
    return build(params), params


def vgg(seed=0, classes=5, widths=(8, 8, 8), hidden=16, lrn=False):
    """input (N,3,12,12) -> Conv -> Relu -> Conv -> BN -> Relu -> MaxPool2 -> Conv -> Relu -> Flatten(C*36) ->
    Gemm -> Relu -> Gemm -> logits. `lrn=True` puts an LRN node (cross-channel) right after conv1."""
    rng = _rng(seed)
    c1, c2, c3 = widths
    w = {
        "conv1.weight": _he(rng, (c1, 3, 3, 3), 27),
        "conv1.bias": _bias(rng, c1),
        "conv2.weight": _he(rng, (c2, c1, 3, 3), 9 * c1),
        "bn2.scale": rng.uniform(0.5, 1.5, c2).astype(np.float32),
        "bn2.bias": _bias(rng, c2),
        "bn2.mean": (rng.randn(c2) * 0.2).astype(np.float32),
        "bn2.var": rng.uniform(0.5, 2.0, c2).astype(np.float32),
        "conv3.weight": _he(rng, (c3, c2, 3, 3), 9 * c2),
        "conv3.bias": _bias(rng, c3),
        "fc1.weight": _he(rng, (hidden, 36 * c3), 36 * c3),
        "fc1.bias": _bias(rng, hidden),
        "fc2.weight": _he(rng, (classes, hidden), hidden, 0.5),
        "fc2.bias": _bias(rng, classes, -0.1, 0.1),
    }
    params = _center({"arch": "vgg", "classes": classes, "lrn": bool(lrn), "w": w}, rng)
    return build(params), params


def resnet(seed=0, classes=5, widths=(8, 16)):
    """stem Conv -> Relu -> Mul(per-channel const) -> 2 residual blocks at C1 (the second with a per-channel const
    Add) -> downsampling block to C2 with a 1x1 stride-2 shortcut Conv -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = _rng(seed)
    c1, c2 = widths
    w = {
        "stem.weight": _he(rng, (c1, 3, 3, 3), 27),
        "stem.bias": _bias(rng, c1),
        "stem.scale": rng.uniform(0.5, 1.5, (1, c1, 1, 1)).astype(np.float32),
        "b2.shift": rng.uniform(-0.1, 0.2, (1, c1, 1, 1)).astype(np.float32),
    }
    for b in ("b1", "b2"):
        w[f"{b}c1.weight"] = _he(rng, (c1, c1, 3, 3), 9 * c1)
        w[f"{b}c1.bias"] = _bias(rng, c1)
        w[f"{b}c2.weight"] = _he(rng, (c1, c1, 3, 3), 9 * c1, 0.5)
        w[f"{b}c2.bias"] = _bias(rng, c1, -0.05, 0.05)
    w["b3c1.weight"] = _he(rng, (c2, c1, 3, 3), 9 * c1)
    w["b3c1.bias"] = _bias(rng, c2)
    w["b3c2.weight"] = _he(rng, (c2, c2, 3, 3), 9 * c2, 0.5)
    w["b3c2.bias"] = _bias(rng, c2, -0.05, 0.05)
    w["b3sc.weight"] = _he(rng, (c2, c1, 1, 1), c1, 0.5)
    w["b3sc.bias"] = _bias(rng, c2, -0.05, 0.05)
    w["fc.weight"] = _he(rng, (classes, c2), c2, 0.5)
    w["fc.bias"] = _bias(rng, classes, -0.1, 0.1)
    params = _center({"arch": "resnet", "classes": classes, "w": w}, rng)
    return build(params), params


ARCHS = {"mlp": mlp, "vgg": vgg, "resnet": resnet}


def permuted_twin(params, rng=0):
    """(model, params) of B: A with every hidden feature space permuted at random, consistently.

    Channel j of B is channel perm[j] of A, on every weight axis of the space (producer outputs, per-channel
    parameters, consumer inputs; for a flattened axis, whole blocks of `expand` positions move together). Input
    channels and output classes are untouched, so B computes A's function with different weights -- except where
    a cross-channel operator (LRN) sits on a permuted space, where B is merely another model.
    """
    rng = _rng(rng)
    w = {k: v.copy() for k, v in params["w"].items()}
    perms = {}
    for space, axes in spaces(params).items():
        size = params["w"][axes[0][0]].shape[axes[0][1]] // axes[0][2]
        perm = rng.permutation(size)
        while size > 1 and np.all(perm == np.arange(size)):
            perm = rng.permutation(size)
        perms[space] = perm
        for name, axis, expand in axes:
            idx = (perm[:, None] * expand + np.arange(expand)[None, :]).ravel()
            assert w[name].shape[axis] == size * expand, (name, axis, w[name].shape, size, expand)
            w[name] = np.take(w[name], idx, axis=axis)
    twin = dict(params, w=w, perms=perms)
    return build(twin), twin


def random_pair(arch, seed=0, classes=(5, 5), **kw):
    """Two independently initialised models of the same architecture (not twins): ((A, pA), (B, pB))."""
    rng = _rng(seed)
    seeds = rng.randint(0, 2**31 - 1, size=2)
    builder = ARCHS[arch]
    return builder(int(seeds[0]), classes=classes[0], **kw), builder(int(seeds[1]), classes=classes[1], **kw)


def input_shape(model, n):
    """Shape of the model's first input with every symbolic dim set to n."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else n for d in dims)


def perturb(model, scale, rng):
    """Add noise of `scale` times each float weight's std to every float weight (of more than one value) in place:
    a model like `model` but not its twin."""
    for t in model.graph.initializer:
        v = onnx.numpy_helper.to_array(t)
        if v.dtype == np.float32 and v.size > 1:
            t.CopyFrom(onnx.numpy_helper.from_array((v + scale * v.std() * rng.randn(*v.shape)).astype(np.float32),
                                                    t.name))
    return model


def calib(model, n=256, seed=0):
    """Random normal float32 inputs of the model's input shape, n samples."""
    return np.random.RandomState(seed).randn(*input_shape(model, n)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Running and counting
# ---------------------------------------------------------------------------------------------------------------

def session(model, level=None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    if level is not None:
        opts.graph_optimization_level = level
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run(model, x, level=None):
    """All outputs of `model` on input `x` (array for `input`, or a dict), as a dict name -> array."""
    sess = session(model, level)
    feeds = x if isinstance(x, dict) else {sess.get_inputs()[0].name: x}
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def float_param_count(model):
    """Number of float initializer elements (plus float Constant-node tensors)."""
    total = 0
    for init in model.graph.initializer:
        if init.data_type in FLOAT_TYPES:
            total += int(np.prod(init.dims, dtype=np.int64))
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in FLOAT_TYPES:
                    total += int(np.prod(a.t.dims, dtype=np.int64))
    return total


def hidden_activations(model, x):
    """Every intermediate float tensor of `model` on `x` (by name), for checking that ReLUs live."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(m)
    existing = {o.name for o in m.graph.output}
    for vi in inferred.graph.value_info:
        if vi.name not in existing:
            m.graph.output.append(vi)
    return run(m, x)
