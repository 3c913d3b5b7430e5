"""The interactive shell (`explaind-ql repl RUN`).

`Repl` is the whole shell minus the terminal, so it can be tested without one:
`handle(text)` takes what the user entered and returns what to print, and
`complete(text)` gives the Tab candidates for the word at the end of `text`.
`interact` is the thin terminal layer: a prompt_toolkit session with a history file,
multi-line editing (Enter submits once the input ends with `;`) and completion; when
stdin is not a terminal it feeds stdin's lines to `handle` instead.

Queries run in the main thread, so Ctrl-C interrupts them (torch checks for signals
between operations); the run is then reopened so no half-filled cache survives.
"""

from __future__ import annotations

import glob
import io
import os
import re
import shutil
import sys
import time
from typing import Any

from ..results.formats import TEXT_FORMATS, format_from_path, frame_text, info_renderable, render_table, write_frame
from ..lang.script import script_queries

HISTORY_ENV = "EXPLAIND_QL_HISTORY"
DEFAULT_HISTORY = "~/.explaind_ql_history"
PROMPT = "eql> "
COMMANDS = (".help", ".info", ".layers", ".timer", ".format", ".explain", ".save", ".run", ".quit")
# `using` option names and the values worth offering (the parser validates them).
OPTIONS = ("budget", "cluster", "device", "dtype", "nodes", "quadrature", "tolerance")
OPTION_VALUES = {"device": ("cpu", "cuda"), "dtype": ("float32", "float64")}

HELP = """\
Queries end with ';' and may span several lines, e.g.
  influence of layer emb on test[0..3]
      by step every 4;
Tab completes keywords, layer and param names, splits and options.
  .help              this text
  .info              the run's summary (steps, layers, splits, optimizer, size)
  .layers            layers and parameter tensors with their sizes
  .timer on|off      print each query's time
  .format FORMAT     result format: table, csv, json or ndjson
  .explain QUERY     the plan a query would run, without running it
  .save FILE         save the last result (format from the extension: .csv .json .ndjson .parquet .txt)
  .run FILE.eql      run a script's queries and print their results
  .quit              leave (or Ctrl-D); Ctrl-C cancels a running query"""

_WORD = re.compile(r"[\w.*$]*\Z")
_CLAUSE = re.compile(r"\b(of|on|from|over|at|by|top|using|with)\b|\(", re.IGNORECASE)
_COMMENT = re.compile(r"--[^\n]*")


def statement_complete(text: str) -> bool:
    """Whether entered text is a whole query: it ends with `;` (comments aside)."""
    return _COMMENT.sub("", text).rstrip().endswith(";")


