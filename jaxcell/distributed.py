"""Joining a multi-process (multi-host) JAX job, before any computation.

Explicit flags win; with none, a SLURM or Open MPI launch of more than one task is detected
from its environment (jax.distributed's own cluster detection then fills in the details); a
single process needs nothing. On CPU, processes talk through gloo collectives.
"""

import os

import jax


def launched_by_cluster() -> bool:
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not explicit and not launched_by_cluster():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects the CPU backend only
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
