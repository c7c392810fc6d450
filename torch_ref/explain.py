"""Grad-CAM for the torch_ref models: the twin of jaxcell.explain.gradcam, with forward hooks.

    cam = gradcam(model, x)          # x: NCHW float32, the model's preprocessed input
    cam["maps"]  (N, H, W) in [0, 1]; cam["raw"] (N, h, w); cam["class_index"]; cam["layer"]

The target layer is named by its torch module path ("block3", "layer4.1"); the flax spelling
"layer4_1" is accepted too. The default per model is declared once, in jaxcell.twins.TARGET_LAYERS,
and resolved the same way: of the modules whose path (in the flax spelling) matches, the one that
runs last. A token sequence (N, L, E) with L = g * g is read as a g x g grid.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F

import torch_ref
from jaxcell.twins import TARGET_LAYERS, flax_path  # plain Python: no jax


def flax_spelling(path: str) -> str:
    """The naming rule of the twins: `layer4.1.conv1` -> `layer4_1/conv1`."""
    return "/".join(flax_path(path))


def _registered_name(model: torch.nn.Module) -> str | None:
    return next((n for n, cls in torch_ref.REGISTRY.items() if type(model) is cls), None)


def _candidates(model: torch.nn.Module, target_layer: str | None) -> tuple[dict[str, torch.nn.Module], str]:
    modules = {flax_spelling(n): m for n, m in model.named_modules() if n}
    if target_layer is not None:
        want = flax_spelling(target_layer)
        if want not in modules:
            raise ValueError(f"the model has no layer {target_layer!r}; its layers: {', '.join(modules)}")
        return {want: modules[want]}, "exact"
    pattern = TARGET_LAYERS.get(_registered_name(model))
    if pattern is None:
        return modules, "last 4-D"
    hits = {p: m for p, m in modules.items() if re.fullmatch(pattern, p)}
    if not hits:
        raise ValueError(f"no module matches the default Grad-CAM layer {pattern!r}; pass target_layer")
    return hits, "pattern"


def gradcam(model: torch.nn.Module, images: torch.Tensor, target_layer: str | None = None,
            class_index=None) -> dict:
    """Grad-CAM of `model` (put in eval mode here) on NCHW images. Returns numpy arrays."""
    model.eval()
    candidates, rule = _candidates(model, target_layer)
    outputs: list[tuple[str, torch.Tensor]] = []

    def hook(name):
        def keep(module, args, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.retain_grad()
            outputs.append((name, out))
        return keep

    handles = [m.register_forward_hook(hook(p)) for p, m in candidates.items()]
    x = images.detach().clone().requires_grad_(True)  # so every activation takes part in the graph
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    if rule == "last 4-D":
        outputs = [(p, o) for p, o in outputs if isinstance(o, torch.Tensor) and o.dim() == 4
                   and o.shape[2] * o.shape[3] > 1]
    if not outputs:
        raise ValueError("no Grad-CAM layer ran in the forward pass; pass target_layer")
    name, act = outputs[-1]
    if sum(p == name for p, _ in outputs) != 1:
        raise ValueError(f"layer {name!r} runs more than once in one forward pass; pick a layer that runs once")
    n = images.shape[0]
    if class_index is None:
        cls = logits.detach().argmax(-1)
    else:
        cls = torch.broadcast_to(torch.as_tensor(class_index, dtype=torch.long), (n,))
    logits.gather(1, cls[:, None]).sum().backward()
    a, g = act.detach(), act.grad
    if a.dim() == 3:  # (N, L, E) tokens -> (N, E, g, g), rows first as the model flattened them
        side = math.isqrt(a.shape[1])
        if side * side != a.shape[1]:
            raise ValueError(f"layer {name!r} outputs {tuple(a.shape)}: not a square token grid")
        a, g = (t.transpose(1, 2).reshape(n, -1, side, side) for t in (a, g))
    elif a.dim() != 4:
        raise ValueError(f"layer {name!r} outputs {tuple(a.shape)}: Grad-CAM needs a feature map")
    weights = g.mean(dim=(2, 3), keepdim=True)                     # (N, C, 1, 1)
    raw = torch.relu((weights * a).sum(1))                         # (N, h, w)
    up = F.interpolate(raw[:, None], size=tuple(images.shape[2:]), mode="bilinear", align_corners=False,
                       antialias=False)[:, 0]
    top = up.amax(dim=(1, 2), keepdim=True)
    maps = torch.where(top > 0, up / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(up))
    return {"maps": maps.numpy().astype(np.float32), "raw": raw.numpy().astype(np.float32),
            "class_index": cls.numpy(), "logits": logits.detach().numpy(), "layer": name}
