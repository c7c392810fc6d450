"""The `jaxcell` command end to end on tiny synthetic smears, and its answers to bad input."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import tiny
from jaxcell.cli import main

TINY = tiny.model_args("lightnetcell")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli") / "run")
    code = main(["train", "--model", "lightnetcell", *TINY, "--image-size", "16", "--epochs", "2",
                 "--batch-size", "8", "--synthetic-examples", "80", "--workdir", path, "--no-progress",
                 "--crop-scale", "0.8", "--hue-jitter", "0.05", "--input-pipeline", "host", "--seed", "2",
                 "--split-seed", "3"])
    assert code == 0
    return path


def test_train_records_its_augmentation_and_pipeline(workdir):
    train = json.load(open(os.path.join(workdir, "config.json")))["train"]
    assert (train["crop_scale"], train["hue_jitter"], train["input_pipeline"]) == (0.8, 0.05, "host")


def test_split_seed_fixes_the_split_apart_from_the_seed(workdir):
    from jaxcell import data, evaluate

    train = json.load(open(os.path.join(workdir, "config.json")))["train"]
    assert (train["seed"], train["split_seed"]) == (2, 3)
    want = data.load(None, 16, seed=3, synthetic_examples=80).splits["test"]
    other = data.load(None, 16, seed=2, synthetic_examples=80).splits["test"]
    assert want[0].shape != other[0].shape or not np.array_equal(want[0], other[0])
    got = evaluate.run_evaluation([workdir], split="test", resamples=0, calibrate=False)
    np.testing.assert_array_equal(got.images, want[0])
    np.testing.assert_array_equal(got.labels, want[1])


def test_evaluate_writes_the_report(workdir, tmp_path, capsys):
    out = str(tmp_path / "report.json")
    assert main(["evaluate", "--workdir", workdir, "--split", "test", "--out", out]) == 0
    result = json.load(open(out))
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "class_names", "num_examples"):
        assert key in result
    cm = np.array(result["confusion_matrix"])
    assert cm.shape == (4, 4) and cm.sum() == result["num_examples"] > 0
    assert result["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert set(result["per_class"]) == set(result["class_names"])
    assert "accuracy" in capsys.readouterr().out


def test_table_row_is_what_evaluate_measures(workdir, tmp_path, capsys, monkeypatch):
    from jaxcell import data

    rows, clean, shifted = (str(tmp_path / f) for f in ("rows.json", "clean.json", "shifted.json"))
    loads = []
    real_load = data.load
    monkeypatch.setattr(data, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    assert main(["table", "--workdir", workdir, "--split", "val", "--shift", "0.05", "--json", rows,
                 "--markdown", str(tmp_path / "t.md")]) == 0
    assert len(loads) == 1  # one load of the data for the clean and the shifted columns
    monkeypatch.undo()
    assert main(["evaluate", "--workdir", workdir, "--split", "val", "--checkpoint", "last", "--out", clean]) == 0
    assert main(["evaluate", "--workdir", workdir, "--split", "val", "--checkpoint", "last", "--stain-shift", "0.05",
                 "--out", shifted]) == 0
    row = json.load(open(rows))["rows"][0]
    assert row["accuracy"] == json.load(open(clean))["accuracy"]
    assert row["shifted_accuracy"] == json.load(open(shifted))["accuracy"]
    assert row["ece"] == pytest.approx(json.load(open(clean))["ece"])
    assert row["epochs"] == 2 and row["train_seconds"] > 0 and row["parameters"] > 0
    assert row["hardware"].startswith("CPU") and row["paper_accuracy"] == "0.91"
    assert "| lightnetcell (seed 2, split seed 3) | 0.91 | val (" in open(tmp_path / "t.md").read()


def test_table_from_saved_records_is_the_table_measured(workdir, tmp_path, capsys):
    records = tmp_path / "results"
    args = ["--split", "val", "--split", "test", "--shift", "0.05"]
    assert main(["table", "--workdir", workdir, *args, "--save-records", str(records)]) == 0
    measured = capsys.readouterr().out
    assert sorted(os.listdir(records / "run")) == [
        "config.json", "evaluation-test-hed0.05.json", "evaluation-test.json", "evaluation-val-hed0.05.json",
        "evaluation-val.json", "metrics.jsonl"]
    assert measured.count("| lightnetcell (seed 2, split seed 3) |") == 2
    assert main(["table", "--records", str(records / "run"), *args]) == 0  # no checkpoints, no data
    assert capsys.readouterr().out == measured
    assert main(["table", "--records", str(records / "run"), "--split", "train"]) == 2
    assert "has no evaluation-train.json" in capsys.readouterr().err


def test_evaluate_every_image_of_a_folder_and_predict(workdir, tmp_path, capsys):
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    files = []
    for name in ("Benign", "Pro"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            path = root / name / f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(path)
            files.append(str(path))
    out = str(tmp_path / "folder.json")
    assert main(["evaluate", "--workdir", workdir, "--data", str(root), "--out", out]) == 0
    assert json.load(open(out))["num_examples"] == 6
    capsys.readouterr()
    assert main(["predict", "--workdir", workdir, *files[:2]]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["file"] for line in lines] == files[:2]
    for line in lines:
        assert line["class"] in line["probabilities"]
        assert sum(line["probabilities"].values()) == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "nope", "--workdir", "{tmp}/w"], "unknown model 'nope'"),
    (["train", "--data", "{tmp}/missing", "--workdir", "{tmp}/w"], "missing"),
    (["evaluate", "--workdir", "{tmp}"], "not a jaxcell workdir"),
    (["evaluate", "--workdir", "{workdir}", "--model", "brin"], "holds a 'lightnetcell' model"),
    (["predict", "--workdir", "{workdir}", "{tmp}/none.jpg"], "none.jpg"),
    (["train", "--model-arg", "depth=3", "--workdir", "{tmp}/w"], "takes no argument depth"),
])
def test_user_errors_are_one_clear_line(argv, message, workdir, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, workdir=workdir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flag, value, message", [
    ("--crop-scale", "0", "must be an area fraction in (0, 1], got 0"),
    ("--crop-scale", "1.5", "must be an area fraction in (0, 1], got 1.5"),
    ("--hue-jitter", "-0.1", "must be a number >= 0, got -0.1"),
    ("--input-pipeline", "disk", "invalid choice: 'disk'"),
    ("--seed", "-1", "must be an integer >= 0, got -1"),
    ("--split-seed", "-2", "must be an integer >= 0, got -2"),
])
def test_bad_augmentation_and_pipeline_flags_are_refused(flag, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", flag, value, "--workdir", str(tmp_path / "w")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_a_corrupt_image_is_named_not_dropped(workdir, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(good)  # grayscale: converted, not refused
    assert main(["predict", "--workdir", workdir, str(good), str(bad)]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert main(["predict", "--workdir", workdir, str(good)]) == 0


def test_a_closed_pipe_ends_the_command_quietly():
    """`jaxcell recipes | head -1`: the reader closes the pipe before the command writes; the
    command stops with SIGPIPE's status and no traceback."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "jaxcell.cli", "recipes"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    child.stdout.close()  # long before the command has imported its modules and printed
    _, err = child.communicate(timeout=120)
    assert child.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
