"""``explain``: the physical plan as a tree of typed nodes, rendered as text.

:func:`tree` builds the nodes from a plan (what each one computes and its estimate);
:func:`render` draws them, with each pass's decision below and, for ``explain analyze``,
what was measured at each node (``Node.measured`` names the measurement).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine import budget as engine_budget
from ..engine.facts import Facts
from ..engine.quadrature import KINKED_NODES
from ..run import Run
from .cost import fmt_flops
from .nodes import Plan

FOLD_TRAIN = "momentum folded backwards, one JVP per batch"
MOMENTUM_TRAIN = "per-example momentum for the selected examples"


@dataclass(frozen=True)
class Node:
    """One operator of the physical plan: its name, what it does, and the nodes it reads from."""

    name: str
    detail: str
    measured: str | None = None  # the key of its measurement in explain analyze
    children: tuple[Node, ...] = ()
    notes: tuple[str, ...] = ()  # continuation lines, indented under the node


def _quadrature(plan: Plan, facts: Facts) -> str:
    req = plan.request
    if req.tolerance is None:
        quad = f"{'midpoint' if req.rule == 'midpoint' else 'Gauss–Legendre'} {req.nodes} nodes, fixed (not adaptive)"
    elif facts.kink_segments:
        quad = (f"Gauss–Legendre {max(req.nodes, KINKED_NODES)} nodes per step corrected for every ReLU kink, "
                f"cut where two layers' kinks meet, halved where that misses the exact change (summed items "
                f"without kinks in a step: {req.nodes} nodes on one lane); adaptive to {req.tolerance:g}")
    else:
        quad = (f"Gauss–Legendre {req.nodes} nodes per step, halved where estimates disagree or miss "
                f"the exact change; adaptive to {req.tolerance:g}")
    if req.strategy == "project":
        quad += "; derivatives in each group's share of Δθ and decay (no φ)"
    return quad


def tree(plan: Plan, run: Run, facts: Facts) -> tuple[Node, ...]:
    """The plan's operators: the measure over one contraction of test side, train side and trajectory
    (and, on a cluster, how its step chunks run)."""
    b, req, t, space = plan.bound, plan.request, plan.request.target, run.space
    strategy = req.strategy or "undecided"  # a plan run through fewer than RULES
    sel_elems = sum(space.by_name[n].numel for n in req.params)
    need = plan.chunks.max_bytes if plan.chunks else 0
    if req.data:
        n_ex = run.split_size("train") if req.examples is None else len(req.examples)
        train = (f"{n_ex} examples {'kept' if req.keep_examples else 'summed'}; "
                 f"{ {'fold': FOLD_TRAIN, 'momentum': MOMENTUM_TRAIN}.get(strategy, '') }")
    else:
        train = "no per-example gradients: uses the recorded Δθ"
    replay = "dense: every state stored" if run.dense else f"replayed from {len(run.ckpt_states)} checkpoints"
    contract = Node("Contract", f"strategy={strategy}  terms: gradient, weight_decay, momentum  est "
                                f"{fmt_flops(plan.costs.get(strategy, 0.0))}, {engine_budget.fmt_bytes(need)}",
                    "contract", (
                        Node("TestSide", f"{t.kind}({t.split}, {len(t.items)} items) "
                                         f"{'kept' if t.keep_test else 'aggregated'}; {_quadrature(plan, facts)}",
                             "test"),
                        Node("TrainSide", train, "train"),
                        Node("Trajectory", f"steps {req.a}:{req.b} of {run.n_steps}; params {len(req.params)} of "
                                           f"{len(space.params)} tensors ({sel_elems:,} of {space.size:,} elements); "
                                           f"{replay}", "trajectory")))
    top = f"  top {b.top}{' abs' if b.top_abs else ''}" if b.top else ""
    nodes: tuple[Node, ...] = (Node(b.measure.capitalize(), f"keys: {', '.join(b.dims) or '(one row per term)'}{top}",
                                   "frame", (contract,)),)
    d = plan.distribution
    if d is not None:
        nodes += (Node("Distributed", d.summary(), "distributed", notes=(d.per_chunk(),)),)
    return nodes


def _lines(node: Node, measured: dict, lead: str = "", branch: str = "") -> list[str]:
    shown = f"  [{measured[node.measured]}]" if node.measured in measured else ""
    out = [f"{branch}{node.name}  {node.detail}{shown}"]
    out += [f"{lead}   {note}" for note in node.notes]
    for i, child in enumerate(node.children):
        last = i == len(node.children) - 1
        out += _lines(child, measured, lead + ("   " if last else "│  "), lead + ("└─ " if last else "├─ "))
    return out


def render(plan: Plan, run: Run, facts: Facts, analyzed: dict | None = None) -> str:
    """The plan's node tree, each pass's decision, and with ``analyzed`` what each node measured."""
    a = analyzed or {}
    lines = [line for node in tree(plan, run, facts) for line in _lines(node, a)]
    lines.append("passes:")
    lines += [f"  {i + 1}. {name}: {what}" for i, (name, what) in enumerate(plan.decisions)]
    if plan.post_filter:
        lines.append(f"  filter after computing: {plan.post_filter}")
    if analyzed:
        lines.append(f"analyzed: {analyzed.get('summary', '')}")
    return "\n".join(lines)
