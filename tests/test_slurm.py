"""Launch layouts under SLURM (jaxcell.distributed): which GPUs each process is given, and a
simulated SLURM job (its environment, two processes of two CPU devices on this machine) that
joins without any coordinator flag, logs processes x local devices = global devices, trains
on a mesh of all four devices, and is refused when its processes see unequal device counts."""

import os
import subprocess
import sys

import pytest

from jaxcell import distributed
from jaxcell.errors import UserError
from jaxcell.train import read_history
from conftest import xla_flags
from test_multihost import ARGS, free_port, launch


def slurm(procid: int, ntasks: int = 2, tasks_per_node: str = "2", nodeid: int = 0, localid: int | None = None,
          **extra) -> dict:
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": str(ntasks),
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid if localid is None else localid),
            "SLURM_NODEID": str(nodeid), "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, **extra}


def test_one_process_per_node_drives_every_visible_gpu():
    # 2 nodes x 1 task, 8 GPUs each: jax alone would give each process GPU 0 only
    for node in (0, 1):
        env = slurm(node, tasks_per_node="1(x2)", nodeid=node, localid=0, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
        assert distributed.local_device_ids(env) == list(range(8))
    # no GPU to count (a CPU node): no restriction at all
    assert distributed.local_device_ids(slurm(0, tasks_per_node="1(x2)", localid=0), gpus=0) == []


def test_one_process_per_gpu_drives_its_local_rank():
    ids = [distributed.local_device_ids(slurm(r, ntasks=16, tasks_per_node="8(x2)", localid=r % 8), gpus=8)
           for r in range(16)]
    assert ids == [[r % 8] for r in range(16)]
    # --gpus-per-task=1: SLURM leaves each task one visible GPU, index 0 (not its local rank)
    assert distributed.local_device_ids(slurm(5, ntasks=8, tasks_per_node="8", CUDA_VISIBLE_DEVICES="5")) == [0]
    # two tasks per node, four GPUs: an even share each
    assert distributed.local_device_ids(slurm(1, tasks_per_node="2"), gpus=4) == [2, 3]


def test_tasks_per_node_of_mixed_nodes_and_open_mpi():
    env = slurm(3, ntasks=4, tasks_per_node="2,1(x2)", nodeid=2, localid=0)
    assert distributed.local_device_ids(env, gpus=4) == [0, 1, 2, 3]  # the third node runs one task
    ompi = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}
    assert distributed.local_device_ids(ompi, gpus=4) == [3]
    assert distributed.local_device_ids({"JAX_LOCAL_DEVICE_IDS": "1,2"}, gpus=4) == [1, 2]  # the user's choice
    assert distributed.local_device_ids({}, gpus=8) is None  # no launcher: jax's default (all visible)


def test_layouts_that_cannot_split_the_gpus_are_refused():
    with pytest.raises(UserError, match="do not split evenly over its 3 tasks"):
        distributed.local_device_ids(slurm(0, ntasks=3, tasks_per_node="3"), gpus=8)
    with pytest.raises(UserError, match="4 tasks on this node share 2 visible GPUs"):
        distributed.local_device_ids(slurm(0, ntasks=4, tasks_per_node="4"), gpus=2)
    with pytest.raises(UserError, match="tasks per node"):
        distributed.local_device_ids(slurm(0, tasks_per_node="two"), gpus=2)


def test_a_process_that_lost_its_gpus_is_refused(monkeypatch):
    """Given 8 GPUs by its layout, a process that drives this machine's 4 CPU devices (CUDA failed
    to load and JAX fell back) stops with an error; with none expected the line is only logged."""
    assert distributed.check_devices() == "1 process x 4 local devices = 4 global devices (cpu)"
    monkeypatch.setattr(distributed, "_expected_gpus", [8])
    with pytest.raises(UserError, match="was given 8 GPUs by the launch layout but drives 4 cpu devices"):
        distributed.check_devices()


PROBE = """
import jax, jax.numpy as jnp, numpy as np
from jaxcell import distributed
from jaxcell.train import Placement, local
distributed.initialize()
print(distributed.check_devices())
placement = Placement.over()
print("mesh", [d.process_index for d in placement.mesh.devices.flat])
block = np.full((placement.size // jax.process_count(),), jax.process_index() + 1.0, np.float32)
x = jax.make_array_from_process_local_data(placement.batch, block, (placement.size,))
print("sum", float(local(jax.jit(jnp.sum, out_shardings=placement.replicated)(x))))
"""


def run_job(monkeypatch, devices, argv, timeout=240):
    """Two processes launched as SLURM would (no coordinator flags), each with devices[i] CPU
    devices; argv: jaxcell's arguments, or None for PROBE. A hang fails, it does not block."""
    monkeypatch.setenv("JAX_COORDINATOR_PORT", str(free_port()))
    for var in [v for v in os.environ if v.startswith(("SLURM_", "OMPI_"))]:
        monkeypatch.delenv(var)
    workers = []
    for i in range(2):
        for key, value in slurm(i).items():
            monkeypatch.setenv(key, value)
        if argv is None:
            env = {**os.environ, "XLA_FLAGS": xla_flags(devices[i]),
                   "JAX_PLATFORMS": "cpu"}
            workers.append(subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True))
        else:
            workers.append(launch(argv, devices=devices[i]))
    outputs = []
    try:
        for w in workers:
            outputs.append(w.communicate(timeout=timeout)[0])
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    return [w.returncode for w in workers], outputs


@pytest.mark.integration
def test_simulated_slurm_job_sees_every_device_in_one_global_mesh(monkeypatch):
    codes, outputs = run_job(monkeypatch, (2, 2), None)
    assert codes == [0, 0], outputs
    for out in outputs:
        assert "2 processes x 2 local devices = 4 global devices (cpu)" in out, out
        assert "mesh [0, 0, 1, 1]" in out, out  # four devices, ordered by process: contiguous blocks
        assert "sum 6.0" in out, out  # 1 + 1 from process 0's devices, 2 + 2 from process 1's


@pytest.mark.slow  # 145 s on the shared 2-core machine; the probe above checks the mesh in 24 s
@pytest.mark.integration
def test_simulated_slurm_job_trains(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    argv = [*ARGS, "--workdir", workdir]
    argv[argv.index("--epochs") + 1] = "1"
    codes, outputs = run_job(monkeypatch, (2, 2), argv)
    assert codes == [0, 0], outputs
    for i, out in enumerate(outputs):
        assert f"process {i}: 2 processes x 2 local devices = 4 global devices (cpu)" in out, out
    assert "trained lightnetcell" in outputs[0] and "trained" not in outputs[1]
    assert [h["step"] for h in read_history(workdir)] == [8]


@pytest.mark.integration
def test_simulated_slurm_job_with_unequal_devices_is_refused(tmp_path, monkeypatch):
    codes, outputs = run_job(monkeypatch, (2, 3), [*ARGS, "--workdir", str(tmp_path / "run")])
    assert codes == [2, 2], outputs
    for out in outputs:
        assert "the processes see unequal numbers of devices (process 0: 2, process 1: 3)" in out, out
