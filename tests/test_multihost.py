"""A real 2-process job on this machine (2 processes x 2 CPU devices, gloo collectives) trains to the
same parameters and metrics as 1 process x 4 devices with the same seed and global batch, the one
with the training split on the devices, the other fed from the host."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from jaxcell.train import local, restore_for_inference

ARGS = ["train", "--model", "lightnetcell", "--model-arg", "widths=(8,16,16)", "--model-arg", "hidden=16",
        "--image-size", "16", "--epochs", "2", "--batch-size", "8", "--synthetic-examples", "96",
        "--seed", "4", "--no-progress"]


def launch(argv, devices):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "jaxcell.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process):
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    address = f"127.0.0.1:{free_port()}"
    workers = [launch([*ARGS, "--workdir", multi, "--coordinator-address", address, "--num-processes", "2",
                       "--process-id", str(i)], devices=2) for i in range(2)]
    # auto = device on CPUs: the 2-process job gathers its batches on the devices; the single
    # process is fed from the host, the other pipeline, for the same batches
    finish(launch([*ARGS, "--workdir", single, "--input-pipeline", "host"], devices=4))
    outputs = [finish(w) for w in workers]
    assert "trained lightnetcell" in outputs[0] and "trained" not in outputs[1]  # only process 0 reports
    assert "input pipeline: device" in outputs[0] and "input pipeline" not in outputs[1]

    history = [[json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))] for d in (single, multi)]
    assert [h["step"] for h in history[0]] == [h["step"] for h in history[1]]
    for a, b in zip(*history):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(a[key])), (key, a[key], b[key])

    states = [restore_for_inference(d, "last", devices=jax.devices()[:4])[0] for d in (single, multi)]
    leaves = [jax.tree.leaves(jax.tree.map(local, {"p": s.params, "b": s.batch_stats})) for s in states]
    worst = max(float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12))
                for x, y in zip(*leaves) if x.dtype.kind == "f")
    assert worst < 1e-6, worst
