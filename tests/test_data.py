"""jaxcell.data: decoding, synthetic smears, content-hash splits, folder scanning, the TFDS cache."""

import csv
import hashlib
import os
import shutil
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from jaxcell import CLASS_NAMES, data
from jaxcell.data import folders, synthetic
from jaxcell.data.images import load_image, load_images
from jaxcell.data.splits import content_hashes, file_difference_hashes, split_by_content
from jaxcell.errors import UserError


def _png(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, **kw).save(path)
    return path


def _rgb(seed=0, size=12):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _tree(root, classes, n=2, ext=".png"):
    for c in classes:
        for i in range(n):
            # a seed per class and index, the same in every process (hash() of a str is salted per
            # process, and modulo 1000 it gave two classes one image about once in 30 runs: a
            # duplicate across classes, which the loader rightly refuses)
            seed = int.from_bytes(hashlib.sha256(f"{c}/{i}".encode()).digest()[:8], "little")
            _png(root / c / f"{i}{ext}", _rgb(seed))
    return root


# ------------------------------------------------------------------------------------------ images


def test_modes_are_converted_to_rgb(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    out = load_image(_png(tmp_path / "l.png", grey), 8)
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    assert (out == grey[..., None]).all()

    # Alpha is composited over white: transparent -> 255, half-transparent black -> ~128.
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, :, 3] = 0
    rgba[4:, :, 3] = 128
    out = load_image(_png(tmp_path / "rgba.png", rgba), 8)
    assert (out[:4] == 255).all() and np.abs(out[4:].astype(int) - 127).max() <= 1
    la = Image.fromarray(np.stack([grey, np.full_like(grey, 0)], -1))
    assert la.mode == "LA"
    la.save(tmp_path / "la.png")
    assert (load_image(tmp_path / "la.png", 8) == 255).all()

    # Palette, palette with a transparent index, bilevel, CMYK.
    p = Image.fromarray(_rgb(1, 8)).convert("P")
    p.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png", 8).shape == (8, 8, 3)
    p.info["transparency"] = int(np.asarray(p)[0, 0])
    p.save(tmp_path / "pt.png", transparency=p.info["transparency"])
    assert (load_image(tmp_path / "pt.png", 8)[0, 0] == 255).all()
    Image.fromarray(grey > 90).save(tmp_path / "bw.png")
    assert set(np.unique(load_image(tmp_path / "bw.png", 8))) == {0, 255}
    Image.fromarray(_rgb(2, 8)).convert("CMYK").save(tmp_path / "cmyk.tif")
    assert load_image(tmp_path / "cmyk.tif", 8).shape == (8, 8, 3)


def test_high_bit_depth_is_scaled_by_its_range(tmp_path):
    # A 12-bit camera image in a 16-bit PNG: full scale is 4095, not 65535.
    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 65).astype(np.uint16)  # max 4095
    Image.fromarray(a).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode in ("I;16", "I")
    out = load_image(tmp_path / "i16.png", 8)[..., 0].astype(int)
    assert out.max() == 255 and np.abs(out - np.rint(a / 4095 * 255)).max() <= 1

    full = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(full).save(tmp_path / "i16full.tif")
    out = load_image(tmp_path / "i16full.tif", 8)[..., 0].astype(int)
    assert np.abs(out - np.rint(full / 65535 * 255)).max() <= 1

    big_endian = Image.frombytes("I;16B", (8, 8), full.astype(">u2").tobytes())
    big_endian.save(tmp_path / "i16b.tif")
    assert np.abs(load_image(tmp_path / "i16b.tif", 8)[..., 0].astype(int) - out).max() <= 1

    f = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(f).save(tmp_path / "f.tif")
    assert np.abs(load_image(tmp_path / "f.tif", 8)[..., 0].astype(int) - np.rint(f * 255)).max() <= 1

    signed = np.linspace(-1000, 3000, 64).astype(np.int32).reshape(8, 8)
    Image.fromarray(signed).save(tmp_path / "i32.tif")
    out = load_image(tmp_path / "i32.tif", 8)[..., 0]
    assert out.min() == 0 and out.max() == 255  # negative values: stretched min..max


