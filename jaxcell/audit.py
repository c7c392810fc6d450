"""`jaxcell audit`: what a data set lets a model get away with, before any model is trained.

* The colour shortcut: a multinomial logistic regression on each image's global 512-bin RGB
  histogram (8 x 8 x 8), under stratified 5-fold cross-validation, scored on the held-out
  images as they are and on HED stain-shifted copies of them (strength 0.03). High clean
  accuracy says colour alone separates the classes; a collapse under a shift a human barely
  notices says that this colour signal belongs to the lab, not to the cells.
* Duplicates: byte-identical files (md5) and near-duplicates (64-bit difference hash, Hamming
  distance <= D), with their classes and the split each falls in under the project's content
  split, so a pair that straddles train and test is visible.
* Class balance, image sizes, colour modes, file formats, unreadable files.

The cross-validation folds keep every duplicate group (exact or near) in one fold, so the
baseline is not flattered by copies. Everything is numpy, PIL and scipy's L-BFGS (scipy comes
with jax); no scikit-learn.
"""

from __future__ import annotations

import collections
import hashlib
import os

import numpy as np

from jaxcell.data.splits import HASH_SIZE, NEAR_DUPLICATE_DISTANCE, Union, difference_hash, hamming_pairs
from jaxcell.errors import UserError

HIST_BINS = 8                    # per channel: 8 x 8 x 8 = 512 bins
L2 = 1e-3                        # ridge on the standardized histogram features
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


# ---------------------------------------------------------------------------------------------
# Features and hashes.

def rgb_histogram(image: np.ndarray, bins: int = HIST_BINS) -> np.ndarray:
    """uint8 HxWx3 -> the share of pixels in each of bins^3 colour cells (sums to 1)."""
    q = (np.asarray(image, np.uint16) * bins) >> 8           # 0 .. bins-1 per channel
    index = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
    h = np.bincount(index.ravel(), minlength=bins ** 3).astype(np.float64)
    return h / max(h.sum(), 1)


# ---------------------------------------------------------------------------------------------
# The baseline: multinomial logistic regression, L-BFGS on the mean cross-entropy + L2.

def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float = L2) -> dict:
    from scipy.optimize import minimize

    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 1e-12, std, 1.0)               # a bin empty in every image stays 0
    z = np.c_[(x - mean) / std, np.ones(len(x))]         # last column: the bias (not penalized)
    onehot = np.eye(num_classes)[y]
    n, d = z.shape
    penalty = np.ones((d, 1))
    penalty[-1] = 0

    def loss(w_flat):
        w = w_flat.reshape(d, num_classes)
        logits = z @ w
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        total = p.sum(1, keepdims=True)
        p /= total
        ce = -(logits * onehot).sum() / n + np.log(total).sum() / n
        grad = z.T @ (p - onehot) / n + l2 * penalty * w
        return ce + 0.5 * l2 * float((penalty * w * w).sum()), grad.ravel()

    res = minimize(loss, np.zeros(d * num_classes), jac=True, method="L-BFGS-B",
                   options={"maxiter": 2000, "gtol": 1e-7})
    return {"mean": mean, "std": std, "w": res.x.reshape(d, num_classes)}


def predict_logistic(model: dict, x: np.ndarray) -> np.ndarray:
    z = np.c_[(x - model["mean"]) / model["std"], np.ones(len(x))]
    return (z @ model["w"]).argmax(1)


