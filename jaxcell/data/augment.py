"""Augmentation on the device, inside the jitted train step: pure functions of (images, rng).

Images are float32 NHWC in [0, 1]. The blood-smear data has a strong colour shortcut (a
colour histogram alone separates the classes, and fails as soon as the stain shifts), so
besides the geometric symmetries we perturb the stain itself: HED jitter (Tellez et al. 2019)
and brightness/contrast/saturation. The same `hed_jitter` with a fixed seed makes the
stain-shifted copies used to measure robustness.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Ruifrok & Johnston's haematoxylin / eosin / DAB optical-density vectors (rows), as in
# scikit-image's rgb2hed.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_LOG_FLOOR = float(np.log(1e-6))  # optical density is measured relative to this floor


def dihedral(images: jax.Array, rng: jax.Array) -> jax.Array:
    """Random flips and 90-degree rotations, drawn per image (the 8 symmetries of a square).

    A cell in a smear has no up or left, so these change nothing a classifier should use.
    images: (N, H, W, C) with H == W.
    """
    n = images.shape[0]
    flip_h, flip_v, transpose = jax.random.bernoulli(rng, 0.5, (3, n, 1, 1, 1))
    x = jnp.where(flip_h, images[:, :, ::-1], images)
    x = jnp.where(flip_v, x[:, ::-1], x)
    return jnp.where(transpose, jnp.swapaxes(x, 1, 2), x)


def hed_jitter(images: jax.Array, rng: jax.Array, sigma: float) -> jax.Array:
    """Per image and stain channel: s -> s * U(1 - sigma, 1 + sigma) + U(-sigma, sigma) in HED space."""
    n = images.shape[0]
    scale_rng, shift_rng = jax.random.split(rng)
    alpha = jax.random.uniform(scale_rng, (n, 1, 1, 3), minval=1 - sigma, maxval=1 + sigma)
    beta = jax.random.uniform(shift_rng, (n, 1, 1, 3), minval=-sigma, maxval=sigma)
    od = jnp.log(jnp.maximum(images, 1e-6)) / _LOG_FLOOR
    stains = od @ jnp.asarray(HED_FROM_RGB, jnp.float32)
    od = (stains * alpha + beta) @ jnp.asarray(RGB_FROM_HED, jnp.float32)
    return jnp.clip(jnp.exp(od * _LOG_FLOOR), 0.0, 1.0)


def color_jitter(images: jax.Array, rng: jax.Array, strength: float) -> jax.Array:
    """Brightness, contrast and saturation factors drawn per image from U(1 - s, 1 + s)."""
    n = images.shape[0]
    b, c, s = jax.random.uniform(rng, (3, n, 1, 1, 1), minval=1 - strength, maxval=1 + strength)
    x = images * b
    grey = x.mean(axis=-1, keepdims=True)
    x = (x - grey.mean(axis=(1, 2), keepdims=True)) * c + grey.mean(axis=(1, 2), keepdims=True)
    grey = x.mean(axis=-1, keepdims=True)
    x = (x - grey) * s + grey
    return jnp.clip(x, 0.0, 1.0)


def augment(images: jax.Array, rng: jax.Array, stain: float = 0.05, color: float = 0.1) -> jax.Array:
    """The training augmentation: symmetries, stain jitter, colour jitter (each off at strength 0)."""
    r1, r2, r3 = jax.random.split(rng, 3)
    x = dihedral(images, r1)
    if stain:
        x = hed_jitter(x, r2, stain)
    if color:
        x = color_jitter(x, r3, color)
    return x
