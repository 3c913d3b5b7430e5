"""Notebook magics: `%load_ext explaind_ql`, then `%eql RUN QUERY` or a `%%eql RUN` cell.

RUN is a store path (quoted if it holds spaces) or the name of a notebook variable that
holds a path or an opened Run. A `$name` in a query is bound to the notebook variable
`name` (IPython's own `$` expansion is turned off so query parameters stay intact).
Opened runs are cached per path, so their engine caches survive between cells. Errors
show as IPython usage errors: the one-line caret message, no traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_VAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_QUOTED = re.compile(r"(['\"])(.*?)\1\s*(.*)\Z", re.DOTALL)
_runs: dict[tuple[str, float], Any] = {}


def load_ipython_extension(ipython) -> None:
    from IPython.core.magic import no_var_expand

    @no_var_expand
    def eql_line(line: str):
        """%eql RUN QUERY: run one query and return its frame."""
        run_ref, text = _split(line)
        return _run_queries(ipython, run_ref, text)

    @no_var_expand
    def eql_cell(line: str, cell: str):
        """%%eql RUN, then the queries (`;`-separated) in the cell: returns the last frame."""
        run_ref, rest = _split(line, query_required=False)
        return _run_queries(ipython, run_ref, "\n".join(filter(None, (rest, cell))))

    ipython.register_magic_function(eql_line, "line", "eql")
    ipython.register_magic_function(eql_cell, "cell", "eql")


def _split(line: str, query_required: bool = True) -> tuple[str, str]:
    from IPython.core.error import UsageError
    line = line.strip()
    quoted = _QUOTED.match(line)
    if quoted:
        run_ref, rest = quoted.group(2), quoted.group(3)
    else:
        run_ref, _, rest = line.partition(" ")
    if not run_ref or (query_required and not rest.strip()):
        raise UsageError("usage: %eql RUN QUERY  (or %%eql RUN with the queries in the cell)")
    return run_ref, rest.strip()


def _open(ipython, ref: str):
    """The Run `ref` names: a notebook variable (Run or path) or a store path."""
    from IPython.core.error import UsageError
    from .. import open as open_run
    from ..run import Run
    from ..store import stamp
    value = ipython.user_ns.get(ref, ref) if ref.isidentifier() else ref
    if isinstance(value, Run):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise UsageError(f"{ref} is a {type(value).__name__}, not a run or a path")
    path = Path(value).resolve()
    key = (str(path), stamp(path))
    if key not in _runs:
        _runs[key] = open_run(path)
    return _runs[key]


def _run_queries(ipython, run_ref: str, text: str):
    from IPython.core.error import UsageError
    from ..lang.script import script_queries
    from ..errors import ExplaindError
    params = {name: ipython.user_ns[name] for name in _VAR.findall(text)
              if isinstance(ipython.user_ns.get(name), (int, float, str))}
    try:
        run = _open(ipython, run_ref)
        frame = None
        for _, query, _ in script_queries(text, params):
            frame = run.query(query, **params)
        return frame
    except ExplaindError as exc:
        raise UsageError(str(exc)) from None
