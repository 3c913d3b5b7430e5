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


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The package modules ``module`` imports at run time, at the top or inside functions (not for type
    checking only)."""
    import ast
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            names = [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            while name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in modules and name != module and not module.startswith(name + "."):
                found.add(name)
    return found


def test_no_import_cycles_not_even_through_function_level_imports():
    """The layers import downwards only: a cycle means two stages know about each other."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "explaind_ql").rglob("*.py")}
    graph = {m: _imports(p, m, set(files)) for m, p in files.items()}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, " -> ".join(trail[trail.index(n):] + [n]) if n in trail else n
            if n not in state:
                visit(n, trail + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
