"""The measure registry: one module per measure, each frame as its schema declares, every contraction planned by
the passes."""

from __future__ import annotations

import polars as pl
import pytest

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
