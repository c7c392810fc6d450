"""Device-side augmentation: what it keeps and what it changes."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxcell.data.augment import augment, color_jitter, dihedral, hed_jitter


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
