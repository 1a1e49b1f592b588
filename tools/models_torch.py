"""PyTorch architectures for the Fashion-MNIST model pairs (as in the ZipIt! paper: ResNet-20 of width ×w, a VGG, an MLP;
and a small ViT), and a small BERT-like text encoder.

The image models (`ARCHS`, what tools/train_pairs.py trains) take normalised (N,1,28,28) float32 input and return
(N,num_classes) logits. `Bert` takes int64 token ids (N, T) instead; it is not in `ARCHS` (train_pairs feeds images):
tools/make_fixtures.py exports it (tests/data/bert_*).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """CIFAR ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU.

    The shortcut is a 1x1 conv + BN when stride or width changes (option B), so every residual Add sees two
    weighted producers -- the case onnxzip has to tie into one feature space.
    """

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_blocks=(3, 3, 3), width_multiplier=1, num_classes=10, in_channels=1):
        super().__init__()
        widths = [16 * width_multiplier, 32 * width_multiplier, 64 * width_multiplier]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers = []
        in_planes = widths[0]
        for stage, (planes, blocks) in enumerate(zip(widths, num_blocks)):
            for i in range(blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
            layers = []
        self.linear = nn.Linear(widths[2], num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(width_multiplier=1, num_classes=10):
    """CIFAR-style ResNet-20 (3 stages x 3 basic blocks, 16w/32w/64w channels); 28x28 -> 28/14/7 maps."""
    return ResNet((3, 3, 3), width_multiplier, num_classes)


def vgg(num_classes=10, cfg=(32, 32, "M", 64, 64, "M", 128, 128, "M"), hidden=256):
    """Small VGG: conv3x3-BN-ReLU blocks with max-pools, then flatten of the 3x3 map -> linear -> ReLU -> linear.

    Flatten (not global pooling) on purpose: the classifier's first Linear consumes each channel as 3*3 features.
    """
    layers = []
    in_channels = 1
    size = 28
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            size //= 2
        else:
            layers += [nn.Conv2d(in_channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(in_channels * size * size, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


def mlp(num_classes=10, hidden=(256, 256, 256), in_features=784):
    """MLP 784 -> 256 -> 256 -> 256 -> num_classes with ReLU; flattens its (N,1,28,28) input itself."""
    layers = [nn.Flatten()]
    prev = in_features
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU(inplace=True)]
        prev = h
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


class Attention(nn.Module):
    """Multi-head self-attention as timm writes it: one packed qkv Linear (D -> 3D), reshape (N, T, 3, heads, d),
    permute to (3, N, heads, T, d), unbind into q, k, v, F.scaled_dot_product_attention, heads back to (N, T, D),
    output projection."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Small vision transformer: patch embedding (Conv, kernel = stride = patch), learned class token concatenated
    on the token axis, learned position embedding added, pre-norm blocks, final LayerNorm, linear head on the class
    token."""

    def __init__(self, num_classes=10, patch=7, dim=64, depth=3, heads=4, mlp_ratio=2, image=28, in_channels=1):
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (N, T, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(num_classes=10):
    """ViT for 28x28: patch 7 (16 tokens + class token), dim 64, 3 blocks of 4 heads (d = 16), MLP 128."""
    return ViT(num_classes)


class RelativeAttention(nn.Module):
    """Window attention as Swin writes it: packed qkv, q scaled, q kᵀ plus a *learned relative position bias* per
    head (a table of (2g-1)² entries per head, indexed by the relative offset of two tokens of a g×g grid, as in
    torchvision's ShiftedWindowAttention), softmax, times v, output projection."""

    def __init__(self, dim, heads, grid):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + grid - 1  # (T, T, 2)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * grid - 1) + rel[..., 1],
                             persistent=False)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * (d // self.heads) ** -0.5
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()].view(t, t, -1)
        attn = (q @ k.transpose(-2, -1) + bias.permute(2, 0, 1).unsqueeze(0)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, t, d))


