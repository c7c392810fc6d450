"""The training settings, each defined once: a field of TrainConfig with its default, and in its
metadata the command-line flag that sets it (type, choices, help).

    config = TrainConfig(model="brin", epochs=5)           # what config.json's "train" records
    add_flags(parser)                                      # the flags of `jaxcell train`
    add_flags(parser, twin=True)                           # ... of `python -m torch_ref.train`
    args = parser.parse_args(argv); fill(args, overlay)    # given flags, else the overlay (a recipe), else defaults
    config = from_flags(args, default_lr=...)

A recipe is an overlay of field values (`check_overlay` refuses a key that is no field, or a value
its flag would refuse). Adding a setting means adding one field here.

Plain Python (no jax, no torch): jaxcell's trainer and torch_ref's twin trainer both read it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
from typing import Any, Callable

from jaxcell.errors import UserError

# ----------------------------------------------------------------------------- argument types
# argparse types: a wrong value is refused by the parser as "argument --flag: <message>".


def model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:  # numpy's generators, which draw the split and the synthetic smears, refuse them
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def area_fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be an area fraction in (0, 1], got {text}")
    return value


# ----------------------------------------------------------------------------- one field, one flag

# How a flag's value becomes the field's: VALUE (as given), PATH (made absolute), SWITCH (--flag: True),
# NEGATED (--no-flag: False), PAIRS (repeated KEY=VALUE: a dict).
VALUE, PATH, SWITCH, NEGATED, PAIRS = "value", "path", "switch", "negated", "pairs"


@dataclasses.dataclass(frozen=True)
class Flag:
    help: str | None = None
    type: Callable[[str], Any] | None = None
    choices: tuple | None = None
    metavar: str | None = None
    kind: str = VALUE
    name: str | None = None    # the flag's dest when it is not the field's name (--no-augment, --model-arg)
    twin: bool = True          # also a flag of `python -m torch_ref.train` (else jaxcell's alone)
    unset: bool = False        # the flag's default is None, resolved when the config is made (lr: the model's)


def setting(default: Any = None, *, factory: Callable[[], Any] | None = None, flag: bool = True,
            **flag_kw) -> Any:
    """A TrainConfig field and its flag (Flag's keywords); flag=False: a field without a flag."""
    metadata = {"flag": Flag(**flag_kw)} if flag else {}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


PIPELINES = ("auto", "device", "host")  # jaxcell.pipeline


@dataclasses.dataclass
class TrainConfig:
    model: str = setting("lightnetcell")
    model_kwargs: dict = setting(factory=dict, kind=PAIRS, name="model_arg", type=model_arg, metavar="KEY=VALUE",
                                 help="a constructor argument of the model, e.g. --model-arg hidden=128")
    image_size: int = setting(224, type=positive)
    epochs: int = setting(10, type=positive)
    batch_size: int = setting(32, type=positive)
    lr: float = setting(1e-3, type=float, unset=True, help="Adam's peak learning rate (default: the model's own)")
    seed: int = setting(0, type=non_negative_int,
                        help="initialization, data order and augmentation; also the data split unless --split-seed")
    split_seed: int | None = setting(None, type=non_negative_int, metavar="N",
                                     help="the train/val/test split's seed, and the images' for synthetic smears "
                                          "(default: --seed): fix it to vary only the rest")
    data: str | None = setting(None, kind=PATH, help="a class-folder tree (<root>/<Class>/*.jpg, or a Kaggle "
                                                     "layout); none: synthetic smears")
    synthetic_examples: int = setting(1200, type=positive)
    checkpoint_every: int = setting(0, type=int, metavar="STEPS", twin=False)  # 0: at each epoch's end only
    augment: bool = setting(True, kind=NEGATED, name="no_augment",
                            help="no flips, rotations, stain or colour jitter")
    stain_jitter: float = setting(0.05, type=float, metavar="S", help="HED jitter strength")
    od_center: bool = setting(False, kind=SWITCH,
                              help="model input: per image, the optical density -ln(x) with its mean per channel "
                                   "removed, instead of mean/std (a stain's overall shift cancels)")
    color_jitter: float = setting(0.1, type=float, metavar="S")
    crop_scale: float = setting(1.0, type=area_fraction, metavar="S",
                                help="random resized crops covering an area fraction in [S, 1] of the image "
                                     "(default 1: off)")
    hue_jitter: float = setting(0.0, type=non_negative_float, metavar="H",
                                help="rotate the hue by up to H of a full turn, e.g. 0.05 (default 0: off)")
    input_pipeline: str = setting("auto", choices=PIPELINES, twin=False,
                                  help="device: the training images stay on every device, each step sends "
                                       "indices; host: a thread gathers and sends batches ahead; auto: device "
                                       "when the training split fits in a quarter of the smallest device's memory")
    precision: str = setting("fp32", choices=("fp32", "bf16"), twin=False,
                             help="bf16: bfloat16 compute, float32 parameters, optimizer state and statistics")
    schedule: str = setting("cosine", choices=("cosine", "constant"), help="learning rate after the linear warm-up")
    warmup_steps: int | None = setting(None, type=int, metavar="N", help="default: a tenth of the run")
    init_from: str | None = setting(None, kind=PATH, metavar="FILE", twin=False,
                                    help="fine-tune from a torch state dict (.pth/.pt/.safetensors; torchvision "
                                         "files as they are)")
    freeze_backbone: bool = setting(False, kind=SWITCH, twin=False, help="train only the model's head")
    head_epochs: int = setting(0, type=int, metavar="N", twin=False, help="train only the head for N epochs first")
    backbone_lr_scale: float | None = setting(None, type=float, metavar="S", twin=False,
                                              help="backbone learning rate / head learning rate (default 0.1 with "
                                                   "--init-from, else 1)")
    recipe: str | None = setting(None, flag=False)  # "NAME vN" when started from jaxcell.recipes (--recipe NAME chooses it)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """UserError for values no run can use (the CLI's argument types catch them first)."""
        if not 0 < self.crop_scale <= 1:
            raise UserError(f"crop_scale must be an area fraction in (0, 1], got {self.crop_scale}")
        if not self.hue_jitter >= 0:
            raise UserError(f"hue_jitter must be >= 0, got {self.hue_jitter}")
        if self.input_pipeline not in PIPELINES:
            raise UserError(f"unknown input pipeline {self.input_pipeline!r}; use {', '.join(PIPELINES)}")


def _flags(twin: bool = False) -> list[tuple[dataclasses.Field, Flag]]:
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(TrainConfig)
            if "flag" in f.metadata and (f.metadata["flag"].twin or not twin)]


