"""Training: a pure, jitted train step and eval step, and the loop around them.

    state, metrics = train_step(state, batch, rng)      # pure; jitted once
    logits = eval_step(state, images)

The batch reaches the step through jaxcell.pipeline: by default the training split stays on the
devices and the step gathers its batch there from indices (make_gather_step), or a thread
prefetches batches from host memory; the batches, and so the results, are the same.

The batch is sharded over a Mesh of all devices on its "data" axis and the state is replicated,
so BatchNorm sees the global batch (synchronized statistics) and 1 or N devices compute the same
numbers for the same global batch. Data order and every random number derive from (seed, step):
a resumed run continues exactly where the interrupted one stopped.
"""

import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcell import kernels, models, pipeline
from jaxcell.checkpoint import Checkpoints
from jaxcell.data import Dataset
from jaxcell.data.augment import augment as augment_images
from jaxcell.errors import UserError
from jaxcell.export import torch_variables  # torch is imported only when it is called
from jaxcell.preprocessing import normalize, od_center
from jaxcell.settings import TrainConfig  # defined once there, with its flags

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


class TrainState(train_state.TrainState):
    batch_stats: Any = None


# ---------------------------------------------------------------------------------------------
# The pure parts.

def learning_rate(config: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then cosine decay to 1% ("cosine") or constant ("constant").

    Warm-up matters: Adam's first steps move every weight by about lr whatever its gradient, and
    a dense layer on flattened features (LightNetCell's fc1 has 16,384 inputs at 64 px) then
    shifts its outputs by lr * fan_in: at 1e-3 the loss jumped from 1.9 to 30 in one step.
    """
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, total_steps // 10)
    warmup = min(warmup, total_steps)
    if config.schedule == "constant":
        return optax.linear_schedule(0.0, config.lr, warmup) if warmup else optax.constant_schedule(config.lr)
    if config.schedule != "cosine":
        raise UserError(f"unknown learning-rate schedule {config.schedule!r}; use cosine or constant")
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(total_steps, warmup + 1),
                                              end_value=config.lr * 0.01)


def make_optimizer(config: TrainConfig, total_steps: int = 1, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """Adam on a schedule, for the model's head and, separately, its backbone: the backbone's
    rate is scaled (fine-tuning) and zero while it is frozen (--freeze-backbone, or the first
    --head-epochs). The state's structure depends on neither the run's length nor the freezing,
    so a restore target can be built from the config alone."""
    head_lr = learning_rate(config, total_steps)
    frozen = total_steps if config.freeze_backbone else min(config.head_epochs * steps_per_epoch, total_steps)
    scale = config.backbone_lr_scale if config.backbone_lr_scale is not None else (0.1 if config.init_from else 1.0)
    after = learning_rate(config, max(total_steps - frozen, 1))
    backbone_lr = optax.join_schedules([optax.constant_schedule(0.0), lambda n: scale * after(n)], [frozen])
    head = models.spec(config.model).head
    labels = lambda params: {k: jax.tree.map(lambda _: "head" if k == head else "backbone", v)  # noqa: E731
                             for k, v in params.items()}
    return optax.multi_transform({"head": optax.adam(head_lr), "backbone": optax.adam(backbone_lr)}, labels)


def load_pretrained(config: TrainConfig, state: "TrainState", num_classes: int, log: Callable[[str], None]):
    """Start from a torch state dict (torchvision's own files included): every tensor that fits
    is taken; the head, trained for other classes, keeps its fresh initialization."""
    loaded = torch_variables(config.init_from, config.model, image_size=config.image_size, **config.model_kwargs)
    fresh = {"params": state.params, "batch_stats": state.batch_stats}
    kept = []

    def take(path, new, old):
        if new.shape == old.shape:
            return jnp.asarray(new, old.dtype)
        kept.append(jax.tree_util.keystr(path))
        return old

    merged = jax.tree_util.tree_map_with_path(take, {k: loaded.get(k, {}) for k in fresh}, fresh)
    head = models.spec(config.model).head
    if any(head not in k for k in kept):
        raise UserError(f"{config.init_from} does not fit {config.model}: {', '.join(kept)}")
    log(f"initialized from {config.init_from}" + (f"; {head} re-initialized for {num_classes} classes" if kept else ""))
    return state.replace(params=merged["params"], batch_stats=merged["batch_stats"])


def init_state(model, tx, image_size: int, rng: jax.Array, sharding=None) -> TrainState:
    """The initial TrainState, built by one compiled program (placed with `sharding` when given): op by
    op, every layer's initializers would compile programs of their own."""
    def build(rng):
        variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
        return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                                 batch_stats=variables.get("batch_stats", {}))

    return (jax.jit(build) if sharding is None else jax.jit(build, out_shardings=sharding))(rng)


def init_key(seed: int) -> jax.Array:
    """The key for parameter initialization. XLA compiles threefry's many per-parameter draws
    slowly on CPU (30 s for BRIN's init against 12 s with RBG), and init runs once, replicated,
    so the faster generator costs nothing; dropout and augmentation keep threefry, whose bits do
    not depend on how the batch is sharded."""
    return jax.random.key(seed, impl="rbg")


def abstract_state(model, tx, image_size: int, sharding) -> TrainState:
    """The TrainState's shapes and dtypes with `sharding`, without computing anything (a restore target)."""
    shapes = jax.eval_shape(lambda: init_state(model, tx, image_size, init_key(0)))
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)


def prepare(images: jax.Array, preprocessing: dict) -> jax.Array:
    """uint8 NHWC -> the model's float input, as the model declares it."""
    if preprocessing.get("od_center"):
        return standardize(images.astype(jnp.float32) / 255.0, preprocessing)
    return normalize(images, preprocessing["mean"], preprocessing["std"])  # a lookup table: torch's exact values


def standardize(x: jax.Array, preprocessing: dict) -> jax.Array:
    """Float images in [0, 1] -> the model's input (the second half of `prepare`)."""
    if preprocessing.get("od_center"):
        x = od_center(x)
    return (x - jnp.asarray(preprocessing["mean"], jnp.float32)) / jnp.asarray(preprocessing["std"], jnp.float32)


# "fp64" only under jax.enable_x64 (parity.training's float64 mode); the trainer offers fp32 and bf16.
COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp64": jnp.float64}


def cast_floats(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def compute_params(params, batch_stats, dtype):
    """params cast to the compute dtype, except BatchNorm's scale and bias (the modules that keep
    batch_stats): they stay float32, as the statistics they are applied with do, and BatchNorm
    computes in float32 whatever its input's dtype (models.layers.BatchNorm)."""
    if dtype == jnp.float32:
        return params
    norms = {tuple(k.key for k in path[:-1]) for path, _ in jax.tree_util.tree_flatten_with_path(batch_stats)[0]}

    def cast(path, a):
        if tuple(k.key for k in path[:-1]) in norms or not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return a.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def make_train_step(preprocessing: dict, augment: dict | None = None, precision: str = "fp32") -> Callable:
    """augment: keyword arguments of jaxcell.data.augment.augment, or None for no augmentation.

    precision "bf16": parameters and inputs are cast to bfloat16 for the forward and backward
    pass only, so the float32 master parameters and Adam state take float32 updates; the flax
    layers then compute in bfloat16, BatchNorm keeps float32 statistics, scale and bias
    (compute_params), the loss is float32.
    """
    compute = COMPUTE_DTYPES[precision]

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        aug_rng, dropout_rng = jax.random.split(rng)
        if augment is None:
            x = prepare(batch["image"], preprocessing)
        else:
            x = standardize(augment_images(batch["image"].astype(jnp.float32) / 255.0, aug_rng, **augment),
                            preprocessing)

        def loss_fn(params):
            logits, updates = state.apply_fn({"params": compute_params(params, state.batch_stats, compute),
                                              "batch_stats": state.batch_stats},
                                             x.astype(compute), train=True, rngs={"dropout": dropout_rng},
                                             mutable=["batch_stats"])
            logits = logits.astype(jnp.promote_types(compute, jnp.float32))  # float32 loss, float64 in fp64
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            return loss, (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.isfinite(p).all() for p in jax.tree.leaves(state.params)]))
        return state, {"loss": loss, "accuracy": accuracy, "grad_norm": optax.global_norm(grads), "finite": finite}

    return train_step


