"""The `explaind-ql` command line: one-shot queries, .eql scripts, the REPL, run summaries.

Only click and the standard library are imported at module level; everything that pulls
in torch or polars is imported inside the commands, so `explaind-ql --help` stays fast.
Errors are printed as the language's one-line (caret) messages, never as tracebacks,
and map to exit codes: 2 usage or syntax, 3 semantic, 4 runtime (store, budget, ...).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

import click

from ..results.formats import FORMATS, SUFFIX, TEXT_FORMATS, format_from_path, frame_text, info_renderable, write_frame

_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")
_TRAILING_SEMICOLON = re.compile(r";(\s|--[^\n]*)*\Z")


# ------------------------------------------------------------------------------ values

def typed_value(text: str) -> int | float | str:
    """A `--param` value: int if int-like, float if float-like, else the string."""
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def _params(ctx, param, values: Iterable[str]) -> dict[str, int | float | str]:
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", ctx, param)
        out[name.strip().lstrip("$")] = typed_value(value.strip())
    return out


def with_options(text: str, params: dict[str, Any], device: str | None = None, dtype: str | None = None,
                 scheduler: str | None = None) -> str:
    """`text` with `--device`/`--dtype`/`--scheduler` merged into its `using` clause (added if missing).

    A value the query already sets differently is a usage error rather than a silent
    override: the query text is what gets shared and re-run, so it must stay truthful.
    `--scheduler ADDRESS` becomes `cluster "ADDRESS"`.
    """
    wanted = {name: value.lower() for name, value in (("device", device), ("dtype", dtype)) if value}
    if scheduler:
        wanted["cluster"] = scheduler
    if not wanted:
        return text
    from ..lang import parse
    query = parse(text, params)
    if query.options is not None:
        for name, value in list(wanted.items()):
            given = query.options.get(name)
            if given is not None and str(given) != value:
                flag = "scheduler" if name == "cluster" else name
                raise click.UsageError(f"--{flag} {value} conflicts with 'using {name} {given}' in the query")
            if given is not None:
                del wanted[name]
    if not wanted:
        return text
    added = ", ".join(f"{name} {_quoted(v) if name == 'cluster' else v}" for name, v in wanted.items())
    if query.options is not None:  # options may come in any order: put ours first
        at = query.options.pos + len("using")
        return f"{text[:at]} {added},{text[at:]}"
    return f"{_TRAILING_SEMICOLON.sub('', text)}\nusing {added}"  # a new line: the text may end in a comment


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------------------ frames out

def _echo_frame(frame, fmt: str) -> None:
    text = frame_text(frame, fmt).rstrip("\n")
    if text:
        click.echo(text)


# ------------------------------------------------------------------------------ running

def expand_run_options(runs: Iterable[str]) -> dict[str, str]:
    """`--run` values as run name -> path: `NAME=PATH` named by the user, paths and globs by the shortest
    tail of their path that tells them apart; every value must match a run."""
    from ..api import expand_runs
    named: dict[str, str] = {}
    paths: list[str] = []
    for value in runs:
        name, sep, path = value.partition("=")
        if sep and name and "/" not in name and not Path(value).exists():
            if name in named:
                raise click.UsageError(f"two --run values are named '{name}'; give each its own name")
            named[name] = path
            continue
        if not expand_runs([value]):
            raise click.BadParameter(f"no run matches {value!r}", param_hint="--run")
        paths.append(value)
    found = {name: str(path) for name, path in expand_runs(paths).items()}
    clash = set(found) & set(named)
    if clash:
        raise click.UsageError(f"the name '{sorted(clash)[0]}' is given to a --run and also names another run's "
                               "path; choose another name")
    return {**named, **found}


class _Target:
    """What queries run on: one opened run, or several runs compared (`--run`)."""

    def __init__(self, run_path: str | None, runs: dict[str, str] | None):
        from .. import open as open_run
        # opened once: the REPL's queries then share each run's engine and cached results
        self.runs = None if runs is None else {name: open_run(path) for name, path in runs.items()}
        if runs is None:
            self.run = open_run(run_path)

    def query(self, text: str, params: dict[str, Any]):
        if self.runs is not None:
            from ..api import compare
            return compare(self.runs, text, **params)
        return self.run.query(text, **params)

    def columns(self, text: str, params: dict[str, Any]) -> list[str]:
        """The columns ``text``'s frame will have, from its measure's schema (nothing runs)."""
        from ..lang import parse
        from ..measures import MEASURES, bind
        run = self.run if self.runs is None else next(iter(self.runs.values()))
        q = parse(text, params)
        if q.explain:
            return ["plan"]
        bound = bind(q, run)
        return (["run"] if self.runs is not None else []) + list(MEASURES[bound.measure].schema(bound, run))

    def echo_residual(self) -> None:
        """Under a result: the replication residual it achieved (stderr, so piped tables stay clean)."""
        from ..results.frames import residual_line
        line = None if self.runs is not None else residual_line(self.run.cache.take_stats())
        if line:
            click.echo(line, err=True)


def _split_args(args: tuple[str, ...], runs: tuple[str, ...], what: str, join: bool) -> tuple[str | None, str]:
    if runs:
        if len(args) > 1 and (not join or Path(args[0]).exists()):
            raise click.UsageError(f"with --run give only {what}; the runs come from --run")
        return None, " ".join(args)
    if len(args) < 2 or (len(args) > 2 and not join):
        raise click.UsageError(f"expected RUN and {what} (or --run PATH ... and {what} to compare runs)")
    return args[0], " ".join(args[1:])


def _checked(text: str, params: dict[str, Any]) -> str:
    """`text` once it parses: syntax errors are reported before torch is even imported."""
    from ..lang import parse
    parse(text, params)
    return text


def _resolve_format(fmt: str | None, out: str | None) -> str:
    return fmt or (format_from_path(out, "table") if out else "table")


def _plot(frame, path: str, title: str) -> None:
    from ..results.plots import plot
    plot(frame, path, title=title)
    click.echo(f"wrote plot {path}", err=True)


def _plottable(target: _Target, text: str, params: dict[str, Any]) -> None:
    """Refuse ``--plot`` for a query whose frame no plot fits, in one line and before it runs."""
    from ..errors import ExplaindError
    from ..results.plots import plot_kind
    try:
        plot_kind(target.columns(text, params))
    except ExplaindError as exc:
        refusal = click.ClickException(f"--plot: {exc}")
        refusal.exit_code = 2  # a usage error, told in one line (no usage banner)
        raise refusal from None


# ------------------------------------------------------------------------------ click

class _Group(click.Group):
    """Turns the package's errors into one stderr message and the exit code they carry."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("cancelled", err=True)
            ctx.exit(130)
        except Exception as exc:
            if os.environ.get("EXPLAIND_QL_TRACEBACK"):
                raise
            from ..errors import ExplaindError
            if isinstance(exc, ExplaindError):
                click.echo(f"{getattr(exc, 'cli_context', '')}{exc}", err=True)
                ctx.exit(exc.exit_code)
            kind = "error" if isinstance(exc, OSError) else f"internal error ({type(exc).__name__})"
            click.echo(f"{kind}: {exc} (set EXPLAIND_QL_TRACEBACK=1 for details)", err=True)
            ctx.exit(4)


