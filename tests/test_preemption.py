"""SIGTERM to one process of a two-process job (2 processes x 2 CPU devices, gloo, fed by the
host pipeline): both stop at the same step and write one complete checkpoint together, the job
exits 0, and --resume ends bit-identical to a job that was never stopped. Before the stop
decision was collective this job hung: the signalled process waited in the checkpoint's
barrier, the other in its next step's all-reduce. Every wait here has a timeout, so a hang
fails the test."""

import os
import re
import signal
import time

import jax
import numpy as np
import pytest

from jaxcell.checkpoint import Checkpoints
from jaxcell.train import local, read_history, restore_for_inference
from test_multihost import ARGS, free_port, launch

pytestmark = pytest.mark.integration

EPOCHS = 3  # 8 steps an epoch: 24 steps
STOP_WITHIN_S = 180  # from the signal to both processes' exit; generous for a loaded 2-core machine


@pytest.fixture
def job():
    """job(workdir, *flags): the two processes of a job; any still running at the end are killed."""
    launched = []

    def start(workdir: str, *extra: str):
        argv = [*ARGS, "--workdir", workdir, "--coordinator-address", f"127.0.0.1:{free_port()}",
                "--num-processes", "2", "--input-pipeline", "host", *extra]  # each process gathers its block
        argv[argv.index("--epochs") + 1] = str(EPOCHS)
        launched.extend(workers := [launch([*argv, "--process-id", str(i)], devices=2) for i in range(2)])
        return workers

    yield start
    for w in launched:
        if w.poll() is None:
            w.kill()
            w.communicate()


def wait(workers, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    try:
        outputs = [w.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:  # a hung job: end it so that the test fails instead of blocking
                w.kill()
                w.communicate()
    assert [w.returncode for w in workers] == [0, 0], outputs
    return outputs


def test_sigterm_to_one_process_stops_both_at_one_step_and_resume_is_bit_identical(tmp_path, job):
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    workers = job(stopped)
    metrics = os.path.join(stopped, "metrics.jsonl")
    deadline = time.monotonic() + 400
    while not (os.path.isfile(metrics) and open(metrics).read().strip()):  # after the first epoch
        assert all(w.poll() is None for w in workers), [w.communicate()[0] for w in workers]
        assert time.monotonic() < deadline, "the first epoch never ended"
        time.sleep(0.05)
    workers[1].send_signal(signal.SIGTERM)  # process 1 only, as a scheduler's signal can reach one node first
    signalled = time.monotonic()
    # the job never stopped runs beside it, started only now: it reads the programs the stopped
    # job compiled from the compilation cache instead of compiling them at the same time
    reference = job(straight)
    outputs = wait(workers, STOP_WITHIN_S)
    took = time.monotonic() - signalled

    steps = []
    for i, out in enumerate(outputs):
        found = re.search(rf"process {i}: stopped at step (\d+) of {EPOCHS * 8} \(signal 15 to process 1\)", out)
        assert found, out
        steps.append(int(found.group(1)))
    assert steps[0] == steps[1] and 8 < steps[0] < EPOCHS * 8, steps
    assert "trained" not in outputs[0]
    assert Checkpoints(os.path.join(stopped, "checkpoints"), read_only=True).latest_step() == steps[0]
    print(f"stopped at step {steps[0]} of {EPOCHS * 8}, {took:.1f} s after the signal")

    wait(reference, 400)
    resumed = wait(job(stopped, "--resume"), 400)
    assert f"resumed from step {steps[0]}" in resumed[0] and "trained lightnetcell" in resumed[0]

    # the epoch that was cut has its training averages over the steps after the resume only
    cut = steps[0] // 8
    kept = lambda h, k: k != "seconds" and not (h["epoch"] == cut + 1 and k.startswith("train"))  # noqa: E731
    histories = [[{k: v for k, v in h.items() if kept(h, k)} for h in read_history(d)] for d in (straight, stopped)]
    assert histories[0] == histories[1] and len(histories[0]) == EPOCHS
    states = [restore_for_inference(d, "last", devices=jax.devices()[:4])[0] for d in (straight, stopped)]
    assert int(local(states[1].step)) == EPOCHS * 8
    for a, b in zip(*(jax.tree.leaves(jax.tree.map(local, {"p": s.params, "b": s.batch_stats})) for s in states)):
        np.testing.assert_array_equal(a, b)
