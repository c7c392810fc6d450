"""The trainer: sharding-invariance, exact resumption, checkpoints kept, the metrics history."""

import json
import os

import jax
import numpy as np
import pytest

from jaxcell import data
from jaxcell.checkpoint import Checkpoints
from jaxcell.errors import UserError
from jaxcell.train import TrainConfig, train

TINY = {"widths": (8, 16, 16), "hidden": 16}


@pytest.fixture(scope="module")
def smears():
    return data.load(None, image_size=16, seed=3, synthetic_examples=96)


def config(**kw):
    base = dict(model="lightnetcell", model_kwargs=TINY, image_size=16, epochs=1, batch_size=8, lr=3e-3, seed=1)
    return TrainConfig(**{**base, **kw})


def leaves(state):
    return jax.tree.leaves(jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))


def test_one_device_and_four_devices_train_alike(smears, tmp_path):
    assert len(jax.devices()) >= 4, "conftest forces 4 CPU devices"
    one = train(config(), smears, str(tmp_path / "one"), devices=jax.devices()[:1], progress=False)
    four = train(config(), smears, str(tmp_path / "four"), devices=jax.devices()[:4], progress=False)
    assert int(one.state.step) == int(four.state.step) == len(smears.splits["train"][1]) // 8
    worst = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
                for a, b in zip(leaves(one.state), leaves(four.state)) if a.dtype.kind == "f")
    assert worst < 1e-5, worst
    assert one.history[-1]["val_accuracy"] == pytest.approx(four.history[-1]["val_accuracy"])


def test_extending_a_run_with_resume_continues_bit_identically(smears, tmp_path):
    # A constant learning rate: with a schedule, the run's length is part of the schedule.
    flat = dict(schedule="constant", warmup_steps=0)
    straight = train(config(epochs=2, **flat), smears, str(tmp_path / "straight"), progress=False)
    workdir = str(tmp_path / "halves")
    train(config(epochs=1, checkpoint_every=3, **flat), smears, workdir, progress=False)
    resumed = train(config(epochs=2, **flat), smears, workdir, resume=True, progress=False)
    assert int(resumed.state.step) == int(straight.state.step)
    for a, b in zip(leaves(straight.state), leaves(resumed.state)):
        np.testing.assert_array_equal(a, b)
    epochs = [json.loads(line)["epoch"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert epochs == [1, 2]


def test_workdir_holds_config_history_and_last_and_best_checkpoints(smears, tmp_path):
    workdir = str(tmp_path / "run")
    result = train(config(epochs=3, checkpoint_every=2), smears, workdir, progress=False)
    record = json.load(open(os.path.join(workdir, "config.json")))
    assert record["model"] == "lightnetcell"
    assert record["class_names"] == ["Benign", "Early", "Pre", "Pro"]
    assert record["model_kwargs"]["num_classes"] == 4 and record["model_kwargs"]["image_size"] == 16
    assert record["preprocessing"]["image_size"] == 16
    assert len(result.history) == 3 and all("val_accuracy" in h for h in result.history)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    steps = checkpoints.manager.all_steps()
    best = max(result.history, key=lambda h: h["val_accuracy"])["step"]
    assert checkpoints.latest_step() == result.history[-1]["step"]
    assert checkpoints.best_step() == best
    assert set(steps) == {best, result.history[-1]["step"]}, steps
    checkpoints.close()


def test_refuses_to_clobber_or_resume_the_wrong_run(smears, tmp_path):
    workdir = str(tmp_path / "run")
    train(config(), smears, workdir, progress=False)
    with pytest.raises(UserError, match="already holds a run"):
        train(config(), smears, workdir, progress=False)
    with pytest.raises(UserError, match="holds no run"):
        train(config(), smears, str(tmp_path / "empty"), resume=True, progress=False)
    with pytest.raises(UserError, match="not a multiple"):
        train(config(batch_size=6), smears, str(tmp_path / "odd"), devices=jax.devices()[:4], progress=False)


def test_sigterm_checkpoints_mid_epoch_and_resume_is_bit_identical(smears, tmp_path, monkeypatch):
    import signal

    import jaxcell.train as trainer

    straight = train(config(epochs=2), smears, str(tmp_path / "straight"), progress=False)
    original = trainer.step_rng

    def signal_at_step_4(seed, step):
        if step == 4:  # delivered while step 5 runs: the loop must finish it, then checkpoint
            os.kill(os.getpid(), signal.SIGTERM)
        return original(seed, step)

    workdir = str(tmp_path / "killed")
    monkeypatch.setattr(trainer, "step_rng", signal_at_step_4)
    stopped = train(config(epochs=2), smears, workdir, progress=False, log=lambda _: None)
    monkeypatch.setattr(trainer, "step_rng", original)
    assert stopped.interrupted and int(trainer.local(stopped.state.step)) == 5
    assert Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True).latest_step() == 5
    resumed = train(config(epochs=2), smears, workdir, resume=True, progress=False)
    for a, b in zip(leaves(straight.state), leaves(resumed.state)):
        np.testing.assert_array_equal(a, b)


def test_divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(smears, tmp_path, monkeypatch):
    import jax.numpy as jnp
    import optax

    import jaxcell.train as trainer

    poisoned = lambda cfg, *_: optax.chain(optax.adam(cfg.lr),  # noqa: E731  the 4th update is NaN
                                       optax.scale_by_schedule(lambda n: jnp.where(n == 3, jnp.nan, 1.0)))
    monkeypatch.setattr(trainer, "make_optimizer", poisoned)
    workdir = str(tmp_path / "nan")
    with pytest.raises(trainer.Diverged, match="diverged at step 4.*last good checkpoint is step 3"):
        train(config(checkpoint_every=1), smears, workdir, progress=False)
    state, *_ = trainer.restore_for_inference(workdir, "last")
    assert int(trainer.local(state.step)) == 3
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
