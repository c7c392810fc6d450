"""Exported models for PyTorch users: read and write a state dict with its sidecar, rebuild the
model, and prepare images exactly as jaxcell does. Torch, numpy and PIL only: never jax.

    model = torch_ref.load("lightnetcell.safetensors")        # eval mode, model.class_names set
    x = torch_ref.preprocess(["cell1.jpg", "cell2.png"], model)  # NCHW float32, as jaxcell prepares it
    probabilities = model(x).softmax(-1)

A model file is a plain state dict, as safetensors (recommended: the format holds only tensors)
or as a torch.save file, which is read with `torch.load(weights_only=True)` and so never runs
code from the file. Beside it lies the sidecar FILE + ".json" (`model.safetensors.json`): model
name, constructor arguments, class names, preprocessing, jaxcell version. A safetensors file also
carries the same JSON in its header metadata (key "jaxcell"), so it still loads if the sidecar
gets lost; a sidecar, when present, wins.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import torch_ref
from torch_ref.preprocessing import standardize
from jaxcell.data.images import load_image  # jaxcell's own decoder: PIL and numpy, no jax
from jaxcell.errors import UserError

SIDECAR_SUFFIX = ".json"
METADATA_KEY = "jaxcell"
FORMATS = {"safetensors": (".safetensors",), "torch": (".pt", ".pth", ".bin")}
_PREPROCESSING_KEYS = {"scale", "mean", "std", "image_size", "od_center"}


class WeightsError(UserError, ValueError):
    """A model file or sidecar that cannot be used: unreadable, hostile, or not what it claims."""


def sidecar_path(path: str | os.PathLike) -> str:
    return os.fspath(path) + SIDECAR_SUFFIX


def format_of(path: str | os.PathLike, format: str | None = None) -> str:
    """"safetensors" or "torch": the given format, else by the file's extension."""
    if format is not None:
        if format not in FORMATS:
            raise WeightsError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
        return format
    ext = os.path.splitext(os.fspath(path))[1].lower()
    for name, exts in FORMATS.items():
        if ext in exts:
            return name
    raise WeightsError(f"{os.fspath(path)}: cannot tell the format from the extension {ext!r}; "
                       f"name it .safetensors or .pt (or give the format)")


# ----------------------------------------------------------------------------- writing

def write(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: dict,
          format: str | None = None) -> tuple[str, str]:
    """Write the state dict and its sidecar (atomically: a crash leaves no half file); returns
    (weights path, sidecar path)."""
    path = os.fspath(path)
    fmt = format_of(path, format)
    check_metadata(metadata, path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(metadata)})
    else:
        torch.save(tensors, tmp)
    os.replace(tmp, path)
    side = sidecar_path(path)
    with open(side + ".partial", "w") as f:
        json.dump(metadata, f, indent=2)
    os.replace(side + ".partial", side)
    return path, side


# ----------------------------------------------------------------------------- reading

