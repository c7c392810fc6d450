"""Throughput of a training step and of inference: jaxcell (JAX) against its torch_ref twin,
PyTorch eager and torch.compile, in one run on one machine.

    jaxcell bench --model resnet18 --image-size 224 --batch-size 64 --precision bf16 --json out.json
    rows = run(BenchConfig(model="lightnetcell", image_size=64, batch_size=32))["results"]

Both frameworks compute the same function on the same data (docs/benchmarks.md, "Method"): the torch
twin's random weights converted to flax with parity.convert.torch_to_flax, one batch of random
uint8 images and labels, normalized inside the step by each framework's own code; a training
step is softmax cross-entropy and Adam (lr 1e-3, optax's defaults = torch's) with BatchNorm in
train mode, jaxcell's real train step (jaxcell.train.compile_steps) against the usual torch loop
(zero_grad, backward, step). Inference is the forward pass in eval mode. Precision "bf16":
JAX casts parameters and inputs to bfloat16 for the pass (float32 master weights, Adam and BN
statistics), torch runs under torch.autocast(bfloat16). "fp32": float32 with TF32 tensor-core
math allowed in both on GPUs (JAX's default; torch is set to match).

Timing: `warmup` steps (the first one compiles and is reported as compile_s), then `steps`
steps, each synchronized (block_until_ready / torch.cuda.synchronize); the median counts. On
CPU the runners are interleaved step by step, so that a busy machine slows all of them alike;
on a GPU they run one after another (torch first), each releasing its memory before the next.

FLOPs: the forward pass per image from XLA's cost analysis (jaxcell.summary); a training step
counts 3x that (forward, and a backward of twice the forward). MFU divides the achieved rate
by the chip's dense peak (PEAK_TFLOPS; none for CPUs). Device counts above 1 are JAX only
(data parallel over a Mesh, the per-device batch fixed): weak scaling.

Frameworks: "jax", "torch", "torch-compile", "jax-baseline": jaxcell's step without its CPU
adaptations (XLA's default compiler options and convolutions, the max-pool gradient XLA derives
itself), and "jax-eigen": with them but XLA's own (Eigen) convolutions instead of oneDNN's
(jaxcell.onednn): the kernels XLA and CPU_FORMS of jaxcell.kernels, for before/after comparisons
(docs/benchmarks.md); on GPUs both are the same as
"jax". "onnx" and "onnx-int8" (fp32 inference, CPU): the twin exported as `jaxcell export
--format onnx` writes it (preprocessing inside, uint8 in), run by onnxruntime in float and
statically quantized (calibrated on the benchmark's own images: timing, not accuracy). A runner that fails (torch.compile without a working C++ compiler, out of memory) is
recorded with its error; the others go on.

Input pipeline (run_pipeline, `jaxcell bench --pipeline`): the trainer's step fed by the
on-device pipeline and by the host prefetch thread, against the same step on a batch already on
the device; JAX only.

Needs jax, flax, optax, torch and numpy; nothing here imports a data package. Importing this
module changes nothing in the process: `command` (`jaxcell bench`) sets OMP_WAIT_POLICY, and `run`
sets torch's threads and GPU flags for its measurements and restores them after.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import numpy as np

from jaxcell import _malloc
from jaxcell.host import cpus

FRAMEWORKS = ("jax", "torch", "torch-compile", "jax-baseline", "jax-eigen", "onnx", "onnx-int8")
MODES = ("train", "infer")
PRECISIONS = ("fp32", "bf16")
TRAIN_FLOPS_FACTOR = 3  # forward + backward (input and weight gradients, each about one forward)

# Dense (no sparsity) peak TFLOP/s by device name; fp32 means TF32 tensor-core math, which both
# frameworks use for float32 convolutions and matmuls on these chips. First match wins.
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    (("h200", "nvl"), {"bf16": 835.0, "fp32": 418.0}),
    (("h200",), {"bf16": 989.4, "fp32": 494.7}),
    (("h100", "nvl"), {"bf16": 835.0, "fp32": 418.0}),
    (("h100", "pcie"), {"bf16": 756.0, "fp32": 378.0}),
    (("h100",), {"bf16": 989.4, "fp32": 494.7}),
    (("a100",), {"bf16": 312.0, "fp32": 156.0}),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    name = device_name.lower()
    for keys, peaks in PEAK_TFLOPS:
        if all(k in name for k in keys):
            return peaks.get(precision)
    return None


@dataclasses.dataclass
class BenchConfig:
    model: str
    image_size: int = 224
    batch_size: int = 32                    # per device
    frameworks: Sequence[str] = ("jax", "torch", "torch-compile")
    modes: Sequence[str] = MODES
    precisions: Sequence[str] = ("fp32",)
    steps: int = 10
    warmup: int = 2
    devices: Sequence[int] = (1,)           # JAX device counts; counts above those present are left out
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    od_center: bool = False                 # the preprocessing of a run trained with --od-center, in every runner
    seed: int = 0
    lr: float = 1e-3
    interleave: bool | None = None          # None: on CPU yes, on a GPU no
    deadline: float | None = None           # time.time() after which no runner starts (recorded as skipped)
    require_gpu: bool = False               # refuse to measure when JAX or torch is not on a GPU
    partial_json: str | None = None         # rewritten after every runner, so a killed process keeps its results


@dataclasses.dataclass
class _Runner:
    framework: str
    mode: str
    precision: str
    devices: int
    batch_size: int
    build: Callable[[], tuple[Callable[[], None], Callable[[], None]]]  # -> (one synced step, release)
    device_name: str = ""
    step: Callable[[], None] | None = None
    release: Callable[[], None] | None = None
    times: list = dataclasses.field(default_factory=list)
    compile_s: float | None = None
    error: str | None = None

    def start(self, warmup: int) -> None:
        try:
            self.step, self.release = self.build()
            t = time.perf_counter()
            self.step()
            self.compile_s = time.perf_counter() - t
            for _ in range(max(warmup - 1, 0)):
                self.step()
        except Exception as exc:  # noqa: BLE001  (recorded; the other runners go on)
            self.fail(exc)

    def time_one(self) -> None:
        if self.error is not None:
            return
        try:
            t = time.perf_counter()
            self.step()
            self.times.append(time.perf_counter() - t)
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}".strip()
        self.error = text if len(text) <= 600 else text[:600] + " ..."
        self.close()

    def close(self) -> None:
        if self.release is not None:
            self.release()
        self.step = self.release = None


# ---------------------------------------------------------------------------------------------

def cpu_name() -> str:
    name = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({cpus()} threads)"


def _short(kind: str) -> str:
    return kind if kind.lower() != "cpu" else cpu_name()


def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Measure every (precision, framework, mode, device count) of `cfg`: {"results", "environment"}."""
    import jax
    import torch

    from jaxcell import models
    from jaxcell.errors import UserError

    models.spec(cfg.model)  # unknown names: a UserError listing the known ones
    for what, given, known in (("framework", cfg.frameworks, FRAMEWORKS), ("mode", cfg.modes, MODES),
                               ("precision", cfg.precisions, PRECISIONS)):
        bad = [g for g in given if g not in known]
        if bad:
            raise UserError(f"unknown {what} {bad[0]!r}; choose from {', '.join(known)}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise UserError("--steps and --batch-size must be positive")

    on_gpu = torch.cuda.is_available()
    if cfg.require_gpu:
        require_gpu(jax.devices()[0].platform, on_gpu)
    with _torch_settings(on_gpu):
        return _run(cfg, log, on_gpu)


@contextlib.contextmanager
def _torch_settings(on_gpu: bool):
    """torch set up as JAX runs, for the measurements; its own settings back after."""
    import torch

    saved = (torch.get_num_threads(), torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    try:
        if not on_gpu:
            torch.set_num_threads(cpus())  # XLA uses every core it is given; so does torch
        else:
            torch.backends.cudnn.benchmark = True   # XLA autotunes its kernels too
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        yield
    finally:
        torch.set_num_threads(saved[0])
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved[1:]


def _run(cfg: BenchConfig, log: Callable[[str], None], on_gpu: bool) -> dict:
    import jax
    import torch

    from jaxcell import kernels
    from jaxcell.summary import summarize

    jax_platform = jax.devices()[0].platform
    interleave = cfg.interleave if cfg.interleave is not None else jax_platform == "cpu" and not on_gpu
    counts = sorted({d for d in cfg.devices if 1 <= d <= jax.device_count()})
    left_out = sorted(set(cfg.devices) - set(counts))
    if left_out:
        log(f"bench: device counts {left_out} left out: {jax.device_count()} JAX device(s) present")
    flops = summarize(cfg.model, cfg.image_size, **cfg.model_kwargs)["flops_per_image"]
    load_before = _load()

    runners: list[_Runner] = []
    for precision in cfg.precisions:
        setup = _Setup(cfg, precision, max(counts or [1]))
        for mode in cfg.modes:
            for fw in cfg.frameworks:
                if fw.startswith("jax"):
                    for d in counts:
                        runners.append(_Runner(fw, mode, precision, d, cfg.batch_size * d,
                                               setup.jax_builder(fw, mode, d),
                                               device_name=_short(jax.devices()[0].device_kind)))
                elif fw.startswith("onnx"):
                    runners.append(_Runner(fw, mode, precision, 1, cfg.batch_size, setup.onnx_builder(fw, mode),
                                           device_name=cpu_name()))
                else:
                    runners.append(_Runner(fw, mode, precision, 1, cfg.batch_size, setup.torch_builder(fw, mode),
                                           device_name=torch.cuda.get_device_name() if on_gpu else cpu_name()))
    if not interleave:  # torch first: its cached memory is released before JAX's allocator grows
        runners.sort(key=lambda r: (r.precision, r.framework.startswith("jax")))

    _execute(runners, cfg, interleave, log, _partial_writer(cfg, runners, flops))
    results = [_row(cfg, r, flops) for r in runners]
    _add_ratios(results)
    env = {
        "jax": jax.__version__, "torch": torch.__version__, "jax_platform": jax_platform,
        "jax_devices": jax.device_count(), "torch_device": "cuda" if on_gpu else "cpu",
        "torch_threads": torch.get_num_threads(), "interleaved": interleave,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "xla_compiler_options": _jax_options_used(),
        # the "jax" rows' on one device at fp32; "jax-eigen" and splits: XLA
        "convolutions": kernels.convolutions(kernels.for_devices(jax.devices()[:1])),
        # jaxcell's glibc settings (jaxcell._malloc) are process-wide: torch in this process has them too
        "malloc_keeps_freed_memory": _malloc.applied,
        "load_average_before": load_before,
        "load_average_after": _load(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return {"results": results, "environment": env}


def require_gpu(jax_platform: str, torch_cuda: bool | None) -> None:
    """UserError unless both JAX and torch compute on a GPU. JAX falls back to the CPU silently
    (no CUDA plugin installed, or a cuDNN that torch loaded first and JAX's cannot live beside)."""
    from jaxcell.errors import UserError

    problems = []
    if jax_platform != "gpu":
        problems.append(f"JAX runs on {jax_platform}, not a GPU (is jax[cuda12] installed, and does its cuDNN "
                        f"load beside torch's?)")
    if torch_cuda is False:  # None: torch is not measured
        problems.append("torch sees no CUDA device (a CPU build of torch?)")
    if problems:
        raise UserError("; ".join(problems) + "; pass --allow-cpu to measure on the CPU anyway")


def _partial_writer(cfg: BenchConfig, runners: list[_Runner], flops: float) -> Callable[[], None]:
    def write_partial() -> None:
        if cfg.partial_json:
            done = [_row(cfg, r, flops) for r in runners if r.times or r.error]
            write({"results": done, "environment": {"partial": True}}, cfg.partial_json, None)
    return write_partial


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _execute(runners: list[_Runner], cfg: BenchConfig, interleave: bool, log: Callable[[str], None],
             finished: Callable[[], None] = lambda: None) -> None:
    """Warm up and time every runner: step by step in turn (interleave), or one after another;
    finished() after each runner is done (all at once when interleaved)."""
    def expired() -> bool:
        return cfg.deadline is not None and time.time() > cfg.deadline

    started = []
    for r in runners:
        if expired():
            r.error = "skipped: time budget spent"
            continue
        log(f"bench: {cfg.model} {r.framework} {r.mode} {r.precision} x{r.devices}"
            + (": compiling" if interleave else ""))
        r.start(cfg.warmup)
        started.append(r)
        if not interleave:  # timed alone, then released before the next one starts
            for _ in range(cfg.steps):
                r.time_one()
            r.close()
            finished()
    if interleave:  # all warm, then one step of each in turn
        for _ in range(cfg.steps):
            for r in started:
                r.time_one()
        for r in started:
            r.close()
        finished()


def _jax_options_used():
    import jax

    from jaxcell import train

    return train.compiler_options(train.Placement.over(jax.devices()[:1]))


def _row(cfg: BenchConfig, r: _Runner, flops: float) -> dict:
    row = {"framework": r.framework, "model": cfg.model, "mode": r.mode, "image_size": cfg.image_size,
           "batch_size": r.batch_size, "per_device_batch": cfg.batch_size, "precision": r.precision,
           "devices": r.devices, "images_per_s": None, "step_ms_median": None, "step_ms_min": None,
           "steps": len(r.times), "flops_per_image": flops,
           "flops_factor": TRAIN_FLOPS_FACTOR if r.mode.startswith("train") else 1,
           "achieved_tflops": None, "peak_tflops": peak_tflops(r.device_name, r.precision), "mfu": None,
           "device_name": r.device_name, "compile_s": r.compile_s, "error": r.error,
           "model_kwargs": cfg.model_kwargs, "od_center": cfg.od_center}
    if r.error is None and r.times:
        median = statistics.median(r.times)
        ips = r.batch_size / median
        achieved = ips * flops * row["flops_factor"] / 1e12
        row.update(images_per_s=ips, step_ms_median=median * 1e3, step_ms_min=min(r.times) * 1e3,
                   achieved_tflops=achieved)
        if row["peak_tflops"]:
            row["mfu"] = achieved / row["peak_tflops"] / r.devices
    return row


def _add_ratios(rows: list[dict]) -> None:
    """Per row: images/s over torch eager's and torch.compile's (same mode and precision, one
    device), and for JAX at several devices the weak-scaling efficiency against one device."""
    def find(like, fw):
        key = lambda r: (r["model"], r["image_size"], r["per_device_batch"], r["mode"], r["precision"])  # noqa: E731
        return next((r for r in rows if key(r) == key(like) and r["framework"] == fw and r["devices"] == 1
                     and r["images_per_s"]), None)

    for r in rows:
        for key, fw in (("vs_torch", "torch"), ("vs_torch_compile", "torch-compile")):
            base = find(r, fw)
            r[key] = r["images_per_s"] / base["images_per_s"] if r["images_per_s"] and base else None
        one = find(r, r["framework"]) if r["framework"].startswith("jax") else None
        r["scaling_efficiency"] = (r["images_per_s"] / (r["devices"] * one["images_per_s"])
                                   if one and r["images_per_s"] else None)


# ---------------------------------------------------------------------------------------------
# The input pipeline's cost (jaxcell.pipeline): the trainer's step fed three ways.

PIPELINE_MODES = {"train-pipeline-none": None, "train-pipeline-device": "device", "train-pipeline-host": "host"}
PIPELINE_BATCHES = 8  # the synthetic training split holds this many global batches


def run_pipeline(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """jaxcell's real train step (the trainer's default augmentation in the jit) fed (a) by the
    on-device pipeline (indices sent, the batch gathered in the step), (b) by the host prefetch
    thread (batches gathered in host memory and sent ahead), and (c) with one batch already on
    the device, given again every step ("train-pipeline-none"). Rows as run()'s, JAX only, plus
    `vs_on_device`: step time over (c)'s, the pipeline's cost as a factor (1.0: free).

    The runners go one after another, never interleaved: a prefetch thread working during
    another runner's steps would hide its own cost and slow the other's.
    """
    import jax
    import optax

    from jaxcell import models, pipeline, train
    from jaxcell.errors import UserError
    from jaxcell.summary import summarize

    models.spec(cfg.model)
    bad = [p for p in cfg.precisions if p not in PRECISIONS]
    if bad:
        raise UserError(f"unknown precision {bad[0]!r}; choose from {', '.join(PRECISIONS)}")
    if cfg.require_gpu:
        require_gpu(jax.devices()[0].platform, None)
    counts = sorted({d for d in cfg.devices if 1 <= d <= jax.device_count()})
    flops = summarize(cfg.model, cfg.image_size, **cfg.model_kwargs)["flops_per_image"]
    load_before = _load()
    kw = dict(num_classes=4, image_size=cfg.image_size, **cfg.model_kwargs)
    device_name = _short(jax.devices()[0].device_kind)
    augment = train.augmentation(train.TrainConfig())

    splits: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def split(batch: int) -> tuple[np.ndarray, np.ndarray]:
        if batch not in splits:
            rng = np.random.default_rng(cfg.seed)
            images = rng.integers(0, 256, (batch * PIPELINE_BATCHES, cfg.image_size, cfg.image_size, 3), np.uint8)
            splits[batch] = images, rng.integers(0, kw["num_classes"], len(images)).astype(np.int32)
        return splits[batch]

    model = models.create(cfg.model, **kw)
    steps: dict[tuple, Callable] = {}  # "none" and "host" run one program: compiled once
    inits: dict[int, Callable] = {}

    def builder(feed_mode: str | None, precision: str, devices: int):
        def build():
            placement = train.Placement.over(jax.devices()[:devices])
            batch = cfg.batch_size * devices
            images, labels = split(batch)
            if devices not in inits:  # compiled once per device count, for every runner that starts afresh
                inits[devices] = jax.jit(lambda r: train.init_state(model, optax.adam(cfg.lr), cfg.image_size, r),
                                         out_shardings=placement.replicated)
            state = inits[devices](train.init_key(cfg.seed))
            program = (precision, devices, feed_mode == "device")
            indices = lambda k: train.batch_indices(cfg.seed, k, len(labels), batch)  # noqa: E731
            feed = None
            if feed_mode == "device":
                feed = pipeline.DeviceFeed(placement, images, labels, indices)
            elif feed_mode == "host":
                feed = pipeline.HostFeed(placement, images, labels, indices, range(2**62))
            else:
                fixed = (placement.put_batch({"image": images[indices(0)], "label": labels[indices(0)]}),)
            inputs = feed.inputs if feed is not None else lambda k: fixed
            key = jax.random.key(cfg.seed)
            holder, counter = [state], [1]
            try:
                first = inputs(0)  # compiled ahead of the first step, on batch 0
                if program not in steps:
                    step, _ = train.compile_steps(placement, _preprocessing(cfg), augment,
                                                  precision, gather=program[2])
                    steps[program] = step.lower(state, *first, key).compile()
                step = steps[program]
            except BaseException:
                if feed is not None:
                    feed.close()
                raise

            def one():
                holder[0], metrics = step(holder[0], *inputs(counter[0]), key)
                counter[0] += 1
                jax.block_until_ready((holder[0], metrics))

            def release():
                holder.clear()
                if feed is not None:
                    feed.close()

            return one, release

        return build

    runners = [_Runner("jax", mode, precision, d, cfg.batch_size * d, builder(feed_mode, precision, d),
                       device_name=device_name)
               for precision in cfg.precisions for d in counts for mode, feed_mode in PIPELINE_MODES.items()]
    _execute(runners, cfg, interleave=False, log=log, finished=_partial_writer(cfg, runners, flops))
    results = [_row(cfg, r, flops) for r in runners]
    _add_ratios(results)
    for r in results:
        base = next((b for b in results if b["mode"] == "train-pipeline-none" and b["precision"] == r["precision"]
                     and b["devices"] == r["devices"] and b["step_ms_median"]), None)
        r["vs_on_device"] = r["step_ms_median"] / base["step_ms_median"] if base and r["step_ms_median"] else None
    env = {"jax": jax.__version__, "jax_platform": jax.devices()[0].platform, "jax_devices": jax.device_count(),
           "interleaved": False, "augmentation": augment, "dataset_batches": PIPELINE_BATCHES,
           "xla_compiler_options": _jax_options_used(), "load_average_before": load_before,
           "load_average_after": _load(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return {"results": results, "environment": env}


class _Setup:
    """What every runner of one precision shares: the weights (torch init, converted) and the data."""

    def __init__(self, cfg: BenchConfig, precision: str, max_devices: int):
        import torch

        import torch_ref
        from parity.convert import torch_to_flax

        self.cfg, self.precision = cfg, precision
        kw = dict(num_classes=4, image_size=cfg.image_size, **cfg.model_kwargs)
        self.kw = kw
        torch.manual_seed(cfg.seed)
        self.torch_model = torch_ref.create(cfg.model, **kw).eval()
        variables = torch_to_flax(cfg.model, self.torch_model.state_dict(), **kw)
        self.variables = {k: _to_numpy(v) for k, v in variables.items()}  # fresh device copies per runner
        rng = np.random.default_rng(cfg.seed)
        n = cfg.batch_size * max_devices
        self.images = rng.integers(0, 256, (n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
        self.labels = rng.integers(0, kw["num_classes"], (n,)).astype(np.int32)

    # --- JAX -------------------------------------------------------------------------------

    def jax_builder(self, framework: str, mode: str, devices: int):
        def build():
            import jax
            import optax

            from jaxcell import kernels, models, train

            cfg, precision = self.cfg, self.precision
            placement = train.Placement.over(jax.devices()[:devices])
            model = models.create(cfg.model, **self.kw)
            pre = _preprocessing(cfg)
            baseline = framework == "jax-baseline"
            options = None if baseline else train.compiler_options(placement)
            choice = _kernels(framework, placement)
            n = cfg.batch_size * devices
            images = placement.put_batch(self.images[:n])
            if mode == "train":
                rep, bat = placement.replicated, placement.batch
                if not baseline:
                    step, _ = train.compile_steps(placement, pre, None, precision, choice=choice)
                else:
                    step = jax.jit(train.make_train_step(pre, None, precision), in_shardings=(rep, bat, rep),
                                   out_shardings=(rep, rep), donate_argnums=0)
                tx = optax.adam(cfg.lr)  # plain Adam, as torch's; jaxcell train adds a schedule
                state = train.TrainState.create(apply_fn=model.apply, params=self.variables["params"], tx=tx,
                                                batch_stats=self.variables.get("batch_stats", {}))
                holder = [jax.device_put(state, rep)]
                batch = {"image": images, "label": placement.put_batch(self.labels[:n])}
                key = jax.random.key(cfg.seed)
                step = step.lower(holder[0], batch, key).compile()  # here, ahead of the first step

                def one():
                    holder[0], metrics = step(holder[0], batch, key)
                    jax.block_until_ready((holder[0], metrics))
            else:
                forward = kernels.jit(_jax_infer(model, pre, precision), choice,
                                      in_shardings=(placement.replicated, placement.batch), compiler_options=options)
                holder = [jax.device_put(self.variables, placement.replicated)]
                forward = forward.lower(holder[0], images).compile()

                def one():
                    jax.block_until_ready(forward(holder[0], images))

            def release():
                holder.clear()

            return one, release

        return build

    # --- torch -----------------------------------------------------------------------------

    def torch_builder(self, framework: str, mode: str):
        def build():
            import torch
            import torch.nn.functional as F

            from torch_ref.preprocessing import standardize

            cfg = self.cfg
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            # channels_last on GPUs: cuDNN's fast (tensor-core) convolutions take NHWC, as XLA's do
            layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
            model = copy.deepcopy(self.torch_model).to(device, memory_format=layout)
            net = torch.compile(model) if framework == "torch-compile" else model
            pre = _preprocessing(cfg)
            images = (torch.from_numpy(self.images[:cfg.batch_size]).to(device).permute(0, 3, 1, 2)
                      .contiguous(memory_format=layout))
            labels = torch.from_numpy(self.labels[:cfg.batch_size]).long().to(device)
            bf16 = self.precision == "bf16"
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

            def prepare():
                return standardize(images.float() / 255.0, pre)

            if mode == "train":
                model.train()
                opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)

                def one():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        logits = net(prepare())
                    loss = F.cross_entropy(logits.float(), labels)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sync()
            else:
                model.eval()

                def one():
                    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        net(prepare())
                    sync()

            def release():
                nonlocal model, net
                model = net = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()

            return one, release

        return build


    # --- onnxruntime ------------------------------------------------------------------------

    def onnx_builder(self, framework: str, mode: str):
        def build():
            import tempfile

            from jaxcell import edge
            from parity.onnx_export import quantize_int8, write_onnx

            if mode != "infer" or self.precision != "fp32":
                raise ValueError(f"{framework} measures fp32 inference only")
            folder = tempfile.TemporaryDirectory()
            path = os.path.join(folder.name, "model.onnx")
            pre = _preprocessing(self.cfg)
            write_onnx(copy.deepcopy(self.torch_model), pre, path)
            if framework == "onnx-int8":
                quantize_int8(path, path + ".int8", self.images)
                path += ".int8"
            # as the edge runner makes it, but with sleeping threads, as torch's here (see command())
            session = edge.session(path, spin=False)
            images = np.ascontiguousarray(self.images[:self.cfg.batch_size])

            def one():
                session.run(["probabilities"], {"images": images})

            return one, folder.cleanup

        return build


def _kernels(framework: str, placement):
    """The kernels (jaxcell.kernels) a JAX framework's programs are compiled with: "jax" the
    trainer's; "jax-baseline" XLA's; "jax-eigen" the trainer's without oneDNN's convolutions."""
    from jaxcell import kernels

    choice = kernels.for_devices(placement.mesh.devices.flat)
    if framework == "jax-baseline":
        return kernels.Kernels.XLA
    if framework == "jax-eigen" and choice is kernels.Kernels.ONEDNN:
        return kernels.Kernels.CPU_FORMS
    return choice


def _to_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)


def _preprocessing(cfg: BenchConfig) -> dict:
    """The input preprocessing every runner applies inside its timed step: the model's own, with
    optical-density centring when the config asks for it."""
    from jaxcell import models

    return models.preprocessing(cfg.model, cfg.image_size, cfg.od_center)


def _jax_infer(model, preprocessing: dict, precision: str):
    from jaxcell import train

    compute = train.COMPUTE_DTYPES[precision]

    def infer(variables, images):
        params = train.compute_params(variables["params"], variables.get("batch_stats", {}), compute)
        v = {**variables, "params": params}
        return model.apply(v, train.prepare(images, preprocessing).astype(compute), train=False)

    return infer


# ---------------------------------------------------------------------------------------------
# Reports.

def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def markdown(report: dict) -> str:
    rows = report["results"]
    if not rows:
        return ""
    r0 = rows[0]
    devices = sorted({r["device_name"] for r in rows})
    lines = [f"### {r0['model']}, {r0['image_size']} px, batch {r0['per_device_batch']} per device",
             "", f"Device: {'; '.join(devices)}.", "",
             "| framework | mode | precision | devices | batch | images/s | step ms (median) | GFLOP/image "
             "| TFLOP/s | MFU | x torch | x torch.compile |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['framework']} | {r['mode']} | {r['precision']} | {r['devices']} | {r['batch_size']} "
                         f"| error: {r['error'].splitlines()[0][:120]} | | | | | | |")
            continue
        gflop = r["flops_per_image"] * r["flops_factor"] / 1e9
        lines.append(
            f"| {r['framework']} | {r['mode']} | {r['precision']} | {r['devices']} | {r['batch_size']} "
            f"| {r['images_per_s']:.1f} | {r['step_ms_median']:.1f} | {gflop:.3f} "
            f"| {_fmt(r['achieved_tflops'], '.3f')} | {_fmt(r['mfu'], '.1%')} "
            f"| {_fmt(r['vs_torch'], '.2f')} | {_fmt(r['vs_torch_compile'], '.2f')} |")
    lines += ["", f"GFLOP/image: forward from XLA's cost analysis, x{TRAIN_FLOPS_FACTOR} for a training step. "
              "x torch: images/s over torch eager's in the same mode and precision."]
    return "\n".join(lines + _pipeline_lines(rows)) + "\n"


def _pipeline_lines(rows: list[dict]) -> list[str]:
    """The run_pipeline ratios as a small table (nothing for other reports)."""
    rows = [r for r in rows if r.get("vs_on_device") and r["mode"] != "train-pipeline-none"]
    if not rows:
        return []
    lines = ["", "Input pipeline: step time over the same step on a batch already on the device.", "",
             "| model | precision | devices | batch | pipeline | step ms | x on-device step |",
             "|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {r['devices']} | {r['batch_size']} "
                     f"| {r['mode'].rsplit('-', 1)[1]} | {r['step_ms_median']:.1f} | {r['vs_on_device']:.3f} |")
    return lines


def merge(reports: list[dict]) -> dict:
    """Several reports (one per model and pass) as one, the ratios recomputed across them."""
    rows = [dict(r) for rep in reports for r in rep["results"]]
    _add_ratios(rows)
    return {"results": rows, "environment": reports[0]["environment"] if reports else {}}


def summary_markdown(rows: list[dict]) -> str:
    """One table for many models: the rows with a result, then the failures and skips."""
    lines = ["| model | precision | mode | framework | devices | batch | images/s | step ms | TFLOP/s | MFU "
             "| x torch | x torch.compile |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = lambda r: (r["model"], r["precision"], r["mode"], FRAMEWORKS.index(r["framework"]), r["devices"])  # noqa: E731
    failed = []
    for r in sorted(rows, key=order):
        if r["error"]:
            failed.append(f"- {r['model']} {r['precision']} {r['mode']} {r['framework']} x{r['devices']}: "
                          f"{r['error'].splitlines()[0][:200]}")
            continue
        lines.append(f"| {r['model']} | {r['precision']} | {r['mode']} | {r['framework']} | {r['devices']} "
                     f"| {r['batch_size']} | {r['images_per_s']:.1f} | {r['step_ms_median']:.1f} "
                     f"| {_fmt(r['achieved_tflops'], '.2f')} | {_fmt(r['mfu'], '.1%')} "
                     f"| {_fmt(r['vs_torch'], '.2f')} | {_fmt(r['vs_torch_compile'], '.2f')} |")
    devices = sorted({r["device_name"] for r in rows})
    text = f"Devices: {'; '.join(devices)}.\n\n" + "\n".join(lines + _pipeline_lines(rows)) + "\n"
    return text + ("\nNot measured:\n\n" + "\n".join(failed) + "\n" if failed else "")


def write(report: dict, json_path: str | None, markdown_path: str | None) -> None:
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    if markdown_path:
        os.makedirs(os.path.dirname(os.path.abspath(markdown_path)), exist_ok=True)
        with open(markdown_path, "w") as f:
            f.write(markdown(report))


QUICK = {"image_size": 32, "batch_size": 4, "steps": 2, "warmup": 1, "frameworks": ("jax", "torch")}
FULL = {"image_size": 224, "batch_size": 32, "steps": 10, "warmup": 2, "frameworks": ("jax", "torch", "torch-compile")}


def config_from_args(args) -> BenchConfig:
    """`jaxcell bench` arguments -> BenchConfig; --quick changes the defaults, not what is given."""
    base = QUICK if args.quick else FULL
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else base[name]  # noqa: E731
    return BenchConfig(
        model=args.model, image_size=pick("image_size"), batch_size=pick("batch_size"),
        frameworks=tuple(pick("frameworks")), modes=tuple(args.modes), precisions=tuple(args.precision),
        steps=pick("steps"), warmup=pick("warmup"), devices=tuple(args.devices),
        model_kwargs=dict(args.model_arg), od_center=getattr(args, "od_center", False), seed=args.seed,
        deadline=args.deadline,
        require_gpu=getattr(args, "require_gpu", False), partial_json=args.json)


def command(args) -> int:
    # PyTorch's OpenMP threads spin after each parallel region by default. On a CPU shared with
    # XLA's thread pool (or anything else) the spinning threads take the cores from whoever works
    # next: a small torch step measured 25x slower with JAX in the same process, 6x slower on a
    # machine busy with other processes. Sleeping threads measure what each framework computes.
    # Set before `run` imports torch (the CLI imports none before); an explicit OMP_WAIT_POLICY
    # in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cfg = config_from_args(args)
    measure = run_pipeline if getattr(args, "pipeline", False) else run
    report = measure(cfg, log=lambda m: print(m, flush=True))
    write(report, args.json, args.markdown)
    print(markdown(report))
    return 0
