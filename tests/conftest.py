"""Test set-up. Four virtual CPU devices, so sharding is tested on any machine; this must
happen before jax is imported anywhere."""

import os
import subprocess
import sys
import threading

os.environ.setdefault("JAXCELL_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "jaxcell-test-cache"))


def _xla_takes(flag: str) -> bool:
    """Whether this jaxlib's XLA knows the flag: XLA aborts a process whose XLA_FLAGS names one it
    does not, so a child process tries it (once per jaxlib version: the answer is kept in the cache)."""
    from importlib.metadata import version

    known = os.path.join(os.environ["JAXCELL_CACHE"], "xla-flags", f"jaxlib-{version('jaxlib')}-{flag.lstrip('-')}")
    if not os.path.exists(known):
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"], capture_output=True,
                               env={**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"})
        os.makedirs(os.path.dirname(known), exist_ok=True)
        with open(known, "w") as f:
            f.write("yes" if probe.returncode == 0 else "no")
    with open(known) as f:
        return f.read() == "yes"


def _compile_flags() -> str:
    """XLA flags that make the suite's thousands of small programs cheap to compile. At XLA:CPU's
    default level most of a compilation is LLVM optimizing the generated code; at LLVM's level 0
    most of what is left is the MLIR pipeline of XLA's newer fusion emitters, which its classic
    emitters do without. Together the two flags compile a tiny BRIN training step in 0.24 of the
    time of XLA's default level and a tiny LightNetCell's in 0.15, and the suite's CPU time falls by
    about a third against level 0 alone (README, "Tests"). The code they produce is slower (a BRIN
    step 1.8x, a ResNet18 step at 16 px 3.6x), which the tests' few steps do not feel. The checks do
    not change: float32 results move in their last bits, inside every tolerance, and bit-identity
    tests compare programs compiled alike. The flags travel to the child processes tests start,
    training jobs included (test_multihost's launch): those check how processes work together,
    which no compile flag changes; `make run` trains as users do. JAXCELL_TEST_XLA_OPT=default runs
    the suite at XLA's defaults."""
    flags = [os.environ.get("XLA_FLAGS", "")]  # any given from outside
    if os.environ.get("JAXCELL_TEST_XLA_OPT", "fast") == "default":
        return flags[0]
    flags.append("--xla_backend_optimization_level=0")
    if _xla_takes("--xla_cpu_use_fusion_emitters=false"):  # an XLA that has dropped the classic ones lacks it
        flags.append("--xla_cpu_use_fusion_emitters=false")
    return " ".join(flags).strip()


# Computed once, by pytest-xdist's controller; its workers inherit it.
if "JAXCELL_TEST_XLA_FLAGS" not in os.environ:
    os.environ["JAXCELL_TEST_XLA_FLAGS"] = _compile_flags()


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for this process (4 devices) and for the child processes tests start (the device
    count last: of two counts, XLA takes the last)."""
    return f"{os.environ['JAXCELL_TEST_XLA_FLAGS']} --xla_force_host_platform_device_count={devices}".strip()


os.environ["XLA_FLAGS"] = xla_flags(4)

from jaxcell import compilation_cache  # noqa: E402

# Compiled programs are kept on disk, as the jaxcell command keeps them: the many subprocesses of the
# suite (CLI runs, multi-process jobs) then compile each program once (set JAXCELL_COMPILATION_CACHE=0
# to compile everything afresh).
compilation_cache.enable()

import pytest  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist (make test runs two workers) the controller builds oneDNN's handler and
    runs its check against XLA once, in a thread, while the workers start and collect; a worker
    that needs either before it is done waits for it (the build and the check take a lock in the
    cache) and then reads it from the cache."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        threading.Thread(target=_prepare_onednn, name="onednn build and check").start()


def _prepare_onednn() -> None:
    from jaxcell import onednn

    if onednn.available():
        onednn.verdict()


DEV_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "all4class-dev")


def dev_data_path() -> str:
    """Where the real development subset is looked for (it may be absent)."""
    return os.path.abspath(os.environ.get("JAXCELL_DEV_DATA", DEV_DATA))


@pytest.fixture(scope="session")
def dev_data() -> str:
    """The real development subset, when it is beside the checkout."""
    path = dev_data_path()
    if not os.path.isdir(path):
        pytest.skip(f"real data not found at {path} (set JAXCELL_DEV_DATA)")
    return path


@pytest.fixture
def onednn_built() -> None:
    """Skips the test where jaxcell.onednn's handler is not built here (its warning says why)."""
    from jaxcell import onednn

    if not onednn.available():
        pytest.skip("oneDNN convolutions are not built here (see the warning)")