def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def read_state_dict(path: str | os.PathLike, format: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a model file, on the CPU. Nothing in the file is ever executed: safetensors
    holds only tensors, and torch.save files are unpickled with weights_only=True, which refuses
    any object other than tensors and plain containers. Anything else is a WeightsError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    fmt = format_of(path, format)
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an untrusted file may fail in any way; none of it is a bug of ours
        raise WeightsError(f"{path} is not a readable {fmt} state dict (refused, nothing in it was run): "
                           f"{_first_line(error)}") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    bad = next((k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise WeightsError(f"{path} is not a state dict: entry {bad!r} is a {type(obj[bad]).__name__}, "
                           f"not a tensor")
    return dict(obj)


def read_metadata(path: str | os.PathLike, required: bool = True) -> dict | None:
    """The sidecar (FILE.json) of a model file, else the metadata in a safetensors header; None
    (or a WeightsError if required) when there is neither."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    side = sidecar_path(path)
    text, where = None, side
    if os.path.isfile(side):
        with open(side, encoding="utf-8") as f:
            text = f.read()
    elif format_of(path) == "safetensors":
        try:
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                text = (f.metadata() or {}).get(METADATA_KEY)
        except Exception as error:
            raise WeightsError(f"{path} is not a readable safetensors file: {_first_line(error)}") from None
        where = f"{path} (header metadata)"
    if text is None:
        if required:
            raise WeightsError(f"{path} has no sidecar {side} (and no jaxcell metadata): "
                               f"the model name and arguments are unknown")
        return None
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise WeightsError(f"{where} is not valid JSON: {error}") from None
    check_metadata(metadata, where)
    return metadata


def check_metadata(metadata: Any, where: str) -> None:
    """Refuse a sidecar that lacks what load() needs, naming the field."""
    if not isinstance(metadata, dict):
        raise WeightsError(f"{where}: the sidecar must be a JSON object")
    for key, kind in (("model", str), ("model_kwargs", dict), ("class_names", list), ("preprocessing", dict)):
        if not isinstance(metadata.get(key), kind):
            raise WeightsError(f"{where}: field {key!r} is missing or not a {kind.__name__}")
    kw, names, pre = metadata["model_kwargs"], metadata["class_names"], metadata["preprocessing"]
    if kw.get("num_classes") != len(names):
        raise WeightsError(f"{where}: {len(names)} class names for num_classes={kw.get('num_classes')!r}")
    missing = sorted({"mean", "std", "image_size"} - set(pre))
    if missing:
        raise WeightsError(f"{where}: preprocessing lacks {', '.join(missing)}")
    unknown = sorted(set(pre) - _PREPROCESSING_KEYS)
    if unknown:  # a step we would silently skip would give other inputs than jaxcell's
        raise WeightsError(f"{where}: preprocessing step(s) {', '.join(unknown)} are unknown to this "
                           f"torch_ref; update jaxcell")


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", format: str | None = None) -> nn.Module:
    """The model of an exported file (jaxcell export, or python -m torch_ref.train), in eval mode,
    with attributes class_names, preprocessing, model_name and model_kwargs."""
    path = os.fspath(path)
    metadata = read_metadata(path)
    state_dict = read_state_dict(path, format)
    name, kwargs = metadata["model"], metadata["model_kwargs"]
    try:
        model = torch_ref.create(name, **kwargs)
    except (ValueError, TypeError) as error:
        raise WeightsError(f"{sidecar_path(path)}: {error}") from None
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:  # missing/unexpected keys or shapes: name the first lines
        detail = " ".join(str(error).split())[:400]
        raise WeightsError(f"{path} does not fit {name}({_args(kwargs)}): {detail}") from None
    model.class_names = list(metadata["class_names"])
    model.preprocessing = dict(metadata["preprocessing"])
    model.model_name, model.model_kwargs = name, dict(kwargs)
    return model.to(map_location).eval()


def _args(kw: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kw.items())


# ----------------------------------------------------------------------------- images

def preprocess(images_or_paths: Any, model: nn.Module | Mapping) -> torch.Tensor:
    """Image files, or uint8 images (N, H, W, 3) / (H, W, 3) as numpy arrays or tensors, ->
    the model's input: float32 NCHW, exactly as jaxcell prepares it (decode and resize to
    image_size with jaxcell's PIL logic, x / 255, (x - mean) / std). `model` is a loaded model
    or its preprocessing dict. The tensor is on the model's device."""
    pre = model.preprocessing if isinstance(model, nn.Module) else model
    if not isinstance(pre, Mapping) or not {"mean", "std", "image_size"} <= set(pre):
        raise WeightsError("preprocess needs a model from torch_ref.load (or its preprocessing dict)")
    size = int(pre["image_size"])
    images = _as_uint8(images_or_paths, size)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    x = standardize(x.float() / 255.0, pre)
    if isinstance(model, nn.Module):
        device = next(iter(model.parameters()), torch.empty(0)).device
        x = x.to(device)
    return x


def _as_uint8(images: Any, size: int) -> np.ndarray:
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, Sequence) and all(isinstance(p, (str, os.PathLike)) for p in images):
        if not images:
            raise WeightsError("no images given")
        return np.stack([load_image(os.fspath(p), size) for p in images])
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise WeightsError(f"expected image files or uint8 images (N, H, W, 3), got {arr.dtype} {arr.shape}")
    if arr.shape[1:3] != (size, size):
        arr = np.stack([_resize(a, size) for a in arr])
    return arr


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """What jaxcell's load_image does to a decoded RGB image of another size: PIL bilinear."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
