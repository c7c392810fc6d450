"""What this machine's CPU is, read once in one place: its feature flags and the CPUs this
process may use. Plain Python (no jax, no numpy): the edge runner and the compilation cache's
per-CPU folder need it as much as the benchmark does."""

from __future__ import annotations

import os


def cpu_flags() -> str:
    """The feature-flags line of /proc/cpuinfo ("flags" on x86, "Features" on ARM), or "" where
    there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def cpu_flag_set() -> set[str]:
    """The flags of that line as a set (avx2, avx512f, avx512_vnni, asimddp, ...)."""
    return set(cpu_flags().partition(":")[2].split())


def cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