def make_gather_step(train_step: Callable, batch_sharding) -> Callable:
    """train_step fed from device-resident data: (state, data, index, rng), where data holds the
    whole training split ({"image", "label"}, replicated) and index the batch's positions in it
    (sharded like a batch). The gathered batch is laid out as a host-fed one would be, then the
    same step body runs."""

    def gather_step(state: TrainState, data: dict, index: jax.Array, rng: jax.Array):
        batch = jax.lax.with_sharding_constraint(jax.tree.map(lambda a: a[index], data), batch_sharding)
        return train_step(state, batch, rng)

    return gather_step


def make_eval_step(preprocessing: dict) -> Callable:
    def eval_step(state: TrainState, images: jax.Array) -> jax.Array:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        return state.apply_fn(variables, prepare(images, preprocessing), train=False)

    return eval_step


# ---------------------------------------------------------------------------------------------
# Devices.

@dataclasses.dataclass(frozen=True)
class Placement:
    """A 1-D mesh over the devices of every process: batches split on "data", the rest replicated.

    Devices are ordered by process, so each process's devices hold one contiguous block of
    every global batch, and a process only transfers its own block.
    """

    mesh: Mesh

    @classmethod
    def over(cls, devices: Sequence[jax.Device] | None = None) -> "Placement":
        devices = list(devices) if devices is not None else jax.devices()
        devices.sort(key=lambda d: (d.process_index, d.id))
        return cls(Mesh(np.array(devices), ("data",)))

    @property
    def size(self) -> int:
        return self.mesh.size

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def put_batch(self, tree):
        """Place a global batch (host arrays, the same on every process) split over "data"."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.batch)
        n = len(jax.tree.leaves(tree)[0])
        return self.put_local(jax.tree.map(lambda a: a[self.local_rows(n)], tree), n)

    @staticmethod
    def local_rows(n: int) -> slice:
        """This process's block of a global batch of n rows (np.array_split's): a process that
        gathers only these rows (pipeline.HostFeed) reads and copies 1/process_count of the batch."""
        count, index = jax.process_count(), jax.process_index()
        size, extra = divmod(n, count)
        start = index * size + min(index, extra)
        return slice(start, start + size + (index < extra))

    def put_local(self, tree, n: int):
        """Place this process's block (local_rows(n)) of a global batch of n rows."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.batch)
        return jax.tree.map(lambda a: jax.make_array_from_process_local_data(self.batch, a, (n, *a.shape[1:])), tree)


