"""Restriction pushdown: compute only the selected params, steps and examples instead of filtering afterwards."""

from __future__ import annotations

from dataclasses import replace

from ..logical import grouping
from ..nodes import Context, Plan


def pushdown_restrictions(plan: Plan, ctx: Context) -> Plan:
    """Gradients only for what is selected: the component, step and example filters move into the request."""
    b = plan.bound
    g = grouping(b, ctx.run, b.params)
    req = plan.request
    keep_step = "step" in b.dims
    assert req.step_bin is not None  # the logical plan bins every step
    step_bin = tuple(req.step_bin[b.a: b.b]) if keep_step else None
    n_bins = max(1, req.n_bins - 1) if keep_step else 1
    new = replace(req, a=b.a, b=b.b, params=b.params, group_of_param=g.group_of_param, n_groups=len(g.labels),
                  by_element=g.by_element, step_bin=step_bin, n_bins=n_bins, examples=b.examples,
                  keep_examples="example" in b.dims)
    what = (f"params {len(req.params)}→{len(b.params)} tensors, steps {req.b - req.a}→{b.b - b.a}, "
            f"examples {'all' if b.examples is None else f'all→{len(b.examples)}'}")
    return plan.decide("restriction pushdown", what, request=new, grouping=g, post_filter={})