def _query_options(f):
    options = [
        click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
                     help="Output format (default: table, or for `query --out FILE` the file's extension)."),
        click.option("--device", help="Compute device (cpu, cuda, cuda:N); added to the query's using clause."),
        click.option("--dtype", type=click.Choice(["float32", "float64"]),
                     help="Compute dtype; added to the query's using clause."),
        click.option("--scheduler", metavar="ADDRESS",
                     help="Run on the Dask cluster at ADDRESS (tcp://host:8786); added to the query's "
                          "using clause as cluster \"ADDRESS\"."),
        click.option("--param", "params", multiple=True, callback=_params, metavar="NAME=VALUE",
                     help="Bind $NAME (int, float or string); repeatable."),
        click.option("--run", "runs", multiple=True, metavar="[NAME=]PATH|GLOB",
                     help="Compare runs: repeatable or a glob; adds a leading run column named NAME, else the "
                          "shortest tail of each path that tells the runs apart. RUN is then omitted."),
        click.option("--plot", type=click.Path(dir_okay=False),
                     help="Also plot the (last) result to this image file (.png, .svg, .pdf)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _trust(ctx, param, value):
    from ..trust import allow
    allow(value)
    return value


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="explaind_ql")
@click.option("--trust", multiple=True, metavar="MODULE", callback=_trust, expose_value=False,
              help="Let stores rebuild their model from MODULE (and its submodules); repeatable. "
                   "explaind_ql's own models are always trusted (docs/store.md).")
