"""jaxcell/threefry.py: threefry lowered without loops on CPUs gives the same bits as JAX's looped
form, and it is the one in use once jaxcell.models is imported."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import mlir

from jaxcell import models, threefry  # noqa: F401  (importing jaxcell.models applies the lowering)

looped = pytest.importorskip("jax._src.random.threefry2x32")


def draws(key):
    """Every kind of draw jaxcell makes, each through the one threefry2x32 primitive: splits and
    fold-ins (how flax derives each parameter's key), uniform, normal, truncated normal (the
    initializers), Bernoulli (dropout) and a permutation (shuffling)."""
    k = jax.random.split(jax.random.fold_in(key, 3), 6)
    return {"split": jax.random.key_data(k), "uniform": jax.random.uniform(k[0], (5, 7)),
            "normal": jax.random.normal(k[1], (3, 3, 4, 8)),
            "truncated": jax.random.truncated_normal(k[2], -2.0, 2.0, (129,)),
            "bernoulli": jax.random.bernoulli(k[3], 0.3, (2, 9, 9)),
            "permutation": jax.random.permutation(k[4], 100),
            "dense_init": nn.Dense(5).init(k[5], jnp.zeros((1, 7)))}


def lowered(rule=None) -> tuple[dict, str]:
    """The draws, and their program's text, under `rule` (default: the lowering in place)."""
    if rule is not None:
        mlir.register_lowering(looped.threefry2x32_p, rule, platform="cpu")
    fn = jax.jit(lambda key: draws(key))  # a new function: nothing cached from the other rule
    key = jax.random.key(7)
    return jax.device_get(fn(key)), fn.lower(key).as_text()


def test_the_unrolled_lowering_gives_the_same_bits_and_has_no_loop():
    if not hasattr(looped, "_threefry2x32_cpu_lowering_rule"):
        pytest.skip("this JAX already lowers threefry without loops on CPUs")
    try:
        before, before_text = lowered(looped._threefry2x32_cpu_lowering_rule)
    finally:
        assert threefry.unroll_on_cpu()  # what jaxcell.models did on import, back in place
    after, after_text = lowered()  # the lowering jaxcell.threefry put in place
    assert "stablehlo.while" in before_text and "stablehlo.while" not in after_text
    flat_before, tree = jax.tree.flatten(before)
    flat_after, tree_after = jax.tree.flatten(after)
    assert tree == tree_after
    for a, b in zip(flat_before, flat_after):
        np.testing.assert_array_equal(a, b)


def test_importing_the_models_puts_the_unrolled_lowering_in_use():
    text = jax.jit(lambda key: jax.random.uniform(key, (4, 4))).lower(jax.random.key(0)).as_text()
    assert "stablehlo.while" not in text
