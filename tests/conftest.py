"""Test set-up. Four virtual CPU devices, so sharding is tested on any machine; this must
happen before jax is imported anywhere."""

import os
import threading

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

# The suite compiles thousands of programs and runs each a few steps, and much of an XLA:CPU
# compilation is LLVM optimizing the generated code. At LLVM's level 0 the suite's compile time
# falls by about a third and its CPU time by 11-15% (README, "Tests", has the figures). The checks
# do not change: float32 results move in their last bits, inside every tolerance, and bit-identity
# tests compare programs compiled alike. Child processes inherit the level, except the training
# jobs that set their own XLA_FLAGS (the multi-process and SLURM jobs, the torch-free install run,
# the fine-tuning run): they compile at XLA's default level, as users' jobs do.
# JAXCELL_TEST_XLA_OPT=default runs the whole suite at the users' level.
if os.environ.get("JAXCELL_TEST_XLA_OPT", "0") != "default":
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAXCELL_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "jaxcell-test-cache"))

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
