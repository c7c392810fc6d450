"""The out-of-distribution detector: features of every model, the fit and its threshold, storage, and the
commands that use it (train, ood, predict, evaluate --ood-data) on a tiny synthetic run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import tiny
from jaxcell import models, ood
from jaxcell.cli import main

TINY = tiny.model_args("lightnetcell")

# Small configurations of every registered model (image size, constructor arguments).
CASES = {
    "lightnetcell": (32, tiny.LIGHTNETCELL),
    "resnet18": (32, {}),
    "resnet34": (32, {}),
    "resnet50": (32, {}),
    "hybrid_vit": (32, tiny.HYBRID_VIT),
    "brin": (32, tiny.BRIN),
    "densenet121": (32, {}),
}
SLOW = {"densenet121", "resnet50", "resnet34", "resnet18"}  # the same head as lightnetcell: a dense layer


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in CASES])
def test_features_are_the_input_of_the_head_for_every_model(name):
    size, kw = CASES[name]
    model = models.create(name, image_size=size, **kw)
    x = jax.random.normal(jax.random.key(0), (3, size, size, 3))
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(1), x)  # one program, not one per op
    features, logits = jax.jit(lambda v, x: ood.features_and_logits(model, v, x))(variables, x)
    np.testing.assert_allclose(logits, jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x),
                               rtol=1e-5, atol=1e-5)
    kernel, bias = ood.dense_of_head(variables["params"], name)
    assert features.shape == (3, kernel.shape[0])
    # The head's dense layer applied to the features gives the logits: they are its input, nothing else.
    np.testing.assert_allclose(features @ kernel + bias, logits, rtol=1e-4, atol=1e-4)


def test_detector_inputs_blocks_name_their_widths():
    size, kw = CASES["hybrid_vit"]
    model = models.create("hybrid_vit", image_size=size, **kw)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 3)), train=False))(jax.random.key(1))
    pre = models.preprocessing("hybrid_vit", size, od_center=True)
    images = jax.random.uniform(jax.random.key(2), (2, size, size, 3))
    names = []  # filled while tracing
    features, logits = jax.jit(lambda v, x: ood.detector_inputs(model, v, x, pre, names=names))(variables, images)
    assert names[0] == ("penultimate", 16) and names[1] == (ood.COLOUR_BLOCK, 6)
    assert features.shape == (2, sum(w for _, w in names)) and logits.shape == (2, 4)
    assert [n for n, _ in names[2:5]] == ["stage1", "stage2", "stage3"]


def _toy(rng, n, shift=0.0, d=8, k=3):
    """Features of k well separated classes, + `shift` in every coordinate (foreign when large)."""
    y = rng.integers(0, k, n)
    centres = np.eye(k, d) * 6
    f = centres[y] + rng.normal(size=(n, d)) + shift
    logits = f[:, :k] * 2
    return f, logits, y


def _fit_toy(rng, method="combined", blocks=None):
    f, _, y = _toy(rng, 600)
    vf, vz, _ = _toy(rng, 500)
    d = blocks[0][1] if blocks else 8
    head = (np.eye(d, 3) * 2, np.zeros(3))       # the toy logits are this head applied to the features
    return ood.fit(f, y, vf, vz, head, 3, blocks, method), (vf, vz)


def test_threshold_flags_at_most_two_percent_of_validation_by_construction():
    rng = np.random.default_rng(0)
    for method in ood.METHODS:
        detector, (vf, vz) = _fit_toy(rng, method, [("penultimate", 5), ("rest", 3)])
        flagged = detector.flagged(vf, vz)
        assert flagged.sum() <= int(0.02 * len(vf)), method
        assert detector.info["val_flagged_share"] == flagged.mean()
    # Ties: never more than the share, even when every score is equal.
    assert (np.zeros(100) > ood.threshold_for(np.zeros(100))).sum() == 0
    s = np.arange(100.0)
    assert (s > ood.threshold_for(s)).sum() == 2


def test_each_method_alone_scores_as_it_does_among_all_and_on_one_blas_thread():
    """`score` computes only its method's inputs; the numbers are those of `scores` of every method, and the
    BLAS numpy uses is back to its own thread count afterwards."""
    from threadpoolctl import threadpool_info

    rng = np.random.default_rng(3)
    detector, (vf, vz) = _fit_toy(rng, "combined", [("penultimate", 5), ("rest", 3)])
    before = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    every = detector.scores(vf, vz)
    assert list(every) == list(ood.METHODS)
    for method in ood.METHODS:
        np.testing.assert_array_equal(detector.score(vf, vz, method), every[method])
    assert [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"] == before
    with pytest.raises(ood.UserError, match="unknown OOD score 'nope'"):
        detector.score(vf, vz, "nope")


def test_a_foreign_set_is_separated_in_a_toy_setting():
    rng = np.random.default_rng(1)
    detector, (vf, vz) = _fit_toy(rng, "mahalanobis")
    inside, far = _toy(rng, 300), _toy(rng, 300, shift=4.0)
    result = ood.separation(detector, inside[:2], far[:2])
    assert result["auroc"] > 0.99 and result["fpr_at_95_tpr"] < 0.05
    assert result["flagged_foreign"] > 0.9 and result["flagged_in_distribution"] < 0.06
    # The logits of a shifted copy keep their argmax here, so the softmax does not see it: the features do.
    assert ood.separation(detector, inside[:2], far[:2], "msp")["auroc"] < 0.9


def test_fpr_at_95_tpr():
    inside, foreign = np.arange(100.0), np.arange(50.0, 150.0)
    scores, positive = np.r_[inside, foreign], np.r_[np.zeros(100, bool), np.ones(100, bool)]
    # 95% of the foreign scores are >= 55: the inside scores 55..99 (45 of 100) pass too.
    assert ood.fpr_at_tpr(scores, positive) == pytest.approx(0.45)


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    detector, (vf, vz) = _fit_toy(rng, "combined", [("penultimate", 6), ("rest", 2)])
    assert ood.load(str(tmp_path)) is None
    ood.save(str(tmp_path), detector)
    loaded = ood.load(str(tmp_path))
    assert (loaded.method, loaded.threshold) == (detector.method, detector.threshold)
    for method in ood.METHODS:
        np.testing.assert_array_equal(loaded.score(vf, vz, method), detector.score(vf, vz, method))
    d = loaded.describe()
    assert d["method"] == "combined" and d["threshold"] == detector.threshold and d["blocks"][1] == ["rest", 2]
    with pytest.raises(ood.UserError, match="takes 8 features"):
        loaded.score(vf[:, :5], vz)


def test_a_workdir_without_detector_says_how_to_fit_one(tmp_path):
    with pytest.raises(ood.UserError, match="jaxcell ood --workdir"):
        ood.require(str(tmp_path))
    with pytest.raises(ood.UserError, match="unknown OOD score 'nope'"):
        ood.check_method("nope")


# ---------------------------------------------------------------------------------------------
# The commands, on a tiny synthetic run.

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ood") / "run")
    assert main(["train", "--model", "lightnetcell", *TINY, "--image-size", "16", "--epochs", "2", "--batch-size", "8",
                 "--synthetic-examples", "80", "--workdir", path, "--no-progress"]) == 0
    return path


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Noise images in two nested folders (any layout), and a file that is not an image."""
    root = tmp_path_factory.mktemp("foreign")
    rng = np.random.default_rng(0)
    for i in range(6):
        folder = root / ("a" if i % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (root / "notes.txt").write_text("not an image")
    return str(root)


def test_train_fits_the_detector_and_ood_refits_it(workdir, capsys):
    record = json.load(open(os.path.join(workdir, ood.OOD_FILE)))
    assert record["method"] == ood.DEFAULT_METHOD and record["info"]["augmented_views"] == ood.AUGMENTED_VIEWS
    assert record["info"]["val_flagged_share"] <= ood.FLAG_SHARE
    assert main(["ood", "--workdir", workdir, "--method", "mahalanobis", "--views", "0"]) == 0
    assert "threshold" in capsys.readouterr().out
    detector = ood.load(workdir)
    assert detector.method == "mahalanobis" and detector.info["augmented_views"] == 0
    assert main(["ood", "--workdir", workdir]) == 0  # back to the default for the tests below
    assert ood.load(workdir).method == ood.DEFAULT_METHOD


def test_predict_adds_ood_fields_and_calibrated_probabilities(workdir, foreign, capsys):
    files = [os.path.join(foreign, "a", "1.png"), os.path.join(foreign, "b", "c", "0.png")]
    assert main(["predict", "--workdir", workdir, *files]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    detector = ood.load(workdir)
    assert len(lines) == 2
    for line in lines:
        assert isinstance(line["in_distribution"], bool) and isinstance(line["ood_score"], float)
        assert line["in_distribution"] == (line["ood_score"] <= detector.threshold)
        assert sum(line["calibrated_probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert max(line["calibrated_probabilities"], key=line["calibrated_probabilities"].get) == line["class"]


def test_evaluate_ood_data_writes_the_ood_section(workdir, foreign, tmp_path, capsys):
    out = str(tmp_path / "r.json")
    assert main(["evaluate", "--workdir", workdir, "--ood-data", foreign, "--bootstrap", "0", "--out", out]) == 0
    o = json.load(open(out))["ood"]
    assert o["foreign"]["images"] == 6 and o["in_distribution"]["images"] > 0
    assert 0 <= o["auroc"] <= 1 and 0 <= o["fpr_at_95_tpr"] <= 1
    assert set(o["per_method"]) == set(ood.METHODS)
    assert o["auroc"] == o["per_method"][o["detector"]["method"]]["auroc"]
    for side in ("in_distribution", "foreign"):
        assert 0 <= o[side]["flagged_share"] <= 1
    assert "AUROC" in capsys.readouterr().out


def test_without_a_detector_predict_says_so_and_evaluate_refuses(workdir, foreign, tmp_path, capsys):
    import shutil

    bare = str(tmp_path / "bare")
    shutil.copytree(workdir, bare)
    os.remove(os.path.join(bare, ood.OOD_FILE))
    assert main(["predict", "--workdir", bare, os.path.join(foreign, "a", "1.png")]) == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out)
    assert "ood_score" not in line and "in_distribution" not in line
    assert "no OOD detector" in captured.err and f"jaxcell ood --workdir {bare}" in captured.err
    assert main(["evaluate", "--workdir", bare, "--ood-data", foreign]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "has no OOD detector" in err


def test_ood_data_without_images_is_refused(workdir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--workdir", workdir, "--ood-data", str(tmp_path / "empty"), "--bootstrap", "0"]) == 2
    assert "no image files" in capsys.readouterr().err
    assert main(["evaluate", "--workdir", workdir, "--ood-data", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_report_shows_the_score_distributions(workdir, foreign, tmp_path):
    out = str(tmp_path / "report.html")
    assert main(["report", "--workdir", workdir, "--ood-data", foreign, "--cams", "0", "--out", out]) == 0
    page = open(out, encoding="utf-8").read()
    assert "Out-of-distribution scores" in page and "foreign images flagged" in page
    assert Image.open(str(tmp_path / "report_ood.png")).size[0] > 100
