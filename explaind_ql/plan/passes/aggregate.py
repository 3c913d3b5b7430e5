"""Test aggregation: with no test axis kept, differentiate Σ_x F_x once per node instead of once per item."""

from __future__ import annotations

from dataclasses import replace

from ..nodes import Context, Plan


def aggregate_tests(plan: Plan, ctx: Context) -> Plan:
    """Sum the test items inside the target when neither the frame nor the measure keeps them apart."""
    t = plan.request.target
    if "test" in plan.bound.dims or not t.keep_test:
        return plan.decide("test aggregation", f"kept: {len(t.items)} test items are an axis of the result")
    req = replace(plan.request, target=replace(t, keep_test=False))
    how = ("in each step the items whose ReLU inputs cross no kink together, one gradient per quadrature node, the "
           "others each on its own, then summed" if ctx.facts.kink_segments else "one gradient per quadrature node")
    return plan.decide("test aggregation", f"{len(t.items)} test items summed inside the target: {how}", request=req)
