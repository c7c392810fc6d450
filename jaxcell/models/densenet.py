"""DenseNet-121 (Huang et al. 2017) in torchvision's layout, so torchvision checkpoints load as they are.

Names follow torchvision through the naming rule: `features` / `conv0`, `norm0`,
`denseblock{i}` / `denselayer{j}` / `norm1`, `conv1`, `norm2`, `conv2`, `transition{i}` / `norm`,
`conv`, `norm5`, then `classifier`. Twin: torch_ref.densenet.

A dense layer is BN-ReLU-1x1 conv (bn_size * growth) -BN-ReLU-3x3 conv (growth) on the
concatenation of the block input and every earlier layer's output, in that order (channels
last here, dim 1 in torch: the same order). A transition is BN-ReLU-1x1 conv (halving the
channels) -2x2 average pool, stride 2 (no padding: count_include_pad does not arise). After
norm5: ReLU, global average pool (mean over H, W), classifier. `features` returns norm5's
output without the ReLU, as torchvision's `features` does, so the two compare layer by layer.

`image_size` is accepted for a uniform registry and not used: any input of at least
MIN_SIZE x MIN_SIZE pixels works (the stem halves with ceil, each of the three transitions with
floor; smaller inputs would pool to an empty map and are refused).
Inputs: NHWC float32 images normalized with ImageNet mean/std (the registry says so).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcell.errors import UserError
from jaxcell.models.layers import BatchNorm, conv, max_pool

MIN_SIZE = 29  # ceil(ceil(29 / 2) / 2) = 8 = 2**3: one pixel left after the last transition


class DenseLayer(nn.Module):
    growth_rate: int
    bn_size: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.relu(BatchNorm(name="norm1")(x, train))
        y = conv(self.bn_size * self.growth_rate, 1, bias=False, name="conv1")(y)
        y = nn.relu(BatchNorm(name="norm2")(y, train))
        return conv(self.growth_rate, 3, bias=False, name="conv2")(y)


class DenseBlock(nn.Module):
    num_layers: int
    growth_rate: int
    bn_size: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = [x]
        for j in range(1, self.num_layers + 1):
            new = DenseLayer(self.growth_rate, self.bn_size, name=f"denselayer{j}")(
                jnp.concatenate(features, axis=-1), train)
            features.append(new)
        return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.relu(BatchNorm(name="norm")(x, train))
        x = conv(self.features, 1, bias=False, name="conv")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseFeatures(nn.Module):
    growth_rate: int
    block_config: tuple[int, ...]
    num_init_features: int
    bn_size: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = conv(self.num_init_features, 7, 2, bias=False, name="conv0")(x)
        x = nn.relu(BatchNorm(name="norm0")(x, train))
        x = max_pool(x, 3, 2, padding=1)
        channels = self.num_init_features
        for i, n in enumerate(self.block_config, start=1):
            x = DenseBlock(n, self.growth_rate, self.bn_size, name=f"denseblock{i}")(x, train)
            channels += n * self.growth_rate
            if i != len(self.block_config):
                channels //= 2
                x = Transition(channels, name=f"transition{i}")(x, train)
        return BatchNorm(name="norm5")(x, train)


class DenseNet(nn.Module):
    """The shared body; subclasses fix the configuration (class constants, not arguments)."""

    num_classes: int = 4
    image_size: int = 224
    growth_rate = 32
    block_config = (6, 12, 24, 16)
    num_init_features = 64
    bn_size = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if min(x.shape[1:3]) < MIN_SIZE:
            raise UserError(f"densenet needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, "
                            f"got {x.shape[1]}x{x.shape[2]}")
        x = DenseFeatures(self.growth_rate, self.block_config, self.num_init_features, self.bn_size,
                          name="features")(x, train)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(x)


class DenseNet121(DenseNet):
    growth_rate = 32
    block_config = (6, 12, 24, 16)
    num_init_features = 64
    bn_size = 4
