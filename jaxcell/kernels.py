"""Which kernels compute a compiled program's convolutions, BatchNorm and max-pool gradients.

The models are written once, with plain layers (jaxcell.models.layers). Three of their operations
can run in more than one way, all computing the same function; the code that compiles a program
chooses, explicitly, for that program:

    Kernels.XLA        lax's convolution, autodiff's BatchNorm and max-pool gradients: what any
                       platform runs, and what a model jitted without a choice gets.
    Kernels.CPU_FORMS  the same functions in the forms XLA:CPU runs fast (jaxcell.cpu_forms), with
                       XLA's own convolutions.
    Kernels.ONEDNN     CPU_FORMS, with plain float32 convolutions in oneDNN (jaxcell.onednn) where
                       the battery verified their kind.

    choice = kernels.for_devices(devices)          # what the trainer, evaluate, predict, serve use
    step = kernels.jit(train_step, choice, donate_argnums=0)
    record["convolutions"] = kernels.convolutions(choice, precision)

The choice is a context variable read while a function is traced. `jit` sets it inside the
function it jits, and each `jit` call makes a new jitted function: jax.jit caches traces per
function, so a program traced under one choice is never reused under another, and two choices
are two programs. A caller's own jax.jit of a model traces with the default, XLA.
"""

import contextlib
import contextvars
import enum
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax import lax

from jaxcell import cpu_forms, onednn


class Kernels(enum.Enum):
    XLA = "xla"
    CPU_FORMS = "cpu-forms"
    ONEDNN = "onednn"


_CHOSEN: contextvars.ContextVar[Kernels] = contextvars.ContextVar("jaxcell_kernels", default=Kernels.XLA)


def chosen() -> Kernels:
    """The kernels of the program being traced now."""
    return _CHOSEN.get()


@contextlib.contextmanager
def use(kernels: Kernels):
    """Trace with `kernels` inside the block. A function jitted outside the block and traced
    inside keeps its first trace on later calls: prefer `jit`."""
    if not isinstance(kernels, Kernels):
        raise TypeError(f"kernels must be a jaxcell.kernels.Kernels, got {kernels!r}")
    token = _CHOSEN.set(kernels)
    try:
        yield
    finally:
        _CHOSEN.reset(token)


def jit(fun: Callable, kernels: Kernels, **jit_kwargs: Any):
    """jax.jit(fun, **jit_kwargs), traced with `kernels`."""
    if not isinstance(kernels, Kernels):
        raise TypeError(f"kernels must be a jaxcell.kernels.Kernels, got {kernels!r}")

    @functools.wraps(fun)
    def traced(*args, **kwargs):
        with use(kernels):
            return fun(*args, **kwargs)

    return jax.jit(traced, **jit_kwargs)


def for_devices(devices: Sequence[jax.Device] | None = None) -> Kernels:
    """The fastest kernels for a program over `devices` (None: JAX's default device): on CPUs the
    CPU forms, with oneDNN's convolutions on one device where they are built; elsewhere XLA's
    (the forms are not measured on GPUs). XLA cannot split a custom call over devices (it would
    run each whole convolution on every one), so split programs keep XLA's convolutions."""
    devices = list(devices) if devices is not None else jax.devices()[:1]
    if devices[0].platform != "cpu":
        return Kernels.XLA
    if len(devices) > 1 or not onednn.available():
        return Kernels.CPU_FORMS
    return Kernels.ONEDNN


def convolutions(kernels: Kernels, precision: str = "fp32") -> dict:
    """What computes the convolutions of a program traced with `kernels` at `precision`, for a
    run's records: {"backend": "onednn", "version", "isa", "routed_to_xla": [categories the
    battery sends to XLA]} or {"backend": "xla"} (oneDNN takes float32 only)."""
    if kernels is not Kernels.ONEDNN or precision != "fp32" or not onednn.available():
        return {"backend": "xla"}
    return onednn.convolutions()


# --- the three operations, as the traced program's choice computes them -------------------------

def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """lax.conv_general_dilated (nn.Conv's `conv_general_dilated`)."""
    kernels = chosen()
    if kernels is Kernels.XLA:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kwargs)
    return cpu_forms.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                          dimension_numbers, feature_group_count, precision,
                                          use_onednn=kernels is Kernels.ONEDNN, **kwargs)


def batch_norm_train(statistics: Callable, x, scale, bias, epsilon):
    """statistics(x, scale, bias, epsilon) -> (y, batch mean, biased batch variance); on the CPU
    forms with torch's gradient."""
    if chosen() is Kernels.XLA:
        return statistics(x, scale, bias, epsilon)
    return cpu_forms.batch_norm_train(statistics, x, scale, bias, epsilon)


def max_pool(x, window: int, stride: int, pads):
    """nn.max_pool over window x window, the gradient to each window's first maximum."""
    if chosen() is Kernels.XLA:
        return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)
    return cpu_forms.max_pool(x, window, stride, pads)
