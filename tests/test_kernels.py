"""jaxcell.kernels: the kernels of a compiled program are chosen by the code that compiles it,
XLA's by default; two choices are two programs; the run's record follows the choice."""

import threading

import jax
import numpy as np
import pytest

from jaxcell import kernels, models, onednn, train
from jaxcell.kernels import Kernels

TINY = {"widths": (4, 8, 8), "hidden": 8}


def _loss_and_batch():
    model = models.create("lightnetcell", num_classes=4, image_size=16, **TINY)
    variables = model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32), train=False)
    x = np.random.default_rng(0).standard_normal((4, 16, 16, 3)).astype(np.float32)

    def loss(params, x):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(1)})
        return (logits ** 2).sum()
    return jax.grad(loss), variables["params"], x


def _jaxpr(jitted, *args) -> str:
    """The program a jitted function traces to: the CPU forms are custom VJPs (custom_vjp_call), oneDNN's
    convolutions FFI calls; XLA's max-pool gradient is select_and_scatter_add."""
    return str(jitted.trace(*args).jaxpr)


def test_a_model_jitted_without_a_choice_gets_xla():
    grad, params, x = _loss_and_batch()
    assert kernels.chosen() is Kernels.XLA
    text = _jaxpr(jax.jit(grad), params, x)
    assert "custom_vjp_call" not in text and "ffi_call" not in text
    assert "conv_general_dilated" in text and "select_and_scatter_add" in text


def test_each_choice_is_its_own_program_and_computes_the_same():
    """jit caches traces per function: one function jitted with two choices must give two
    programs, whichever is traced first, and the same gradients to float32 rounding."""
    grad, params, x = _loss_and_batch()
    forms = kernels.jit(grad, Kernels.CPU_FORMS)
    plain = kernels.jit(grad, Kernels.XLA)
    forms_text, plain_text = _jaxpr(forms, params, x), _jaxpr(plain, params, x)
    assert "custom_vjp_call" in forms_text and "select_and_scatter_add" not in forms_text
    assert "custom_vjp_call" not in plain_text and "select_and_scatter_add" in plain_text
    assert "ffi_call" not in forms_text  # CPU_FORMS: XLA's own convolutions
    for a, b in zip(jax.tree.leaves(forms(params, x)), jax.tree.leaves(plain(params, x))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(np.abs(b).max()))
    assert kernels.chosen() is Kernels.XLA  # nothing left behind


@pytest.mark.usefixtures("onednn_built")
def test_onednn_is_chosen_for_one_cpu_device_and_not_for_a_split():
    assert kernels.for_devices(jax.devices()[:1]) is Kernels.ONEDNN
    assert kernels.for_devices(jax.devices()[:2]) is Kernels.CPU_FORMS
    grad, params, x = _loss_and_batch()
    text = kernels.jit(grad, Kernels.ONEDNN).lower(params, x).as_text()
    assert onednn.TARGET in text and "stablehlo.convolution" not in text


def test_the_choice_is_scoped():
    """`use` restores the previous choice on exit, an exception included; another thread starts
    from the default."""
    seen = {}
    with kernels.use(Kernels.CPU_FORMS):
        with pytest.raises(RuntimeError):
            with kernels.use(Kernels.ONEDNN):
                raise RuntimeError("in the block")
        assert kernels.chosen() is Kernels.CPU_FORMS
        worker = threading.Thread(target=lambda: seen.setdefault("thread", kernels.chosen()))
        worker.start()
        worker.join()
    assert kernels.chosen() is Kernels.XLA and seen["thread"] is Kernels.XLA


def test_a_choice_that_is_not_a_kernels_value_is_refused():
    with pytest.raises(TypeError, match="kernels must be a jaxcell.kernels.Kernels, got 'onednn'"):
        kernels.jit(lambda x: x, "onednn")


def test_compile_steps_uses_and_records_the_choice():
    """The trainer's steps are traced with the choice it is given (here XLA's and the CPU forms),
    and the record of XLA's kernels and split steps says XLA."""
    placement = train.Placement.over(jax.devices()[:1])
    model = models.create("lightnetcell", num_classes=4, image_size=16, **TINY)
    state = train.abstract_state(model, train.make_optimizer(train.TrainConfig()), 16, placement.replicated)
    batch = {"image": jax.ShapeDtypeStruct((4, 16, 16, 3), "uint8", sharding=placement.batch),
             "label": jax.ShapeDtypeStruct((4,), "int32", sharding=placement.batch)}
    texts = {}
    for choice in (Kernels.XLA, Kernels.CPU_FORMS):
        step, _ = train.compile_steps(placement, models.spec("lightnetcell").preprocessing, choice=choice)
        texts[choice] = _jaxpr(step, state, batch, jax.random.key(0))
    assert "custom_vjp_call" not in texts[Kernels.XLA] and "select_and_scatter_add" in texts[Kernels.XLA]
    assert "custom_vjp_call" in texts[Kernels.CPU_FORMS] and "ffi_call" not in texts[Kernels.CPU_FORMS]
    assert kernels.convolutions(Kernels.XLA) == {"backend": "xla"}
