"""Checkpoints for either framework: jaxcell export / import, torch_ref.load / preprocess, and the
refusal of hostile or broken files."""

import glob
import json
import os
import pickle
import re
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import tiny
import torch_ref
from jaxcell import data
from jaxcell.checkpoint import Checkpoints
from jaxcell.cli import main
from jaxcell.errors import UserError
from jaxcell.export import export_workdir, import_torch
from jaxcell.train import TrainConfig, read_config, restore_for_inference, train
from torch_ref.io import WeightsError, read_state_dict, sidecar_path

TINY = tiny.LIGHTNETCELL
SIZE = 32


@pytest.fixture(scope="module")
def smears():
    return data.load(None, image_size=SIZE, seed=2, synthetic_examples=48)


@pytest.fixture(scope="module")
def workdir(smears, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "run")
    config = TrainConfig(model="lightnetcell", model_kwargs=TINY, image_size=SIZE, epochs=2, batch_size=8,
                         lr=3e-3, seed=1)
    train(config, smears, path, progress=False)
    return path


def variables_of(workdir, which="best"):
    state, *_ = restore_for_inference(workdir, which)
    return jax.device_get({"params": state.params, "batch_stats": state.batch_stats}), int(state.step)


def assert_same_bits(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def png_folder(root, sizes=((40, 36), (32, 32), (17, 50))):
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate(sizes):
        path = root / f"cell{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(path)
        files.append(str(path))
    return files


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_loads_strictly_in_torch_and_imports_back_to_the_same_bits(workdir, tmp_path, suffix):
    out = str(tmp_path / f"model{suffix}")
    weights, sidecar = export_workdir(workdir, out)
    assert (weights, sidecar) == (out, out + ".json")
    meta = json.load(open(sidecar))
    record = read_config(workdir)
    for key in ("model", "model_kwargs", "class_names", "preprocessing"):
        assert meta[key] == record[key]
    assert meta["jaxcell_version"] and meta["preprocessing"]["image_size"] == SIZE
    assert meta["source"]["convolutions"] == record["convolutions"]  # what trained the weights

    sd = read_state_dict(out)
    model = torch_ref.create("lightnetcell", num_classes=4, image_size=SIZE, **TINY)
    model.load_state_dict(sd, strict=True)
    original, step = variables_of(workdir)
    assert int(sd["block1.bn.num_batches_tracked"]) == step  # torch's counter, one per train step
    np.testing.assert_array_equal(sd["block2.bn.running_var"].numpy(), original["batch_stats"]["block2"]["bn"]["var"])

    imported = str(tmp_path / "imported")
    assert main(["import", "--torch", out, "--workdir", imported]) == 0
    again, _ = variables_of(imported)
    assert_same_bits(again, original)
    assert read_config(imported)["class_names"] == record["class_names"]


def test_export_last_and_by_step_and_refusals(workdir, tmp_path, capsys):
    last = str(tmp_path / "last.safetensors")
    assert main(["export", "--workdir", workdir, "--out", last, "--checkpoint", "last"]) == 0
    assert json.load(open(last + ".json"))["source"]["checkpoint"] == "last"
    assert main(["export", "--workdir", workdir, "--out", str(tmp_path / "m.bin.gz")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert main(["export", "--workdir", str(tmp_path / "nothing"), "--out", last]) == 2
    assert "not a jaxcell workdir" in capsys.readouterr().err


def test_torch_logits_match_jaxcell_predict_on_real_images(workdir, dev_data, tmp_path, capsys):
    files = sorted(glob.glob(os.path.join(dev_data, "*", "*")))
    files = [f for f in files if f.lower().endswith((".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"))]
    files = files[::max(1, len(files) // 12)][:12]  # a spread over the classes
    out = str(tmp_path / "model.safetensors")
    export_workdir(workdir, out)
    model = torch_ref.load(out)
    assert not model.training and model.class_names == ["Benign", "Early", "Pre", "Pro"]

    capsys.readouterr()
    assert main(["predict", "--workdir", workdir, *files]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    want = np.array([[line["probabilities"][n] for n in model.class_names] for line in lines])
    with torch.no_grad():
        got = model(torch_ref.preprocess(files, model)).softmax(-1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)  # predict prints 6 decimals
    assert [model.class_names[i] for i in got.argmax(-1)] == [line["class"] for line in lines]


def test_preprocess_is_jaxcells_input(tmp_path):
    import jax.numpy as jnp

    from jaxcell import models
    from jaxcell.data.images import load_images
    from jaxcell.train import prepare

    files = png_folder(tmp_path)
    pre = {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "image_size": 24}
    want = np.asarray(prepare(jnp.asarray(load_images(files, 24)), pre)).transpose(0, 3, 1, 2)
    got = torch_ref.preprocess(files, pre).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    centred = models.preprocessing("resnet18", 24, od_center=True)  # what --od-center records
    want = np.asarray(prepare(jnp.asarray(load_images(files, 24)), centred)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(torch_ref.preprocess(files, centred).numpy(), want, rtol=0, atol=2e-6)
    # uint8 arrays of another size are resized as the decoder resizes them
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    for f, a in zip(files, arrays):
        np.testing.assert_array_equal(torch_ref.preprocess(a, pre).numpy(), torch_ref.preprocess(f, pre).numpy())
    assert torch_ref.preprocess(np.zeros((2, 24, 24, 3), np.uint8), pre).shape == (2, 3, 24, 24)
    with pytest.raises(WeightsError, match="uint8 images"):
        torch_ref.preprocess(np.zeros((2, 24, 24, 3), np.float32), pre)
    with pytest.raises(UserError, match="image file not found"):
        torch_ref.preprocess([str(tmp_path / "missing.png")], pre)


def test_torch_ref_loads_and_preprocesses_without_jax(workdir, tmp_path):
    out = str(tmp_path / "model.safetensors")
    export_workdir(workdir, out)
    files = png_folder(tmp_path)
    code = (
        "import sys, torch, torch_ref\n"
        f"m = torch_ref.load({out!r})\n"
        f"x = torch_ref.preprocess({files!r}, m)\n"
        "print(m(x).shape)\n"
        "bad = sorted(k for k in sys.modules if k == 'jax' or k.startswith(('jax.', 'flax', 'optax', 'orbax')))\n"
        "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([3, 4])" in result.stdout


def test_import_without_sidecar(tmp_path, capsys):
    model = torch_ref.create("lightnetcell", num_classes=3, image_size=SIZE, **TINY)
    path = str(tmp_path / "plain.pth")
    torch.save(model.state_dict(), path)
    work = str(tmp_path / "w")
    assert main(["import", "--torch", path, "--workdir", work]) == 2
    assert "pass --model" in capsys.readouterr().err
    args = ["import", "--torch", path, "--workdir", work, "--model", "lightnetcell", "--image-size", str(SIZE),
            "--model-arg", "widths=(8,16,16)", "--model-arg", "hidden=16"]
    assert main(args) == 0
    record = read_config(work)
    assert record["model_kwargs"]["num_classes"] == 3 and record["class_names"] == ["class0", "class1", "class2"]
    assert record["preprocessing"]["image_size"] == SIZE
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err
    files = png_folder(tmp_path)
    capsys.readouterr()
    assert main(["predict", "--workdir", work, files[0]]) == 0
    line = json.loads(capsys.readouterr().out)
    assert set(line["probabilities"]) == {"class0", "class1", "class2"}
    # wrong model arguments: the converter names the key that does not fit
    assert main([*args[:-4], "--overwrite"]) == 2
    assert "block1.conv.weight" in capsys.readouterr().err


def test_an_imported_checkpoint_resumes_training(workdir, smears, tmp_path):
    out = str(tmp_path / "model.safetensors")
    export_workdir(workdir, out)
    imported = str(tmp_path / "imported")
    import_torch(out, imported)
    start, _ = variables_of(imported, "last")
    config = TrainConfig(model="lightnetcell", model_kwargs=TINY, image_size=SIZE, epochs=1, batch_size=8, seed=4)
    result = train(config, smears, imported, resume=True, progress=False)
    assert int(result.state.step) == len(smears.splits["train"][1]) // 8
    moved = jax.device_get(result.state.params)
    assert not np.array_equal(moved["fc2"]["kernel"], start["params"]["fc2"]["kernel"])
    checkpoints = Checkpoints(os.path.join(imported, "checkpoints"), read_only=True)
    assert checkpoints.latest_step() == int(result.state.step)
    checkpoints.close()


# ----------------------------------------------------------------------------- hostile and broken files

class Payload:
    """Unpickling this creates a file: the kind of side effect a hostile .pt carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_file(path, marker):
    torch.save({"fc2.weight": torch.zeros(4, 16), "fc2.bias": Payload(marker)}, path)


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, capsys):
    marker = str(tmp_path / "pwned")
    evil = str(tmp_path / "evil.pt")
    hostile_file(evil, marker)
    # the payload is real: a plain unpickling would run it
    proof = str(tmp_path / "proof")
    hostile_file(str(tmp_path / "proof.pt"), proof)
    torch.load(str(tmp_path / "proof.pt"), weights_only=False)
    assert os.path.exists(proof)

    with pytest.raises(WeightsError, match="refused, nothing in it was run"):
        read_state_dict(evil)
    json.dump({"model": "lightnetcell", "model_kwargs": {"num_classes": 4, "image_size": SIZE, **TINY},
               "class_names": ["a", "b", "c", "d"], "preprocessing": {"mean": [0] * 3, "std": [1] * 3,
                                                                      "image_size": SIZE}},
              open(sidecar_path(evil), "w"))
    with pytest.raises(WeightsError, match="refused"):
        torch_ref.load(evil)
    assert main(["import", "--torch", evil, "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused" in err and "Traceback" not in err
    assert not os.path.exists(marker)
    assert not os.path.exists(tmp_path / "w" / "config.json")


def _safetensors_bytes(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


@pytest.mark.parametrize("name, content", [
    ("truncated.pt", "truncated"),
    ("random.pt", np.random.default_rng(1).bytes(4096)),
    ("empty.pt", b""),
    ("random.safetensors", np.random.default_rng(2).bytes(4096)),
    ("huge-header.safetensors", struct.pack("<Q", 2**60) + b"{}"),
    ("bad-json.safetensors", struct.pack("<Q", 9) + b"{not json"),
    ("bad-offsets.safetensors", _safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, b"\0" * 16)),
    ("list.pt", "list"),
    ("not-tensors.pt", "not-tensors"),
])
def test_broken_files_get_a_clear_refusal(tmp_path, name, content, capsys):
    path = str(tmp_path / name)
    if content == "truncated":
        torch.save(torch_ref.create("lightnetcell", image_size=SIZE, **TINY).state_dict(), path)
        blob = open(path, "rb").read()
        content = blob[:len(blob) // 2]
    elif content == "list":
        torch.save([torch.zeros(2)], path)
    elif content == "not-tensors":
        torch.save({"fc.weight": [1, 2, 3]}, path)
    if isinstance(content, bytes):
        open(path, "wb").write(content)
    with pytest.raises(WeightsError, match=re.escape(path)):
        read_state_dict(path)
    assert main(["import", "--torch", path, "--model", "lightnetcell", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxcell import: error: ") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "w")


def test_weights_that_do_not_fit_the_sidecar_are_refused(workdir, tmp_path):
    out = str(tmp_path / "model.safetensors")
    export_workdir(workdir, out)
    meta = json.load(open(out + ".json"))
    meta["model_kwargs"]["hidden"] = 32
    json.dump(meta, open(out + ".json", "w"))
    with pytest.raises(WeightsError, match="does not fit lightnetcell"):
        torch_ref.load(out)
    json.dump({**meta, "class_names": ["x"]}, open(out + ".json", "w"))
    with pytest.raises(WeightsError, match="1 class names for num_classes=4"):
        torch_ref.load(out)
    open(out + ".json", "w").write("{")
    with pytest.raises(WeightsError, match="not valid JSON"):
        torch_ref.load(out)
    # without the sidecar, a safetensors file still carries its metadata in its header
    os.remove(out + ".json")
    assert torch_ref.load(out).class_names == ["Benign", "Early", "Pre", "Pro"]
    with pytest.raises(WeightsError, match="no such file"):
        torch_ref.load(str(tmp_path / "absent.safetensors"))


def test_pickle_module_is_not_used_for_safetensors(tmp_path, monkeypatch):
    path = str(tmp_path / "m.safetensors")
    torch_ref.io.write(path, torch_ref.create("lightnetcell", image_size=SIZE, **TINY).state_dict(),
                       {"model": "lightnetcell", "model_kwargs": {"num_classes": 4, "image_size": SIZE, **TINY},
                        "class_names": ["a", "b", "c", "d"],
                        "preprocessing": {"mean": [0] * 3, "std": [1] * 3, "image_size": SIZE}})

    def refuse(*a, **k):
        raise AssertionError("unpickling a safetensors file")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert torch_ref.load(path).class_names == ["a", "b", "c", "d"]
