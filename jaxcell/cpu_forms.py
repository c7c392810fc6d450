"""The same functions as lax's convolution, BatchNorm's training pass and max pooling, with the
same values and gradients, in forms that XLA:CPU runs fast (docs/benchmarks.md says what each one
saves), and oneDNN's convolutions (jaxcell.onednn) where asked. Programs get them by choosing
Kernels.CPU_FORMS or Kernels.ONEDNN (jaxcell.kernels); tests/test_cpu_forms.py checks each against
the stock function on a battery of shapes.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxcell import onednn

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, *, use_onednn: bool = False,
                         **kwargs):
    """lax.conv_general_dilated. A plain NHWC/HWIO convolution goes to oneDNN (use_onednn, float32,
    where its kind is verified) or to `_cpu_conv`, which computes the same values and gradients in
    forms that XLA:CPU runs fast; any other to lax."""
    rhs_dilation = tuple(rhs_dilation or (1,) * (lhs.ndim - 2))
    plain = (lhs.ndim == 4 and not kwargs and tuple(lhs_dilation or (1, 1)) == (1, 1)
             and not isinstance(padding, str)
             and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if plain and feature_group_count > 1:
        # XLA:CPU rewrites a grouped convolution's weight gradient into a 5-D convolution with a
        # dilated input that no library kernel takes (300 ms a step each in BRIN at 64 px): one
        # ordinary convolution per group instead, the same sums.
        g = feature_group_count
        xs, ws = jnp.split(lhs, g, axis=3), jnp.split(rhs, g, axis=3)
        return jnp.concatenate([conv_general_dilated(x, w, window_strides, padding, None, rhs_dilation,
                                                     lax.conv_dimension_numbers(x.shape, w.shape, _NHWC),
                                                     1, precision, use_onednn=use_onednn)
                                for x, w in zip(xs, ws)], axis=3)
    if plain:
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
        if use_onednn and _onednn_takes(lhs, rhs, window_strides, padding, rhs_dilation):
            return onednn.conv(lhs, rhs, tuple(window_strides), padding, rhs_dilation)
        out = onednn.output_shape(lhs.shape, rhs.shape, window_strides, padding, rhs_dilation)[1:3]
        taps = rhs.shape[0] * rhs.shape[1]
        # XLA's ConvOperandSwapper swaps the operands of a convolution whose kernel has more taps
        # than its input has pixels (ResNet's last stage at 64 px: 3x3 kernels on 2x2 maps; also
        # the input gradient of a convolution with such an output). XLA:CPU has no library kernel
        # for the swapped layout and loops: 270 ms for PyTorch's 4 (3x3, 512 channels, 2x2, batch
        # 32). Explicit zeros keep every operand at least as large as the kernel.
        explicit = lhs.shape[1] * lhs.shape[2] < taps or out[0] * out[1] < taps
        if taps * lhs.size <= rhs.size:
            # Maps this small against the kernel (ResNet's last stage at 64 px) are cheaper as one
            # matrix product with their patches: no kernel transposes, nothing for XLA to swap.
            return _patches_conv(lhs, rhs, tuple(window_strides), padding, rhs_dilation, precision)
        return _cpu_conv(lhs, rhs, tuple(window_strides), padding, rhs_dilation, precision, explicit)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision, **kwargs)


def _onednn_takes(lhs, rhs, strides, padding, dilation) -> bool:
    # onednn.verified: the geometry's kind passed the check against XLA on this machine
    return (lhs.dtype == rhs.dtype == jnp.float32 and min(p for pair in padding for p in pair) >= 0
            and onednn.available() and onednn.verified(lhs.shape, rhs.shape, strides, dilation))


def _patches_conv(x, w, strides, padding, dilation, precision):
    """The convolution as patches (N, Ho, Wo, kh * kw * Cin) times the kernel (kh * kw * Cin, Cout);
    autodiff turns it into two more products and the sum of the patches' shifted gradients."""
    kh, kw, cin, cout = w.shape
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    (s1, s2), (d1, d2) = strides, dilation
    ho = (xp.shape[1] - (kh - 1) * d1 - 1) // s1 + 1
    wo = (xp.shape[2] - (kw - 1) * d2 - 1) // s2 + 1
    taps = [lax.slice(xp, (0, i * d1, j * d2, 0), (x.shape[0], i * d1 + (ho - 1) * s1 + 1, j * d2 + (wo - 1) * s2 + 1, cin),
                      (1, s1, s2, 1)) for i in range(kh) for j in range(kw)]
    return lax.dot_general(jnp.concatenate(taps, axis=-1), w.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())),
                           precision=precision)


