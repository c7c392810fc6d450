"""The training settings' one definition (jaxcell/settings.py): TrainConfig's fields make the flags of
`jaxcell train` and `python -m torch_ref.train`, and check the recipes."""

import dataclasses

import pytest

from jaxcell import settings
from jaxcell.cli import build_parser, parse_args
from jaxcell.errors import UserError
from jaxcell.recipes import Recipe
from jaxcell.settings import TrainConfig
from torch_ref.train import build_parser as torch_parser


def _options(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings}


def _train_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["train"]


def test_every_field_but_the_recipe_is_a_flag_of_jaxcell_train():
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "recipe"]
    assert {settings.flag_name(f) for f in fields} <= _options(_train_parser())
    assert settings.flag_name("augment") == "--no-augment" and settings.flag_name("model_kwargs") == "--model-arg"


def test_the_torch_trainer_has_the_shared_flags_and_only_those():
    twin = {settings.flag_name(f.name) for f in dataclasses.fields(TrainConfig)
            if "flag" in f.metadata and f.metadata["flag"].twin}
    jaxcell_only = {settings.flag_name(f.name) for f in dataclasses.fields(TrainConfig)
                    if "flag" in f.metadata and not f.metadata["flag"].twin}
    options = _options(torch_parser())
    assert twin <= options and not jaxcell_only & options
    assert {"--crop-scale", "--hue-jitter", "--od-center", "--split-seed"} <= twin
    assert {"--init-from", "--precision", "--input-pipeline"} <= jaxcell_only


def test_no_flag_gives_the_fields_defaults():
    args = parse_args(["train", "--workdir", "w"])
    config = settings.from_flags(args, default_lr=lambda model: 0.123)
    assert config == dataclasses.replace(TrainConfig(), lr=0.123)  # lr: the model's own when not given


def test_flags_become_field_values(tmp_path):
    args = parse_args(["train", "--workdir", "w", "--no-augment", "--model-arg", "hidden=8", "--model-arg",
                       "widths=(4,4,4)", "--data", str(tmp_path), "--lr", "0.5", "--od-center"])
    config = settings.from_flags(args, default_lr=lambda model: pytest.fail("--lr was given"))
    assert (config.augment, config.model_kwargs, config.data, config.lr, config.od_center) == (
        False, {"hidden": 8, "widths": (4, 4, 4)}, str(tmp_path), 0.5, True)


@pytest.mark.parametrize("overlay, message", [
    ({"epochz": 3}, "recipe 'r' sets 'epochz', which is no training setting; known settings: model, "),
    ({"schedule": "cos"}, "recipe 'r' sets schedule='cos'; --schedule takes cosine, constant"),
    ({"epochs": 0}, "recipe 'r' sets epochs=0, which --epochs refuses: must be positive, got 0"),
    ({"crop_scale": 1.5}, "which --crop-scale refuses: must be an area fraction in (0, 1], got 1.5"),
    ({"od_center": "yes"}, "recipe 'r' sets od_center='yes'; it is True or False"),
    ({"model_kwargs": [("hidden", 8)]}, "it is a dict of constructor arguments"),
])
def test_a_recipe_with_a_wrong_setting_is_refused_naming_it(overlay, message):
    with pytest.raises(UserError) as error:
        Recipe("r", 1, "summary", "hardware", {"model": "lightnetcell", **overlay})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_recipe_needing_an_unknown_setting_is_refused():
    with pytest.raises(UserError, match="'weights', which is no training setting"):
        Recipe("r", 1, "summary", "hardware", {"model": "lightnetcell"}, needs={"weights": "FILE"})