def local(x: jax.Array) -> np.ndarray:
    """The value of a replicated array, read from this process's first copy (works across hosts)."""
    return np.asarray(x.addressable_data(0))


def is_main_process() -> bool:
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def augmentation(config: TrainConfig) -> dict | None:
    if not config.augment:
        return None
    return {"stain": config.stain_jitter, "color": config.color_jitter, "crop": config.crop_scale,
            "hue": config.hue_jitter}


# XLA:CPU (jax 0.10) hands convolutions, large dots and reductions to YNNPACK. Its convolution
# weight gradient (a convolution whose window is the whole feature map) runs about 5x slower there
# than in XLA's Eigen convolution, which is as fast as PyTorch's oneDNN; forward and input gradient
# are at par either way. So on CPU convolutions go to Eigen; dots and reductions stay with YNNPACK
# (the rest of XLA's default list). The same function, another kernel library (docs/benchmarks.md).
# An XLA:CPU option: other platforms get none.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                                                                "LIBRARY_FUSION_TYPE_REDUCE"}
_cpu_options_ok: dict[str, bool] = {}


def compiler_options(placement: Placement) -> dict | None:
    """XLA options for steps jitted over `placement`: CPU_COMPILER_OPTIONS on CPU, if this XLA knows them."""
    device = placement.mesh.devices.flat[0]
    if device.platform != "cpu":
        return None
    if "ok" not in _cpu_options_ok:  # a jaxlib without the option refuses it: keep its defaults
        probe = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
        try:
            jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(probe).compile()
            _cpu_options_ok["ok"] = True
        except Exception:  # noqa: BLE001  (XlaRuntimeError: INVALID_ARGUMENT, unknown option or value)
            _cpu_options_ok["ok"] = False
    return dict(CPU_COMPILER_OPTIONS) if _cpu_options_ok["ok"] else None


