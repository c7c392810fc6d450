"""The benchmark harness (jaxcell.bench, bench/gpu.sh, bench/conv_gap.py). What it measures, the
CPU forms, is checked in tests/test_cpu_forms.py."""

import json
import os
import subprocess
import sys

import jax
import pytest
import torch

import tiny
from jaxcell import bench, host, kernels
from jaxcell.cli import main
from jaxcell.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = tiny.LIGHTNETCELL
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


def test_od_center_reaches_every_runner(monkeypatch):
    """--od-center: the preprocessing of a run trained with it, in each runner's timed step."""
    import parity.onnx_export
    import torch_ref.preprocessing
    from jaxcell import train

    seen = {}

    def spy(name, module, attribute, position):
        real = getattr(module, attribute)

        def wrapped(*args, **kwargs):
            seen[name] = args[position]
            return real(*args, **kwargs)
        monkeypatch.setattr(module, attribute, wrapped)

    spy("jax", train, "prepare", 1)
    spy("torch", torch_ref.preprocessing, "standardize", 1)
    spy("onnx", parity.onnx_export, "write_onnx", 1)
    cfg = bench.BenchConfig(model="lightnetcell", image_size=16, batch_size=2, frameworks=("jax", "torch", "onnx"),
                            modes=("infer",), steps=1, warmup=1, model_kwargs=TINY, od_center=True)
    rows = bench.run(cfg, log=lambda m: None)["results"]
    assert all(r["error"] is None and r["od_center"] and r["images_per_s"] > 0 for r in rows)
    assert sorted(seen) == ["jax", "onnx", "torch"]
    assert all(pre["od_center"] and pre["mean"] == [0.0] * 3 for pre in seen.values())
    assert not bench._preprocessing(bench.BenchConfig(model="lightnetcell", image_size=16)).get("od_center")


def test_a_spent_time_budget_skips_runners():
    cfg = bench.BenchConfig(model="lightnetcell", image_size=16, batch_size=2, frameworks=("jax",), modes=("infer",),
                            steps=1, model_kwargs=TINY, deadline=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # not what the harness sets (every core), so that its restoring shows
    try:
        report = bench.run(cfg, log=lambda m: None)
        assert torch.get_num_threads() == 1 and report["environment"]["torch_threads"] == host.cpus()
    finally:
        torch.set_num_threads(threads)
    (row,) = report["results"]
    assert row["error"] == "skipped: time budget spent" and row["images_per_s"] is None
    # what the "jax" rows use
    assert report["environment"]["convolutions"] == kernels.convolutions(kernels.for_devices(jax.devices()[:1]))


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


def test_cli_refuses_an_unknown_framework(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # and back as it was after the test
    code = main(["bench", "--model", "lightnetcell", "--frameworks", "jax,tensorflow", "--json", str(tmp_path / "b.json")])
    assert code == 2
    assert "unknown framework 'tensorflow'" in capsys.readouterr().err
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # set by the command, not by importing the harness


def test_importing_the_harness_changes_nothing():
    """In a fresh process without OMP_WAIT_POLICY: no environment variable and no torch setting
    differs after `import jaxcell.bench` (the harness sets them when it runs)."""
    code = '''if True:
        import json, os, torch
        def snapshot():
            return {"env": dict(os.environ), "threads": torch.get_num_threads(),
                    "interop_threads": torch.get_num_interop_threads(),
                    "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
                    "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
                    "matmul_precision": torch.get_float32_matmul_precision(),
                    "deterministic": torch.are_deterministic_algorithms_enabled(),
                    "default_dtype": str(torch.get_default_dtype())}
        before = snapshot()
        import jaxcell.bench
        print(json.dumps({"before": before, "after": snapshot()}))
    '''
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert "OMP_WAIT_POLICY" not in seen["after"]["env"]
    assert seen["after"] == seen["before"]
