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

Each model's default layer is declared once, in jaxcell.twins.TARGET_LAYERS (torch_ref.explain
reads it too). This module imports jax only inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from jaxcell.errors import UserError
from jaxcell.twins import TARGET_LAYERS, flax_path



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
    import jax.numpy as jnp

    from jaxcell import kernels

    x = jnp.asarray(images, jnp.float32)
    path, run = cam_function(model, variables, x, target_layer, class_index)
    maps, raw, cls, logits = kernels.jit(run, kernels.for_devices())(variables, x)
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


# ---------------------------------------------------------------------------------------------
# Attributions w.r.t. the model input: integrated gradients, gradient SHAP, occlusion.
#
# Each takes the preprocessed float NHWC input and returns attributions of that shape (float32)
# for one class per image (the predicted one unless given), computed on the logits: the same
# numbers captum gives on the torch twin (tests/test_explain.py holds the two side by side).
# The model (by identity: a module built from JSON holds lists, which do not hash) and the
# static settings are jit's static arguments, so a second call with the same model object and
# settings compiles nothing. `chunk` bounds memory: how many
# steps (or samples, or patch positions) are vmapped at once; None vmaps them all.

IG_METHODS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def ig_quadrature(steps: int, method: str = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """(alphas, step sizes) of the path integral over [0, 1], captum's rules under captum's names."""
    if method not in IG_METHODS:
        raise UserError(f"unknown integration method {method!r}; known: {', '.join(IG_METHODS)}")
    if steps < (1 if method == "gausslegendre" else 2):
        raise UserError(f"integrated gradients with {method} need more steps than {steps}")
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (1 + nodes), 0.5 * weights
    sizes = np.full(steps, 1 / steps)
    alphas = {"riemann_left": np.linspace(0, 1 - 1 / steps, steps),
              "riemann_right": np.linspace(1 / steps, 1, steps),
              "riemann_middle": np.linspace(1 / (2 * steps), 1 - 1 / (2 * steps), steps),
              "riemann_trapezoid": np.linspace(0, 1, steps)}[method]
    if method == "riemann_trapezoid":
        sizes[[0, -1]] /= 2
    return alphas, sizes


def _target_score(model, variables, target):
    """z -> the sum over the batch of each image's logit of its target class (images are
    independent in eval mode, so the gradient of the sum is each image's own gradient)."""
    import jax.numpy as jnp

    def score(z):
        logits = model.apply(variables, z, train=False)
        return jnp.take_along_axis(logits, target[:, None], axis=1).sum()
    return score


def _targets(model, variables, x, target):
    import jax.numpy as jnp

    if target is None:
        return jnp.argmax(model.apply(variables, x, train=False), -1).astype(jnp.int32)
    return jnp.broadcast_to(jnp.asarray(target, jnp.int32), (x.shape[0],))


def _as_target(target):
    return None if target is None else np.asarray(target, np.int32)


def _as_input(x, like=None):
    """float32, or float64 for a float64 input while JAX's x64 mode is on (the float64 checks
    against captum); like: broadcast to its shape, in its dtype."""
    import jax.numpy as jnp

    x = jnp.asarray(x)
    if like is not None:
        return jnp.broadcast_to(x.astype(like.dtype), like.shape)
    return x.astype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)


def integrated_gradients(model, variables, images, target=None, baseline=None, steps: int = 50,
                         method: str = "gausslegendre", chunk: int | None = None):
    """Integrated gradients (Sundararajan et al. 2017) along the straight path baseline -> x.

    baseline: an array broadcastable to the input (default zeros of the model input, captum's);
    method: one of IG_METHODS (captum's `method`). Returns (attributions, targets)."""
    x = _as_input(images)
    base = _as_input(0.0 if baseline is None else baseline, x)
    alphas, sizes = ig_quadrature(steps, method)
    # As captum: the alphas exact (rounded once, to the input's dtype), the step sizes float32
    # whatever the input's dtype (captum's `torch.tensor(step_sizes).float()`).
    return _integrated_gradients(_Same(model), variables, x, base, _as_target(target), alphas.tobytes(),
                                 sizes.astype(np.float32).tobytes(), chunk)


class _Same:
    """A module as a static argument of jit, hashed by identity."""

    def __init__(self, module):
        self.module = module

    def __hash__(self):
        return id(self.module)

    def __eq__(self, other):
        return isinstance(other, _Same) and other.module is self.module


def _vmap_chunks(f, xs, chunk):
    """f over the leading axis of xs, vmapped in chunks of `chunk` (all at once when None)."""
    import jax

    return jax.vmap(f)(xs) if chunk is None else jax.lax.map(f, xs, batch_size=chunk)


