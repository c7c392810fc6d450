"""The reference PyTorch trainer: `python -m torch_ref.train`, with the flags of `jaxcell train`.

    python -m torch_ref.train --model lightnetcell --image-size 64 --epochs 2 --workdir runs/torch

Same data and splits (jaxcell.data.load), same batch order (epoch_order: a permutation drawn from
(seed, epoch), batches taken in order and sorted), Adam with optax.adam's defaults on the same
learning-rate schedule (linear warm-up, then cosine decay or constant), softmax cross-entropy,
the same augmentation (random resized crops, dihedral symmetries, HED stain jitter, hue rotation,
colour jitter; the same formulas, torch's own random numbers), the same input normalization. It writes what
`jaxcell train` writes, in the same shapes: config.json, metrics.jsonl (epoch, step, train_loss,
train_accuracy, val_loss, val_accuracy, seconds), and instead of Orbax checkpoints the state
dicts last.safetensors and best.safetensors (by validation accuracy) with their sidecars, which
`torch_ref.load` reads and `jaxcell import --torch` turns into a jaxcell workdir.

The model, optimizer and augmentation here are torch only. The settings and their flags come
from jaxcell.settings, each model's input normalization and learning rate from jaxcell.twins, and
the data from jaxcell.data (numpy, Pillow; TFDS for class folders): none of them imports jax, so
this trainer runs without jax installed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import torch_ref
from jaxcell import data, settings, twins  # plain Python: no jax (tests/test_imports.py)
from torch_ref import io
from torch_ref.preprocessing import standardize

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
ADAM = {"betas": (0.9, 0.999), "eps": 1e-8}  # optax.adam's defaults

# Ruifrok & Johnston's haematoxylin / eosin / DAB optical-density vectors (rows), as in
# jaxcell.data.augment (and scikit-image's rgb2hed).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_LOG_FLOOR = math.log(1e-6)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """jaxcell.train.epoch_order, copied (that module imports jax): the same batches, in the same order."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def learning_rate(step: int, lr: float, total_steps: int, warmup_steps: int | None, schedule: str) -> float:
    """jaxcell.train.learning_rate at update `step` (0-based, as optax counts): a linear warm-up
    from 0 over warmup_steps (default a tenth of the run), then cosine decay to 1% of lr over the
    rest of the run ("cosine") or lr ("constant")."""
    warmup = warmup_steps if warmup_steps is not None else max(1, total_steps // 10)
    warmup = min(warmup, total_steps)
    if step < warmup:
        return lr * step / warmup
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise io.UserError(f"unknown learning-rate schedule {schedule!r}; use cosine or constant")
    decay = max(total_steps, warmup + 1) - warmup
    t = min(step - warmup, decay) / decay
    return lr * (0.99 * 0.5 * (1 + math.cos(math.pi * t)) + 0.01)


# ----------------------------------------------------------------------------- augmentation
# The formulas of jaxcell.data.augment on float NHWC images in [0, 1]; the random factors are
# arguments, so the same factors give the same images as the jax functions.

def dihedral(x: torch.Tensor, flip_h: torch.Tensor, flip_v: torch.Tensor, transpose: torch.Tensor) -> torch.Tensor:
    """Per image (bool (N,) each): mirror left-right, mirror up-down, swap H and W."""
    m = lambda b: b.reshape(-1, 1, 1, 1)  # noqa: E731
    x = torch.where(m(flip_h), x.flip(2), x)
    x = torch.where(m(flip_v), x.flip(1), x)
    return torch.where(m(transpose), x.transpose(1, 2), x)


def hed_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Stain s -> s * alpha + beta in HED space; alpha, beta (N, 1, 1, 3)."""
    od = torch.log(x.clamp(min=1e-6)) / _LOG_FLOOR
    stains = od @ HED_FROM_RGB.to(x.dtype)
    od = (stains * alpha + beta) @ RGB_FROM_HED.to(x.dtype)
    return torch.exp(od * _LOG_FLOOR).clamp(0.0, 1.0)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                 saturation: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation factors (N, 1, 1, 1)."""
    x = x * brightness
    grey = x.mean(-1, keepdim=True).mean((1, 2), keepdim=True)
    x = (x - grey) * contrast + grey
    grey = x.mean(-1, keepdim=True)
    x = (x - grey) * saturation + grey
    return x.clamp(0.0, 1.0)


ASPECT_RANGE = (3 / 4, 4 / 3)  # jaxcell.data.augment.ASPECT_RANGE


def crop_boxes(u: torch.Tensor, min_scale: float, height: int, width: int):
    """jaxcell.data.augment.crop_boxes: (top, left, height, width) in pixels from uniform u (4, N)."""
    area = min_scale + (1.0 - min_scale) * u[0]
    lo, hi = math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])
    log_aspect = torch.minimum(torch.maximum(lo + (hi - lo) * u[1], torch.log(area)), -torch.log(area))
    h = height * torch.sqrt(area * torch.exp(-log_aspect)).clamp(max=1.0)
    w = width * torch.sqrt(area * torch.exp(log_aspect)).clamp(max=1.0)
    return (height - h) * u[2], (width - w) * u[3], h, w


