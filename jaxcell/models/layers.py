"""Building blocks shared by every model, set up so that each one computes what its
torch twin computes (see DESIGN.md section 4): explicit symmetric padding, torch's
BatchNorm semantics, exact GELU."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def conv(features: int, kernel: int = 3, stride: int = 1, dilation: int = 1, groups: int = 1,
         bias: bool = True, padding: int | None = None, dtype: Any = None, name: str | None = None) -> nn.Conv:
    """nn.Conv with torch's padding: symmetric, dilation * (kernel - 1) // 2 by default.

    ('SAME' pads asymmetrically at stride 2, so it is never used.)
    """
    p = dilation * (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                   kernel_dilation=(dilation, dilation), feature_group_count=groups, use_bias=bias,
                   dtype=dtype, name=name)


class BatchNorm(nn.Module):
    """BatchNorm2d with torch's semantics, so that training (not only inference) matches.

    flax.linen.BatchNorm keeps the biased batch variance in its running average; torch keeps
    the unbiased one. The difference is a factor n/(n-1), which is large for small feature
    maps, so we keep torch's convention and its counter, and the state dict converts 1:1.
    `momentum` is torch's: the weight of the new batch. Statistics are float32 whatever the
    compute dtype. Under jit over a sharded batch the mean is global: synchronized BN.
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
        xf = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            mean = xf.mean(axes)
            var = jnp.square(xf - mean).mean(axes)  # two-pass: no cancellation
            if not self.is_initializing():
                n = x.size // c
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
                count.value = count.value + 1
        else:
            mean, var = running_mean.value, running_var.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(x.dtype)


def max_pool(x: jax.Array, window: int = 2, stride: int | None = None, padding: int = 0) -> jax.Array:
    """torch.nn.MaxPool2d (floor mode; padding counts as -inf)."""
    s = stride or window
    return nn.max_pool(x, (window, window), strides=(s, s), padding=((padding, padding), (padding, padding)))


def flatten_like_torch(x: jax.Array) -> jax.Array:
    """Flatten NHWC features in torch's C,H,W order, so Dense weights convert without permuting."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
