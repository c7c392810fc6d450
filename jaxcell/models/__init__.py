"""The model registry: every architecture by name, with the input preprocessing it declares.

    model = jaxcell.models.create("lightnetcell", num_classes=4, image_size=224)
    logits = model.apply(variables, images, train=False)   # float32 NHWC, preprocessed

The trainer, evaluate, predict and the parity suite look models up here and nowhere else;
torch_ref has the twin registry with the same names and constructor arguments.
"""

import dataclasses
import inspect
from typing import Callable

import flax.linen as nn

from jaxcell.errors import UserError
from jaxcell.models.brin import BRIN
from jaxcell.models.densenet import DenseNet121
from jaxcell.models.hybrid import HybridViT
from jaxcell.models.lightnetcell import LightNetCell
from jaxcell.models.resnet import ResNet18, ResNet34, ResNet50


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]
    # Input normalization, applied to images scaled to [0, 1]: (x - mean) / std.
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Adam's peak learning rate when the user gives none.
    lr: float = 1e-3
    # The top-level module that maps features to classes: replaced when fine-tuning from
    # weights trained for other classes, trained alone with --head-epochs / --freeze-backbone.
    head: str = "head"

    @property
    def preprocessing(self) -> dict:
        return {"scale": 1 / 255, "mean": list(self.mean), "std": list(self.std)}


REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    REGISTRY[spec.name] = spec


# A dense layer on flattened features has a huge fan-in (16,384 at 64 px): Adam's early,
# gradient-size-blind steps of about lr per weight then swamp it at 1e-3.
register(ModelSpec("lightnetcell", LightNetCell, lr=3e-4, head="fc2"))
register(ModelSpec("brin", BRIN))
register(ModelSpec("hybrid_vit", HybridViT))
# torchvision's architectures and input normalization, so its ImageNet checkpoints load and see
# what they were trained on.
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
register(ModelSpec("resnet18", ResNet18, head="fc", **IMAGENET))
register(ModelSpec("resnet34", ResNet34, head="fc", **IMAGENET))
register(ModelSpec("resnet50", ResNet50, head="fc", **IMAGENET))
register(ModelSpec("densenet121", DenseNet121, head="classifier", **IMAGENET))


# Optical-density centring (--od-center): the input is -ln(x) per channel minus its mean over the
# image, divided by this (about the spread of the centred density on the ALL smears), instead of
# the model's mean/std. A stain's overall shift (HED jitter, another lab's staining time) moves
# every pixel's optical density by nearly the same amount per channel, so centring removes most
# of it; what remains is the shape of the density map: nuclei, chromatin, cytoplasm.
OD_SCALE = 0.25


def preprocessing(name: str, image_size: int, od_center: bool = False) -> dict:
    """The input preprocessing a model trained at `image_size` declares (config.json, export sidecars)."""
    pre = {**spec(name).preprocessing, "image_size": image_size}
    if od_center:
        pre.update(mean=[0.0] * 3, std=[OD_SCALE] * 3, od_center=True)
    return pre


def names() -> list[str]:
    return sorted(REGISTRY)


def spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(names())}")
    return REGISTRY[name]


def check_kwargs(name: str, build: Callable, kwargs: dict) -> None:
    """Refuse constructor arguments a model does not take, naming them (shared with torch_ref)."""
    fields = getattr(build, "__dataclass_fields__", None)
    accepted = set(fields) if fields else set(inspect.signature(build).parameters)
    unknown = sorted(set(kwargs) - accepted - {"parent", "name"})
    if unknown:
        raise UserError(f"model {name!r} takes no argument {', '.join(unknown)}; "
                        f"it takes {', '.join(sorted(accepted - {'parent', 'name'}))}")


def create(name: str, num_classes: int = 4, image_size: int = 224, **kwargs) -> nn.Module:
    s = spec(name)
    kwargs = dict(num_classes=num_classes, image_size=image_size, **kwargs)
    check_kwargs(name, s.build, kwargs)
    return s.build(**kwargs)
