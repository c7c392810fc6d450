"""Layer-by-layer comparison of a jaxcell model with its torch_ref twin.

    jaxcell parity --model lightnetcell --image-size 64 --batch 3 --tolerance 1e-5

The torch twin gets random weights and random BatchNorm statistics (fresh running stats of 0 and 1
would hide a mean/var mix-up), is converted with `torch_to_flax`, and both run on the same random
images (uniform in [0, 1], normalized by the model's registered mean/std) in float32 at full
precision (jax "highest" matmul/conv precision, torch TF32 off). Every
named torch module's output (forward hook) is matched with the flax module of the same path
(`capture_intermediates`, by the naming rule); 4-D outputs are compared after NCHW -> NHWC.
Modules without a flax counterpart (torch's nn.ReLU, nn.MaxPool2d, nn.Dropout) are skipped; the
final logits are always compared.

Per layer: max_abs = max |flax - torch|, max_rel = max_abs / max(max |torch|, 1e-30).
The first layer whose max_rel exceeds the tolerance is where a bug starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxcell.models
import torch_ref
from jaxcell import kernels
from parity.convert import flax_module_path, torch_to_flax

_TINY = 1e-30
REL_DEFINITION = "max rel error = max|flax - torch| / max|torch| over the layer's output"


@dataclasses.dataclass(frozen=True)
class LayerDiff:
    layer: str                  # torch module path ("logits" for the model output)
    shape: tuple[int, ...]      # torch's shape (NCHW for feature maps)
    max_abs: float
    max_rel: float
    note: str = ""              # e.g. a shape mismatch between the twins

    def within(self, tolerance: float) -> bool:
        return self.max_rel <= tolerance  # NaN is never within


def randomize_torch_model(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make every number in the model informative, in place.

    Parameters that init to a constant (zero biases, unit norm scales, zero position embeddings)
    get noise added, and BatchNorm layers get random running mean, positive random variance and a
    random step count. Returns the model.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.normal_(0.0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=g)))
    return model


@contextlib.contextmanager
def _torch_full_precision() -> Iterator[None]:
    """TF32 off for torch matmuls and cuDNN convolutions (on by default for convs), restored after."""
    knobs = [torch.backends.cuda.matmul, torch.backends.cudnn.conv]
    saved = [k.fp32_precision for k in knobs]
    try:
        for k in knobs:
            k.fp32_precision = "ieee"
        yield
    finally:
        for k, v in zip(knobs, saved):
            k.fp32_precision = v


def _first_tensor(out: Any) -> Any:
    # nn.MultiheadAttention returns (output, weights); compare the output.
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out


def _torch_outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict[str, list], np.ndarray]:
    """Run in eval mode; every named module's outputs (one per call), in the order they complete."""
    records: dict[str, list[np.ndarray]] = {}

    def hook(name):
        def record(_module, _inputs, output):
            out = _first_tensor(output)
            if isinstance(out, torch.Tensor):
                records.setdefault(name, []).append(out.detach().cpu().numpy().copy())
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad(), _torch_full_precision():
            logits = _first_tensor(model.eval()(x))
    finally:
        for h in handles:
            h.remove()
    return records, logits.detach().cpu().numpy()


def _flax_outputs(model, variables: dict, x: np.ndarray) -> tuple[dict, np.ndarray]:
    """Run in eval mode with every module's outputs captured (keyed by flax module path), on the
    kernels jaxcell's own programs choose here (jaxcell.kernels): parity checks what they compute."""
    def run(variables, x):
        return model.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])

    # One compiled program, as jaxcell runs its models: op by op, each layer of a deep net compiled on its own
    # (DenseNet121 at 32 px: 451 programs, 17 s; jitted: one). Traced inside the contexts, which it reads.
    with jax.default_matmul_precision("highest"), kernels.use(kernels.for_devices()):
        logits, state = jax.jit(run)(variables, jnp.asarray(x))
    return jax.device_get(state["intermediates"]), np.asarray(logits)


def _captured(intermediates: dict, torch_path: str) -> tuple | None:
    node = intermediates
    for seg in flax_module_path(torch_path):
        if not isinstance(node, dict) or seg not in node:
            return None
        node = node[seg]
    calls = node.get("__call__") if isinstance(node, dict) else None
    return tuple(_first_tensor(c) for c in calls) if calls is not None else None


