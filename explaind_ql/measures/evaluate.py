"""``evaluate``: the recorded model itself at chosen states (optionally with some layers' weights from
another state): accuracy, loss and KL to the final model. It has no contraction, so no plan."""

from __future__ import annotations

from dataclasses import dataclass, replace

import polars as pl
import torch
import torch.nn.functional as F

from .. import model_io
from ..engine.kernels import Engine
from ..losses import IGNORE
from ..lang.ast import Query
from ..run import Run
from ..semantic import Bound, Clauses, query_error, resolve_components
from .base import Computed, Measure

CLAUSES = Clauses({
    "of": ("it runs the whole model", "to take some layers' weights from another step, write "
                                      "'with <components> from step N'"),
    "on": ("it reports accuracy, loss and KL of the model's outputs on the items", ""),  # hint: semantic
    "from": ("it runs the model on the 'on' items only", "remove the 'from' clause"),
    "top": ("it reports one row per step", "remove the 'top' clause"),
}, fixed_shape=True, states=True)
SCHEMA = ("step", "accuracy", "loss", "kl_to_final")


@dataclass(frozen=True)
class Evaluation:
    """The states to run, and the params (``swap_params``) whose weights come from state ``swap_step``."""

    steps: tuple[int, ...]
    swap_params: tuple[str, ...] = ()
    swap_step: int | None = None


def complete(q: Query, bound: Bound, run: Run) -> Bound:
    """The states ``at steps A:B every K`` names (states 0..N: ``at step N`` and an open end reach the final
    state, ``at steps 0..N every K`` ends at it when K divides N), and the swap."""
    n = run.n_steps
    st = q.steps
    ev = Evaluation(tuple(range(bound.a, bound.b, (st.every if st else None) or 1)))
    if q.swap is not None:
        swap_params = resolve_components(q, q.swap.components, run)
        if not 0 <= q.swap.from_step <= n:
            raise query_error(q, f"step {q.swap.from_step} is out of range: states are 0..{n}", q.swap.pos)
        ev = replace(ev, swap_params=swap_params, swap_step=q.swap.from_step)
    return replace(bound, measure_args=ev)


def frame(c: Computed) -> pl.DataFrame:
    run, b, eng = c.run, c.bound, c.engine
    ev = b.measure_args
    assert isinstance(ev, Evaluation) and eng is not None
    x, y = eng.split(b.target_split)
    idx = torch.tensor(b.test_items, device=eng.device)
    x, y = model_io.apply(x, lambda t: t[idx]), y[idx]
    wanted = sorted(set(ev.steps) | {run.n_steps} | ({ev.swap_step} if ev.swap_step is not None else set()))
    states = _states_at(run, eng, wanted)
    swap_idx = None
    if ev.swap_params:
        swap_idx = run.space.element_index(run.space.subspace(list(ev.swap_params))).to(eng.device)
    final_logp = _logp(eng, states[run.n_steps], x)
    rows: dict[str, list] = {name: [] for name in SCHEMA}
    for s in ev.steps:
        theta = states[s].clone()
        if swap_idx is not None:
            theta[swap_idx] = states[ev.swap_step][swap_idx]
        out = eng.fn.forward(theta, x)
        logp = _logp(eng, theta, x, out)
        rows["step"].append(s)
        rows["accuracy"].append(_accuracy(run, out, y))
        rows["loss"].append(float(run.loss.per_example(out, y).mean()))
        rows["kl_to_final"].append(float((final_logp.exp() * (final_logp - logp)).sum(1).mean()))
    return pl.DataFrame(rows)


def _accuracy(run: Run, out: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy: of the classes, or of the predicted tokens of sequences; NaN for real-valued targets."""
    if run.loss.sequence:
        pred, labels = out[:, :-1].argmax(-1), y[:, 1:]
        keep = labels != IGNORE
        return float((pred[keep] == labels[keep]).double().mean())
    return float((out.argmax(1) == y).double().mean()) if not y.is_floating_point() else float("nan")


def _logp(eng: Engine, theta: torch.Tensor, x: model_io.Inputs, out: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities, one row per item (per position of a sequence)."""
    out = eng.fn.forward(theta, x) if out is None else out
    rows = out.flatten(0, -2) if eng.run.loss.sequence else out.reshape(len(out), -1)
    return F.log_softmax(rows, dim=1)


def _states_at(run: Run, eng: Engine, steps: list[int]) -> dict[int, torch.Tensor]:
    """θ_s for each wanted state s (reading stored states, replaying the rest)."""
    out: dict[int, torch.Tensor] = {}
    want = set(steps)
    if 0 in want:
        out[0] = run.stored_state(0)[0].to(eng.device, eng.dtype)
    for rec in eng.traj.walk(0, max(steps)):
        if rec.s + 1 in want:
            out[rec.s + 1] = rec.theta_next
    return out


MEASURE = Measure("evaluate", CLAUSES, complete, None, frame, lambda bound, run: SCHEMA)
