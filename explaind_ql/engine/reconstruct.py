"""Invariant 3: rebuild each recorded update from per-example gradients and the recorded state.

The per-example gradients enter the update only through their weighted sum (the clip scale and
the batch weight are per step), so the sum is taken as one backward pass of the batch.

This is what makes the data attribution trustworthy: it checks, at query time and in
the query's dtype, that hyperparameters, clip scales, batch weights and the loss in
the store turn per-example gradients back into the recorded Δθ_s. Where they do not (a
float32 recording's rounding), the gap is what per-example frames carry as their
``rounding`` term.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import model_io
from .trajectory import StepRecord

if TYPE_CHECKING:
    from .kernels import Engine

CHUNK_BYTES = 64 << 20  # activations of the batch held at once (a reverse pass keeps about all of them)


def rebuilt(engine: Engine, rec: StepRecord) -> torch.Tensor:
    """(P,) step ``rec``'s update as its batch's per-example gradients and the recorded state make it."""
    fn = engine.fn
    first = model_io.apply(engine.split("train")[0], lambda t: t[:1])
    chunk = max(1, CHUNK_BYTES // (fn.itemsize * max(1, fn.activation_elements(engine.theta0, first)[0])))
    g = torch.zeros_like(rec.theta)
    for part in torch.arange(len(rec.meta.batch), device=engine.device).split(chunk):
        g += fn.summed_grad(rec.theta, *engine.train_items(rec, part))
    g = g * (rec.meta.clip * rec.meta.weight)
    ls = rec.linear
    drive = ls.drive(rec.theta, g)
    m_new = ls.a * rec.state_before.momentum.to(engine.device, engine.dtype) + ls.b * drive
    return ls.delta(rec.theta, m_new, drive)


def update_error(rec: StepRecord, rebuilt_delta: torch.Tensor) -> float:
    """max |Δθ_rebuilt − Δθ_recorded| / max |Δθ_recorded| of one step."""
    scale = rec.delta.abs().max().clamp_min(torch.finfo(rec.delta.dtype).tiny)
    return float((rebuilt_delta - rec.delta).abs().max() / scale)


def update_errors(engine: Engine, a: int, b: int) -> torch.Tensor:
    """Max |Δθ_rebuilt − Δθ_recorded| / max |Δθ_recorded| for each step in a..b-1."""
    return torch.tensor([update_error(rec, rebuilt(engine, rec)) for rec in engine.traj.walk(a, b)],
                        dtype=torch.float64)
