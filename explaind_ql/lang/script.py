"""`.eql` scripts as queries to run: shared by `explaind-ql run`, the REPL's `.read` and `%%eql`."""

from __future__ import annotations

from typing import Any

from .ast import unparse
from .parser import parse_script


def script_queries(text: str, params: dict[str, Any]) -> list[tuple[str | None, str, int]]:
    """(result name, query text to run, line) for each query of an .eql script.

    A query with `$parameters` runs as its canonical text, which has the script's
    defaults and the caller's overrides already bound; others run as written, so error
    carets point into what the user wrote.
    """
    return [(e.name, unparse(e.query) if "$" in e.source else e.source, text.count("\n", 0, e.pos) + 1)
            for e in parse_script(text, params)]
