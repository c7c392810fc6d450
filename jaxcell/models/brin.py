"""BRIN, the BiForked Residual-Inception Network: the paper's best model (reported accuracy 0.99).

Nine named parts, each a module of its own with the same class and attribute name as its twin
in torch_ref.brin, so the layer-by-layer parity report shows each part by name. Data flow
(stride relative to the input; channels with width w and n = len(depth) stages):

  input          InputProcessing: adaptive input normalization (DAIN, Passalis et al. 2019) of the
                 image and its CLAHE, concatenated and fused by a 1x1 conv           3 ch,   /1
  stem           DualPathStem: 3x3 convs (path a) beside dilated 3x3 convs (path b), both
                 stride 2; concat, 1x1 conv-BN-ReLU, 3x3 max pool stride 2              w,   /4
  stage{k}_{i}   BiForkedBlock, depth[k-1] blocks per stage: standard residual fork
                 (3x3-BN-ReLU-3x3-BN) + efficient fork (1x1 -> grouped 3x3 -> 1x1) +
                 shortcut; stage k has w * 2**(k-1) channels, stride 2 from stage 2 on
  progressive    ProgressiveResolution: top-down fusion of every stage's output into the
                 finest level (lateral 1x1 + bilinear upsampling, 3x3 refinement)   w,   /4
  inception      MultiReceptiveInception on that map: parallel 1x1/3x3/5x5/7x7         w,   /4
  cross_stitch   CrossStitch of the two branches, inception (multi-receptive) and the
                 fused pyramid itself (fine detail): per-channel 2x2 mixing, both
                 outputs concatenated                                                   2w,  /4
  scconv         SCConv: its self-calibrated half takes the first stitched branch, its
                 plain half the second, so the stitch decides what gets calibrated       2w,  /4
  non_local      NonLocalBlock: embedded-Gaussian self-attention over all positions      2w,  /4
  head           ClassificationHead: global average pool, dropout, linear -> logits

Why this wiring: cell morphology (nuclear outline, chromatin texture) lives at fine scales, so
the tail of the network works at stride 4 on a map that carries the semantics of the deep
stages down to that resolution (progressive resolution); the tail is a chain in the order the
paper lists its parts, and the cross-stitch is not a degenerate linear mix because its two
outputs feed SCConv's two halves, which are processed differently.

Every stride-2 step uses explicit symmetric padding (output ceil(n / 2) for any n), pooling
for calibration and attention handles remainders explicitly, and upsampling uses the shared
torch-exact `resize`: any input size >= 1 works, odd ones included, with the same numbers as
torch. Input: NHWC float32 images in [0, 1] (the registry's default normalization).

Presets: `preset="paper"` (the default: width 64, depth (2, 2, 2), groups 8; 3.37M parameters,
5.7 GFLOP per 224-pixel image) and `preset="small"` (width 16, depth (1, 1, 1), groups 4; 0.11M
parameters, 0.44 GFLOP at 224 and 0.056 at 96: trains on a 2-core CPU).
width, depth and groups left at None take the preset's value; given, they override it.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcell.models.layers import BatchNorm, conv, max_pool
from jaxcell.preprocessing import clahe_rgb_float, resize
from jaxcell.twins import BRIN_PRESETS, brin_config



def identity_init(key, shape, dtype=jnp.float32):
    """Dense kernel = identity (DAIN starts as plain per-image standardization)."""
    return jnp.eye(shape[0], shape[1], dtype=dtype)


def avg_pool_ceil(x: jax.Array, r: int) -> jax.Array:
    """Average over r x r windows, stride r, ceil(n / r) outputs per axis; a window cut by the
    border averages only its real pixels. Twin: torch_ref.brin.avg_pool_ceil."""
    b, h, w, c = x.shape
    ho, wo = -(-h // r), -(-w // r)
    xp = jnp.pad(x, ((0, 0), (0, ho * r - h), (0, wo * r - w), (0, 0)))
    s = xp.reshape(b, ho, r, wo, r, c).sum((2, 4))
    rows = np.minimum(r, h - np.arange(ho) * r)
    cols = np.minimum(r, w - np.arange(wo) * r)
    return s / jnp.asarray((rows[:, None] * cols[None, :]).astype(np.float32))[None, :, :, None]


def max_pool_ceil2(x: jax.Array) -> jax.Array:
    """2x2 max pool, stride 2, ceil(n / 2) outputs: an odd last row/column is kept, not dropped."""
    return max_pool(x, 2, 2, ceil_mode=True)


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm -> optional ReLU."""

    features: int
    kernel: int = 3
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    act: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = conv(self.features, self.kernel, self.stride, self.dilation, self.groups, bias=False, name="conv")(x)
        x = BatchNorm(name="bn")(x, train)
        return nn.relu(x) if self.act else x


# ----------------------------------------------------------------------------- 1. input