def main() -> None:
    """Query recorded training runs with the explaind query language.

    \b
    explaind-ql query run.zarr "influence on test[*] by layer"
    explaind-ql run run.zarr analysis.eql --out results/
    explaind-ql repl run.zarr
    explaind-ql verify run.zarr
    """


@main.command("query")
@click.argument("args", nargs=-1, required=True, metavar="[RUN] QUERY")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the result to this file instead of stdout.")
@_query_options
def query_cmd(args, out, fmt, device, dtype, scheduler, params, runs, plot) -> None:
    """Run one query and print (or --out) its result.

    The query may be given as several words; they are joined with spaces.
    """
    run_path, text = _split_args(args, runs, "QUERY", join=True)
    fmt = _resolve_format(fmt, out)
    if fmt == "parquet" and not out:
        raise click.UsageError("--format parquet needs --out FILE")
    text = with_options(_checked(text, params), params, device, dtype, scheduler)
    target = _Target(run_path, expand_run_options(runs) if runs else None)
    if plot:
        _plottable(target, text, params)
    frame = target.query(text, params)
    if out:
        write_frame(frame, out, fmt)
        click.echo(f"wrote {frame.height} rows to {out}", err=True)
    else:
        _echo_frame(frame, fmt)
    target.echo_residual()
    if plot:
        _plot(frame, plot, text)


@main.command("run")
@click.argument("args", nargs=-1, required=True, metavar="[RUN] FILE.eql")
@click.option("--out", type=click.Path(file_okay=False), metavar="DIR",
              help="Directory for named results (default: next to FILE.eql).")
@_query_options
def run_cmd(args, out, fmt, device, dtype, scheduler, params, runs, plot) -> None:
    """Run an .eql script of several queries.

    Results named with `as NAME` go to DIR/NAME.<ext>, the others to stdout.
    Named results use --format's extension (csv when the format is table).
    `--param` overrides the script's `param $name = value;` defaults.
    """
    run_path, script = _split_args(args, runs, "FILE.eql", join=False)
    path = Path(script)
    if not path.is_file():
        raise click.BadParameter(f"no such file: {script}", param_hint="FILE.eql")
    fmt = fmt or "table"
    file_fmt = "csv" if fmt == "table" else fmt
    out_dir = Path(out) if out else path.parent
    text = path.read_text(encoding="utf-8")
    try:
        from ..lang.script import script_queries  # imports the parser: not needed for --help
        queries = script_queries(text, params)
    except Exception as exc:
        exc.cli_context = f"{script}: "
        raise
    if fmt == "parquet" and any(name is None for name, _, _ in queries):
        raise click.UsageError("--format parquet needs every query named (`... as NAME;`): "
                               "unnamed results go to stdout")
    target = _Target(run_path, expand_run_options(runs) if runs else None)
    if plot and queries:
        _plottable(target, with_options(queries[-1][1], params, device, dtype, scheduler), params)
    frame, printed = None, 0
    for i, (name, query, line) in enumerate(queries, 1):
        try:
            frame = target.query(with_options(query, params, device, dtype, scheduler), params)
        except Exception as exc:
            exc.cli_context = f"{script}, query {i} (line {line}): "
            raise
        if name is None:
            if printed and fmt in ("table", "csv"):
                click.echo()
            _echo_frame(frame, fmt)
            printed += 1
        else:
            dest = out_dir / f"{name}{SUFFIX[file_fmt]}"
            write_frame(frame, dest, file_fmt)
            click.echo(f"wrote {frame.height} rows to {dest}", err=True)
        target.echo_residual()
    if plot and frame is not None:
        _plot(frame, plot, queries[-1][1])