class Repl:
    """The shell's state and commands over one opened run."""

    def __init__(self, run, fmt: str = "table", params: dict[str, Any] | None = None, scheduler: Any = None):
        self.run = run
        self.fmt = fmt
        self.params = dict(params or {})
        self.scheduler = scheduler  # a Dask scheduler for influence and kernel queries (None: local)
        self.timer = False
        self.last = None  # the last result frame, for .save
        self.done = False
        self.exit_code = 0  # the first failure's (the CLI's codes): what a piped session exits with
        self._lines: list[str] = []

    @property
    def pending(self) -> bool:
        """Whether an unfinished query is waiting for more lines."""
        return bool(self._lines)

    def handle(self, text: str) -> str:
        """Take one entry (a line, or several at once) and return what to print."""
        if not self._lines:
            stripped = text.strip()
            if stripped.startswith("."):
                return self.command(stripped)
            if not _COMMENT.sub("", stripped).strip():
                return ""
        self._lines.append(text)
        whole = "\n".join(self._lines)
        if not statement_complete(whole):
            return ""
        self._lines = []
        return self.execute(whole)

    # ---------------------------------------------------------------- running

    def execute(self, text: str) -> str:
        """Run the `;`-separated queries in `text`; stop at the first error."""
        outputs: list[str] = []
        try:
            for _, query, _ in script_queries(text, self.params):
                outputs.append(self._query(query))
        except KeyboardInterrupt:
            self._reopen()
            outputs.append("cancelled")
            self._failed(130)
        except Exception as exc:  # the shell survives anything a query does
            outputs.append(self._error(exc))
        return "\n\n".join(outputs)

    def _failed(self, code: int) -> None:
        self.exit_code = self.exit_code or code

    def _error(self, exc: BaseException) -> str:
        from ..errors import ExplaindError
        self._failed(exc.exit_code if isinstance(exc, ExplaindError) else 4)
        return _message(exc)

    def _query(self, text: str) -> str:
        from ..results.frames import residual_line
        start = time.perf_counter()
        frame = self.run.query(text, scheduler=self.scheduler, **self.params)
        elapsed = time.perf_counter() - start
        self.last = frame
        out = frame_text(frame, self.fmt).rstrip("\n")
        line = residual_line(self.run.cache.take_stats())
        if line and self.fmt == "table":  # csv and json stay machine-readable
            out += f"\n{line}"
        if self.timer:
            out += f"\n({frame.height} rows, {elapsed:.3f} s)"
        return out

    def _reopen(self) -> None:
        from .. import open as open_run
        self.run = open_run(self.run.path)

    # ---------------------------------------------------------------- dot-commands

    def command(self, line: str) -> str:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        handler = {".help": lambda: HELP, ".info": self._info, ".layers": self._layers,
                   ".timer": lambda: self._timer(arg), ".format": lambda: self._format(arg),
                   ".explain": lambda: self._explain(arg), ".save": lambda: self._save(arg),
                   ".run": lambda: self._run_script(arg), ".quit": self._quit, ".exit": self._quit}.get(name)
        if handler is None:
            self._failed(2)
            return f"unknown command {name}; .help lists the commands"
        try:
            return handler()
        except KeyboardInterrupt:
            self._reopen()
            self._failed(130)
            return "cancelled"
        except Exception as exc:
            return self._error(exc)

    def _info(self) -> str:
        from rich.console import Console
        buffer = io.StringIO()
        Console(file=buffer, width=shutil.get_terminal_size().columns).print(info_renderable(self.run.info()))
        return buffer.getvalue().rstrip()

    def _layers(self) -> str:
        import polars as pl
        layers = self.run.layers()
        space = self.run.space
        params = pl.DataFrame({"param": space.names,
                               "shape": ["×".join(map(str, space.by_name[n].shape)) for n in space.names],
                               "elements": [space.by_name[n].numel for n in space.names]})
        return (render_table(pl.DataFrame({"layer": list(layers), "elements": list(layers.values())}))
                + "\n\n" + render_table(params))

    def _timer(self, arg: str) -> str:
        if arg not in ("on", "off"):
            return "usage: .timer on|off"
        self.timer = arg == "on"
        return f"timer {arg}"

    def _format(self, arg: str) -> str:
        if arg not in TEXT_FORMATS:
            return f"usage: .format {'|'.join(TEXT_FORMATS)}"
        self.fmt = arg
        return f"format {arg}"

    def _explain(self, arg: str) -> str:
        if not arg:
            return "usage: .explain QUERY"
        return self.run.explain(arg, scheduler=self.scheduler, **self.params)

    def _save(self, arg: str) -> str:
        if not arg:
            return "usage: .save FILE"
        if self.last is None:
            return "nothing to save yet: run a query first"
        write_frame(self.last, arg, format_from_path(arg))
        return f"saved {self.last.height} rows to {arg}"

    def _run_script(self, arg: str) -> str:
        if not arg:
            return "usage: .run FILE.eql"
        with open(arg, encoding="utf-8") as f:
            text = f.read()
        outputs = []
        for name, query, line in script_queries(text, self.params):
            try:
                self.last = self.run.query(query, scheduler=self.scheduler, **self.params)
            except Exception as exc:
                outputs.append(f"{arg}, line {line}: {_message(exc)}")
                break
            body = frame_text(self.last, self.fmt).rstrip("\n")
            outputs.append(body if name is None else f"-- {name}\n{body}")
        return "\n\n".join(outputs)

    def _quit(self) -> str:
        self.done = True
        return ""

    # ---------------------------------------------------------------- completion

    def complete(self, text: str) -> tuple[str, list[str]]:
        """(the word at the end of `text`, the candidates that may replace it)."""
        stripped = text.lstrip()
        if stripped.startswith("."):
            name, sep, rest = stripped.partition(" ")
            if not sep:
                return name, [c for c in COMMANDS if c.startswith(name)]
            rest = rest.lstrip()
            choices = {".format": TEXT_FORMATS, ".timer": ("on", "off")}.get(name)
            if choices is not None:
                return rest, [c for c in choices if c.startswith(rest)]
            if name == ".explain":
                return self._complete_query(rest)
            if name in (".save", ".run"):
                return rest, sorted(p + ("/" if os.path.isdir(p) else "") for p in glob.glob(glob.escape(rest) + "*"))
            return rest, []
        return self._complete_query(text.rsplit(";", 1)[-1])

    def _complete_query(self, statement: str) -> tuple[str, list[str]]:
        from ..lang import expected_tokens
        word = _WORD.search(statement).group()
        prefix = statement[: len(statement) - len(word)]
        previous = prefix.split()[-1].lower() if prefix.split() else ""
        candidates: set[str] = set()
        for token in expected_tokens(prefix):
            if token == "<layer or param name>":
                if previous != "param":
                    candidates.update(self.run.layers())
                if previous != "layer":
                    candidates.update(self.run.space.names)
            elif token == "<name>":
                clauses = _CLAUSE.findall(prefix)
                candidates.update(OPTIONS if clauses and clauses[-1].lower() == "using" else self.run.splits)
            elif token == "<value>":
                candidates.update(OPTION_VALUES.get(previous, ()))
            elif token == "<$parameter>":
                candidates.update(f"${name}" for name in self.params)
            elif token[0].isalpha():
                candidates.add(token)
        low = word.lower()
        return word, sorted(c for c in candidates if c.lower().startswith(low))


