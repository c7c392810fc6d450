"""Image-folder data sets: finding the files, and a TFDS cache of the decoded images.

Accepted layouts (the user downloads the data; Kaggle needs a login):

- any class-folder tree `<root>/<Class>/**/<image>`: classes are the folder names, in sorted
  order, except that the four ALL classes are recognised under their usual spellings and come
  first in jaxcell.CLASS_NAMES order (Benign, Early, Pre, Pro);
- Kaggle "leukemia" (Aria et al., 3,256 images): `<root>/Original/<Class>` and
  `<root>/Segmented/<Class>`. Only `Original` is used (the segmented copies are derived from the
  same smears and would duplicate every image); `root` may be the folder that holds both or
  `Original` itself;
- Kaggle "Blood cell Cancer [ALL]" (3,242 images): `Benign`, `[Malignant] early Pre-B`,
  `[Malignant] Pre-B`, `[Malignant] Pro-B`, read as Benign, Early, Pre, Pro;
- any of these wrapped in single folders (an unzipped archive's top folder).

Images are recognised by extension (.jpg .jpeg .png .bmp .tif .tiff, any case). Hidden files,
`__MACOSX` folders and clearly non-image files (.txt, .csv, ...) are skipped; any other file is
an error rather than silently dropped. A file with an image extension that does not decode is
an error when it is read.

The TFDS builder (`build`) writes the decoded, resized images as array_record splits
(train/val/test from `splits.split_by_content`, exact and near duplicates kept together) in a
cache keyed by the folder's absolute path, its files' names, sizes and modification times, the
image size and the split seed: a second call with nothing changed reads the cache and decodes
nothing. TensorFlow is not needed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxcell import CLASS_NAMES, cache_dir
from jaxcell.data.images import load_image
from jaxcell.data.splits import FRACTIONS, SPLITS, content_hashes, file_difference_hashes, split_by_content
from jaxcell.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
# Files that are clearly not images and may sit beside them (metadata, notes, OS litter).
_SKIPPED_EXTENSIONS = frozenset({
    ".txt", ".csv", ".tsv", ".json", ".xml", ".yaml", ".yml", ".md", ".rst", ".html", ".htm",
    ".pdf", ".ini", ".log", ".db", ".zip", ".py", ".sh", ".xls", ".xlsx", ".doc", ".docx",
})
_SKIPPED_NAMES = frozenset({"thumbs.db", "desktop.ini", "readme", "license", "manifest"})


# ---------------------------------------------------------------------------------------------
# Finding the files


def canonical_class(folder_name: str) -> str | None:
    """The CLASS_NAMES entry a folder name stands for, or None for an unknown class."""
    key = re.sub(r"[^a-z]", "", folder_name.lower().replace("malignant", ""))
    return {
        "benign": "Benign",
        "early": "Early",
        "earlypreb": "Early",
        "pre": "Pre",
        "preb": "Pre",
        "pro": "Pro",
        "prob": "Pro",
    }.get(key)


def resolve_root(root: str | os.PathLike) -> Path:
    """The folder whose subfolders are the classes (see the module docstring)."""
    path = Path(root).expanduser()
    if not path.exists():
        raise UserError(f"data folder not found: {root}")
    if not path.is_dir():
        raise UserError(f"data path is not a folder: {root}")
    path = path.absolute()
    for _ in range(8):
        subdirs = _subdirs(path)
        names = {d.name.lower(): d for d in subdirs}
        if "original" in names and "segmented" in names:
            path = names["original"]  # Kaggle "leukemia": use the unsegmented images
        elif len(subdirs) == 1 and not _direct_images(subdirs[0]) and _subdirs(subdirs[0]):
            path = subdirs[0]  # a wrapper folder around a class-folder tree
        else:
            return path
    return path


def scan(root: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """Find the images of a class-folder tree.

    Returns (absolute paths, int32 labels, class names), sorted by class then relative path.
    For the Kaggle "leukemia" layout the `Original` images are used, not `Segmented`.
    """
    base = resolve_root(root)
    subdirs = _subdirs(base)
    stray = _direct_images(base)
    if not subdirs:
        if stray:
            raise UserError(
                f"{base} holds images but no class folders; expected <folder>/<class>/<image>"
            )
        raise UserError(f"data folder {base} is empty: expected one subfolder per class")
    if stray:
        raise UserError(f"image outside any class folder: {stray[0]} (move it into a class folder)")

    by_class: dict[str, tuple[Path, list[Path]]] = {}
    for d in subdirs:
        files = _class_images(d)
        if not files:
            raise UserError(f"class folder {d} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        name = canonical_class(d.name) or d.name
        if name in by_class:
            raise UserError(f"folders {by_class[name][0]} and {d} are both class {name!r}")
        by_class[name] = (d, files)
    if len(by_class) < 2:
        raise UserError(f"{base} has only one class folder ({next(iter(by_class))}); need at least two")

    known = [c for c in CLASS_NAMES if c in by_class]
    class_names = known + sorted(c for c in by_class if c not in CLASS_NAMES)
    paths, labels = [], []
    for label, name in enumerate(class_names):
        files = by_class[name][1]
        paths.extend(str(f) for f in files)
        labels.extend([label] * len(files))
    return paths, np.array(labels, np.int32), class_names


def _visible(p: Path) -> bool:
    return not p.name.startswith(".") and p.name != "__MACOSX"


def _entries(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if _visible(p))
    except OSError as e:
        raise UserError(f"cannot read folder {path}: {e.strerror or e}") from None


def _subdirs(path: Path) -> list[Path]:
    return [p for p in _entries(path) if p.is_dir()]


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def _direct_images(path: Path) -> list[Path]:
    return [p for p in _entries(path) if p.is_file() and _is_image(p)]


def _class_images(folder: Path) -> list[Path]:
    """Images under a class folder (recursively); UserError for a file of unknown type."""
    found = []
    def unreadable(e: OSError):
        raise UserError(f"cannot read folder {e.filename}: {e.strerror or e}")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):
        dirnames[:] = sorted(d for d in dirnames if _visible(Path(d)))
        for name in sorted(filenames):
            p = Path(dirpath, name)
            if not _visible(p):
                continue
            if _is_image(p):
                found.append(p)
            elif p.suffix.lower() not in _SKIPPED_EXTENSIONS and p.stem.lower() not in _SKIPPED_NAMES:
                raise UserError(
                    f"unsupported file type: {p} (jaxcell reads {', '.join(sorted(IMAGE_EXTENSIONS))}; "
                    "convert it or move it out of the data folder)"
                )
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


# ---------------------------------------------------------------------------------------------
# The TFDS cache


def default_cache_dir() -> Path:
    """`$JAXCELL_CACHE/tfds` if JAXCELL_CACHE is set, else `~/.cache/jaxcell/tfds`."""
    return cache_dir("tfds")


@dataclass(frozen=True)
class _Plan:
    """Everything the builder writes, fixed before it runs."""

    root: Path
    files: tuple[str, ...]  # relative to root, POSIX separators
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    image_size: int
    seed: int
    key: str


def _plan(root: Path, paths: list[str], labels: np.ndarray, class_names: list[str],
          image_size: int, seed: int) -> _Plan:
    rel = tuple(Path(p).relative_to(root).as_posix() for p in paths)
    h = hashlib.md5()
    h.update(json.dumps([str(root), list(class_names), image_size, seed, FRACTIONS, _FORMAT]).encode())
    for r, p, lab in zip(rel, paths, labels):
        st = os.stat(p)
        h.update(f"\n{r}\0{int(lab)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return _Plan(root, rel, tuple(int(x) for x in labels), tuple(class_names), image_size, seed,
                 key=f"px{image_size}_seed{seed}_{h.hexdigest()[:16]}")


_FORMAT = 3  # bump when the builder's output changes, so old caches are not reused


@functools.cache
def _builder_class():
    """Defined on first use: importing tensorflow_datasets costs time the CLI need not pay."""
    import tensorflow_datasets as tfds

    class JaxcellImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Decoded, resized images of a class-folder tree, split by content hash."""

        VERSION = tfds.core.Version("1.0.0")
        MANUAL_DOWNLOAD_INSTRUCTIONS = (
            "Download the images yourself (e.g. Kaggle 'leukemia' or 'Blood cell Cancer [ALL]') "
            "and pass the folder that holds the class folders; it is this builder's manual dir."
        )
        # TFDS looks for a checksums file beside the builder's module through importlib_resources,
        # which it does not install on Python >= 3.9; this builder downloads nothing.
        code_path = None

        def __init__(self, *, plan: _Plan, data_dir: str):
            self._plan = plan  # _info() reads it during the base __init__
            super().__init__(
                data_dir=data_dir,
                config=tfds.core.BuilderConfig(name=plan.key, description=str(plan.root)),
                file_format="array_record",
            )

        def _info(self):
            s = self._plan.image_size
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Images of {self._plan.root} at {s}x{s} px, split by content hash.",
                features=tfds.features.FeaturesDict({
                    # Raw bytes: the default encoding writes every pixel as an int64 varint,
                    # ~10x slower to write and read.
                    "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding="bytes"),
                    "label": tfds.features.ClassLabel(names=list(self._plan.class_names)),
                    "file": tfds.features.Text(),
                    "md5": tfds.features.Text(),
                }),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            plan = self._plan
            manual = Path(dl_manager.manual_dir)  # the user's folder, by the manual-download convention
            paths = [str(manual / f) for f in plan.files]
            hashes = content_hashes(paths)
            split = split_by_content(hashes, plan.labels, FRACTIONS, seed=plan.seed, files=paths,
                                     near=file_difference_hashes(paths))
            items = [(paths[i], plan.files[i], plan.labels[i], hashes[i]) for i in range(len(paths))]
            # TFDS refuses empty splits; a tiny class tree may leave val or test empty.
            return {
                name: self._generate_examples([items[i] for i in idx])
                for name, idx in split.items() if len(idx)
            }

        def _generate_examples(self, items):
            size = self._plan.image_size
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                for start in range(0, len(items), 64):  # decode in chunks, a few threads each
                    chunk = items[start : start + 64]
                    images = pool.map(lambda it: load_image(it[0], size), chunk)
                    for (_, rel, label, md5), image in zip(chunk, images):
                        yield rel, {"image": image, "label": label, "file": rel, "md5": md5}

    return JaxcellImageFolder


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock (flock) on `path`; no locking where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_tfds():
    """Hide TFDS's progress bars, its stdout banners and its absl INFO/WARNING chatter."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl.setLevel(level)


def build(root: str | os.PathLike, image_size: int, seed: int = 0,
          cache_dir: str | os.PathLike | None = None,
          scanned: tuple[list[str], np.ndarray, list[str]] | None = None):
    """Build (or find in the cache) the TFDS data set of a class-folder tree; returns the builder."""
    base = resolve_root(root)
    paths, labels, class_names = scanned if scanned is not None else scan(base)
    plan = _plan(base, paths, labels, class_names, image_size, seed)
    data_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    # Processes of one job (or two jobs) may build the same entry at once; TFDS's final rename
    # would fail for the second, so builds of one entry take turns and the later one reuses it.
    with _file_lock(data_dir / "locks" / f"{plan.key}.lock"), _quiet_tfds():
        import tensorflow_datasets as tfds

        builder = _builder_class()(plan=plan, data_dir=os.fspath(data_dir))
        if not builder.is_prepared():
            log.info("decoding %d images of %s into the TFDS cache %s", len(paths), base, builder.data_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(base))
        )
    return builder


def read_splits(builder) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """{split: (images uint8 NHWC, labels int32, files relative to the root)} in file order.

    array_record shuffles records on write; sorting by file restores one deterministic order.
    """
    s = builder.info.features["image"].shape
    with _quiet_tfds():
        sources = builder.as_data_source()
        out = {}
        for name in SPLITS:
            if name not in sources:  # an empty split was not written
                out[name] = (np.zeros((0, *s), np.uint8), np.zeros((0,), np.int32), [])
                continue
            src = sources[name]
            records = src.__getitems__(list(range(len(src))))
            files = [r["file"].decode() if isinstance(r["file"], bytes) else str(r["file"]) for r in records]
            order = sorted(range(len(records)), key=files.__getitem__)
            images = np.stack([records[i]["image"] for i in order]).astype(np.uint8, copy=False)
            labels = np.array([records[i]["label"] for i in order], np.int32)
            out[name] = (images, labels, [files[i] for i in order])
    return out
