"""Write the exporter-variety test fixtures (issue 4): pairs of tiny ONNX models from real exporters.

    python tools/make_fixtures.py [--out tests/data] [--only NAME ...]

Each fixture is ``tests/data/<name>/{a.onnx, b.onnx}``. For a *twin* fixture B is A with every hidden feature space
randomly permuted, done on the weights (torch state dict / scikit-learn ``coefs_``) BEFORE export by code that knows
the architecture -- never by onnxzip -- so B computes exactly A's function with differently ordered hidden units.
Inputs and output classes are left as they are. Every pair is checked in onnxruntime at generation time (1e-5).
``heads_5_7`` is not a twin: two independent random models of one trunk with 5 and 7 classes.

``tests/data/manifest.json`` records, per fixture, what the exporter actually wrote (opset, op types with counts,
input/output names and shapes) and ``expected_spaces``: the number of LEARNED feature spaces counted by hand from
the architecture (rules in ``COUNTING``; each fixture says how it was counted).

Tools-only dependencies (not needed by onnxzip or its tests): torch, onnxscript (for the dynamo exporter),
scikit-learn, skl2onnx, onnxruntime. Weights are random (He init, positive biases, random BatchNorm running
statistics), seeded, so a re-run writes the same weights; the exporters' byte output may differ across versions.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import json
import os
import sys
import warnings
from collections import Counter

REQUIRED = {"torch": "torch==2.13.0 (CPU is enough)", "onnx": "onnx", "onnxruntime": "onnxruntime",
            "onnxscript": "onnxscript (torch's dynamo exporter needs it)", "sklearn": "scikit-learn",
            "skl2onnx": "skl2onnx"}


# what each kind of fixture needs beyond torch, onnx and onnxruntime
EXTRA_REQUIRED = {"dynamo": ("onnxscript",), "sklearn": ("sklearn", "skl2onnx")}


def _require(modules=("torch", "onnx", "onnxruntime")):
    missing = []
    for mod in modules:
        pip_name = REQUIRED[mod]
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(pip_name)
    if missing:
        sys.exit("make_fixtures.py needs packages that are not installed (tools-only dependencies, not onnxzip's):\n"
                 + "".join(f"  pip install {m}\n" for m in missing))


_require()

import logging  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models_torch  # noqa: E402

logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" x4 per dynamo export
TS_OPSET = 17
MAX_BYTES = 200_000
CHECK_ATOL = 1e-5

COUNTING = ("expected_spaces counts LEARNED feature spaces, by hand from the architecture: each weighted layer "
            "(Conv, Gemm/Linear, MatMul) opens one space on its output; per-channel ops (BatchNorm, ReLU, pooling, "
            "LayerNorm/GroupNorm, per-channel Sub/Div/Add) carry it; a residual Add ties its two inputs into one; "
            "the SE gate Mul ties the excite conv's output to the gated feature map; a depthwise conv (groups = C) "
            "does not open a new space (its output channel i is its input channel i); a Concat output is a "
            "composite of its inputs' spaces, not a new one; the graph input is not counted; the heads' output "
            "spaces ARE counted; a model with an unmergeable region is counted the same way.")


# ---------------------------------------------------------------------------------------------------------------
# Initialisation and twins
# ---------------------------------------------------------------------------------------------------------------

def init_weights(model: nn.Module, seed: int) -> nn.Module:
    """He init, small positive biases; BatchNorm with random running statistics; random norm affines."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2)
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.6 + 0.8 * torch.rand(c, generator=g))
                m.bias.copy_(0.05 + 0.25 * torch.rand(c, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                m.weight.copy_(0.6 + 0.8 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.05 + 0.25 * torch.rand(m.bias.shape, generator=g))
            else:  # loose per-channel biases (NHWCNet's BiasAdd)
                for p in m.parameters(recurse=False):
                    p.copy_(torch.rand(p.shape, generator=g) * 0.2)
    return model.eval()


def _perm(width: int, groups: int, rng: np.random.RandomState, swap_groups: bool = True) -> np.ndarray:
    """A random permutation of `width` channels; with groups > 1 one that keeps every group of width/groups
    consecutive channels together (groups permuted among themselves, channels within each group), the most
    general permutation a GroupNorm with 1 < groups < C is invariant to. `swap_groups=False`: every group stays in
    its place, only its channels are permuted (what a grouped convolution's twin needs, see GroupedCNN)."""
    if groups == 1:
        return rng.permutation(width)
    size = width // groups
    order = rng.permutation(groups) if swap_groups else np.arange(groups)
    return np.concatenate([g * size + rng.permutation(size) for g in order])


def permuted_twin(model: nn.Module, spaces: dict, rng: np.random.RandomState) -> tuple:
    """(deep copy of `model` with each hidden space permuted, {space: permutation}) for
    spaces = {name: (width, groups, [(param, axis), ...])}, or (width, groups, members, "in place") for a
    permutation that keeps each group in its place."""
    twin = copy.deepcopy(model)
    state = {k: v.clone() for k, v in twin.state_dict().items()}
    perms = {}
    for name, (width, groups, members, *how) in spaces.items():
        p = perms[name] = torch.as_tensor(_perm(width, groups, rng, swap_groups=how != ["in place"]))
        for param, axis in members:
            t = state[param]
            assert t.shape[axis] == width, f"space {name}: {param} axis {axis} has {t.shape[axis]}, not {width}"
            state[param] = t.index_select(axis, p)
    twin.load_state_dict(state)
    return twin.eval(), perms


def conv_out(name, bn=None):
    """Members of a space for a conv/linear `name` writing it (weight axis 0, bias) and its BatchNorm."""
    out = [(f"{name}.weight", 0), (f"{name}.bias", 0)]
    if bn:
        out += [(f"{bn}.{k}", 0) for k in ("weight", "bias", "running_mean", "running_var")]
    return out


def conv_in(name):
    return [(f"{name}.weight", 1)]


# ---------------------------------------------------------------------------------------------------------------
# Architectures: each has `spaces()` (hidden spaces, for the twin), `input_shape` and `expected` (hand count)
# ---------------------------------------------------------------------------------------------------------------

class ResCNN(nn.Module):
    """conv1-bn-relu, one residual block (conv2-bn-relu-conv3-bn, + skip, relu), conv4(stride 2)-bn-relu, maxpool,
    global average pool, linear head."""

    input_shape = (3, 16, 16)
    expected = (4, "conv1+conv3 (tied by the residual Add), conv2, conv4, fc head")

    def __init__(self, classes=5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv4, self.bn4 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.relu1, self.relu2, self.relu3, self.relu4 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        h = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(x + self.bn3(self.conv3(h)))
        x = self.pool(self.relu4(self.bn4(self.conv4(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def spaces(self):
        return {"stream": (8, 1, conv_out("conv1", "bn1") + conv_out("conv3", "bn3") + conv_in("conv2")
                           + conv_in("conv4")),
                "block": (8, 1, conv_out("conv2", "bn2") + conv_in("conv3")),
                "conv4": (16, 1, conv_out("conv4", "bn4") + conv_in("fc"))}


class TokenMLP(nn.Module):
    """Linear layers acting on the last axis of an (N, T, C) input (MatMul + Add), mean over tokens, head."""

    input_shape = (4, 6)
    expected = (3, "fc1, fc2 (both on (N, T, C): MatMul + Add), fc3 head")

    def __init__(self, classes=5):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, classes)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        x = self.relu2(self.fc2(self.relu1(self.fc1(x))))
        return self.fc3(x.mean(dim=1))

    def spaces(self):
        return {"fc1": (16, 1, conv_out("fc1") + conv_in("fc2")), "fc2": (16, 1, conv_out("fc2") + conv_in("fc3"))}


class NHWCNet(nn.Module):
    """Channels-last as TensorFlow converters write it: the input is (N, H, W, C); every conv is wrapped in
    Transpose to NCHW and back, and the bias is added in NHWC (TF's BiasAdd), so Transposes cannot cancel."""

    input_shape = (12, 12, 3)
    expected = (3, "conv1, conv2 (each with its NHWC bias Add), fc head")

    def __init__(self, classes=5):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bias1, self.bias2 = nn.Parameter(torch.zeros(8)), nn.Parameter(torch.zeros(8))
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.relu1(self.conv1(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + self.bias1)
        x = self.relu2(self.conv2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + self.bias2)
        return self.fc(x.mean(dim=(1, 2)))

    def spaces(self):
        return {"conv1": (8, 1, [("conv1.weight", 0), ("bias1", 0), ("conv2.weight", 1)]),
                "conv2": (8, 1, [("conv2.weight", 0), ("bias2", 0), ("fc.weight", 1)])}


class LayerNormMLP(nn.Module):
    """fc-LayerNorm-relu twice over the channel axis, linear head."""

    input_shape = (12,)
    expected = (3, "fc1, fc2, fc3 head (LayerNorm carries fc1's / fc2's space)")

    def __init__(self, classes=5):
        super().__init__()
        self.fc1, self.ln1 = nn.Linear(12, 16), nn.LayerNorm(16)
        self.fc2, self.ln2 = nn.Linear(16, 16), nn.LayerNorm(16)
        self.fc3 = nn.Linear(16, classes)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        x = self.relu1(self.ln1(self.fc1(x)))
        x = self.relu2(self.ln2(self.fc2(x)))
        return self.fc3(x)

    def spaces(self):
        return {"fc1": (16, 1, conv_out("fc1") + [("ln1.weight", 0), ("ln1.bias", 0)] + conv_in("fc2")),
                "fc2": (16, 1, conv_out("fc2") + [("ln2.weight", 0), ("ln2.bias", 0)] + conv_in("fc3"))}


class GroupNormCNN(nn.Module):
    """conv1-GN(g1)-relu, conv2-GN(g2)-relu, global average pool, linear head."""

    input_shape = (3, 12, 12)
    expected = (3, "conv1, conv2, fc head (GroupNorm carries the conv's space)")

    def __init__(self, classes=5, groups=(1, 8)):
        super().__init__()
        self.groups = groups
        self.conv1, self.gn1 = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(groups[0], 8)
        self.conv2, self.gn2 = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(groups[1], 8)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.relu1(self.gn1(self.conv1(x)))
        x = self.relu2(self.gn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def spaces(self):
        gn = lambda n: [(f"{n}.weight", 0), (f"{n}.bias", 0)]  # noqa: E731
        # GroupNorm(1) and GroupNorm(C) are invariant to any channel permutation; 1 < g < C only to one that keeps
        # the groups together (see _perm)
        g1 = self.groups[0] if 1 < self.groups[0] < 8 else 1
        g2 = self.groups[1] if 1 < self.groups[1] < 8 else 1
        return {"conv1": (8, g1, conv_out("conv1") + gn("gn1") + conv_in("conv2")),
                "conv2": (8, g2, conv_out("conv2") + gn("gn2") + conv_in("fc"))}


class ConcatCNN(nn.Module):
    """conv0-relu; two branches (3x3 conv, 1x1 conv) concatenated on the channel axis with conv0's output itself
    (Inception branches + a DenseNet skip), then conv2-relu, global average pool, linear head."""

    input_shape = (3, 12, 12)
    expected = (5, "conv0, branch conv1a, branch conv1b, conv2, fc head (the Concat is a composite, not a space)")

    def __init__(self, classes=5):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1a, self.conv1b = nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.relu0, self.relu1a, self.relu1b, self.relu2 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.relu0(self.conv0(x))
        a, b = self.relu1a(self.conv1a(x)), self.relu1b(self.conv1b(x))
        x = self.relu2(self.conv2(torch.cat([x, a, b], dim=1)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def spaces(self):
        # conv2's input channels are [conv0 (0:8) | conv1a (8:12) | conv1b (12:16)]: permuted slice by slice in
        # `torch_twin`, since a slice is not an axis of a single parameter
        return {"conv0": (8, 1, conv_out("conv0") + conv_in("conv1a") + conv_in("conv1b")),
                "conv1a": (4, 1, conv_out("conv1a")),
                "conv1b": (4, 1, conv_out("conv1b")),
                "conv2": (8, 1, conv_out("conv2") + conv_in("fc"))}


class DepthwiseCNN(nn.Module):
    """MobileNet-style: conv0-bn-relu, depthwise 3x3 (groups = C)-bn-relu, pointwise 1x1-bn-relu, GAP, head."""

    input_shape = (3, 12, 12)
    expected = (3, "conv0 (the depthwise conv carries it), pointwise conv, fc head")

    def __init__(self, classes=5):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.pw, self.bn2 = nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)
        self.relu0, self.relu1, self.relu2 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.relu0(self.bn0(self.conv0(x)))
        x = self.relu1(self.bn1(self.dw(x)))
        x = self.relu2(self.bn2(self.pw(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def spaces(self):
        return {"conv0": (8, 1, conv_out("conv0", "bn0") + conv_out("dw", "bn1") + conv_in("pw")),
                "pw": (16, 1, conv_out("pw", "bn2") + conv_in("fc"))}


class GroupedCNN(nn.Module):
    """ResNeXt-style: conv0-bn-relu, one bottleneck block (1x1 conv1-bn-relu, 3x3 grouped gconv (groups 4)-bn-relu,
    1x1 conv3-bn, + skip, relu), global average pool, linear head."""

    input_shape = (3, 12, 12)
    width, groups = 16, 4
    expected = (4, "conv0 (tied by the residual Add with conv3), conv1, gconv, fc head")

    def __init__(self, classes=5, swap_groups=False):
        super().__init__()
        c, g = self.width, self.groups
        self.swap_groups = swap_groups
        self.conv0, self.bn0 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.gconv, self.bn2 = nn.Conv2d(c, c, 3, padding=1, groups=g), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)
        self.relu0, self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.relu0(self.bn0(self.conv0(x)))
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.gconv(y)))
        x = self.relu3(self.bn3(self.conv3(y)) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def spaces(self):
        c, g = self.width, self.groups
        # gconv's input axis (c/g wide) is permuted group by group in torch_twin
        stream = {"conv0": (c, 1, conv_out("conv0", "bn0") + conv_out("conv3", "bn3") + conv_in("conv1") + conv_in("fc"))}
        if self.swap_groups:  # conv1 and gconv: permute_groups
            return stream
        return {**stream, "conv1": (c, g, conv_out("conv1", "bn1"), "in place"),
                "gconv": (c, g, conv_out("gconv", "bn2") + conv_in("conv3"), "in place")}

    def permute_groups(self, state, rng):
        """The groups of conv1's and gconv's outputs permuted as wholes by one permutation (gconv's new group k is
        its old group s[k], reading conv1's old block s[k], which is now block k), and the channels inside every
        group of each by their own permutations: B computes A, with its groups in another order."""
        c, g = self.width, self.groups
        size = c // g
        order = rng.permutation(g)
        while np.array_equal(order, np.arange(g)):
            order = rng.permutation(g)
        p1, p2 = (torch.as_tensor(np.concatenate([order[k] * size + rng.permutation(size) for k in range(g)]))
                  for _ in range(2))
        for name, p in (("conv1", p1), ("bn1", p1), ("gconv", p2), ("bn2", p2)):
            for param in ("weight", "bias", "running_mean", "running_var"):
                key = f"{name}.{param}"
                if key in state and not (name == "gconv" and param == "weight"):
                    state[key] = state[key].index_select(0, p)
        w = state["gconv.weight"].index_select(0, p2)
        state["gconv.weight"] = torch.cat([w[k * size:(k + 1) * size].index_select(
            1, p1[k * size:(k + 1) * size] - int(order[k]) * size) for k in range(g)])
        state["conv3.weight"] = state["conv3.weight"].index_select(1, p2)


def channel_shuffle(x, groups):
    """torchvision's ShuffleNetV2 channel shuffle, as written there."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleCNN(nn.Module):
    """ShuffleNetV2 unit (stride 1) as torchvision writes it: conv0-bn-relu, chunk(2) into x1, x2; x2 through 1x1
    pw1-bn-relu, 3x3 depthwise dw-bn, 1x1 pw2-bn-relu; cat(x1, x2') then channel_shuffle(groups 2); global average
    pool, linear head."""

    input_shape = (3, 12, 12)
    expected = (4, "conv0, pw1 (the depthwise conv carries it), pw2, fc head (chunk, cat and shuffle are views)")

    def __init__(self, classes=5):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pw1, self.bn1 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.dw, self.bn_dw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.pw2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.relu0, self.relu1, self.relu2 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.relu0(self.bn0(self.conv0(x)))
        x1, x2 = x.chunk(2, dim=1)
        x2 = self.relu2(self.bn2(self.pw2(self.bn_dw(self.dw(self.relu1(self.bn1(self.pw1(x2))))))))
        x = channel_shuffle(torch.cat((x1, x2), dim=1), 2)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def spaces(self):
        # pw1's input (conv0's second half) and fc's input (the shuffled concatenation) are permuted in torch_twin
        return {"conv0": (16, 2, conv_out("conv0", "bn0"), "in place"),
                "pw1": (8, 1, conv_out("pw1", "bn1") + conv_out("dw", "bn_dw") + conv_in("pw2")),
                "pw2": (8, 1, conv_out("pw2", "bn2"))}


class SECNN(nn.Module):
    """conv0-relu, conv1-relu, squeeze-and-excitation (GAP, 1x1 reduce-relu, 1x1 expand-sigmoid, Mul), GAP, head."""

    input_shape = (3, 12, 12)
    expected = (4, "conv0, conv1+se_expand (tied by the gate Mul), se_reduce, fc head")

    def __init__(self, classes=5):
        super().__init__()
        self.conv0, self.conv1 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.se_reduce, self.se_expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.relu0, self.relu1, self.relu_se = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.relu1(self.conv1(self.relu0(self.conv0(x))))
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        s = torch.sigmoid(self.se_expand(self.relu_se(self.se_reduce(s))))
        x = x * s
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def post_init(self, x):
        """Centre the reduce conv on random inputs: pooled post-ReLU features are all positive and nearly the same
        from image to image, so with He init most reduce units would be dead (or always on) otherwise."""
        with torch.no_grad():
            s = nn.functional.adaptive_avg_pool2d(self.relu1(self.conv1(self.relu0(self.conv0(x)))), 1)
            pre = self.se_reduce(s)
            self.se_reduce.bias -= pre.mean(dim=(0, 2, 3)) - 0.5 * pre.std(dim=(0, 2, 3))

    def spaces(self):
        return {"conv0": (8, 1, conv_out("conv0") + conv_in("conv1")),
                "conv1": (8, 1, conv_out("conv1") + conv_out("se_expand") + conv_in("se_reduce") + conv_in("fc")),
                "se_reduce": (4, 1, conv_out("se_reduce") + conv_in("se_expand"))}


class PreprocCNN(nn.Module):
    """(x - mean[c]) / std[c] inside the graph (constants), then conv1-relu, conv2-relu, GAP, head."""

    input_shape = (3, 12, 12)
    expected = (3, "conv1, conv2, fc head (the Sub/Div act on the graph input: an identity space, not counted)")

    def __init__(self, classes=5):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def spaces(self):
        return {"conv1": (8, 1, conv_out("conv1") + conv_in("conv2")),
                "conv2": (8, 1, conv_out("conv2") + conv_in("fc"))}


class TinyViT(nn.Module):
    """Vision transformer: patch Conv (4x4, stride 4) on 8x8 images (4 tokens), class token concatenated on the
    token axis, position embedding added, `depth` pre-norm blocks (LayerNorm, attention of 2 heads of 8, residual
    Add; LayerNorm, MLP 16-32-16 with GELU, residual Add), final LayerNorm, linear head on the class token.
    `attention`: "packed" (timm: one qkv Linear, reshape (N, T, 3, H, d), permute, unbind, scaled_dot_product_attention),
    "separate" (q, k, v Linears, view (N, T, H, d), transpose, softmax(q kᵀ / sqrt(d)) v written out), "mha"
    (nn.MultiheadAttention, batch_first), or "relative" (Swin's window attention: packed qkv, q kᵀ / sqrt(d) plus a
    learned relative position bias per head from a table indexed by the tokens' offsets on the 2x2 patch grid; no
    class token: the head reads the mean over tokens)."""

    input_shape = (1, 8, 8)
    dim, heads, depth = 16, 2, 2

    def __init__(self, classes=5, attention="packed"):
        super().__init__()
        d, self.attention = self.dim, attention
        self.patch = nn.Conv2d(1, d, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.blocks = nn.ModuleList()
        for _ in range(self.depth):
            block = nn.Module()
            block.norm1, block.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            if attention in ("packed", "relative", "relative_sdpa"):
                block.qkv = nn.Linear(d, 3 * d)
            elif attention == "separate":
                block.q, block.k, block.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
            else:
                block.mha = nn.MultiheadAttention(d, self.heads, batch_first=True)
            if attention != "mha":
                block.proj = nn.Linear(d, d)
            if attention.startswith("relative"):
                block.rel_table = nn.Parameter(torch.zeros(9, self.heads))  # (2·2-1)² offsets on the 2x2 grid
            block.fc1, block.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
            self.blocks.append(block)
        coords = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(2), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + 1
        self.register_buffer("rel_index", rel[..., 0] * 3 + rel[..., 1], persistent=False)
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, classes)

    @property
    def expected(self):
        per_block = {"packed": 2, "separate": 3, "mha": 2, "relative": 2, "relative_sdpa": 2}[self.attention]
        return (2 + self.depth * per_block,
                "the residual stream (patch conv, class token, position embedding, every attention output projection "
                "and fc2, tied by the residual Adds; LayerNorm carries it), per block: "
                + {"packed": "qkv (queries, keys, values are views of it)",
                   "relative": "qkv (queries, keys, values are views of it)",
                   "relative_sdpa": "qkv (queries, keys, values are views of it)",
                   "separate": "q+k (tied by q kᵀ), v",
                   "mha": "the packed in-projection (queries, keys, values are views of it)"}[self.attention]
                + " and fc1; the fc head")

    def post_init(self, x):
        """Attention weights at the scale of the Linears' He init (init_weights gives loose parameters such as
        nn.MultiheadAttention's in_proj_weight and the tokens small positive values)."""
        g = torch.Generator().manual_seed(17)
        with torch.no_grad():
            self.cls_token.copy_(torch.randn(self.cls_token.shape, generator=g))
            self.pos_embed.copy_(0.5 * torch.randn(self.pos_embed.shape, generator=g))
            for block in self.blocks:
                if self.attention.startswith("relative"):
                    block.rel_table.copy_(torch.randn(block.rel_table.shape, generator=g))
                if self.attention == "mha":
                    w = block.mha.in_proj_weight
                    w.copy_(torch.randn(w.shape, generator=g) * (2.0 / w.shape[1]) ** 0.5)
                    block.mha.in_proj_bias.copy_(torch.rand(w.shape[0], generator=g) * 0.2)

    def _attend(self, block, x):
        n, t, d = x.shape
        h = self.heads
        if self.attention == "mha":
            return block.mha(x, x, x, need_weights=False)[0]
        if self.attention == "packed":
            q, k, v = block.qkv(x).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
            o = nn.functional.scaled_dot_product_attention(q, k, v)
        elif self.attention == "relative":
            q, k, v = block.qkv(x).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
            bias = block.rel_table[self.rel_index.flatten()].view(t, t, h).permute(2, 0, 1).unsqueeze(0)
            o = torch.softmax(q * (d // h) ** -0.5 @ k.transpose(-2, -1) + bias, dim=-1) @ v
        elif self.attention == "relative_sdpa":  # the bias as scaled_dot_product_attention's float mask
            q, k, v = block.qkv(x).reshape(n, t, 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
            # (H, T, T): with a leading axis of 1, torch 2.13's export cannot view the output as (N, T, D)
            bias = block.rel_table[self.rel_index.flatten()].view(t, t, h).permute(2, 0, 1)
            o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            q, k, v = (lin(x).view(n, t, h, d // h).transpose(1, 2) for lin in (block.q, block.k, block.v))
            o = torch.softmax(q @ k.transpose(-2, -1) / (d // h) ** 0.5, dim=-1) @ v
        return block.proj(o.transpose(1, 2).reshape(n, t, d))

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        if self.attention.startswith("relative"):
            x = x + self.pos_embed[:, 1:]
        else:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = x + self._attend(block, block.norm1(x))
            x = x + block.fc2(nn.functional.gelu(block.fc1(block.norm2(x))))
        x = self.norm(x)
        return self.fc(x.mean(dim=1) if self.attention.startswith("relative") else x[:, 0])

    def spaces(self):
        d, h = self.dim, self.heads
        stream = [("patch.weight", 0), ("patch.bias", 0), ("cls_token", 2), ("pos_embed", 2), ("norm.weight", 0),
                  ("norm.bias", 0), ("fc.weight", 1)]
        out = {}
        for i in range(self.depth):
            b = f"blocks.{i}"
            stream += [(f"{b}.{n}.{p}", 0) for n in ("norm1", "norm2") for p in ("weight", "bias")]
            stream += [(f"{b}.fc1.weight", 1), (f"{b}.fc2.weight", 0), (f"{b}.fc2.bias", 0)]
            if self.attention == "mha":
                stream += [(f"{b}.mha.in_proj_weight", 1), (f"{b}.mha.out_proj.weight", 0),
                           (f"{b}.mha.out_proj.bias", 0)]
            else:
                stream += [(f"{b}.proj.weight", 0), (f"{b}.proj.bias", 0)]
                stream += [(f"{b}.{n}.weight", 1) for n in (("qkv",) if self.attention in ("packed", "relative", "relative_sdpa") else "qkv")]
            out[f"{b}.fc1"] = (2 * d, 1, conv_out(f"{b}.fc1") + conv_in(f"{b}.fc2"))
        out["stream"] = (d, 1, stream)
        return out

    def permute_heads(self, state, rng):
        """Queries and keys of each head permuted by one permutation, values (and the output projection's input)
        by another, every head in its place: B computes A's attention exactly."""
        d, h = self.dim, self.heads
        for i in range(self.depth):
            b = f"blocks.{i}"
            pqk = torch.as_tensor(_perm(d, h, rng, swap_groups=False))
            pv = torch.as_tensor(_perm(d, h, rng, swap_groups=False))
            if self.attention == "separate":
                for n, p in (("q", pqk), ("k", pqk), ("v", pv)):
                    for param in ("weight", "bias"):
                        state[f"{b}.{n}.{param}"] = state[f"{b}.{n}.{param}"].index_select(0, p)
                state[f"{b}.proj.weight"] = state[f"{b}.proj.weight"].index_select(1, pv)
                continue
            rows = torch.cat([pqk, d + pqk, 2 * d + pv])
            pre, proj = (f"{b}.mha.in_proj_", f"{b}.mha.out_proj") if self.attention == "mha" else \
                (f"{b}.qkv.", f"{b}.proj")
            for param in ("weight", "bias"):
                state[pre + param] = state[pre + param].index_select(0, rows)
            state[f"{proj}.weight"] = state[f"{proj}.weight"].index_select(1, pv)


class TinyBert(models_torch.Bert):
    """BERT-like encoder (tools/models_torch.py `Bert`) on int64 token ids (N, 6), vocabulary 50: word + position
    (0..5 of 8) + token-type (all 0) embeddings summed, the embeddings' norm, `depth` post-norm blocks (separate q, k,
    v Linears of 2 heads of 8, scaled_dot_product_attention, output projection, residual Add, norm; MLP 16-32-16 with
    GELU, residual Add, norm), the first token (pool "cls") or the mean over tokens (pool "mean"), linear head.
    `norm` "layer": nn.LayerNorm; "rms": RMSNorm written out (x * rsqrt(mean(x²) + eps) * weight)."""

    input_shape = (6,)
    vocab, dim, heads, depth = 50, 16, 2, 2

    def __init__(self, classes=5, pool="cls", norm="layer"):
        super().__init__(classes, vocab=self.vocab, max_len=8, dim=self.dim, depth=self.depth, heads=self.heads,
                         mlp_ratio=2, pool=pool, norm=norm)
        self.norm_kind = norm

    @property
    def expected(self):
        return (2 + 3 * self.depth,
                "the residual stream (word, position and token-type embedding tables, tied by the Adds that sum them; "
                "every attention output projection and fc2, tied by the residual Adds; the norms carry it), per block: "
                "q+k (tied by q kᵀ), v and fc1; the fc head")

    def post_init(self, x):
        """Embeddings of unit scale (BERT's are learned to about that; init_weights gives loose parameters small
        positive values), norm weights as init_weights gives LayerNorm's."""
        g = torch.Generator().manual_seed(19)
        with torch.no_grad():
            for emb in (self.word, self.position, self.token_type):
                emb.weight.copy_(torch.randn(emb.weight.shape, generator=g))
            for m in self.modules():
                if isinstance(m, models_torch.RMSNorm):
                    m.weight.copy_(0.6 + 0.8 * torch.rand(m.weight.shape, generator=g))

    def _norm_members(self, name):
        return [(f"{name}.weight", 0)] + ([(f"{name}.bias", 0)] if self.norm_kind == "layer" else [])

    def spaces(self):
        d = self.dim
        stream = [("word.weight", 1), ("position.weight", 1), ("token_type.weight", 1), ("head.weight", 1)]
        stream += self._norm_members("norm")
        out = {}
        for i in range(self.depth):
            b = f"blocks.{i}"
            stream += self._norm_members(f"{b}.norm1") + self._norm_members(f"{b}.norm2")
            stream += [(f"{b}.{n}.weight", 1) for n in ("q", "k", "v", "fc1")]
            stream += conv_out(f"{b}.proj") + conv_out(f"{b}.fc2")
            out[f"{b}.fc1"] = (2 * d, 1, conv_out(f"{b}.fc1") + conv_in(f"{b}.fc2"))
        out["stream"] = (d, 1, stream)
        return out

    def permute_heads(self, state, rng):
        """Queries and keys of each head permuted by one permutation, values (and the output projection's input)
        by another, every head in its place."""
        d, h = self.dim, self.heads
        for i in range(self.depth):
            b = f"blocks.{i}"
            pqk = torch.as_tensor(_perm(d, h, rng, swap_groups=False))
            pv = torch.as_tensor(_perm(d, h, rng, swap_groups=False))
            for n, p in (("q", pqk), ("k", pqk), ("v", pv)):
                for param in ("weight", "bias"):
                    state[f"{b}.{n}.{param}"] = state[f"{b}.{n}.{param}"].index_select(0, p)
            state[f"{b}.proj.weight"] = state[f"{b}.proj.weight"].index_select(1, pv)


def rotate_half(x):
    """Hugging Face's rotate_half: cat(-x[..., d/2:], x[..., :d/2])."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def repeat_kv(x, copies):
    """Hugging Face's repeat_kv: (N, kvH, T, d) -> (N, kvH·copies, T, d), each head repeated `copies` times in a
    row (Unsqueeze, Expand, Reshape in both exports)."""
    if copies == 1:
        return x
    n, kv_heads, t, d = x.shape
    return x[:, :, None, :, :].expand(n, kv_heads, copies, t, d).reshape(n, kv_heads * copies, t, d)


class LlamaBlock(nn.Module):
    def __init__(self, dim, heads, hidden, kv_heads=None):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        kv_dim = dim // heads * self.kv_heads
        self.norm1, self.norm2 = models_torch.RMSNorm(dim), models_torch.RMSNorm(dim)
        self.q, self.o = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.k, self.v = nn.Linear(dim, kv_dim, bias=False), nn.Linear(dim, kv_dim, bias=False)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x, cos, sin, mask):
        n, t, dim = x.shape
        d = dim // self.heads
        h = self.norm1(x)
        q = self.q(h).view(n, t, self.heads, d).transpose(1, 2)
        k, v = (f(h).view(n, t, self.kv_heads, d).transpose(1, 2) for f in (self.k, self.v))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = repeat_kv(k, self.heads // self.kv_heads), repeat_kv(v, self.heads // self.kv_heads)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d) + mask
        a = torch.softmax(scores, dim=-1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(n, t, dim))
        h = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    """Llama-like decoder on int64 token ids (N, 6), vocabulary 50: word embedding, `depth` pre-norm blocks (RMSNorm
    written out; q, k, v Linears without bias, 2 heads of 8; rotary position embeddings as Hugging Face writes them,
    q·cos + rotate_half(q)·sin with cos and sin computed from the positions 0..T-1; causal mask added to the scores;
    softmax attention written out; output projection; SwiGLU MLP 16-32-16: down(silu(gate(h)) · up(h))), final
    RMSNorm, the mean over tokens, linear head."""

    input_shape = (6,)
    vocab, dim, heads, depth, hidden = 50, 16, 2, 2, 32
    kv_heads = None  # as many as `heads`

    def __init__(self, classes=5):
        super().__init__()
        self.word = nn.Embedding(self.vocab, self.dim)
        self.blocks = nn.ModuleList(LlamaBlock(self.dim, self.heads, self.hidden, self.kv_heads)
                                    for _ in range(self.depth))
        self.norm = models_torch.RMSNorm(self.dim)
        self.head = nn.Linear(self.dim, classes)
        d = self.dim // self.heads
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)))

    @property
    def expected(self):
        return (2 + 3 * self.depth,
                "the residual stream (the embedding table, every o and down, tied by the residual Adds; the RMSNorms "
                "carry it), per block: q+k (tied by q kᵀ, every feature pinned in place by the rotary embedding), v, "
                "gate+up (tied by the Mul); the linear head")

    def post_init(self, x):
        g = torch.Generator().manual_seed(19)
        with torch.no_grad():
            self.word.weight.copy_(torch.randn(self.word.weight.shape, generator=g))
            for m in self.modules():
                if isinstance(m, models_torch.RMSNorm):
                    m.weight.copy_(0.6 + 0.8 * torch.rand(m.weight.shape, generator=g))

    def forward(self, ids):
        t = ids.shape[1]
        positions = torch.arange(t, device=ids.device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        mask = torch.triu(torch.full((t, t), -1e4), diagonal=1)
        x = self.word(ids)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.head(self.norm(x).mean(dim=1))

    def spaces(self):
        stream = [("word.weight", 1), ("norm.weight", 0), ("head.weight", 1)]
        out = {}
        for i in range(self.depth):
            b = f"blocks.{i}"
            stream += [(f"{b}.norm1.weight", 0), (f"{b}.norm2.weight", 0), (f"{b}.o.weight", 0),
                       (f"{b}.down.weight", 0)] + [(f"{b}.{n}.weight", 1) for n in ("q", "k", "v", "gate", "up")]
            out[f"{b}.mlp"] = (self.hidden, 1, [(f"{b}.gate.weight", 0), (f"{b}.up.weight", 0),
                                                (f"{b}.down.weight", 1)])
            # values and the output projection's input: permuted inside each head, heads in place (queries and keys
            # stay as they are: the rotary embedding pins their features)
            out[f"{b}.values"] = (self.dim, self.heads, [(f"{b}.v.weight", 0), (f"{b}.o.weight", 1)], "in place")
        out["stream"] = (self.dim, 1, stream)
        return out


class TinyLlamaGQA(TinyLlama):
    """TinyLlama with grouped-query attention: 4 query heads of 4 over 2 key/value heads, each key and value head
    repeated over its group of 2 query heads as Hugging Face's repeat_kv does it (Unsqueeze, Expand, Reshape)."""

    heads, kv_heads = 4, 2

    @property
    def expected(self):
        return (2 + 4 * self.depth,
                "the residual stream (the embedding table, every o and down, tied by the residual Adds; the RMSNorms "
                "carry it), per block: q and k (each with every feature pinned in place by the rotary embedding, not "
                "tied: the keys are fewer, repeated over the query heads), v, gate+up (tied by the Mul); the linear "
                "head")

    def spaces(self):
        out = super().spaces()
        for i in range(self.depth):  # the values have another width than the output projection's input
            del out[f"blocks.{i}.values"]
        return out

    def permute_heads(self, state, rng):
        """Inside every key/value head, the values with the output projection's input of each query head of its
        group; heads in place (queries and keys stay: the rotary embedding pins them)."""
        d, copies = self.dim // self.heads, self.heads // self.kv_heads
        for i in range(self.depth):
            b = f"blocks.{i}"
            p = [torch.as_tensor(rng.permutation(d)) for _ in range(self.kv_heads)]
            v = state[f"{b}.v.weight"]
            state[f"{b}.v.weight"] = torch.cat([v[g * d:(g + 1) * d].index_select(0, p[g])
                                                for g in range(self.kv_heads)])
            o = state[f"{b}.o.weight"]
            state[f"{b}.o.weight"] = torch.cat([o[:, h * d:(h + 1) * d].index_select(1, p[h // copies])
                                                for h in range(self.heads)], dim=1)


class TinyLlamaMQA(TinyLlamaGQA):
    """TinyLlama with multi-query attention: 4 query heads of 4 over one key/value head, repeated over all of them as
    Hugging Face's repeat_kv does it (its head axis has size 1)."""

    kv_heads = 1


# grouped-query and multi-query Llama fixtures: (architecture, what the twin permutes in the attention)
_GROUPED_LLAMA_NOTES = {
    "gqa": ("Llama-like decoder with grouped-query attention (4 query heads over 2 key/value heads): each key and "
            "value head repeated over its group of query heads as Hugging Face's repeat_kv writes it (Unsqueeze, "
            "Expand to (N, kvH, 2, T, d), Reshape to (N, H, T, d))",
            "inside every key/value head the values with the output projection's input of each query head of its "
            "group"),
    "mqa": ("Llama-like decoder with multi-query attention (4 query heads over one key/value head, its head axis of "
            "size 1): the key/value head repeated over the query heads as Hugging Face's repeat_kv writes it "
            "(Unsqueeze, Expand to (N, 1, 4, T, d), Reshape to (N, 4, T, d))",
            "the values with the output projection's input of every query head alike"),
}


def random_inputs(cls, n: int, seed: int) -> np.ndarray:
    """n random inputs for architecture `cls`: token ids below cls.vocab (int64) for a model that reads them,
    standard normal float32 otherwise."""
    rng = np.random.RandomState(seed)
    if getattr(cls, "vocab", None):
        return rng.randint(0, cls.vocab, (n, *cls.input_shape)).astype(np.int64)
    return rng.randn(n, *cls.input_shape).astype(np.float32)


def torch_twin(model: nn.Module, rng: np.random.RandomState) -> nn.Module:
    twin, perms = permuted_twin(model, model.spaces(), rng)
    if isinstance(model, ConcatCNN):
        # conv2 reads cat([conv0, conv1a, conv1b]): permute its input channels slice by slice
        sd = twin.state_dict()
        idx = torch.cat([perms["conv0"], 8 + perms["conv1a"], 12 + perms["conv1b"]])
        sd["conv2.weight"] = sd["conv2.weight"].index_select(1, idx)
        twin.load_state_dict(sd)
    if isinstance(model, ShuffleCNN):
        # chunk keeps conv0's halves (its permutation keeps each half in place); pw1 reads the second half; fc
        # reads the shuffled cat(x1, x2'): B's cat channel c is A's r[c], B's shuffled channel j is A's q[j]
        sd = twin.state_dict()
        p0, p2 = perms["conv0"].numpy(), perms["pw2"].numpy()
        sd["pw1.weight"] = sd["pw1.weight"].index_select(1, torch.as_tensor(p0[8:] - 8))
        order = np.array([g * 8 + k for k in range(8) for g in range(2)])  # shuffled j = cat[order[j]]
        r = np.concatenate([p0[:8], 8 + p2])
        q = np.argsort(order)[r[order]]
        sd["fc.weight"] = sd["fc.weight"].index_select(1, torch.as_tensor(q))
        twin.load_state_dict(sd)
    if isinstance(model, (TinyViT, TinyBert, TinyLlamaGQA)):
        sd = twin.state_dict()
        model.permute_heads(sd, rng)
        twin.load_state_dict(sd)
    if isinstance(model, GroupedCNN) and model.swap_groups:
        sd = twin.state_dict()
        model.permute_groups(sd, rng)
        twin.load_state_dict(sd)
    elif isinstance(model, GroupedCNN):
        # gconv's output group g reads conv1's block g only: permute each group's inputs by its block's
        # permutation (conv1's keeps every block in place)
        sd = twin.state_dict()
        g, size = GroupedCNN.groups, GroupedCNN.width // GroupedCNN.groups
        p = perms["conv1"]
        w = sd["gconv.weight"]
        sd["gconv.weight"] = torch.cat([w[k * size:(k + 1) * size].index_select(1, p[k * size:(k + 1) * size] - k * size)
                                        for k in range(g)])
        twin.load_state_dict(sd)
    return twin.eval()


# ---------------------------------------------------------------------------------------------------------------
# Exporting and checking
# ---------------------------------------------------------------------------------------------------------------

def export_torch(model: nn.Module, path: str, how: str) -> None:
    x = torch.from_numpy(random_inputs(model, 2, 0)) if getattr(model, "vocab", None) else \
        torch.randn(2, *model.input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how.startswith("dynamo"):  # "dynamo23": at opset 23, where it writes the fused Attention op
            opset = {"opset_version": int(how[6:])} if how[6:] else {}
            prog = torch.onnx.export(model, (x,), dynamo=True, external_data=False, **opset,
                                     dynamic_shapes=({0: torch.export.Dim("N", min=1, max=4096)},), verbose=False)
            prog.save(path, external_data=False)
        else:
            kw = {"training": torch.onnx.TrainingMode.PRESERVE} if how == "ts_bn_kept" else {}
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=TS_OPSET, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, **kw)


def run(path, x: dict):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, x)))


def as_array(v):
    """onnxruntime output -> numpy (ZipMap's list of {class: probability} dicts -> (N, classes))."""
    if isinstance(v, list) and v and isinstance(v[0], dict):
        keys = sorted(v[0])
        return np.array([[d[k] for k in keys] for d in v], dtype=np.float32)
    return np.asarray(v)


def _dims(vi):
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
            for d in vi.type.tensor_type.shape.dim] if vi.type.HasField(
        "tensor_type") else str(vi.type).replace("\n", " ")


def describe(path: str) -> dict:
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    init = {t.name for t in m.graph.initializer}
    ops = Counter((n.domain + "." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in m.graph.node)
    return {"opset": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
            "ir_version": m.ir_version,
            "producer": f"{m.producer_name} {m.producer_version}".strip(),
            "op_types": dict(sorted(ops.items())),
            "inputs": [{"name": i.name, "shape": _dims(i), "elem_type": onnx.TensorProto.DataType.Name(
                i.type.tensor_type.elem_type)} for i in m.graph.input if i.name not in init],
            "outputs": [{"name": o.name, "shape": _dims(o)} for o in m.graph.output],
            "bytes": os.path.getsize(path)}


def check_twin(a_path, b_path, input_name, shape, seed=123, twin=True, vocab=None) -> dict:
    rng = np.random.RandomState(seed)
    x = {input_name: rng.randint(0, vocab, (64, *shape)).astype(np.int64) if vocab else
         rng.randn(64, *shape).astype(np.float32)}
    ya, yb = run(a_path, x), run(b_path, x)
    result = {}
    for k in ya:
        va, vb = as_array(ya[k]), as_array(yb[k])
        if twin:
            if va.dtype.kind == "f":
                err = float(np.abs(va - vb).max())
                assert err <= CHECK_ATOL, f"{a_path}: twin output {k} differs by {err:.3g}"
                result[k] = {"max_abs_diff": err, "scale": float(np.abs(va).max())}
            else:
                assert np.array_equal(va, vb), f"{a_path}: twin output {k} differs"
                result[k] = {"equal": True, "distinct_values": int(len(np.unique(va)))}
        else:
            result[k] = {"shape_a": list(va.shape), "shape_b": list(vb.shape)}
    return result


def check_relus_live(model: nn.Module, shape):
    """Every ReLU output channel varies on random inputs (a dead unit has nothing to be matched by)."""
    if getattr(model, "vocab", None):
        return  # token ids in, no ReLU
    acts = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: acts.append((_m, o))) for m in model.modules()
             if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        x = torch.from_numpy(np.random.RandomState(7).randn(256, *shape).astype(np.float32))
        model(x)
    for h in hooks:
        h.remove()
    for m, o in acts:
        if isinstance(model, NHWCNet):
            o = o.movedim(-1, 1)
        dims = [0] + list(range(2, o.dim()))
        std = o.std(dim=dims)
        assert float(std.min()) > 1e-3, f"{type(model).__name__}: a ReLU channel is dead (std {std.min():.3g})"


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------

def torch_fixture(out, name, cls, how, seed, note="", **kw):
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    a = init_weights(cls(**kw), seed)
    if hasattr(a, "post_init"):
        a.post_init(torch.from_numpy(random_inputs(cls, 256, seed)))
    check_relus_live(a, cls.input_shape)
    b = torch_twin(a, np.random.RandomState(seed + 1000))
    x = torch.from_numpy(random_inputs(cls, 8, seed)) if getattr(cls, "vocab", None) else torch.randn(8, *cls.input_shape)
    sa, sb = a.state_dict(), b.state_dict()
    members = {p for _, _, ms, *_ in a.spaces().values() for p, _ in ms}
    unchanged = [p for p in members if torch.equal(sa[p], sb[p])]
    assert not unchanged, f"{name}: the twin left {unchanged} as they were"
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5), f"{name}: the torch twin does not compute A"
    pa, pb = os.path.join(folder, "a.onnx"), os.path.join(folder, "b.onnx")
    export_torch(a, pa, how)
    export_torch(b, pb, how)
    info = describe(pa)
    vocab = getattr(cls, "vocab", None)
    check = check_twin(pa, pb, info["inputs"][0]["name"], cls.input_shape, vocab=vocab)
    n, how_counted = a.expected
    return {"exporter": {"ts": "torch.onnx TorchScript (dynamo=False, eval: BN folded)",
                         "ts_bn_kept": "torch.onnx TorchScript (dynamo=False, training=PRESERVE: BN kept)",
                         "dynamo": "torch.onnx dynamo=True (torch.export + onnxscript, optimize=True)",
                         "dynamo23": "torch.onnx dynamo=True, opset_version=23 (torch.export + onnxscript, "
                                     "optimize=True)"}[how],
            "torch": torch.__version__, "architecture": cls.__name__, "architecture_doc": " ".join(cls.__doc__.split()),
            "twin": True, "seed": seed, "input_shape": [None, *cls.input_shape],
            **({"input_high": vocab} if vocab else {}),
            "expected_spaces": n, "spaces_counted": how_counted,
            "permuted_hidden_spaces": {k: v[0] for k, v in b.spaces().items()} if hasattr(b, "spaces") else {},
            "notes": note, **info, "generation_check": check}


def heads_fixture(out, name="heads_5_7"):
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    a = init_weights(ResCNN(classes=5), 40)
    b = init_weights(ResCNN(classes=7), 42)
    check_relus_live(a, ResCNN.input_shape)
    check_relus_live(b, ResCNN.input_shape)
    pa, pb = os.path.join(folder, "a.onnx"), os.path.join(folder, "b.onnx")
    export_torch(a, pa, "ts")
    export_torch(b, pb, "ts")
    info = describe(pa)
    info_b = describe(pb)
    check = check_twin(pa, pb, "input", ResCNN.input_shape, twin=False)
    assert check["logits"]["shape_a"][1] == 5 and check["logits"]["shape_b"][1] == 7
    n, how_counted = ResCNN.expected
    return {"exporter": "torch.onnx TorchScript (dynamo=False, eval: BN folded)", "torch": torch.__version__,
            "architecture": "ResCNN", "twin": False, "classes": [5, 7], "seed": [40, 42],
            "input_shape": [None, *ResCNN.input_shape], "expected_spaces": n, "spaces_counted": how_counted,
            "notes": "NOT a twin: independent random weights, A has 5 classes and B 7 (same trunk).",
            **info, "outputs_b": info_b["outputs"], "generation_check": check}


def sklearn_fixture(out, name, zipmap: bool, seed=3):
    import sklearn
    import skl2onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    features, classes = 6, 3
    X = rng.randn(300, features).astype(np.float32)
    y = (X[:, :3].argmax(1) + (X[:, 3] > 1.0)) % classes  # learnable-ish, all classes present
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(hidden_layer_sizes=(8, 8), max_iter=200, random_state=seed).fit(X, y)
    # every hidden unit alive on random inputs
    h = X
    for W, c in zip(clf.coefs_[:-1], clf.intercepts_[:-1]):
        h = np.maximum(h @ W + c, 0)
        assert (h.std(0) > 1e-3).all(), "a dead hidden unit in the sklearn MLP; choose another seed"
    twin = copy.deepcopy(clf)
    perm_rng = np.random.RandomState(seed + 1000)
    for layer in range(len(clf.coefs_) - 1):  # hidden layers only; classes stay
        p = perm_rng.permutation(twin.coefs_[layer].shape[1])
        twin.coefs_[layer] = twin.coefs_[layer][:, p]
        twin.intercepts_[layer] = twin.intercepts_[layer][p]
        twin.coefs_[layer + 1] = twin.coefs_[layer + 1][p, :]
    assert (clf.predict_proba(X) - twin.predict_proba(X)).max() < 1e-6

    pa, pb = os.path.join(folder, "a.onnx"), os.path.join(folder, "b.onnx")
    for model, path in ((clf, pa), (twin, pb)):
        options = {id(model): {"zipmap": False}} if not zipmap else None
        onx = convert_sklearn(model, name=name, initial_types=[("input", FloatTensorType([None, features]))],
                              target_opset={"": TS_OPSET, "ai.onnx.ml": 3}, options=options)
        onnx.save(onx, path)
    info = describe(pa)
    check = check_twin(pa, pb, "input", (features,))
    return {"exporter": f"skl2onnx {skl2onnx.__version__} (scikit-learn {sklearn.__version__} MLPClassifier)"
                        + (" with ZipMap (default)" if zipmap else " options zipmap=False"),
            "architecture": "MLPClassifier(hidden_layer_sizes=(8, 8), relu), 6 features, 3 classes",
            "twin": True, "seed": seed, "input_shape": [None, features],
            "expected_spaces": 3, "spaces_counted": "hidden layer 1, hidden layer 2, output layer (head: MatMul+Add "
                                                    "before Softmax)",
            "permuted_hidden_spaces": {"hidden1": 8, "hidden2": 8},
            "notes": "outputs: 'label' (int64, via ArgMax + ArrayFeatureExtractor on the class list) and "
                     "'probabilities' (" + ("a sequence of maps int64 -> float from ZipMap" if zipmap else
                                            "float tensor (N, 3)") + "); the twin check compares both. target_opset "
                     "{'': 17, 'ai.onnx.ml': 3} was asked for; skl2onnx writes the lowest opsets the graph needs "
                     "(ai.onnx 16, ai.onnx.ml 1). The graph starts with Cast(input, to=FLOAT).",
            **info, "generation_check": check}


FIXTURES = {
    "ts_folded": lambda out: torch_fixture(out, "ts_folded", ResCNN, "ts", 1,
                                           "TorchScript folds eval-mode BatchNorm into the Conv weights."),
    "ts_bn_kept": lambda out: torch_fixture(out, "ts_bn_kept", ResCNN, "ts_bn_kept", 1,
                                            "Same weights as ts_folded; BatchNormalization nodes kept."),
    "dynamo": lambda out: torch_fixture(out, "dynamo", ResCNN, "dynamo", 1,
                                        "Same weights as ts_folded. torch 2.13's dynamo exporter (optimize=True) "
                                        "writes opset 20, folds the eval BatchNorms into the Convs too (no "
                                        "BatchNormalization node), pools with ReduceMean(axes [-1, -2] as an "
                                        "initializer, keepdims) + Reshape instead of GlobalAveragePool + Flatten, "
                                        "names the input after the forward argument ('x') and the output after "
                                        "the last op ('linear'), tensors 'getitem_3', 'relu_1', nodes "
                                        "'node_Conv_34'."),
    "dynamo_mlp3d": lambda out: torch_fixture(out, "dynamo_mlp3d", TokenMLP, "dynamo", 2,
                                              "nn.Linear on a 3-D (N, T, C) input: MatMul + Add, then a mean over "
                                              "the token axis (ReduceMean axis 1, not the channel axis)."),
    "sklearn_mlp": lambda out: sklearn_fixture(out, "sklearn_mlp", zipmap=False),
    "sklearn_mlp_zipmap": lambda out: sklearn_fixture(out, "sklearn_mlp_zipmap", zipmap=True),
    "nhwc": lambda out: torch_fixture(out, "nhwc", NHWCNet, "ts", 3,
                                      "Input (N, H, W, C); Transpose -> Conv -> Transpose -> Add(bias on the last "
                                      "axis) -> Relu per layer; ReduceMean over axes (1, 2) before the head."),
    "layernorm": lambda out: torch_fixture(out, "layernorm", LayerNormMLP, "ts", 4,
                                           "nn.LayerNorm over the channel (last) axis; opset 17 writes "
                                           "LayerNormalization."),
    "groupnorm": lambda out: torch_fixture(out, "groupnorm", GroupNormCNN, "ts", 5,
                                           "GroupNorm(num_groups=1, 8 channels) after conv1 and GroupNorm("
                                           "num_groups=8 = C, 8 channels) after conv2.", groups=(1, 8)),
    "groupnorm_grouped": lambda out: torch_fixture(
        out, "groupnorm_grouped", GroupNormCNN, "ts", 6,
        "GroupNorm(num_groups=2, 8 channels) after both convs (1 < groups < C). The twin's permutation of those "
        "spaces keeps each group of 4 channels together (groups swapped, channels permuted within each group): a "
        "free permutation would change which channels are normalised together, so B would not compute A.",
        groups=(2, 2)),
    "concat": lambda out: torch_fixture(out, "concat", ConcatCNN, "ts", 7,
                                        "Concat on axis 1 of conv0's output (DenseNet skip) and two conv branches "
                                        "(Inception), read by conv2; the twin permutes conv2's input slice by "
                                        "slice."),
    "depthwise": lambda out: torch_fixture(out, "depthwise", DepthwiseCNN, "ts", 8,
                                           "Depthwise Conv with group=8 (BN folded), then 1x1 pointwise Conv."),
    "se": lambda out: torch_fixture(out, "se", SECNN, "ts", 9,
                                    "GlobalAveragePool -> 1x1 Conv -> Relu -> 1x1 Conv -> Sigmoid -> Mul with the "
                                    "feature map."),
    "heads_5_7": heads_fixture,
    "shuffle": lambda out: torch_fixture(out, "shuffle", ShuffleCNN, "ts", 13,
                                         "TorchScript computes the shuffle's Reshape targets (Shape -> Gather -> "
                                         "Div -> Cast -> Unsqueeze -> Concat) and chunk's Slice bounds from shapes. "
                                         "The twin permutes conv0 inside each half (the halves chunk keeps), pw1 "
                                         "and pw2 freely."),
    "grouped": lambda out: torch_fixture(out, "grouped", GroupedCNN, "ts", 12,
                                         "ResNeXt bottleneck: Conv with group=4 on 16 channels (4 per group, BN "
                                         "folded). The twin permutes conv1's and gconv's channels inside each group "
                                         "of 4 (every group in its place), conv0's freely."),
    "grouped_swap": lambda out: torch_fixture(out, "grouped_swap", GroupedCNN, "ts", 14,
                                              "ResNeXt/RegNet bottleneck: Conv with group=4 on 16 channels (BN "
                                              "folded). The twin permutes conv1's and gconv's groups as wholes (one "
                                              "permutation of the 4 groups for both, so gconv's group k still reads "
                                              "conv1's block k) and the channels inside every group, conv0's "
                                              "freely: matching groups position by position cannot find it.",
                                              swap_groups=True),
    **{f"vit_{attention}_{how}": (lambda out, attention=attention, how=how: torch_fixture(
        out, f"vit_{attention}_{how}", TinyViT, how, 20 + i,
        "Transformer: " + {"packed": "packed qkv Linear, reshape (N, T, 3, H, d), permute (2, 0, 3, 1, 4), unbind, "
                                     "F.scaled_dot_product_attention",
                           "separate": "q, k, v Linears, view (N, T, H, d), transpose(1, 2), softmax(q @ k.transpose("
                                       "-2, -1) / sqrt(d)) @ v written out",
                           "mha": "nn.MultiheadAttention(batch_first=True): packed in-projection, heads merged "
                                  "with the batch axis (T, N*H, d)"}[attention]
        + {"ts": ". TorchScript computes the class token's Expand shape and the scale from shapes.",
           "dynamo": ". dynamo decomposes attention into MatMul / Softmax / MatMul, the keys reshaped (N*H, T, d), "
                     "transposed and reshaped back."}[how]
        + " The twin permutes the residual stream, each fc1, and inside every head queries with keys (one "
          "permutation) and values with the output projection's input (another), heads in place.",
        attention=attention))
      for i, (attention, how) in enumerate((a, h) for a in ("packed", "separate", "mha") for h in ("ts", "dynamo"))},
    **{f"vit_relative_{how}": (lambda out, how=how, seed=seed: torch_fixture(
        out, f"vit_relative_{how}", TinyViT, how, seed,
        "Transformer with Swin's window attention: packed qkv, softmax(q kᵀ / sqrt(d) + B) v with B a learned "
        "relative position bias per head (a table indexed by the tokens' offsets: "
        + {"ts": "TorchScript folds the lookup into a constant (1, H, T, T) added to the scores",
           "dynamo": "dynamo keeps the lookup, a Gather of the table by constant indices"}[how]
        + "). The twin permutes the residual stream, each fc1, and inside every head queries with keys and values "
          "with the output projection's input, heads (and their biases) in place.",
        attention="relative"))
      for how, seed in (("ts", 26), ("dynamo", 27))},
    **{f"vit_{attention}_dynamo23": (lambda out, attention=attention, seed=seed: torch_fixture(
        out, f"vit_{attention}_dynamo23", TinyViT, "dynamo23", seed,
        "Transformer exported by dynamo at opset 23, which writes scaled_dot_product_attention as ONNX's fused "
        "Attention op on (N, H, T, d) queries, keys and values: "
        + {"packed": "packed qkv Linear, reshape (N, T, 3, H, d), permute, unbind",
           "mha": "nn.MultiheadAttention(batch_first=True), its packed in-projection split and reshaped into heads",
           "relative_sdpa": "packed qkv; Swin's learned relative position bias per head (a table indexed by the "
                            "tokens' offsets) passed as scaled_dot_product_attention's float attn_mask, the op's "
                            "mask input (dynamo keeps the lookup, a Gather of the table)"}[attention]
        + ". The twin permutes the residual stream, each fc1, and inside every head queries with keys and values "
          "with the output projection's input, heads (and their biases) in place.",
        attention=attention))
      for attention, seed in (("packed", 28), ("mha", 29), ("relative_sdpa", 50))},
    **{f"bert_{norm}_{how}": (lambda out, norm=norm, pool=pool, how=how, i=i: torch_fixture(
        out, f"bert_{norm}_{how}", TinyBert, how, 30 + i,
        "BERT-like encoder on int64 token ids (input_high: ids are below it): word embedding Gather(table, ids), "
        + {"ts": "position embedding Gather(table, Range(0, T)) with T from the ids' shape, token-type embedding "
                 "Gather(table, ConstantOfShape(Shape(ids))); TorchScript",
           "dynamo": "position embedding folded to a constant (T is static), token-type embedding Gather(table, "
                     "Expand(0, Shape(ids))); dynamo"}[how]
        + " writes scaled_dot_product_attention as MatMul / Softmax / MatMul. Post-norm blocks; "
        + {"layer": "LayerNormalization, the first token to the head.",
           "rms": "RMSNorm written out (Pow, ReduceMean, Add, Sqrt, " + ("Div" if how == "ts" else "Reciprocal")
                  + ", Mul by the weight), the mean over tokens to the head."}[norm]
        + " The twin permutes the residual stream (every embedding table's channel axis with it), each fc1, and "
          "inside every head queries with keys and values with the output projection's input, heads in place.",
        pool=pool, norm=norm))
      for i, (norm, pool, how) in enumerate((n, p, h) for n, p in (("layer", "cls"), ("rms", "mean"))
                                            for h in ("ts", "dynamo"))},
    **{f"llama_rope_{how}": (lambda out, how=how, i=i: torch_fixture(
        out, f"llama_rope_{how}", TinyLlama, how, 40 + i,
        "Llama-like decoder on int64 token ids: rotary position embeddings (q·cos + rotate_half(q)·sin: Slice of "
        "each head's halves, Neg, Concat, Mul by cos and sin computed from the positions), causal mask, RMSNorm "
        "written out, SwiGLU MLP; "
        + {"ts": "TorchScript.", "dynamo": "dynamo."}[how]
        + " The twin permutes the residual stream (the embedding table's channel axis with it), each MLP's hidden "
          "features, and inside every head the values with the output projection's input; queries and keys stay "
          "in place (the rotary embedding pins them)."))
      for i, how in enumerate(("ts", "dynamo"))},
    **{f"llama_{kind}_{how}": (lambda out, kind=kind, cls=cls, how=how, seed=seed: torch_fixture(
        out, f"llama_{kind}_{how}", cls, how, seed, _GROUPED_LLAMA_NOTES[kind][0] + "; rotary position embeddings, "
        "causal mask, RMSNorm, SwiGLU MLP; " + {"ts": "TorchScript.", "dynamo": "dynamo."}[how]
        + " The twin permutes the residual stream, each MLP's hidden features, and " + _GROUPED_LLAMA_NOTES[kind][1]
        + "; queries and keys stay in place."))
      for kind, cls, seeds in (("gqa", TinyLlamaGQA, (51, 52)), ("mqa", TinyLlamaMQA, (53, 54)))
      for how, seed in zip(("ts", "dynamo"), seeds)},
    "preproc": lambda out: torch_fixture(out, "preproc", PreprocCNN, "ts", 10,
                                         "Sub / Div of the input by per-channel constants (1, 3, 1, 1) before "
                                         "conv1."),
}


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "data"))
    ap.add_argument("--only", nargs="*", choices=sorted(FIXTURES), help="rebuild only these (manifest updated)")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    manifest_path = os.path.join(out, "manifest.json")
    manifest = {"counting": COUNTING, "fixtures": {}}
    if args.only and os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
    chosen = args.only or list(FIXTURES)
    _require([m for kind, mods in EXTRA_REQUIRED.items() if any(kind in n for n in chosen) for m in mods])
    torch.manual_seed(0)
    for name in chosen:
        entry = FIXTURES[name](out)
        for f in ("a.onnx", "b.onnx"):
            size = os.path.getsize(os.path.join(out, name, f))
            assert size < MAX_BYTES, f"{name}/{f} is {size} bytes (limit {MAX_BYTES})"
        manifest["fixtures"][name] = entry
        ops = ", ".join(f"{k}x{v}" for k, v in entry["op_types"].items())
        print(f"{name:20s} opset {entry['opset']}  {ops}")
    manifest["fixtures"] = dict(sorted(manifest["fixtures"].items()))
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"wrote {len(manifest['fixtures'])} fixture(s) and {manifest_path}")


if __name__ == "__main__":
    main()
