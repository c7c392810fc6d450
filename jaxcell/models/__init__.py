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

from jaxcell import threefry, twins
from jaxcell.errors import UserError
from jaxcell.models.brin import BRIN
from jaxcell.models.densenet import DenseNet121
from jaxcell.models.hybrid import HybridViT
from jaxcell.models.lightnetcell import LightNetCell
from jaxcell.models.resnet import ResNet18, ResNet34, ResNet50
from jaxcell.twins import OD_SCALE  # noqa: F401  (jaxcell.models.OD_SCALE, as before)

threefry.unroll_on_cpu()  # the same random bits, compiled faster (jaxcell/threefry.py)


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


# Each model's presets (normalization, learning rate, head) are jaxcell.twins', shared with torch_ref.
for _name, _build in {"lightnetcell": LightNetCell, "brin": BRIN, "hybrid_vit": HybridViT, "resnet18": ResNet18,
                      "resnet34": ResNet34, "resnet50": ResNet50, "densenet121": DenseNet121}.items():
    register(ModelSpec(_name, _build, **twins.model_preset(_name)))


def preprocessing(name: str, image_size: int, od_center: bool = False) -> dict:
    """The input preprocessing a model trained at `image_size` declares (config.json, export sidecars)."""
    return twins.preprocessing(spec(name).name, image_size, od_center)


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
