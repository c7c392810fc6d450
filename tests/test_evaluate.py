"""Evaluation: metrics against brute force, calibration, bootstrap, stain shift, TTA, ensembles."""

import json
import os

import numpy as np
import pytest

from jaxcell import calibration
from jaxcell import evaluate as ev

# ---------------------------------------------------------------------------------------------
# Metrics.


def brute_auc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_roc_auc_equals_the_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = rng.integers(2, 60)
        scores = rng.integers(0, 6, n).astype(float)  # many ties
        positive = rng.random(n) < 0.4
        if positive.all() or not positive.any():
            continue
        assert ev.roc_auc(scores, positive) == pytest.approx(brute_auc(scores, positive), abs=1e-12)
        fpr, tpr = ev.roc_curve(scores, positive)
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
        # The trapezoids through the tie points give the same area (a tie counts half).
        area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        assert area == pytest.approx(ev.roc_auc(scores, positive), abs=1e-12)
    assert np.isnan(ev.roc_auc(np.ones(3), np.array([True, True, True])))


def test_average_ranks():
    np.testing.assert_array_equal(ev.average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4, 1, 4, 2, 4])


def test_weighted_f1_and_one_vs_rest():
    labels = np.array([0, 0, 0, 1, 1, 2])
    probs = np.eye(3)[[0, 0, 1, 1, 1, 0]] * 0.9 + 0.1 / 3
    r = ev.evaluation_metrics(labels, probs, ["a", "b", "c"], resamples=0)
    f1 = np.array([r["per_class"][k]["f1"] for k in "abc"])
    np.testing.assert_allclose(f1, [2 / 3, 0.8, 0.0])  # a: P 2/3 R 2/3; b: P 2/3 R 1; c: none right
    assert r["weighted_f1"] == pytest.approx((3 * 2 / 3 + 2 * 0.8 + 0) / 6)
    assert r["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 3)
    assert r["roc_auc"]["per_class"]["b"] == pytest.approx(brute_auc(probs[:, 1], labels == 1))
    assert r["bootstrap"] == {}


def test_expected_calibration_error_by_hand():
    # Two bins used: confidence 0.95 (both right) and 0.55 (one of two right).
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    labels = np.array([0, 0, 0, 0])
    # bin of 0.95: accuracy 1, |1 - 0.95| = 0.05; bin of 0.55: accuracy 0.5, |0.5 - 0.55| = 0.05
    assert calibration.ece(probs, labels) == pytest.approx(0.05)
    r = calibration.reliability(probs, labels)
    assert sum(r["count"]) == 4 and r["count"][14] == 2 and r["count"][8] == 2
    # A confidence on a bin edge belongs to the bin below it; 1.0 to the last one.
    edge = calibration.reliability(np.array([[1 / 3 + 1e-12, 0.0], [1.0, 0.0]]), np.array([0, 0]))
    assert edge["count"][5] == 1 and edge["count"][14] == 1


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20000, 4))
    true_t = 2.5
    p = calibration.softmax(logits, true_t)
    labels = (p.cumsum(1) < rng.random((len(p), 1))).sum(1)  # drawn from the tempered model
    t = calibration.fit_temperature(logits, labels)
    assert t == pytest.approx(true_t, rel=0.05)
    # It is the minimum of the NLL (against a grid), and it changes no prediction.
    grid = np.exp(np.linspace(np.log(0.5), np.log(10), 400))
    best = grid[np.argmin([calibration.nll(calibration.softmax(logits, g), labels) for g in grid])]
    assert t == pytest.approx(best, rel=0.01)
    np.testing.assert_array_equal(calibration.softmax(logits, t).argmax(1), logits.argmax(1))
    before, after = (calibration.ece(calibration.softmax(logits, s), labels) for s in (1.0, t))
    assert after < before


def test_temperature_of_averaged_views():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 4, (500, 4))
    logits = base + rng.normal(0, 1, (3, 500, 4))  # three views of one overconfident model
    labels = (calibration.softmax(base, 2.0).cumsum(1) < rng.random((500, 1))).sum(1)
    t = calibration.fit_temperature(logits, labels)
    assert 1.2 < t < 4
    f = lambda s: calibration.nll(calibration.softmax(logits, s).mean(0), labels)  # noqa: E731
    assert f(t) <= min(f(t * 0.97), f(t * 1.03)) + 1e-9


def test_no_temperature_is_fitted_on_a_split_without_errors():
    """Every example right: the NLL falls all the way to the smallest temperature, which would make
    the model near one-hot; T stays 1. One error gives the NLL a minimum again."""
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (300, 4))
    labels = logits.argmax(1)
    assert calibration.fit_temperature(logits, labels) == 1.0
    labels[0] = (labels[0] + 1) % 4
    t = calibration.fit_temperature(logits, labels)
    assert np.log(t) - calibration.LOG_T_RANGE[0] > 0.1 and t != 1.0