def _bilinear_axis(x: torch.Tensor, start: torch.Tensor, length: torch.Tensor, dim: int) -> torch.Tensor:
    """Axis 1 or 2 of NHWC resampled to cover [start, start + length) (jaxcell.data.augment._bilinear_axis)."""
    size = x.shape[dim]
    pixels = torch.arange(size, dtype=x.dtype, device=x.device)
    centres = start[:, None] + (pixels + 0.5) * (length[:, None] / size) - 0.5
    below = torch.floor(centres)
    frac = centres - below
    i0 = below.clamp(0, size - 1).long()
    i1 = (below + 1).clamp(0, size - 1).long()
    shape = (-1, size, 1, 1) if dim == 1 else (-1, 1, size, 1)
    take = lambda i: torch.gather(x, dim, i.reshape(shape).expand(*[-1 if d == dim else s  # noqa: E731
                                                                    for d, s in enumerate(x.shape)]))
    frac = frac.reshape(shape)
    return take(i0) * (1.0 - frac) + take(i1) * frac


def resized_crop(x: torch.Tensor, u: torch.Tensor, min_scale: float) -> torch.Tensor:
    """A crop per image from uniform draws u (4, N) (crop_boxes), resized back to H x W, bilinear."""
    top, left, h, w = crop_boxes(u, min_scale, x.shape[1], x.shape[2])
    return _bilinear_axis(_bilinear_axis(x, top, h, 1), left, w, 2)


def hue_matrices(turns: torch.Tensor) -> torch.Tensor:
    """jaxcell.data.augment.hue_matrices: rotations about the grey axis by `turns` (N,) of a turn."""
    theta = (2 * math.pi * turns.double())[:, None, None]
    k = torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64)
    cross = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]], dtype=torch.float64)
    m = torch.cos(theta) * torch.eye(3, dtype=torch.float64) + torch.sin(theta) * cross \
        + (1 - torch.cos(theta)) * torch.outer(k, k)
    return m.float()