def _zeros_around(x, pads):
    """lax.pad with zeros; the barrier keeps XLA from folding them back into a convolution's padding."""
    return lax.optimization_barrier(lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *pads, (0, 0, 0))))


def _forward(x, w, strides, padding, dilation, precision, explicit):
    if explicit:
        return lax.conv_general_dilated(_zeros_around(x, [(lo, hi, 0) for lo, hi in padding]), w, strides,
                                        "VALID", rhs_dilation=dilation, dimension_numbers=_NHWC, precision=precision)
    return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=_NHWC,
                                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _cpu_conv(x, w, strides, padding, dilation, precision, explicit):
    return _forward(x, w, strides, padding, dilation, precision, explicit)


def _cpu_conv_fwd(x, w, strides, padding, dilation, precision, explicit):
    x = _materialized(x)
    return _forward(x, w, strides, padding, dilation, precision, explicit), (x, w)


def _cpu_conv_bwd(strides, padding, dilation, precision, explicit, residuals, dy):
    x, w = residuals
    dy = _materialized(dy)
    _, w_vjp = jax.vjp(lambda w: _forward(x, w, strides, padding, dilation, precision, explicit), w)
    (dw,) = w_vjp(dy)
    # dL/dx: the full correlation of dy, spread out by the stride, with the kernel flipped in
    # space and transposed in channels. XLA fuses a flip with a transpose into a slow loop (10 ms
    # for a 3x3x512x512 kernel, 2.5 ms for the transpose alone; a flip of maps costs about what
    # a transpose does), so unless the maps are 4x the kernel they are flipped instead:
    # flip(correlate(flip(dy), w)) is the same sum.
    pads = []
    for axis, k, s, d, (lo, _) in zip((1, 2), w.shape[:2], strides, dilation, padding):
        k_eff = (k - 1) * d + 1
        before = k_eff - 1 - lo
        after = x.shape[axis] + k_eff - 1 - ((dy.shape[axis] - 1) * s + 1) - before
        pads.append((before, after, s - 1))
    kernel = jnp.transpose(w, (0, 1, 3, 2))
    flip_maps = dy.size + x.size < 4 * w.size
    if flip_maps:
        dy = jnp.flip(dy, (1, 2))
        pads = [(after, before, interior) for before, after, interior in pads]
    else:
        kernel = jnp.flip(kernel, (0, 1))
    if explicit:  # negative pads crop
        dx = lax.conv_general_dilated(_zeros_around(dy, pads), kernel, (1, 1), "VALID", rhs_dilation=dilation,
                                      dimension_numbers=_NHWC, precision=precision)
    else:
        dx = lax.conv_general_dilated(dy, kernel, (1, 1), [(b, a) for b, a, _ in pads], lhs_dilation=strides,
                                      rhs_dilation=dilation, dimension_numbers=_NHWC, precision=precision)
    if flip_maps:
        dx = jnp.flip(dx, (1, 2))
    return dx.astype(x.dtype), dw.astype(w.dtype)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


@jax.custom_vjp
def _materialized(x: jax.Array) -> jax.Array:
    """x, written to memory once where it is computed.

    XLA:CPU fuses the cheap elementwise work that produces a convolution's operand (BatchNorm,
    residual add, ReLU, and their gradients) into every consumer, including the transposes of
    the weight gradient, which then recompute it in slow strided loops (70 ms for ResNet18's
    layer-1 inputs at 224 px, against 2.4 ms for a plain transpose). Its fusion pass never
    duplicates an "expensive" op, and a division is one: x / (1 + (x != x)) is x, bit for bit,
    for every value XLA:CPU keeps (NaN and inf included; it flushes subnormals in any arithmetic),
    and the simplifier cannot fold it away.
    """
    return x / (1 + (x != x).astype(x.dtype))


