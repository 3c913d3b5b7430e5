"""Plots: the kind follows the frame's key columns, and images come out at a fixed size."""

from __future__ import annotations

import struct

import polars as pl
import pytest

from explaind_ql.errors import ExplaindError
from explaind_ql.results.plots import DPI, SIZE, plot, plot_kind

PIXELS = (int(SIZE[0] * DPI), int(SIZE[1] * DPI))
TERMS = ("gradient", "weight_decay")


def png_size(path) -> tuple[int, int]:
    """Width and height from the PNG header (signature, then the IHDR chunk)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def steps_by_layer(runs=(None,)) -> pl.DataFrame:
    rows = [{"run": r, "layer": layer, "step": s, "term": t, "influence": 0.1 * s - i}
            for r in runs for i, layer in enumerate(("emb", "attn")) for s in range(6) for t in TERMS]
    frame = pl.DataFrame(rows)
    return frame.drop("run") if runs == (None,) else frame


def kernel() -> pl.DataFrame:
    rows = [{"test": t, "example": e, "label": e % 3, "term": "gradient", "influence": float(t - e)}
            for t in range(3) for e in range(5)]
    rows += [{"test": t, "example": None, "label": None, "term": "weight_decay", "influence": 0.5} for t in range(3)]
    return pl.DataFrame(rows)


def layer_totals(runs=(None,)) -> pl.DataFrame:
    rows = [{"run": r, "layer": layer, "term": t, "influence": float(i + 1)}
            for r in runs for i, layer in enumerate(("emb", "attn", "unembed")) for t in TERMS]
    frame = pl.DataFrame(rows)
    return frame.drop("run") if runs == (None,) else frame


def by_example() -> pl.DataFrame:
    rows = [{"example": e, "label": e % 3, "term": "gradient", "influence": float(e - 4)} for e in range(30)]
    rows += [{"example": None, "label": None, "term": "weight_decay", "influence": 0.25}]
    return pl.DataFrame(rows)


def check_frame() -> pl.DataFrame:
    return pl.DataFrame({"test": [0, 1, 2], "actual": [1.0, 2.0, 3.0], "explained": [1.0, 2.0, 3.0],
                         "residual": [1e-9, 0.0, 2e-9], "relative_residual": [1e-9, 0.0, 7e-10]})


def evaluate_frame() -> pl.DataFrame:
    return pl.DataFrame({"step": [0, 4, 8], "accuracy": [0.1, 0.5, 0.9], "loss": [2.0, 1.0, 0.2],
                         "kl_to_final": [1.0, 0.5, 0.0]})


@pytest.mark.parametrize("frame, kind", [
    (steps_by_layer(), "lines"), (steps_by_layer(("a", "b")), "lines"), (kernel(), "heatmap"),
    (layer_totals(), "bars"), (layer_totals(("a", "b")), "bars"), (by_example(), "ranked"),
    (check_frame(), "residuals"), (evaluate_frame(), "curve"),
])
def test_plot_kind_and_png_size(tmp_path, frame, kind):
    assert plot_kind(frame.columns) == kind
    out = plot(frame, tmp_path / f"{kind}.png", title=kind)
    assert out.is_file() and png_size(out) == PIXELS


def test_heatmap_sums_terms_over_the_example_grid(tmp_path):
    frame = kernel().with_columns(pl.lit(1.0).alias("influence"))
    plot(pl.concat([frame, frame.with_columns(pl.lit("momentum").alias("term"))]), tmp_path / "k.png")
    assert png_size(tmp_path / "k.png") == PIXELS


@pytest.mark.parametrize("columns", [
    ["test", "actual", "explained", "residual"],       # check
    ["layer", "test", "test_2", "cosine"],             # similarity
    ["layer", "test", "term", "influence"],            # layer plus another key
])
def test_frames_without_a_plot_kind_fail_in_one_line(columns):
    with pytest.raises(ExplaindError) as info:
        plot_kind(columns)
    assert "\n" not in str(info.value) and "cannot plot" in str(info.value)


def test_heatmap_of_several_runs_is_refused(tmp_path):
    frame = pl.concat([kernel().select(pl.lit(r).alias("run"), pl.all()) for r in ("a", "b")])
    with pytest.raises(ExplaindError, match="one run"):
        plot(frame, tmp_path / "k.png")


def svg_text(tmp_path, frame, title) -> str:
    """The figure as SVG with its text kept as text, to read what it says."""
    import matplotlib
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        return plot(frame, tmp_path / "f.svg", title=title).read_text()


def test_figures_say_what_they_show(tmp_path):
    """A title with the query; terms stacked with a legend, never summed; non-examples named beside examples."""
    bars = svg_text(tmp_path, layer_totals(), "influence on test[*] by layer")
    assert "influence on test[*] by layer" in bars and "terms stacked: gradient, weight_decay" in bars
    assert bars.count(">weight_decay<") == 1 and bars.count(">gradient<") == 1  # the legend's entries
    ranked = svg_text(tmp_path, by_example(), "influence by example")
    assert "not examples: weight_decay 0.25" in ranked and "the 20 largest in size of 30" in ranked
    assert ">29<" in ranked  # the largest in size is labelled
    lines = svg_text(tmp_path, steps_by_layer(), "q")
    assert "emb gradient" in lines and "emb weight_decay" in lines
    assert "relative to its own change" in svg_text(tmp_path, check_frame(), "check on test[*]")
