"""Recipes: shipped training configurations, overridable by flags, recorded in the workdir."""

import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from jaxcell import models, recipes
from jaxcell import train as train_module
from jaxcell.cli import main, parse_args
from jaxcell.train import TrainConfig, TrainResult


def test_every_recipe_names_real_settings_and_a_registered_model():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    trained = set()
    for r in recipes.RECIPES.values():
        assert set(r.settings) <= fields and set(r.needs) <= fields, r.name
        models.create(r.settings["model"], image_size=r.settings["image_size"], **r.settings.get("model_kwargs", {}))
        assert r.version >= 1 and r.summary and r.hardware
        trained.add(r.settings["model"])
    assert trained == set(models.names())  # one recipe (at least) per architecture
    assert "all4class-cpu" in recipes.RECIPES


def test_flags_override_the_recipe():
    r = recipes.get("all4class-cpu").settings
    args = parse_args(["train", "--recipe", "all4class-cpu", "--workdir", "w", "--epochs", "2", "--no-augment"])
    assert (args.model, args.image_size, args.lr, args.stain_jitter) == (
        r["model"], r["image_size"], r["lr"], r["stain_jitter"])
    assert args.epochs == 2 and args.no_augment
    plain = parse_args(["train", "--workdir", "w"])
    assert plain.model == "lightnetcell" and plain.recipe is None


def test_the_trainer_gets_the_recipe_and_records_it(monkeypatch, capsys):
    seen = {}

    def fake_train(config, dataset, workdir, **kw):  # the trainer itself is tested in test_train
        seen["config"] = config
        return TrainResult(state=None, history=[], seconds=0.0)

    monkeypatch.setattr(train_module, "train", fake_train)
    assert main(["train", "--recipe", "all4class-cpu", "--epochs", "1", "--image-size", "16",
                 "--synthetic-examples", "24", "--workdir", "unused", "--no-progress", "--no-ood"]) == 0
    config = seen["config"]
    assert config.recipe == f"all4class-cpu v{recipes.get('all4class-cpu').version}"
    assert config.model == recipes.get("all4class-cpu").settings["model"] and config.epochs == 1
    assert config.image_size == 16
    assert config.stain_jitter == recipes.get("all4class-cpu").settings["stain_jitter"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--recipe", "nope", "--workdir", "w"], "unknown recipe 'nope'; known recipes: all4class-cpu"),
    (["train", "--recipe", "resnet18-transfer", "--workdir", "w"], "needs --init-from"),
])
def test_recipe_mistakes_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_recipes_command_lists_them(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in recipes.RECIPES)


def _make_run_train_argv() -> list[str]:
    """The `jaxcell train` command of the Makefile's `run` target, as argv."""
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    target = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    line = next(l for l in target.splitlines() if "jaxcell train" in l)
    return shlex.split(line.replace("$(WORKDIR)", "runs/demo"))[1:]


def test_make_run_trains_the_demo_recipe_as_it_is():
    # The README's make-run figures are the recipe's; a flag in the Makefile would silently change them.
    argv = _make_run_train_argv()
    args = parse_args(argv)
    assert args.recipe == "demo-cpu"
    assert args.data is None  # synthetic smears: a fresh clone has no data
    for key, value in recipes.get("demo-cpu").settings.items():
        assert getattr(args, key) == value, key
    flags = {a.split("=")[0] for a in argv if a.startswith("--")}
    assert flags == {"--recipe", "--workdir", "--overwrite"}


@pytest.mark.slow
def test_the_demo_recipe_reaches_its_accuracy(tmp_path, capsys):
    # What make run promises (README): at least 0.90 test accuracy on the synthetic smears (~3 min).
    workdir, report = tmp_path / "demo", tmp_path / "report.json"
    assert main(["train", "--recipe", "demo-cpu", "--workdir", str(workdir), "--no-progress"]) == 0
    assert main(["evaluate", "--workdir", str(workdir), "--split", "test", "--out", str(report)]) == 0
    assert json.loads(report.read_text())["accuracy"] >= 0.90
