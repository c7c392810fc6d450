"""jaxcell.onednn: oneDNN's convolutions inside XLA:CPU programs. Their values and gradients are
checked against lax's in tests/test_bench.py (test_cpu_convolutions_match_lax), and against
torch's by the parity suites, which run through them; here: that they are built where their
pieces are, that train steps really call them (and only where they may), and that anything
missing falls back to XLA's convolutions with a warning that says what."""

import platform
import shutil
import subprocess
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcell import models, onednn, train
from jaxcell.models import layers

CAN_BUILD = platform.system() == "Linux" and platform.machine() == "x86_64" and shutil.which("g++") is not None


@pytest.mark.skipif(not CAN_BUILD, reason="oneDNN convolutions are built on Linux x86-64 with g++ only")
def test_built_where_its_pieces_are_installed():
    """The wheels are dependencies on this platform: a failure here is a real one (the warning
    raised as an error names the cause)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert onednn.available.__wrapped__()


def _compiled_train_step(devices) -> str:
    placement = train.Placement.over(devices)
    model = models.create("lightnetcell", num_classes=4, image_size=32)
    tx = train.make_optimizer(train.TrainConfig(model="lightnetcell"))
    state = train.abstract_state(model, tx, 32, placement.replicated)
    batch = {"image": jax.ShapeDtypeStruct((4, 32, 32, 3), "uint8", sharding=placement.batch),
             "label": jax.ShapeDtypeStruct((4,), "int32", sharding=placement.batch)}
    step, _ = train.compile_steps(placement, models.spec("lightnetcell").preprocessing)
    return step.lower(state, batch, jax.random.key(1)).compile().as_text()


@pytest.mark.usefixtures("onednn_built")
def test_one_device_steps_call_onednn_and_split_ones_do_not():
    """On one CPU device every convolution of a train step (forward and both gradients) is a call
    into oneDNN; over several devices they stay XLA's, which XLA can split by batch."""
    one = _compiled_train_step(jax.devices()[:1])
    assert one.count(f'custom_call_target="{onednn.TARGET}"') >= 3 and " convolution(" not in one
    split = _compiled_train_step(jax.devices()[:2])
    assert onednn.TARGET not in split and " convolution(" in split


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXCELL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    if not CAN_BUILD:
        pytest.skip("builds on Linux x86-64 only")
    said = r"oneDNN convolutions unavailable, XLA's are used instead: false failed \(exit status 1\)"
    with pytest.warns(UserWarning, match=said):
        assert onednn.available.__wrapped__() is False
    assert not list(tmp_path.rglob("*.so"))  # nothing half-written left behind


def test_a_missing_package_is_named():
    with pytest.raises(onednn.BuildError, match="the no-such-onednn package is not installed"):
        onednn._wheel_file("no-such-onednn", "lib/libdnnl.so")


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("JAXCELL_ONEDNN", "0")
    assert onednn.available.__wrapped__() is False


@pytest.mark.usefixtures("onednn_built")
def test_a_build_is_reused(monkeypatch):
    first = onednn.build()

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")
    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert onednn.build() == first


def _losses(name: str, onednn_on: bool, steps: int = 3, size: int = 32, **kw) -> list[float]:
    placement = train.Placement.over(jax.devices()[:1])
    model = models.create(name, num_classes=4, image_size=size, **kw)
    tx = train.make_optimizer(train.TrainConfig(model=name))
    state = train.init_state(model, tx, size, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, size, size, 3), np.uint8), "label": rng.integers(0, 4, 8, np.int32)}
    with layers.cpu_forms(onednn=onednn_on):
        step, _ = train.compile_steps(placement, models.spec(name).preprocessing)
        step = step.lower(state, batch, jax.random.key(1)).compile()
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.usefixtures("onednn_built")
def test_brin_trains_through_onednn_as_through_xla():
    """BRIN has every kind of convolution jaxcell uses (strided, dilated, grouped, 1x1, a 3-channel
    stem). Its steps with oneDNN's convolutions give XLA's losses, step after step: a primitive
    that ran once but failed on its second call (oneDNN's own scratchpad; now each has its own)
    failed here at the second step."""
    ours, xla = _losses("brin", True, preset="small"), _losses("brin", False, preset="small")
    assert ours == pytest.approx(xla, rel=1e-5)


def test_negative_padding_stays_with_xla():
    """oneDNN takes no negative padding (a crop); such a convolution keeps XLA's, and lax's values."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32))
    w = jnp.ones((3, 3, 4, 4))
    dims = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    args = ((1, 1), ((-1, 0), (0, -1)))
    with layers.cpu_forms(workarounds=True, onednn=True):
        ours = jax.jit(lambda x, w: layers.conv_general_dilated(x, w, *args, dimension_numbers=dims))
        assert onednn.TARGET not in ours.lower(x, w).as_text()
        np.testing.assert_allclose(ours(x, w), lax.conv_general_dilated(x, w, *args, dimension_numbers=dims),
                                   rtol=1e-6, atol=1e-5)