_materialized.defvjp(lambda x: (_materialized(x), None), lambda _, g: (g,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def batch_norm_train(statistics, x, scale, bias, epsilon):
    """statistics(x, scale, bias, epsilon): training-mode BatchNorm's (y, batch mean, biased batch
    variance), with torch's gradient, two sums over dy: XLA's autodiff of a two-pass variance makes
    five, each a pass over the activations on a CPU."""
    return statistics(x, scale, bias, epsilon)


def _batch_norm_train_fwd(statistics, x, scale, bias, epsilon):
    out = statistics(x, scale, bias, epsilon)
    return out, (x, scale, out[1], out[2])


def _batch_norm_train_bwd(statistics, epsilon, residuals, cotangents):
    x, scale, mean, var = residuals  # mean, var: in the statistics' dtype
    dy, dmean, dvar = cotangents
    axes, n = tuple(range(x.ndim - 1)), x.size // x.shape[-1]
    rstd = jax.lax.rsqrt(var + epsilon)
    centred = x.astype(mean.dtype) - mean
    g = dy.astype(mean.dtype)
    dbias = g.sum(axes)
    dscale = (g * centred).sum(axes) * rstd
    # y = scale * rstd * (x - mean) + bias with mean and var functions of x; mean and var are
    # outputs too (the running statistics), hence their cotangents' terms at the end.
    dx = (scale * rstd) * (g - dbias / n - centred * (rstd * dscale / n)) + (dmean + 2 * dvar * centred) / n
    return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int, stride: int, pads) -> jax.Array:
    """nn.max_pool with its gradient to each window's first maximum (a NaN counts as the maximum),
    as torch's and XLA's select_and_scatter give it. XLA:CPU rewrites select_and_scatter into a
    variadic reduce_window over four full-size index arrays and a scatter, which costs more than
    the convolutions around it; here it is a few elementwise ops."""
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


def _max_pool_fwd(x, window, stride, pads):
    x = _materialized(x)
    y = max_pool(x, window, stride, pads)
    return y, (x, y)


def _first_hits(taps: list[jax.Array], y: jax.Array) -> list[jax.Array]:
    """Per tap, where it holds its window's first maximum (a NaN counts as the maximum)."""
    taken = jnp.zeros(y.shape, bool)
    firsts = []
    for t in taps:
        hit = ((t == y) | jnp.isnan(t)) & ~taken
        firsts.append(hit)
        taken = taken | hit
    return firsts


def _max_pool_bwd(window, stride, pads, residuals, dy):
    x, y = residuals
    (n, ho, wo, c), k, zero = y.shape, window, jnp.zeros((), dy.dtype)
    if stride == k and pads == ((0, 0), (0, 0)):
        # Disjoint windows, seen as axes of x: a select against dy broadcast over them.
        xw = x[:, :ho * k, :wo * k].reshape(n, ho, k, wo, k, c)
        firsts = _first_hits([xw[:, :, i, :, j, :] for i in range(k) for j in range(k)], y)
        mask = jnp.stack(firsts, axis=-2).reshape(n, ho, wo, k, k, c).transpose(0, 1, 3, 2, 4, 5)
        dx = jnp.where(mask, dy[:, :, None, :, None, :], zero).reshape(n, ho * k, wo * k, c)
        dx = lax.pad(dx, zero, ((0, 0, 0), (0, x.shape[1] - ho * k, 0), (0, x.shape[2] - wo * k, 0), (0, 0, 0)))
    else:
        # Overlapping windows: each tap's share of dy, spread back to where the tap reads.
        xp = lax.pad(x, jnp.asarray(-jnp.inf, x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
        offsets = [(i, j) for i in range(k) for j in range(k)]
        span = lambda i, h: (i, i + (h - 1) * stride + 1)  # noqa: E731
        taps = [lax.slice(xp, (0, span(i, ho)[0], span(j, wo)[0], 0), (n, span(i, ho)[1], span(j, wo)[1], c),
                          (1, stride, stride, 1)) for i, j in offsets]
        dxp = None
        for (i, j), hit in zip(offsets, _first_hits(taps, y)):
            part = lax.pad(jnp.where(hit, dy, zero), zero,
                           ((0, 0, 0), (i, xp.shape[1] - span(i, ho)[1], stride - 1),
                            (j, xp.shape[2] - span(j, wo)[1], stride - 1), (0, 0, 0)))
            dxp = part if dxp is None else dxp + part
        dx = dxp[:, pads[0][0]:pads[0][0] + x.shape[1], pads[1][0]:pads[1][0] + x.shape[2]]
    # Materialized once: fused into the reductions of the BatchNorm gradient that follows, the
    # k*k spread parts would be recomputed by each of them (4x the work, measured on ResNet18).
    return (lax.optimization_barrier(dx),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


