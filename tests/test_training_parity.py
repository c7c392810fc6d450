"""Training parity (parity/training.py) and the reference PyTorch trainer (torch_ref/train.py).

Training parity runs N Adam steps of both twins from the same weights on the same batches; at
small sizes float32 drift stays below 1e-6 after 5 steps (see parity/training.py), so the
tolerance 1e-5 separates it from real mismatches, which the tests below inject and catch.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import jaxcell.models
import parity.training as training
import torch_ref
from jaxcell.cli import main as jaxcell_main
from parity.training import TRAIN_TOLERANCE, no_dropout, train_parity

TINY = {"widths": (8, 16, 16), "hidden": 16}
SETUP = dict(image_size=32, batch=4, seed=0, lr=1e-3)


def test_lightnetcell_trains_alike_for_five_steps():
    # check() tries further seeds only if one meets a rounding-decided discontinuity (a ReLU input
    # within ~1e-7 of 0): seed 0 needs none here, another CPU's rounding might.
    passed, runs = training.check("lightnetcell", steps=5, **SETUP, **TINY)
    rows = runs[-1][1]
    table = training.format_table(rows, TRAIN_TOLERANCE)
    assert passed, table
    assert [r.step for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert r.within(TRAIN_TOLERANCE), table
        assert r.first_beyond is None and r.counts_equal, table
        assert r.loss_diff <= 1e-5 * abs(r.loss_torch), table
        assert r.param_worst and 0 < r.param_rel  # the comparison saw real, non-identical numbers
    assert rows[0].loss_torch != rows[1].loss_torch  # each step its own batch


def _momentum(value):
    original = training.randomize_torch_model

    def randomize(model, seed):
        original(model, seed)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = value
        return model

    return randomize


def test_a_batchnorm_momentum_mismatch_is_caught_at_step_one_and_named(monkeypatch):
    monkeypatch.setattr(training, "randomize_torch_model", _momentum(0.11))
    passed, runs = training.check("lightnetcell", steps=1, **SETUP, **TINY)
    assert not passed and len(runs) == 3  # every seed fails
    assert all(row.mean_rel > 1e-3 for _, (row,) in runs)
    # named as the first entry beyond (seed 1 also meets a ReLU discontinuity at step 1, which comes first)
    assert runs[0][1][0].first_beyond == "block1.bn.running_mean"


def test_an_adam_mismatch_is_caught_once_the_moments_matter(monkeypatch):
    # Step 1 of Adam is g / (|g| + eps) whatever b1 is; from step 2 on, b1 decides.
    monkeypatch.setitem(training.ADAM, "betas", (0.91, 0.999))
    passed, runs = training.check("lightnetcell", steps=3, seeds=2, **SETUP, **TINY)
    assert not passed
    parameters = dict(torch_ref.create("lightnetcell", **TINY).named_parameters())
    for _, rows in runs:
        assert not rows[2].within(TRAIN_TOLERANCE)
        assert rows[2].first_beyond in parameters


def test_dropout_is_set_to_zero_for_every_dropout_argument():
    assert no_dropout("hybrid_vit", {"depth": 1}) == {"dropout": 0.0, "attention_dropout": 0.0, "depth": 1}
    assert no_dropout("lightnetcell", {"dropout": 0.0})["dropout"] == 0.0
    assert no_dropout("resnet18", {}) == {}
    with pytest.raises(ValueError, match="'dropout' still drops with p=0.5"):
        train_parity("lightnetcell", steps=1, **SETUP, dropout=0.5, **TINY)


def test_the_command_prints_the_table_and_passes(capsys):
    code = jaxcell_main(["parity", "--model", "lightnetcell", "--image-size", "32", "--batch", "4",
                         "--train-steps", "2", "--model-arg", "widths=(8,16,16)", "--model-arg", "hidden=16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "training parity lightnetcell: 2 Adam steps" in out and "PASS" in out


@pytest.mark.slow
@pytest.mark.parametrize("name, steps, kw", [
    ("lightnetcell", 5, TINY),
    ("brin", 5, {"preset": "small"}),
    ("hybrid_vit", 5, {"depth": 1, "dim": 32, "heads": 2, "widths": (8, 8, 8)}),
    # Deep BatchNorm nets at 32 px: torch's own float32 run leaves its float64 run by 1e-2
    # after step 1 (see parity/training.py), so one step is what float32 Adam resolves.
    ("resnet18", 1, {}),
    ("densenet121", 1, {}),
])
def test_every_model_trains_alike_at_small_sizes(name, steps, kw):
    assert name in jaxcell.models.names()
    passed, runs = training.check(name, steps=steps, **SETUP, **kw)
    assert passed, "\n".join(training.format_table(rows, TRAIN_TOLERANCE) for _, rows in runs)


# ----------------------------------------------------------------------------- torch_ref.train

def test_epoch_order_is_jaxcells():
    from jaxcell.train import epoch_order
    from torch_ref.train import epoch_order as torch_epoch_order

    for seed, epoch, n in [(0, 0, 10), (3, 2, 97), (7, 11, 1)]:
        np.testing.assert_array_equal(torch_epoch_order(seed, epoch, n), epoch_order(seed, epoch, n))


def test_augmentation_computes_jaxcells_formulas():
    from jaxcell.data import augment as jaug
    from torch_ref import train as taug

    images = np.random.default_rng(0).random((3, 8, 8, 3)).astype(np.float32)
    rng = jax.random.key(5)
    n = len(images)
    flips = np.array(jax.random.bernoulli(rng, 0.5, (3, n, 1, 1, 1))).reshape(3, n)
    want = np.asarray(jaug.dihedral(images, rng))
    got = taug.dihedral(torch.from_numpy(images), *torch.from_numpy(flips))
    np.testing.assert_array_equal(got.numpy(), want)

    scale_rng, shift_rng = jax.random.split(rng)
    alpha = jax.random.uniform(scale_rng, (n, 1, 1, 3), minval=0.9, maxval=1.1)
    beta = jax.random.uniform(shift_rng, (n, 1, 1, 3), minval=-0.1, maxval=0.1)
    want = np.asarray(jaug.hed_jitter(images, rng, 0.1))
    got = taug.hed_jitter(torch.from_numpy(images), torch.from_numpy(np.array(alpha)),
                          torch.from_numpy(np.array(beta)))
    np.testing.assert_allclose(got.numpy(), want, atol=2e-6)

    b, c, s = np.array(jax.random.uniform(rng, (3, n, 1, 1, 1), minval=0.8, maxval=1.2))
    want = np.asarray(jaug.color_jitter(images, rng, 0.2))
    got = taug.color_jitter(torch.from_numpy(images), *map(torch.from_numpy, (b, c, s)))
    np.testing.assert_allclose(got.numpy(), want, atol=2e-6)

    u = np.array(jax.random.uniform(rng, (4, n)))  # resized_crop's draws
    for scale in (0.3, 1.0):
        want = np.asarray(jaug.resized_crop(images, rng, scale))
        got = taug.resized_crop(torch.from_numpy(images), torch.from_numpy(u), scale)
        np.testing.assert_allclose(got.numpy(), want, atol=2e-6)

    turns = np.array(jax.random.uniform(rng, (n,), minval=-0.2, maxval=0.2))
    want = np.asarray(jaug.hue_jitter(images, rng, 0.2))
    got = taug.hue_rotate(torch.from_numpy(images), torch.from_numpy(turns))
    np.testing.assert_allclose(got.numpy(), want, atol=2e-6)


def test_torch_trainer_writes_a_workdir_jaxcell_can_import_and_evaluate(tmp_path, capsys):
    from jaxcell.train import TrainConfig
    from torch_ref.train import main as torch_train

    workdir = str(tmp_path / "torch-run")
    args = ["--model", "lightnetcell", "--model-arg", "widths=(8,16,16)", "--model-arg", "hidden=16",
            "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--synthetic-examples", "64",
            "--crop-scale", "0.5", "--hue-jitter", "0.05", "--split-seed", "3", "--workdir", workdir]
    assert torch_train(args) == 0
    record = json.load(open(os.path.join(workdir, "config.json")))
    assert set(record["train"]) == set(TrainConfig().to_dict())
    assert record["train"]["split_seed"] == 3 and record["data"]["source"].endswith("seed 3)")  # split by it
    assert (record["train"]["crop_scale"], record["train"]["hue_jitter"]) == (0.5, 0.05)
    assert record["model_kwargs"] == {"num_classes": 4, "image_size": 32, "widths": [8, 16, 16], "hidden": 16}
    history = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [h["epoch"] for h in history] == [1, 2]
    assert set(history[0]) == {"epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                               "seconds"}
    model = torch_ref.load(os.path.join(workdir, "best.safetensors"))
    assert not model.training and model.class_names == ["Benign", "Early", "Pre", "Pro"]

    assert torch_train(args) == 2  # refuses to clobber
    assert "already holds a run" in capsys.readouterr().err

    imported = str(tmp_path / "imported")
    assert jaxcell_main(["import", "--torch", os.path.join(workdir, "last.safetensors"), "--workdir", imported]) == 0
    folder = tmp_path / "folder"
    for i, name in enumerate(["Benign", "Pro"]):
        (folder / name).mkdir(parents=True)
        Image.fromarray(np.full((40, 36, 3), 60 * i + 50, np.uint8)).save(folder / name / "a.png")
    assert jaxcell_main(["evaluate", "--workdir", imported, "--data", str(folder)]) == 0
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("schedule, warmup, total", [("cosine", None, 50), ("cosine", 0, 7), ("constant", 5, 20),
                                                     ("constant", None, 3), ("cosine", 30, 10)])
def test_learning_rate_schedule_is_jaxcells(schedule, warmup, total):
    from jaxcell.train import TrainConfig, learning_rate
    from torch_ref.train import learning_rate as torch_learning_rate

    want = learning_rate(TrainConfig(lr=3e-3, schedule=schedule, warmup_steps=warmup), total)
    for step in range(total + 2):
        assert torch_learning_rate(step, 3e-3, total, warmup, schedule) == pytest.approx(float(want(step)), rel=1e-5,
                                                                                          abs=1e-12)
