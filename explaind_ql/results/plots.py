"""Quick-look plots of query results, picked from the frame's key columns.

- `step` and `layer` keys: influence over steps, one line per layer (per run);
- `test` and `example` keys: the test × example kernel as a heatmap;
- `layer` as the only key: layer totals as bars (grouped per run).

Terms are summed, other keys too. matplotlib is imported here only, through its Agg
canvas (no pyplot, no global backend switch), so plotting works headless and threads
do not share figure state.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ExplaindError

SIZE = (8.0, 5.0)  # inches
DPI = 100          # so a PNG is 800 × 500 pixels
_NOT_KEYS = {"run", "term", "label", "influence"}


def plot_kind(columns: list[str]) -> str:
    """'lines', 'heatmap' or 'bars' for a frame with these columns (ExplaindError if none fits)."""
    keys = set(columns) - _NOT_KEYS
    if "influence" in columns:
        if {"step", "layer"} <= keys:
            return "lines"
        if {"test", "example"} <= keys:
            return "heatmap"
        if keys == {"layer"}:
            return "bars"
    raise ExplaindError(
        f"cannot plot a frame with columns {', '.join(columns)}: plots need an influence column keyed "
        "by step and layer (lines), test and example (heatmap), or layer alone (bars)")


def plot(frame, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw `frame` to an image file (format from the extension, e.g. .png, .svg, .pdf)."""
    import polars as pl
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kind = plot_kind(frame.columns)
    fig = Figure(figsize=SIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    series = ["run", "layer"] if "run" in frame.columns else ["layer"]
    if kind == "lines":
        data = (frame.group_by([*series, "step"], maintain_order=True).agg(pl.col("influence").sum())
                .sort("step", maintain_order=True))
        for key, part in data.group_by(series, maintain_order=True):
            ax.plot(part["step"].to_list(), part["influence"].to_list(), marker=".", label="/".join(map(str, key)))
        ax.set_xlabel("step")
        ax.set_ylabel("influence")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.legend(fontsize="small")
    elif kind == "heatmap":
        if "run" in frame.columns and frame["run"].n_unique() > 1:
            raise ExplaindError("a kernel heatmap shows one run; filter the frame to one run first")
        data = (frame.drop_nulls(["test", "example"]).group_by(["test", "example"])
                .agg(pl.col("influence").sum()))
        tests, examples = sorted(data["test"].unique().to_list()), sorted(data["example"].unique().to_list())
        grid = data.pivot(on="example", index="test", values="influence").sort("test")
        matrix = grid.select([str(e) for e in examples]).fill_null(0.0).to_numpy()
        bound = float(abs(matrix).max()) or 1.0
        image = ax.imshow(matrix, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="influence")
        ax.set_xlabel("training example")
        ax.set_ylabel("test item")
        if len(examples) <= 40:
            ax.set_xticks(range(len(examples)), [str(e) for e in examples])
        if len(tests) <= 40:
            ax.set_yticks(range(len(tests)), [str(t) for t in tests])
    else:
        data = frame.group_by(series, maintain_order=True).agg(pl.col("influence").sum())
        layers = list(dict.fromkeys(data["layer"].to_list()))
        runs = list(dict.fromkeys(data["run"].to_list())) if "run" in series else [None]
        width = 0.8 / len(runs)
        for i, run in enumerate(runs):
            part = data if run is None else data.filter(pl.col("run") == run)
            value = dict(zip(part["layer"].to_list(), part["influence"].to_list()))
            ax.bar([j + i * width - 0.4 + width / 2 for j in range(len(layers))],
                   [value.get(layer, 0.0) for layer in layers], width, label=run)
        ax.set_xticks(range(len(layers)), layers, rotation=30 if len(layers) > 6 else 0)
        ax.set_ylabel("influence")
        ax.axhline(0, color="grey", linewidth=0.5)
        if runs != [None]:
            ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    path = Path(path)
    fig.savefig(path)
    return path