class SwinViT(nn.Module):
    """ViT with Swin's attention: patch embedding (Conv, kernel = stride = patch) into a g×g grid, no class token
    and no absolute position embedding, pre-norm blocks whose attention over the whole grid (one Swin window) adds
    a learned relative position bias, final LayerNorm, mean over tokens, linear head."""

    block, attention = Block, RelativeAttention

    def __init__(self, num_classes=10, patch=4, dim=64, depth=3, heads=4, mlp_ratio=2, image=28, in_channels=1):
        super().__init__()
        grid = image // patch
        self.patch = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[self.block(dim, heads, mlp_ratio) for _ in range(depth)])
        for block in self.blocks:
            block.attn = self.attention(dim, heads, grid)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (N, T, D)
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def swinvit(num_classes=10):
    """SwinViT for 28x28: patch 4 (a 7×7 grid: one Swin window of 49 tokens), dim 64, 3 blocks of 4 heads, MLP 128."""
    return SwinViT(num_classes)


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention as Llama-family code writes it: q, k, v Linears (k and v of `kv_heads` heads only),
    heads by view (N, T, H, d) + transpose, each key/value head repeated over its group of query heads (Hugging
    Face's repeat_kv: expand over a new axis, reshape into the head axis), F.scaled_dot_product_attention, output
    projection. No rotary embedding: the image tokens carry a learned position embedding."""

    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        d = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(dim, kv_heads * d), nn.Linear(dim, kv_heads * d)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, dim = x.shape
        d, copies = dim // self.heads, self.heads // self.kv_heads
        q = self.q(x).view(n, t, self.heads, d).transpose(1, 2)
        k, v = (f(x).view(n, t, self.kv_heads, d).transpose(1, 2)[:, :, None]
                .expand(n, self.kv_heads, copies, t, d).reshape(n, self.heads, t, d) for f in (self.k, self.v))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, dim))


def vitgqa(num_classes=10):
    """`vit` with grouped-query attention: 4 query heads of 16 over 2 key/value heads."""
    model = ViT(num_classes)
    for block in model.blocks:
        block.attn = GroupedQueryAttention(64, 4, 2)
    return model


class CosineAttention(nn.Module):
    """Window attention as Swin V2 writes it (torchvision's ShiftedWindowAttentionV2): packed qkv whose bias has the
    keys' part fixed at zero, cosine similarity of queries and keys (each normalised over its head's features) times
    a learned per-head logit scale exp(min(s, log 100)), plus a continuous position bias: a small MLP (2 → 64 → heads)
    of the log-spaced relative coordinates, looked up per token pair, 16·sigmoid; softmax, times v, projection."""

    def __init__(self, dim, heads, grid):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(heads, 1, 1)))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, heads, bias=False))
        offsets = torch.arange(-(grid - 1), grid, dtype=torch.float32)
        table = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1) / (grid - 1) * 8
        table = torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0
        self.register_buffer("relative_coords_table", table.reshape(-1, 2), persistent=False)
        coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + grid - 1
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * grid - 1) + rel[..., 1],
                             persistent=False)

    def forward(self, x):
        n, t, d = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(n, t, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        table = self.cpb_mlp(self.relative_coords_table)
        position = table[self.relative_position_index.flatten()].view(t, t, -1).permute(2, 0, 1)
        attn = (attn + 16 * torch.sigmoid(position).unsqueeze(0)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, t, d))


class PostNormBlock(Block):
    """Swin V2's residual post-norm block: x + LN(attn(x)), then x + LN(MLP(x))."""

    def forward(self, x):
        x = x + self.norm1(self.attn(x))
        return x + self.norm2(self.mlp(x))


class SwinV2ViT(SwinViT):
    """SwinViT with Swin V2's attention and blocks: patch embedding into a g×g grid (one window), residual post-norm
    blocks of cosine attention with a learned logit scale and a continuous position bias, final LayerNorm, mean over
    tokens, linear head."""

    block, attention = PostNormBlock, CosineAttention


def swinv2vit(num_classes=10):
    """SwinV2ViT for 28x28: patch 4 (one window of 49 tokens), dim 64, 3 blocks of 4 heads, MLP 128."""
    return SwinV2ViT(num_classes)


class RMSNorm(nn.Module):
    """RMSNorm written out as LLaMA-style code writes it: x * rsqrt(mean(x²) + eps) * weight (no mean subtracted, no
    bias). Exported as Pow / ReduceMean / Add / Sqrt / Reciprocal (or Div) / Mul."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(kind, dim):
    return {"layer": lambda: nn.LayerNorm(dim), "rms": lambda: RMSNorm(dim), "torch_rms": lambda: nn.RMSNorm(dim)}[kind]()


class BertLayer(nn.Module):
    """Post-norm encoder block as BERT writes it: x = LN(x + proj(attn(q, k, v))), then x = LN(x + fc2(GELU(fc1(x)))).
    Separate q, k, v Linears, heads by view (N, T, H, d) + transpose, F.scaled_dot_product_attention."""

    def __init__(self, dim, heads, mlp_ratio, norm="layer"):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1, self.norm2 = _norm(norm, dim), _norm(norm, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = (lin(x).view(n, t, self.heads, d // self.heads).transpose(1, 2) for lin in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        x = self.norm1(x + self.proj(o))
        return self.norm2(x + self.fc2(F.gelu(self.fc1(x))))


class Bert(nn.Module):
    """Small BERT-like encoder: int64 token ids (N, T) -> word embedding + position embedding (of positions 0..T-1) +
    token-type embedding (type 0 for every token: BERT's default without token_type_ids), LayerNorm (the embeddings'
    norm), `depth` post-norm blocks (`BertLayer`), then the first token (pool "cls") or the mean over tokens (pool
    "mean"), linear head. `norm`: "layer" (nn.LayerNorm everywhere) or "rms" (`RMSNorm` written out) or
    "torch_rms" (nn.RMSNorm)."""

    def __init__(self, num_classes=10, vocab=1000, max_len=64, dim=64, depth=2, heads=4, mlp_ratio=2, type_vocab=2,
                 pool="cls", norm="layer"):
        super().__init__()
        self.pool = pool
        self.word = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        self.token_type = nn.Embedding(type_vocab, dim)
        self.norm = _norm(norm, dim)
        self.blocks = nn.Sequential(*[BertLayer(dim, heads, mlp_ratio, norm) for _ in range(depth)])
        self.head = nn.Linear(dim, num_classes)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word(ids) + self.position(positions) + self.token_type(torch.zeros_like(ids))
        x = self.blocks(self.norm(x))
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(dim=1))


def bert(num_classes=10, **kw):
    """BERT-like encoder of dim 64, 2 blocks of 4 heads, vocabulary 1000, up to 64 tokens."""
    return Bert(num_classes, **kw)


ARCHS = {
    "resnet20": lambda num_classes: resnet20(1, num_classes),
    "resnet20x2": lambda num_classes: resnet20(2, num_classes),
    "vgg": vgg,
    "mlp": mlp,
    "vit": vit,
    "vitgqa": vitgqa,
    "swinvit": swinvit,
    "swinv2vit": swinv2vit,
}


def build(arch, num_classes):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[arch](num_classes)


def num_parameters(model):
    return sum(p.numel() for p in model.parameters())