def compile_steps(placement: Placement, preprocessing: dict, augment: dict | None = None, precision: str = "fp32",
                  gather: bool = False, choice: kernels.Kernels | None = None):
    """(train_step, eval_step), jitted over `placement` with the kernels of `choice` (jaxcell.kernels;
    None: kernels.for_devices, the fastest for the placement). gather: the train step takes
    (state, data, index, rng) (make_gather_step, for pipeline.DeviceFeed) instead of (state, batch, rng)."""
    rep, bat = placement.replicated, placement.batch
    options = compiler_options(placement)
    if choice is None:
        choice = kernels.for_devices(placement.mesh.devices.flat)
    step = make_train_step(preprocessing, augment, precision)
    if gather:
        train_step = kernels.jit(make_gather_step(step, bat), choice, in_shardings=(rep, rep, bat, rep),
                                 out_shardings=(rep, rep), donate_argnums=0, compiler_options=options)
    else:
        train_step = kernels.jit(step, choice, in_shardings=(rep, bat, rep), out_shardings=(rep, rep),
                                 donate_argnums=0, compiler_options=options)
    # Logits come back replicated, so every process can read all of them (they are small).
    eval_step = kernels.jit(make_eval_step(preprocessing), choice, in_shardings=(rep, bat), out_shardings=rep,
                            compiler_options=options)
    return train_step, eval_step


def predict_logits(eval_step: Callable, state: TrainState, images: np.ndarray, batch_size: int,
                   placement: Placement) -> np.ndarray:
    """Logits for every image; the last batch is padded to a whole number of device shards."""
    batch_size = max(placement.size, batch_size - batch_size % placement.size)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        n = len(chunk)
        if n % placement.size:
            pad = placement.size - n % placement.size
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(local(eval_step(state, placement.put_batch(chunk)))[:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------------------------------------
# Data order: a function of (seed, epoch), so a resumed run sees the same batches.

@functools.lru_cache(maxsize=4)  # every step of an epoch asks (batch_indices); a permutation of a large split costs ms
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False  # shared by the cache
    return order


def step_rng(seed: int, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), step)


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """The positions in the training split (n images) of the batch of `step`: the epoch's
    permutation, taken in order a batch at a time (a last partial batch is left out), sorted."""
    epoch, i = divmod(step, n // batch_size)
    return np.sort(epoch_order(seed, epoch, n)[i * batch_size:(i + 1) * batch_size])


# ---------------------------------------------------------------------------------------------
# Workdir: config.json (everything evaluate/predict need), metrics.jsonl, checkpoints/.

def write_config(workdir: str, config: TrainConfig, dataset: Dataset, choice: kernels.Kernels) -> dict:
    """config.json; "kernels" records the run's `choice` (jaxcell.kernels), "convolutions" what its
    steps convolve with."""
    record = {
        "model": config.model,
        "model_kwargs": {"num_classes": len(dataset.class_names), "image_size": config.image_size,
                         **config.model_kwargs},
        "class_names": list(dataset.class_names),
        "preprocessing": models.preprocessing(config.model, config.image_size, config.od_center),
        "data": {"source": dataset.source, "split_note": dataset.split_note,
                 "sizes": {k: int(len(v[1])) for k, v in dataset.splits.items()}},
        "train": config.to_dict(),
        "hardware": hardware(),
        "convolutions": kernels.convolutions(choice, config.precision),
        "kernels": choice.value,
    }
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        json.dump(record, f, indent=2)
    return record


def hardware() -> str:
    """What this run trains on, for reports: "1 x NVIDIA H100 80GB HBM3", "CPU: AMD EPYC ... (2 cores)"."""
    devices = jax.devices()
    if devices[0].platform != "cpu":
        return f"{len(devices)} x {devices[0].device_kind}" + (f" on {jax.process_count()} hosts"
                                                                 if jax.process_count() > 1 else "")
    name = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} cores)"


def read_config(workdir: str) -> dict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{workdir} is not a jaxcell workdir (no {CONFIG_FILE}); train into it first")
    with open(path) as f:
        return json.load(f)


