"""``kernel``: influence kept per test item and training example, the paper's kernel matrix."""

from __future__ import annotations

from dataclasses import replace

from ..lang.ast import Query
from ..plan import logical
from ..results.frames import influence_columns
from ..run import Run
from ..semantic import Bound, Clauses
from .base import Measure
from .influence import frame


def complete(q: Query, bound: Bound, run: Run) -> Bound:
    """The test and example axes lead the keys, whatever else ``by`` asks for."""
    return replace(bound, dims=tuple(dict.fromkeys(("test", "example") + bound.dims)))


MEASURE = Measure(
    "kernel", Clauses(), complete, logical, frame, influence_columns, distributable=True, reports_residual=True)
