"""Grad-CAM (Selvaraju et al. 2017) for every registered model, and overlays to look at.

    cam = gradcam(model, variables, x)            # x: the model's input, float NHWC
    cam.maps        (N, H, W) in [0, 1], upsampled to the input size
    cam.raw         (N, h, w) relu(sum_k w_k A_k) at the target layer, before upsampling
    cam.class_index (N,) the class explained (argmax of the logits unless given)

The target layer is named by its flax module path ("block3", "layer4_1", "features"; the torch
spelling "layer4.1" is accepted too). Its activation A is found without touching the model:
`nn.intercept_methods` wraps every module call, and on the target it returns A + delta with
delta = 0; the gradient of the class score with respect to delta is dScore/dA. A token sequence
(B, L, E) with L a square number (the transformer of hybrid_vit) is read as an L = g x g grid.

TARGET_LAYERS below is the one place that declares each model's default layer; torch_ref.explain
reads it too. This module imports jax only inside the functions that need it, so that reading
the table costs nothing (torch_ref never imports jax).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from jaxcell.errors import UserError
from jaxcell.twins import flax_path

# Default Grad-CAM layer per registered model: a regular expression over flax module paths
# ("/"-joined); of the modules that match, the one called last is taken (so the pattern fits
# every depth and width of a model). The last spatial feature map before pooling is the usual
# choice: fine enough to localize, deep enough to carry the class.
TARGET_LAYERS = {
    "lightnetcell": r"block\d+",        # the last conv block (after its pool)
    "resnet18": r"layer4_\d+",          # the last residual block
    "resnet34": r"layer4_\d+",
    "resnet50": r"layer4_\d+",
    "densenet121": r"features",         # norm5, the last feature map
    "brin": r"non_local",               # the last spatial block before the head
    "hybrid_vit": r"norm",              # final LayerNorm over the token grid, before mean pooling
}
# A model missing from the table: the last module (any depth) whose output is a 4-D feature map.


def torch_path_to_flax(path: str) -> str:
    """`layer4.1` -> `layer4_1`, `features.denseblock1` -> `features/denseblock1` (the twins' naming rule)."""
    return "/".join(flax_path(path))


def _is_map(shape) -> bool:
    return len(shape) == 4 and shape[1] * shape[2] > 1


def _grid_side(shape) -> int | None:
    """Side g of a (B, L, E) token sequence with L = g * g, else None."""
    if len(shape) != 3:
        return None
    g = math.isqrt(shape[1])
    return g if g * g == shape[1] else None


def choose_layer(calls: list[tuple[str, tuple]], model_name: str | None, target_layer: str | None) -> str:
    """The target among the (path, output shape) pairs of one forward pass, in call order."""
    if target_layer is not None:
        want = torch_path_to_flax(target_layer)
        hits = [p for p, _ in calls if p == want]
        if not hits:
            known = ", ".join(dict.fromkeys(p for p, _ in calls if p))
            raise UserError(f"the model has no layer {target_layer!r}; its layers: {known}")
        return want
    pattern = TARGET_LAYERS.get(model_name)
    if pattern is not None:
        hits = [p for p, _ in calls if re.fullmatch(pattern, p)]
    else:
        hits = [p for p, s in calls if p and _is_map(s)]
    if not hits:
        raise UserError(f"no default Grad-CAM layer found for model {model_name!r}; pass target_layer")
    return hits[-1]


def check_activation(path: str, shape: tuple) -> None:
    if not (len(shape) == 4 or _grid_side(shape)):
        raise UserError(f"layer {path!r} outputs shape {tuple(shape)}: Grad-CAM needs a feature map "
                        f"(N, H, W, C) or a square token grid (N, g*g, E)")


def registered_name(model) -> str | None:
    from jaxcell import models

    for name, spec in models.REGISTRY.items():
        if type(model) is spec.build:
            return name
    return None


@dataclasses.dataclass
class CamResult:
    maps: np.ndarray          # (N, H, W) float32 in [0, 1], bilinear to the input size, / per-image max
    raw: np.ndarray           # (N, h, w) float32, relu(sum_k w_k A_k), unnormalized
    class_index: np.ndarray   # (N,) int
    logits: np.ndarray        # (N, K)
    layer: str                # flax module path of the target


def _calls(model, variables, x) -> list[tuple[str, tuple]]:
    """(module path, output shape) of every module call of one forward pass, abstractly."""
    import flax.linen as nn
    import jax

    calls = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and hasattr(out, "shape"):
            calls.append(("/".join(context.module.path), tuple(out.shape)))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, a: model.apply(v, a, train=False), variables, x)
    return calls