def prepare_workdir(workdir: str, config: TrainConfig, resume: bool, overwrite: bool) -> None:
    exists = os.path.isfile(os.path.join(workdir, CONFIG_FILE))
    if resume:
        if not exists:
            raise UserError(f"--resume: {workdir} holds no run to resume")
        previous = read_config(workdir)
        if previous["model"] != config.model:
            raise UserError(f"--resume: {workdir} holds a run of model {previous['model']!r}, "
                            f"not {config.model!r}")
        return
    if exists and not overwrite:
        raise UserError(f"{workdir} already holds a run; pass --resume to continue it "
                        f"or --overwrite to start again")
    if exists and overwrite:
        shutil.rmtree(workdir)
    os.makedirs(workdir, exist_ok=True)


# ---------------------------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class TrainResult:
    state: TrainState
    history: list[dict]
    seconds: float
    interrupted: bool = False   # stopped by SIGTERM/SIGINT after checkpointing; resume with --resume


class Diverged(UserError):
    """The loss or the gradients stopped being finite."""


class _StopSignals:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (main thread only)."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


LOG_EVERY = 50  # steps between reads of the step metrics (train's log_every)


def _no_totals() -> dict:
    f32, i32 = np.float32(0), np.int32(0)
    return {"loss": f32, "accuracy": f32, "steps": i32, "first_bad": np.int32(-1), "bad_loss": f32,
            "bad_grad_norm": f32, "bad_finite": np.bool_(True)}


def _accumulate(totals: dict, metrics: dict, step: int) -> dict:
    """totals after one more step's metrics, on the device; the first step whose loss, gradient
    norm or parameters were not finite is kept with its figures, for the error message."""
    bad = ~(metrics["finite"] & jnp.isfinite(metrics["grad_norm"]))
    first = bad & (totals["first_bad"] < 0)
    keep = lambda new, old: jnp.where(first, new, old)  # noqa: E731
    return {"loss": totals["loss"] + metrics["loss"], "accuracy": totals["accuracy"] + metrics["accuracy"],
            "steps": totals["steps"] + 1, "first_bad": keep(step, totals["first_bad"]),
            "bad_loss": keep(metrics["loss"], totals["bad_loss"]),
            "bad_grad_norm": keep(metrics["grad_norm"], totals["bad_grad_norm"]),
            "bad_finite": keep(metrics["finite"], totals["bad_finite"])}


STOP_POLL_STEPS = 5  # multi-process: how often (in steps) the processes agree on whether to stop


class _StopDecision:
    """Whether to stop after a step, the same answer in every process.

    A scheduler's signal reaches the processes of a job at different steps; a process that
    stopped alone would wait in the checkpoint's barrier while the others wait in the next
    step's all-reduce, for ever. So with several processes the flags are all-gathered every
    STOP_POLL_STEPS steps and at the end of every epoch (steps every process reaches), and all
    stop at the first of those after any one was signalled. One process stops after the step
    it is in.
    """

    def __init__(self, signals: _StopSignals):
        self.signals = signals
        self.stopped = False
        self.signalled: dict[int, int] = {}  # process index -> signal number, once stopped

    def __call__(self, step: int, epoch_end: bool) -> bool:
        if jax.process_count() == 1:
            if self.signals.received is not None:
                self.stopped, self.signalled = True, {0: self.signals.received}
            return self.stopped
        if step % STOP_POLL_STEPS and not epoch_end:
            return False
        from jax.experimental import multihost_utils

        flags = np.asarray(multihost_utils.process_allgather(np.int32(self.signals.received or 0))).reshape(-1)
        self.signalled = {i: int(f) for i, f in enumerate(flags) if f}
        self.stopped = bool(self.signalled)
        return self.stopped


