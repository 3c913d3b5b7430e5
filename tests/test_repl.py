"""The REPL core without a terminal, the real shell in a pseudo-terminal, progress bars, notebook magics."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import time

import polars as pl
import pytest

import explaind_ql as eq
from explaind_ql import progress
from explaind_ql.shells.repl import Repl, statement_complete

# Distinct heavy queries (each several seconds; identical ones would hit the engine's caches),
# submitted at once so there is a long-running query to interrupt.
# five distinct (not cached) queries of over a second each: a fixed 64-node rule, which refinement cannot shorten
SLOW = " ".join(f"kernel on output(test[{items}]) from train[*] by step, layer using quadrature 64;"
                for items in ("0..3", "1..4", "0..2", "2..4", "0, 4"))






@pytest.fixture
def repl(run_path) -> Repl:
    return Repl(eq.open(run_path), params={"k": 1})


# ------------------------------------------------------------------------------ the core

def test_queries_end_at_semicolon_and_may_span_lines(repl):
    assert repl.handle("influence on test[0..1]") == "" and repl.pending
    assert repl.handle("  -- a comment; not the end") == ""
    out = repl.handle("  by layer;")
    assert not repl.pending and out.splitlines()[0].split() == ["layer", "term", "influence"]
    assert "linear1" in out and repl.last.height == 10
    assert statement_complete("check on test; -- done") and not statement_complete("check -- ;")


def test_several_queries_and_params(repl):
    out = repl.handle("check on test[0]; influence on test[0..$k] by layer;")
    assert "explained" in out and "linear1" in out
    assert repl.last.columns == ["layer", "term", "influence"]


def test_errors_are_caret_messages_and_the_shell_goes_on(repl):
    out = repl.handle("influence of layer nope on test[0];")
    assert out.startswith("error at line 1") and out.splitlines()[-1].strip() == "^"
    assert repl.handle("influnce;").startswith("syntax error")
    assert "explained" in repl.handle("check on test[0];")


def test_dot_commands(repl, tmp_path):
    assert ".save FILE" in repl.handle(".help")
    assert "AdamW" in repl.handle(".info") and "linear1" in repl.handle(".info")
    layers = repl.handle(".layers")
    assert "unembed" in layers and "linear1.weight" in layers and "16×8" in layers
    assert repl.handle(".timer on") == "timer on"
    assert repl.handle(".format csv") == "format csv"
    out = repl.handle("influence on test[0..1] by layer;")
    assert out.startswith("layer,term,influence") and out.splitlines()[-1].startswith("(10 rows, ")
    assert repl.handle(".format xml").startswith("usage")
    assert "Contract" in repl.handle(".explain influence on test[*] by layer;")
    assert repl.handle(".save " + str(tmp_path / "last.parquet")) == f"saved 10 rows to {tmp_path / 'last.parquet'}"
    assert pl.read_parquet(tmp_path / "last.parquet").equals(repl.last)
    assert "cannot tell the format" in repl.handle(".save " + str(tmp_path / "last.xyz"))
    script = tmp_path / "s.eql"
    script.write_text("param $n = 1;\ncheck on test[0..$n] as checks;\ninfluence on test[0] by layer;\n")
    out = repl.handle(f".run {script}")
    assert out.startswith("-- checks\ntest,actual") and repl.last.columns == ["layer", "term", "influence"]
    assert repl.handle(".nope").startswith("unknown command")
    assert repl.handle(".quit") == "" and repl.done


def test_cancelled_query_reopens_the_run(repl, monkeypatch):
    before = repl.run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(before, "query", interrupted)
    assert repl.handle("check on test[0];") == "cancelled"
    assert repl.run is not before and "explained" in repl.handle("check on test[0];")


@pytest.mark.parametrize("text, word, expected", [
    ("influence of layer lin", "lin", ["linear1", "linear2"]),
    ("influence of param linear1.", "linear1.", ["linear1.bias", "linear1.weight"]),
    ("influence of layer emb, l", "l", ["layer"]),
    ("influence o", "o", ["of", "on", "over"]),
    ("influence on t", "t", ["test", "train"]),
    ("kernel on test[0] from tr", "tr", ["train"]),
    ("influence on test[*] using d", "d", ["device", "dtype"]),
    ("influence on test[*] using dtype f", "f", ["float32", "float64"]),
    ("influence on test[", "", ["$k"]),
    ("check on test[0]; ev", "ev", ["evaluate"]),
    ("influence on test[$", "$", ["$k"]),
    (".fo", ".fo", [".format"]),
    (".format n", "n", ["ndjson"]),
    (".timer ", "", ["on", "off"]),
    (".explain influence on te", "te", ["test"]),
])
def test_completion(repl, text, word, expected):
    assert repl.complete(text) == (word, expected)


def test_completion_of_paths(repl, tmp_path):
    (tmp_path / "analysis.eql").write_text("")
    assert repl.complete(f".run {tmp_path}/ana") == (f"{tmp_path}/ana", [f"{tmp_path}/analysis.eql"])


# ------------------------------------------------------------------------------ the terminal

@contextlib.contextmanager
def _shell(run_path: str, history):
    """The installed `explaind-ql repl` in a pseudo-terminal; it must have exited cleanly at the end."""
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "EXPLAIND_QL_HISTORY": str(history), "PROMPT_TOOLKIT_NO_CPR": "1",
           "OMP_NUM_THREADS": "1", "TERM": "xterm"}
    # Ctrl-C must reach it as SIGINT: a process started in the background (CI's runner) ignores SIGINT, and an
    # ignored signal stays ignored across exec, so the shell would never see the interrupt
    child = pexpect.spawn("explaind-ql", ["repl", run_path], env=env, dimensions=(40, 200), encoding="utf-8",
                          timeout=90, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect("eql>")
        yield child
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_shell_in_a_pseudo_terminal(run_path, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    history = tmp_path / "history"
    with _shell(run_path, history) as child:
        # a query over two lines: Enter without ';' continues it
        child.send("influence on test[0..1]\r")
        child.expect(r"\.\.\.>")
        child.send("by layer;\r")
        child.expect(r"unembed\s+weight_decay")
        child.expect("eql>")
        # Tab completes a layer name
        child.send("influence of layer lin")
        time.sleep(0.3)
        child.send("\t")
        child.expect("linear")
        child.send("1 on test[0..1] by layer;\r")
        child.expect(r"linear1\s+gradient")
        child.expect("eql>")
        # a dot-command
        child.send(".layers\r")
        child.expect(r"linear1\.weight\s+16×8")
        child.expect("eql>")
        # Ctrl-C interrupts a running query; the shell then works as before. The queries come from a script
        # (a short line to type), and Ctrl-C is sent once the first one's progress bar shows that it runs
        slow = tmp_path / "slow.eql"
        slow.write_text(SLOW.replace("; ", ";\n"))
        child.send(f".run {slow}\r")
        child.expect(r"steps 0:12")  # the first query's progress bar: it is running, and the tty is cooked
        time.sleep(0.5)
        child.sendintr()
        child.expect("cancelled", timeout=30)
        child.expect("eql>")
        child.send("check on test[0];\r")
        child.expect(r"test\s+actual\s+explained")
        child.expect("eql>")
        # Ctrl-D leaves
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    assert "check on test[0];" in history.read_text()

    # history survives a restart: Up recalls the last query
    with _shell(run_path, history) as child:
        child.send("\x1b[A")
        time.sleep(0.3)
        child.send("\r")
        child.expect(r"test\s+actual\s+explained")
        child.expect("eql>")
        child.send(".quit\r")
        child.expect(pexpect.EOF)


# ------------------------------------------------------------------------------ progress

class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_without_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.enabled()
    with progress.task("contract", total=10) as task:
        for _ in range(10):
            task.advance()
    assert sys.stderr.getvalue() == ""


def test_progress_draws_on_a_terminal_unless_disabled(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _FakeTerminal())
    with progress.task("contract", total=4) as outer:
        with progress.task("replay", total=2) as inner:  # nested tasks share one display
            inner.advance(2)
        outer.advance(4)
    assert "contract" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", _FakeTerminal())
    monkeypatch.setattr(progress, "_enabled", progress._enabled)  # restored after the test
    progress.set_enabled(False)
    with progress.task("contract", total=4) as task:
        task.advance()
    assert sys.stderr.getvalue() == ""


# ------------------------------------------------------------------------------ notebooks

def test_ipython_magics(run_path, tmp_path, monkeypatch):
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path))  # the shell's history database goes there
    shell_module = pytest.importorskip("IPython.core.interactiveshell")
    from IPython.core.error import UsageError
    ip = shell_module.InteractiveShell.instance()
    ip.run_line_magic("load_ext", "explaind_ql")
    frame = ip.run_line_magic("eql", f"{run_path} influence on test[0..1] by layer")
    assert frame.equals(eq.query(run_path, "influence on test[0..1] by layer"))
    ip.user_ns.update(r=run_path, last=1)
    cell = "check on test[0];\n-- the last query's frame is returned\ninfluence on test[0..$last] by layer;"
    assert ip.run_cell_magic("eql", "r", cell).equals(frame)
    assert ip.run_line_magic("eql", f'"{run_path}" check on test[0]')["test"].to_list() == [0]
    with pytest.raises(UsageError, match="unknown layer 'nope'"):
        ip.run_line_magic("eql", f"{run_path} influence of layer nope")
    with pytest.raises(UsageError, match="usage"):
        ip.run_line_magic("eql", "r")


def test_an_influence_table_shows_its_replication_residual(repl):
    out = repl.handle("influence on test[*] by layer;")
    assert out.splitlines()[-1].startswith("replication residual ") and "adaptive to 1e-06" in out
    assert "replication residual" not in repl.handle("check on test[0];")  # check reports it as columns