def _jit(static: tuple):
    """jax.jit with static argument names and the default device's fastest kernels
    (jaxcell.kernels), built on the first call (importing this module imports no jax)."""
    import functools

    def decorate(f):
        compiled = []

        @functools.wraps(f)
        def call(*args, **kwargs):
            if not compiled:
                from jaxcell import kernels

                compiled.append(kernels.jit(f, kernels.for_devices(), static_argnames=static))
            return compiled[0](*args, **kwargs)
        return call
    return decorate


@_jit(("model", "alphas", "sizes", "chunk"))
def _integrated_gradients(model, variables, x, base, target, alphas, sizes, chunk):
    import jax
    import jax.numpy as jnp

    model = model.module
    alphas = jnp.asarray(np.frombuffer(alphas, np.float64).astype(x.dtype))
    sizes = jnp.asarray(np.frombuffer(sizes, np.float32).astype(x.dtype))
    target = _targets(model, variables, x, target)
    score = _target_score(model, variables, target)
    grads = _vmap_chunks(lambda a: jax.grad(score)(base + a * (x - base)), alphas, chunk)
    return jnp.tensordot(sizes, grads, axes=1) * (x - base), target


def gradient_shap(model, variables, images, baselines, key, samples: int = 20, stdev: float = 0.1,
                  target=None, chunk: int | None = None):
    """Gradient SHAP (expected gradients, Lundberg & Lee 2017; captum's GradientShap): the mean
    over `samples` draws of grad(b + a (x' - b)) * (x' - b), with b drawn from `baselines`
    (B, H, W, C), a ~ U(0, 1) and x' = x + N(0, stdev^2) noise. Deterministic for a given key.
    Returns (attributions, targets)."""
    x = _as_input(images)
    b = _as_input(baselines)
    if b.ndim != x.ndim or b.shape[1:] != x.shape[1:]:
        raise UserError(f"gradient SHAP needs baselines shaped (B, {', '.join(map(str, x.shape[1:]))}), "
                        f"got {tuple(b.shape)}")
    if samples < 1:
        raise UserError(f"gradient SHAP needs at least one sample, got {samples}")
    return _gradient_shap(_Same(model), variables, x, b, key, _as_target(target), samples, float(stdev), chunk)


@_jit(("model", "samples", "stdev", "chunk"))
def _gradient_shap(model, variables, x, baselines, key, target, samples, stdev, chunk):
    import jax

    model = model.module
    target = _targets(model, variables, x, target)
    score = _target_score(model, variables, target)
    n = x.shape[0]

    def one(k):
        kb, ka, kn = jax.random.split(k, 3)
        b = baselines[jax.random.randint(kb, (n,), 0, baselines.shape[0])]
        a = jax.random.uniform(ka, (n,) + (1,) * (x.ndim - 1))
        noisy = x + stdev * jax.random.normal(kn, x.shape)
        return jax.grad(score)(b + a * (noisy - b)) * (noisy - b)

    return _vmap_chunks(one, jax.random.split(key, samples), chunk).mean(0), target


def occlusion_masks(height: int, width: int, window: int, stride: int) -> np.ndarray:
    """(P, H, W) float32: one square patch per position, row by row, patches wholly inside."""
    if not 1 <= window <= min(height, width) or stride < 1:
        raise UserError(f"occlusion window {window} and stride {stride} do not fit a {height}x{width} input")
    rows, cols = range(0, height - window + 1, stride), range(0, width - window + 1, stride)
    masks = np.zeros((len(rows) * len(cols), height, width), np.float32)
    for p, (r, c) in enumerate((r, c) for r in rows for c in cols):
        masks[p, r:r + window, c:c + window] = 1
    return masks


def occlusion(model, variables, images, window: int = 8, stride: int = 4, baseline=0.0, target=None,
              chunk: int | None = None):
    """Occlusion (Zeiler & Fergus 2014; captum's Occlusion with sliding window (C, w, w) and
    strides (C, s, s)): each patch over all channels is replaced by the baseline, and every
    pixel gets the mean drop of its target logit over the patches that cover it (0 where none
    does). Returns (attributions, targets)."""
    x = _as_input(images)
    masks = occlusion_masks(x.shape[1], x.shape[2], int(window), int(stride))
    return _occlusion(_Same(model), variables, x, _as_input(baseline, x), masks,
                      _as_target(target), chunk)


