"""The cost model: rough FLOPs of each strategy that computes a request's axes.

Per quadrature node and test item, a forward pass costs 2 FLOPs per param, each reverse
pass of a Jacobian row or forward-mode tangent about 4 more; holding and contracting a
Jacobian costs :data:`JAC_TRAFFIC` per element. The constants are orders of magnitude,
measured once: they rank strategies, they do not time them.
"""

from __future__ import annotations

from ..engine import budget as engine_budget
from ..engine.facts import Facts
from ..engine.kernels import JVP_MAX_TANGENTS, Request
from ..run import Run

FLOPS_PER_PARAM = 6  # forward + backward, per parameter and item: a rough, documented constant
JAC_TRAFFIC = 8  # FLOP-equivalents to hold and contract one Jacobian element (measured order)
UPDATE_FLOPS = 20  # per parameter and step: the optimizer model's update, decay and momentum terms
FIRST_STEP_DIRECTIONS = 2  # a group's share of Δθ and of the decay; later steps add the carried momentum
LATER_STEP_DIRECTIONS = 3
FOLD_TANGENTS_PER_TARGET = 3  # a folded batch JVP carries φ, the decay and the momentum per target and group
MOMENTUM_BATCH_PASSES = 3  # batch passes per step of the momentum strategy (a rough order, like FLOPS_PER_PARAM)


def estimate_costs(req: Request, run: Run, facts: Facts) -> dict[str, float]:
    """FLOPs of each applicable strategy (for the choice and for explain)."""
    space = run.space
    p_total = space.size
    steps = req.b - req.a
    t_eff = len(facts.target_labels(req.target)) if req.target.keep_test else 1
    items = len(req.target.items)
    sel = sum(space.by_name[n].numel for n in req.params)
    nodes = engine_budget.expected_nodes(req)
    rows = len(facts.target_labels(req.target))  # Jacobian rows per node
    per_item_rows = rows / items if req.target.keep_test else rows
    test_side = steps * nodes * (items * (2 + 4 * per_item_rows) * p_total + JAC_TRAFFIC * rows * sel)
    costs = {}
    if not req.data:
        costs["delta"] = test_side + steps * UPDATE_FLOPS * p_total
        if not req.by_element:  # each group's share of Δθ and of the decay (and carried momentum): a pass per
            # share (forward mode) or per target (reverse), the fewer
            k = req.n_groups * (LATER_STEP_DIRECTIONS if req.a > 0 else FIRST_STEP_DIRECTIONS)
            costs["project"] = (steps * nodes * items * (2 + 4 * min(k, per_item_rows)) * p_total
                                + steps * UPDATE_FLOPS * p_total)
        return costs
    batch = facts.max_batch
    n_ex = run.split_size("train") if req.examples is None else len(req.examples)
    frac = min(1.0, n_ex / max(1, run.split_size("train")))
    g = sel if req.by_element else req.n_groups
    tangents = t_eff * g
    if req.n_bins == 1:
        per_batch = (tangents * FOLD_TANGENTS_PER_TARGET if tangents <= JVP_MAX_TANGENTS
                     else FOLD_TANGENTS_PER_TARGET + t_eff * sel)
        costs["fold"] = test_side + steps * per_batch * FLOPS_PER_PARAM * p_total * batch * frac
    costs["momentum"] = (test_side + steps * MOMENTUM_BATCH_PASSES * FLOPS_PER_PARAM * p_total * batch * frac
                         + steps * 2 * n_ex * sel * t_eff)
    return costs


def cheapest(req: Request, run: Run, facts: Facts) -> tuple[str, dict[str, float]]:
    """The cheapest strategy that computes the request's axes (fold on a tie), and every estimate."""
    costs = estimate_costs(req, run, facts)
    return min(costs, key=lambda k: (costs[k], k != "fold")), costs


def fmt_flops(f: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if f < 1000:
            return f"{f:.1f} {unit}FLOP"
        f /= 1000
    return f"{f:.1f} EFLOP"
