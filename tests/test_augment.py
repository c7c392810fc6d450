"""Device-side augmentation: what it keeps and what it changes."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxcell.data import augment as device_augment
from jaxcell.data.augment import crop_boxes

# Each as one compiled program, as inside the train step (op by op, a test compiled dozens), its
# strength a constant of the program as there.
dihedral = jax.jit(device_augment.dihedral)
hed_jitter, color_jitter, resized_crop, hue_jitter = (
    jax.jit(f, static_argnums=2) for f in (device_augment.hed_jitter, device_augment.color_jitter,
                                           device_augment.resized_crop, device_augment.hue_jitter))
augment = jax.jit(device_augment.augment, static_argnames=("stain", "color", "crop", "hue"))


def images(n=4, size=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(0.05, 1.0, (n, size, size, 3)), jnp.float32)


def test_dihedral_only_permutes_pixels_and_draws_per_image():
    x = images(64)
    y = dihedral(x, jax.random.key(1))
    np.testing.assert_array_equal(np.sort(np.asarray(x).reshape(64, -1), 1), np.sort(np.asarray(y).reshape(64, -1), 1))
    changed = np.asarray(jnp.any(x != y, axis=(1, 2, 3)))
    assert 0 < changed.sum() < 64  # some images kept as they were (1 in 8), most moved


def test_hed_jitter_at_strength_zero_is_the_identity():
    x = images()
    np.testing.assert_allclose(hed_jitter(x, jax.random.key(0), 0.0), x, atol=2e-5)


def test_hed_jitter_shifts_colour_but_keeps_structure():
    x = images(8)
    y = hed_jitter(x, jax.random.key(3), 0.05)
    assert float(jnp.abs(y - x).mean()) > 1e-3
    a, b = np.asarray(x).mean(-1).reshape(8, -1), np.asarray(y).mean(-1).reshape(8, -1)
    correlation = [np.corrcoef(u, v)[0, 1] for u, v in zip(a, b)]
    assert min(correlation) > 0.9


def test_color_jitter_and_augment_stay_in_range_and_depend_on_the_key():
    x = images(8)
    for y in (color_jitter(x, jax.random.key(0), 0.3), augment(x, jax.random.key(0))):
        assert float(y.min()) >= 0 and float(y.max()) <= 1
    np.testing.assert_array_equal(augment(x, jax.random.key(5)), augment(x, jax.random.key(5)))
    assert not np.array_equal(augment(x, jax.random.key(5)), augment(x, jax.random.key(6)))


def reference_augment(x: np.ndarray, rng, stain: float, color: float) -> np.ndarray:
    """The augmentation as it was before crops and hue existed, in float64 numpy from its own
    formulas: symmetries, then HED jitter, then brightness/contrast/saturation, each from one of
    three keys split from `rng`. Only the uniform draws come from jax.random."""
    n = len(x)
    r1, r2, r3 = jax.random.split(rng, 3)
    flip_h, flip_v, transpose = np.asarray(jax.random.bernoulli(r1, 0.5, (3, n)))
    x = np.stack([(lambda im: im.swapaxes(0, 1) if transpose[i] else im)(
        (lambda im: im[::-1] if flip_v[i] else im)(im[:, ::-1] if flip_h[i] else im)) for i, im in enumerate(x)])
    # HED: Ruifrok & Johnston's stain vectors; optical density relative to 1e-6
    rgb_from_hed = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    scale_rng, shift_rng = jax.random.split(r2)
    alpha = np.asarray(jax.random.uniform(scale_rng, (n, 1, 1, 3), minval=1 - stain, maxval=1 + stain), np.float64)
    beta = np.asarray(jax.random.uniform(shift_rng, (n, 1, 1, 3), minval=-stain, maxval=stain), np.float64)
    floor = np.log(1e-6)
    stains = np.log(np.maximum(x, 1e-6)) / floor @ np.linalg.inv(rgb_from_hed)
    x = np.clip(np.exp((stains * alpha + beta) @ rgb_from_hed * floor), 0, 1)
    b, c, s = np.asarray(jax.random.uniform(r3, (3, n, 1, 1, 1), minval=1 - color, maxval=1 + color), np.float64)
    x = x * b
    mean = x.mean(axis=(1, 2, 3), keepdims=True)  # the image's mean grey level
    x = (x - mean) * c + mean
    grey = x.mean(axis=-1, keepdims=True)
    return np.clip((x - grey) * s + grey, 0, 1)


def test_new_options_off_leave_the_augmentation_as_it_was():
    x = images(8, size=16)
    for seed in (2, 9):
        want = reference_augment(np.asarray(x, np.float64), jax.random.key(seed), stain=0.05, color=0.1)
        for got in (augment(x, jax.random.key(seed)), augment(x, jax.random.key(seed), crop=1.0, hue=0.0)):
            np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    # the reference can tell: the keys of another seed give another augmentation
    assert np.abs(np.asarray(augment(x, jax.random.key(3))) - want).max() > 0.05


def test_crop_at_scale_one_and_hue_at_zero_are_the_identity():
    x = images(8)
    np.testing.assert_array_equal(resized_crop(x, jax.random.key(0), 1.0), x)
    np.testing.assert_array_equal(hue_jitter(x, jax.random.key(0), 0.0), x)


def test_crop_boxes_have_the_drawn_area_a_bounded_aspect_and_fit_the_image():
    u = jax.random.uniform(jax.random.key(1), (4, 1000))
    top, left, h, w = map(np.asarray, crop_boxes(u, 0.3, 32, 32))
    area = 0.3 + 0.7 * np.asarray(u[0])
    np.testing.assert_allclose(h * w / 32**2, area, rtol=1e-5)
    assert np.all(w / h >= 3 / 4 - 1e-5) and np.all(w / h <= 4 / 3 + 1e-5)
    assert np.all(top >= 0) and np.all(left >= 0) and np.all(top + h <= 32 + 1e-4) and np.all(left + w <= 32 + 1e-4)
    assert area.min() < 0.35 and area.max() > 0.95  # the whole range is drawn


def test_crops_keep_shape_and_range_and_zoom_in():
    x = images(16, size=24)
    y = resized_crop(x, jax.random.key(4), 0.25)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= float(x.min()) and float(y.max()) <= float(x.max())  # convex combinations
    assert np.all(np.asarray(jnp.abs(y - x).mean(axis=(1, 2, 3))) > 1e-3)  # every image cropped
    # a crop of a constant image is that constant; of a left-right ramp, a ramp with a smaller slope
    flat = jnp.full((4, 16, 16, 3), 0.3, jnp.float32)
    np.testing.assert_allclose(resized_crop(flat, jax.random.key(0), 0.3), flat, atol=1e-6)
    ramp = jnp.broadcast_to(jnp.linspace(0, 1, 16)[None, None, :, None], (4, 16, 16, 3))
    slope = np.diff(np.asarray(resized_crop(ramp, jax.random.key(0), 0.3))[:, 8, 1:-1, 0], axis=1)
    assert np.all(slope >= 0) and np.all(slope.max(axis=1) <= 1 / 15 + 1e-6)


def test_hue_turns_colours_keeps_grey_and_brightness():
    x = images(8)
    y = hue_jitter(x, jax.random.key(2), 0.25)
    assert float(jnp.abs(y - x).mean()) > 1e-2
    grey = jnp.broadcast_to(x[..., :1], x.shape)
    np.testing.assert_allclose(hue_jitter(grey, jax.random.key(2), 0.5), grey, atol=1e-6)
    mid = jnp.full((2, 4, 4, 3), 0.5) + jnp.array([0.2, -0.1, -0.1])  # unclipped: R+G+B is kept
    np.testing.assert_allclose(hue_jitter(mid, jax.random.key(3), 0.5).sum(-1), mid.sum(-1), atol=1e-6)


def test_crop_and_hue_are_drawn_per_image_from_the_key():
    x = jnp.broadcast_to(images(1), (6, 12, 12, 3))  # six copies of one image
    for f in (lambda k: resized_crop(x, k, 0.4), lambda k: hue_jitter(x, k, 0.2),
              lambda k: augment(x, k, crop=0.5, hue=0.1)):
        a, b = np.asarray(f(jax.random.key(7))), np.asarray(f(jax.random.key(8)))
        np.testing.assert_array_equal(a, np.asarray(f(jax.random.key(7))))
        assert not np.array_equal(a, b)
        assert len({a[i].tobytes() for i in range(6)}) == 6  # each copy augmented its own way
