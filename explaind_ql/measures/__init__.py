"""The measures of the language, one module each, by the keyword that names them in a query.

Adding a measure: a module here that declares a :class:`~.base.Measure` (its clauses, its
validation, its logical plan, its frame and schema), its entry below, and its keyword in
``grammar/explaind.lark``'s ``measure`` rule.
"""

from __future__ import annotations

from typing import Mapping

from ..lang.ast import Query
from ..run import Run
from ..semantic import Bound, bind as bind_shared
from . import check, evaluate, influence, kernel, similarity
from .base import Computed, Measure

MEASURES: Mapping[str, Measure] = {m.name: m for m in (
    influence.MEASURE, kernel.MEASURE, check.MEASURE, similarity.MEASURE, evaluate.MEASURE)}


def bind(q: Query, run: Run, distributed: bool = False) -> Bound:
    """The semantic check of ``q`` against ``run``: what every measure shares, then its measure's own."""
    measure = MEASURES[q.measure]
    return measure.complete(q, bind_shared(q, run, measure.clauses, distributed), run)


__all__ = ["MEASURES", "Computed", "Measure", "bind"]
