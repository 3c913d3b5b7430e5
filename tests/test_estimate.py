"""explain's estimates predict: time, gradient evaluations, memory and replay, for every measure."""

from __future__ import annotations

import re

import pytest

import explaind_ql as eq

QUERIES = [
    "influence on test[*] by layer, step",
    "influence on test[0..3] by example",
    "kernel on test[0..1] from train[0..4]",
    "check on test[*]",
    "similarity on test[0..2]",
    "evaluate on test[*]",
]


def ratios(plan: list[str]) -> dict[str, float]:
    """The estimate ÷ measured ratios of an explain analyze plan's last line."""
    line = plan[-1]
    assert line.startswith("estimate vs measured:")
    found = dict(zip(("time", "evaluations", "memory"), re.findall(r"\(([0-9.e+-]+|—)×?", line)))
    return {k: (None if v == "—" else float(v)) for k, v in found.items()}


@pytest.fixture(scope="module")
def relu_ckpt(toy_run) -> str:
    """A checkpointed ReLU CNN (kinks to refine at, steps to replay): what the old estimates missed."""
    return str(toy_run("cnn", "adamw", steps=24, act="relu", checkpoint_every=6))


@pytest.mark.parametrize("query", QUERIES)
def test_explain_analyze_estimates_within_3x(relu_ckpt, query):
    run = eq.open(relu_ckpt)
    plan = run.query(f"explain analyze {query}")["plan"].to_list()
    assert plan[-2].startswith("estimate: ")
    r = ratios(plan)
    assert 1 / 3 <= r["time"] <= 3, plan[-1]
    if r["evaluations"] is not None:
        assert 1 / 3 <= r["evaluations"] <= 3, plan[-1]
    if r["memory"] is not None:
        assert 1 / 3 <= r["memory"] <= 3, plan[-1]
    replay = re.search(r"(\d+) / (\d+) steps replayed", plan[-1])
    estimated, measured = map(int, replay.groups())
    assert estimated >= measured > 0 or query.startswith("evaluate")


def test_explain_gives_the_estimate_without_running_the_query(relu_ckpt):
    run = eq.open(relu_ckpt)
    text = run.explain("influence on test[*] by layer")
    assert re.search(r"estimate: [0-9.e+-]+ s .*gradient evaluations, \+.* resident .*steps replayed \(pilot of steps",
                     text.splitlines()[-1])
    assert len(run.cache.phi) == len(run.cache.proj) == len(run.cache.replay) == 0  # the pilot's work is forgotten
