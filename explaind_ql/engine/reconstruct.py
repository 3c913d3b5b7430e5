"""Invariant 3: rebuild each recorded update from per-example gradients and the recorded state.

This is what makes the data attribution trustworthy: it checks, at query time and in
the query's dtype, that hyperparameters, clip scales, batch weights and the loss in
the store turn per-example gradients back into the recorded Δθ_s.
"""

from __future__ import annotations

import torch

from .kernels import Engine


def update_errors(engine: Engine, a: int, b: int) -> torch.Tensor:
    """Max |Δθ_rebuilt − Δθ_recorded| / max |Δθ_recorded| for each step in a..b-1."""
    fn, run = engine.fn, engine.run
    space = run.space
    x, y = engine.split("train")
    errs = []
    for rec in engine.traj.walk(a, b):
        batch = rec.meta.batch.to(engine.device)
        g = fn.per_example_grads(space, rec.theta, rec.theta, x[batch], y[batch]).sum(0)
        g = g * (rec.meta.clip * rec.meta.weight)
        ls = rec.linear
        drive = ls.drive(rec.theta, g)
        m_new = ls.a * rec.state_before.momentum.to(engine.device, engine.dtype) + ls.b * drive
        rebuilt = ls.delta(rec.theta, m_new, drive)
        scale = rec.delta.abs().max().clamp_min(torch.finfo(engine.dtype).tiny)
        errs.append((rebuilt - rec.delta).abs().max() / scale)
    return torch.stack(errs) if errs else torch.zeros(0)
