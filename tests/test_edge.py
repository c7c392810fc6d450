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

import tiny
import torch_ref
from jaxcell.export import default_metadata, import_torch
from parity.compare import randomize_torch_model
from torch_ref import io

ort = pytest.importorskip("onnxruntime")

# Small configurations of every registered model (image size, constructor arguments).
CASES = {
    "lightnetcell": (32, tiny.LIGHTNETCELL),
    "resnet18": (32, {}),
    "hybrid_vit": (32, tiny.HYBRID_VIT),
    "brin": (32, tiny.BRIN),
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
    from parity.onnx_export import export_onnx

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


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """lightnetcell's workdir exported as fp32 and int8 (calibrated on 32 synthetic images)."""
    from parity.onnx_export import export_onnx

    root = str(tmp_path_factory.mktemp("edge"))
    workdir, size = random_workdir("lightnetcell", root)
    out = os.path.join(root, "model.onnx")
    written = export_onnx(workdir, out, quantize="int8", calibration_images=32, log=lambda *_: None)
    return workdir, out, written, size


def png_files(folder, size, n=3):
    rng = np.random.default_rng(9)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"cell{i}.png")
        Image.fromarray(rng.integers(0, 256, (size + 5, size + 3, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_int8_export_is_static_qdq_with_per_channel_weights(exported):
    import onnx

    _, out, written, size = exported
    int8 = written[1]
    assert int8.endswith("model.int8.onnx") and os.path.getsize(int8) < os.path.getsize(out)
    graph = onnx.load(int8).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    weight_scales = [i for i in graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1 and i.dims[0] > 1]
    assert weight_scales  # per-channel: a scale per output channel
    sidecar = json.load(open(out + ".json"))
    assert sidecar["int8"]["calibration_images"] == 32 and sidecar["int8"]["file"] == "model.int8.onnx"
    images = np.random.default_rng(4).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    p8, p32 = onnx_probabilities(int8, images), onnx_probabilities(out, images)
    np.testing.assert_allclose(p8.sum(-1), 1, atol=1e-5)
    assert np.abs(p8 - p32).max() < 0.05  # int8 rounding moves probabilities a little, not a lot


def test_edge_runner_prints_what_predict_prints_without_jax_or_torch(exported, tmp_path):
    workdir, out, _, size = exported
    paths = png_files(str(tmp_path), size)
    code = ("import runpy, sys; sys.argv = ['edge', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('jaxcell.edge', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "leaked = [m for m in ('jax', 'torch', 'flax') if m in sys.modules]\n"
            "assert not leaked, leaked\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run([sys.executable, "-c", code, out, "--precision", "fp32", *paths], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fp32 asked for" in done.stderr
    edge = [json.loads(line) for line in done.stdout.splitlines()]

    predicted = subprocess.run([sys.executable, "-m", "jaxcell.cli", "predict", "--workdir", workdir, *paths],
                               capture_output=True, text=True, env=env, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    ours = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [e["file"] for e in edge] == paths and [e["class"] for e in edge] == [o["class"] for o in ours]
    for e, o in zip(edge, ours):
        assert e.keys() == o.keys()
        for name in o["probabilities"]:
            assert abs(e["probabilities"][name] - o["probabilities"][name]) <= 1e-4


def test_edge_runner_takes_the_file_it_timed_faster_here_and_keeps_the_verdict(exported, monkeypatch, tmp_path):
    from jaxcell import edge

    _, out, _, _ = exported
    monkeypatch.setenv("JAXCELL_CACHE", str(tmp_path))
    # Timed for real on this machine: both files ran, and the choice follows the times.
    path, why = edge.choose_file(out, batch=4)
    ms = edge.measured(out, edge.int8_path(out), 4)  # read back from the cache
    assert set(ms) == {"fp32", "int8"} and 0 < ms["fp32"] < 1e4 and 0 < ms["int8"] < 1e4
    assert path == (edge.int8_path(out) if ms["int8"] <= edge.FASTER * ms["fp32"] else out)
    assert why.startswith(f"timed on this machine at batch 4: int8 {ms['int8']:.1f} ms, fp32 {ms['fp32']:.1f} ms")
    assert len(list((tmp_path / "edge").iterdir())) == 1
    # Each verdict is taken from its times, and fp32 stays unless int8 is clearly faster.
    for times, chosen in [({"fp32": 10.0, "int8": 5.0}, edge.int8_path(out)), ({"fp32": 10.0, "int8": 9.8}, out),
                          ({"fp32": 5.0, "int8": 10.0}, out)]:
        monkeypatch.setattr(edge, "measured", lambda *_, times=times: times)
        assert edge.choose_file(out, batch=4)[0] == chosen
    assert edge.choose_file(out, "fp32") == (out, "fp32 asked for")
    assert edge.choose_file(out, "int8") == (edge.int8_path(out), "int8 asked for")
    with pytest.raises(SystemExit, match="does not exist"):
        edge.choose_file(out + ".missing.onnx", "int8")


def test_the_timing_is_cached_per_batch_size(exported, monkeypatch, tmp_path):
    from jaxcell import edge

    _, out, _, _ = exported
    monkeypatch.setenv("JAXCELL_CACHE", str(tmp_path))
    first = edge.measured(out, edge.int8_path(out), 2)
    assert edge.measured(out, edge.int8_path(out), 2) == first  # read, not timed again
    edge.measured(out, edge.int8_path(out), 3)
    assert len(list((tmp_path / "edge").iterdir())) == 2


def test_compact_names_never_collide_with_kept_ones():
    """quant_pre_process folds constants into weights that keep names like "t3" from an earlier
    compaction; fresh names must avoid them (a duplicate makes the model invalid)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from parity.onnx_export import compact

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2])
    weights = [numpy_helper.from_array(np.full((1, 2), v, np.float32), f"t{v}") for v in (0, 1)]
    nodes = [helper.make_node("Add", ["images", "t0"], ["/long/name/a"]),
             helper.make_node("Mul", ["/long/name/a", "t1"], ["/long/name/b"]),
             helper.make_node("Relu", ["/long/name/b"], ["out"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], weights),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    compacted = compact(model)
    onnx.checker.check_model(compacted)
    outputs = [o for n in compacted.graph.node for o in n.output]
    assert len(set(outputs)) == 3 and not {"t0", "t1"} & set(outputs) and "/long/name/a" not in outputs
    session = ort.InferenceSession(compacted.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": np.ones((1, 2), np.float32)})[0], [[1, 1]])
