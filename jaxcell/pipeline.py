"""The input pipeline: how each training step's batch reaches the devices.

    mode, why = choose("auto", placement, train_images.nbytes + train_labels.nbytes)
    feed = DeviceFeed(...) if mode == "device" else HostFeed(...)
    with feed:
        state, metrics = train_step(state, *feed.inputs(step), rng)

"device": the training split is copied to every device once; a step sends only its batch's
indices and the jitted step gathers the images itself (jaxcell.train.make_gather_step).
"host": for a split too large for device memory, a background thread gathers the coming batches
in host memory and sends them ahead (a queue of two), so transfers overlap the computation;
each process gathers only its own block of every global batch.
Both feed the same batches (jaxcell.train.batch_indices) to the same step body, so the
parameters do not depend on the mode.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import jax
import numpy as np

from jaxcell.settings import PIPELINES  # TrainConfig.input_pipeline's choices

DEVICE_SHARE = 4  # "auto" keeps the split on the device when it takes at most 1/4 of the smallest one's memory
PREFETCH = 2


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def device_memory(placement) -> int | None:
    """The smallest memory limit among this process's devices of `placement`; None where a device
    reports none (CPUs)."""
    limits = []
    for device in placement.mesh.devices.flat:
        if device.process_index != jax.process_index():
            continue
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001  (backends without memory statistics raise or return None)
            stats = None
        if not stats or not stats.get("bytes_limit"):
            return None
        limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def choose(requested: str, placement, nbytes: int) -> tuple[str, str]:
    """(mode, reason): `requested` unless it is "auto", which picks "device" when `nbytes` (the
    training split) is at most a quarter of the smallest device's memory, or when the devices
    report no memory size (CPUs: the "device" memory is the host's), else "host"."""
    if requested not in PIPELINES:
        raise ValueError(f"unknown input pipeline {requested!r}")
    if requested != "auto":
        return requested, f"as asked; training split {_gb(nbytes)}"
    limit = device_memory(placement)
    if limit is None:
        platform = placement.mesh.devices.flat[0].platform
        mode, why = "device", f"training split {_gb(nbytes)}, {platform} devices report no memory size"
    elif nbytes * DEVICE_SHARE <= limit:
        mode, why = "device", f"training split {_gb(nbytes)} <= 1/{DEVICE_SHARE} of {_gb(limit)} per device"
    else:
        mode, why = "host", f"training split {_gb(nbytes)} > 1/{DEVICE_SHARE} of {_gb(limit)} per device"
    if jax.process_count() > 1:  # every process must run the same program: process 0 decides
        from jax.experimental import multihost_utils

        agreed = bool(multihost_utils.broadcast_one_to_all(np.array(mode == "device")))
        if agreed != (mode == "device"):
            mode, why = ("device" if agreed else "host"), "as process 0 chose"
    return mode, why


class _Feed:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass


class DeviceFeed(_Feed):
    """The split on every device; inputs(step) = (data, indices) for a gathering train step."""

    gathers = True

    def __init__(self, placement, images: np.ndarray, labels: np.ndarray, indices: Callable[[int], np.ndarray]):
        # Replicated, not sharded: the batch's images can be anywhere in the split, so with a full
        # copy on every device the gather inside the step reads local memory only, and 1 or N
        # devices gather the same global batch. The full ALL dataset is 0.5 GB at 224 px, a small
        # part of any GPU's memory; "auto" checks (choose).
        def replicate(a):
            return jax.make_array_from_callback(a.shape, placement.replicated, lambda index: a[index])

        self.placement = placement
        self.data = {"image": replicate(images), "label": replicate(np.asarray(labels, np.int32))}
        self.indices = indices

    def inputs(self, step: int) -> tuple:
        return self.data, self.placement.put_batch(np.asarray(self.indices(step), np.int32))

    def close(self) -> None:
        self.data = None


class HostFeed(_Feed):
    """A thread gathers the batches of `steps` from host memory and places them (put_local), at
    most PREFETCH ahead; inputs(step) = (batch,). An exception in the thread is raised by the next
    inputs(); close() (or leaving the `with`) stops and joins the thread."""

    gathers = False

    def __init__(self, placement, images: np.ndarray, labels: np.ndarray, indices: Callable[[int], np.ndarray],
                 steps: range, depth: int = PREFETCH):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

        def produce():
            try:
                for step in steps:
                    idx = indices(step)
                    n, idx = len(idx), idx[placement.local_rows(len(idx))]  # this process's block only
                    batch = placement.put_local({"image": images[idx], "label": np.asarray(labels[idx], np.int32)}, n)
                    if not self._put((step, batch)):
                        return
            except BaseException as exc:  # noqa: BLE001  (handed to the main thread)
                self._put((None, exc))

        self._thread = threading.Thread(target=produce, name="jaxcell-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def inputs(self, step: int) -> tuple:
        while True:
            try:
                got, item = self._queue.get(timeout=0.05)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"the prefetch thread ended before step {step}") from None
        if got is None:
            raise item
        if got != step:
            raise RuntimeError(f"prefetched step {got} where step {step} was due")
        return (item,)

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:  # a producer blocked on a full queue sees the stop within one timeout
                self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
        self._queue = queue.Queue()
