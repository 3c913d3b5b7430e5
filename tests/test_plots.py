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


@pytest.mark.parametrize("frame, kind", [
    (steps_by_layer(), "lines"), (steps_by_layer(("a", "b")), "lines"), (kernel(), "heatmap"),
    (layer_totals(), "bars"), (layer_totals(("a", "b")), "bars"),
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
    ["example", "label", "term", "influence"],         # by example only
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