def train(config: TrainConfig, dataset: Dataset, workdir: str, *, devices=None, resume: bool = False,
          overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = print,
          log_every: int = LOG_EVERY) -> TrainResult:
    """log_every: the step metrics (loss, accuracy, finiteness) are summed on the device and read
    every log_every steps, at each checkpoint and at the end of each epoch: the steps between
    are dispatched without waiting for the device. A step that was not finite stops the run at
    the next read (Diverged), before any checkpoint could hold it."""
    config.check()
    if log_every < 1:
        raise UserError(f"--log-every must be at least 1, got {log_every}")
    placement = Placement.over(devices)
    if config.batch_size % placement.size:
        raise UserError(f"--batch-size {config.batch_size} is not a multiple of the {placement.size} devices")
    train_images, train_labels = dataset.splits["train"]
    steps_per_epoch = len(train_labels) // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"the training split has {len(train_labels)} images, fewer than one batch "
                        f"of {config.batch_size}")
    choice = kernels.for_devices(placement.mesh.devices.flat)  # compiled below, and recorded
    if is_main_process():  # one writer; Orbax coordinates the checkpoint writes of all processes itself
        prepare_workdir(workdir, config, resume, overwrite)
        if not resume:
            write_config(workdir, config, dataset, choice)
    sync_processes("workdir ready")
    record = read_config(workdir)

    model = models.create(config.model, **record["model_kwargs"])
    total_steps = steps_per_epoch * config.epochs
    tx = make_optimizer(config, total_steps, steps_per_epoch)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))
    if resume and checkpoints.latest_step() is not None:
        state = checkpoints.restore(abstract_state(model, tx, config.image_size, placement.replicated), "last")
        if is_main_process():
            log(f"resumed from step {int(local(state.step))}")
    else:
        state = init_state(model, tx, config.image_size, init_key(config.seed), placement.replicated)
        if config.init_from:
            state = load_pretrained(config, state, len(dataset.class_names), log)
            state = jax.device_put(state, placement.replicated)
    step = int(local(state.step))
    mode, why = pipeline.choose(config.input_pipeline, placement, train_images.nbytes + train_labels.nbytes)
    if is_main_process():
        log(f"input pipeline: {mode} ({why})")
    train_step, eval_step = compile_steps(placement, record["preprocessing"], augmentation(config), config.precision,
                                          gather=mode == "device", choice=choice)

    def open_feed():
        indices = lambda k: batch_indices(config.seed, k, len(train_labels), config.batch_size)  # noqa: E731
        if mode == "device":
            return pipeline.DeviceFeed(placement, train_images, train_labels, indices)
        return pipeline.HostFeed(placement, train_images, train_labels, indices, range(step, total_steps))

    history = [h for h in read_history(workdir) if h["step"] <= step] if resume else []
    if is_main_process():
        _write_history(workdir, history)  # epochs logged after the restored checkpoint are redone
    start = time.perf_counter()
    bar = _progress(total_steps, step, progress and is_main_process())
    shown = step  # the steps the progress bar counts
    accumulate = jax.jit(_accumulate, out_shardings=placement.replicated)

    def read(totals) -> dict:
        """The step metrics summed on the device, read (the loop waits for the device only here);
        Diverged where a step was not finite. Before every checkpoint, so none holds such a step."""
        nonlocal shown
        got = {k: float(local(v)) for k, v in totals.items()}
        if got["first_bad"] >= 0:
            bad = int(got["first_bad"])
            raise Diverged(f"training diverged at step {bad + 1} (epoch {bad // steps_per_epoch + 1}): loss "
                           f"{got['bad_loss']}, gradient norm {got['bad_grad_norm']}, parameters finite: "
                           f"{bool(got['bad_finite'])}; the last good checkpoint is step "
                           f"{checkpoints.latest_step()} in {checkpoints.directory}; try a lower --lr")
        bar.update(step - shown)
        shown = step
        if got["steps"]:
            bar.set_postfix(epoch=epoch + 1, loss=f"{got['loss'] / got['steps']:.3f}",
                            acc=f"{got['accuracy'] / got['steps']:.3f}")
        return got

    try:
        with open_feed() as feed, _StopSignals() as signals:
            stop = _StopDecision(signals)
            while step < total_steps and not stop.stopped:
                epoch, position = divmod(step, steps_per_epoch)
                totals = jax.device_put(_no_totals(), placement.replicated)
                for i in range(position, steps_per_epoch):
                    state, metrics = train_step(state, *feed.inputs(step), step_rng(config.seed, step))
                    totals = accumulate(totals, metrics, step)
                    step += 1
                    epoch_end = i + 1 == steps_per_epoch
                    checkpoint = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
                    if step % log_every == 0 or epoch_end or checkpoint:
                        read(totals)
                    if stop(step, epoch_end=epoch_end):
                        break
                    if checkpoint and not epoch_end:
                        checkpoints.save(step, state)
                got = read(totals)
                if stop.stopped and step % steps_per_epoch:
                    checkpoints.save(step, state, force=True)
                    break
                entry = {"epoch": epoch + 1, "step": step, "train_loss": got["loss"] / got["steps"],
                         "train_accuracy": got["accuracy"] / got["steps"],
                         **_validate(eval_step, state, dataset, config.batch_size, placement),
                         "seconds": round(time.perf_counter() - start, 2)}
                history.append(entry)
                checkpoints.save(step, state, metrics={k: v for k, v in entry.items() if k.startswith("val_")})
                if is_main_process():
                    _write_history(workdir, [entry], append=True)
                    bar.write(_describe(entry, config.epochs))
            interrupted = stop.stopped and step < total_steps
    finally:
        bar.close()
        checkpoints.close()
    if interrupted and jax.process_count() == 1:
        log(f"stopped by signal {stop.signalled[0]} at step {step} of {total_steps}; checkpoint written. "
            f"Continue with the same command and --resume.")
    elif interrupted:  # every process's log says where it stopped, and why
        by = ", ".join(f"signal {n} to process {p}" for p, n in sorted(stop.signalled.items()))
        log(f"process {jax.process_index()}: stopped at step {step} of {total_steps} ({by}); checkpoint written. "
            f"Continue with the same command and --resume.")
    return TrainResult(state, history, time.perf_counter() - start, interrupted)


