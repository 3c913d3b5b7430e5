"""Every command in README.md runs, as written (the issue: "every command in it is tested").

- ``bash`` blocks: the install and test commands are the ones ``.ci/run`` runs (CI runs them;
  running them inside pytest would recurse); every other command is run in a fresh directory.
- ``python`` blocks: executed in order, in one namespace, in a fresh working directory.
- the ``>>>`` block ("the language at a glance"): each query runs on the toy transformer and
  prints the table shown (``python docs/examples.py --readme`` regenerates it).
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [body for tag, body in FENCE.findall(README) if tag == lang]


def commands(lang: str = "bash") -> list[str]:
    return [line.strip() for body in blocks(lang) for line in body.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def ci_commands() -> dict[str, str]:
    """``.ci/run``'s lines marked ``# README: install`` and ``# README: test``, by mark."""
    marked = {}
    for line in (ROOT / ".ci/run").read_text().splitlines():
        m = re.match(r"\s*(.+?)\s+# README: (\w+)", line)
        if m:
            marked[m[2]] = m[1]
    return marked


def canonical(cmd: str) -> list[str]:
    """A command without CI's output-only flags: ``python -m pip`` is ``pip``; ``--quiet``/``-q`` and
    ``-p no:cacheprovider`` (no .pytest_cache in the clone) change what is printed or left behind,
    not what is installed or tested."""
    words = shlex.split(cmd)
    if words[:3] == ["python", "-m", "pip"]:
        words = words[2:]
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w == "-p":
            skip = True
        elif w not in ("--quiet", "-q"):
            out.append(w)
    return out


def test_install_and_test_commands_are_the_ones_ci_runs():
    ci = ci_commands()
    readme = commands()
    install = [c for c in readme if "pip install" in c]
    tests = [c for c in readme if "pytest" in c]
    assert install == ['pip install ".[test]"'] and tests == ["python -m pytest"]
    assert canonical(ci["install"]) == canonical(install[0])
    assert canonical(ci["test"]) == canonical(tests[0])
    # the README's order: install, then test
    assert readme.index(install[0]) < readme.index(tests[0])


def other_commands() -> list[str]:
    return [c for c in commands() if "pip install" not in c and "pytest" not in c]


def demo_output(out: str, cwd: Path) -> None:
    """The demo recorded its run under $TMPDIR, ran its five queries and said where the store is."""
    assert out.count(">>> ") == 5 and out.count("shape: (") == 5, out[-3000:]
    stores = list(cwd.glob("explaind-ql-demo-*/*.zarr"))
    assert len(stores) == 1, out[-2000:]
    assert f"explaind-ql repl {stores[0]}" in out and "total" in out


# what each README command must print; a command added to the README needs an entry here
EXPECTED = {"explaind-ql demo": demo_output}


def test_every_other_readme_command_has_its_check():
    assert other_commands() and set(other_commands()) <= set(EXPECTED)


