"""Shared tail of the benchmarks: print the markdown report, and keep it under bench/ with --write."""

from __future__ import annotations

from pathlib import Path


def emit(lines: list[str], results: str, write: bool) -> str:
    """Print ``lines`` as one markdown text; with ``write``, save it as ``bench/<results>``."""
    text = "\n".join(lines)
    print(text)
    if write:
        (Path(__file__).resolve().parent / results).write_text(text + "\n")
    return text
