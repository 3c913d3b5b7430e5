"""The plan's data: what every pass reads (:class:`Context`) and returns (:class:`Plan`).

Passes never mutate a plan: each returns a copy with its change and one line saying what
it decided (:meth:`Plan.decide`), which ``explain`` lists in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..engine import budget as engine_budget
from ..engine.facts import Facts
from ..engine.kernels import Request
from ..run import Run
from ..semantic import Bound


@dataclass(frozen=True)
class Context:
    """What every pass may read: the run and its facts on the device it plans for (no model is built to plan),
    the query's memory budget, and the
    cluster to distribute to (``scheduler``: an address or a Dask client; None runs locally) with the
    query's pinned device there (None: each worker's GPU when it has one)."""

    run: Run
    facts: Facts
    budget: int | None = None
    scheduler: Any = None
    device: str | None = None


@dataclass(frozen=True)
class Grouping:
    """How selected params map to output groups (``layer``/``param``/``element``/none)."""

    labels: tuple[str, ...]
    group_of_param: tuple[int, ...]
    by_element: bool


@dataclass(frozen=True)
class Plan:
    """One query's plan; passes return modified copies and append what they decided."""

    bound: Bound
    request: Request
    grouping: Grouping
    post_filter: dict = field(default_factory=dict)
    decisions: tuple[tuple[str, str], ...] = ()
    costs: dict = field(default_factory=dict)
    chunks: engine_budget.Chunks | None = None
    budget: int = 0
    distribution: Any = None  # explaind_ql.distributed.Distribution when it runs on a cluster

    def decide(self, pass_name: str, what: str, **changes) -> Plan:
        return replace(self, decisions=self.decisions + ((pass_name, what),), **changes)