@main.command("explain")
@click.argument("run_path", metavar="RUN")
@click.argument("words", nargs=-1, required=True, metavar="QUERY")
@click.option("--device", help="Compute device; added to the query's using clause.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), help="Compute dtype.")
@click.option("--scheduler", metavar="ADDRESS", help="Plan for the Dask cluster at ADDRESS (shows its step chunks).")
@click.option("--param", "params", multiple=True, callback=_params, metavar="NAME=VALUE",
              help="Bind $NAME; repeatable.")
def explain_cmd(run_path, words, device, dtype, scheduler, params) -> None:
    """Print a query's plan without running it.

    Shows the physical plan and each planner pass's decision.
    """
    from .. import open as open_run
    text = with_options(_checked(" ".join(words), params), params, device, dtype, scheduler)
    click.echo(open_run(run_path).explain(text, **params))


@main.command("info")
@click.argument("run_path", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print run.info() as JSON instead.")
def info_cmd(run_path, as_json) -> None:
    """Summarise a run: steps, layers, splits, optimizer, size."""
    from .. import open as open_run
    info = open_run(run_path).info()
    if as_json:
        import json
        click.echo(json.dumps(info, indent=2, default=str))
        return
    from rich.console import Console
    Console().print(info_renderable(info))


@main.command("verify")
@click.argument("run_path", metavar="RUN")
def verify_cmd(run_path) -> None:
    """Read every chunk of a store and report each damaged array (exit 4 if any)."""
    from ..verify import verify
    report = verify(run_path)
    for line in report.lines():
        click.echo(line, err=not report.ok)
    if not report.ok:
        click.get_current_context().exit(4)


@main.command("repl")
@click.argument("run_path", metavar="RUN")
@click.option("--format", "fmt", type=click.Choice(TEXT_FORMATS), default="table", help="Result format.")
@click.option("--param", "params", multiple=True, callback=_params, metavar="NAME=VALUE",
              help="Bind $NAME in every query; repeatable.")
@click.option("--scheduler", metavar="ADDRESS", help="Run influence and kernel queries on the Dask cluster at ADDRESS.")
def repl_cmd(run_path, fmt, params, scheduler) -> None:
    """Interactive shell on a run.

    Queries end with `;` and may span lines; `.help` lists the dot-commands.
    """
    from .repl import interact
    code = interact(run_path, fmt=fmt, params=params, scheduler=scheduler)
    if code:
        click.get_current_context().exit(code)


@main.command("demo")
@click.option("--out", type=click.Path(file_okay=False), metavar="DIR", help="Where to write the demo's files.")
@click.option("--quick", is_flag=True, help="A smaller, faster demo.")
def demo_cmd(out, quick) -> None:
    """Record a toy run and walk through example queries."""
    from importlib import import_module
    name = f"{__package__.partition('.')[0]}.demo"  # explaind_ql.demo, beside this shell's package
    try:
        demo = import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        click.echo("error: the demo is not available in this installation (explaind_ql.demo is missing)",
                   err=True)
        click.get_current_context().exit(4)
    demo.run_demo(out=out, quick=quick)
