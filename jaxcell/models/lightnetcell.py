"""LightNetCell, the paper's plain CNN ("CancerClassifier", reported accuracy 0.91).

Blocks of Conv3x3-BatchNorm-ReLU-MaxPool2 (64, 128, 256 filters), flatten, a hidden
dense layer with dropout, class logits. Names match torch_ref.lightnetcell.
"""

from typing import Sequence

import flax.linen as nn
import jax

from jaxcell.models.layers import BatchNorm, conv, flatten_like_torch, max_pool


class ConvBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = conv(self.features, 3, bias=False, name="conv")(x)  # BN cancels a bias: its gradient is only rounding noise
        x = nn.relu(BatchNorm(name="bn")(x, train))
        return max_pool(x, 2)


class LightNetCell(nn.Module):
    num_classes: int = 4
    image_size: int = 224
    widths: Sequence[int] = (64, 128, 256)
    hidden: int = 256
    dropout: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i, width in enumerate(self.widths, start=1):
            x = ConvBlock(width, name=f"block{i}")(x, train)
        x = flatten_like_torch(x)
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="fc2")(x)
