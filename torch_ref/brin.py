"""BRIN in PyTorch: the twin of jaxcell.models.brin, same class and attribute names, same
constructor arguments. The wiring, the parts and the presets are described there."""

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxcell.twins import BRIN_PRESETS, brin_config  # plain Python: no jax
from torch_ref.preprocessing import clahe_rgb_float, resize



def avg_pool_ceil(x: torch.Tensor, r: int) -> torch.Tensor:
    """Average over r x r windows, stride r, ceil(n / r) outputs per axis; a window cut by the
    border averages only its real pixels. Twin: jaxcell.models.brin.avg_pool_ceil."""
    b, c, h, w = x.shape
    ho, wo = -(-h // r), -(-w // r)
    xp = F.pad(x, (0, wo * r - w, 0, ho * r - h))
    s = xp.reshape(b, c, ho, r, wo, r).sum((3, 5))
    rows = torch.clamp(h - torch.arange(ho) * r, max=r)
    cols = torch.clamp(w - torch.arange(wo) * r, max=r)
    return s / (rows[:, None] * cols[None, :]).to(x.dtype)


def max_pool_ceil2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pool, stride 2, ceil(n / 2) outputs: an odd last row/column is kept, not dropped."""
    h, w = x.shape[2:]
    return F.max_pool2d(F.pad(x, (0, w % 2, 0, h % 2), value=float("-inf")), 2)


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm -> optional ReLU."""

    def __init__(self, in_channels: int, features: int, kernel: int = 3, stride: int = 1, dilation: int = 1,
                 groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, features, kernel, stride, padding=dilation * (kernel - 1) // 2,
                              dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return torch.relu(x) if self.act else x


# ----------------------------------------------------------------------------- 1. input

class AdaptiveNormalization(nn.Module):
    """Deep Adaptive Input Normalization (Passalis et al. 2019); see the flax twin."""

    def __init__(self, channels: int = 3, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.shift_fc = nn.Linear(channels, channels, bias=False)
        self.scale_fc = nn.Linear(channels, channels, bias=False)
        self.gate_fc = nn.Linear(channels, channels)
        with torch.no_grad():
            self.shift_fc.weight.copy_(torch.eye(channels))
            self.scale_fc.weight.copy_(torch.eye(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - self.shift_fc(x.mean((2, 3)))[:, :, None, None]
        scale = self.scale_fc(torch.sqrt(torch.square(x).mean((2, 3)) + self.eps))
        scale = torch.where(scale <= self.eps, torch.ones_like(scale), scale)
        x = x / scale[:, :, None, None]
        return x * torch.sigmoid(self.gate_fc(x.mean((2, 3))))[:, :, None, None]


class InputProcessing(nn.Module):
    """Part 1: adaptive normalization and CLAHE of the [0, 1] image, concat, 1x1 conv -> 3 ch."""

    def __init__(self, clahe_clip: float = 2.0, clahe_grid: int = 8):
        super().__init__()
        self.clahe_clip, self.clahe_grid = clahe_clip, clahe_grid
        self.adaptive = AdaptiveNormalization(3)
        self.fuse = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.adaptive(x)
        c = clahe_rgb_float(x, self.clahe_clip, (self.clahe_grid, self.clahe_grid))
        return self.fuse(torch.cat([a, c], 1))


# ----------------------------------------------------------------------------- 2. stem

class DualPathStem(nn.Module):
    """Part 2: 3x3 path and dilated 3x3 path, both stride 2; concat, 1x1, max pool: /4."""

    def __init__(self, width: int, in_channels: int = 3):
        super().__init__()
        half = width // 2
        self.a1 = ConvBN(in_channels, half, 3, stride=2)
        self.a2 = ConvBN(half, half, 3)
        self.b1 = ConvBN(in_channels, half, 3, stride=2, dilation=2)
        self.b2 = ConvBN(half, half, 3, dilation=2)
        self.fuse = ConvBN(2 * half, width, 1)
        self.pool = nn.MaxPool2d(3, 2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a2(self.a1(x))
        b = self.b2(self.b1(x))
        return self.pool(self.fuse(torch.cat([a, b], 1)))


# ----------------------------------------------------------------------------- 3. blocks

class BiForkedBlock(nn.Module):
    """Part 3: relu(residual fork + efficient fork + shortcut)."""

    def __init__(self, in_channels: int, features: int, stride: int = 1, groups: int = 8):
        super().__init__()
        mid = features // 2
        self.res1 = ConvBN(in_channels, features, 3, stride=stride)
        self.res2 = ConvBN(features, features, 3, act=False)
        self.eff1 = ConvBN(in_channels, mid, 1)
        self.eff2 = ConvBN(mid, mid, 3, stride=stride, groups=groups)
        self.eff3 = ConvBN(mid, features, 1, act=False)
        self.shortcut = (ConvBN(in_channels, features, 1, stride=stride, act=False)
                         if stride != 1 or in_channels != features else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.res2(self.res1(x))
        e = self.eff3(self.eff2(self.eff1(x)))
        s = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(r + e + s)


# ----------------------------------------------------------------------------- 4. progressive

class ProgressiveResolution(nn.Module):
    """Part 4: top-down fusion into the finest level; see the flax twin."""

    def __init__(self, in_channels: Sequence[int], features: int):
        super().__init__()
        self.n = len(in_channels)
        for k, c in enumerate(in_channels, start=1):
            setattr(self, f"lateral{k}", nn.Conv2d(c, features, 1))
        for k in range(self.n - 1, 0, -1):
            setattr(self, f"refine{k}", ConvBN(features, features, 3))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        p = getattr(self, f"lateral{self.n}")(feats[-1])
        for k in range(self.n - 1, 0, -1):
            c = feats[k - 1]
            p = getattr(self, f"lateral{k}")(c) + resize(p, tuple(c.shape[2:]), "bilinear")
            p = getattr(self, f"refine{k}")(p)
        return p


# ----------------------------------------------------------------------------- 5. inception

class MultiReceptiveInception(nn.Module):
    """Part 5: parallel 1x1, 3x3, 5x5, 7x7 conv-BN-ReLU, features / 4 each, concatenated."""

    def __init__(self, in_channels: int, features: int):
        super().__init__()
        for k in (1, 3, 5, 7):
            setattr(self, f"branch{k}", ConvBN(in_channels, features // 4, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch7(x)], 1)


# ----------------------------------------------------------------------------- 6. cross-stitch

class CrossStitch(nn.Module):
    """Part 6: per-channel 2x2 cross-stitch; `alpha` (2, 2, C); returns concat(a', b')."""

    def __init__(self, channels: int, init_self: float = 0.9):
        super().__init__()
        s, o = init_self, 1.0 - init_self
        self.alpha = nn.Parameter(torch.tensor([[s, o], [o, s]])[:, :, None].repeat(1, 1, channels))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        al = self.alpha[:, :, :, None, None]
        return torch.cat([al[0, 0] * a + al[0, 1] * b, al[1, 0] * a + al[1, 1] * b], 1)


# ----------------------------------------------------------------------------- 7. SCConv

class SCConv(nn.Module):
    """Part 7: self-calibrated convolution (Liu et al. 2020); see the flax twin."""

    def __init__(self, in_channels: int, features: int, pooling_r: int = 4):
        super().__init__()
        half, out_half = in_channels // 2, features // 2
        self.pooling_r = pooling_r
        self.k1 = ConvBN(in_channels - half, out_half, 3, act=False)
        self.k2 = ConvBN(half, half, 3, act=False)
        self.k3 = ConvBN(half, half, 3, act=False)
        self.k4 = ConvBN(half, out_half, 3, act=False)
        self.half = half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, :self.half], x[:, self.half:]
        ctx = self.k2(avg_pool_ceil(x1, self.pooling_r))
        gate = torch.sigmoid(x1 + resize(ctx, tuple(x1.shape[2:]), "bilinear"))
        y1 = self.k4(self.k3(x1) * gate)
        return torch.relu(torch.cat([y1, self.k1(x2)], 1))


# ----------------------------------------------------------------------------- 8. non-local

class NonLocalBlock(nn.Module):
    """Part 8: embedded-Gaussian non-local block (Wang et al. 2018); see the flax twin."""

    def __init__(self, channels: int, subsample: bool = True):
        super().__init__()
        ci = max(channels // 2, 1)
        self.subsample = subsample
        self.theta = nn.Conv2d(channels, ci, 1)
        self.phi = nn.Conv2d(channels, ci, 1, bias=False)
        self.g = nn.Conv2d(channels, ci, 1, bias=False)
        self.out = ConvBN(ci, channels, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (b, n, ci)
        phi, g = self.phi(x), self.g(x)
        if self.subsample:
            phi, g = max_pool_ceil2(phi), max_pool_ceil2(g)
        attn = torch.softmax(torch.bmm(theta, phi.flatten(2)), dim=-1)  # (b, n, m)
        y = torch.bmm(attn, g.flatten(2).transpose(1, 2))  # (b, n, ci)
        y = y.transpose(1, 2).reshape(b, -1, h, w)
        return x + self.out(y)


# ----------------------------------------------------------------------------- 9. head

class ClassificationHead(nn.Module):
    """Part 9: global average pool, dropout, linear -> logits."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.3):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x.mean((2, 3))))


# ----------------------------------------------------------------------------- BRIN

class BRIN(nn.Module):
    """The whole network; see jaxcell.models.brin for the wiring and the presets."""

    def __init__(self, num_classes: int = 4, image_size: int = 224, width: int | None = None,
                 depth: Sequence[int] | None = None, groups: int | None = None, dropout: float = 0.3,
                 clahe_clip: float = 2.0, clahe_grid: int = 8, preset: str | None = None):
        super().__init__()
        width, depth, groups = brin_config(preset, width, depth, groups)
        self.num_classes, self.image_size = num_classes, image_size
        self.input = InputProcessing(clahe_clip, clahe_grid)
        self.stem = DualPathStem(width)
        self.blocks: list[tuple[str, bool]] = []  # (attribute, last block of its stage)
        channels, stage_channels = width, []
        for s, blocks in enumerate(depth, start=1):
            features = width * 2 ** (s - 1)
            for i in range(blocks):
                stride = 2 if s > 1 and i == 0 else 1
                setattr(self, f"stage{s}_{i}", BiForkedBlock(channels, features, stride, groups))
                self.blocks.append((f"stage{s}_{i}", i == blocks - 1))
                channels = features
            stage_channels.append(features)
        self.progressive = ProgressiveResolution(stage_channels, width)
        self.inception = MultiReceptiveInception(width, width)
        self.cross_stitch = CrossStitch(width)
        self.scconv = SCConv(2 * width, 2 * width)
        self.non_local = NonLocalBlock(2 * width)
        self.head = ClassificationHead(2 * width, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.input(x))
        feats = []
        for name, last in self.blocks:
            x = getattr(self, name)(x)
            if last:
                feats.append(x)
        p = self.progressive(feats)
        x = self.cross_stitch(self.inception(p), p)
        return self.head(self.non_local(self.scconv(x)))
