"""Augmentation on the device, inside the jitted train step: pure functions of (images, rng).

Images are float32 NHWC in [0, 1]. The blood-smear data has a strong colour shortcut (a
colour histogram alone separates the classes, and fails as soon as the stain shifts), so
besides the geometric symmetries we perturb the stain itself: HED jitter (Tellez et al. 2019)
and brightness/contrast/saturation. The same `hed_jitter` with a fixed seed makes the
stain-shifted copies used to measure robustness. Random resized crops (scale and framing) and
hue rotation are there too, off by default.

torch_ref/train.py computes the same formulas from the same kind of uniform draws; keep the two in
step (tests/test_training_parity.py feeds both the same draws).
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


# Aspect ratios of a crop (width / height), drawn log-uniformly between these.
ASPECT_RANGE = (3 / 4, 4 / 3)


def crop_boxes(u: jax.Array, min_scale: float, height: int, width: int):
    """Crop boxes (top, left, height, width), in pixels, from uniform draws u (4, N) in [0, 1).

    Area fraction s = min_scale + (1 - min_scale) u[0]; log aspect ratio uniform over
    log(ASPECT_RANGE) from u[1], then clipped to [log s, -log s], the ratios at which a crop of
    area s still fits inside the image: the area is exact and min_scale 1 keeps the whole image.
    The offsets place the box uniformly inside the image (u[2] vertical, u[3] horizontal).
    """
    area = min_scale + (1.0 - min_scale) * u[0]
    lo, hi = np.log(ASPECT_RANGE[0]), np.log(ASPECT_RANGE[1])
    log_aspect = jnp.clip(lo + (hi - lo) * u[1], jnp.log(area), -jnp.log(area))
    h = height * jnp.minimum(jnp.sqrt(area * jnp.exp(-log_aspect)), 1.0)
    w = width * jnp.minimum(jnp.sqrt(area * jnp.exp(log_aspect)), 1.0)
    return (height - h) * u[2], (width - w) * u[3], h, w


def _bilinear_axis(images: jax.Array, start: jax.Array, length: jax.Array, axis: int) -> jax.Array:
    """Resample axis 1 or 2 of (N, H, W, C) so that its output pixels cover [start, start + length)
    of the input (pixel centres at i + 0.5, as an align_corners=False resize), linear between the
    two nearest input pixels, edge pixels repeated."""
    size = images.shape[axis]
    centres = start[:, None] + (jnp.arange(size, dtype=jnp.float32) + 0.5) * (length[:, None] / size) - 0.5
    below = jnp.floor(centres)
    frac = centres - below
    i0 = jnp.clip(below, 0, size - 1).astype(jnp.int32)
    i1 = jnp.clip(below + 1, 0, size - 1).astype(jnp.int32)
    take = jax.vmap(lambda img, idx: jnp.take(img, idx, axis=axis - 1))
    shape = (-1, size, 1, 1) if axis == 1 else (-1, 1, size, 1)
    frac = frac.reshape(shape)
    return take(images, i0) * (1.0 - frac) + take(images, i1) * frac


def resized_crop(images: jax.Array, rng: jax.Array, min_scale: float) -> jax.Array:
    """A random crop per image (area fraction uniform in [min_scale, 1], aspect ratio log-uniform
    in [3/4, 4/3]; see crop_boxes), resized back to H x W by bilinear interpolation.

    A crop is never larger than the image, so the resize only enlarges: no anti-aliasing needed.
    """
    n, height, width = images.shape[:3]
    top, left, h, w = crop_boxes(jax.random.uniform(rng, (4, n)), min_scale, height, width)
    return _bilinear_axis(_bilinear_axis(images, top, h, axis=1), left, w, axis=2)


def hue_matrices(turns: jax.Array) -> jax.Array:
    """(N, 3, 3) rotations of RGB space about the grey axis (1, 1, 1) by `turns` of a full turn
    (Rodrigues' formula): hue turns, grey stays grey, and the mean of R, G and B is kept."""
    theta = 2 * jnp.pi * turns[:, None, None]
    k = np.full(3, 1 / np.sqrt(3))
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return (jnp.cos(theta) * np.eye(3) + jnp.sin(theta) * cross
            + (1 - jnp.cos(theta)) * np.outer(k, k)).astype(jnp.float32)


def hue_jitter(images: jax.Array, rng: jax.Array, strength: float) -> jax.Array:
    """Hue rotated per image by an angle uniform in [-strength, strength] of a full turn."""
    turns = jax.random.uniform(rng, (images.shape[0],), minval=-strength, maxval=strength)
    # HIGHEST: a 3x3 product, not worth TF32's rounding of the pixels on GPUs
    x = jnp.einsum("nhwc,ndc->nhwd", images, hue_matrices(turns), precision=jax.lax.Precision.HIGHEST)
    return jnp.clip(x, 0.0, 1.0)


def augment(images: jax.Array, rng: jax.Array, stain: float = 0.05, color: float = 0.1, crop: float = 1.0,
            hue: float = 0.0) -> jax.Array:
    """The training augmentation: random resized crop (min area fraction `crop`; 1 is off),
    symmetries, stain jitter, hue rotation, colour jitter (each jitter off at strength 0)."""
    r1, r2, r3 = jax.random.split(rng, 3)  # the keys of the options older runs had: their draws stay put
    x = images
    if crop < 1.0:
        x = resized_crop(x, jax.random.fold_in(rng, 3), crop)
    x = dihedral(x, r1)
    if stain:
        x = hed_jitter(x, r2, stain)
    if hue:
        x = hue_jitter(x, jax.random.fold_in(rng, 4), hue)
    if color:
        x = color_jitter(x, r3, color)
    return x
