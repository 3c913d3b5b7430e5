"""Logical plan, optimisation passes, physical plan — and ``explain``.

A bound query first becomes a *logical* plan that computes everything (all params, all
steps, all examples, every test item) and filters afterwards. The passes of :data:`RULES`,
each a function ``(Plan, Context) -> Plan`` (sqlglot's optimizer's shape), then rewrite
it in order; ``optimise(..., rules=...)`` runs another sequence:

1. :func:`pushdown_restrictions` moves the component, step and example filters into the
   engine request (gradients only for what is selected);
2. :func:`aggregate_tests` sums the test items inside the target when no test axis is kept;
3. :func:`choose_strategy` picks ``delta`` / ``project`` / ``fold`` / ``momentum`` by estimated cost;
4. :func:`chunk_under_budget` splits the request so its working set fits the memory budget.

With ``using cluster`` (or ``scheduler=``), :func:`explaind_ql.distributed.distribute`
adds a last pass that splits the plan into step chunks for Dask workers.

The result is the *physical* plan: an engine chunk tree plus the post-processing
(filter, top-k) that the frame needs. ``explain`` prints the tree with each decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from .engine import budget as engine_budget
from .engine.kernels import CALL_BYTES, JVP_MAX_TANGENTS, Engine, Request
from .engine.quadrature import KINKED_NODES
from .engine.targets import TargetSpec
from .run import Run
from .semantic import Bound

FLOPS_PER_PARAM = 6  # forward + backward, per parameter and item: a rough, documented constant
JAC_TRAFFIC = 8  # FLOP-equivalents to hold and contract one Jacobian element (measured order)
UPDATE_FLOPS = 20  # per parameter and step: the optimizer model's update, decay and momentum terms
GPU_CALL_FACTOR = 16  # a GPU's batched calls hold this many times CALL_BYTES: its rows are cheap


@dataclass(frozen=True)
class Context:
    """What every pass may read: the run, the engine it plans for, the query's memory budget."""

    run: Run
    engine: Engine
    budget: int | None = None


@dataclass(frozen=True)
class Grouping:
    """How selected params map to output groups (``layer``/``param``/``element``/none)."""

    labels: tuple[str, ...]
    group_of_param: tuple[int, ...]
    by_element: bool


@dataclass(frozen=True)
class Plan:
    """One query's plan; passes return modified copies and append what they decided."""

    bound: Bound
    request: Request
    grouping: Grouping
    post_filter: dict = field(default_factory=dict)
    decisions: tuple[tuple[str, str], ...] = ()
    costs: dict = field(default_factory=dict)
    chunks: engine_budget.Chunks | None = None
    budget: int = 0
    distribution: Any = None  # explaind_ql.distributed.Distribution when it runs on a cluster

    def decide(self, pass_name: str, what: str, **changes) -> Plan:
        return replace(self, decisions=self.decisions + ((pass_name, what),), **changes)


def grouping(bound: Bound, run: Run, params: tuple[str, ...]) -> Grouping:
    dims = bound.dims
    if "element" in dims:
        return Grouping(tuple(params), tuple(range(len(params))), True)
    if "param" in dims:
        return Grouping(tuple(params), tuple(range(len(params))), False)
    if "layer" in dims:
        layers = list(dict.fromkeys(run.space.top_layer(n) for n in params))
        return Grouping(tuple(layers), tuple(layers.index(run.space.top_layer(n)) for n in params), False)
    return Grouping(("all",), tuple(0 for _ in params), False)


