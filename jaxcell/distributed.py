"""Joining a multi-process (multi-host) JAX job, before any computation.

Explicit flags win; with none, a SLURM or Open MPI launch of more than one task is detected
from its environment (jax.distributed's own cluster detection then fills in the details); a
single process needs nothing. On CPU, processes talk through gloo collectives.

Which GPUs each process drives is decided here, not left to jax: under SLURM and Open MPI,
jax.distributed.initialize without `local_device_ids` restricts every process to the one GPU
whose index is its local rank, so one process per node would drive one GPU of eight. Two
layouts are supported, told apart by the number of tasks on the node:

    one process per node   (srun --ntasks-per-node=1):  all the node's visible GPUs
    one process per GPU    (srun --ntasks-per-node=G):  GPU <local rank>, or the one GPU a
                                                        per-task binding leaves visible

(and, in between, an even share of the node's GPUs per task). After joining, every process
must see the same number of devices, and on GPUs the number the layout gave it; a job that
does not is stopped with an error instead of training on fewer devices than asked for.
"""

import os
import re

import jax

from jaxcell.errors import UserError


def launched_by_cluster(environ=os.environ) -> bool:
    return int(environ.get("SLURM_NTASKS", "1")) > 1 or int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def _tasks_on_this_node(environ) -> tuple[int, int] | None:
    """(tasks on this node, this task's rank among them) from SLURM or Open MPI; None elsewhere."""
    if "OMPI_COMM_WORLD_LOCAL_SIZE" in environ:
        return int(environ["OMPI_COMM_WORLD_LOCAL_SIZE"]), int(environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
    if "SLURM_LOCALID" not in environ:
        return None
    local_rank = int(environ["SLURM_LOCALID"])
    # "2(x3),1": 2 tasks on each of the first three nodes, 1 on the fourth; SLURM_NODEID picks ours.
    spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = []
        for part in spec.split(","):
            m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not m:
                raise UserError(f"cannot read the tasks per node {spec!r} of SLURM's environment")
            counts += [int(m.group(1))] * int(m.group(2) or 1)
        node = int(environ.get("SLURM_NODEID", "0"))
        if node < len(counts):
            return counts[node], local_rank
    if "SLURM_NTASKS_PER_NODE" in environ:
        return int(environ["SLURM_NTASKS_PER_NODE"]), local_rank
    return None


def visible_gpus(environ=os.environ) -> int | None:
    """How many GPUs this process may use, read without starting CUDA: CUDA_VISIBLE_DEVICES
    (which SLURM sets for --gpus-per-node), else the NVIDIA driver's list; None if neither says."""
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return len([d for d in listed.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return None


def local_device_ids(environ=os.environ, gpus: int | None = None) -> list[int] | None:
    """The GPU indices (among the visible ones) this process drives under a cluster launcher,
    for jax.distributed.initialize; [] means all visible devices (jax then restricts nothing);
    None where no launcher says how many tasks share the node (jax's own choice stands).

    gpus: how many GPUs are visible (default: visible_gpus())."""
    if environ.get("JAX_LOCAL_DEVICE_IDS"):
        return [int(i) for i in environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
    layout = _tasks_on_this_node(environ)
    if layout is None:
        return None
    tasks, rank = layout
    gpus = visible_gpus(environ) if gpus is None else gpus
    if gpus is None or gpus == 0:  # no NVIDIA GPU to count (CPUs, or another accelerator)
        return [] if tasks == 1 else [rank]
    if gpus < tasks:
        if gpus == 1:  # the launcher bound one GPU to each task (--gpus-per-task=1, --gpu-bind)
            return [0]
        raise UserError(f"{tasks} tasks on this node share {gpus} visible GPUs; launch at most one task per GPU")
    if gpus % tasks:
        raise UserError(f"the {gpus} visible GPUs of this node do not split evenly over its {tasks} tasks; "
                        f"launch one task per node or one per GPU")
    share = gpus // tasks
    return list(range(rank * share, (rank + 1) * share))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not explicit and not launched_by_cluster():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects the CPU backend only
    gpus = visible_gpus()
    ids = local_device_ids(gpus=gpus)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=ids)
    wants_gpu = "JAX_PLATFORMS" not in os.environ or any(p in os.environ["JAX_PLATFORMS"] for p in ("cuda", "gpu"))
    _expected_gpus[0] = len(ids) if ids and gpus and wants_gpu else None


_expected_gpus: list[int | None] = [None]  # the GPUs this process was given, once initialize() has run


def check_devices() -> str:
    """'P processes x L local devices = G global devices (platform)' for the log; UserError when
    the processes see unequal numbers of devices, or (on GPUs) fewer or more than they were given."""
    devices = jax.devices()
    per_process: dict[int, int] = {}
    for d in devices:
        per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
    processes, local = jax.process_count(), jax.local_device_count()
    platform = devices[0].platform
    line = (f"{processes} process{'es' if processes > 1 else ''} x {local} local devices = {len(devices)} "
            f"global devices ({platform})")
    if len(per_process) != processes or len(set(per_process.values())) != 1:
        counts = ", ".join(f"process {p}: {n}" for p, n in sorted(per_process.items()))
        raise UserError(f"the processes see unequal numbers of devices ({counts}); "
                        f"every process must drive as many as the others")
    expected = _expected_gpus[0]
    if expected is not None and (platform != "gpu" or local != expected):  # e.g. CUDA failed: JAX fell back to CPUs
        raise UserError(f"process {jax.process_index()} was given {expected} GPUs by the launch layout "
                        f"but drives {local} {platform} devices: {line}")
    return line