class AdaptiveNormalization(nn.Module):
    """Deep Adaptive Input Normalization (Passalis et al. 2019), per image and channel:
    shift by a learned linear map of the mean, divide by a learned linear map of the std
    (of the shifted image), multiply by a sigmoid gate of the result's mean. Starts as
    per-image standardization followed by a gate of 0.5."""

    eps: float = 1e-8

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        shift = nn.Dense(c, use_bias=False, kernel_init=identity_init, name="shift_fc")(x.mean((1, 2)))
        x = x - shift[:, None, None, :]
        std = jnp.sqrt(jnp.square(x).mean((1, 2)) + self.eps)
        scale = nn.Dense(c, use_bias=False, kernel_init=identity_init, name="scale_fc")(std)
        scale = jnp.where(scale <= self.eps, 1.0, scale)  # as DAIN: never divide by ~0 or flip sign
        x = x / scale[:, None, None, :]
        gate = nn.sigmoid(nn.Dense(c, name="gate_fc")(x.mean((1, 2))))
        return x * gate[:, None, None, :]


class InputProcessing(nn.Module):
    """Part 1: adaptive normalization and CLAHE of the [0, 1] image, concat, 1x1 conv -> 3 ch."""

    clahe_clip: float = 2.0
    clahe_grid: int = 8

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        a = AdaptiveNormalization(name="adaptive")(x)
        c = clahe_rgb_float(x, self.clahe_clip, (self.clahe_grid, self.clahe_grid))
        return conv(3, 1, name="fuse")(jnp.concatenate([a, c], axis=-1))


# ----------------------------------------------------------------------------- 2. stem

class DualPathStem(nn.Module):
    """Part 2: path a, 3x3 convs; path b, dilated (2) 3x3 convs: the same stride-2 grid with a
    5x5 receptive field per conv. Concat, 1x1 conv-BN-ReLU, 3x3 max pool stride 2: /4."""

    width: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        half = self.width // 2
        a = ConvBN(half, 3, stride=2, name="a1")(x, train)
        a = ConvBN(half, 3, name="a2")(a, train)
        b = ConvBN(half, 3, stride=2, dilation=2, name="b1")(x, train)
        b = ConvBN(half, 3, dilation=2, name="b2")(b, train)
        x = ConvBN(self.width, 1, name="fuse")(jnp.concatenate([a, b], axis=-1), train)
        return max_pool(x, 3, 2, padding=1)


# ----------------------------------------------------------------------------- 3. blocks

class BiForkedBlock(nn.Module):
    """Part 3: relu(residual fork + efficient fork + shortcut). The efficient fork is a
    bottleneck (features / 2) with a grouped 3x3; the shortcut is a 1x1 conv-BN projection
    when the stride or the channel count changes."""

    features: int
    stride: int = 1
    groups: int = 8

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        mid = self.features // 2
        r = ConvBN(self.features, 3, stride=self.stride, name="res1")(x, train)
        r = ConvBN(self.features, 3, act=False, name="res2")(r, train)
        e = ConvBN(mid, 1, name="eff1")(x, train)
        e = ConvBN(mid, 3, stride=self.stride, groups=self.groups, name="eff2")(e, train)
        e = ConvBN(self.features, 1, act=False, name="eff3")(e, train)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = ConvBN(self.features, 1, stride=self.stride, act=False, name="shortcut")(x, train)
        return nn.relu(r + e + x)


# ----------------------------------------------------------------------------- 4. progressive

class ProgressiveResolution(nn.Module):
    """Part 4: top-down fusion, coarsest to finest. p_n = lateral_n(c_n); for k = n-1 .. 1,
    p_k = refine_k(lateral_k(c_k) + upsample(p_{k+1})), upsampling bilinear to c_k's exact
    size. Returns p_1 (the finest level, `features` channels)."""

    features: int

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], train: bool = False) -> jax.Array:
        n = len(feats)
        p = conv(self.features, 1, name=f"lateral{n}")(feats[-1])
        for k in range(n - 1, 0, -1):
            c = feats[k - 1]
            p = conv(self.features, 1, name=f"lateral{k}")(c) + resize(p, c.shape[1:3], "bilinear")
            p = ConvBN(self.features, 3, name=f"refine{k}")(p, train)
        return p


# ----------------------------------------------------------------------------- 5. inception

