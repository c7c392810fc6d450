"""How the three packages may import each other, checked on the source (every import statement,
at module level or inside a function) and by importing with a framework made unimportable.

    torch_ref  -> jaxcell's plain-Python modules (settings, twins, data, errors): never jax
    parity     -> jaxcell, torch_ref: the only package that imports both frameworks' models
    jaxcell    -> neither, but through the modules in BRIDGES

so the package graph has no cycle, `import torch_ref` works without jax, and jaxcell's training,
evaluation and prediction work without torch.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jaxcell", "torch_ref", "parity")
JAX = {"jax", "jaxlib", "flax", "optax", "orbax"}
TORCH = {"torch", "torchvision"}

# The jaxcell modules allowed to import the other packages, and why. Every other jaxcell module
# imports neither torch_ref nor parity nor torch.
BRIDGES = {
    "jaxcell.cli": "the entry point (`jaxcell`): it dispatches to every package's commands",
    "jaxcell.export": "the one place jaxcell reads or writes torch's files (export, import, predict/serve "
                      "of an exported file, train --init-from); its imports of them are lazy (checked below)",
    "jaxcell.bench": "the benchmark harness measures both frameworks side by side; it is to leave the package",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


SOURCES = _sources()


def imports(name: str) -> list[tuple[str, bool]]:
    """(imported module, inside a function?) for every import statement of module `name`. `from
    a import b` counts as a.b when that is one of ours, else as a."""
    path = SOURCES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[:len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    found.append((sub if sub in SOURCES else base, in_function))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def package_graph() -> dict[str, set[str]]:
    """Package -> the other packages it imports, leaving out the BRIDGES' imports."""
    graph = {p: set() for p in PACKAGES}
    for name in SOURCES:
        if name in BRIDGES:
            continue
        for module, _ in imports(name):
            if _top(module) in PACKAGES and _top(module) != _top(name):
                graph[_top(name)].add(_top(module))
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := walk(start, [start])):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_graph_has_no_cycle():
    graph = package_graph()
    assert cycle(graph) is None, graph
    assert graph == {"jaxcell": set(), "torch_ref": {"jaxcell"}, "parity": {"jaxcell", "torch_ref"}}


def test_torch_ref_reaches_no_jax_through_jaxcell():
    # torch_ref's imports of jaxcell, and everything those import in turn (module or function
    # level), stay clear of jax, flax, optax, orbax and of parity.
    seen, todo = set(), [m for n in SOURCES if _top(n) == "torch_ref" for m, _ in imports(n) if _top(m) == "jaxcell"]
    while todo:
        module = todo.pop()
        if module in seen or module not in SOURCES:
            continue
        seen.add(module)
        for imported, _ in imports(module):
            assert _top(imported) not in JAX | {"parity", "torch_ref"}, f"torch_ref -> ... {module} -> {imported}"
            todo.append(imported)
    assert {"jaxcell.settings", "jaxcell.twins", "jaxcell.data"} <= seen


def test_torch_ref_imports_torch_numpy_pillow_and_no_jax():
    allowed = TORCH | {"numpy", "PIL", "safetensors", "torch_ref", "jaxcell", "__future__"} | sys.stdlib_module_names
    for name in (n for n in SOURCES if _top(n) == "torch_ref"):
        for module, _ in imports(name):
            assert _top(module) in allowed, f"{name} imports {module}"
            assert module != "jaxcell.models" and not module.startswith("jaxcell.models."), f"{name} imports {module}"


def test_only_the_bridges_import_torch_from_jaxcell():
    for name in (n for n in SOURCES if _top(n) == "jaxcell" and n not in BRIDGES):
        for module, _ in imports(name):
            assert _top(module) not in TORCH | {"torch_ref", "parity"}, f"{name} imports {module}"


def test_the_torch_file_bridge_imports_torch_lazily():
    for module, in_function in imports("jaxcell.export"):
        if _top(module) in TORCH | {"torch_ref", "parity"}:
            assert in_function, f"jaxcell.export imports {module} at module level"


def test_nothing_imports_the_entry_point():
    for name in SOURCES:
        if name != "jaxcell.cli":
            assert "jaxcell.cli" not in {m for m, _ in imports(name)}, f"{name} imports jaxcell.cli"


# ----------------------------------------------------------------------------- with a framework blocked

BLOCK = """
import sys
BLOCKED = {blocked!r}
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(name + " is not installed (blocked by the test)")
sys.meta_path.insert(0, Blocked())
"""


def _run(blocked: set[str], code: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", BLOCK.format(blocked=sorted(blocked)) + code, *argv], env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_blocker_blocks():
    done = _run(JAX, "import jax")
    assert done.returncode != 0 and "jax is not installed (blocked by the test)" in done.stderr


def test_torch_ref_imports_without_jax():
    done = _run(JAX, """
import torch_ref, torch_ref.train, torch_ref.explain, torch_ref.io
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("ok")
""")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_torch_trainer_runs_without_jax(tmp_path):
    workdir = tmp_path / "run"
    done = _run(JAX, """
from torch_ref.train import main
code = main(sys.argv[1:])
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
sys.exit(code)
""", "--model", "lightnetcell", "--model-arg", "widths=(4,4,4)", "--model-arg", "hidden=8", "--image-size", "16",
                "--epochs", "1", "--batch-size", "8", "--synthetic-examples", "32", "--workdir", str(workdir))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (workdir / "config.json").is_file() and (workdir / "best.safetensors").is_file()


def test_jaxcell_trains_evaluates_and_predicts_without_torch():
    done = _run(TORCH | {"torch_ref", "parity"}, """
import jaxcell.train, jaxcell.evaluate, jaxcell.inference, jaxcell.cli
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("ok")
""")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize("name", sorted(BRIDGES))
def test_each_bridge_exists_and_crosses(name):
    # An entry here that no longer exists, or no longer imports another package, must go.
    if name not in SOURCES:
        pytest.fail(f"{name} is gone: remove it from BRIDGES")
    assert any(_top(m) in TORCH | {"torch_ref", "parity"} for m, _ in imports(name)), name
