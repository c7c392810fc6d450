"""Checkpoints for either framework.

    export_workdir("runs/a", "model.safetensors")          # a jaxcell run -> a torch_ref state dict
    import_torch("model.safetensors", "runs/imported")     # a torch_ref state dict -> a jaxcell workdir

The exported file is the state dict that `torch_ref.create(name, **kw).load_state_dict(sd,
strict=True)` takes (BatchNorm running_var in torch's unbiased convention, num_batches_tracked
included), as safetensors or torch.save, with the sidecar FILE + ".json" that `torch_ref.load`
reads (see torch_ref/io.py). An imported file becomes a workdir like one `jaxcell train` writes:
config.json and an Orbax checkpoint of a whole TrainState (fresh Adam moments, step 0), so
evaluate, predict and `train --resume` (fine-tuning from the imported weights) work on it.
Conversion is exact both ways: flax -> torch -> flax gives the same bits.

This module is the one place jaxcell reads or writes torch's files (export, import, predict and
serve of an exported file, `train --init-from`). Its imports of parity and torch_ref (and so of
torch) happen inside its functions, so that training, evaluation and prediction of jaxcell's own
runs import no torch (tests/test_imports.py).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

import jaxcell
from jaxcell import models
from jaxcell.checkpoint import Checkpoints
from jaxcell.errors import UserError


def export_workdir(workdir: str, out: str, format: str | None = None,
                   checkpoint: str | int = "best") -> tuple[str, str]:
    """Write the weights of a trained workdir as a torch_ref state dict; (weights, sidecar) paths."""
    import parity
    from jaxcell.train import restore_for_inference
    from torch_ref import io

    fmt = io.format_of(out, format)
    state, record, _, _ = restore_for_inference(workdir, checkpoint)
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    state_dict = parity.flax_to_torch(record["model"], variables, **record["model_kwargs"])
    metadata = {
        "model": record["model"],
        "model_kwargs": record["model_kwargs"],
        "class_names": record["class_names"],
        "preprocessing": record["preprocessing"],
        "jaxcell_version": jaxcell.__version__,
        "source": {"framework": "jax", "workdir": os.path.abspath(workdir), "checkpoint": str(checkpoint),
                   "step": int(state.step),
                   # what trained the weights (jaxcell.kernels.convolutions, in config.json); None: not recorded
                   "convolutions": record.get("convolutions")},
    }
    return io.write(out, state_dict, metadata, fmt)


def torch_variables(path: str, model: str, **model_kwargs) -> dict:
    """Flax variables of `model` from a torch state dict as it is, sidecar or not (torchvision's
    own files included): `train --init-from`. Tensors whose shapes differ from the model's (a head
    for other classes) come back as they are; the caller decides what to keep."""
    import parity
    from torch_ref.io import read_state_dict

    return parity.torch_to_flax(model, read_state_dict(path), **model_kwargs)


def default_metadata(name: str, model_kwargs: dict, num_classes: int) -> dict:
    """What a file without a sidecar is taken to be: the model's registered preprocessing, and
    the four class names when it has four classes (class0.. otherwise)."""
    names = list(jaxcell.CLASS_NAMES) if num_classes == len(jaxcell.CLASS_NAMES) else \
        [f"class{i}" for i in range(num_classes)]
    image_size = model_kwargs["image_size"]
    return {"model": name, "model_kwargs": model_kwargs, "class_names": names,
            "preprocessing": {**models.spec(name).preprocessing, "image_size": image_size}}


def read_torch(path: str, model: str | None = None, model_kwargs: dict | None = None,
               format: str | None = None) -> tuple[dict, dict]:
    """(metadata, flax variables) of a torch_ref state dict (.safetensors, .pt/.pth): the model name
    and arguments from the sidecar when there is one (`model` must then agree), else from `model`
    and `model_kwargs` (num_classes read from the weights). Nothing is written."""
    import parity
    from parity.convert import _resolve_kwargs
    from torch_ref import io

    metadata = io.read_metadata(path, required=False)
    state_dict = io.read_state_dict(path, format)  # refuses a hostile or broken file before anything else
    if metadata is not None:
        if model is not None and model != metadata["model"]:
            raise UserError(f"{path} holds a {metadata['model']!r} model (its sidecar says so), not {model!r}")
        if model_kwargs:
            raise UserError(f"{path} has a sidecar with the model's arguments; drop --model-arg/--image-size")
        name = metadata["model"]
    else:
        if model is None:
            raise UserError(f"{path} has no sidecar ({io.sidecar_path(path)}): pass --model NAME "
                            f"(one of {', '.join(models.names())})")
        name = models.spec(model).name
        shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        kw = _resolve_kwargs(name, dict(model_kwargs or {}), shapes, "torch")
        metadata = default_metadata(name, kw, kw["num_classes"])
    return metadata, parity.torch_to_flax(name, state_dict, **dict(metadata["model_kwargs"]))


def import_torch(path: str, workdir: str, model: str | None = None, model_kwargs: dict | None = None,
                 overwrite: bool = False, format: str | None = None) -> dict:
    """Make a jaxcell workdir from a torch_ref state dict (.safetensors, .pt/.pth); see `read_torch`
    for where the model's name and arguments come from. Returns the config record."""
    from jaxcell.train import CONFIG_FILE, TrainConfig, init_state, make_optimizer, prepare_workdir

    metadata, variables = read_torch(path, model, model_kwargs, format)
    name = metadata["model"]
    kw = dict(metadata["model_kwargs"])

    image_size = int(kw["image_size"])
    extra = {k: v for k, v in kw.items() if k not in ("num_classes", "image_size")}
    config = TrainConfig(model=name, model_kwargs=extra, image_size=image_size, data=None)
    prepare_workdir(workdir, config, resume=False, overwrite=overwrite)
    flax_model = models.create(name, **kw)
    template = init_state(flax_model, make_optimizer(config), image_size, jax.random.key(0))
    state = template.replace(params=_like(variables["params"], template.params),
                             batch_stats=_like(variables.get("batch_stats", {}), template.batch_stats))
    record = {
        "model": name,
        "model_kwargs": kw,
        "class_names": list(metadata["class_names"]),
        "preprocessing": dict(metadata["preprocessing"]),
        "data": {"source": f"imported from {os.path.abspath(path)}", "split_note": "", "sizes": {}},
        "train": config.to_dict(),
        "imported": {"file": os.path.abspath(path), "jaxcell_version": metadata.get("jaxcell_version"),
                     "source": metadata.get("source")},
    }
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        json.dump(record, f, indent=2)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))
    try:
        checkpoints.save(0, state, force=True)
    finally:
        checkpoints.close()
    return record


def _like(values, template):
    """`values` as arrays of the template's dtypes (torch_to_flax fills the same tree: it checked)."""
    return jax.tree.map(lambda t, v: jnp.asarray(v, dtype=t.dtype), template, values)
