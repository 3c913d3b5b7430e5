"""``influence``: the decomposition's terms, summed to the ``by`` keys the query asks for."""

from __future__ import annotations

import polars as pl

from ..plan import logical
from ..results.frames import influence_columns, influence_frame
from ..semantic import Clauses
from .base import Computed, Measure, unchanged


def frame(c: Computed) -> pl.DataFrame:
    assert c.result is not None and c.plan is not None
    return influence_frame(c.result, c.plan, c.run)


MEASURE = Measure(
    "influence", Clauses(), unchanged, logical, frame, influence_columns, distributable=True, reports_residual=True)
