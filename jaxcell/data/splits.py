"""Train/val/test splits keyed on file content.

Files are grouped by the md5 of their bytes, so byte-identical copies (the ALL dataset has 40
such pairs) always land in the same split, and, when their perceptual hashes are given, by
near-duplicate links too: the ALL data holds re-framed shots of one field of view (difference
hashes a few bits apart) that would otherwise straddle train and test. Within each class the
groups are ranked by md5(seed, hash), which depends on the content only: reordering, renaming or
moving files does not move any file to another split, and the split is the same on every machine.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from jaxcell.errors import UserError

SPLITS = ("train", "val", "test")
FRACTIONS = (0.7, 0.15, 0.15)
HASH_SIZE = 8                # difference hash: 8 x 8 = 64 bits
NEAR_DUPLICATE_DISTANCE = 4  # difference hashes at most this many bits apart are one picture


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


def difference_hash(image, size: int = HASH_SIZE) -> int:
    """Krawetz's dHash of a PIL image: grey, shrink to (size+1) x size, one bit per horizontal
    neighbour pair (left brighter than right). Robust to re-encoding, small resizes and
    brightness changes."""
    from PIL import Image

    grey = np.asarray(image.convert("L").resize((size + 1, size), Image.BOX), np.int16)
    bits = (grey[:, :-1] > grey[:, 1:]).ravel()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def file_difference_hashes(paths: Sequence[str | os.PathLike]) -> list[int]:
    """difference_hash of each image file."""
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(difference_hash(im.convert("RGB")))
        except Exception as e:  # noqa: BLE001  (PIL raises many types; the file is named)
            raise UserError(f"cannot decode {p}: {e}") from None
    return out


def hamming_pairs(hashes: Sequence[int], threshold: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for every pair i < j with at most `threshold` differing bits."""
    h = np.asarray(hashes, np.uint64)
    out = []
    for i in range(len(h) - 1):
        d = np.unpackbits((h[i] ^ h[i + 1:]).view(np.uint8).reshape(-1, 8), axis=1).sum(1)  # popcount
        for k in np.flatnonzero(d <= threshold):
            out.append((i, i + 1 + int(k), int(d[k])))
    return out


class Union:
    """Disjoint sets over 0..n-1 (path halving)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


def split_by_content(
    hashes: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    fractions: tuple[float, float, float] = FRACTIONS,
    seed: int = 0,
    files: Sequence[str] | None = None,
    near: Sequence[int] | None = None,
    near_distance: int = NEAR_DUPLICATE_DISTANCE,
) -> dict[str, np.ndarray]:
    """Stratified, content-keyed split: {"train"|"val"|"test": sorted int64 index array}.

    Items with the same hash, and items whose `near` hashes (difference hashes, one per item)
    are at most `near_distance` bits apart, form one group that travels together. Each class's
    groups are ranked by md5(f"{seed}:{key}"), key the group's smallest hash, and cut into
    consecutive runs whose sizes are the fractions of that class's group count (largest-remainder
    rounding, ties to the earlier split); a group whose near-duplicates carry several labels
    counts under the label of its key. `files`, if given, names the files in errors: the same
    bytes under two labels is a UserError.
    """
    labels = np.asarray(labels)
    if len(hashes) != len(labels):
        raise ValueError(f"{len(hashes)} hashes but {len(labels)} labels")
    if near is not None and len(near) != len(labels):
        raise ValueError(f"{len(near)} difference hashes but {len(labels)} labels")
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise UserError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")

    union = Union(len(labels))
    first_of: dict[str, int] = {}
    for i, h in enumerate(hashes):
        j = first_of.setdefault(h, i)
        if labels[i] != labels[j]:
            name = (lambda k: files[k] if files is not None else f"item {k}")
            raise UserError(
                f"identical files carry different labels: {name(j)} (label {labels[j]}) "
                f"and {name(i)} (label {labels[i]}); remove one of them"
            )
        union.join(i, j)
    if near is not None:
        for i, j, _ in hamming_pairs(near, near_distance):
            union.join(i, j)

    groups: dict[int, list[int]] = {}
    for i in range(len(labels)):
        groups.setdefault(union.find(i), []).append(i)
    keyed = {}  # key (smallest hash of the group) -> (label, members)
    for members in groups.values():
        head = min(members, key=lambda k: hashes[k])
        keyed[hashes[head]] = (labels[head], members)

    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        class_groups = [k for k, (lab, _) in keyed.items() if lab == c]
        class_groups.sort(key=lambda k: hashlib.md5(f"{seed}:{k}".encode()).hexdigest())
        start = 0
        for split, count in zip(SPLITS, _apportion(len(class_groups), fractions)):
            for k in class_groups[start : start + count]:
                out[split].extend(keyed[k][1])
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
