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

MAX_SPLITS = 256
PIECES_BYTES = 256 << 20  # live pieces keep their (T, P) estimates: refinement is capped to fit this


@lru_cache(maxsize=32)
def _rule(n: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    if rule == "midpoint":  # the reference implementation's rule, kept for like-for-like comparisons
        return (np.arange(n) + 0.5) / n, np.full(n, 1.0 / n)
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1) / 2, w / 2


def nodes(n: int, dtype: torch.dtype, device, rule: str = "gauss") -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights on [0, 1]: Gauss–Legendre (default) or the midpoint rule."""
    x, w = _rule(n, rule)
    return torch.tensor(x, dtype=dtype, device=device), torch.tensor(w, dtype=dtype, device=device)


@dataclass
class QuadStats:
    """Work done, for explain analyze: gradient evaluations, refined steps, unconverged steps."""

    evaluations: int = 0
    refined_steps: int = 0
    unconverged: list[int] = field(default_factory=list)
    max_error: float = 0.0


def _estimates(jac_at: Callable[[torch.Tensor], torch.Tensor], lo: float, hi: float, ns: tuple[int, ...],
               dtype, device, stats: QuadStats, rule: str = "gauss") -> list[torch.Tensor]:
    """Estimates of ∫_lo^hi ∇F with each node count in ``ns``, from one batched Jacobian call."""
    rules = [nodes(n, dtype, device, rule) for n in ns]
    ts = torch.cat([lo + (hi - lo) * t for t, _ in rules])
    j = jac_at(ts)  # (Σn, T, P)
    stats.evaluations += len(ts)
    out, k = [], 0
    for t, w in rules:
        out.append((hi - lo) * torch.einsum("n,ntp->tp", w, j[k: k + len(t)]))
        k += len(t)
    return out


def integrate(jac_at: Callable[[torch.Tensor], torch.Tensor], delta_sel: torch.Tensor, n: int,
              budget: torch.Tensor | None, step: int, stats: QuadStats, dtype, device,
              f_at: Callable[[float], torch.Tensor] | None = None, rule: str = "gauss") -> torch.Tensor:
    """φ (T, P_sel) over [0, 1]. ``jac_at(ts)`` gives the Jacobian at θ + tΔθ for each t.

    ``budget`` (per target, absolute error of the step) turns on global adaptive
    refinement: the interval with the largest error is halved until the summed error
    fits (so a jump in the integrand, as at a ReLU kink, costs one split per halving of
    its error). An interval's error is how much its n- and 2n-node estimates differ
    along Δθ and, with ``f_at`` (the target at θ + tΔθ), how far its estimate misses the
    exact change F(hi) − F(lo): that catches kinks so close to an end that no node sees
    them. ``f_at`` is passed only when every param is selected, where that is exact.
    """
    if budget is None:
        return _estimates(jac_at, 0.0, 1.0, (n,), dtype, device, stats, rule)[0]

    def piece(lo: float, hi: float, f_lo, f_hi) -> tuple:
        coarse, fine = _estimates(jac_at, lo, hi, (n, 2 * n), dtype, device, stats)
        err = ((fine - coarse) @ delta_sel).abs()
        if f_lo is not None:
            err = torch.maximum(err, (fine @ delta_sel - (f_hi - f_lo)).abs())
        return (lo, hi, fine, err, f_lo, f_hi)

    safe = budget.clamp_min(torch.finfo(budget.dtype).tiny)
    piece_bytes = max(1, budget.numel() * delta_sel.numel() * delta_sel.element_size())
    max_splits = max(8, min(MAX_SPLITS, PIECES_BYTES // piece_bytes))
    pieces = [piece(0.0, 1.0, *((f_at(0.0), f_at(1.0)) if f_at is not None else (None, None)))]
    splits = 0
    while bool((sum(p[3] for p in pieces) > budget).any()):
        if splits >= max_splits:
            stats.unconverged.append(step)
            stats.max_error = max(stats.max_error, float((sum(p[3] for p in pieces) / safe).max()))
            break
        worst = max(range(len(pieces)), key=lambda i: float((pieces[i][3] / safe).max()))
        lo, hi, _, _, f_lo, f_hi = pieces.pop(worst)
        mid = (lo + hi) / 2
        f_mid = f_at(mid) if f_at is not None else None
        pieces += [piece(lo, mid, f_lo, f_mid), piece(mid, hi, f_mid, f_hi)]
        splits += 1
    stats.refined_steps += int(splits > 0)
    return sum(p[2] for p in pieces)
