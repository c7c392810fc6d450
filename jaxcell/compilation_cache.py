"""JAX's persistent compilation cache, so that a second `jaxcell evaluate`, `predict` or `serve`
loads its compiled programs instead of compiling them again (BRIN's alone take half a minute on a
2-core CPU).

The cache lives under $JAXCELL_CACHE/xla (or ~/.cache/jaxcell/xla), in a folder per machine
kind: an XLA:CPU program is machine code for the CPU it was compiled on, and a cache on a shared
home directory must not hand an AVX-512 program to a CPU without it. JAXCELL_COMPILATION_CACHE=0
turns it off. The `jaxcell` command enables it for its process; a program that imports jaxcell as
a library decides for itself.
"""

import hashlib
import os
import platform
import sys
from pathlib import Path

from jaxcell import cache_dir
from jaxcell.host import cpu_flags

MIN_COMPILE_SECONDS = 0.2  # programs that compile faster are not worth a file


def _machine_kind() -> str:
    """The CPU architecture and its feature flags (none known off Linux: the architecture alone),
    hashed: what compiled CPU code depends on."""
    return hashlib.sha256(f"{platform.machine()}\0{cpu_flags()}".encode()).hexdigest()[:12]


def enable(directory: str | os.PathLike | None = None,
           min_compile_seconds: float = MIN_COMPILE_SECONDS) -> Path | None:
    """Points JAX's persistent compilation cache at `directory` (default: this machine kind's
    folder) and keeps programs that took at least `min_compile_seconds` to compile; returns the
    folder, or None when JAXCELL_COMPILATION_CACHE=0."""
    if os.environ.get("JAXCELL_COMPILATION_CACHE", "1") == "0":
        return None
    path = Path(directory) if directory is not None else cache_dir("xla") / _machine_kind()
    _apply({"jax_compilation_cache_dir": str(path), "jax_persistent_cache_min_compile_time_secs": min_compile_seconds})
    return path


def disable() -> None:
    """No persistent compilation cache for this process (from its next compilation on)."""
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_compilation_cache_dir", None)


def _apply(settings: dict) -> None:
    if "jax" in sys.modules:
        for name, value in settings.items():
            sys.modules["jax"].config.update(name, value)
    else:  # read by jax when it is imported; a command that never needs jax does not pay for importing it
        for name, value in settings.items():
            os.environ[name.upper()] = str(value)
