"""Distribution: on a cluster, the plan's step chunks and what each chunk runs; locally, nothing."""

from __future__ import annotations

from ... import distributed
from ..nodes import Context, Plan


def distribute(plan: Plan, ctx: Context) -> Plan:
    """Split the chunked plan into step chunks for the Dask workers of ``ctx.scheduler`` (when there is one)."""
    if ctx.scheduler is None:
        return plan
    return distributed.distribute(plan, ctx.run, ctx.facts, ctx.scheduler, ctx.device)