def _message(exc: BaseException) -> str:
    """What the shell prints for an error: the package's own message, else its type too."""
    import click
    from ..errors import ExplaindError
    if isinstance(exc, ExplaindError):
        return str(exc)
    if isinstance(exc, click.ClickException):
        return exc.format_message()
    if isinstance(exc, OSError):
        return f"error: {exc}"
    return f"internal error ({type(exc).__name__}): {exc}"


# ------------------------------------------------------------------------------ terminal

def history_path() -> str:
    return os.path.expanduser(os.environ.get(HISTORY_ENV) or DEFAULT_HISTORY)


def interact(run_path, fmt: str = "table", params: dict[str, Any] | None = None, scheduler: Any = None) -> int:
    """Run the shell on a terminal (prompt_toolkit), or over stdin's lines when piped; the exit code: 0, or
    for a piped session the first error's (2 syntax, 3 semantic, 4 runtime), as ``explaind-ql query`` would."""
    from .. import open as open_run
    repl = Repl(open_run(run_path), fmt, params, scheduler)
    if not sys.stdin.isatty():
        _batch(repl)
        return repl.exit_code
    session = _session(repl)
    print(f"{repl.run!r}\nqueries end with ';' · .help for commands · Ctrl-D to quit")
    while not repl.done:
        try:
            text = session.prompt(PROMPT)
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the input
            continue
        except EOFError:
            break
        try:
            out = repl.handle(text)
        except KeyboardInterrupt:  # landed outside the query itself (e.g. while printing)
            out = "cancelled"
        if out:
            print(out, flush=True)
    return 0


def _batch(repl: Repl) -> None:
    for line in sys.stdin:
        out = repl.handle(line.rstrip("\n"))
        if out:
            print(out, flush=True)
        if repl.done:
            return
    if repl.pending:
        print("unfinished query ignored: queries end with ';'")


def _session(repl: Repl):
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import Completer, Completion
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    class _Completer(Completer):
        def get_completions(self, document, complete_event):
            word, candidates = repl.complete(document.text_before_cursor)
            for candidate in candidates:
                yield Completion(candidate, start_position=-len(word))

    keys = KeyBindings()

    @keys.add("enter")
    def _enter(event) -> None:
        """Submit dot-commands and queries ending in `;`; otherwise start a new line."""
        buffer = event.current_buffer
        buffer.complete_state = None  # accept the highlighted completion, if any
        text = buffer.text.strip()
        if not text or text.startswith(".") or statement_complete(text):
            buffer.validate_and_handle()
        else:
            buffer.insert_text("\n")

    path = history_path()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return PromptSession(history=FileHistory(path), completer=_Completer(), key_bindings=keys,
                         multiline=True, complete_while_typing=False,
                         prompt_continuation=lambda width, line, soft: "...> ".rjust(width))
