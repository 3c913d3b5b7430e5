"""The checks CI runs: ruff's pyflakes rules over the package, tests, benchmarks and examples; mypy on the
language, the planner and the store; the store interface's boundary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "explaind_ql", "tests", "bench", "docs", "examples"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_finds_nothing_in_the_language_the_planner_and_the_store():
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "explaind_ql/lang", "explaind_ql/plan",
                          "explaind_ql/store"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_only_the_store_imports_the_storage_libraries():
    """The store interface holds: a backend is swapped in store/ alone."""
    import ast
    offenders = []
    for path in sorted((ROOT / "explaind_ql").rglob("*.py")):
        if "store" in path.relative_to(ROOT / "explaind_ql").parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("zarr", "xarray", "numcodecs")]
    assert not offenders
