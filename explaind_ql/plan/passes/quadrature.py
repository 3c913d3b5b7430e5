"""The quadrature rule: how many Gauss–Legendre nodes each step's adaptive integration starts from."""

from __future__ import annotations

from dataclasses import replace

from ..nodes import Context, Plan

# a smooth integrand's n-node error shrinks as h^(2n): from 4 nodes the first estimate meets the tolerance on
# most steps, where 2 nodes are halved on most (tiny GPT-2, 60 steps: 992 gradient evaluations at 2, 366 at 3,
# 272 at 4). Kinked models keep the rule their kink correction is tuned for.
SMOOTH_NODES = 4


def choose_nodes(plan: Plan, ctx: Context) -> Plan:
    """On a model without ReLU kinks, start adaptive integration from :data:`SMOOTH_NODES` nodes per step."""
    req = plan.request
    if req.tolerance is None:
        return plan.decide("quadrature rule", f"fixed: {req.nodes} nodes per step, as asked")
    if ctx.facts.kink_segments:
        return plan.decide("quadrature rule", f"{req.nodes} nodes per step to start (ReLU kinks: each step's "
                                              "kinks are corrected for and cut at)")
    return plan.decide("quadrature rule", f"{SMOOTH_NODES} nodes per step to start (a smooth model: fewer steps "
                                          "need halving)", request=replace(req, nodes=SMOOTH_NODES))