def test_other_sizes_are_resized_and_formats_read(tmp_path):
    img = _rgb(3, 40)[:, :30]  # 40 x 30, not square
    for ext in (".png", ".bmp", ".tiff", ".JPG"):
        out = load_image(_png(tmp_path / f"x{ext}", img), 16)
        assert out.shape == (16, 16, 3)
    same = load_image(_png(tmp_path / "same.png", _rgb(4, 16)), 16)
    assert (same == _rgb(4, 16)).all()  # no resampling at the stored size
    batch = load_images([tmp_path / "x.png", tmp_path / "same.png"], 16)
    assert batch.shape == (2, 16, 16, 3) and (batch[1] == same).all()
    assert load_images([], 16).shape == (0, 16, 16, 3)


def test_bad_image_files_name_the_file(tmp_path):
    jpeg = tmp_path / "ok.jpg"
    Image.fromarray(_rgb(5, 64)).save(jpeg, quality=95)
    raw = jpeg.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.jpg").write_text("not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    for name in ("truncated.jpg", "text.jpg", "empty.png", "folder.png", "missing.png"):
        with pytest.raises(UserError, match=name.replace(".", r"\.")):
            load_image(tmp_path / name, 16)
    with pytest.raises(UserError, match="truncated"):
        load_images([jpeg, tmp_path / "truncated.jpg"], 16)


# --------------------------------------------------------------------------------------- synthetic


