"""One compiled program, fed by a dynamic batcher.

The program (jaxcell.inference.Predictor.program with Grad-CAM) is compiled ahead of time, at
start-up, for batches of 1, 2, 4, ... up to `batch_size` images, and each is run once on zeros
before the server accepts requests. Requests put their images on a queue; a batcher thread takes
what is there and, until a batch is full, waits for more up to `max_wait_ms` after the first of them
arrived; it pads the batch to the smallest compiled size that holds it and runs it. Concurrent
requests thus share device batches, a lone request does not pay for a full batch of padding, and no
request ever triggers a compilation. `concurrent_batches` batcher threads (default 2) take batches
from the one queue, so that the next batch forms and starts while one computes.

JAX's persistent compilation cache (jaxcell.compilation_cache) keeps the compiled program
on disk, so a restart reads it back instead of compiling again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time

import numpy as np

from jaxcell.errors import UserError

log = logging.getLogger("jaxcell.serve")


class _CacheEvents:
    """Counts JAX's persistent-cache hits and misses while it is entered."""

    def __enter__(self):
        import jax

        self.hits = self.misses = 0

        def listen(event, **kwargs):
            if event == "/jax/compilation_cache/cache_hits":
                self.hits += 1
            elif event == "/jax/compilation_cache/cache_misses":
                self.misses += 1

        self._listen = listen
        jax.monitoring.register_event_listener(listen)
        return self

    def __exit__(self, *exc):
        from jax._src import monitoring  # the public module has no unregister

        monitoring.unregister_event_listener(self._listen)


@dataclasses.dataclass
class _Item:
    image: np.ndarray
    future: concurrent.futures.Future
    queued_at: float = dataclasses.field(default_factory=time.perf_counter)


class Engine:
    """Compiles `predictor`'s program for up to `batch_size` images and serves `submit` calls from batcher threads."""

    def __init__(self, predictor, batch_size: int = 16, max_wait_ms: float = 5.0, cam_layer: str | None = None,
                 concurrent_batches: int = 2):
        import jax
        import jax.numpy as jnp

        from jaxcell import kernels

        self.predictor, self.batch_size, self.max_wait = predictor, batch_size, max_wait_ms / 1000
        self.image_shape = (predictor.image_size, predictor.image_size, 3)
        self.sizes = sorted({min(2 ** k, batch_size) for k in range(batch_size.bit_length() + 1)})
        fn = kernels.jit(predictor.program(cam=True, cam_layer=cam_layer, batch_size=batch_size), kernels.for_devices())
        self.variables = jax.device_put(predictor.variables)
        start = time.perf_counter()
        with _CacheEvents() as events:
            self.compiled = {n: fn.lower(self.variables, jax.ShapeDtypeStruct((n, *self.image_shape), jnp.uint8))
                             .compile() for n in self.sizes}
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for n in self.sizes:  # warm-up: first-run allocations happen now
            out = self._run(np.zeros((n, *self.image_shape), np.uint8))
        try:  # and the answers once, so that a detector that cannot score this program's output fails now
            predictor.answers(out["logits"], out.get("features"), out.get("detector_logits"))
        except Exception as error:  # noqa: BLE001  (an ood.npz of another format or model: KeyError, ValueError)
            raise UserError(f"{predictor.source}: its OOD detector cannot score this model's features ({error!r}); "
                            f"refit it with: jaxcell ood --workdir {predictor.source}") from error
        self.startup = {"compile_seconds": round(compile_seconds, 3), "concurrent_batches": concurrent_batches,
                        "from_persistent_cache": events.hits == len(self.sizes) and events.misses == 0,
                        "warmup_seconds": round(time.perf_counter() - start, 3), "batch_size": batch_size,
                        "batch_sizes_compiled": self.sizes, "max_wait_ms": max_wait_ms}
        self.batches = self.images = 0
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._counts_lock = threading.Lock()  # batches and images, counted by every batcher
        # One batcher thread per batch that may run at once. With two, the next batch forms and starts
        # while one computes: a lone batcher left a 2-core CPU a quarter idle between batches, with
        # requests waiting (`bench/serve.py`, docs/benchmarks.md). Each thread takes a batch whole.
        self._workers = [threading.Thread(target=self._loop, name=f"jaxcell-serve-batcher-{i}", daemon=True)
                         for i in range(concurrent_batches)]
        for worker in self._workers:
            worker.start()

    def _run(self, batch: np.ndarray) -> dict:
        out = self.compiled[len(batch)](self.variables, batch)
        return {k: np.asarray(v) for k, v in out.items()}

    def submit(self, images: np.ndarray) -> list[concurrent.futures.Future]:
        """One future per image (uint8 (S, S, 3)); each resolves to (answer dict, Grad-CAM map)."""
        futures = []
        for image in images:
            future = concurrent.futures.Future()
            self._queue.put(_Item(image, future))
            futures.append(future)
        return futures

    def close(self) -> None:
        self._queue.put(None)
        for worker in self._workers:
            worker.join(timeout=10)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                self._queue.put(None)  # for the other batchers
                return
            items = [first]
            # The wait counts from when the first image arrived, not from when this thread got to it: images
            # that queued while the previous batch ran have waited already, and go at once with what is there.
            deadline = first.queued_at + self.max_wait
            while len(items) < self.batch_size:
                remaining = deadline - time.perf_counter()
                try:
                    item = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                items.append(item)
            self._answer(items)

    def _answer(self, items: list[_Item]) -> None:
        # A request whose client went away has cancelled its futures: leave those images out.
        items = [item for item in items if item.future.set_running_or_notify_cancel()]
        if not items:
            return
        size = next(n for n in self.sizes if n >= len(items))
        batch = np.zeros((size, *self.image_shape), np.uint8)
        for i, item in enumerate(items):
            batch[i] = item.image
        try:
            out = self._run(batch)
            n = len(items)
            answers = self.predictor.answers(*(out[k][:n] if k in out else None
                                               for k in ("logits", "features", "detector_logits")))
        except Exception as error:  # noqa: BLE001  a failure is every waiting request's, not the worker's end
            log.exception("batch failed")
            for item in items:
                item.future.set_exception(error)
            return
        with self._counts_lock:
            self.batches += 1
            self.images += len(items)
        for i, item in enumerate(items):
            item.future.set_result((answers[i], out["maps"][i]))
