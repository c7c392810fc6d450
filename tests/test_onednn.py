"""jaxcell.onednn: oneDNN's convolutions inside XLA:CPU programs. Their values and gradients are
checked against lax's in tests/test_cpu_forms.py (test_cpu_convolutions_match_lax), against torch's
by the parity suites, which run through them, and here by the battery (jaxcell.onednn_battery)
at every ISA this CPU has; also here: that they are built where their pieces are, that train
steps really call them (and only where they may), that a kind of convolution the battery finds
wrong goes to XLA with a warning, and that anything missing falls back to XLA's convolutions
with a warning that says what."""

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import tiny
from jaxcell import cpu_forms, host, kernels, models, onednn, onednn_battery, train
from jaxcell.kernels import Kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _losses(name: str, choices, steps: int = 3, size: int = 32, **kw) -> list[list[float]]:
    """The losses of `steps` training steps from one initial state, once per kernel choice."""
    placement = train.Placement.over(jax.devices()[:1])
    model = models.create(name, num_classes=4, image_size=size, **kw)
    tx = train.make_optimizer(train.TrainConfig(model=name))
    initial = train.init_state(model, tx, size, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, size, size, 3), np.uint8), "label": rng.integers(0, 4, 8, np.int32)}
    runs = []
    for choice in choices:
        step, _ = train.compile_steps(placement, models.spec(name).preprocessing, choice=choice)
        state = jax.tree.map(jnp.copy, initial)  # the step donates its state
        step = step.lower(state, batch, jax.random.key(1)).compile()
        losses = []
        for _ in range(steps):
            state, metrics = step(state, batch, jax.random.key(1))
            losses.append(float(metrics["loss"]))
        runs.append(losses)
    return runs


@pytest.mark.usefixtures("onednn_built")
def test_brin_trains_through_onednn_as_through_xla():
    """BRIN has every kind of convolution jaxcell uses (strided, dilated, grouped, 1x1, a 3-channel
    stem). Its steps with oneDNN's convolutions give XLA's losses, step after step: a primitive
    that ran once but failed on its second call (oneDNN's own scratchpad; now each has its own)
    failed here at the second step. Two stages keep a strided block (strided grouped 3x3 and 1x1
    shortcut) at the narrowest width that still has groups: half the compile time of the preset."""
    ours, xla = _losses("brin", (Kernels.ONEDNN, Kernels.CPU_FORMS), **tiny.BRIN)
    assert ours == pytest.approx(xla, rel=1e-5)


def test_negative_padding_stays_with_xla():
    """oneDNN takes no negative padding (a crop); such a convolution keeps XLA's, and lax's values."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32))
    w = jnp.ones((3, 3, 4, 4))
    dims = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    args = ((1, 1), ((-1, 0), (0, -1)))
    ours = jax.jit(lambda x, w: cpu_forms.conv_general_dilated(x, w, *args, dimension_numbers=dims, use_onednn=True))
    assert onednn.TARGET not in ours.lower(x, w).as_text()
    np.testing.assert_allclose(ours(x, w), lax.conv_general_dilated(x, w, *args, dimension_numbers=dims),
                               rtol=1e-6, atol=1e-5)


# --- the battery at each ISA, and the guard built on it ------------------------------------------

# ONEDNN_MAX_CPU_ISA's values, and the /proc/cpuinfo flags oneDNN needs for each
ISA_CAPS = {"SSE41": {"sse4_1"}, "AVX2": {"avx", "avx2", "fma"},
            "AVX512_CORE": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}


@pytest.mark.usefixtures("onednn_built")
@pytest.mark.parametrize("cap", ISA_CAPS)
def test_the_battery_agrees_with_xla_at_each_isa(cap):
    """Every battery case (forward, input gradient, weight gradient) within the float32 bound of
    lax's, with oneDNN capped at each ISA this CPU has: a CI on a new CPU still covers an older
    one. oneDNN reads the cap once per process, so one child process per ISA runs the whole
    battery. Without jaxcell.onednn._weight_gradient's fix, AVX2 fails here: oneDNN 3.2's strided
    1x1 weight gradient, 0.72 relative."""
    missing = ISA_CAPS[cap] - host.cpu_flag_set()
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))}, so oneDNN cannot use {cap} here")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap,
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "jaxcell.onednn_battery"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert found["isa"] == cap.lower() and len(found["cases"]) == len(onednn_battery.BATTERY)
    assert [(c["case"], c["errors"]) for c in found["cases"] if not c["agrees"]] == []


@pytest.fixture
def fresh_verdict():
    onednn.verdict.cache_clear()
    yield
    onednn.verdict.cache_clear()


@pytest.mark.usefixtures("onednn_built", "fresh_verdict")
def test_the_guard_passes_this_build():
    """The verdict every model's routing reads (cached, or run now in a child process): this
    build agrees with XLA at this process's ISA, and says which version and ISA it checked."""
    found = onednn.verdict()
    assert not found.get("error") and all(case["agrees"] for case in found["cases"]), found
    assert (found["version"], found["isa"]) == (onednn.library()["version"], onednn.library()["isa"])
    assert kernels.convolutions(Kernels.ONEDNN) == {"backend": "onednn", **{k: found[k] for k in ("version", "isa")},
                                                    "routed_to_xla": []}