def test_calibration_file_round_trip(tmp_path):
    assert calibration.read_temperature(str(tmp_path), 10, False) is None
    calibration.write_temperature(str(tmp_path), 10, False, {"temperature": 1.5})
    calibration.write_temperature(str(tmp_path), 10, True, {"temperature": 2.0})
    assert calibration.read_temperature(str(tmp_path), 10, False)["temperature"] == 1.5
    assert calibration.read_temperature(str(tmp_path), 10, True)["temperature"] == 2.0
    assert calibration.read_temperature(str(tmp_path), 11, False) is None


def test_bootstrap_is_the_percentile_of_resampled_reports():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    probs = rng.dirichlet(np.ones(4), 300)
    probs[np.arange(300)[:150], labels[:150]] += 1  # half right
    b = ev.bootstrap_intervals(labels, probs, resamples=200, seed=7)
    assert b == ev.bootstrap_intervals(labels, probs, resamples=200, seed=7)  # fixed seed, same answer
    # The same draws, scored one by one with `report`:
    draws = np.random.default_rng(7)
    idx = np.concatenate([draws.integers(0, 300, (100, 300)) for _ in range(2)])
    names = list("abcd")
    acc = [ev.report(labels[i], probs[i], names)["accuracy"] for i in idx]
    f1 = [ev.report(labels[i], probs[i], names)["macro_f1"] for i in idx]
    np.testing.assert_allclose(b["accuracy"], np.percentile(acc, [2.5, 97.5]), atol=1e-12)
    np.testing.assert_allclose(b["macro_f1"], np.percentile(f1, [2.5, 97.5]), atol=1e-12)
    point = ev.report(labels, probs, names)
    assert b["accuracy"][0] < point["accuracy"] < b["accuracy"][1]


# ---------------------------------------------------------------------------------------------
# Image transforms.


def test_dihedral_views_are_the_eight_symmetries():
    x = np.random.default_rng(0).integers(0, 255, (2, 5, 5, 3), np.uint8)
    views = ev.dihedral_views(x)
    assert len(views) == 8
    assert np.array_equal(views[0], x)
    assert len({v.tobytes() for v in views}) == 8
    for v in views:  # each a rearrangement of the pixels of each image
        assert np.array_equal(np.sort(v.reshape(2, -1, 3), 1), np.sort(x.reshape(2, -1, 3), 1))


def test_stain_shift_is_fixed_per_image_and_independent_of_batching():
    x = np.random.default_rng(0).integers(30, 255, (5, 8, 8, 3), np.uint8)
    a = ev.stain_shift(x, 0.05, seed=3)
    assert a.dtype == np.uint8 and a.shape == x.shape
    np.testing.assert_array_equal(a, ev.stain_shift(x, 0.05, seed=3, chunk=2))
    np.testing.assert_array_equal(a[3:], ev.stain_shift(x[3:], 0.05, seed=3, indices=[3, 4]))
    assert not np.array_equal(a, ev.stain_shift(x, 0.05, seed=4))
    assert np.abs(a.astype(int) - x).max() > 2
    assert np.abs(ev.stain_shift(x, 0.0).astype(int) - x).max() <= 1  # strength 0: the images back


# ---------------------------------------------------------------------------------------------
# The pipeline and the command, on tiny trained models.

TINY = ["--model", "lightnetcell", "--model-arg", "hidden=16", "--epochs", "2", "--batch-size", "8",
        "--synthetic-examples", "80", "--no-progress"]


def trained_workdir(tmp_path_factory, size: int, widths: str) -> str:
    """A tiny trained workdir, trained once per test session and shared by the test files."""
    from jaxcell.cli import main

    path = tmp_path_factory.getbasetemp() / f"evaluate-workdir-{size}"
    if not (path / "metrics.jsonl").is_file():
        code = main(["train", *TINY, "--model-arg", f"widths={widths}", "--image-size", str(size),
                     "--workdir", str(path), "--overwrite"])
        assert code == 0
    return str(path)


@pytest.fixture(scope="module")
def w16(tmp_path_factory):
    return trained_workdir(tmp_path_factory, 16, "(8,16,16)")


@pytest.fixture(scope="module")
def w24(tmp_path_factory):
    return trained_workdir(tmp_path_factory, 24, "(8,16)")


