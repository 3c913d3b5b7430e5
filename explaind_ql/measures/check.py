"""``check``: replication per test item (invariant 1), with the update rebuild (invariant 3) and replay drift.

It contracts the whole model over every training example, with the test items (and, for
``output(...)`` targets, the outputs) as the only keys.
"""

from __future__ import annotations

from dataclasses import replace

import polars as pl
import torch

from ..engine.kernels import CHANGE_FLOOR
from ..lang.ast import Query
from ..plan import Plan, logical
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
    return bound.dims + ("actual", "explained", "residual", "relative_residual", "rounding", "max_update_error",
                         "max_replay_drift", "unconverged_steps")


def rebuilt(bound: Bound, run: Run) -> Plan:
    """The logical plan, each step's update also rebuilt from its batch's gradients (invariant 3)."""
    p = logical(bound, run)
    return replace(p, request=replace(p.request, rebuild=True))


def relative_scale(actual: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """What each item's residual is relative to: its own change, or, for an item that barely moves,
    √ε·(1 + |F(θ_a)|) (a change below that is rounding of F itself). No other item enters it."""
    return torch.maximum(actual.abs(), CHANGE_FLOOR * (1 + start.abs()))


def frame(c: Computed) -> pl.DataFrame:
    """The decomposition's prediction against the real change, per target."""
    r, b = c.result, c.bound
    assert r is not None and r.rebuild_gap is not None
    explained = r.total(c.run.split_size("train")).cpu()
    actual = r.actual.cpu()
    upd = r.stats.get("update_errors", [])
    drift = [d.rel_error for s, d in c.run.cache.drift.items() if b.a < s <= b.b]
    scale = relative_scale(actual, r.start.cpu() if r.start is not None else torch.zeros_like(actual))
    return pl.DataFrame({
        "test": [t for t, _ in r.target_labels],
        **({"output": [o for _, o in r.target_labels]} if b.target_kind == "outputs" else {}),
        "actual": actual.numpy(), "explained": explained.numpy(),
        "residual": (actual - explained).numpy(),
        "relative_residual": ((actual - explained).abs() / scale).numpy(),
        "rounding": r.rebuild_gap.sum((0, 2)).cpu().numpy(),
        "max_update_error": [max(upd, default=0.0)] * len(actual),
        "max_replay_drift": [max(drift) if drift else 0.0] * len(actual),
        "unconverged_steps": [len(r.stats.get("unconverged_steps", []))] * len(actual),
    })


MEASURE = Measure("check", CLAUSES, complete, rebuilt, frame, schema)