def hue_rotate(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Hue rotated per image by `turns` (N,) of a full turn."""
    return torch.einsum("nhwc,ndc->nhwd", x, hue_matrices(turns).to(x.device, x.dtype)).clamp(0.0, 1.0)


def augment(x: torch.Tensor, generator: torch.Generator, stain: float = 0.05, color: float = 0.1,
            crop: float = 1.0, hue: float = 0.0) -> torch.Tensor:
    """jaxcell's training augmentation (jaxcell.data.augment.augment), drawn from `generator`."""
    n = x.shape[0]
    u = lambda *shape: torch.rand(shape, generator=generator).to(x.device)  # noqa: E731
    if crop < 1.0:
        x = resized_crop(x, u(4, n), crop)
    x = dihedral(x, *(u(3, n) < 0.5))
    if stain:
        x = hed_jitter(x, 1 - stain + 2 * stain * u(n, 1, 1, 3), -stain + 2 * stain * u(n, 1, 1, 3))
    if hue:
        x = hue_rotate(x, -hue + 2 * hue * u(n))
    if color:
        b, c, s = 1 - color + 2 * color * u(3, n, 1, 1, 1)
        x = color_jitter(x, b, c, s)
    return x


def model_input(images_uint8: np.ndarray, preprocessing: dict, device, generator: torch.Generator | None = None,
                augmentation: dict | None = None) -> torch.Tensor:
    """uint8 NHWC -> the model's NCHW float input, augmented when `augmentation` is given."""
    if augmentation is None:
        return io.preprocess(images_uint8, preprocessing).to(device)
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(device).float() / 255.0
    x = augment(x, generator, **augmentation)
    return standardize(x.permute(0, 3, 1, 2), preprocessing).contiguous()


# ----------------------------------------------------------------------------- the loop

@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: np.ndarray, preprocessing: dict, batch_size: int,
                   device) -> np.ndarray:
    model.eval()
    out = [model(model_input(images[i:i + batch_size], preprocessing, device)).float().cpu().numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _validate(model, dataset, preprocessing, batch_size, device) -> dict:
    images, labels = dataset.splits.get("val", (None, None))
    if images is None or len(labels) == 0:
        return {}
    logits = torch.from_numpy(predict_logits(model, images, preprocessing, batch_size, device))
    labels_t = torch.from_numpy(np.asarray(labels)).long()
    return {"val_loss": float(F.cross_entropy(logits.double(), labels_t)),
            "val_accuracy": float((logits.argmax(-1) == labels_t).double().mean())}


def train(config: settings.TrainConfig, dataset, preprocessing: dict, workdir: str, overwrite: bool = False,
          device: str | None = None, log=print) -> list[dict]:
    """Train as `jaxcell train` does; returns the metrics history. The settings jaxcell's trainer
    has alone (checkpoint_every, input_pipeline, precision, fine-tuning) stay at their defaults."""
    if os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
        if not overwrite:
            raise io.WeightsError(f"{workdir} already holds a run; pass --overwrite to start again")
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images, labels = dataset.splits["train"]
    steps_per_epoch = len(labels) // config.batch_size
    if steps_per_epoch == 0:
        raise io.WeightsError(f"the training split has {len(labels)} images, fewer than one batch of "
                              f"{config.batch_size}")

    model_kwargs = {"num_classes": len(dataset.class_names), "image_size": config.image_size, **config.model_kwargs}
    torch.manual_seed(config.seed)
    model = torch_ref.create(config.model, **model_kwargs).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, **ADAM)
    generator = torch.Generator().manual_seed(config.seed)
    augmentation = None if not config.augment else {"stain": config.stain_jitter, "color": config.color_jitter,
                                                    "crop": config.crop_scale, "hue": config.hue_jitter}
    record = {
        "model": config.model,
        "model_kwargs": model_kwargs,
        "class_names": list(dataset.class_names),
        "preprocessing": preprocessing,
        "data": {"source": dataset.source, "split_note": dataset.split_note,
                 "sizes": {k: int(len(v[1])) for k, v in dataset.splits.items()}},
        "train": config.to_dict(),  # jaxcell's own record, so jaxcell reads this workdir as its own
        "framework": "torch",
    }
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        json.dump(record, f, indent=2)

    total_steps = steps_per_epoch * config.epochs
    history, best, step, start = [], -math.inf, 0, time.perf_counter()
    for epoch in range(config.epochs):
        order = epoch_order(config.seed, epoch, len(labels))
        sums = np.zeros(2)
        model.train()
        for i in range(steps_per_epoch):
            idx = np.sort(order[i * config.batch_size:(i + 1) * config.batch_size])
            x = model_input(images[idx], preprocessing, device, generator, augmentation)
            y = torch.from_numpy(np.asarray(labels[idx])).long().to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, config.lr, total_steps, config.warmup_steps, config.schedule)
            opt.step()
            step += 1
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise io.WeightsError(f"training diverged at step {step} (epoch {epoch + 1}): loss {loss_value}; "
                                      f"try a lower --lr")
            sums += (loss_value, (logits.argmax(-1) == y).float().mean().item())
        entry = {"epoch": epoch + 1, "step": step, "train_loss": sums[0] / steps_per_epoch,
                 "train_accuracy": sums[1] / steps_per_epoch,
                 **_validate(model, dataset, preprocessing, config.batch_size, device),
                 "seconds": round(time.perf_counter() - start, 2)}
        history.append(entry)
        with open(os.path.join(workdir, METRICS_FILE), "a") as f:
            f.write(json.dumps(entry) + "\n")
        _save(model, record, os.path.join(workdir, "last.safetensors"), epoch + 1, step)
        if entry.get("val_accuracy", 0.0) > best or not history[:-1]:
            best = entry.get("val_accuracy", 0.0)
            _save(model, record, os.path.join(workdir, "best.safetensors"), epoch + 1, step)
        log(f"epoch {epoch + 1}/{config.epochs}  loss {entry['train_loss']:.4f}  acc {entry['train_accuracy']:.4f}"
            + (f"  val_loss {entry['val_loss']:.4f}  val_acc {entry['val_accuracy']:.4f}"
               if "val_loss" in entry else "")
            + f"  {entry['seconds']:.1f}s")
    return history


