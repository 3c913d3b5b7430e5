"""Path integrals φ_s = ∫_0^1 ∇F(θ_s + tΔθ_s) dt by Gauss–Legendre quadrature, adaptively refined.

A step is split in halves wherever its estimate with n nodes and with 2n nodes differ
by more than its share of the tolerance; smooth (GELU) steps stop at once, steps across
a ReLU kink are refined only where the kink is. The 2n-node estimate is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

MAX_DEPTH = 14


@lru_cache(maxsize=32)
def _gl(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1) / 2, w / 2


def nodes(n: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss–Legendre nodes and weights on [0, 1]."""
    x, w = _gl(n)
    return torch.tensor(x, dtype=dtype, device=device), torch.tensor(w, dtype=dtype, device=device)


@dataclass
class QuadStats:
    """Work done, for explain analyze: gradient evaluations, refined steps, unconverged steps."""

    evaluations: int = 0
    refined_steps: int = 0
    unconverged: list[int] = field(default_factory=list)
    max_error: float = 0.0


def _estimate(jac_at: Callable[[torch.Tensor], torch.Tensor], lo: float, hi: float, n: int,
              dtype, device, stats: QuadStats) -> torch.Tensor:
    t, w = nodes(n, dtype, device)
    ts = lo + (hi - lo) * t
    j = jac_at(ts)  # (n, T, P)
    stats.evaluations += n
    return (hi - lo) * torch.einsum("n,ntp->tp", w, j)


def integrate(jac_at: Callable[[torch.Tensor], torch.Tensor], delta_sel: torch.Tensor, n: int,
              budget: torch.Tensor | None, step: int, stats: QuadStats, dtype, device) -> torch.Tensor:
    """φ (T, P_sel) over [0, 1]. ``jac_at(ts)`` gives the Jacobian at θ + tΔθ for each t.

    ``budget`` (per target, absolute) turns on adaptive refinement; None means fixed n nodes.
    """
    if budget is None:
        return _estimate(jac_at, 0.0, 1.0, n, dtype, device, stats)
    refined = False

    def rec(lo: float, hi: float, depth: int) -> torch.Tensor:
        nonlocal refined
        coarse = _estimate(jac_at, lo, hi, n, dtype, device, stats)
        fine = _estimate(jac_at, lo, hi, 2 * n, dtype, device, stats)
        err = ((fine - coarse) @ delta_sel).abs()
        allowed = budget * (hi - lo)
        if bool((err <= allowed).all()):
            return fine
        if depth >= MAX_DEPTH:
            if step not in stats.unconverged:
                stats.unconverged.append(step)
            stats.max_error = max(stats.max_error, float((err - allowed).max()))
            return fine
        refined = True
        mid = (lo + hi) / 2
        return rec(lo, mid, depth + 1) + rec(mid, hi, depth + 1)

    out = rec(0.0, 1.0, 0)
    stats.refined_steps += int(refined)
    return out
