"""Test set-up. Four virtual CPU devices, so sharding is tested on any machine; this must
happen before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAXCELL_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "jaxcell-test-cache"))

from jaxcell import compilation_cache  # noqa: E402

# Compiled programs are kept on disk, as the jaxcell command keeps them: the many subprocesses of the
# suite (CLI runs, multi-process jobs) then compile each program once (set JAXCELL_COMPILATION_CACHE=0
# to compile everything afresh).
compilation_cache.enable()

import pytest  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist (make test runs two workers) the controller builds oneDNN's handler and
    runs its check against XLA once, before the workers start; each worker then reads both from
    the cache instead of compiling the same C++ and running the same battery side by side."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
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
