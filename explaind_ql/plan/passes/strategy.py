"""Strategy choice: the one place a request's strategy is decided; the engine runs it as given."""

from __future__ import annotations

from dataclasses import replace

from ..cost import cheapest, fmt_flops
from ..nodes import Context, Plan


def choose_strategy(plan: Plan, ctx: Context) -> Plan:
    """``delta`` / ``project`` / ``fold`` / ``momentum``: the cheapest that computes the requested axes."""
    best, costs = cheapest(plan.request, ctx.run, ctx.facts)
    why = ", ".join(f"{k} {fmt_flops(v)}" for k, v in costs.items())
    return plan.decide("strategy choice", f"{best} ({why})", request=replace(plan.request, strategy=best),
                       costs=costs)
