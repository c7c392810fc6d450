"""Deletion and insertion curves (Petsiuk et al. 2018): does an explanation point at what the
model uses?

For each image, pixels are ranked by the method's attribution (the channel sum: most positive
evidence for the predicted class first). Deletion replaces the top fraction f of pixels with the
baseline (zeros of the model input, the same baseline integrated gradients starts from) and
records the predicted class's probability; insertion starts from the baseline and puts the top
fraction back. A faithful explanation makes the deletion curve fall fast (low area under it)
and the insertion curve rise fast (high area). A random ranking (fixed seed) is the yardstick
every method must beat.

    result = measure(model, variables, x, methods=("gradcam", "ig", "shap", "occlusion"))
    result["ig"]["deletion_auc"], result["random"]["deletion_auc"], result["ig"]["deletion"]  # mean curve
"""

from __future__ import annotations

import time

import numpy as np

from jaxcell.explain import _jit  # jax is imported on the first call

METHODS = ("gradcam", "ig", "shap", "occlusion")
FRACTIONS = 20  # curve points: 0, 1/20, ..., 1 of the pixels


def ranks(attr_map: np.ndarray) -> np.ndarray:
    """(N, H, W) scores -> (N, H, W) rank of each pixel, 0 = the highest score (ties: first wins)."""
    n = attr_map.shape[0]
    flat = attr_map.reshape(n, -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    out = np.empty_like(order)
    np.put_along_axis(out, order, np.arange(flat.shape[1])[None, :], axis=1)
    return out.reshape(attr_map.shape).astype(np.int32)




@_jit(("model", "points"))
def _curves(model, variables, x, rank, target, points):
    import jax
    import jax.numpy as jnp

    model = model.module
    pixels = rank.shape[1] * rank.shape[2]
    fractions = jnp.linspace(0.0, 1.0, points + 1)

    def probability(z):
        p = jax.nn.softmax(model.apply(variables, z, train=False), -1)
        return jnp.take_along_axis(p, target[:, None], axis=1)[:, 0]

    def at(f):
        mask = (rank < jnp.round(f * pixels))[..., None].astype(x.dtype)       # the top fraction f
        return probability(x * (1 - mask)), probability(x * mask)               # deletion, insertion

    deletion, insertion = jax.lax.map(at, fractions)                             # (points + 1, N)
    return deletion.T, insertion.T


def auc(curve: np.ndarray) -> float:
    """Mean area under curves sampled at evenly spaced fractions of [0, 1] (trapezoid rule)."""
    curve = np.asarray(curve, np.float64)
    return float(np.mean((curve[..., 1:] + curve[..., :-1]).sum(-1) / (2 * (curve.shape[-1] - 1))))


def measure(model, variables, x, methods=METHODS, steps: int = 20, batch: int = 8, seed: int = 0,
            points: int = FRACTIONS) -> dict:
    """Curves and areas per method (and "random") on model inputs x (N, H, W, C), explaining
    each image's predicted class. steps: integrated gradients' steps and SHAP's samples."""
    from jaxcell.explain import _Same, attribution_map, explain_batch

    x = np.asarray(x, np.float32)
    key = _Same(model)
    out = {}
    for method in (*methods, "random"):
        started = time.perf_counter()
        deletion, insertion = [], []
        for start in range(0, len(x), batch):
            chunk = x[start:start + batch]
            if method == "random":
                scores = np.random.default_rng(seed + start).random(chunk.shape[:3])
                target = np.asarray(model.apply(variables, chunk, train=False)).argmax(-1)
            else:
                attr, target = explain_batch(method, model, variables, chunk, steps)
                scores = attribution_map(attr)
            d, i = _curves(key, variables, chunk, ranks(scores), np.asarray(target, np.int32), points)
            deletion.append(np.asarray(d))
            insertion.append(np.asarray(i))
        d, i = np.concatenate(deletion), np.concatenate(insertion)
        out[method] = {"deletion_auc": auc(d), "insertion_auc": auc(i), "deletion": d.mean(0).tolist(),
                       "insertion": i.mean(0).tolist(), "images": len(x),
                       "seconds": round(time.perf_counter() - started, 1)}
    return out


def table_rows(result: dict) -> list[list[str]]:
    """[method, deletion AUC, insertion AUC] rows, most faithful (lowest deletion AUC) first."""
    order = sorted(result, key=lambda m: result[m]["deletion_auc"])
    return [[m, f"{result[m]['deletion_auc']:.4f}", f"{result[m]['insertion_auc']:.4f}"] for m in order]


def curves_figure(result: dict):
    from jaxcell.report import _figure

    fig = _figure(9, 3.4)
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for method, r in result.items():
            curve = np.asarray(r[kind])
            ax.plot(np.linspace(0, 1, len(curve)), curve, label=f"{method} ({r[kind + '_auc']:.3f})",
                    linestyle="--" if method == "random" else "-")
        ax.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}, most attributed first")
        ax.set_ylabel("probability of the predicted class")
        ax.set_title(f"{kind} (area in brackets)")
        ax.legend(fontsize=7)
    return fig
