"""ResNet-18/34/50 (He et al. 2016) in torchvision's layout, so torchvision checkpoints load as they are.

Names follow torchvision through the naming rule (torch `layer1.0.downsample.0` <-> flax
`layer1_0` / `downsample_0`); twin: torch_ref.resnet. torchvision's "v1.5": the Bottleneck puts
its stride on the 3x3 conv, not on the first 1x1. Stem: 7x7/2 conv, BN, ReLU, 3x3/2 max pool with
padding 1 (padding is -inf in both frameworks). Global average pool = mean over H, W.

`image_size` is accepted for a uniform registry and not used: the network takes any size >= 1
(the stem and every stride-2 step give ceil-like sizes through explicit symmetric padding).
Inputs: NHWC float32 images normalized with ImageNet mean/std (the registry says so).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcell.models.layers import BatchNorm, conv, max_pool


class BasicBlock(nn.Module):
    """3x3 -> BN -> ReLU -> 3x3 -> BN, plus the (projected) shortcut, ReLU."""

    planes: int
    stride: int = 1
    downsample: bool = False
    expansion = 1  # output channels = planes * expansion; a class constant (no annotation: not a field)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = conv(self.planes, 3, self.stride, bias=False, name="conv1")(x)
        out = nn.relu(BatchNorm(name="bn1")(out, train))
        out = conv(self.planes, 3, bias=False, name="conv2")(out)
        out = BatchNorm(name="bn2")(out, train)
        return nn.relu(out + _shortcut(self, x, train))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here: v1.5) -> 1x1 (planes * 4), BN after each, plus the shortcut."""

    planes: int
    stride: int = 1
    downsample: bool = False
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = conv(self.planes, 1, bias=False, name="conv1")(x)
        out = nn.relu(BatchNorm(name="bn1")(out, train))
        out = conv(self.planes, 3, self.stride, bias=False, name="conv2")(out)
        out = nn.relu(BatchNorm(name="bn2")(out, train))
        out = conv(self.planes * self.expansion, 1, bias=False, name="conv3")(out)
        out = BatchNorm(name="bn3")(out, train)
        return nn.relu(out + _shortcut(self, x, train))


def _shortcut(block: nn.Module, x: jax.Array, train: bool) -> jax.Array:
    # torchvision's downsample = Sequential(conv1x1(stride), BN): indices 0 and 1.
    if not block.downsample:
        return x
    y = conv(block.planes * block.expansion, 1, block.stride, bias=False, name="downsample_0")(x)
    return BatchNorm(name="downsample_1")(y, train)


class ResNet(nn.Module):
    """The shared body; subclasses fix `block` and `layers` (class constants, so the registry's
    constructor takes only num_classes and image_size, as torchvision's does)."""

    num_classes: int = 4
    image_size: int = 224
    block = BasicBlock  # class constants, without annotations: not constructor arguments
    layers = ()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = conv(64, 7, 2, bias=False, name="conv1")(x)
        x = nn.relu(BatchNorm(name="bn1")(x, train))
        x = max_pool(x, 3, 2, padding=1)
        channels = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), self.layers), start=1):
            stride = 1 if i == 1 else 2
            for j in range(n):
                s = stride if j == 0 else 1
                down = j == 0 and (s != 1 or channels != planes * self.block.expansion)
                x = self.block(planes, s, down, name=f"layer{i}_{j}")(x, train)
                channels = planes * self.block.expansion
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)


class ResNet18(ResNet):
    block = BasicBlock
    layers = (2, 2, 2, 2)


class ResNet34(ResNet):
    block = BasicBlock
    layers = (3, 4, 6, 3)


class ResNet50(ResNet):
    block = Bottleneck
    layers = (3, 4, 6, 3)
