"""DenseNet-121 in PyTorch with torchvision's exact state_dict keys and shapes (the current
ones: `denselayer1.norm1`, not the old `norm.1`), so a torchvision checkpoint loads with
strict=True. Written here, not imported: torchvision is not a dependency.
Twin: jaxcell.models.densenet (the details are there)."""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


MIN_SIZE = 29  # see jaxcell.models.densenet


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


class DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth_rate: int, bn_size: int):
        super().__init__()
        self.norm1 = _bn(in_channels)
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = _bn(bn_size * growth_rate)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(torch.relu(self.norm1(x)))
        return self.conv2(torch.relu(self.norm2(y)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, bn_size: int):
        super().__init__()
        for j in range(num_layers):
            self[f"denselayer{j + 1}"] = DenseLayer(in_channels + j * growth_rate, growth_rate, bn_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(OrderedDict([
            ("norm", _bn(in_channels)),
            ("relu", nn.ReLU()),
            ("conv", nn.Conv2d(in_channels, out_channels, 1, bias=False)),
            ("pool", nn.AvgPool2d(2, 2)),
        ]))


class DenseNet(nn.Module):
    def __init__(self, growth_rate: int, block_config: tuple[int, ...], num_init_features: int, bn_size: int,
                 num_classes: int = 4, image_size: int = 224):
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
        layers: list[tuple[str, nn.Module]] = [
            ("conv0", nn.Conv2d(3, num_init_features, 7, 2, padding=3, bias=False)),
            ("norm0", _bn(num_init_features)),
            ("relu0", nn.ReLU()),
            ("pool0", nn.MaxPool2d(3, 2, padding=1)),
        ]
        channels = num_init_features
        for i, n in enumerate(block_config, start=1):
            layers.append((f"denseblock{i}", DenseBlock(n, channels, growth_rate, bn_size)))
            channels += n * growth_rate
            if i != len(block_config):
                layers.append((f"transition{i}", Transition(channels, channels // 2)))
                channels //= 2
        layers.append(("norm5", _bn(channels)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Linear(channels, num_classes)
        # torchvision's initialization, so training from scratch behaves as it does there.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[2:]) < MIN_SIZE:
            raise ValueError(f"densenet needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, "
                             f"got {x.shape[2]}x{x.shape[3]}")
        x = F.relu(self.features(x))
        return self.classifier(x.mean((2, 3)))


class DenseNet121(DenseNet):
    def __init__(self, num_classes: int = 4, image_size: int = 224):
        super().__init__(32, (6, 12, 24, 16), 64, 4, num_classes, image_size)
