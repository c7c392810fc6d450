"""ResNet-18/34/50 in PyTorch with torchvision's exact state_dict keys and shapes, so a
torchvision checkpoint (1000-class head included) loads with strict=True. Written here, not
imported: torchvision is not a dependency. Twin: jaxcell.models.resnet (the details are there)."""

import torch
import torch.nn as nn


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), _bn(out_channels))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, padding=1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = _bn(planes)
        self.downsample = _downsample(in_channels, planes, stride) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)  # v1.5: stride on the 3x3
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _bn(planes * 4)
        self.downsample = _downsample(in_channels, planes * 4, stride) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, block: type, layers: tuple[int, ...], num_classes: int = 4, image_size: int = 224):
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = _bn(64)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        channels = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            stride = 1 if i == 1 else 2
            blocks = []
            for j in range(n):
                s = stride if j == 0 else 1
                down = j == 0 and (s != 1 or channels != planes * block.expansion)
                blocks.append(block(channels, planes, s, down))
                channels = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.fc = nn.Linear(channels, num_classes)
        # torchvision's initialization, so training from scratch behaves as it does there.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


class ResNet18(ResNet):
    def __init__(self, num_classes: int = 4, image_size: int = 224):
        super().__init__(BasicBlock, (2, 2, 2, 2), num_classes, image_size)


class ResNet34(ResNet):
    def __init__(self, num_classes: int = 4, image_size: int = 224):
        super().__init__(BasicBlock, (3, 4, 6, 3), num_classes, image_size)


class ResNet50(ResNet):
    def __init__(self, num_classes: int = 4, image_size: int = 224):
        super().__init__(Bottleneck, (3, 4, 6, 3), num_classes, image_size)
