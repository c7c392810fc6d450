"""LightNetCell in PyTorch: the twin of jaxcell.models.lightnetcell, same names."""

from typing import Sequence

import torch
import torch.nn as nn


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, features: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, features, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(features, eps=1e-5, momentum=0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.bn(self.conv(x))))


class LightNetCell(nn.Module):
    def __init__(self, num_classes: int = 4, image_size: int = 224, widths: Sequence[int] = (64, 128, 256),
                 hidden: int = 256, dropout: float = 0.5):
        super().__init__()
        self.num_classes, self.image_size = num_classes, image_size
        channels, size = 3, image_size
        for i, width in enumerate(widths, start=1):
            setattr(self, f"block{i}", ConvBlock(channels, width))
            channels, size = width, size // 2
        self.num_blocks = len(widths)
        self.fc1 = nn.Linear(channels * size * size, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.num_blocks + 1):
            x = getattr(self, f"block{i}")(x)
        x = self.dropout(torch.relu(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)