def stratified_group_folds(labels: np.ndarray, groups: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """A fold number per example: each group whole in one fold, each class spread evenly.

    Per class, groups in random order (seeded), largest first, each to the fold that holds the
    fewest examples of that class so far.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    rng = np.random.default_rng(seed)
    fold = np.full(len(labels), -1)
    for c in np.unique(labels):
        members = {}
        for i in np.flatnonzero(labels == c):
            members.setdefault(groups[i], []).append(i)
        keys = list(members)
        rng.shuffle(keys)
        keys.sort(key=lambda g: -len(members[g]))            # stable: ties keep the random order
        filled = np.zeros(folds)
        for g in keys:
            idx = [i for i in members[g] if fold[i] < 0]   # a group spanning classes is placed once
            if not idx:
                continue
            f = int(np.argmin(filled))
            fold[groups == g] = f
            filled[f] += len(idx)
    return fold


def cross_validate(features: np.ndarray, shifted: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                   num_classes: int, folds: int, seed: int = 0) -> dict:
    fold = stratified_group_folds(labels, groups, folds, seed)
    clean, moved = [], []
    for f in range(folds):
        test = fold == f
        if not test.any() or test.all():
            continue
        model = fit_logistic(features[~test], labels[~test], num_classes)
        clean.append(float((predict_logistic(model, features[test]) == labels[test]).mean()))
        moved.append(float((predict_logistic(model, shifted[test]) == labels[test]).mean()))
    if not clean:
        raise UserError(f"too few images for {folds}-fold cross-validation")
    return {"clean_accuracy": float(np.mean(clean)), "clean_fold_accuracies": clean,
            "shifted_accuracy": float(np.mean(moved)), "shifted_fold_accuracies": moved}


# ---------------------------------------------------------------------------------------------
# Reading the folder.

def list_images(root: str) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, class names) of a class-folder tree, found as training finds them."""
    from jaxcell.data import folders

    if not os.path.isdir(root):
        raise UserError(f"--data {root}: no such folder")
    files, labels, names = folders.scan(root)
    return list(files), np.asarray(labels), list(names)


def audit(root: str, folds: int = 5, shift: float = 0.03, hash_distance: int = NEAR_DUPLICATE_DISTANCE,
          per_class: int | None = None, seed: int = 0, log=lambda message: None) -> dict:
    from PIL import Image

    from jaxcell.evaluate import stain_shift

    files, labels, names = list_images(root)
    labels = np.asarray(labels)
    if per_class:
        keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(names))])
        keep.sort()
        files, labels = [files[i] for i in keep], labels[keep]
    log(f"reading {len(files)} images of {len(names)} classes in {root}")
    digests, hashes, hists, sizes, modes, formats, unreadable, pixels = [], [], [], [], [], [], [], []
    ok = []
    for i, path in enumerate(files):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            with Image.open(path) as im:
                im.load()
                modes.append(im.mode)
                formats.append(im.format or "?")
                sizes.append(f"{im.width}x{im.height}")
                rgb = im.convert("RGB")
        except Exception as error:  # noqa: BLE001  (PIL raises many types; the file is named, not dropped silently)
            unreadable.append({"file": path, "error": f"{type(error).__name__}: {error}"})
            continue
        ok.append(i)
        digests.append(hashlib.md5(raw).hexdigest())
        hashes.append(difference_hash(rgb))
        pixels.append(np.asarray(rgb))
        hists.append(rgb_histogram(pixels[-1]))
    files, labels = [files[i] for i in ok], labels[ok]
    n = len(files)
    if n == 0:
        raise UserError(f"--data {root}: no readable image")

    # Duplicates: exact by md5, near by dHash; both join the same groups for the CV folds.
    union = Union(n)
    exact = collections.defaultdict(list)
    for i, d in enumerate(digests):
        exact[d].append(i)
    for members in exact.values():
        for j in members[1:]:
            union.join(members[0], j)
    near = [(i, j, d) for i, j, d in hamming_pairs(hashes, hash_distance) if digests[i] != digests[j]]
    for i, j, _ in near:
        union.join(i, j)
    groups = np.array([union.find(i) for i in range(n)])
    split_of = _content_splits(files, digests, hashes, labels, seed)

    def describe(idx):
        return {"files": [os.path.relpath(files[i], root) for i in idx],
                "classes": [names[labels[i]] for i in idx],
                "splits": [split_of[i] for i in idx] if split_of else None}

    exact_groups = [{"md5": d, **describe(m)} for d, m in exact.items() if len(m) > 1]
    near_pairs = [{"distance": dist, **describe((i, j))} for i, j, dist in near]

    log(f"colour baseline: {folds}-fold cross-validation, clean and stain-shifted (HED {shift})")
    features = np.stack(hists)
    shifted = np.empty_like(features)
    by_shape = collections.defaultdict(list)
    for i, p in enumerate(pixels):
        by_shape[p.shape].append(i)
    for idx in by_shape.values():  # same-size images go through the jitter together
        moved = stain_shift(np.stack([pixels[i] for i in idx]), shift, seed, indices=np.asarray(idx))
        for k, i in enumerate(idx):
            shifted[i] = rgb_histogram(moved[k])
    baseline = cross_validate(features, shifted, labels, groups, len(names), folds, seed)

    counts = np.bincount(labels, minlength=len(names))
    result = {
        "data": os.path.abspath(root),
        "num_images": n,
        "classes": {name: int(c) for name, c in zip(names, counts)},
        "imbalance_ratio": float(counts.max() / max(counts.min(), 1)),
        "sizes": dict(collections.Counter(sizes).most_common()),
        "modes": dict(collections.Counter(modes).most_common()),
        "formats": dict(collections.Counter(formats).most_common()),
        "unreadable": unreadable,
        "colour_baseline": {
            "features": f"{HIST_BINS ** 3}-bin RGB histogram ({HIST_BINS} bins per channel), share of pixels",
            "model": f"multinomial logistic regression, standardized features, L2 {L2}, L-BFGS",
            "folds": folds, "grouped_by": "duplicate groups (exact and near) kept within one fold",
            "shift": {"kind": "HED stain jitter", "strength": shift, "seed": seed},
            "majority_class_share": float(counts.max() / n),
            **baseline},
        "duplicates": {
            "exact_groups": exact_groups,
            "exact_extra_copies": int(sum(len(g["files"]) - 1 for g in exact_groups)),
            "near_hash": f"{HASH_SIZE * HASH_SIZE}-bit difference hash", "near_max_distance": hash_distance,
            "near_pairs": near_pairs,
            "label_conflicts": int(sum(len(set(g["classes"])) > 1 for g in exact_groups + near_pairs)),
            "straddling_splits": int(sum(g["splits"] is not None and len(set(g["splits"])) > 1
                                         for g in exact_groups + near_pairs)),
        },
        "split_note": "splits are per image: the data set has no patient ids",
    }
    if per_class:
        result["subset"] = f"the first {per_class} images of each class"
    return result


