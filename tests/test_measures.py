"""The measure registry: one module per measure, each frame as its schema declares, every contraction planned by
the passes."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

import explaind_ql as eq
from explaind_ql.errors import SemanticError
from explaind_ql.lang import parse
from explaind_ql.lang.parser import measure_keywords
from explaind_ql.measures import MEASURES, bind

QUERIES = {
    "influence": "influence on test[0..2] over steps 2:6 by layer, step",
    "kernel": "kernel on test[0..1] from train[0..4] over steps 0:3",
    "check": "check on test[0..2] over steps 0:4",
    "similarity": "similarity on test[0..3] over steps 0:4",
    "evaluate": "evaluate on test[*] at steps 0:12 every 4",
}


def test_the_registry_holds_exactly_the_grammars_measure_keywords():
    assert {k.lower() for k in measure_keywords()} == set(MEASURES) == set(QUERIES)


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_each_measures_frame_has_the_columns_its_schema_declares(run_path, name):
    run = eq.open(run_path)
    frame = run.query(QUERIES[name])
    bound = bind(parse(QUERIES[name]), run)
    assert frame.height > 0
    assert tuple(frame.columns) == MEASURES[name].schema(bound, run)


@pytest.mark.parametrize("name", ["check", "similarity"])
def test_check_and_similarity_are_planned_by_the_passes_like_influence(run_path, name):
    """Their strategy is the cost pass's choice, and explain renders their plan's nodes."""
    run = eq.open(run_path)
    text = run.explain(QUERIES[name])
    assert text.startswith(f"{name.capitalize()}  keys: test")
    assert "strategy choice:" in text and "Contract  strategy=" in text


def test_a_measure_refuses_the_clauses_its_module_lists(run_path):
    run = eq.open(run_path)
    for name, measure in MEASURES.items():
        if "from" in measure.clauses.refuses:
            with pytest.raises(SemanticError, match=f"'{name}' does not use 'from'"):
                bind(parse(f"{name} on test[0..1] from train[0]"), run)
    with pytest.raises(SemanticError, match="at least two"):
        bind(parse("similarity on test[0]"), run)


def test_check_totals_match_influence_totals(run_path):
    """check's `explained` is the sum of influence's terms per test item (the same contraction, two frames)."""
    run = eq.open(run_path)
    check = run.query("check on test[0..2] over steps 0:4").sort("test")
    infl = run.query("influence on test[0..2] over steps 0:4 by test")
    total = infl.group_by("test").agg(pl.col("influence").sum()).sort("test")
    assert check["explained"].to_list() == pytest.approx(total["influence"].to_list(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_per_example_totals_of_a_float32_recording_meet_the_tolerance(toy_run, optimizer):
    """A float32 recording's updates are not rebuilt exactly by float64 per-example gradients (measured:
    2e-7 to 1.3e-6 of the change on these runs, beyond the 1e-6 tolerance on some): the ``rounding`` term
    holds that part, so the per-example frames still sum to the real change, and check reports the same term."""
    run = eq.open(toy_run("mlp", optimizer, dtype=torch.float32))
    check = run.query("check on test[0..3]")
    actual = float(check["actual"].sum())
    assert float(check["max_update_error"].max()) > 1e-6  # the rebuild really misses
    for text in ("influence on test[0..3] by example", "influence on test[0..3] by example, step every 3",
                 "kernel on test[0..3]"):
        frame = run.query(text)
        rounding = frame.filter(pl.col("term") == "rounding")
        assert rounding.height > 0 and rounding["example"].null_count() == rounding.height
        assert abs(float(frame["influence"].sum()) - actual) <= 1e-6 * abs(actual)
        # the term is the rebuild's gap check measures, to the quadrature tolerance
        assert float(rounding["influence"].sum()) == pytest.approx(float(check["rounding"].sum()), abs=1e-6 * abs(actual))
        without = float(frame.filter(pl.col("term") != "rounding")["influence"].sum())
        assert abs(without - actual) > 10 * abs(float(frame["influence"].sum()) - actual)


def test_a_float64_recording_has_no_rounding_term(toy_run):
    run = eq.open(toy_run("mlp", "adamw"))
    assert "rounding" not in run.query("influence on test[0..3] by example")["term"].to_list()
    assert float(run.query("check on test[0..3]")["rounding"].abs().max()) < 1e-12


def test_relative_residual_is_relative_to_the_items_own_change(run_path):
    """No other item of the selection enters an item's relative residual: its own change does, floored."""
    run = eq.open(run_path)
    check = run.query("check on test[0..4] over steps 0:4")
    actual = check["actual"].abs().to_numpy()
    ratio = check["residual"].abs().to_numpy() / check["relative_residual"].to_numpy()
    moved = actual > 1e-6
    assert np.allclose(ratio[moved], actual[moved], rtol=1e-12)
    alone = run.query("check on test[3] over steps 0:4")
    assert float(alone["residual"].abs()[0] / alone["relative_residual"][0]) == pytest.approx(float(actual[3]), rel=1e-12)
