"""Predict with an exported ONNX model on a small device: onnxruntime, numpy and Pillow only.

    python -m jaxcell.edge model.onnx cell1.jpg cell2.png ...     # one JSON line per image

Prints the lines `jaxcell predict` prints ({"file", "class", "probabilities"}). The images are
decoded and resized as jaxcell decodes them (jaxcell/data/images.py, loaded from its file: the
package jaxcell.data imports jax); the model's preprocessing is inside the graph, which takes
uint8 NHWC pixels. Neither jax nor torch is imported.

Which file: beside model.onnx, `jaxcell export --quantize int8` writes model.int8.onnx. int8 is
faster than float only where the CPU multiplies int8 natively (VNNI on x86: avx512_vnni or
avx_vnni; the dot-product extension on ARM: asimddp); without it onnxruntime widens every int8
product and the float file is faster (on AVX2 alone, about 0.6-0.7x). So `--precision auto`
(the default) takes int8 only on such a CPU, and says on stderr which file it runs and why.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import numpy as np

INT8_FLAGS = {"avx512_vnni", "avx_vnni", "asimddp"}


def cpu_int8_dot() -> str | None:
    """The CPU's int8 dot-product extension named in /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        return None
    found = sorted(INT8_FLAGS & words)
    return found[0] if found else None


def int8_path(path: str) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}.int8{ext or '.onnx'}"


def choose_file(path: str, precision: str = "auto") -> tuple[str, str]:
    """(the file to run, why)."""
    quantized = int8_path(path)
    if precision == "fp32":
        return path, "fp32 asked for"
    if precision == "int8":
        if not os.path.isfile(quantized):
            raise SystemExit(f"jaxcell.edge: error: --precision int8 but {quantized} does not exist "
                             f"(jaxcell export --quantize int8 writes it)")
        return quantized, "int8 asked for"
    if not os.path.isfile(quantized):
        return path, f"no {os.path.basename(quantized)} beside the model"
    flag = cpu_int8_dot()
    if flag:
        return quantized, f"the CPU has {flag}: int8 products run natively"
    return path, "the CPU has no int8 dot-product instructions (VNNI, asimddp): int8 would run slower than fp32"


def _images_module():
    """jaxcell/data/images.py (numpy and PIL), imported from its file so that jaxcell.data's
    __init__, which imports jax, does not run."""
    name = "jaxcell._edge_images"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "images.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


class EdgeModel:
    """An exported model and its sidecar: `predict(uint8 NHWC)` -> probabilities."""

    def __init__(self, path: str, precision: str = "auto", threads: int | None = None):
        import onnxruntime as ort

        sidecar = path + ".json"
        if not os.path.isfile(path):
            raise SystemExit(f"jaxcell.edge: error: model file not found: {path}")
        if not os.path.isfile(sidecar):
            raise SystemExit(f"jaxcell.edge: error: {path} has no sidecar {sidecar} (jaxcell export writes it)")
        with open(sidecar) as f:
            self.meta = json.load(f)
        self.file, self.why = choose_file(path, precision)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(self.file, options, providers=["CPUExecutionProvider"])
        self.size = int(self.meta["input"]["size"])
        self.class_names = list(self.meta["class_names"])

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {"images": np.ascontiguousarray(images, np.uint8)})[0]

    def load(self, paths: list[str]) -> np.ndarray:
        return _images_module().load_images(paths, self.size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxcell.edge", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="model.onnx written by `jaxcell export --format onnx`")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--precision", choices=["auto", "fp32", "int8"], default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, help="onnxruntime's intra-op threads (default: all cores)")
    args = parser.parse_args(argv)
    model = EdgeModel(args.model, args.precision, args.threads)
    print(f"jaxcell.edge: {model.file} ({model.why})", file=sys.stderr)
    errors = _images_module().UserError
    for start in range(0, len(args.images), max(args.batch_size, 1)):
        paths = args.images[start:start + args.batch_size]
        try:
            images = model.load(paths)
        except errors as error:
            print(f"jaxcell.edge: error: {error}", file=sys.stderr)
            return 2
        for path, p in zip(paths, model.predict(images)):
            print(json.dumps({"file": path, "class": model.class_names[int(p.argmax())],
                              "probabilities": {n: round(float(v), 6) for n, v in zip(model.class_names, p)}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