def logical(bound: Bound, run: Run) -> Plan:
    """Everything computed, then filtered: the plan before any optimisation.

    Every param is its own group, every step is binned (steps outside the window go to
    a last, discarded bin) and every training example is kept; the selection is applied
    to the frame afterwards.
    """
    all_params = tuple(run.space.names)
    every = bound.step_every if "step" in bound.dims else run.n_steps
    n_in = max(1, -(-(bound.b - bound.a) // every))
    step_bin = tuple((s - bound.a) // every if bound.a <= s < bound.b else n_in for s in range(run.n_steps))
    by_element = "element" in bound.dims
    g = Grouping(all_params, tuple(range(len(all_params))), by_element)
    target = TargetSpec(bound.target_kind, bound.target_split, bound.test_items, bound.output,
                        keep_test=True, keep_output="output" in bound.dims)
    data = "example" in bound.dims or bound.examples is not None
    req = Request(0, run.n_steps, target, all_params, g.group_of_param, len(all_params), by_element,
                  step_bin, n_in + 1, None, data, bound.nodes, bound.tolerance)
    post = {"params": bound.params, "steps": (bound.a, bound.b), "examples": bound.examples}
    return Plan(bound, req, g, post_filter=post)


# -- passes -----------------------------------------------------------------------------------

def pushdown_restrictions(plan: Plan, ctx: Context) -> Plan:
    """Compute only the selected params, steps and examples instead of filtering afterwards."""
    b = plan.bound
    g = grouping(b, ctx.run, b.params)
    req = plan.request
    keep_step = "step" in b.dims
    step_bin = tuple(req.step_bin[b.a: b.b]) if keep_step else None
    n_bins = max(1, req.n_bins - 1) if keep_step else 1
    new = replace(req, a=b.a, b=b.b, params=b.params, group_of_param=g.group_of_param, n_groups=len(g.labels),
                  by_element=g.by_element, step_bin=step_bin, n_bins=n_bins, examples=b.examples,
                  keep_examples="example" in b.dims)
    what = (f"params {len(req.params)}→{len(b.params)} tensors, steps {req.b - req.a}→{b.b - b.a}, "
            f"examples {'all' if b.examples is None else f'all→{len(b.examples)}'}")
    return plan.decide("restriction pushdown", what, request=new, grouping=g, post_filter={})


def aggregate_tests(plan: Plan, ctx: Context) -> Plan:
    """No test axis kept: differentiate Σ_x F_x once per node instead of once per item."""
    t = plan.request.target
    if "test" in plan.bound.dims or plan.bound.measure != "influence" or not t.keep_test:
        return plan.decide("test aggregation", f"kept: {len(t.items)} test items are an axis of the result")
    req = replace(plan.request, target=replace(t, keep_test=False))
    return plan.decide("test aggregation", f"{len(t.items)} test items summed inside the target: "
                                           "one gradient per quadrature node (models with ReLU kinks: in each "
                                           "step the items without kinks together, the others each on its own, "
                                           "then summed)", request=req)


def estimate_costs(req: Request, run: Run, engine: Engine) -> dict[str, float]:
    """Rough FLOPs of each applicable strategy (for the choice and for explain).

    Per quadrature node and test item, a forward pass costs 2 FLOPs per param, each
    reverse pass of a Jacobian row or forward-mode tangent about 4 more; holding and
    contracting a Jacobian costs JAC_TRAFFIC per element.
    """
    space = run.space
    p_total = space.size
    steps = req.b - req.a
    t_eff = len(engine.target_labels(req.target)) if req.target.keep_test else 1
    items = len(req.target.items)
    sel = sum(space.by_name[n].numel for n in req.params)
    nodes = engine_budget.expected_nodes(req)
    rows = len(engine.target_labels(req.target))  # Jacobian rows per node
    per_item_rows = rows / items if req.target.keep_test else rows
    test_side = steps * nodes * (items * (2 + 4 * per_item_rows) * p_total + JAC_TRAFFIC * rows * sel)
    costs = {}
    if not req.data:
        costs["delta"] = test_side + steps * UPDATE_FLOPS * p_total
        if not req.by_element:  # each group's share of Δθ and of the decay (and carried momentum): a pass per
            k = req.n_groups * (3 if req.a > 0 else 2)  # share (forward mode) or per target (reverse), the fewer
            costs["project"] = (steps * nodes * items * (2 + 4 * min(k, per_item_rows)) * p_total
                                + steps * UPDATE_FLOPS * p_total)
        return costs
    batch = engine.max_batch
    n_ex = run.split_size("train") if req.examples is None else len(req.examples)
    frac = min(1.0, n_ex / max(1, run.split_size("train")))
    g = sel if req.by_element else req.n_groups
    tangents = t_eff * g
    if req.n_bins == 1:
        per_batch = tangents * 3 if tangents <= JVP_MAX_TANGENTS else 3 + t_eff * sel
        costs["fold"] = test_side + steps * per_batch * FLOPS_PER_PARAM * p_total * batch * frac
    costs["momentum"] = (test_side + steps * 3 * FLOPS_PER_PARAM * p_total * batch * frac
                         + steps * 2 * n_ex * sel * t_eff)
    return costs


def cheapest(req: Request, run: Run, engine: Engine) -> tuple[str, dict[str, float]]:
    """The cheapest strategy that computes the request's axes (fold on a tie), and every estimate."""
    costs = estimate_costs(req, run, engine)
    return min(costs, key=lambda k: (costs[k], k != "fold")), costs


def choose_strategy(plan: Plan, ctx: Context) -> Plan:
    """The cheapest strategy that computes the requested axes."""
    best, costs = cheapest(plan.request, ctx.run, ctx.engine)
    why = ", ".join(f"{k} {fmt_flops(v)}" for k, v in costs.items())
    return plan.decide("strategy choice", f"{best} ({why})", request=replace(plan.request, strategy=best),
                       costs=costs)


def chunk_under_budget(plan: Plan, ctx: Context) -> Plan:
    """Split over fold segments, test items, examples and params until each chunk fits."""
    engine = ctx.engine
    limit = ctx.budget or engine_budget.default_budget(engine.device)
    # a batched test-side call may hold 1/8 of the budget, from 1 MiB up to CALL_BYTES (GPU_CALL_FACTOR× that
    # on a GPU, whose arithmetic per row is so fast that a call's fixed cost needs more rows to amortise)
    cap = CALL_BYTES if engine.device.type == "cpu" else GPU_CALL_FACTOR * CALL_BYTES
    # the answer (merged result and frame) is held beside the largest chunk's working set
    out = engine_budget.answer(engine, plan.request)
    if out.bytes >= limit:
        raise engine_budget.refuse_output(out, limit)
    room = limit - out.bytes
    req = replace(plan.request, call_bytes=min(cap, max(1 << 20, room // 8)))
    tree = engine_budget.plan(engine, req, room)
    n = len(tree.leaves())
    need = tree.max_bytes
    fmt = engine_budget.fmt_bytes
    what = (f"{n} chunk{'s' if n != 1 else ''}, largest ≈ {fmt(need)}, answer ≈ {fmt(out.bytes)} "
            f"({out.cells:,} values), of a {fmt(limit)} budget")
    return plan.decide("chunking", what, chunks=tree, budget=limit)


def fmt_flops(f: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if f < 1000:
            return f"{f:.1f} {unit}FLOP"
        f /= 1000
    return f"{f:.1f} EFLOP"


Rule = Callable[[Plan, Context], Plan]
RULES: tuple[Rule, ...] = (pushdown_restrictions, aggregate_tests, choose_strategy, chunk_under_budget)
WITHOUT_PUSHDOWN: tuple[Rule, ...] = RULES[1:]  # computes everything, then filters: what pushdown is checked against


def optimise(bound: Bound, run: Run, engine: Engine, *, rules: Sequence[Rule] = RULES) -> Plan:
    """Logical plan → physical plan, through ``rules`` in order."""
    ctx = Context(run, engine, bound.budget)
    p = logical(bound, run)
    for rule in rules:
        p = rule(p, ctx)
    return p


# -- explain ----------------------------------------------------------------------------------

def render(plan: Plan, run: Run, engine: Engine, analyzed: dict | None = None) -> str:
    """The plan tree with each pass's decision and the estimated FLOPs and bytes."""
    b, req = plan.bound, plan.request
    space = run.space
    sel_elems = sum(space.by_name[n].numel for n in req.params)
    strategy = req.strategy or req.choose_strategy()
    flops = plan.costs.get(strategy, 0.0)
    need = plan.chunks.max_bytes if plan.chunks else 0
    t = req.target
    if req.tolerance is None:
        quad = f"{'midpoint' if req.rule == 'midpoint' else 'Gauss–Legendre'} {req.nodes} nodes, fixed (not adaptive)"
    elif engine.kink_segments:
        quad = (f"Gauss–Legendre {max(req.nodes, KINKED_NODES)} nodes per step corrected for every ReLU kink, "
                f"cut where two layers' kinks meet, halved where that misses the exact change (summed items "
                f"without kinks in a step: {req.nodes} nodes on one lane); adaptive to {req.tolerance:g}")
    else:
        quad = (f"Gauss–Legendre {req.nodes} nodes per step, halved where estimates disagree or miss "
                f"the exact change; adaptive to {req.tolerance:g}")
    if req.strategy == "project":
        quad += "; derivatives in each group's share of Δθ and decay (no φ)"
    keys = ", ".join(b.dims) or "(one row per term)"
    replay = "dense: every state stored" if run.dense else f"replayed from {len(run.ckpt_states)} checkpoints"
    if req.data:
        n_ex = run.split_size("train") if req.examples is None else len(req.examples)
        train = (f"TrainSide  {n_ex} examples {'kept' if req.keep_examples else 'summed'}; "
                 f"{ {'fold': 'momentum folded backwards, one JVP per batch', 'momentum': 'per-example momentum for the selected examples'}.get(strategy, '') }")
    else:
        train = "TrainSide  no per-example gradients: uses the recorded Δθ"
    a = analyzed or {}
    lines = [
        f"{b.measure.capitalize()}  keys: {keys}" + (f"  top {b.top}{' abs' if b.top_abs else ''}" if b.top else "")
        + _measured(a, "frame"),
        f"└─ Contract  strategy={strategy}  terms: gradient, weight_decay, momentum  est {fmt_flops(flops)}, "
        f"{engine_budget.fmt_bytes(need)}" + _measured(a, "contract"),
        f"   ├─ TestSide  {t.kind}({t.split}, {len(t.items)} items) "
        f"{'kept' if t.keep_test else 'aggregated'}; {quad}" + _measured(a, "test"),
        f"   ├─ {train}" + _measured(a, "train"),
        f"   └─ Trajectory  steps {req.a}:{req.b} of {run.n_steps}; params {len(req.params)} of "
        f"{len(space.params)} tensors ({sel_elems:,} of {space.size:,} elements); {replay}" + _measured(a, "trajectory"),
    ]
    if plan.distribution is not None:
        lines.append(plan.distribution.describe(_measured(a, "distributed")))
    lines.append("passes:")
    lines += [f"  {i + 1}. {name}: {what}" for i, (name, what) in enumerate(plan.decisions)]
    if plan.post_filter:
        lines.append(f"  filter after computing: {plan.post_filter}")
    if analyzed:
        lines.append(f"analyzed: {analyzed.get('summary', '')}")
    return "\n".join(lines)


def _measured(a: dict, node: str) -> str:
    return f"  [{a[node]}]" if node in a else ""


__all__ = ["RULES", "WITHOUT_PUSHDOWN", "Context", "Plan", "optimise", "render", "logical", "pushdown_restrictions",
           "aggregate_tests", "choose_strategy", "chunk_under_budget"]
