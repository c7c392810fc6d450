"""The persistent compilation cache that the jaxcell command turns on (jaxcell.compilation_cache)."""

import os
import subprocess
import sys

from jaxcell import compilation_cache

PROGRAM = """
import sys
from jaxcell import compilation_cache
path = compilation_cache.enable()
import jax, jax.numpy as jnp
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even this small program
print(path)
print(float(jax.jit(lambda x: jnp.sin(x).sum())(jnp.arange(7.0))))
"""


def _run(env):
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_cache_is_written_per_machine_kind_and_read_back(tmp_path):
    env = {**os.environ, "JAXCELL_CACHE": str(tmp_path)}
    path, value = _run(env)
    assert path.startswith(str(tmp_path / "xla")) and os.path.basename(path) == compilation_cache._machine_kind()
    entries = os.listdir(path)
    assert any(e.startswith("jit_") for e in entries), entries
    _, again = _run(env)  # a second process finds the program and computes the same
    assert again == value and sorted(os.listdir(path)) == sorted(entries)


def test_switched_off(tmp_path):
    env = {**os.environ, "JAXCELL_CACHE": str(tmp_path), "JAXCELL_COMPILATION_CACHE": "0"}
    path, _ = _run(env)
    assert path == "None" and not (tmp_path / "xla").exists()
