"""A trained workdir -> an ONNX model that takes pixels, and its int8 version.

    export_onnx("runs/a", "model.onnx")                            # fp32, + model.onnx.json
    export_onnx("runs/a", "model.onnx", quantize="int8", calibration_images=200)   # + model.int8.onnx

The graph is traced from the PyTorch twin (which matches the JAX model layer by layer) with the
model's preprocessing inside: input "images" is uint8 NHWC at the model's size, any batch;
outputs "logits" and "probabilities" (softmax of the logits, no temperature: what `jaxcell
predict` prints). The sidecar FILE.json says what a runner needs without jax or torch: class
names, input size, preprocessing, the calibration temperature of the checkpoint when one was
fitted (`jaxcell evaluate` fits it), and the OOD detector's method and threshold where the workdir
has one (`ood_parameters`; the edge runner does not score it yet).

int8: onnxruntime's static quantization in QDQ form, per-channel int8 weights and uint8
activations, calibrated (min-max) on N training images of the workdir's own split. Only the
matrix products are quantized (Conv, MatMul, Gemm: the attention's included), all but the first
(the stem, which sees the raw input's full range) and the last (the classifier, whose rounding
moves the logits directly): with those two int8 too, the all4class-cpu hybrid lost 0.6 points
of validation accuracy, with them float it stays within 0.3 (docs/explain.md). The preprocessing,
normalisations, softmax and the other element-wise operations stay float, because each int8
round trip there costs accuracy and buys nothing on a CPU. The layers left float are listed in
the sidecar under "float_nodes".
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxcell.errors import UserError

OPSET = 18
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")


def int8_path(path: str) -> str:
    """model.onnx -> model.int8.onnx, where the runner looks for the quantized file."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.int8{ext or '.onnx'}"


def sidecar_path(path: str) -> str:
    return path + ".json"


def pixels_model(model, preprocessing: dict):
    """The torch twin wrapped to take uint8 NHWC pixels and return (logits, probabilities)."""
    import torch

    from torch_ref.preprocessing import standardize

    class Pixels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):
            x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
            logits = self.model(standardize(x, preprocessing))
            return logits, torch.softmax(logits, dim=-1)

    return Pixels().eval()


def write_onnx(model, preprocessing: dict, out: str) -> None:
    """Trace the torch model, wrapped by `pixels_model`, into `out` (batch axis dynamic)."""
    import torch

    size = int(preprocessing["image_size"])
    wrapped = pixels_model(model.eval(), preprocessing)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    # nn.MultiheadAttention's inference fast path is one fused op that ONNX has no export for;
    # off, attention is traced as its matrix products (which int8 then quantizes).
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        torch.onnx.export(wrapped, (example,), out, input_names=["images"],
                          output_names=["logits", "probabilities"], opset_version=OPSET,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"},
                                        "probabilities": {0: "batch"}}, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    import onnx

    onnx.save(compact(onnx.load(out)), out)


def ood_parameters(workdir: str) -> dict | None:
    """The workdir's out-of-distribution detector as the sidecar records it (jaxcell.ood: method,
    threshold, what it was fitted on), or None when the run has none. The ONNX graph outputs only
    the logits, not the feature blocks the detector scores, so the edge runner does not flag
    images yet; `scored_by_edge_runner` says so to whoever reads the sidecar."""
    from jaxcell import ood

    detector = ood.load(workdir)
    return None if detector is None else {**detector.describe(), "scored_by_edge_runner": False}