def _dest(f: dataclasses.Field, flag: Flag) -> str:
    return flag.name or f.name


def flag_name(field: str) -> str:
    """The command-line flag of a TrainConfig field: "init_from" -> "--init-from"."""
    f = {f.name: f for f in dataclasses.fields(TrainConfig)}[field]
    flag = f.metadata.get("flag")
    return "--" + (_dest(f, flag) if flag else field).replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, twin: bool = False) -> None:
    """Every setting's flag (`twin`: only those `python -m torch_ref.train` has too). Their defaults
    are left out of the namespace (argparse.SUPPRESS) so that `fill` can tell a given flag from an
    absent one: a recipe sets the absent ones."""
    for f, flag in _flags(twin):
        kw: dict[str, Any] = {"dest": _dest(f, flag), "default": argparse.SUPPRESS, "help": flag.help}
        if flag.kind in (SWITCH, NEGATED):
            kw["action"] = "store_true"
        else:
            kw.update(type=flag.type, metavar=flag.metavar, choices=flag.choices)
            if flag.kind == PAIRS:
                kw["action"] = "append"
        parser.add_argument("--" + _dest(f, flag).replace("_", "-"), **kw)


def _flag_value(f: dataclasses.Field, flag: Flag, value: Any) -> Any:
    """A field value as its flag's parsed value (for a default or an overlay)."""
    if flag.kind == NEGATED:
        return not value
    if flag.kind == PAIRS:
        return list(value.items())
    return value


def _field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def fill(args: argparse.Namespace, overlay: dict | None = None, twin: bool = False) -> argparse.Namespace:
    """Every setting's flag in `args`: as given, else the overlay's field value, else the field's
    default (None for an `unset` flag), each in the flag's own form (args.no_augment, args.model_arg)."""
    overlay = overlay or {}
    for f, flag in _flags(twin):
        dest = _dest(f, flag)
        if hasattr(args, dest):
            continue
        if f.name in overlay:
            value = overlay[f.name]
        elif flag.unset:
            setattr(args, dest, None)
            continue
        else:
            value = _field_default(f)
        setattr(args, dest, _flag_value(f, flag, value))
    return args


def from_flags(args: argparse.Namespace, default_lr: Callable[[str], float], twin: bool = False,
               **fields) -> TrainConfig:
    """The TrainConfig of a filled namespace; `default_lr(model)`: the learning rate when --lr is
    not set; `fields`: fields set otherwise (recipe="NAME vN")."""
    values = {}
    for f, flag in _flags(twin):
        value = getattr(args, _dest(f, flag))
        if flag.kind == NEGATED:
            value = not value
        elif flag.kind == PAIRS:
            value = dict(value)
        elif flag.kind == PATH and value:
            value = os.path.abspath(value)
        values[f.name] = value
    if values["lr"] is None:
        values["lr"] = default_lr(values["model"])
    return TrainConfig(**values, **fields)


def check_overlay(name: str, overlay: dict) -> None:
    """Refuse an overlay (a recipe's settings) naming a field TrainConfig has not, or a value its
    flag would refuse: one line naming the key."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key, value in overlay.items():
        if key not in fields:
            raise UserError(f"{name} sets {key!r}, which is no training setting; known settings: "
                            f"{', '.join(fields)}")
        flag = fields[key].metadata.get("flag")
        if flag is None or value is None:
            continue
        if flag.choices and value not in flag.choices:
            raise UserError(f"{name} sets {key}={value!r}; {flag_name(key)} takes {', '.join(flag.choices)}")
        if flag.type in (positive, non_negative_int, non_negative_float, area_fraction, int, float):
            try:
                ok = flag.type(str(value)) == value
            except (argparse.ArgumentTypeError, ValueError) as error:
                raise UserError(f"{name} sets {key}={value!r}, which {flag_name(key)} refuses: {error}") from None
            if not ok:
                raise UserError(f"{name} sets {key}={value!r}, not a value of {flag_name(key)}")
        if flag.kind in (SWITCH, NEGATED) and not isinstance(value, bool):
            raise UserError(f"{name} sets {key}={value!r}; it is True or False")
        if flag.kind == PAIRS and not isinstance(value, dict):
            raise UserError(f"{name} sets {key}={value!r}; it is a dict of constructor arguments")
