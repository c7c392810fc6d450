"""Predict with an exported ONNX model on a small device: onnxruntime, numpy and Pillow only.

    python -m jaxcell.edge model.onnx cell1.jpg cell2.png ...     # one JSON line per image

Prints the lines `jaxcell predict` prints ({"file", "class", "probabilities"}). The images are
decoded and resized as jaxcell decodes them (jaxcell/data/images.py, loaded from its file: the
package jaxcell.data imports jax); the model's preprocessing is inside the graph, which takes
uint8 NHWC pixels. Neither jax nor torch is imported.

Which file: beside model.onnx, `jaxcell export --quantize int8` writes model.int8.onnx. Whether
int8 runs faster than float depends on the CPU and on the model: onnxruntime multiplies int8
natively only with an int8 dot-product extension (VNNI on x86, asimddp on ARM) and widens the
products otherwise, and the quantize/dequantize pairs around the layers that stay float cost
the same everywhere. On one 2-core AVX2 CPU without VNNI, int8 ran the CNN + Transformer hybrid at
0.65-0.7x the float speed and ResNet18 at 1.4x. So `--precision auto` (the
default) times both files on this machine, at the batch size it will run, and takes int8 only
when it is at least 5% faster; the verdict is kept in $JAXCELL_CACHE/edge (keyed by both files'
contents, onnxruntime's version, the CPU and the batch size), and stderr says which file runs
and why.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time

import numpy as np

from jaxcell.host import cpu_flag_set, cpu_flags, cpus

INT8_FLAGS = {"avx512_vnni", "avx_vnni", "asimddp"}


def cpu_int8_dot() -> str | None:
    """The CPU's int8 dot-product extension, or None."""
    found = sorted(INT8_FLAGS & cpu_flag_set())
    return found[0] if found else None


def int8_path(path: str) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}.int8{ext or '.onnx'}"


def session(path: str, threads: int | None = None, spin: bool = True):
    """An onnxruntime CPU session of `path` with `threads` intra-op threads (default: every CPU this
    process may use). onnxruntime's own default counts physical cores as it detects them; on a
    2-CPU virtual machine it ran the hybrid's batch of 32 in 96 ms, as slowly as one thread (105
    ms), against 62 ms with both CPUs named. `spin=False`: its threads sleep between runs instead
    of spinning (the benchmark's setting, where other runners take turns on the same cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or cpus()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def choose_file(path: str, precision: str = "auto", batch: int = 32, threads: int | None = None) -> tuple[str, str]:
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
    ms = measured(path, quantized, batch, threads)
    faster = ms["int8"] <= FASTER * ms["fp32"]
    extension = cpu_int8_dot()
    how = f"the CPU has {extension}" if extension else "the CPU has no int8 dot-product instructions"
    why = (f"timed on this machine at batch {batch}: int8 {ms['int8']:.1f} ms, fp32 {ms['fp32']:.1f} ms "
           f"per batch ({how})")
    return (quantized, why) if faster else (path, why)


FASTER = 0.95  # int8 is taken only when at least 5% faster: fp32 is the exact export


def measured(fp32: str, int8: str, batch: int, threads: int | None = None) -> dict:
    """The fastest of a few runs of each file on random pixels, in ms per batch; cached."""
    import onnxruntime as ort

    from jaxcell import cache_dir

    digest = hashlib.sha256()
    for part in (fp32, int8):
        with open(part, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    digest.update(f"{ort.__version__}\0{cpu_flags()}\0{batch}\0{threads or cpus()}".encode())
    record = cache_dir("edge") / f"{digest.hexdigest()[:24]}.json"
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):  # not timed here yet (or a record cut short): time it
        pass
    # Sleeping threads: a session's spinning pool would take the cores from the other one's turn.
    sessions = {"fp32": session(fp32, threads, spin=False), "int8": session(int8, threads, spin=False)}
    size = sessions["fp32"].get_inputs()[0].shape[1]
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    best = dict.fromkeys(sessions, float("inf"))
    for i in range(6):  # alternating, the first round a warm-up; the minimum resists other load
        for kind, run in sessions.items():
            start = time.perf_counter()
            run.run(["probabilities"], {"images": images})
            if i:
                best[kind] = min(best[kind], 1e3 * (time.perf_counter() - start))
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(best))
    return best


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

    def __init__(self, path: str, precision: str = "auto", threads: int | None = None, batch: int = 32):
        sidecar = path + ".json"
        if not os.path.isfile(path):
            raise SystemExit(f"jaxcell.edge: error: model file not found: {path}")
        if not os.path.isfile(sidecar):
            raise SystemExit(f"jaxcell.edge: error: {path} has no sidecar {sidecar} (jaxcell export writes it)")
        with open(sidecar) as f:
            self.meta = json.load(f)
        self.file, self.why = choose_file(path, precision, batch, threads)
        self.session = session(self.file, threads)
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
    parser.add_argument("--threads", type=int, help="onnxruntime's intra-op threads (default: every CPU this process may use)")
    args = parser.parse_args(argv)
    model = EdgeModel(args.model, args.precision, args.threads, min(max(args.batch_size, 1), len(args.images)))
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