def _save(model, record: dict, path: str, epoch: int, step: int) -> None:
    from jaxcell import __version__

    metadata = {k: record[k] for k in ("model", "model_kwargs", "class_names", "preprocessing")}
    metadata["jaxcell_version"] = __version__
    metadata["source"] = {"framework": "torch", "workdir": os.path.abspath(os.path.dirname(path)),
                          "epoch": epoch, "step": step}
    io.write(path, model.state_dict(), metadata, "safetensors")


# ----------------------------------------------------------------------------- the command

def build_parser() -> argparse.ArgumentParser:
    t = argparse.ArgumentParser(prog="python -m torch_ref.train",
                                description="Train a torch_ref model as `jaxcell train` trains its twin.")
    settings.add_flags(t, twin=True)  # the settings both trainers have, defined once in jaxcell.settings
    t.add_argument("--workdir", required=True)
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --workdir")
    t.add_argument("--cache-dir", help="where decoded datasets are cached (default ~/.cache/jaxcell)")
    t.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return t


def main(argv: list[str] | None = None) -> int:
    args = settings.fill(build_parser().parse_args(argv), twin=True)
    try:
        try:
            config = settings.from_flags(args, default_lr=lambda name: twins.model_preset(name)["lr"], twin=True)
            torch_ref.create(config.model, image_size=config.image_size, **config.model_kwargs)  # fail before work
        except (ValueError, TypeError) as error:
            raise io.UserError(str(error)) from None
        preprocessing = twins.preprocessing(config.model, config.image_size, config.od_center)
        dataset = data.load(config.data, config.image_size, seed=data.split_seed(config.to_dict()),
                            synthetic_examples=config.synthetic_examples, cache_dir=args.cache_dir)
        print(f"{config.model} (torch) on {dataset.source}: "
              + ", ".join(f"{k} {len(v[1])}" for k, v in dataset.splits.items()))
        history = train(config, dataset, preprocessing, args.workdir, args.overwrite, args.device)
    except io.UserError as error:
        print(f"torch_ref.train: error: {error}", file=sys.stderr)
        return 2
    last = history[-1] if history else {}
    print(f"trained {config.model} (torch); last val accuracy {last.get('val_accuracy', float('nan')):.4f}; "
          f"workdir {args.workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
