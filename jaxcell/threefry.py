"""JAX's threefry random bits lowered without loops on CPUs, as newer JAX does: the same bits,
compiled several times faster.

JAX up to 0.10 lowers the threefry2x32 hash on CPUs as a five-iteration while loop, one per
random draw. A model's initialisation draws once per parameter, so its program holds one such
loop per parameter, and XLA:CPU compiles each slowly: on a 2-core CPU the small BRIN's `init`
compiled in 12.5 s, ResNet18's in 5.2 s. The unrolled form (what JAX uses on GPUs, and, after JAX's
pull request 37872, on CPUs too) compiles them in 3.4 s and 1.9 s. It computes the same integer
operations in the same order, so every random number, and hence every initialisation, dropout
mask and augmentation, is bit for bit what it was (tests/test_threefry.py).

`unroll_on_cpu()` registers the unrolled lowering for the CPU platform when this JAX still has
the looped one; on a JAX that has changed it, or renamed its internals, it does nothing, and
jaxcell only compiles more slowly. jaxcell.models calls it on import, since building a model is
where the draws are.
"""

from __future__ import annotations


def unroll_on_cpu() -> bool:
    """Lowers threefry2x32 on CPUs with the unrolled rule (again, if called again: harmless);
    True when this JAX has the looped rule it replaces."""
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32 as threefry
        unrolled = threefry._threefry2x32_lowering_rule
        threefry._threefry2x32_cpu_lowering_rule  # only a JAX that still loops on CPUs has it
        primitive = threefry.threefry2x32_p
    except (ImportError, AttributeError):
        return False
    mlir.register_lowering(primitive, unrolled, platform="cpu")
    return True
