"""Parameters and forward FLOPs per image of a registered model.

FLOPs come from XLA's cost analysis of the forward pass at batch 1 as JAX lowers it, before XLA
optimizes it (a multiply-add counts as two): every op the model asks for, not a hand count, and
the same figure whatever compiler, version or flags (an optimized program's count moves with
fusion decisions: ResNet50's by 0.8%). The pass is traced with XLA's kernels (jax.jit's default,
jaxcell.kernels): the CPU forms would add padding zeros, and oneDNN's convolutions are calls that
XLA cannot count.
"""

import jax
import jax.numpy as jnp

from jaxcell import models


def summarize(name: str, image_size: int = 224, num_classes: int = 4, **kwargs) -> dict:
    model = models.create(name, num_classes=num_classes, image_size=image_size, **kwargs)
    # Lowered for the CPU on every machine: XLA:GPU's cost analysis adds its cycle estimates of
    # elementwise work to "flops", which would inflate MFU; the CPU backend counts the arithmetic.
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32, sharding=cpu)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
    params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), variables)
    forward = jax.jit(lambda v, images: model.apply(v, images, train=False))
    cost = forward.lower(variables, x).cost_analysis()  # lowered, never compiled
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"model": name, "model_kwargs": kwargs, "image_size": image_size, "parameters": int(params),
            "flops_per_image": float(cost.get("flops", float("nan")))}


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'model':<14} {'image':>5} {'parameters':>14} {'GFLOPs/image':>13}"]
    for r in rows:
        lines.append(f"{r['model']:<14} {r['image_size']:>5} {r['parameters']:>14,} {r['flops_per_image'] / 1e9:>13.3f}")
    return "\n".join(lines)


def format_summary_markdown(rows: list[dict]) -> str:
    """The same rows as a Markdown table (the README's is this, generated)."""
    lines = ["| model | image px | parameters | GFLOPs/image |", "|---|---:|---:|---:|"]
    for r in rows:
        args = ", ".join(f"{k}={v!r}" for k, v in r["model_kwargs"].items())
        name = f"`{r['model']}`" + (f" ({args})" if args else "")
        lines.append(f"| {name} | {r['image_size']} | {r['parameters']:,} | {r['flops_per_image'] / 1e9:.3f} |")
    return "\n".join(lines)
