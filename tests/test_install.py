"""The dependency sets (pyproject.toml): jaxcell trains with torch not importable, so a GPU node
needs no torch; torch and oneDNN's CPU wheels are extras."""

import os
import re
import subprocess
import sys
import tomllib

from conftest import xla_flags
from test_multihost import ARGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torch and its submodules cannot be imported; the run fails if anything on its path tries
WITHOUT_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("torch is not installed (blocked by the test)")
sys.meta_path.insert(0, NoTorch())
from jaxcell.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules, "torch was imported"
sys.exit(code)
"""


def test_training_runs_without_torch(tmp_path):
    workdir = str(tmp_path / "run")
    # test_multihost's one-device reference run: whichever of the two runs second reads the other's
    # compiled training programs from the compilation cache
    argv = [*ARGS, "--input-pipeline", "host", "--workdir", workdir]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *argv], env=env, capture_output=True, text=True,
                          timeout=500)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "trained lightnetcell" in done.stdout
    assert os.path.isfile(os.path.join(workdir, "metrics.jsonl"))


def test_torch_and_onednn_are_extras_not_core():
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    name = lambda req: req.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip()  # noqa: E731
    core = {name(r) for r in project["dependencies"]}
    assert not core & {"torch", "onednn-cpu-gomp", "onednn-devel-cpu-gomp"}, core
    extras = {k: {name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    assert extras["torch"] == {"torch"} and extras["cpu"] == {"onednn-cpu-gomp", "onednn-devel-cpu-gomp"}
    assert {r.split(";")[0] for r in project["optional-dependencies"]["cuda12"]} == {"jax[cuda12]>=0.7"}
    assert "cuda13" in extras
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    installed = re.search(r'pip install --quiet -e "\.\[([a-z0-9,]+)\]"', makefile)
    assert installed, "the Makefile installs jaxcell with extras"
    # the CPU set-up keeps everything the tests use
    assert {"torch", "cpu", "serve", "edge", "test"} <= set(installed.group(1).split(","))
