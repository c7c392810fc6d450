"""The reference PyTorch models: the same architectures as jaxcell.models, as plain
torch.nn.Module (NCHW), with the same names and constructor arguments.

This package imports torch only, never jax, so a PyTorch user needs nothing else.
"""

import inspect

import torch.nn as nn

from torch_ref.lightnetcell import LightNetCell

REGISTRY: dict[str, type[nn.Module]] = {
    "lightnetcell": LightNetCell,
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