def _diff(layer: str, ref: np.ndarray, got: np.ndarray) -> LayerDiff:
    shape = tuple(ref.shape)
    if ref.ndim == 4:
        ref = ref.transpose(0, 2, 3, 1)
    got = np.asarray(got)
    if ref.shape != got.shape:
        return LayerDiff(layer, shape, math.inf, math.inf, f"flax shape {tuple(got.shape)}")
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    max_abs = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return LayerDiff(layer, shape, max_abs, max_abs / max(scale, _TINY))


def compare(name: str, image_size: int = 224, batch: int = 2, seed: int = 0, **model_kwargs) -> list[LayerDiff]:
    """Per-layer differences between the flax model and its torch twin, in forward order.

    The last row is "logits". See the module docstring for the setup and the error definitions.
    """
    kw = {"image_size": image_size, **model_kwargs}
    spec = jaxcell.models.spec(name)  # unknown names: a UserError listing the known ones
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tmodel = torch_ref.create(name, **kw)
    randomize_torch_model(tmodel, seed).eval()
    variables = torch_to_flax(name, tmodel.state_dict(), **kw)
    fmodel = jaxcell.models.create(name, **kw)

    # Random images in [0, 1], normalized as the model's spec declares: what the model really sees.
    images = np.random.default_rng(seed).random((batch, 3, image_size, image_size))
    mean, std = (np.asarray(v, np.float64).reshape(1, 3, 1, 1) for v in (spec.mean, spec.std))
    x = ((images - mean) / std).astype(np.float32)
    t_records, t_logits = _torch_outputs(tmodel, torch.from_numpy(x))
    f_inter, f_logits = _flax_outputs(fmodel, variables, x.transpose(0, 2, 3, 1))

    rows = []
    for layer, t_outs in t_records.items():
        f_outs = _captured(f_inter, layer)
        if f_outs is None:
            continue  # no flax counterpart (relu, pool, dropout modules)
        n = min(len(t_outs), len(f_outs))
        for i in range(n):
            rows.append(_diff(layer if n == 1 else f"{layer}[{i}]", t_outs[i], f_outs[i]))
    rows.append(_diff("logits", t_logits, f_logits))
    return rows


def format_table(rows: list[LayerDiff], tolerance: float | None = None) -> str:
    """The comparison as a text table in forward order; marks the first layer beyond tolerance."""
    header = ("layer", "shape (torch)", "max abs error", "max rel error")
    body = [(r.layer, "x".join(map(str, r.shape)) or "scalar", f"{r.max_abs:.3e}", f"{r.max_rel:.3e}")
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])]
    first_bad = next((i for i, r in enumerate(rows) if tolerance is not None and not r.within(tolerance)), None)
    for i, (r, cells) in enumerate(zip(rows, body)):
        text = line(cells)
        if r.note:
            text += f"  ({r.note})"
        if i == first_bad:
            text += f"  <-- first beyond tolerance {tolerance:g}"
        out.append(text)
    out.append(REL_DEFINITION)
    return "\n".join(out)


def run(model: str, image_size: int, batch: int, seed: int, tolerance: float, num_classes: int | None = None) -> int:
    """`jaxcell parity`: print the table; 0 if every layer's max_rel <= tolerance, else 1."""
    kw = {} if num_classes is None else {"num_classes": num_classes}
    rows = compare(model, image_size=image_size, batch=batch, seed=seed, **kw)
    print(f"parity {model}: image {image_size}, batch {batch}, seed {seed}, "
          f"float32, jax precision highest, torch TF32 off, eval mode")
    print(format_table(rows, tolerance))
    bad = [r for r in rows if not r.within(tolerance)]
    worst = max(rows, key=lambda r: r.max_rel if not math.isnan(r.max_rel) else math.inf)
    print(f"{len(rows)} layers; worst max rel error {worst.max_rel:.3e} at {worst.layer}; "
          + (f"FAIL: {len(bad)} beyond {tolerance:g}, first {bad[0].layer}" if bad
             else f"PASS (tolerance {tolerance:g})"))
    return 1 if bad else 0
