"""Image preprocessing as pure jnp functions: CLAHE, resize, normalize.

Everything here is jit-able and batched over leading axes, and runs on the device. Shapes
and parameters are static: the per-row / per-column index and weight tables are built with
numpy while tracing (they depend on shapes only), never from data.

CLAHE reproduces OpenCV's `cv2.createCLAHE(clipLimit, tileGridSize).apply` (8-bit):
  * if H or W is not a multiple of the grid, BOTH axes are padded at the bottom/right with
    the reflect-101 border by `tiles - n % tiles` (so an axis that was divisible gains
    `tiles` pixels, as in OpenCV); histograms come from the padded image, interpolation
    runs over the original pixels only;
  * clip limit `max(int(clip_limit * tile_area / 256), 1)` (no clipping if clip_limit <= 0);
    the clipped excess goes back evenly, and its remainder `r` one count each to bins
    0, s, 2s, ... (r of them) with s = max(256 // r, 1);
  * LUT = round_half_even(cdf * float32(255 / tile_area)), saturated to [0, 255];
  * bilinear blend of the four nearest tile LUTs, tile coordinate y * (1/th) - 0.5 in float32,
    clamped at the borders, the result rounded half-to-even.
The float32 arithmetic follows OpenCV's, rounding for rounding (XLA's FMA contraction is
designed out, see _mul_rn), so the result is bit-identical to OpenCV's on x86 builds (tested
on real and random images, many sizes); the contract is one grey level, what a build of
OpenCV that itself contracts to FMA could differ by.

`resize` computes what torch's `F.interpolate(..., align_corners=False)` computes (bilinear
without antialiasing, legacy "nearest", "nearest-exact"): the same source indices and the
same float32 weights, so nearest is bit-identical and bilinear differs only in the rounding
of the final sums (a few ulps). `jax.image.resize` does not do this: its nearest samples at
(i + 0.5) * in / out and its bilinear antialiases when shrinking.

`normalize` is ToTensor + Normalize, bit-identical to torch (a lookup table, since XLA
rewrites x / 255 as x * (1 / 255)).
"""

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

_BINS = 256


# ----------------------------------------------------------------------------- CLAHE

def _reflect101(n_out: int, n: int) -> np.ndarray:
    """Source index of each of n_out positions for an axis of length n extended past its end
    with OpenCV's BORDER_REFLECT_101 (mirror without repeating the edge; repeats as often as
    needed, so it also works when the padding is longer than the axis)."""
    if n == 1:
        return np.zeros(n_out, np.int64)
    period = 2 * (n - 1)
    i = np.arange(n_out) % period
    return np.where(i < n, i, period - i)


