"""``check``: replication per test item (invariant 1), with the update rebuild (invariant 3) and replay drift.

It contracts the whole model over every training example, with the test items (and, for
``output(...)`` targets, the outputs) as the only keys.
"""

from __future__ import annotations

from dataclasses import replace

import polars as pl

from ..engine.reconstruct import update_errors
from ..lang.ast import Query
from ..plan import logical
from ..run import Run
from ..semantic import Bound, Clauses
from .base import Computed, Measure

CLAUSES = Clauses({
    "of": ("it replicates the change of the whole model, so it uses every param", "remove the 'of' clause"),
    "from": ("it replicates the change due to every training example", "remove the 'from' clause"),
    "top": ("it reports one row per test item", "remove the 'top' clause"),
}, fixed_shape=True)


def complete(q: Query, bound: Bound, run: Run) -> Bound:
    """One row per test item (and output): those are the only axes it keeps."""
    return replace(bound, dims=("test", "output") if bound.target_kind == "outputs" else ("test",))


def schema(bound: Bound, run: Run) -> tuple[str, ...]:
    """The keys ``complete`` set, then the replication columns."""
    return bound.dims + ("actual", "explained", "residual", "relative_residual", "max_update_error",
                         "max_replay_drift", "unconverged_steps")


def frame(c: Computed) -> pl.DataFrame:
    """The decomposition's prediction against the real change, per target."""
    r, b, eng = c.result, c.bound, c.engine
    assert r is not None and eng is not None  # check runs in this process
    explained = r.total().cpu()
    actual = r.actual.cpu()
    upd = update_errors(eng, b.a, b.b)
    drift = [d.rel_error for s, d in c.run.cache.drift.items() if b.a < s <= b.b]
    scale = float(actual.abs().max()) or 1.0
    return pl.DataFrame({
        "test": [t for t, _ in r.target_labels],
        **({"output": [o for _, o in r.target_labels]} if b.target_kind == "outputs" else {}),
        "actual": actual.numpy(), "explained": explained.numpy(),
        "residual": (actual - explained).numpy(),
        "relative_residual": ((actual - explained).abs() / scale).numpy(),
        "max_update_error": [float(upd.max()) if len(upd) else 0.0] * len(actual),
        "max_replay_drift": [max(drift) if drift else 0.0] * len(actual),
        "unconverged_steps": [len(r.stats.get("unconverged_steps", []))] * len(actual),
    })


MEASURE = Measure("check", CLAUSES, complete, logical, frame, schema)
