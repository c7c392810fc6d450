"""jaxcell._malloc: glibc keeps freed memory (no page faults on XLA:CPU's per-step temporaries)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from jaxcell import _malloc


def _glibc_linux() -> bool:
    return sys.platform.startswith("linux") and _malloc._glibc() is not None


@pytest.mark.skipif(not _glibc_linux(), reason="Linux/glibc only")
def test_applied_by_the_command_on_cpu_hosts(capsys):
    from jaxcell.cli import main

    main(["recipes"])
    accelerator = any(importlib.util.find_spec(p) for p in _malloc._ACCELERATOR_PLUGINS)
    assert _malloc.applied is (not accelerator)
    assert _malloc.keep_freed_memory() is _malloc.applied  # once: the second call changes nothing


@pytest.mark.skipif(not _glibc_linux(), reason="Linux/glibc only")
def test_a_large_block_is_reused_without_faults():
    code = """
import ctypes, resource
import jaxcell._malloc as m
m.keep_freed_memory()
libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
def faults(n=256 << 20):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) * 4096 >> 20
faults()
print(m.applied, faults())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "True":
        assert int(out[1]) < 16  # MB faulted in the second round: the block came back from the heap
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAXCELL_MALLOC": "default"}).stdout.split()
    assert out[0] == "False" and int(out[1]) >= 200  # glibc's default: mmap'd afresh, every page faults
