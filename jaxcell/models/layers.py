"""Building blocks shared by every model, set up so that each one computes what its torch twin
computes (docs/parity.md): explicit symmetric padding, torch's BatchNorm semantics, torch's max
pooling. Their convolutions, BatchNorm training pass and max pooling run on the kernels that the
code compiling the model chose (jaxcell.kernels): XLA's unless it asked for others.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcell import kernels


def conv(features: int, kernel: int = 3, stride: int = 1, dilation: int = 1, groups: int = 1,
         bias: bool = True, padding: int | None = None, dtype: Any = None, name: str | None = None) -> nn.Conv:
    """nn.Conv with torch's padding: symmetric, dilation * (kernel - 1) // 2 by default.

    ('SAME' pads asymmetrically at stride 2, so it is never used.)
    """
    p = dilation * (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                   kernel_dilation=(dilation, dilation), feature_group_count=groups, use_bias=bias,
                   dtype=dtype, name=name, conv_general_dilated=kernels.conv_general_dilated)


class BatchNorm(nn.Module):
    """BatchNorm2d with torch's semantics, so that training (not only inference) matches.

    flax.linen.BatchNorm keeps the biased batch variance in its running average; torch keeps
    the unbiased one. The difference is a factor n/(n-1), which is large for small feature
    maps, so we keep torch's convention and its counter, and the state dict converts 1:1.
    `momentum` is torch's: the weight of the new batch. Statistics are float32 whatever the
    compute dtype (float64 when it is float64: parity's float64 mode). Under jit over a sharded
    batch the mean is global: synchronized BN.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        count = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
        if train:
            y, mean, var = kernels.batch_norm_train(batch_norm_train, x, scale, bias, self.epsilon)
            if not self.is_initializing():
                n = x.size // c
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
                count.value = count.value + 1
            return y
        return _normalize(x, running_mean.value, running_var.value, scale, bias, self.epsilon)


def _stats_dtype(x: jax.Array):
    """float32 for bfloat16 and float32 activations, float64 for float64 ones."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _normalize(x, mean, var, scale, bias, epsilon):
    return ((x.astype(_stats_dtype(x)) - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias).astype(x.dtype)


def batch_norm_train(x, scale, bias, epsilon):
    """Training-mode BatchNorm: (y, batch mean, biased batch variance); statistics in float32."""
    xf = x.astype(_stats_dtype(x))
    axes = tuple(range(x.ndim - 1))
    mean = xf.mean(axes)
    # Two-pass: no cancellation. One reduction of (x, x^2) would be one all-reduce under a sharded
    # batch instead of two dependent ones, but E[x^2] - E[x]^2 cancels: the variance's relative
    # error went from 1e-7 to 7e-6 at mean/std 5 (65,536 samples per channel), and with 2 samples
    # per channel autodiff's gradient differed from torch's two-sum one by 5.0
    # (jaxcell.cpu_forms.batch_norm_train, tests/test_cpu_forms.py).
    var = jnp.square(xf - mean).mean(axes)
    return _normalize(x, mean, var, scale, bias, epsilon), mean, var


def max_pool(x: jax.Array, window: int = 2, stride: int | None = None, padding: int = 0,
             ceil_mode: bool = False) -> jax.Array:
    """torch.nn.MaxPool2d (padding counts as -inf), floor or ceil mode.

    The gradient goes to the first maximum of each window, as in torch and in XLA's
    select_and_scatter.
    """
    s = stride or window
    extra = [_ceil_extra(n, window, s, padding) if ceil_mode else 0 for n in x.shape[1:3]]
    pads = tuple((padding, padding + e) for e in extra)
    return kernels.max_pool(x, window, s, pads)


def _ceil_extra(n: int, window: int, stride: int, padding: int) -> int:
    """-inf cells beyond torch's padding that ceil mode's last, partial window needs; none when
    that window would start in the right padding (torch drops it)."""
    extra = -(n + 2 * padding - window) % stride
    return extra if extra and (n + 2 * padding - window + extra) // stride * stride < n + padding else 0


def flatten_like_torch(x: jax.Array) -> jax.Array:
    """Flatten NHWC features in torch's C,H,W order, so Dense weights convert without permuting."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