def cam_function(model, variables, x_like, target_layer: str | None = None, class_index=None):
    """(layer path, fn) with fn(variables, x) -> (maps, raw, class_index, logits): Grad-CAM as a
    pure function of the parameters and a batch of images of `x_like`'s size (any number of them
    when class_index is None), not yet jitted, so that a caller can compile it inside a larger
    program (`jaxcell serve`). Arguments as `gradcam`."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxcell.preprocessing import resize

    n, height, width = x_like.shape[:3]
    calls = _calls(model, variables, x_like)
    path = choose_layer(calls, registered_name(model), target_layer)
    shapes = [s for p, s in calls if p == path]
    if len(shapes) != 1:
        raise UserError(f"layer {path!r} runs {len(shapes)} times in one forward pass; pick a layer that runs once")
    check_activation(path, shapes[0])
    given = None if class_index is None else jnp.broadcast_to(jnp.asarray(class_index, jnp.int32), (n,))

    def score(delta, variables, x):
        captured = []

        def perturb(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and "/".join(context.module.path) == path:
                captured.append(out)
                out = out + delta
            return out

        with nn.intercept_methods(perturb):
            logits = model.apply(variables, x, train=False)
        cls = jnp.argmax(logits, -1) if given is None else given
        # Images are independent in eval mode, so the gradient of the sum is each image's own.
        chosen = jnp.take_along_axis(logits, cls[:, None], axis=1).sum()
        return chosen, (captured[0], logits, cls)

    def run(variables, x):
        delta = jnp.zeros((x.shape[0], *shapes[0][1:]), x.dtype)  # any batch size, not only x_like's
        grads, (act, logits, cls) = jax.grad(score, has_aux=True)(delta, variables, x)
        if act.ndim == 3:  # tokens -> grid, row by row as they were flattened
            g = _grid_side(act.shape)
            act, grads = (a.reshape(a.shape[0], g, g, a.shape[-1]) for a in (act, grads))
        weights = grads.mean(axis=(1, 2))                                   # (N, C)
        raw = jax.nn.relu(jnp.einsum("nhwc,nc->nhw", act, weights))
        up = resize(raw[..., None], (height, width), "bilinear")[..., 0]
        top = up.max(axis=(1, 2), keepdims=True)
        maps = jnp.where(top > 0, up / jnp.where(top > 0, top, 1), 0.0)
        return maps, raw, cls, logits

    return path, run


def gradcam(model, variables, images, target_layer: str | None = None, class_index=None) -> CamResult:
    """Grad-CAM maps for a batch. images: the model's input (preprocessed float32 NHWC).

    class_index: None (each image's predicted class), an int, or one int per image.
    """
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(images, jnp.float32)
    path, run = cam_function(model, variables, x, target_layer, class_index)
    maps, raw, cls, logits = jax.jit(run)(variables, x)
    return CamResult(np.asarray(maps), np.asarray(raw), np.asarray(cls), np.asarray(logits), path)


# ---------------------------------------------------------------------------------------------
# Pictures (numpy and PIL only).

def heat_colors(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 on a blue-cyan-yellow-red ramp ("jet"-like), for overlays."""
    v = np.clip(np.asarray(values, np.float32), 0, 1)[..., None]
    centers = np.array([0.75, 0.5, 0.25], np.float32)  # where red, green, blue peak
    rgb = np.clip(1.5 - np.abs(4 * v - 4 * centers), 0, 1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """An RGB uint8 image with its [0, 1] map blended on top (map resized to the image if needed)."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, -1)
    if cam.shape != image.shape[:2]:
        cam = np.asarray(Image.fromarray(np.asarray(cam, np.float32), mode="F").resize(
            (image.shape[1], image.shape[0]), Image.BILINEAR))
    heat = heat_colors(cam).astype(np.float32)
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * heat + 0.5, 0, 255).astype(np.uint8)
