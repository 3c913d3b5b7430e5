"""Quick-look plots of query results, picked from the frame's columns.

- `step` and `layer` keys: influence over steps, one line per layer (per run), one line style per term;
- `test` and `example` keys: the test × example kernel's gradient term as a heatmap;
- `layer` as the only key: layer totals as bars, the terms stacked;
- `example` as the only key: the training examples ranked by influence (the largest in size);
- a `check` frame: the relative residual per test item, on a log scale;
- an `evaluate` frame: accuracy and loss over the states.

Every figure is titled with the query (when given) and says which terms it shows: terms are
never summed silently, and rows that are not training examples (null `example`: decay, carried
momentum, rounding) are named beside a per-example plot, not drawn among the examples.
matplotlib is imported here only, through its Agg canvas (no pyplot, no global backend
switch), so plotting works headless and threads do not share figure state.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ExplaindError

SIZE = (8.0, 5.0)  # inches
DPI = 100          # so a PNG is 800 × 500 pixels
RANKED = 20        # examples a ranked plot shows at most
_NOT_KEYS = {"run", "term", "label", "influence"}
_STYLES = ("-", "--", ":", "-.")


def plot_kind(columns: list[str]) -> str:
    """'lines', 'heatmap', 'bars', 'ranked', 'residuals' or 'curve' for a frame with these columns
    (a one-line ExplaindError if none fits)."""
    keys = set(columns) - _NOT_KEYS
    if "influence" in columns:
        if {"step", "layer"} <= keys:
            return "lines"
        if {"test", "example"} <= keys:
            return "heatmap"
        if keys == {"layer"}:
            return "bars"
        if keys == {"example"}:
            return "ranked"
    if {"test", "relative_residual"} <= set(columns):
        return "residuals"
    if {"step", "accuracy", "loss"} <= set(columns):
        return "curve"
    raise ExplaindError(
        f"cannot plot a frame with columns {', '.join(columns)}: plots need an influence column keyed by step and "
        "layer (lines), test and example (heatmap), layer alone (bars) or example alone (ranked bars), a check "
        "frame (residuals) or an evaluate frame (curve)")


def plot(frame, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw `frame` to an image file (format from the extension, e.g. .png, .svg, .pdf); `title`: the query."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kind = plot_kind(frame.columns)
    if kind == "heatmap" and "run" in frame.columns and frame["run"].n_unique() > 1:
        raise ExplaindError("a kernel heatmap shows one run; filter the frame to one run first")
    fig = Figure(figsize=SIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = _DRAW[kind](fig, ax, frame)
    ax.set_title(shown, fontsize="small")
    if title:
        fig.suptitle(title if len(title) <= 90 else title[:87] + "...", fontsize="medium")
    path = Path(path)
    fig.savefig(path)
    return path


def _with_terms(frame):
    """``frame`` with a ``term`` column (a frame without one holds the gradient term only)."""
    import polars as pl
    return frame if "term" in frame.columns else frame.with_columns(term=pl.lit("gradient"))


def _terms(frame) -> list[str]:
    return list(dict.fromkeys(_with_terms(frame)["term"].to_list()))


def _beside(frame) -> str:
    """The rows that are not training examples, named with their totals."""
    import polars as pl
    rest = frame.filter(pl.col("example").is_null())
    if rest.is_empty():
        return ""
    totals = rest.group_by("term", maintain_order=True).agg(pl.col("influence").sum())
    return "; not examples: " + ", ".join(f"{t} {v:.3g}" for t, v in totals.iter_rows())


def _lines(fig, ax, frame) -> str:
    import polars as pl
    series = ["run", "layer"] if "run" in frame.columns else ["layer"]
    terms = _terms(frame)
    data = (_with_terms(frame).group_by([*series, "term", "step"], maintain_order=True).agg(pl.col("influence").sum())
            .sort("step", maintain_order=True))
    colors = {}
    for key, part in data.group_by([*series, "term"], maintain_order=True):
        *who, term = key
        name = "/".join(map(str, who))
        line = ax.plot(part["step"].to_list(), part["influence"].to_list(), marker=".",
                       linestyle=_STYLES[terms.index(term) % len(_STYLES)], color=colors.get(name),
                       label=f"{name} {term}" if len(terms) > 1 else name)[0]
        colors.setdefault(name, line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("influence")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize="x-small", ncol=2 if len(colors) * len(terms) > 8 else 1)
    return f"influence per step bin; terms: {', '.join(terms)} (one line style each)"


def _heatmap(fig, ax, frame) -> str:
    import polars as pl
    grid_rows = frame.drop_nulls(["test", "example"])
    terms = _terms(grid_rows)
    data = grid_rows.group_by(["test", "example"]).agg(pl.col("influence").sum())
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
    return f"per-example terms: {', '.join(terms)}{_beside(frame)}"


def _bars(fig, ax, frame) -> str:
    import polars as pl
    series = ["run", "layer"] if "run" in frame.columns else ["layer"]
    terms = _terms(frame)
    data = _with_terms(frame).group_by([*series, "term"], maintain_order=True).agg(pl.col("influence").sum())
    layers = list(dict.fromkeys(data["layer"].to_list()))
    runs = list(dict.fromkeys(data["run"].to_list())) if "run" in series else [None]
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        x = [j + i * width - 0.4 + width / 2 for j in range(len(layers))]
        up, down = [0.0] * len(layers), [0.0] * len(layers)  # stacks: positive parts up, negative down
        for k, term in enumerate(terms):
            part = data.filter(pl.col("term") == term)
            if run is not None:
                part = part.filter(pl.col("run") == run)
            value = dict(zip(part["layer"].to_list(), part["influence"].to_list()))
            heights = [value.get(layer, 0.0) for layer in layers]
            bottoms = [up[j] if h >= 0 else down[j] for j, h in enumerate(heights)]
            ax.bar(x, heights, width, bottom=bottoms, color=f"C{k}", hatch="//" if i % 2 else None,
                   label=term if run is None else f"{run} {term}")
            for j, h in enumerate(heights):
                (up if h >= 0 else down)[j] += h
    ax.set_xticks(range(len(layers)), layers, rotation=30 if len(layers) > 6 else 0)
    ax.set_ylabel("influence")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize="small")
    return f"influence per layer; terms stacked: {', '.join(terms)}"


def _ranked(fig, ax, frame) -> str:
    import polars as pl
    examples = frame.filter(pl.col("example").is_not_null())
    terms = _terms(examples)
    data = (examples.group_by("example", maintain_order=True).agg(pl.col("influence").sum())
            .sort(pl.col("influence").abs(), descending=True).head(RANKED).reverse())
    values = data["influence"].to_list()
    ax.barh(range(len(values)), values, color=["C3" if v < 0 else "C0" for v in values])
    ax.set_yticks(range(len(values)), [str(e) for e in data["example"].to_list()], fontsize="x-small")
    ax.set_ylabel("training example")
    ax.set_xlabel("influence")
    ax.axvline(0, color="grey", linewidth=0.5)
    top = f"the {len(values)} largest in size of {examples['example'].n_unique()}"
    return f"{top}; terms: {', '.join(terms)}{_beside(frame)}"


def _residuals(fig, ax, frame) -> str:
    rel = [max(float(v), 1e-300) for v in frame["relative_residual"].to_list()]
    labels = [str(t) for t in frame["test"].to_list()]
    if "output" in frame.columns:
        labels = [f"{t}:{o}" for t, o in zip(labels, frame["output"].to_list())]
    ax.bar(range(len(rel)), rel, color="C2")
    ax.set_yscale("log")
    if len(rel) <= 40:
        ax.set_xticks(range(len(rel)), labels, rotation=90 if len(rel) > 16 else 0, fontsize="x-small")
    ax.set_xlabel("test item" + (":output" if "output" in frame.columns else ""))
    ax.set_ylabel("relative residual")
    return "replication residual per item, relative to its own change"


def _curve(fig, ax, frame) -> str:
    steps = frame["step"].to_list()
    ax.plot(steps, frame["accuracy"].to_list(), marker=".", color="C0", label="accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy", color="C0")
    other = ax.twinx()
    other.plot(steps, frame["loss"].to_list(), marker=".", color="C1", linestyle="--", label="loss")
    other.set_ylabel("loss", color="C1")
    return "accuracy (solid, left) and loss (dashed, right) at each state"


_DRAW = {"lines": _lines, "heatmap": _heatmap, "bars": _bars, "ranked": _ranked, "residuals": _residuals,
         "curve": _curve}