def _tile_coords(n: int, tile: int, tiles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each pixel along an axis: the two neighbouring tile indices and the weight of the
    second, computed in float32 the way OpenCV does (x * (1/tile) - 0.5)."""
    inv = np.float32(1.0) / np.float32(tile)
    t = np.arange(n, dtype=np.float32) * inv - np.float32(0.5)
    t1 = np.floor(t)
    a = (t - t1).astype(np.float32)
    t1 = t1.astype(np.int64)
    return np.maximum(t1, 0), np.minimum(t1 + 1, tiles - 1), a


def _histograms(index: jax.Array, n: int) -> jax.Array:
    """Counts of the flat bin indices in `index` (any shape, values in [0, n)) by one
    scatter-add. Measured on CPU (32 images of 224x224): 25-50x faster than a 16x16 one-hot
    matmul over the two nibbles, 200-500x faster than a 256-way one-hot reduction."""
    # mode="clip": the indices are in range by construction, and XLA's CPU scatter runs
    # ~4x faster than with the default out-of-bounds dropping.
    return jnp.zeros(n, jnp.int32).at[index.reshape(-1)].add(1, mode="clip")


def _clip_and_redistribute(hist: jax.Array, limit: int) -> jax.Array:
    """OpenCV's clipping of (..., 256) int32 histograms at `limit` (> 0)."""
    excess = jnp.sum(jnp.maximum(hist - limit, 0), axis=-1, keepdims=True)
    hist = jnp.minimum(hist, limit)
    batch = excess // _BINS
    residual = excess - batch * _BINS
    # The residual goes one count each to bins 0, step, 2*step, ...: exactly `residual` bins,
    # since (residual - 1) * (256 // residual) < 256.
    step = jnp.maximum(_BINS // jnp.maximum(residual, 1), 1)
    i = jnp.arange(_BINS, dtype=jnp.int32)
    extra = (residual > 0) & (i % step == 0) & (i // step < residual)
    return hist + batch + extra.astype(jnp.int32)


def _mul_lut_weight(lut_values: jax.Array, weight: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
    """float32 round(l * w) for integer-valued l in [0, 255] and static float32 weights w
    (reshaped to `shape` to broadcast against l), immune to FMA contraction: w = w_hi + w_lo
    with w_hi its top 16 significant bits, so l * w_hi (24 bits) and l * w_lo (16 bits) are
    exact and their sum, fused or not, is the correctly rounded product."""
    w = weight.astype(np.float32)
    w_hi = (w.view(np.uint32) & np.uint32(0xFFFFFF00)).view(np.float32)
    w_lo = w - w_hi
    return lut_values * jnp.asarray(w_hi).reshape(shape) + lut_values * jnp.asarray(w_lo).reshape(shape)


def _mul_rn(s: jax.Array, weight: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
    """float32 round_half_even(s * w) computed in int32 arithmetic, for s >= 0 (zero or
    normal) and static float32 weights 0 <= w <= 1 (reshaped to `shape` to broadcast).

    The 48-bit product of the two 24-bit significands is built from 12-bit limbs in two
    int32 words and rounded to 24 bits by hand, then the float is assembled from its bits:
    no floating-point multiply exists for a compiler to fuse with the sum that follows.
    """
    w = weight.astype(np.float32)
    wb = w.view(np.int32)
    w_m = np.where(w > 0, (wb & 0x7FFFFF) | 0x800000, 0).astype(np.int32)
    w_e = ((wb >> 23) & 0xFF).astype(np.int32)  # value = w_m * 2**(w_e - 150)
    b1, b0 = jnp.asarray(w_m >> 12).reshape(shape), jnp.asarray(w_m & 0xFFF).reshape(shape)
    w_e, w_zero = jnp.asarray(w_e).reshape(shape), jnp.asarray(w == 0).reshape(shape)

    bits = jax.lax.bitcast_convert_type(s, jnp.int32)
    e_s = (bits >> 23) & 0xFF
    m_s = (bits & 0x7FFFFF) | 0x800000
    a1, a0 = m_s >> 12, m_s & 0xFFF
    mid = a1 * b0 + a0 * b1                       # < 2**25
    lo = a0 * b0 + ((mid & 0xFFF) << 12)          # < 2**25
    hi = a1 * b1 + (mid >> 12) + (lo >> 24)       # product = hi * 2**24 + lo, in [2**46, 2**48)
    lo = lo & 0xFFFFFF
    big = hi >= (1 << 23)                         # 48-bit product: keep hi; else 47-bit
    mant = jnp.where(big, hi, (hi << 1) | (lo >> 23))
    rem = jnp.where(big, lo, lo & 0x7FFFFF)
    half = jnp.where(big, 1 << 23, 1 << 22)
    mant = mant + ((rem > half) | ((rem == half) & ((mant & 1) == 1))).astype(jnp.int32)
    # value = mant * 2**(e_s + w_e - 300 + shift); a carry to 2**24 moves into the exponent
    exp = e_s + w_e - 300 + jnp.where(big, 24, 23) + (mant >> 24)
    mant = jnp.where(mant >> 24 == 1, mant >> 1, mant)
    out = jax.lax.bitcast_convert_type(((exp + 150) << 23) | (mant & 0x7FFFFF), jnp.float32)
    return jnp.where((s == 0) | w_zero, jnp.float32(0), out)


def _row_table(a: np.ndarray) -> jax.Array:
    """A static per-row int table, shaped (H, 1) to broadcast over (B, H, W)."""
    return jnp.asarray(a.astype(np.int32))[:, None]


def _col_table(a: np.ndarray) -> jax.Array:
    """A static per-column int table, shaped (W,)."""
    return jnp.asarray(a.astype(np.int32))


def _tile_luts(xp: jax.Array, clip_limit: float, grid: tuple[int, int]) -> jax.Array:
    """xp: (B, Hp, Wp) int32, Hp and Wp multiples of the grid -> the LUTs flattened from
    (B, tiles_y, tiles_x, 256), float32 holding integers in [0, 255].

    The tile of each pixel comes from static row and column maps, so all histograms are
    one scatter-add of computed bin indices, with no tile transposes."""
    b, hp, wp = xp.shape
    tiles_x, tiles_y = grid
    th, tw = hp // tiles_y, wp // tiles_x
    area = th * tw
    first = jnp.asarray(np.arange(b, dtype=np.int32) * tiles_y * tiles_x * _BINS)[:, None, None]
    index = (first + _row_table((np.arange(hp) // th) * tiles_x * _BINS)
             + _col_table((np.arange(wp) // tw) * _BINS) + xp)
    hist = _histograms(index, b * tiles_y * tiles_x * _BINS).reshape(-1, _BINS)
    if clip_limit > 0:
        hist = _clip_and_redistribute(hist, max(int(clip_limit * area / _BINS), 1))
    cdf = jnp.cumsum(hist, axis=-1)
    # int * float32 in float32, then OpenCV's saturate_cast (round half to even, clamp).
    lut = jnp.clip(jnp.round(cdf.astype(jnp.float32) * (np.float32(_BINS - 1) / np.float32(area))), 0, 255)
    return lut.reshape(-1)


def _blend(x: jax.Array, lut: jax.Array, tile: tuple[int, int], grid: tuple[int, int]) -> jax.Array:
    """x: (B, H, W) int32 -> uint8: each pixel's value through the LUTs of its four nearest
    tiles (tile = (th, tw) pixels), blended bilinearly with OpenCV's float32 arithmetic."""
    b, h, w = x.shape
    tiles_x, tiles_y = grid
    ty1, ty2, ya = _tile_coords(h, tile[0], tiles_y)
    tx1, tx2, xa = _tile_coords(w, tile[1], tiles_x)
    idx = jnp.asarray(np.arange(b, dtype=np.int32) * tiles_y * tiles_x * _BINS)[:, None, None] + x
    r1, r2 = _row_table(ty1 * tiles_x * _BINS), _row_table(ty2 * tiles_x * _BINS)
    c1, c2 = _col_table(tx1 * _BINS), _col_table(tx2 * _BINS)
    l11, l12, l21, l22 = (lut[idx + off] for off in (r1 + c1, r1 + c2, r2 + c1, r2 + c2))
    # OpenCV's float32 expression (l11 * xa1 + l12 * xa) * ya1 + (l21 * xa1 + l22 * xa) * ya,
    # each operation rounded on its own. XLA contracts a product and a sum into one FMA
    # (skipping the product's rounding), which flips results that sit near x.5 (common: LUT
    # entries are integers, weights multiples of 1/tile). So every product is formed so
    # that an FMA cannot change it; see _mul_lut_weight and _mul_rn.
    xa1, ya1 = np.float32(1) - xa, np.float32(1) - ya
    s1 = _mul_lut_weight(l11, xa1, (-1,)) + _mul_lut_weight(l12, xa, (-1,))
    s2 = _mul_lut_weight(l21, xa1, (-1,)) + _mul_lut_weight(l22, xa, (-1,))
    res = _mul_rn(s1, ya1, (-1, 1)) + _mul_rn(s2, ya, (-1, 1))
    return jnp.clip(jnp.round(res), 0, 255).astype(jnp.uint8)


def _clahe_planes(x: jax.Array, clip_limit: float, grid: tuple[int, int]) -> jax.Array:
    """x: (B, H, W) int32 in [0, 255] -> (B, H, W) uint8, each plane on its own."""
    b, h, w = x.shape
    tiles_x, tiles_y = grid
    if h % tiles_y or w % tiles_x:
        hp, wp = h + tiles_y - h % tiles_y, w + tiles_x - w % tiles_x
        xp = x[:, _reflect101(hp, h)][:, :, _reflect101(wp, w)]
    else:
        hp, wp, xp = h, w, x
    lut = _tile_luts(xp, clip_limit, grid)
    return _blend(x, lut, (hp // tiles_y, wp // tiles_x), grid)


def _check_grid(tile_grid_size: Sequence[int]) -> tuple[int, int]:
    grid = tuple(int(g) for g in tile_grid_size)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"tile_grid_size must be two positive integers, got {tile_grid_size!r}")
    return grid


@partial(jax.jit, static_argnames=("clip_limit", "grid", "channels_last"))
def _clahe_jit(images: jax.Array, clip_limit: float, grid: tuple[int, int], channels_last: bool) -> jax.Array:
    shape = images.shape
    x = jnp.clip(images.astype(jnp.int32), 0, _BINS - 1)
    if not channels_last:
        return _clahe_planes(x.reshape(-1, *shape[-2:]), clip_limit, grid).reshape(shape)
    # One channel at a time, in a loop: the loop keeps each channel's work on (B, H, W)
    # arrays. Fused over a trailing axis of 3 (channels last, or a final transpose back to
    # it), XLA's CPU loops ran 3-4x slower than three grey passes.
    x = jnp.moveaxis(x.reshape(-1, *shape[-3:]), -1, 0)
    out = jax.lax.map(lambda plane: _clahe_planes(plane, clip_limit, grid), x)
    return jnp.moveaxis(out, 0, -1).reshape(shape)


def clahe(images: jax.Array, clip_limit: float = 2.0,
          tile_grid_size: tuple[int, int] = (8, 8)) -> jax.Array:
    """Contrast-limited adaptive histogram equalization of 8-bit grey images (..., H, W).

    Same numbers as `cv2.createCLAHE(clip_limit, tile_grid_size).apply(img)` on each image
    (within one grey level, see the module docstring). `tile_grid_size` follows OpenCV's
    cv::Size order: (tiles across x / columns, tiles down y / rows). Any integer dtype;
    values outside [0, 255] are clipped. Returns uint8 of the same shape. jit-able;
    clip_limit and tile_grid_size are static.
    """
    if images.ndim < 2:
        raise ValueError(f"clahe expects images shaped (..., H, W), got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.integer):
        raise ValueError(f"clahe expects 8-bit levels in an integer dtype, got {images.dtype} "
                         "(for float images in [0, 1] use clahe_rgb_float)")
    return _clahe_jit(images, float(clip_limit), _check_grid(tile_grid_size), False)


def clahe_rgb(images: jax.Array, clip_limit: float = 2.0,
              tile_grid_size: tuple[int, int] = (8, 8)) -> jax.Array:
    """CLAHE of 8-bit colour images (..., H, W, 3), each channel on its own.

    Why per channel, not on a lightness channel (Lab L, HSV V, luma) with the chroma kept:
      * parity: each channel is the grey `clahe`, so OpenCV applied per channel, this and the
        torch twin give the same bits; a Lab round trip would add OpenCV's fixed-point colour
        conversions, which we would have to emulate in both frameworks, and can only be
        matched within a few grey levels;
      * no colour conversion: it costs 3 grey CLAHEs and nothing else;
      * none of the choices normalizes stain colour, so none is worth its cost for that:
        measured on 8 dev images x 3 HED jitters of +-5% (the stain shift that drops
        `jaxcell audit`'s colour shortcut from 0.98 to 0.34), the mean-colour gap between an image and its jittered copy is 4.5 grey
        levels without CLAHE and, at clip 2.0 / 8x8, 4.6 per channel, 4.0 with CLAHE on Lab
        L, 6.1 with CLAHE on HSV V (clip 4.0: 5.8, 4.2, 8.3). Stain robustness has to come
        from stain augmentation; CLAHE's job here is local contrast of the morphology.
    The price: hue shifts, since each channel is stretched on its own; fine for a model's
    input, not for display.
    """
    if images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"clahe_rgb expects images shaped (..., H, W, 3), got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.integer):
        raise ValueError(f"clahe_rgb expects 8-bit levels in an integer dtype, got {images.dtype} "
                         "(for float images in [0, 1] use clahe_rgb_float)")
    return _clahe_jit(images, float(clip_limit), _check_grid(tile_grid_size), True)


def _level_table(mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)) -> jax.Array:
    """(256, C) float32 table of (k / 255 - mean) / std, each step rounded as torch (and
    numpy) round it. XLA turns a division by a constant into a multiplication by its
    reciprocal, which is off by one ulp for about half of the 256 levels; a lookup is exact.
    With the defaults: the (256,) table k / 255."""
    k = np.arange(_BINS, dtype=np.float32)[:, None] / np.float32(_BINS - 1)
    m = np.asarray(mean, np.float32).reshape(-1)
    sd = np.asarray(std, np.float32).reshape(-1)
    table = (k - m) / sd
    return jnp.asarray(table[:, 0] if table.shape[1] == 1 else table)


def quantize(x: jax.Array) -> jax.Array:
    """Float images in [0, 1] -> uint8 levels round(x * 255) (half to even), clamped. Inverts
    x = u8 / 255 exactly, so images made by ToTensor-style scaling come back unchanged."""
    return jnp.round(jnp.clip(x.astype(jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.uint8)


def clahe_rgb_float(x: jax.Array, clip_limit: float = 2.0,
                    tile_grid_size: tuple[int, int] = (8, 8)) -> jax.Array:
    """`clahe_rgb` for float images (..., H, W, C) in [0, 1] (NHWC; any C, each channel on
    its own), as a model's first layer: quantizes to 256 levels, equalizes, returns float in
    [0, 1] in the input's float dtype. No gradient flows to the input (stop_gradient): the
    operation is piecewise constant anyway. jit-able."""
    if x.ndim < 3:
        raise ValueError(f"clahe_rgb_float expects images shaped (..., H, W, C), got shape {x.shape}")
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    u8 = quantize(jax.lax.stop_gradient(x))
    out = _clahe_jit(u8, float(clip_limit), _check_grid(tile_grid_size), True)
    return _level_table()[out].astype(dtype)


# ----------------------------------------------------------------------------- resize

_RESIZE_METHODS = ("bilinear", "nearest", "nearest-exact")


def _nearest_index(n_in: int, n_out: int, exact: bool) -> np.ndarray:
    """torch's nearest source indices: floor(dst * scale) ("nearest") or
    floor((dst + 0.5) * scale) ("nearest-exact"), scale = float32(in / out), clamped."""
    scale = np.float32(n_in) / np.float32(n_out)
    if not exact and n_out == n_in:
        return np.arange(n_out)
    if not exact and n_out == 2 * n_in:  # torch's shortcut: dst >> 1
        return np.arange(n_out) >> 1
    d = np.arange(n_out, dtype=np.float32)
    if exact:
        d = d + np.float32(0.5)
    return np.minimum(np.floor(d * scale).astype(np.int64), n_in - 1)


def _linear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear (align_corners=False) source indices and weights along one axis:
    src = max(scale * (dst + 0.5) - 0.5, 0) with scale = float32(in / out); i0 = floor(src);
    i1 = i0 + (i0 < in - 1); weights 1 - (src - i0) and src - i0 in float32.

    torch's kernels evaluate scale * (dst + 0.5) - 0.5 as one fused multiply-add (its CPU
    kernels are built with FMA contraction, as CUDA's are), so src is rounded to float32 once,
    not after the product and again after the subtraction: float64 here is exact, then one
    rounding. (Two roundings move some weights by ~1e-6.)"""
    scale = np.float32(n_in) / np.float32(n_out)
    src = (np.float64(scale) * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = src.astype(np.int64)
    i1 = i0 + (i0 < n_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, i1, np.float32(1) - w1, w1


def _resize_axis(x: jax.Array, axis: int, n_out: int, method: str) -> jax.Array:
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    if method == "bilinear":
        i0, i1, w0, w1 = _linear_weights(n_in, n_out)
        shape = [1] * x.ndim
        shape[axis] = n_out
        w0, w1 = jnp.asarray(w0, x.dtype).reshape(shape), jnp.asarray(w1, x.dtype).reshape(shape)
        return (jnp.take(x, jnp.asarray(i0), axis=axis, mode="clip") * w0
                + jnp.take(x, jnp.asarray(i1), axis=axis, mode="clip") * w1)
    index = _nearest_index(n_in, n_out, method == "nearest-exact")
    return jnp.take(x, jnp.asarray(index), axis=axis, mode="clip")


def resize(x: jax.Array, size: tuple[int, int], method: str = "bilinear") -> jax.Array:
    """Resize NHWC (or HWC) images to `size` = (out_h, out_w) as torch's
    `F.interpolate(x_nchw, size=size, mode=method, align_corners=False, antialias=False)`
    does (nearest: bit-identical; bilinear: same weights, sums within a few ulps).

    method: "bilinear", "nearest" (torch's legacy nearest, src = floor(dst * in / out)) or
    "nearest-exact" (src = floor((dst + 0.5) * in / out)). Bilinear is separable, two gathers
    and two weights per axis (differentiable w.r.t. x); width first, then height, the order
    in which torch's CPU kernel sums (wh0 * (ww0 * x00 + ww1 * x01) + wh1 * (...)).
    """
    if method not in _RESIZE_METHODS:
        raise ValueError(f"unknown resize method {method!r}; known: {', '.join(_RESIZE_METHODS)}")
    if x.ndim < 3:
        raise ValueError(f"resize expects images shaped (..., H, W, C), got shape {x.shape}")
    out_h, out_w = (int(s) for s in size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"resize size must be positive, got {size!r}")
    if method == "bilinear" and not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"bilinear resize needs float images, got {x.dtype}")
    return _resize_axis(_resize_axis(x, x.ndim - 2, out_w, method), x.ndim - 3, out_h, method)


# ----------------------------------------------------------------------------- normalize

def od_center(x: jax.Array) -> jax.Array:
    """Float images in [0, 1], channels last -> per image and channel, the optical density
    -ln(max(x, 1/255)) minus its mean over the image (torch_ref.preprocessing.od_center)."""
    od = -jnp.log(jnp.maximum(x, 1 / 255))
    return od - od.mean(axis=(-3, -2), keepdims=True)


def normalize(images_uint8: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """(x / 255 - mean) / std in float32, channels last (mean and std: one value, or one per
    channel of the last axis; static, like Python floats). Bit-identical to torchvision's
    ToTensor followed by Normalize (and to the torch twin), via a (256, C) lookup table."""
    if not jnp.issubdtype(images_uint8.dtype, jnp.integer):
        raise ValueError(f"normalize expects 8-bit levels in an integer dtype, got {images_uint8.dtype}")
    table = _level_table(mean, std)
    x = jnp.clip(images_uint8.astype(jnp.int32), 0, _BINS - 1)
    if table.ndim == 1:
        return table[x]
    c = table.shape[1]
    if images_uint8.shape[-1] != c:
        raise ValueError(f"normalize got {c} channel statistics for images with {images_uint8.shape[-1]} "
                         f"channels in the last axis (shape {images_uint8.shape})")
    return table.reshape(-1)[x * c + jnp.arange(c, dtype=jnp.int32)]