def test_evaluate_reports_calibration_and_intervals_and_keeps_the_temperature(w16, tmp_path, capsys):
    from jaxcell.cli import main

    out = tmp_path / "e.json"
    calibration_file = os.path.join(w16, calibration.CALIBRATION_FILE)
    if os.path.exists(calibration_file):
        os.remove(calibration_file)
    assert main(["evaluate", "--workdir", w16, "--out", str(out)]) == 0
    r = json.load(open(out))
    for key in ("weighted_f1", "roc_auc", "ece", "ece_calibrated", "temperature", "bootstrap", "members"):
        assert key in r
    assert set(r["roc_auc"]["per_class"]) == set(r["class_names"])
    assert r["bootstrap"]["resamples"] == 1000 and r["bootstrap"]["accuracy"][0] <= r["accuracy"]
    stored = json.load(open(calibration_file))["temperatures"]
    (key, entry), = stored.items()
    assert entry["temperature"] == pytest.approx(r["temperature"][0]) and entry["fitted_on"] == "val split"
    text = capsys.readouterr().out
    assert "ROC-AUC" in text and "after temperature scaling" in text and "bootstrap" in text

    # A stored temperature is used as it is; --fit-temperature refits it.
    entry["temperature"] = 1.7
    json.dump({"temperatures": stored}, open(calibration_file, "w"))
    assert main(["evaluate", "--workdir", w16, "--out", str(out)]) == 0
    assert json.load(open(out))["temperature"] == [1.7]
    assert main(["evaluate", "--workdir", w16, "--out", str(out), "--fit-temperature"]) == 0
    assert json.load(open(out))["temperature"][0] == pytest.approx(r["temperature"][0])
    assert main(["evaluate", "--workdir", w16, "--out", str(out), "--no-calibration", "--bootstrap", "0"]) == 0
    r = json.load(open(out))
    assert "ece_calibrated" not in r and r["bootstrap"] == {}


def test_tta_averages_the_eight_views(w16):
    from jaxcell import data
    from jaxcell.train import predict_logits

    e = ev.run_evaluation([w16], tta=True, resamples=0, calibrate=False)
    m = e.members[0]
    images = data.load(None, 16, seed=0, synthetic_examples=80).splits["test"][0]
    np.testing.assert_array_equal(e.images, images)
    views = []
    for flip in (False, True):
        x = images[:, :, ::-1] if flip else images
        for k in range(4):
            logits = predict_logits(m.eval_step, m.state, np.ascontiguousarray(np.rot90(x, k, (1, 2))), 64, m.placement)
            views.append(calibration.softmax(logits))
    np.testing.assert_allclose(e.probabilities, np.mean(views, 0), atol=1e-6)
    plain = ev.run_evaluation([w16], resamples=0, calibrate=False)
    assert not np.allclose(plain.probabilities, e.probabilities)


def test_an_ensemble_averages_its_members_across_image_sizes(w16, w24):
    both = ev.run_evaluation([w16, w24], resamples=0)
    one = ev.run_evaluation([w16], resamples=0)
    two = ev.run_evaluation([w24], resamples=0)
    np.testing.assert_array_equal(both.labels, one.labels)
    np.testing.assert_allclose(both.probabilities, (one.probabilities + two.probabilities) / 2, atol=1e-12)
    np.testing.assert_allclose(both.calibrated, (one.calibrated + two.calibrated) / 2, atol=1e-12)
    assert [m["image_size"] for m in both.result["members"]] == [16, 24]
    assert both.result["model"] == "lightnetcell+lightnetcell"


def test_stain_shift_evaluates_shifted_copies_of_the_same_images(w16, capsys):
    from jaxcell.cli import main

    clean = ev.run_evaluation([w16], resamples=0, calibrate=False)
    shifted = ev.run_evaluation([w16], shift=0.05, shift_seed=2, resamples=0, calibrate=False)
    np.testing.assert_array_equal(shifted.images, ev.stain_shift(clean.images, 0.05, 2))
    np.testing.assert_array_equal(shifted.labels, clean.labels)
    assert shifted.result["stain_shift"] == {"strength": 0.05, "seed": 2}
    assert main(["evaluate", "--workdir", w16, "--stain-shift", "0.05", "--bootstrap", "0"]) == 0
    assert "stain-shifted (HED 0.05, seed 0)" in capsys.readouterr().out


def test_an_ensemble_refuses_members_that_disagree(w16, tmp_path, capsys):
    import shutil

    from jaxcell.cli import main

    other = tmp_path / "other"
    shutil.copytree(w16, other)
    config = json.load(open(other / "config.json"))
    seed = config["train"]["seed"]
    config["train"]["seed"] = 5  # without a split seed, the seed draws the split too
    json.dump(config, open(other / "config.json", "w"))
    assert main(["evaluate", "--workdir", w16, "--workdir", str(other)]) == 2
    assert "different splits" in capsys.readouterr().err
    config["train"]["split_seed"] = seed  # another seed on the same split: an ensemble of seeds
    json.dump(config, open(other / "config.json", "w"))
    assert main(["evaluate", "--workdir", w16, "--workdir", str(other), "--bootstrap", "0"]) == 0
    capsys.readouterr()
    config["class_names"] = config["class_names"][::-1]
    json.dump(config, open(other / "config.json", "w"))
    assert main(["evaluate", "--workdir", w16, "--workdir", str(other)]) == 2
    assert "same classes in the same order" in capsys.readouterr().err
