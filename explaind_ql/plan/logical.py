"""The logical plan: everything computed, then filtered — what the passes start from."""

from __future__ import annotations

from ..engine.kernels import Request
from ..engine.targets import TargetSpec
from ..run import Run
from ..semantic import Bound
from .nodes import Grouping, Plan


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
    # by token: a sequence's loss kept apart per predicted position (1..L-1), on the output axis
    positions = run.split(bound.target_split)[1].shape[1] - 1 if "token" in bound.dims else 0
    target = TargetSpec(bound.target_kind, bound.target_split, bound.test_items, bound.output,
                        keep_test=True, keep_output="output" in bound.dims or "token" in bound.dims,
                        positions=positions)
    data = "example" in bound.dims or bound.examples is not None
    req = Request(0, run.n_steps, target, all_params, g.group_of_param, len(all_params), by_element,
                  step_bin, n_in + 1, None, data, bound.nodes, bound.tolerance)
    post = {"params": bound.params, "steps": (bound.a, bound.b), "examples": bound.examples}
    return Plan(bound, req, g, post_filter=post)
