"""The checks CI runs: ruff's pyflakes rules over the package, tests, benchmarks and examples; mypy on the
language and the planner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "explaind_ql", "tests", "bench", "docs", "examples"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_finds_nothing_in_the_language_and_the_planner():
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "explaind_ql/lang", "explaind_ql/plan"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