@_jit(("model", "chunk"))
def _occlusion(model, variables, x, base, masks, target, chunk):
    import jax.numpy as jnp

    model = model.module
    target = _targets(model, variables, x, target)

    def logit(z):
        return jnp.take_along_axis(model.apply(variables, z, train=False), target[:, None], axis=1)[:, 0]

    full = logit(x)

    def drop(m):
        m = m[None, :, :, None]
        return full - logit(x * (1 - m) + base * m)                             # (N,)

    drops = _vmap_chunks(drop, masks, chunk)                                     # (P, N)
    count = masks.sum(0)
    total = jnp.einsum("pn,phw->nhw", drops, masks)
    attr = jnp.where(count > 0, total / jnp.where(count > 0, count, 1), 0.0)
    return jnp.broadcast_to(attr[..., None], x.shape), target


# ---------------------------------------------------------------------------------------------
# `jaxcell predict --explain`: every method on uint8 images, one overlay and one .npy per image.

EXPLAIN_BATCH = 8      # images explained at once (each carries its steps or samples)
EXPLAIN_CHUNK = 10     # steps, samples or patches vmapped at once: bounds memory


def attribution_map(attributions: np.ndarray) -> np.ndarray:
    """(..., H, W, C) attributions -> (..., H, W) evidence for the class: the channel sum, where
    a pixel's channels add up to its contribution (integrated gradients' completeness)."""
    return np.asarray(attributions, np.float32).sum(-1)


def display_map(attributions: np.ndarray) -> np.ndarray:
    """An overlay's [0, 1] map: |channel sum| over its 99th percentile (a few extreme pixels
    would otherwise wash out the rest)."""
    m = np.abs(attribution_map(attributions))
    top = np.percentile(m, 99)
    return np.clip(m / top, 0, 1) if top > 0 else np.zeros_like(m)


def explain_batch(method: str, model, variables, x, steps: int | None = None, key_seed: int = 0):
    """(attributions NHWC float32, targets) of the predicted class for model inputs x. Integrated
    gradients with captum's defaults (Gauss-Legendre, 50 steps, zeros); SHAP over the zeros image
    and 7 Gaussian-noise images (fixed key, 20 samples); occlusion with a patch of 1/8 of the
    side moved by half a patch; Grad-CAM's map as one channel."""
    import jax

    x = np.asarray(x, np.float32)
    if method == "ig":
        attr, t = integrated_gradients(model, variables, x, steps=steps or 50, chunk=EXPLAIN_CHUNK)
    elif method == "shap":
        key = jax.random.key(key_seed)
        noise = np.asarray(jax.random.normal(key, (7,) + x.shape[1:]), np.float32)
        baselines = np.concatenate([np.zeros((1,) + x.shape[1:], np.float32), noise])
        attr, t = gradient_shap(model, variables, x, baselines, jax.random.fold_in(key, 1), samples=steps or 20,
                                chunk=EXPLAIN_CHUNK)
    elif method == "occlusion":
        window = max(x.shape[1] // 8, 1)
        attr, t = occlusion(model, variables, x, window=window, stride=max(window // 2, 1), chunk=EXPLAIN_CHUNK)
    elif method == "gradcam":
        cam = gradcam(model, variables, x)
        return cam.maps[..., None].astype(np.float32), cam.class_index
    else:
        raise UserError(f"unknown explanation {method!r}; known: gradcam, ig, shap, occlusion")
    return np.asarray(attr, np.float32), np.asarray(t)


def write_explanations(method: str, model, variables: dict, preprocessing: dict, images: np.ndarray,
                       names: list[str], out_dir: str, steps: int | None = None,
                       batch_size: int = EXPLAIN_BATCH) -> list[str]:
    """Overlay PNG and raw attributions (1, H, W, C) .npy per image, named after it; the PNG paths."""
    import os

    from PIL import Image

    from jaxcell.train import prepare

    os.makedirs(out_dir, exist_ok=True)
    written = []
    step = min(batch_size, EXPLAIN_BATCH)
    for start in range(0, len(images), step):
        chunk = images[start:start + step]
        attr, _ = explain_batch(method, model, variables, prepare(chunk, preprocessing), steps)
        for k, image in enumerate(chunk):
            i = start + k
            stem = os.path.join(out_dir, f"{i:04d}_{os.path.splitext(os.path.basename(names[i]))[0]}_{method}")
            np.save(stem + ".npy", attr[k:k + 1])
            shown = attr[k, ..., 0] if method == "gradcam" else display_map(attr[k])
            Image.fromarray(overlay(image, shown)).save(stem + ".png")
            written.append(stem + ".png")
    return written
