"""Chunking: split the request over fold segments, test items, examples and params until each chunk fits."""

from __future__ import annotations

from dataclasses import replace

from ...engine import budget as engine_budget
from ...engine.kernels import CALL_BYTES
from ..nodes import Context, Plan

GPU_CALL_FACTOR = 16  # a GPU's batched calls hold this many times CALL_BYTES: its rows are cheap
CALL_SHARE = 8  # a batched test-side call may hold 1/CALL_SHARE of the room the answer leaves
MIN_CALL_BYTES = 1 << 20  # ... but never less: below it a call's fixed cost dominates


def chunk_under_budget(plan: Plan, ctx: Context) -> Plan:
    """Chunks that each fit the memory budget beside the answer, or a refusal naming the axis to narrow."""
    facts = ctx.facts
    limit = ctx.budget or engine_budget.default_budget(facts.device)
    # a GPU's arithmetic per row is so fast that a call's fixed cost needs more rows to amortise
    cap = CALL_BYTES if facts.device.type == "cpu" else GPU_CALL_FACTOR * CALL_BYTES
    # the answer (merged result and frame) is held beside the largest chunk's working set
    out = engine_budget.answer(facts, plan.request)
    if out.bytes >= limit:
        raise engine_budget.refuse_output(out, limit)
    room = limit - out.bytes
    req = replace(plan.request, call_bytes=min(cap, max(MIN_CALL_BYTES, room // CALL_SHARE)))
    tree = engine_budget.plan(facts, req, room)
    n = len(tree.leaves())
    need = tree.max_bytes
    fmt = engine_budget.fmt_bytes
    what = (f"{n} chunk{'s' if n != 1 else ''}, largest ≈ {fmt(need)}, answer ≈ {fmt(out.bytes)} "
            f"({out.cells:,} values), of a {fmt(limit)} budget")
    return plan.decide("chunking", what, chunks=tree, budget=limit)
