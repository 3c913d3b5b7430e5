"""A measure, declared in one place: the clauses it takes, its own validation, its logical plan, its frame.

The stages stay generic: ``semantic.bind`` resolves what every measure shares (components,
items, steps, options) and refuses the clauses a measure's :class:`~explaind_ql.semantic.Clauses`
lists; the measure's ``complete`` adds its own checks and settings; ``logical`` gives the
plan the passes optimise (``None``: the measure runs the model itself, with no contraction);
``frame`` turns what ran into the answer, whose columns ``schema`` declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import polars as pl

from ..engine.kernels import Engine, Result
from ..lang.ast import Query
from ..plan import Plan
from ..run import Run
from ..semantic import Bound, Clauses


@dataclass(frozen=True)
class Computed:
    """What a frame is built from: the bound query, its physical plan and the engine's result (both None for
    a measure without a contraction), and the engine when the query ran in this process."""

    run: Run
    bound: Bound
    plan: Plan | None
    result: Result | None
    engine: Engine | None


@dataclass(frozen=True)
class Measure:
    """One measure of the language; ``explaind_ql.measures.MEASURES`` holds them by keyword."""

    name: str
    clauses: Clauses
    complete: Callable[[Query, Bound, Run], Bound]  # the measure's own checks and settings
    logical: Callable[[Bound, Run], Plan] | None
    frame: Callable[[Computed], pl.DataFrame]
    schema: Callable[[Bound, Run], tuple[str, ...]]  # the frame's columns, in order
    distributable: bool = False  # its plan may run on a Dask cluster
    reports_residual: bool = False  # the shells print the result's replication residual under it


def unchanged(q: Query, bound: Bound, run: Run) -> Bound:
    """``complete`` for a measure that needs nothing beyond the shared binding."""
    return bound
