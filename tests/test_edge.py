"""ONNX export with the preprocessing inside, int8 quantization, and the edge runner
(onnxruntime, numpy and Pillow only) against jaxcell's own probabilities."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import torch_ref
from jaxcell.export import default_metadata, import_torch
from parity.compare import randomize_torch_model
from torch_ref import io

ort = pytest.importorskip("onnxruntime")

# Small configurations of every registered model (image size, constructor arguments).
CASES = {
    "lightnetcell": (32, dict(widths=(8, 16, 16), hidden=16)),
    "resnet18": (32, {}),
    "hybrid_vit": (32, dict(widths=(8, 8, 8), dim=16, depth=1, heads=2)),
    "brin": (32, dict(preset="small")),
    "densenet121": (32, {}),
}
OD_CENTER = {"hybrid_vit"}  # the all4class-cpu recipe's preprocessing, inside the graph too


def random_workdir(name, root, seed=0):
    """A workdir holding a randomized twin of `name` (imported, as `jaxcell import` makes one)."""
    size, kw = CASES[name]
    torch.manual_seed(seed)
    tmodel = randomize_torch_model(torch_ref.create(name, image_size=size, **kw), seed)
    metadata = default_metadata(name, {**kw, "image_size": size, "num_classes": 4}, 4)
    if name in OD_CENTER:
        metadata["preprocessing"].update(od_center=True, mean=[0.0] * 3, std=[0.25] * 3)
    weights, _ = io.write(os.path.join(root, f"{name}.safetensors"), tmodel.state_dict(), metadata)
    workdir = os.path.join(root, name)
    import_torch(weights, workdir)
    return workdir, size


def jaxcell_probabilities(workdir, images):
    from jaxcell.calibration import softmax
    from jaxcell.train import predict_logits, restore_for_inference

    state, record, eval_step, placement = restore_for_inference(workdir, "best")
    with jax.default_matmul_precision("highest"):
        return softmax(np.asarray(predict_logits(eval_step, state, images, 8, placement), np.float64))


def onnx_probabilities(path, images):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"images": images})[0]


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n == "densenet121" else [])
                                  for n in CASES])
def test_onnx_matches_jaxcell_probabilities(name, tmp_path):
    from jaxcell.onnx_export import export_onnx

    workdir, size = random_workdir(name, str(tmp_path))
    out = str(tmp_path / "model.onnx")
    export_onnx(workdir, out, log=lambda *_: None)
    images = np.random.default_rng(4).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    ours = onnx_probabilities(out, images)
    ref = jaxcell_probabilities(workdir, images)
    assert ours.shape == (3, 4)  # a batch of 3 through a graph traced at 2: the batch axis is dynamic
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    sidecar = json.load(open(out + ".json"))
    assert sidecar["input"] == {"name": "images", "dtype": "uint8", "layout": "NHWC", "size": size}
    assert sidecar["class_names"] == ["Benign", "Early", "Pre", "Pro"] and sidecar["ood"] is None
    assert bool(sidecar["preprocessing"].get("od_center")) == (name in OD_CENTER)
