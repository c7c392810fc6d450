"""Keep freed memory in the process on Linux/glibc CPU hosts (docs/benchmarks.md, "Allocator").

XLA:CPU allocates each step's temporaries afresh, and glibc serves blocks above its mmap threshold
(at most 32 MB) and every block of a thread's secondary arena that outgrows its 64 MB heap with
a fresh mmap, unmapped again on free: every page of them faults in again each step (680 MB a
step for ResNet18 at 224 px, batch 16: one block, XLA's temporaries packed together; 10-20% of
the step). With one arena, no mmap and no trimming, freed blocks stay in the heap and the next
step reuses them: no faults after the first step. The cost: the process keeps its peak heap
instead of returning it to the system (ResNet18, 224 px, batch 16: a 2.0 GB heap, of which 1.1 GB
in use; fragmentation can add a copy of the largest block). A finite trim threshold (mallopt
takes at most 2 GB) was not enough: the block lands above a fragment of its old place, the heap
grows, the top passes the threshold and is trimmed, and the faults return every few steps.

Applied once by the `jaxcell` command (cli.main), before JAX starts its threads (an existing
thread keeps its arena); a program using jaxcell as a library calls keep_freed_memory() itself if
it wants the same. Only where it pays: Linux with glibc, and no JAX GPU/TPU plugin installed (on those
hosts the device holds the tensors). JAXCELL_MALLOC=default leaves glibc's defaults.
"""

import ctypes
import importlib.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # <malloc.h>
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: never trim (mallopt(3))
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")

applied: bool | None = None  # None: not tried; False: not applicable or refused


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Apply SETTINGS with mallopt where it helps (see the module docstring); True if applied."""
    global applied
    if applied is not None:
        return applied
    applied = False
    if (not sys.platform.startswith("linux") or os.environ.get("JAXCELL_MALLOC", "") == "default"
            or any(importlib.util.find_spec(p) is not None for p in _ACCELERATOR_PLUGINS)):
        return applied
    libc = _glibc()
    if libc is None:
        return applied
    applied = all(libc.mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1 for k, v in SETTINGS)
    return applied