def test_smears_shape_balance_and_determinism():
    x, y = data.make_smears(40, 32, seed=5)
    assert x.shape == (40, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int32
    assert np.bincount(y).tolist() == [10, 10, 10, 10]
    assert y[:8].tolist() != sorted(y[:8].tolist()) or y[8:16].tolist() != sorted(y[8:16].tolist())
    x2, y2 = data.make_smears(40, 32, seed=5)
    assert (x == x2).all() and (y == y2).all()
    x3, _ = data.make_smears(40, 32, seed=6)
    assert not (x == x3).all()
    assert len({im.tobytes() for im in x}) == 40
    big, _ = data.make_smears(2, 224, seed=0)
    assert big.shape == (2, 224, 224, 3) and big.std() > 10


def _histograms(x, bins=64):
    n = len(x)
    q = x.reshape(n, -1, 3).astype(np.int64) * bins // 256
    h = np.stack([np.stack([np.bincount(q[i, :, c], minlength=bins) for c in range(3)]) for i in range(n)])
    return h.reshape(n, -1) / q.shape[1]


def _cv_accuracy(features, labels, fit_predict, folds=5):
    idx = np.arange(len(labels))
    accs = []
    for k in range(folds):
        test = idx % folds == k
        pred = fit_predict(features[~test], labels[~test], features[test])
        accs.append(np.mean(pred == labels[test]))
    return float(np.mean(accs))


def _nearest_centroid(xtr, ytr, xte):
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(4)])
    return ((xte[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)


def _logistic(xtr, ytr, xte, steps=300, lr=0.5, l2=1e-3):
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w, b = np.zeros((xtr.shape[1], 4)), np.zeros(4)
    onehot = np.eye(4)[ytr]
    for _ in range(steps):
        z = xtr @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(ytr)
        w -= lr * (xtr.T @ g + l2 * w)
        b -= lr * g.sum(0)
    return (xte @ w + b).argmax(1)


def test_smear_colours_do_not_give_the_class_away():
    x, y = data.make_smears(400, 64, seed=11)
    h = _histograms(x)
    # The same classifiers do learn what histograms carry: they tell stains apart (sanity check).
    stain = (x.reshape(400, -1, 3).mean(1)[:, 2] > np.median(x.reshape(400, -1, 3).mean(1)[:, 2])).astype(int)
    assert _cv_accuracy(h, stain, _logistic) > 0.9
    assert _cv_accuracy(h, y, _nearest_centroid) < 0.45
    assert _cv_accuracy(h, y, _logistic) < 0.45


def _one_cell(label, i, size=96):
    """Draw one leukocyte of a class at the centre of a blank canvas; return its maps."""
    rng = np.random.default_rng([99, i])
    spec = synthetic._CLASSES[CLASS_NAMES[label]]
    maps = [np.zeros((size, size), np.float32) for _ in range(4)]  # nucleus/cytoplasm density, masks
    rn = 0.11 * size
    synthetic._draw_leukocyte(rng, spec, (size / 2, size / 2), rn / rng.uniform(*spec["q"]), rn, size, *maps)
    return maps


def _morphology(label, i):
    d_nuc, _, m_nuc, m_cell = _one_cell(label, i)
    solid = m_nuc > 0.5
    pad = np.pad(solid, 1)
    interior = solid & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    yy, xx = np.nonzero(solid)
    by, bx = np.nonzero(solid & ~interior)
    dist = np.hypot(by - yy.mean(), bx - xx.mean())
    # Chromatin: mean step between neighbouring pixels relative to the spread (fine texture -> large).
    t = np.where(m_nuc > 0, d_nuc / np.maximum(m_nuc, 1e-6), 0)
    both = interior[1:, :-1] & interior[:-1, :-1]
    step = np.abs(np.diff(t, axis=0))[:, :-1][both].mean() / t[interior].std()
    return m_nuc.sum() / m_cell.sum(), dist.std() / dist.mean(), step


def test_smear_classes_differ_in_morphology():
    """Nucleus/cell area, outline irregularity and chromatin grain, per class (one cell each)."""
    m = np.array([[_morphology(c, i) for i in range(30)] for c in range(4)]).mean(1)
    frac, irregular, grain = m[:, 0], m[:, 1], m[:, 2]
    benign, early, pre, pro = range(4)
    assert frac[early] > frac[pre] + 0.1 > frac[benign] + 0.2 and frac[pre] > frac[pro] + 0.1
    assert min(irregular[pre], irregular[pro]) > 1.5 * max(irregular[benign], irregular[early])
    assert min(grain[early], grain[pre]) > 1.5 * max(grain[benign], grain[pro])


# ------------------------------------------------------------------------------------------ splits


def _random_hashes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [hashlib.md5(rng.bytes(8)).hexdigest() for _ in range(n)]


def test_split_is_stratified_deterministic_and_order_free():
    hashes = _random_hashes(200)
    labels = np.arange(200) % 4
    s = split_by_content(hashes, labels, seed=1)
    assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(200))
    for name, count in zip(("train", "val", "test"), (35, 8, 7)):  # 50 x (.7, .15, .15), tie to val
        assert (np.diff(s[name]) > 0).all()
        assert np.bincount(labels[s[name]], minlength=4).tolist() == [count] * 4
    again = split_by_content(hashes, labels, seed=1)
    assert all((again[k] == s[k]).all() for k in s)
    other = split_by_content(hashes, labels, seed=2)
    assert any(not np.array_equal(other[k], s[k]) for k in s)

    # Shuffle the input: every hash stays in its split.
    where = {hashes[i]: k for k, idx in s.items() for i in idx}
    perm = np.random.default_rng(3).permutation(200)
    shuffled = split_by_content([hashes[i] for i in perm], labels[perm], seed=1)
    assert {hashes[perm[i]]: k for k, idx in shuffled.items() for i in idx} == where


def test_split_small_classes_and_conflicts():
    hashes = _random_hashes(10)
    s = split_by_content(hashes, [0] * 10)
    assert [len(s[k]) for k in ("train", "val", "test")] == [7, 2, 1]  # 7 / 1.5 / 1.5, tie to val
    with pytest.raises(UserError, match="a.jpg.*b.jpg"):
        split_by_content(["h1", "h2", "h1"], [0, 1, 1], files=["a.jpg", "c.jpg", "b.jpg"])
    with pytest.raises(UserError, match="fractions"):
        split_by_content(hashes, [0] * 10, fractions=(0.5, 0.5, 0.5))


def test_near_duplicates_travel_together():
    hashes = _random_hashes(40)
    labels = np.arange(40) % 2
    near = [int(h[:16], 16) for h in hashes]  # unrelated 64-bit values: far apart
    assert {k: v.tolist() for k, v in split_by_content(hashes, labels, seed=3, near=near).items()} == \
           {k: v.tolist() for k, v in split_by_content(hashes, labels, seed=3).items()}
    # Items 0, 2 and 4 are re-framings of one picture (1, 2 bits off), item 6 is 5 bits off.
    near[2], near[4], near[6] = near[0] ^ 1, near[0] ^ 0b110, near[0] ^ 0b11111
    for seed in range(6):
        s = split_by_content(hashes, labels, seed=seed, near=near)
        where = {i: k for k, idx in s.items() for i in idx}
        assert where[0] == where[2] == where[4]
        assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(40))
    # 2 bits is within the default distance of 4, not within 1.
    apart = [split_by_content(hashes, labels, seed=seed, near=near, near_distance=1) for seed in range(6)]
    assert any(len({k for k, idx in s.items() for i in idx if i in (0, 4)}) == 2 for s in apart)