@pytest.mark.parametrize("cmd", other_commands())
def test_bash_command_runs_as_written(cmd, tmp_path):
    """Run as written, in a fresh directory that is also $TMPDIR (the full demo: ~1 min on 2 cores)."""
    words = shlex.split(cmd)
    exe = Path(sys.executable).parent / words[0]  # this interpreter's console script, where it has one
    argv = [str(exe) if exe.exists() else words[0], *words[1:]]
    done = subprocess.run(argv, cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    EXPECTED[cmd](done.stdout, tmp_path)


def run_block(body: str, name: str, namespace: dict) -> list[tuple[ast.expr, object]]:
    """Execute a block statement by statement; each expression statement's node and value."""
    values = []
    for node in ast.parse(body).body:
        if isinstance(node, ast.Expr):
            code = compile(ast.Expression(node.value), name, "eval")
            values.append((node.value, eval(code, namespace)))  # noqa: S307 - the README's own code
        else:
            exec(compile(ast.Module([node], []), name, "exec"), namespace)  # noqa: S102
    return values


def called(node: ast.expr) -> tuple[str, object]:
    """``("query", "its text")`` for ``run.query("...")``, likewise ``compare`` and ``print``."""
    if not isinstance(node, ast.Call):
        return "", None
    fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    first = node.args[0] if node.args else None
    return fn, first.value if isinstance(first, ast.Constant) else None


def test_python_blocks_run_in_order_in_one_namespace(tmp_path, monkeypatch):
    import polars as pl

    import explaind_ql

    code = blocks("python")
    assert len(code) == 3 and "Recorder(" in code[0] and "compare(" in code[1] and "Callback(" in code[2]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    values = [v for i, body in enumerate(code) for v in run_block(body, f"README.md python block {i + 1}", namespace)]

    for store in ("runs/grok.zarr", "runs/grok-wd4.zarr"):  # the stores the snippets name, recorded
        assert explaind_ql.open(store).n_steps == 50
    results = {called(node): value for node, value in values}
    frames = {text: v for (fn, text), v in results.items() if fn == "query"}
    assert all(isinstance(v, pl.DataFrame) and v.height for v in frames.values()) and len(frames) == 6
    by_layer = frames["influence on test[*] by layer"]
    assert set(by_layer["layer"]) == {"emb", "attn", "linear1", "linear2", "unembed"}
    top = frames["influence of layer emb on test[0..9] over steps 10:40 by example top 5 abs"]
    ranked = top.head(5)  # the five examples, then the terms that are not examples
    assert ranked["example"].null_count() == 0 and ranked["influence"].abs().is_sorted(descending=True)
    assert top.height == 5 + top["example"].null_count()
    check = frames["check on test[*]"]
    assert check.height == 60 and float(check["relative_residual"].max()) < 1e-5
    both = next(v for (fn, _), v in results.items() if fn == "compare")
    assert set(both["run"]) == {"wd1", "wd4"} and both.height == 2 * by_layer.height
    assert ("print", None) in results  # the explain line printed its plan
    # Hugging Face: the Trainer's run, recorded by the callback, rebuilt from its config
    assert explaind_ql.open("runs/gpt2.zarr").n_steps == 20
    assert "transformer.h.1.mlp.c_fc" in set(frames["influence on loss(test[0..3]) by layer"]["layer"])
    sequences = frames["influence on loss(test[0]) by example top 5 abs"]
    assert sequences.head(5)["example"].null_count() == 0 and sequences.height == 5 + sequences["example"].null_count()
    assert float(frames["check on loss(test[*])"]["relative_residual"].abs().max()) < 1e-4


# -- the language at a glance ----------------------------------------------------------------------

def _docs_examples():
    spec = importlib.util.spec_from_file_location("docs_examples", ROOT / "docs" / "examples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def glance() -> list[tuple[str, str]]:
    """(query, printed table) for each ``>>>`` of the README."""
    body = next(b for b in blocks("") if b.startswith(">>> "))
    return [(part.split("\n", 1)[0].strip(), part.split("\n", 1)[1].strip())
            for part in body.split(">>> ")[1:]]


def cells(table: str) -> list[list[str]]:
    """A polars table's cells, row by row (header first; border lines dropped)."""
    rows = [line for line in table.splitlines() if line.startswith("│")]
    return [[c.strip() for c in line.strip("│").split("┆")] for line in rows]


# check's error columns are rounding noise under the tolerance: they differ between machines and
# engine versions, so the README's values and today's are both held to the default tolerance
NOISE = {"residual", "relative_residual", "rounding", "max_update_error", "max_replay_drift"}


def same(column: str, a: str, b: str) -> bool:
    """Equal text, or numbers equal to the printed precision (noise columns: both under 1e-6)."""
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    if column in NOISE:
        return abs(x) < 1e-6 and abs(y) < 1e-6
    return math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-12)


def test_five_queries_with_their_real_output():
    shown = glance()
    examples = _docs_examples()
    assert [q for q, _ in shown] == examples.README_EXAMPLES and len(shown) == 5
    assert all(cells(t) for _, t in shown), "every query is shown with its output"


def test_glance_tables_are_what_the_tool_prints_now(toy_run):
    import explaind_ql

    examples = _docs_examples()
    run = explaind_ql.open(toy_run("transformer", "adamw", steps=12))
    with examples.readme_config():
        for query, table in glance():
            now = str(run.query(query))
            got, want = cells(now), cells(table)
            assert len(got) == len(want) and got[0] == want[0] and all(
                len(g) == len(w) and all(map(same, got[0], g, w)) for g, w in zip(got[1:], want[1:])), \
                f"README output of {query!r} is stale; regenerate with python docs/examples.py --readme:\n{now}"


def language_examples() -> list[tuple[str, str]]:
    """(query, printed output) of each ``>>>`` block of docs/language.md's "Examples with real output"."""
    text = (ROOT / "docs" / "language.md").read_text().split("## Examples with real output", 1)[1]
    return [(body[4:].split("\n", 1)[0], body.split("\n", 1)[1].rstrip("\n"))
            for tag, body in FENCE.findall(text) if body.startswith(">>> ")]


def _masked(text: str) -> list[str]:
    """Plan text with its machine-dependent numbers (budget, estimate, timings) masked, sizes with their units."""
    return [re.sub(r"[0-9][0-9.,e+-]*( [KMGT]?i?B\b)?", "#", line) for line in text.splitlines()]


def test_the_language_docs_examples_are_what_the_tool_prints_now(toy_run):
    import polars as pl

    import explaind_ql
    examples = _docs_examples()
    shown = language_examples()
    assert [q for q, _ in shown] == examples.EXAMPLES
    run = explaind_ql.open(toy_run("transformer", "adamw", steps=12))
    with pl.Config(tbl_rows=12, tbl_width_chars=160, tbl_cols=10, fmt_str_lengths=110):
        for query, printed in shown:
            if query.startswith("explain"):
                assert _masked(run.explain(query.removeprefix("explain "))) == _masked(printed), \
                    f"docs/language.md's plan of {query!r} is stale; regenerate with python docs/examples.py"
                continue
            now = str(run.query(query))
            got, want = cells(now), cells(printed)
            assert len(got) == len(want) and got[0] == want[0] and all(
                len(g) == len(w) and all(map(same, got[0], g, w)) for g, w in zip(got[1:], want[1:])), \
                f"docs/language.md's output of {query!r} is stale; regenerate with python docs/examples.py:\n{now}"
