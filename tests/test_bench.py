"""The benchmark harness (jaxcell.bench, bench/gpu.sh) and the XLA:CPU workarounds it measures
(jaxcell.models.layers: convolutions and max-pool gradients; jaxcell.train.compiler_options)."""

import contextlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

import jaxcell.onednn
from jaxcell import bench, train
from jaxcell.cli import main
from jaxcell.errors import UserError
from jaxcell.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"widths": (8, 16, 16), "hidden": 16}
SCRIPT_ENV = {**os.environ, "PYTHON": sys.executable}  # bench/gpu.sh with this interpreter (jax and torch)


# --- the harness ---------------------------------------------------------------------------------

def test_gpu_script_quick_mode_measures_jax_and_torch(tmp_path):
    """bench/gpu.sh --quick: one pass on the CPU; every runner gives a throughput, the figures
    hang together, and JAX also runs on 2 of the 4 virtual devices (weak scaling); then the
    input-pipeline pass."""
    out = tmp_path / "out"
    # a budget with room for a machine shared by several jobs: each process's timeout is the time left
    done = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), str(out), "--quick", "--allow-cpu"],
                          capture_output=True, text=True, timeout=420, env={**SCRIPT_ENV, "BUDGET_S": "360"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(os.listdir(out / "runs")) == ["lightnetcell_fp32-bf16_jax-torch_b4.json",
                                                "lightnetcell_fp32_pipeline_b4.json"]  # kept, one per process
    rows = json.loads((out / "results.json").read_text())["results"]
    assert not [r for r in rows if r["error"]], (out / "log.txt").read_text()
    piped = [r for r in rows if r["mode"].startswith("train-pipeline")]  # the input-pipeline pass
    assert sorted(r["mode"] for r in piped) == sorted(bench.PIPELINE_MODES)
    on_device = next(r for r in piped if r["mode"] == "train-pipeline-none")
    for r in piped:
        assert r["precision"] == "fp32" and r["devices"] == 1 and r["flops_factor"] == 3
        assert r["vs_on_device"] == pytest.approx(r["step_ms_median"] / on_device["step_ms_median"])
    assert "Input pipeline: step time" in (out / "summary.md").read_text()
    rows = [r for r in rows if r not in piped]
    got = {(r["precision"], r["mode"], r["framework"], r["devices"]) for r in rows}
    want = {(p, m, f, d) for p in ("fp32", "bf16") for m in ("train", "infer")
            for f, d in (("jax", 1), ("jax", 2), ("torch", 1))}
    assert got == want
    torch_ips = {(r["precision"], r["mode"]): r["images_per_s"] for r in rows if r["framework"] == "torch"}
    for r in rows:
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / (r["step_ms_median"] / 1e3))
        assert r["flops_per_image"] > 0 and r["flops_factor"] == (3 if r["mode"] == "train" else 1)
        assert r["achieved_tflops"] == pytest.approx(r["images_per_s"] * r["flops_per_image"] * r["flops_factor"] / 1e12)
        assert r["mfu"] is None and r["peak_tflops"] is None  # no peak for CPUs
        assert r["vs_torch"] == pytest.approx(r["images_per_s"] / torch_ips[(r["precision"], r["mode"])])
        assert r["batch_size"] == 4 * r["devices"] and r["image_size"] == 32
        if r["devices"] == 2:
            assert r["scaling_efficiency"] == pytest.approx(r["images_per_s"] / 2 / next(
                o["images_per_s"] for o in rows if (o["framework"], o["precision"], o["mode"], o["devices"])
                == ("jax", r["precision"], r["mode"], 1)))
    summary = (out / "summary.md").read_text()
    assert summary.count("| lightnetcell |") == len(rows) + len(piped) + 2  # + the pipeline table's two


def test_gpu_script_refuses_a_cpu_backend_unless_allowed(tmp_path):
    """Without a GPU (here) bench/gpu.sh stops before measuring anything and names the problem;
    the harness itself refuses too when asked to require a GPU (as gpu.sh asks every process)."""
    out = tmp_path / "out"
    done = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), str(out), "--quick"],
                          capture_output=True, text=True, timeout=300, env=SCRIPT_ENV)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "not measuring: JAX runs on cpu, not a GPU" in done.stderr
    assert "pass --allow-cpu" in done.stderr and os.listdir(out / "runs") == []
    with pytest.raises(UserError, match="JAX runs on cpu, not a GPU.*torch sees no CUDA device"):
        bench.run(bench.BenchConfig(model="lightnetcell", image_size=16, batch_size=2, frameworks=("jax",),
                                    steps=1, warmup=1, model_kwargs=TINY, require_gpu=True))
    with pytest.raises(UserError, match="JAX runs on cpu"):
        bench.run_pipeline(bench.BenchConfig(model="lightnetcell", image_size=16, batch_size=2, steps=1,
                                             warmup=1, model_kwargs=TINY, require_gpu=True))


