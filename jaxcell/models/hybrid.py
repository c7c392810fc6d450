"""HybridViT, the paper's CNN + Transformer hybrid (reported accuracy above 0.98).

  stage{i}     one per entry of `widths` (3 by default): Conv3x3 (bias) -> ReLU -> BatchNorm ->
               MaxPool2, the order the paper states (the conv keeps its bias because ReLU
               comes before the normalization)                                        /8
  patch_embed  2x2 conv, stride 2, to `dim` channels: one token per cell of the grid    /16
  tokens       flatten H x W row by row -> (B, L, dim), plus learned position embeddings
  encoder_i    `depth` pre-norm Transformer layers: x + attn(norm1(x)), x + mlp(norm2(x));
               attention is multi-head self-attention with biases, the MLP is
               Dense -> exact GELU -> Dense (hidden = dim * mlp_ratio), dropout after the
               attention, after the GELU and after the MLP (dropout); attention_dropout on
               the attention weights
  norm, head   final LayerNorm, mean over tokens, Dense -> logits

Why mean pooling rather than a CLS token: it needs no special case in the position
embeddings, and with the few tokens a 64 px image gives (4 x 4) every token informs the result.

Position embeddings `pos_embed` (1, g*g, dim) are laid out for a reference image size
(`pos_image_size`, default `image_size`; g = size // 16 with 3 stages) and bilinearly resized
(torch-exact, jaxcell.preprocessing.resize) to the token grid of the actual input, so one set of
weights runs at any image size >= 16 (224 px: 14 x 14 tokens, 64 px: 4 x 4); at the reference
size they are used as stored. A checkpoint fixes the reference grid: build the model with the
`image_size` (or `pos_image_size`) it was trained with, then feed any size. Every LayerNorm has eps 1e-5
(torch's default; flax's is 1e-6), so the twin torch_ref.hybrid computes the same function.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcell.errors import UserError
from jaxcell.twins import HYBRID_PATCH as PATCH, hybrid_config as check_config
from jaxcell.twins import hybrid_reduction as reduction, hybrid_token_grid as token_grid
from jaxcell.models.layers import BatchNorm, conv, max_pool
from jaxcell.preprocessing import resize

LN_EPS = 1e-5


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, use_fast_variance=False, name=name)


class ConvStage(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.relu(conv(self.features, 3, name="conv")(x))
        x = BatchNorm(name="bn")(x, train)
        return max_pool(x, 2)


class Mlp(nn.Module):
    hidden: int
    dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dim = x.shape[-1]
        x = nn.gelu(nn.Dense(self.hidden, name="fc1")(x), approximate=False)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(dim, name="fc2")(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class EncoderLayer(nn.Module):
    heads: int
    mlp_ratio: float
    dropout: float
    attention_dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        dim = x.shape[-1]
        # broadcast_dropout=False: an independent mask per example and head, as torch draws it.
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, qkv_features=dim, out_features=dim, use_bias=True,
            dropout_rate=self.attention_dropout, broadcast_dropout=False, deterministic=not train,
            name="attn")(_layer_norm("norm1")(x))
        x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
        return x + Mlp(int(dim * self.mlp_ratio), self.dropout, name="mlp")(_layer_norm("norm2")(x), train)


class HybridViT(nn.Module):
    num_classes: int = 4
    image_size: int = 224
    widths: Sequence[int] = (32, 64, 128)
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1
    attention_dropout: float = 0.0
    pos_image_size: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        g = check_config(self.image_size, self.widths, self.dim, self.depth, self.heads, self.mlp_ratio,
                         self.pos_image_size)
        r = reduction(len(self.widths))
        if min(x.shape[1:3]) < r:
            raise UserError(f"hybrid_vit needs images of at least {r}x{r} pixels, "
                            f"got {x.shape[1]}x{x.shape[2]}")
        for i, width in enumerate(self.widths, start=1):
            x = ConvStage(width, name=f"stage{i}")(x, train)
        x = conv(self.dim, PATCH, PATCH, padding=0, name="patch_embed")(x)
        b, h, w, e = x.shape
        pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02), (1, g * g, e), jnp.float32)
        if (h, w) != (g, g):
            pos = resize(pos.reshape(1, g, g, e), (h, w), "bilinear").reshape(1, h * w, e)
        x = x.reshape(b, h * w, e) + pos.astype(x.dtype)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        for i in range(self.depth):
            x = EncoderLayer(self.heads, self.mlp_ratio, self.dropout, self.attention_dropout,
                             name=f"encoder_{i}")(x, train)
        x = _layer_norm("norm")(x).mean(axis=1)
        return nn.Dense(self.num_classes, name="head")(x)