class MultiReceptiveInception(nn.Module):
    """Part 5: parallel 1x1, 3x3, 5x5, 7x7 conv-BN-ReLU, features / 4 each, concatenated."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        q = self.features // 4
        return jnp.concatenate([ConvBN(q, k, name=f"branch{k}")(x, train) for k in (1, 3, 5, 7)], axis=-1)


# ----------------------------------------------------------------------------- 6. cross-stitch

class CrossStitch(nn.Module):
    """Part 6: cross-stitch unit (Misra et al. 2016), one 2x2 matrix per channel:
    a' = alpha[0,0] a + alpha[0,1] b, b' = alpha[1,0] a + alpha[1,1] b; returns concat(a', b').
    Initialised to [[0.9, 0.1], [0.1, 0.9]], Misra's choice. `alpha` has shape (2, 2, C) in
    both frameworks."""

    init_self: float = 0.9

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        c = a.shape[-1]
        s, o = self.init_self, 1.0 - self.init_self
        alpha = self.param("alpha", lambda key, shape: jnp.broadcast_to(
            jnp.array([[s, o], [o, s]], jnp.float32)[:, :, None], shape), (2, 2, c))
        return jnp.concatenate([alpha[0, 0] * a + alpha[0, 1] * b, alpha[1, 0] * a + alpha[1, 1] * b], axis=-1)


# ----------------------------------------------------------------------------- 7. SCConv

class SCConv(nn.Module):
    """Part 7: self-calibrated convolution (Liu et al. 2020). Channels split in halves x1, x2:
    y1 = k4(k3(x1) * sigmoid(x1 + up(k2(avgpool_r(x1))))), y2 = k1(x2); relu(concat(y1, y2)).
    k1..k4 are 3x3 conv-BN; the pooling keeps a partial last window (ceil), the upsampling is
    bilinear back to x1's exact size."""

    features: int
    pooling_r: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        half = x.shape[-1] // 2
        out_half = self.features // 2
        x1, x2 = x[..., :half], x[..., half:]
        ctx = ConvBN(half, 3, act=False, name="k2")(avg_pool_ceil(x1, self.pooling_r), train)
        gate = nn.sigmoid(x1 + resize(ctx, x1.shape[1:3], "bilinear"))
        y1 = ConvBN(half, 3, act=False, name="k3")(x1, train) * gate
        y1 = ConvBN(out_half, 3, act=False, name="k4")(y1, train)
        y2 = ConvBN(out_half, 3, act=False, name="k1")(x2, train)
        return nn.relu(jnp.concatenate([y1, y2], axis=-1))


# ----------------------------------------------------------------------------- 8. non-local

class NonLocalBlock(nn.Module):
    """Part 8: embedded-Gaussian non-local block (Wang et al. 2018): softmax over positions of
    theta(x_i) . phi(x_j) (unscaled, as in the paper), weights applied to g(x_j), 1x1 conv-BN
    back to C channels, plus x. phi and g are sub-sampled by a 2x2 max pool (the paper's
    trick; ceil, so no position is dropped at odd sizes). Inner width C / 2. phi and g have no
    bias: softmax is invariant to phi's (a constant per query) and the BN after `out` absorbs g's."""

    subsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, h, w, c = x.shape
        ci = max(c // 2, 1)
        theta = conv(ci, 1, name="theta")(x).reshape(b, h * w, ci)
        phi, g = conv(ci, 1, bias=False, name="phi")(x), conv(ci, 1, bias=False, name="g")(x)
        if self.subsample:
            phi, g = max_pool_ceil2(phi), max_pool_ceil2(g)
        phi, g = phi.reshape(b, -1, ci), g.reshape(b, -1, ci)
        attn = jax.nn.softmax(jnp.einsum("bnc,bmc->bnm", theta, phi), axis=-1)
        y = jnp.einsum("bnm,bmc->bnc", attn, g).reshape(b, h, w, ci)
        return x + ConvBN(c, 1, act=False, name="out")(y, train)


# ----------------------------------------------------------------------------- 9. head

class ClassificationHead(nn.Module):
    """Part 9: global average pool, dropout, linear -> logits."""

    num_classes: int
    dropout: float = 0.3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.mean((1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
        return nn.Dense(self.num_classes, name="fc")(x)


# ----------------------------------------------------------------------------- BRIN

class BRIN(nn.Module):
    """The whole network; see the module docstring for the wiring and the presets."""

    num_classes: int = 4
    image_size: int = 224
    width: int | None = None
    depth: Sequence[int] | None = None
    groups: int | None = None
    dropout: float = 0.3
    clahe_clip: float = 2.0
    clahe_grid: int = 8
    preset: str | None = None

    def __post_init__(self):
        brin_config(self.preset, self.width, self.depth, self.groups)  # refuse early, at construction
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        width, depth, groups = brin_config(self.preset, self.width, self.depth, self.groups)
        x = InputProcessing(self.clahe_clip, self.clahe_grid, name="input")(x, train)
        x = DualPathStem(width, name="stem")(x, train)
        feats = []
        for s, blocks in enumerate(depth, start=1):
            features = width * 2 ** (s - 1)
            for i in range(blocks):
                stride = 2 if s > 1 and i == 0 else 1
                x = BiForkedBlock(features, stride, groups, name=f"stage{s}_{i}")(x, train)
            feats.append(x)
        p = ProgressiveResolution(width, name="progressive")(feats, train)
        a = MultiReceptiveInception(width, name="inception")(p, train)
        x = CrossStitch(name="cross_stitch")(a, p)
        x = SCConv(2 * width, name="scconv")(x, train)
        x = NonLocalBlock(name="non_local")(x, train)
        return ClassificationHead(self.num_classes, self.dropout, name="head")(x, train)
