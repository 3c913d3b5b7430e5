"""The pass sequence (sqlglot's optimizer's shape): ``RULES`` in order, or another sequence given."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from ..engine.facts import Facts
from ..run import Run
from ..semantic import Bound
from .logical import logical
from .nodes import Context, Plan
from .passes import (aggregate_tests, choose_nodes, choose_strategy, chunk_under_budget, distribute,
                     pushdown_restrictions)

Rule = Callable[[Plan, Context], Plan]
RULES: tuple[Rule, ...] = (pushdown_restrictions, aggregate_tests, choose_nodes, choose_strategy, chunk_under_budget,
                           distribute)
WITHOUT_PUSHDOWN: tuple[Rule, ...] = RULES[1:]  # computes everything, then filters: what pushdown is checked against


def optimise(bound: Bound, run: Run, facts: Facts, *, start: Callable[[Bound, Run], Plan] = logical,
             rules: Sequence[Rule] = RULES, scheduler: Any = None, device: str | None = None) -> Plan:
    """The measure's logical plan (``start``) → physical plan, through ``rules`` in order (``scheduler``: the
    cluster to distribute to)."""
    ctx = Context(run, facts, bound.budget, scheduler, device)
    p = start(bound, run)
    for rule in rules:
        p = rule(p, ctx)
    return p