def test_conv_gap_script_checks_and_times_every_variant():
    """bench/conv_gap.py on two tiny shapes, one of them a stride-2 first layer: every variant,
    jaxcell's custom-VJP step included, agrees with autodiff (the script asserts it) and is timed."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "conv_gap.py"),
                           "--shapes", "2x12x4x8x3x1,2x12x3x8x7x2", "--rounds", "1"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("batch 2")]
    assert len(lines) == 2
    for line in lines:
        for part in ("fwd: xla", "dx: xla", "dw: xla", "dw im2col (xla)", "step: jaxcell", "jaxcell-eigen"):
            assert part in line
    assert "total over the convolutions" in done.stdout


def test_a_failing_runner_is_recorded_and_the_others_go_on(monkeypatch):
    """torch.compile without a working C++ compiler (simulated): its rows carry the error."""
    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: no working C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    cfg = bench.BenchConfig(model="lightnetcell", image_size=16, batch_size=2, frameworks=("torch-compile", "torch"),
                            modes=("infer",), steps=1, warmup=1, model_kwargs=TINY)
    rows = {r["framework"]: r for r in bench.run(cfg, log=lambda m: None)["results"]}
    assert "no working C++ compiler" in rows["torch-compile"]["error"]
    assert rows["torch-compile"]["images_per_s"] is None
    assert rows["torch"]["error"] is None and rows["torch"]["images_per_s"] > 0
    assert "error: RuntimeError" in bench.markdown({"results": list(rows.values())})


def test_a_spent_time_budget_skips_runners():
    cfg = bench.BenchConfig(model="lightnetcell", image_size=16, batch_size=2, frameworks=("jax",), modes=("infer",),
                            steps=1, model_kwargs=TINY, deadline=0.0)
    report = bench.run(cfg, log=lambda m: None)
    (row,) = report["results"]
    assert row["error"] == "skipped: time budget spent" and row["images_per_s"] is None
    assert report["environment"]["convolutions"] == jaxcell.onednn.convolutions()  # what the "jax" rows use


def test_peak_table():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert bench.peak_tflops("NVIDIA H100 PCIe", "fp32") == 378.0
    assert bench.peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert bench.peak_tflops("NVIDIA H200 NVL", "bf16") == 835.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 156.0
    assert bench.peak_tflops("AMD EPYC (2 threads)", "fp32") is None


def test_merged_reports_get_ratios_across_passes():
    """gpu.sh runs torch.compile in a later process: merging computes its ratios anyway."""
    def row(fw, ips, mode="train", model="resnet18"):
        return {"framework": fw, "model": model, "mode": mode, "image_size": 224, "per_device_batch": 8,
                "batch_size": 8, "precision": "bf16", "devices": 1, "images_per_s": ips, "step_ms_median": 8e3 / ips,
                "achieved_tflops": 1.0, "mfu": 0.1, "error": None, "device_name": "NVIDIA H100 80GB HBM3"}

    merged = bench.merge([{"results": [row("jax", 300.0), row("torch", 200.0), row("torch", 50.0, model="brin")],
                           "environment": {}},
                          {"results": [row("torch-compile", 250.0)], "environment": {}}])
    jax_row = merged["results"][0]
    assert jax_row["vs_torch"] == pytest.approx(1.5) and jax_row["vs_torch_compile"] == pytest.approx(1.2)
    assert "| resnet18 | bf16 | train | jax | 1 | 8 | 300.0 |" in bench.summary_markdown(merged["results"])


def test_cli_refuses_an_unknown_framework(tmp_path, capsys):
    code = main(["bench", "--model", "lightnetcell", "--frameworks", "jax,tensorflow", "--json", str(tmp_path / "b.json")])
    assert code == 2
    assert "unknown framework 'tensorflow'" in capsys.readouterr().err


# --- the XLA:CPU workarounds: the same values and gradients as plain lax -------------------------

@pytest.fixture
def workarounds(request):
    """workarounds(on, onednn=False), for the rest of the test: the CPU workarounds on or off, with
    XLA's own convolutions unless oneDNN's are asked for (the test skips where they are not built;
    tests/test_onednn.py covers them)."""
    with contextlib.ExitStack() as stack:
        def set_(on, onednn=False):
            if onednn:
                request.getfixturevalue("onednn_built")
            stack.enter_context(layers.cpu_forms(workarounds=on, onednn=onednn))
        yield set_


@pytest.mark.parametrize("size,window,stride,padding,ceil", [
    (8, 2, 2, 0, False), (9, 2, 2, 0, False), (9, 3, 2, 1, False), (8, 3, 1, 1, False),
    (9, 2, 2, 0, True), (8, 3, 2, 1, True), (10, 3, 2, 1, True), (7, 3, 3, 1, True), (5, 2, 2, 1, True)])
def test_max_pool_gradient_is_torchs_first_maximum(workarounds, size, window, stride, padding, ceil):
    rng = np.random.default_rng(size + window)
    x = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    x[0, :3, :3, 0] = 1.5  # ties: the first maximum of each window takes the gradient
    x[1] = np.maximum(x[1], 0)  # zeros tie after a ReLU
    outs = {}
    for on in (False, True):
        workarounds(on)
        y, vjp = jax.vjp(lambda a: layers.max_pool(a, window, stride, padding, ceil), jnp.asarray(x))
        g = rng.standard_normal(y.shape).astype(np.float32) if not outs else outs[False][2]
        outs[on] = (np.asarray(y), np.asarray(vjp(jnp.asarray(g))[0]), g)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    y_torch = torch.nn.functional.max_pool2d(xt, window, stride, padding, ceil_mode=ceil)
    y_torch.backward(torch.from_numpy(outs[False][2]).permute(0, 3, 1, 2))
    grad_torch = xt.grad.permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(outs[True][0], outs[False][0])
    np.testing.assert_allclose(outs[True][1], grad_torch, rtol=1e-6, atol=1e-6)  # overlaps: sums in another order
    np.testing.assert_allclose(outs[False][1], grad_torch, rtol=1e-6, atol=1e-6)


# (map size, kernel, stride, padding, dilation, in, out, groups): small maps (XLA would swap the
# operands), maps smaller than the kernel's weights (the patches product), flipped maps or flipped
# kernel in the input gradient, grouped convolutions (one per group).
CONVS = [(2, 3, 1, 1, 1, 8, 8, 1), (4, 3, 2, 1, 1, 8, 16, 1), (1, 3, 1, 1, 1, 4, 4, 1), (2, 3, 1, 1, 1, 16, 256, 1),
         (4, 3, 2, 1, 1, 8, 256, 1), (9, 3, 2, 1, 1, 32, 32, 1), (16, 3, 1, 1, 1, 8, 8, 1), (17, 7, 2, 3, 1, 3, 8, 1),
         (8, 3, 1, 2, 2, 4, 4, 1), (8, 1, 2, 0, 1, 4, 8, 1), (8, 3, 1, 1, 1, 16, 16, 8), (7, 3, 2, 1, 1, 8, 4, 2)]


@pytest.mark.parametrize("onednn", [False, True], ids=["xla", "onednn"])
@pytest.mark.parametrize("size,k,stride,pad,dil,cin,cout,groups", CONVS)
def test_cpu_convolutions_match_lax(workarounds, size, k, stride, pad, dil, cin, cout, groups, onednn):
    workarounds(True, onednn)
    rng = np.random.default_rng(size * k + cout)
    x = jnp.asarray(rng.standard_normal((2, size, size, cin)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, cin // groups, cout)).astype(np.float32))
    dn = ("NHWC", "HWIO", "NHWC")
    args = dict(window_strides=(stride, stride), padding=((pad, pad), (pad, pad)), rhs_dilation=(dil, dil),
                feature_group_count=groups)
    ref = lambda x, w: lax.conv_general_dilated(x, w, dimension_numbers=dn, **args)  # noqa: E731
    ours = lambda x, w: layers.conv_general_dilated(  # noqa: E731
        x, w, dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, dn), **args)
    jaxpr = str(jax.make_jaxpr(ours)(x, w))
    assert (jaxcell.onednn.TARGET in jaxpr) if onednn else ("custom_vjp" in jaxpr or "dot_general" in jaxpr)
    (y0, vjp0), (y1, vjp1) = jax.vjp(ref, x, w), jax.vjp(ours, x, w)
    g = jnp.asarray(rng.standard_normal(y0.shape).astype(np.float32))
    for a, b in zip((y1, *vjp1(g)), (y0, *vjp0(g))):
        scale = float(jnp.abs(b).max())
        assert float(jnp.abs(a - b).max()) <= 2e-6 * scale  # float32 rounding of sums in another order


def test_small_maps_compile_to_no_swapped_convolution(workarounds):
    """ResNet's last stage at 64 px: 3x3 kernels on 2x2 maps. XLA swaps such convolutions'
    operands into a layout XLA:CPU loops over (window reversal in the HLO); ours never get there."""
    x = jnp.zeros((4, 2, 2, 64))
    w = jnp.zeros((3, 3, 64, 64))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(x, w, conv):
        return conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn).sum()

    def hlo(conv):
        return jax.jit(jax.grad(lambda x, w: loss(x, w, conv), argnums=(0, 1))).lower(x, w).compile().as_text()

    workarounds(True)  # (plain lax.conv_general_dilated gives "rhs_reversal=1x1" with jax 0.10.2)
    assert "rhs_reversal" not in hlo(layers.conv_general_dilated)


@pytest.mark.parametrize("shape", [(4, 5, 5, 3), (2, 1, 1, 8), (8, 3, 3, 16)])
def test_batch_norm_gradient_is_autodiffs(shape):
    """The custom VJP (torch's two sums) against autodiff of the same function, with cotangents
    on the batch mean and variance too (they feed the running statistics)."""
    rng = np.random.default_rng(len(shape) + shape[-1])
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 3 + 1)
    scale, bias = (jnp.asarray(rng.standard_normal(shape[-1]).astype(np.float32)) for _ in range(2))
    outs = {}
    for f in (layers._batch_norm_train.fun, layers._batch_norm_train):
        values, vjp = jax.vjp(lambda *a: f(*a, 1e-5), x, scale, bias)
        if not outs:
            cotangents = tuple(jnp.asarray(rng.standard_normal(v.shape).astype(np.float32)) for v in values)
        outs[f] = (*values, *vjp(cotangents))
    for ours, ref in zip(outs[layers._batch_norm_train], outs[layers._batch_norm_train.fun]):
        assert float(jnp.abs(ours - ref).max()) <= 1e-6 * float(jnp.abs(ref).max())


def test_materialized_is_the_identity_bit_for_bit():
    # (No subnormals: XLA:CPU flushes them to zero in every arithmetic op, a ReLU's too.)
    x = jnp.asarray([0.0, -0.0, 1.2e-38, -3.5, 3e38, np.inf, -np.inf, np.nan], jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        y = jax.jit(layers._materialized)(x.astype(dtype))
        bits = np.uint16 if dtype == jnp.bfloat16 else np.uint32
        np.testing.assert_array_equal(np.asarray(y).view(bits), np.asarray(x.astype(dtype)).view(bits))


def test_weight_gradient_transposes_do_not_recompute_batch_norm(workarounds):
    """XLA:CPU fuses a convolution input's producer (BatchNorm + ReLU) into the transposes of the
    weight gradient, which then recompute it in slow loops; `_materialized` stops it. With every
    operand used twice (the input gradient is taken too), each fused transpose must be a plain copy."""
    workarounds(True)
    block = _ConvBnReluConv()
    x = jnp.zeros((8, 16, 16, 8))
    variables = block.init(jax.random.key(0), x)

    def loss(params, x):
        return (block.apply({**variables, "params": params}, x, mutable=["batch_stats"])[0] ** 2).sum()

    options = train.compiler_options(train.Placement.over(jax.devices()[:1]))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=options)
    text = grad.lower(variables["params"], x).compile().as_text()
    fused = [c for c in text.split("\n\n") if " transpose(" in c and not c.startswith("ENTRY")]
    assert fused
    for computation in fused:
        assert not any(f" {op}(" in computation for op in ("maximum", "rsqrt", "subtract")), computation


class _ConvBnReluConv(layers.nn.Module):
    @layers.nn.compact
    def __call__(self, x):
        x = layers.conv(8, 3, bias=False)(x)
        x = layers.nn.relu(layers.BatchNorm()(x, True))
        return layers.conv(8, 3, bias=False)(x)


def test_cpu_compiler_options_keep_convolutions_off_ynnpack():
    placement = train.Placement.over(jax.devices()[:1])
    options = train.compiler_options(placement)
    if options is None:
        pytest.skip("this jaxlib does not know xla_cpu_experimental_ynn_fusion_type's values")
    x, w = jax.ShapeDtypeStruct((8, 32, 32, 32), jnp.float32), jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)
    conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    ours = jax.jit(conv, compiler_options=options).lower(x, w).compile().as_text()
    assert "__ynn_fusion" not in ours and "convolution(" in ours  # (jax 0.10.2's default: a __ynn_fusion)


@pytest.mark.parametrize("onednn", [False, True], ids=["xla", "onednn"])
def test_cpu_convolutions_of_an_empty_batch(workarounds, onednn):
    """No images: an empty output, and a weight gradient of zeros, as lax gives."""
    workarounds(True, onednn)
    x, w = jnp.zeros((0, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
    dims = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    y, back = jax.vjp(lambda x, w: layers.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                                dimension_numbers=dims), x, w)
    dx, dw = back(jnp.zeros(y.shape))
    assert y.shape == (0, 6, 6, 4) and dx.shape == x.shape
    np.testing.assert_array_equal(dw, np.zeros(w.shape))