def _content_splits(files, digests, dhashes, labels, seed) -> list[str] | None:
    """The split (train/val/test) each file falls in under the project's content split
    (default fractions, near duplicates grouped at the split's own distance, this seed: what
    `jaxcell train --seed` does with this folder).
    None when the split refuses the data (the same bytes under two labels)."""
    from jaxcell.data import FRACTIONS
    from jaxcell.data.splits import split_by_content

    try:
        splits = split_by_content(digests, labels, FRACTIONS, seed=seed, files=files, near=dhashes)
    except UserError:
        return None
    out = [""] * len(files)
    for name, idx in splits.items():
        for i in idx:
            out[i] = name
    return out


# ---------------------------------------------------------------------------------------------

def format_audit(r: dict) -> str:
    b, d = r["colour_baseline"], r["duplicates"]
    lines = [f"{r['num_images']} images in {r['data']}" + (f" ({r['subset']})" if r.get("subset") else ""), ""]
    width = max(len(k) for k in r["classes"])
    lines.append("class balance (largest / smallest: {:.2f})".format(r["imbalance_ratio"]))
    for name, count in r["classes"].items():
        lines.append(f"  {name:<{width}}  {count:6d}  {count / r['num_images']:6.1%}")
    lines.append("sizes: " + ", ".join(f"{k} ({v})" for k, v in r["sizes"].items()))
    lines.append("modes: " + ", ".join(f"{k} ({v})" for k, v in r["modes"].items())
                 + "   formats: " + ", ".join(f"{k} ({v})" for k, v in r["formats"].items()))
    if r["unreadable"]:
        lines.append(f"UNREADABLE: {len(r['unreadable'])} files, e.g. {r['unreadable'][0]['file']}")
    lines += ["", f"colour-only baseline ({b['features']}; {b['model']})",
              f"  {b['folds']}-fold cross-validated accuracy, clean images:          {b['clean_accuracy']:.4f}",
              f"  the same models on stain-shifted copies (HED {b['shift']['strength']}):   "
              f"{b['shifted_accuracy']:.4f}",
              f"  majority-class share (chance level):                   {b['majority_class_share']:.4f}"]
    if b["clean_accuracy"] > 0.9 and b["shifted_accuracy"] < b["clean_accuracy"] - 0.2:
        lines.append("  -> colour alone separates these classes, and that signal does not survive a small stain "
                     "shift: a model can score well here without learning morphology. Train with stain "
                     "augmentation and judge models on stain-shifted copies too.")
    lines += ["", f"byte-identical duplicates (md5): {len(d['exact_groups'])} groups, "
              f"{d['exact_extra_copies']} extra copies",
              f"near duplicates ({d['near_hash']}, distance <= {d['near_max_distance']}, not byte-identical): "
              f"{len(d['near_pairs'])} pairs",
              f"groups with different labels: {d['label_conflicts']}; straddling splits: {d['straddling_splits']}"]
    for g in d["exact_groups"][:5] + d["near_pairs"][:5]:
        where = f" splits {'/'.join(g['splits'])}" if g["splits"] else ""
        dist = f" (distance {g['distance']})" if "distance" in g else ""
        lines.append(f"  {' = '.join(g['files'])}  [{'/'.join(g['classes'])}]{where}{dist}")
    shown = min(5, len(d["exact_groups"])) + min(5, len(d["near_pairs"]))
    if len(d["exact_groups"]) + len(d["near_pairs"]) > shown:
        lines.append("  ... (all of them in --json)")
    lines += ["", r["split_note"]]
    return "\n".join(lines)