def export_onnx(workdir: str, out: str, checkpoint: str | int = "best", quantize: str | None = None,
                calibration_images: int = 200, log=print) -> list[str]:
    """Write out (fp32) and, with quantize="int8", its int8 twin; the sidecar beside out. The
    paths written."""
    import jax

    import parity
    import torch_ref
    from jaxcell import calibration
    from jaxcell.train import restore_for_inference

    if quantize not in (None, "int8"):
        raise UserError(f"--quantize must be int8, not {quantize!r}")
    if calibration_images < 1:
        raise UserError(f"--calibration-images must be at least 1, got {calibration_images}")
    state, record, _, _ = restore_for_inference(workdir, checkpoint)
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    tmodel = torch_ref.create(record["model"], **record["model_kwargs"])
    tmodel.load_state_dict(parity.flax_to_torch(record["model"], variables, **record["model_kwargs"]))
    pre = record["preprocessing"]
    size = int(pre["image_size"])
    write_onnx(tmodel, pre, out)
    written = [out]
    entry = calibration.read_temperature(workdir, int(state.step), False)
    sidecar = {
        "format": "jaxcell-onnx", "model": record["model"], "model_kwargs": record["model_kwargs"],
        "class_names": record["class_names"], "input": {"name": "images", "dtype": "uint8", "layout": "NHWC",
                                                        "size": size},
        "preprocessing": pre, "outputs": ["logits", "probabilities"], "opset": OPSET,
        "temperature": None if entry is None else entry.get("temperature"),
        "ood": ood_parameters(workdir),
        "source": {"workdir": os.path.abspath(workdir), "checkpoint": str(checkpoint), "step": int(state.step)},
    }
    if quantize == "int8":
        from jaxcell import data as datasets

        t = record["train"]
        data = datasets.load(t["data"], size, seed=datasets.split_seed(t), synthetic_examples=t["synthetic_examples"])
        images = data.splits["train"][0][:calibration_images]
        target = int8_path(out)
        float_nodes = quantize_int8(out, target, images)
        written.append(target)
        sidecar["int8"] = {"file": os.path.basename(target), "calibration_images": int(len(images)),
                           "quantized_ops": list(QUANTIZED_OPS), "float_nodes": float_nodes}
        log(f"int8: {os.path.getsize(target) / os.path.getsize(out):.2f}x the size of fp32, "
            f"{len(float_nodes)} compute nodes left float")
    with open(sidecar_path(out), "w") as f:
        json.dump(sidecar, f, indent=2)
    written.append(sidecar_path(out))
    return written


class _Images:
    """onnxruntime's CalibrationDataReader over uint8 images, a few at a time."""

    def __init__(self, images: np.ndarray, batch: int = 16):
        self.batches = iter([images[i:i + batch] for i in range(0, len(images), batch)])

    def get_next(self):
        chunk = next(self.batches, None)
        return None if chunk is None else {"images": np.ascontiguousarray(chunk, np.uint8)}


def quantize_int8(source: str, target: str, images: np.ndarray) -> list[str]:
    """Static QDQ quantization of `source` into `target`, calibrated on `images` (uint8 NHWC).
    Returns the names of the nodes left float (every node that is not a quantized op)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        inferred = os.path.join(tmp, "inferred.onnx")
        quant_pre_process(source, inferred, skip_symbolic_shape=True)  # shapes + constant folding
        products = [n.name for n in onnx.load(inferred).graph.node if n.op_type in QUANTIZED_OPS]
        quantize_static(inferred, target, _Images(images), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=list(QUANTIZED_OPS), calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=[products[0], products[-1]] if len(products) > 2 else [])
    model = onnx.load(target)
    float_nodes = _float_nodes(model.graph)
    onnx.save(compact(model), target)
    return float_nodes


def compact(model):
    """Drop what a runtime does not need, in either file: the shapes of intermediate tensors
    (value_info: onnxruntime infers them on loading) and the exporter's long tensor names
    ("/model/encoder.0/attn/MatMul_output_0_quantized"), about 10% of an int8 file. Nodes keep
    their names (which say which layer they are); so do the graph's inputs, outputs and weights."""
    graph = model.graph
    del graph.value_info[:]
    keep = {v.name for v in (*graph.input, *graph.output)} | {i.name for i in graph.initializer} | {""}
    taken = keep | {name for node in graph.node for name in (*node.input, *node.output)}
    fresh = (f"t{k}" for k in range(10 ** 9) if f"t{k}" not in taken)  # never an existing name
    names: dict[str, str] = {}
    for node in graph.node:
        for field in (node.input, node.output):
            for j, name in enumerate(field):
                if name not in keep:
                    if name not in names:
                        names[name] = next(fresh)
                    field[j] = names[name]
    return model


def _float_nodes(graph) -> list[str]:
    """The compute nodes a QDQ graph leaves float: every node but the quantized ops and the
    ones that only move, reshape or cast data."""
    skip = {"QuantizeLinear", "DequantizeLinear", "Constant", "Shape", "Gather", "Unsqueeze", "Concat",
            "Reshape", "Transpose", "Flatten", "Squeeze", "Cast"}
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [f"{n.op_type} {n.name}" for n in graph.node if n.op_type not in skip and
            (n.op_type not in QUANTIZED_OPS or not dequantized & set(n.input))]
