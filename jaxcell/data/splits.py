"""Train/val/test splits keyed on file content.

Files are grouped by the md5 of their bytes, so byte-identical copies (the ALL dataset has 40
such pairs) always land in the same split. Within each class the groups are ranked by
md5(seed, hash), which depends on the content only: reordering, renaming or moving files does
not move any file to another split, and the split is the same on every machine.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from jaxcell.errors import UserError

SPLITS = ("train", "val", "test")
FRACTIONS = (0.7, 0.15, 0.15)


def content_hashes(paths: Sequence[str | os.PathLike]) -> list[str]:
    """md5 hex digest of each file's bytes."""
    out = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                out.append(hashlib.file_digest(f, "md5").hexdigest())
        except OSError as e:
            raise UserError(f"cannot read {p}: {e.strerror or e}") from None
    return out


def split_by_content(
    hashes: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    fractions: tuple[float, float, float] = FRACTIONS,
    seed: int = 0,
    files: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Stratified, content-keyed split: {"train"|"val"|"test": sorted int64 index array}.

    Each class's distinct contents are ranked by md5(f"{seed}:{hash}") and cut into consecutive
    runs whose sizes are the fractions of that class's count (largest-remainder rounding, ties to
    the earlier split). `files`, if given, names the files in errors: the same bytes under two
    labels is a UserError.
    """
    labels = np.asarray(labels)
    if len(hashes) != len(labels):
        raise ValueError(f"{len(hashes)} hashes but {len(labels)} labels")
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise UserError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")

    # One label per content; the group's members travel together.
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        groups.setdefault(h, []).append(i)
    group_label = {}
    for h, members in groups.items():
        first = members[0]
        for j in members[1:]:
            if labels[j] != labels[first]:
                name = (lambda k: files[k] if files is not None else f"item {k}")
                raise UserError(
                    f"identical files carry different labels: {name(first)} (label {labels[first]}) "
                    f"and {name(j)} (label {labels[j]}); remove one of them"
                )
        group_label[h] = labels[first]

    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        class_groups = [h for h, lab in group_label.items() if lab == c]
        class_groups.sort(key=lambda h: hashlib.md5(f"{seed}:{h}".encode()).hexdigest())
        start = 0
        for split, count in zip(SPLITS, _apportion(len(class_groups), fractions)):
            for h in class_groups[start : start + count]:
                out[split].extend(groups[h])
            start += count
    return {s: np.array(sorted(v), dtype=np.int64) for s, v in out.items()}


def _apportion(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Split n into integer counts proportional to fractions (largest remainder method)."""
    exact = [n * f for f in fractions]
    counts = [int(np.floor(e)) for e in exact]
    remainders = sorted(range(len(exact)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in remainders[: n - sum(counts)]:
        counts[k] += 1
    return counts