@pytest.mark.usefixtures("onednn_built", "fresh_verdict")
def test_a_kind_that_disagrees_goes_to_xla_with_a_warning(monkeypatch, tmp_path):
    """A kernel wrong as oneDNN 3.2's was (here made 1% off: strided 1x1 weight gradients): the
    battery finds it, one warning names each wrong case and what was off, convolutions of those
    kinds trace to XLA's while the others stay with oneDNN, the run's record says so, and the
    verdict is read back from the cache by the next process."""
    monkeypatch.setenv("JAXCELL_CACHE", str(tmp_path))
    right = onednn._weight_gradient

    def wrong(x, dy, w_shape, strides, *args):
        dw = right(x, dy, w_shape, strides, *args)
        return dw * 1.01 if w_shape[:2] == (1, 1) and tuple(strides) != (1, 1) else dw
    monkeypatch.setattr(onednn, "_weight_gradient", wrong)
    monkeypatch.setattr(onednn, "_run_battery", lambda info: onednn_battery.run())  # in this process: sees `wrong`
    strided_1x1 = [c for c in onednn_battery.BATTERY if c.kernel == 1 and c.stride > 1]
    with pytest.warns(UserWarning) as said:
        found = onednn.verdict()
    messages = [str(w.message) for w in said if "disagrees with XLA" in str(w.message)]
    assert len(messages) == len(strided_1x1)
    assert any("on a 1x1 stride 2 padding 0 dilation 1, 4 -> 8 channels, 8x8 maps, batch 2 convolution "
               "(weight gradient 0.01 relative)" in m for m in messages), messages
    assert sorted(c["case"] for c in found["cases"] if not c["agrees"]) == sorted(c.describe() for c in strided_1x1)

    x, w1, w3 = jnp.ones((2, 8, 8, 4)), jnp.ones((1, 1, 4, 8)), jnp.ones((3, 3, 4, 8))

    def traced(w, stride):
        dims = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        return str(jax.make_jaxpr(lambda x, w: cpu_forms.conv_general_dilated(
            x, w, (stride, stride), ((0, 0), (0, 0)), dimension_numbers=dims, use_onednn=True))(x, w))
    assert onednn.TARGET not in traced(w1, 2) and onednn.TARGET in traced(w1, 1) and onednn.TARGET in traced(w3, 2)
    routed = kernels.convolutions(Kernels.ONEDNN)["routed_to_xla"]
    assert "1x1, strided, undilated, in <8, out 8k, map >= kernel" in routed and len(routed) <= len(strided_1x1)

    onednn.verdict.cache_clear()
    monkeypatch.setattr(onednn, "_run_battery", lambda info: pytest.fail("checked again: the verdict was not cached"))
    with pytest.warns(UserWarning, match="disagrees with XLA"):
        assert onednn.verdict() == found


@pytest.mark.usefixtures("onednn_built", "fresh_verdict")
def test_callers_that_need_the_verdict_at_once_run_the_battery_once(monkeypatch, tmp_path):
    """The processes of a job starting together on a new machine (or the suite's workers): the
    first runs the battery under the cache's lock, the others wait and read its verdict."""
    monkeypatch.setenv("JAXCELL_CACHE", str(tmp_path))
    runs, started = [], threading.Event()

    def slow_battery(info):
        runs.append(threading.current_thread().name)
        started.set()
        time.sleep(0.5)  # the other caller asks meanwhile
        return {**info, "bound": 1e-4, "cases": []}
    monkeypatch.setattr(onednn, "_run_battery", slow_battery)
    found = {}
    callers = [threading.Thread(target=lambda n=n: found.__setitem__(n, onednn.verdict.__wrapped__()), name=str(n))
               for n in range(2)]
    callers[0].start()
    assert started.wait(30)
    callers[1].start()
    for c in callers:
        c.join(30)
    assert runs == ["0"] and found[0] == found[1] and found[0]["cases"] == []


def test_the_record_says_xla_where_onednn_does_not_run():
    """Split steps, bfloat16 and the kernels without oneDNN trace XLA's convolutions; so the record says."""
    assert kernels.for_devices(jax.devices()[:2]) is Kernels.CPU_FORMS
    assert kernels.convolutions(kernels.for_devices(jax.devices()[:2])) == {"backend": "xla"}
    assert kernels.convolutions(Kernels.ONEDNN, precision="bf16") == {"backend": "xla"}
    assert kernels.convolutions(Kernels.CPU_FORMS) == kernels.convolutions(Kernels.XLA) == {"backend": "xla"}
