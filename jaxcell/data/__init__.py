"""Data sets for training and evaluation: a folder of images, or synthetic smears.

    ds = jaxcell.data.load("/data/leukemia", image_size=224, seed=0)    # TFDS-cached folder
    ds = jaxcell.data.load(None, image_size=64)                         # synthetic smears
    images, labels = ds.splits["train"]                                 # uint8 NHWC, int32

Everything comes back as numpy arrays in host memory (0.5 GB for the full ALL dataset at 224 px):
the trainer moves them to the device once and augments there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from jaxcell import CLASS_NAMES
from jaxcell.data import folders
from jaxcell.data.images import load_image, load_images
from jaxcell.data.splits import FRACTIONS, SPLITS, content_hashes, split_by_content
from jaxcell.data.synthetic import make_smears
from jaxcell.errors import UserError

__all__ = [
    "Dataset", "load", "load_folder_all", "load_image", "load_images", "make_smears",
    "content_hashes", "split_by_content", "SPLITS", "FRACTIONS",
]


@dataclass
class Dataset:
    class_names: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (images uint8 NHWC, labels int32)
    files: dict[str, list[str]] = field(default_factory=dict)  # per split; empty for synthetic data
    source: str = ""  # human description of where the images came from
    split_note: str = ""  # how the split was made, for reports

    def summary(self) -> str:
        counts = ", ".join(f"{k} {len(v[1])}" for k, v in self.splits.items())
        return f"{self.source}; {counts}; {self.split_note}"


def split_seed(train_record: dict) -> int:
    """The seed of a run's data split, from its TrainConfig as a dict (config.json's "train", also
    written by torch_ref.train): split_seed, or seed where it is unset (as in runs from before
    split_seed existed)."""
    chosen = train_record.get("split_seed")
    return train_record["seed"] if chosen is None else chosen


def load(data_dir: str | os.PathLike | None, image_size: int, seed: int = 0,
         synthetic_examples: int = 1200, cache_dir: str | os.PathLike | None = None) -> Dataset:
    """A folder of class folders (TFDS-cached, see jaxcell.data.folders), or synthetic smears if None."""
    if image_size < 16:
        raise UserError(f"image size must be at least 16 px, got {image_size}")
    if data_dir is None:
        return _synthetic(image_size, seed, synthetic_examples)
    scanned = folders.scan(data_dir)
    builder = folders.build(data_dir, image_size, seed, cache_dir=cache_dir, scanned=scanned)
    root = folders.resolve_root(data_dir)
    parts = folders.read_splits(builder)
    n = sum(len(v[1]) for v in parts.values())
    return Dataset(
        class_names=list(scanned[2]),
        splits={k: (v[0], v[1]) for k, v in parts.items()},
        files={k: [str(root / f) for f in v[2]] for k, v in parts.items()},
        source=f"image folder {root} ({n} images, {image_size} px; TFDS cache {builder.data_dir})",
        split_note=(
            f"split {_pct()} per image by content hash, stratified by class, seed {seed}; byte-identical "
            "files and near duplicates (difference hashes <= 4 bits apart) always share a split. The data "
            "has no patient ids, so images of one patient may fall in different splits."
        ),
    )


def load_folder_all(data_dir: str | os.PathLike, image_size: int,
                    class_names: list[str] | tuple[str, ...] | None = None
                    ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Every image of a class-folder tree: (images, labels, files, class_names), decoded directly.

    With `class_names` (a model's classes) the labels index into them, and every folder class
    must be one of them.
    """
    paths, labels, found = folders.scan(data_dir)
    if class_names is not None:
        class_names = list(class_names)
        unknown = [c for c in found if c not in class_names]
        if unknown:
            raise UserError(
                f"class folder {unknown[0]!r} in {data_dir} is not a class of the model "
                f"({', '.join(class_names)})"
            )
        labels = np.array([class_names.index(found[i]) for i in labels], np.int32)
    else:
        class_names = found
    return load_images(paths, image_size), labels, paths, class_names


def _synthetic(image_size: int, seed: int, n: int) -> Dataset:
    if n < 3 * len(CLASS_NAMES):
        raise UserError(f"need at least {3 * len(CLASS_NAMES)} synthetic examples, got {n}")
    images, labels = make_smears(n, image_size, seed)
    # Each image is its own group: a stable per-index key makes the split depend on the seed only.
    split = split_by_content([f"synthetic-{i}" for i in range(n)], labels, FRACTIONS, seed)
    return Dataset(
        class_names=list(CLASS_NAMES),
        splits={k: (images[idx], labels[idx]) for k, idx in split.items()},
        files={k: [] for k in SPLITS},
        source=f"synthetic smears ({n} images, {image_size} px, seed {seed})",
        split_note=f"synthetic images, split {_pct()} stratified by class, seed {seed}",
    )


def _pct() -> str:
    return "/".join(f"{round(100 * f)}" for f in FRACTIONS)
