"""The reference PyTorch models: the same architectures as jaxcell.models, as plain
torch.nn.Module (NCHW), with the same names and constructor arguments.

This package imports torch only, never jax, so a PyTorch user needs nothing else.
"""

import inspect

import torch.nn as nn

from torch_ref.brin import BRIN
from torch_ref.densenet import DenseNet121
from torch_ref.hybrid import HybridViT
from torch_ref.lightnetcell import LightNetCell
from torch_ref.resnet import ResNet18, ResNet34, ResNet50

REGISTRY: dict[str, type[nn.Module]] = {
    "lightnetcell": LightNetCell,
    "brin": BRIN,
    "hybrid_vit": HybridViT,
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "densenet121": DenseNet121,
}


def names() -> list[str]:
    return sorted(REGISTRY)


def create(name: str, num_classes: int = 4, image_size: int = 224, **kwargs) -> nn.Module:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
    cls = REGISTRY[name]
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"model {name!r} takes no argument {', '.join(unknown)}; "
                         f"it takes {', '.join(sorted(accepted))}")
    return cls(num_classes=num_classes, image_size=image_size, **kwargs)

from torch_ref.io import load, preprocess  # noqa: E402  (io uses create, defined above)
