"""``similarity``: per layer, cosine similarity between test items' element-wise influence vectors."""

from __future__ import annotations

from dataclasses import replace

import polars as pl

from ..lang.ast import Query
from ..plan import logical
from ..run import Run
from ..semantic import Bound, Clauses, query_error
from .base import Computed, Measure

CLAUSES = Clauses({
    "from": ("it compares test items' influence vectors over every training example", "remove the 'from' clause"),
    "top": ("it reports every pair of test items", "remove the 'top' clause"),
}, fixed_shape=True)
SCHEMA = ("layer", "test", "test_2", "cosine")


def complete(q: Query, bound: Bound, run: Run) -> Bound:
    """At least two items; every selected element kept per test item."""
    if len(bound.test_items) < 2:
        pos = q.target.pos if q.target is not None else q.pos
        raise query_error(q, "similarity compares test items with each other: select at least two", pos)
    return replace(bound, dims=("test", "element"))


def frame(c: Computed) -> pl.DataFrame:
    r, b, run = c.result, c.bound, c.run
    assert r is not None
    vec = (r.gradient.sum((0, 2)) + r.weight_decay.sum(0) + r.momentum.sum(0)).cpu()  # (T, P_sel)
    space = run.space.subspace(list(b.params))
    layers: dict[str, list[int]] = {}
    for p in space.params:
        layers.setdefault(run.space.top_layer(p.name), []).extend(range(p.offset, p.stop))
    rows: dict[str, list] = {name: [] for name in SCHEMA}
    tests = list(b.test_items)
    for layer, cols in layers.items():
        v = vec[:, cols]
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
        cos = (v @ v.T).numpy()
        for i, ti in enumerate(tests):
            for j, tj in enumerate(tests):
                rows["layer"].append(layer)
                rows["test"].append(ti)
                rows["test_2"].append(tj)
                rows["cosine"].append(float(cos[i, j]))
    return pl.DataFrame(rows)


MEASURE = Measure("similarity", CLAUSES, complete, logical, frame, lambda bound, run: SCHEMA)
