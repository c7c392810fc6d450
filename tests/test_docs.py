"""The documentation points at what the repository holds: every path it cites exists, every raw
benchmark record under bench/results/ is cited, and the CPU tables of docs/benchmarks.md are what
bench/cpu_table.py prints from the records they name."""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# a repository path: starts at a top-level folder of the repository, no spaces, no wildcards
CITED = re.compile(r"(?<![\w./~-])((?:bench|docs|jaxcell|parity|results|tests|torch_ref)/[\w./-]*[\w/])")
TABLE = re.compile(r"<!-- bench/cpu_table\.py (?P<paths>[^>]+?) -->\n(?P<table>(?:\|[^\n]*\n)+)")


def _text(doc: str) -> str:
    with open(os.path.join(ROOT, doc)) as f:
        return f.read()


def _cited(doc: str) -> set[str]:
    """Paths cited in the prose and tables (example command lines, fenced or indented, name files
    a reader makes: not citations)."""
    prose = re.sub(r"```.*?```", "", _text(doc), flags=re.S)
    prose = "\n".join(line for line in prose.splitlines() if not line.startswith("    "))
    return {m.rstrip(".") for m in CITED.findall(prose)}


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_path_exists(doc):
    missing = sorted(p for p in _cited(doc) if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"{doc} cites paths the repository does not have: {missing}"


def test_every_benchmark_record_is_cited():
    """bench/results/ keeps only the raw records a document cites (the file or its folder)."""
    cited = set().union(*(_cited(doc) for doc in DOCS))
    records = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "bench", "results", "**", "*"),
                                                                 recursive=True) if os.path.isfile(p))
    assert records
    uncited = [r for r in records if r not in cited and os.path.dirname(r).rstrip("/") not in
               {c.rstrip("/") for c in cited}]
    assert not uncited, f"records no document cites: {uncited}"


def test_the_readme_layout_names_every_module():
    """Each module of the jaxcell package (or its folder) has a row in the README's layout table, so
    the table follows the tree (a row may name several: `jaxcell/results.py`, `summary.py`)."""
    layout = _text("README.md").split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = {re.sub(r"^jaxcell/", "", p) for p in re.findall(r"`([\w./]+)`", layout)}
    modules = sorted(os.path.relpath(p, os.path.join(ROOT, "jaxcell"))
                     for p in glob.glob(os.path.join(ROOT, "jaxcell", "*.py")) if not p.endswith("__init__.py"))
    folders = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(ROOT, "jaxcell", "*", "__init__.py")))
    missing = [m for m in modules if m not in named] + [f for f in folders if f"{f}/" not in named]
    assert not missing, f"README.md's layout table has no row for: {missing}"


def test_cpu_tables_are_what_their_records_give():
    tables = list(TABLE.finditer(_text("docs/benchmarks.md")))
    assert len(tables) == 4  # AMD EPYC: 64 px, 224 px, torch.compile; Intel Xeon: 64 px
    for match in tables:
        done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cpu_table.py"), *match["paths"].split()],
                              capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT})
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == match["table"].strip(), match["paths"]