def test_real_duplicates_never_straddle_splits(dev_data):
    with open(os.path.join(dev_data, "MANIFEST.csv")) as f:
        rows = list(csv.DictReader(f))
    labels = np.array([CLASS_NAMES.index(r["class"]) for r in rows])
    hashes = [r["md5"] for r in rows]
    groups = defaultdict(list)
    for i, h in enumerate(hashes):
        groups[h].append(i)
    duplicated = [g for g in groups.values() if len(g) > 1]
    assert len(duplicated) >= 10  # the dev subset holds many of the 40 identical pairs
    for seed in range(5):
        s = split_by_content(hashes, labels, seed=seed)
        where = np.empty(len(rows), object)
        for k, idx in s.items():
            where[idx] = k
        assert all(len({where[i] for i in g}) == 1 for g in duplicated)
        # Stratified over distinct contents: each class's groups are cut to within one of the fractions.
        for c in range(4):
            contents = {h for h, g in groups.items() if labels[g[0]] == c}
            for k, frac in zip(("train", "val", "test"), (0.7, 0.15, 0.15)):
                got = {hashes[i] for i in s[k] if labels[i] == c}
                assert got <= contents and abs(len(got) - frac * len(contents)) < 1

    # content_hashes agrees with the manifest on real files.
    some = rows[:: len(rows) // 5]
    assert content_hashes([os.path.join(dev_data, r["class"], r["file"]) for r in some]) == [r["md5"] for r in some]


# ----------------------------------------------------------------------------------------- folders


def test_scan_real_folder(dev_data):
    paths, labels, names = folders.scan(dev_data)
    assert names == list(CLASS_NAMES)
    with open(os.path.join(dev_data, "MANIFEST.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(paths) == len(rows) == 2282 and labels.dtype == np.int32
    expected = np.bincount([CLASS_NAMES.index(r["class"]) for r in rows], minlength=4)
    assert np.bincount(labels, minlength=4).tolist() == expected.tolist()
    assert all(os.path.isabs(p) and os.path.basename(os.path.dirname(p)) == names[l] for p, l in zip(paths, labels))


def test_scan_known_layouts(tmp_path):
    # Kaggle "leukemia": Original/ and Segmented/; the folder above them or Original itself.
    _tree(tmp_path / "leuk" / "Original", ["Pro", "Benign", "Pre", "Early"])
    _tree(tmp_path / "leuk" / "Segmented", ["Benign", "Early", "Pre", "Pro"], n=3)
    for root in (tmp_path / "leuk", tmp_path / "leuk" / "Original"):
        paths, labels, names = folders.scan(root)
        assert names == list(CLASS_NAMES) and len(paths) == 8
        assert all("Original" in p for p in paths)
        assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]

    # "Blood cell Cancer [ALL]", inside the archive's top folder.
    eshraghi = ["Benign", "[Malignant] early Pre-B", "[Malignant] Pre-B", "[Malignant] Pro-B"]
    _tree(tmp_path / "zip" / "Blood cell Cancer [ALL]", eshraghi[::-1], ext=".jpg")
    (tmp_path / "zip" / "Blood cell Cancer [ALL]" / "Benign" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "zip" / "Blood cell Cancer [ALL]" / "Benign" / "notes.txt").write_text("x")
    paths, labels, names = folders.scan(tmp_path / "zip")
    assert names == list(CLASS_NAMES) and len(paths) == 8
    assert [os.path.basename(os.path.dirname(paths[i])) for i in (0, 2, 4, 6)] == eshraghi

    # Any other class-folder tree: sorted names; known ones first, normalised.
    _tree(tmp_path / "other", ["zeta", "alpha", "pro"])
    assert folders.scan(tmp_path / "other")[2] == ["Pro", "alpha", "zeta"]


def test_scan_rejects_bad_folders(tmp_path):
    cases = {
        "missing": (tmp_path / "nope", "not found"),
        "file": (_png(tmp_path / "file.png", _rgb()), "not a folder"),
        "empty": (tmp_path / "empty", "empty"),
        "one class": (_tree(tmp_path / "one", ["Benign"]), "only one class"),
        "no images": (_tree(tmp_path / "noimg", ["Benign", "Pro"]), "Lonely"),
        "unsupported": (_tree(tmp_path / "gif", ["Benign", "Pro"]), "x.gif"),
        "stray image": (_tree(tmp_path / "stray", ["Benign", "Pro"]), "loose.png"),
        "same class twice": (_tree(tmp_path / "twice", ["Pro", "[Malignant] Pro-B"]), "both class 'Pro'"),
        "flat": (tmp_path / "flat", "no class folders"),
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "noimg" / "Lonely").mkdir()
    (tmp_path / "noimg" / "Lonely" / "readme.txt").write_text("x")
    (tmp_path / "gif" / "Pro" / "x.gif").write_bytes(b"GIF89a")
    _png(tmp_path / "stray" / "loose.png", _rgb())
    _png(tmp_path / "flat" / "a.png", _rgb())
    for what, (root, message) in cases.items():
        with pytest.raises(UserError, match=message):
            folders.scan(root)


# -------------------------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory, request):
    """Ten images per class (real ones when the dev data is there), plus odd modes in Benign."""
    root = tmp_path_factory.mktemp("tree") / "smears"
    dev = request.getfixturevalue("dev_data") if _has_dev_data() else None
    if dev:
        for c in CLASS_NAMES:
            for f in sorted(os.listdir(os.path.join(dev, c)))[:10]:
                (root / c).mkdir(parents=True, exist_ok=True)
                shutil.copy(os.path.join(dev, c, f), root / c / f)
    else:
        x, y = data.make_smears(40, 48, seed=0)
        for i, (im, label) in enumerate(zip(x, y)):
            _png(root / CLASS_NAMES[label] / f"s{i:02d}.jpg", im)
    odd = root / "Benign"
    Image.fromarray(_rgb(7, 50)[..., 0]).save(odd / "grey.png")
    Image.fromarray(np.dstack([_rgb(8, 20), np.full((20, 20, 1), 200, np.uint8)])).save(odd / "rgba.png")
    Image.fromarray((_rgb(9, 30)[..., 0].astype(np.uint16) * 16)).save(odd / "deep.png")
    (root / "MANIFEST.csv").write_text("class,file,md5\n")
    return root


def _has_dev_data():
    return os.path.isdir(os.path.abspath(os.environ.get("JAXCELL_DEV_DATA", os.path.join(
        os.path.dirname(__file__), "..", "..", "shared", "data", "all4class-dev"))))


def test_folder_dataset_through_tfds(small_tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    ds = data.load(str(small_tree), image_size=32, seed=0, cache_dir=cache)
    paths, labels, names = folders.scan(small_tree)
    assert ds.class_names == names == list(CLASS_NAMES)
    assert "content hash" in ds.split_note and "patient" in ds.split_note
    assert str(small_tree) in ds.source

    # The splits are split_by_content's, in file order, with the images load_image gives.
    expected = split_by_content(content_hashes(paths), labels, seed=0, near=file_difference_hashes(paths))
    for k, idx in expected.items():
        images, y = ds.splits[k]
        assert images.dtype == np.uint8 and images.shape == (len(idx), 32, 32, 3) and y.dtype == np.int32
        assert ds.files[k] == [paths[i] for i in idx]
        assert y.tolist() == labels[idx].tolist()
        assert (images == load_images(ds.files[k], 32)).all()
    assert sum(len(v) for v in ds.files.values()) == len(paths) == 43

    # Second call: served from the cache, nothing decoded.
    def no_decoding(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folders, "load_image", no_decoding)
    again = data.load(str(small_tree), image_size=32, seed=0, cache_dir=cache)
    assert all((again.splits[k][0] == ds.splits[k][0]).all() for k in ds.splits)
    assert again.files == ds.files
    # Another size is another cache entry (and decodes).
    with pytest.raises(AssertionError, match="decoded again"):
        data.load(str(small_tree), image_size=16, seed=0, cache_dir=cache)
    monkeypatch.undo()

    # A changed file is noticed: new cache entry, new pixels.
    changed = small_tree / "Benign" / "grey.png"
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))
    fresh = data.load(str(small_tree), image_size=32, seed=0, cache_dir=cache)
    where = [(k, f.index(str(changed))) for k, f in fresh.files.items() if str(changed) in f][0]
    assert (fresh.splits[where[0]][0][where[1]] == 0).all()


def test_cache_location_from_environment(small_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCELL_CACHE", str(tmp_path / "env"))
    assert folders.default_cache_dir() == tmp_path / "env" / "tfds"
    data.load(str(small_tree), image_size=16, seed=3)
    assert list((tmp_path / "env" / "tfds").glob("jaxcell_image_folder/px16_seed3_*/1.0.0/*train*"))


def test_folder_with_broken_image_fails_naming_it(tmp_path):
    root = _tree(tmp_path / "tree", ["Benign", "Pro"], n=3)
    (root / "Pro" / "broken.jpg").write_text("plain text")
    with pytest.raises(UserError, match="broken.jpg"):
        data.load(str(root), image_size=16, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("**/*.array_record*"))


def test_load_folder_all(small_tree, tmp_path):
    images, labels, files, names = data.load_folder_all(str(small_tree), 24)
    assert images.shape == (43, 24, 24, 3) and names == list(CLASS_NAMES) and len(files) == 43
    # With the model's classes: labels index into them; an unknown folder class is refused.
    _tree(tmp_path / "two", ["Pro", "Early"])
    model_classes = ["Benign", "Early", "Pre", "Pro"]
    _, y, _, names = data.load_folder_all(str(tmp_path / "two"), 8, class_names=model_classes)
    assert names == model_classes and y.tolist() == [1, 1, 3, 3]
    _tree(tmp_path / "two", ["Mystery"])
    with pytest.raises(UserError, match="Mystery"):
        data.load_folder_all(str(tmp_path / "two"), 8, class_names=model_classes)


def test_synthetic_dataset():
    ds = data.load(None, image_size=16, seed=4, synthetic_examples=80)
    assert ds.class_names == list(CLASS_NAMES) and ds.files == {"train": [], "val": [], "test": []}
    assert [len(ds.splits[k][1]) for k in ("train", "val", "test")] == [56, 12, 12]
    assert all(np.bincount(ds.splits[k][1], minlength=4).min() >= 3 for k in ds.splits)
    again = data.load(None, image_size=16, seed=4, synthetic_examples=80)
    assert all((again.splits[k][0] == ds.splits[k][0]).all() for k in ds.splits)
    with pytest.raises(UserError):
        data.load(None, image_size=16, synthetic_examples=5)


def test_concurrent_builds_of_one_entry(tmp_path):
    """Two loaders building the same cache entry at once (e.g. the processes of one job) both succeed."""
    import threading

    root = _tree(tmp_path / "tree", ["Benign", "Pro"], n=6)
    results, errors = [], []

    def build():
        try:
            results.append(folders.build(root, 16, cache_dir=tmp_path / "cache").data_dir)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