def _validate(eval_step, state, dataset: Dataset, batch_size: int, placement: Placement) -> dict:
    images, labels = dataset.splits.get("val", (None, None))
    if images is None or len(labels) == 0:
        return {}
    logits = predict_logits(eval_step, state, images, batch_size, placement)
    logp = jax.nn.log_softmax(jnp.asarray(logits))
    loss = float(-jnp.take_along_axis(logp, jnp.asarray(labels)[:, None], axis=1).mean())
    return {"val_loss": loss, "val_accuracy": float((logits.argmax(-1) == labels).mean())}


def _describe(entry: dict, epochs: int) -> str:
    parts = [f"epoch {entry['epoch']}/{epochs}", f"loss {entry['train_loss']:.4f}",
             f"acc {entry['train_accuracy']:.4f}"]
    if "val_accuracy" in entry:
        parts += [f"val_loss {entry['val_loss']:.4f}", f"val_acc {entry['val_accuracy']:.4f}"]
    return "  ".join(parts + [f"{entry['seconds']:.1f}s"])


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs, pipes)
    return tqdm(total=total, initial=initial, disable=None if enabled else True, unit="step", dynamic_ncols=True,
                leave=False)


def _write_history(workdir: str, entries: list[dict], append: bool = False) -> None:
    with open(os.path.join(workdir, METRICS_FILE), "a" if append else "w") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in entries)


def read_history(workdir: str) -> list[dict]:
    """The per-epoch metrics of a workdir (metrics.jsonl), oldest first."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def restore_for_inference(workdir: str, which: str = "best", devices=None):
    """(state, config record, eval_step, placement) for a trained workdir."""
    record = read_config(workdir)
    model = models.create(record["model"], **record["model_kwargs"])
    placement = Placement.over(devices)
    config = TrainConfig(**record["train"])
    tx = make_optimizer(config)
    # Parameters and statistics only: inference needs no optimizer state, and does not depend on
    # the optimizer the run was trained with.
    full = abstract_state(model, tx, config.image_size, placement.replicated)
    template = {"step": full.step, "params": full.params, "batch_stats": full.batch_stats}
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        restored = checkpoints.restore(template, which, partial=True)
    finally:
        checkpoints.close()
    state = TrainState(step=restored["step"], apply_fn=model.apply, params=restored["params"], tx=tx,
                       opt_state=None, batch_stats=restored["batch_stats"])
    _, eval_step = compile_steps(placement, record["preprocessing"])
    return state, record, eval_step, placement
