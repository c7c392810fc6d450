"""`jaxcell audit`: the colour-histogram baseline, duplicates, balance and the text/JSON output."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from jaxcell import audit
from jaxcell.data import splits
from jaxcell.cli import main

# ---------------------------------------------------------------------------------------------
# The parts.


def test_histogram_bins():
    image = np.zeros((2, 2, 3), np.uint8)
    image[0, 0] = (255, 0, 0)
    image[0, 1] = (31, 32, 255)  # (0, 1, 7) in 8-level cells
    h = audit.rgb_histogram(image)
    assert h.shape == (512,) and h.sum() == pytest.approx(1)
    assert h[0] == 0.5 and h[7 * 64] == 0.25 and h[0 * 64 + 1 * 8 + 7] == 0.25


def test_hamming_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    hashes = [int(v) for v in rng.integers(0, 2 ** 63, 40, dtype=np.uint64)]
    hashes[5] = hashes[3] ^ 0b101          # distance 2
    hashes[9] = hashes[3]                  # distance 0
    brute = [(i, j, bin(hashes[i] ^ hashes[j]).count("1")) for i in range(40) for j in range(i + 1, 40)]
    assert splits.hamming_pairs(hashes, 3) == [p for p in brute if p[2] <= 3]
    assert (3, 5, 2) in splits.hamming_pairs(hashes, 3)


def test_difference_hash_ignores_re_encoding_and_tells_images_apart(tmp_path):
    rng = np.random.default_rng(0)
    a = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).resize((128, 128))
    b = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).resize((128, 128))
    a.save(tmp_path / "a.jpg", quality=60)
    with Image.open(tmp_path / "a.jpg") as again:
        near = bin(splits.difference_hash(a) ^ splits.difference_hash(again)).count("1")
    far = bin(splits.difference_hash(a) ^ splits.difference_hash(b)).count("1")
    assert near <= 4 < 16 < far


def test_folds_keep_groups_whole_and_classes_even():
    labels = np.repeat([0, 1, 2], [30, 20, 25])
    groups = np.arange(75)
    groups[[1, 2, 3]] = 0                   # a group of four in class 0
    groups[[40, 41]] = 40
    fold = audit.stratified_group_folds(labels, groups, 5, seed=1)
    assert fold.min() == 0 and fold.max() == 4
    for g in (0, 40):
        assert len(set(fold[groups == g])) == 1
    for c in range(3):
        counts = np.bincount(fold[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 4  # at most the largest group apart
    assert np.array_equal(fold, audit.stratified_group_folds(labels, groups, 5, seed=1))


def test_logistic_regression_learns_a_linear_rule():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + 2 * (x[:, 2] > 1)
    model = audit.fit_logistic(x[:200], y[:200], 4)
    assert (audit.predict_logistic(model, x[200:]) == y[200:]).mean() > 0.9


# ---------------------------------------------------------------------------------------------
# A whole folder whose classes differ only in colour.

TINTS = {"Benign": (200, 120, 160), "Pre": (150, 120, 210), "Pro": (190, 170, 120)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit") / "data"
    rng = np.random.default_rng(0)
    for name, tint in TINTS.items():
        (root / name).mkdir(parents=True)
        for i in range(12):
            texture = rng.random((32, 32, 1)) * 60 - 30
            image = np.clip(np.asarray(tint) + texture + rng.normal(0, 8, 3), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / name / f"{i:02d}.png")
    shutil.copy(root / "Pro" / "00.png", root / "Pro" / "copy.png")                   # byte-identical
    with Image.open(root / "Pre" / "03.png") as im:
        im.save(root / "Pre" / "03-again.jpg", quality=90)                            # near duplicate
    Image.fromarray(np.full((40, 30), 128, np.uint8)).save(root / "Benign" / "grey.png")  # mode L, 30x40
    return root


def test_audit_of_a_folder(folder, tmp_path, capsys):
    out = tmp_path / "audit.json"
    assert main(["audit", "--data", str(folder), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    r = json.load(open(out))
    assert r["num_images"] == 3 * 12 + 3
    assert r["classes"] == {"Benign": 13, "Pre": 13, "Pro": 13}
    assert r["sizes"] == {"32x32": 38, "30x40": 1} and r["modes"] == {"RGB": 38, "L": 1}
    assert r["formats"] == {"PNG": 38, "JPEG": 1}
    b = r["colour_baseline"]
    assert b["folds"] == 5 and len(b["clean_fold_accuracies"]) == 5
    assert b["clean_accuracy"] >= 0.9  # the tint gives every class away
    d = r["duplicates"]
    assert [sorted(g["files"]) for g in d["exact_groups"]] == [["Pro/00.png", "Pro/copy.png"]]
    assert len(set(d["exact_groups"][0]["splits"])) == 1  # the content split keeps copies together
    pair = [p for p in d["near_pairs"] if sorted(p["files"]) == ["Pre/03-again.jpg", "Pre/03.png"]]
    assert len(pair) == 1 and len(set(pair[0]["splits"])) == 1  # the training split groups them too
    assert d["label_conflicts"] == 0 and d["straddling_splits"] == 0
    assert "colour-only baseline" in text and "byte-identical duplicates (md5): 1 groups" in text


def test_audit_names_a_missing_folder(tmp_path, capsys):
    assert main(["audit", "--data", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_the_colour_shortcut_of_the_real_data(dev_data):
    """On a small subset of the real data (60 images per class: seconds, not minutes), colour
    alone nearly solves it and a 3% stain shift takes most of that away."""
    r = audit.audit(dev_data, per_class=60)
    b = r["colour_baseline"]
    assert b["clean_accuracy"] > 0.9
    assert b["shifted_accuracy"] < b["clean_accuracy"] - 0.3
    assert r["duplicates"]["exact_extra_copies"] > 0  # the Pro duplicates the design notes mention
