"""Frames as text and files, and the run summary: what every shell (CLI, REPL, notebooks) prints.

Imports only the standard library and click at module level (rich inside the summary), so
the CLI's `--help` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

FORMATS = ("table", "csv", "json", "ndjson", "parquet")
BINARY_FORMATS = ("parquet",)
TEXT_FORMATS = tuple(f for f in FORMATS if f not in BINARY_FORMATS)  # what a terminal can show
EXTENSIONS = {".txt": "table", ".csv": "csv", ".json": "json", ".ndjson": "ndjson", ".jsonl": "ndjson",
              ".parquet": "parquet"}
SUFFIX = {"table": ".txt", "csv": ".csv", "json": ".json", "ndjson": ".ndjson", "parquet": ".parquet"}

def format_from_path(path: str | os.PathLike, default: str | None = None) -> str:
    """The output format a file name asks for (its extension), else, for a name without one, `default`.

    An extension that names no format (`x.xlsx`) is refused rather than written as a text table."""
    suffix = Path(path).suffix.lower()
    fmt = EXTENSIONS.get(suffix, None if suffix else default)
    if fmt is None:
        raise click.UsageError(f"cannot tell the format of {str(path)!r} from its extension; "
                               f"use one of {', '.join(EXTENSIONS)}")
    return fmt


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render_table(frame) -> str:
    """Every row as an aligned plain-text table (numbers right-aligned); plan frames as lines."""
    if frame.columns == ["plan"]:
        return "\n".join(frame["plan"].to_list())
    columns = []
    for series in frame.iter_columns():
        cells = [_cell(v) for v in series.to_list()]
        width = max([len(series.name), *map(len, cells)])
        columns.append((series.name, cells, width, series.dtype.is_numeric()))

    def line(texts: list[str]) -> str:
        return "  ".join(t.rjust(w) if num else t.ljust(w)
                         for t, (_, _, w, num) in zip(texts, columns)).rstrip()

    lines = [line([name for name, *_ in columns]), "  ".join("-" * w for _, _, w, _ in columns)]
    lines += [line([cells[i] for _, cells, _, _ in columns]) for i in range(frame.height)]
    if frame.height == 0:
        lines.append("(no rows)")
    return "\n".join(lines)


def frame_text(frame, fmt: str) -> str:
    """A frame as text in a textual format (parquet is binary: use `write_frame`)."""
    if fmt == "table":
        return render_table(frame)
    if fmt == "csv":
        return frame.write_csv()
    if fmt == "json":
        return frame.write_json()
    if fmt == "ndjson":
        return frame.write_ndjson()
    raise click.UsageError(f"format {fmt} cannot be printed; write it to a file with --out")


def write_frame(frame, path: str | os.PathLike, fmt: str) -> None:
    path = Path(path)
    if path.parent != Path("."):
        path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        frame.write_parquet(path)
    else:
        text = frame_text(frame, fmt)
        path.write_text(text if text.endswith("\n") or not text else text + "\n", encoding="utf-8")


def info_renderable(info: dict):
    """`run.info()` as rich renderables: summary, layer tree, splits, optimizer groups."""
    from rich.console import Group
    from rich.table import Table
    from rich.tree import Tree

    from ..engine.budget import fmt_bytes

    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    for key, value in (
        ("run", info["path"]),
        ("steps", f"{info['steps']}" + ("" if info["complete"] else " (recording incomplete)")),
        ("storage", f"{info['mode']}, {fmt_bytes(info['bytes_on_disk'])} on disk"),
        ("parameters", f"{info['params']:,} in {info['param_tensors']} tensors ({info['dtype']})"),
        ("loss", f"{info['loss'].get('name')} ({info['loss'].get('reduction')})"),
        ("model", info["factory"]),
        ("torch", info["torch_version"]),
    ):
        summary.add_row(key, str(value))

    tree = Tree("[bold]layers[/bold] (trained elements)")
    nodes: dict[str, Any] = {}
    for layer, count in info["layers"].items():
        parents = [p for p in nodes if layer.startswith(p + ".")]
        parent = nodes[max(parents, key=len)] if parents else tree
        nodes[layer] = parent.add(f"{layer}  [dim]{count:,}[/dim]")

    splits = Table(title="splits", title_justify="left", show_edge=False)
    splits.add_column("split")
    splits.add_column("items", justify="right")
    for name, size in info["splits"].items():
        splits.add_row(name, f"{size:,}")

    groups = info["optimizer"]["groups"]
    keys = [k for k in ("lr", "weight_decay", "betas", "momentum", "nesterov", "eps")
            if any(g.get(k) not in (None, 0, False) for g in groups)]
    optimizer = Table(title=f"optimizer: {info['optimizer']['class']}", title_justify="left", show_edge=False)
    optimizer.add_column("group", justify="right")
    for key in keys:
        optimizer.add_column(key, justify="right")
    for i, group in enumerate(groups):
        optimizer.add_row(str(i), *(str(group.get(k, "")) for k in keys))
    return Group(summary, "", tree, "", splits, "", optimizer)





__all__ = ["BINARY_FORMATS", "EXTENSIONS", "FORMATS", "SUFFIX", "TEXT_FORMATS", "format_from_path",
           "frame_text", "info_renderable", "render_table", "write_frame"]
