"""Path integrals φ_s = ∫_0^1 ∇F(θ_s + tΔθ_s) dt by Gauss–Legendre quadrature, adaptively refined.

A step is split in halves wherever its n-node estimate and the sum of its halves' n-node
estimates differ by more than its share of the tolerance; smooth (GELU) steps stop at
once, steps across a ReLU kink are refined only where the kink is. The halves' estimate
is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

MAX_SPLITS = 256
MAX_KINKS = 4096  # ReLU crossings placed per lane and step; beyond that the adaptive rule alone refines
KINK_ITERATIONS = 30
KINK_RESOLUTION = 1e-12
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
    kinks: int = 0
    unconverged: list[int] = field(default_factory=list)
    max_error: float = 0.0


Spans = list[tuple[float, float, int]]  # (lo, hi, lane)


def _estimates(values_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], spans: Spans, n: int,
               dtype, device, stats: QuadStats, rule: str = "gauss") -> list[torch.Tensor]:
    """The n-node estimate of ∫ v(t) dt over each (lo, hi, lane) span, from one batched call."""
    t, w = nodes(n, dtype, device, rule)
    ts = torch.cat([lo + (hi - lo) * t for lo, hi, _ in spans])
    lanes = torch.tensor([lane for *_, lane in spans], device=device).repeat_interleave(n)
    v = values_at(ts, lanes)  # (len(spans)·n, ...)
    stats.evaluations += len(spans) * n
    return [(hi - lo) * torch.tensordot(w, v[k * n: (k + 1) * n], dims=1) for k, (lo, hi, _) in enumerate(spans)]


@dataclass(frozen=True)
class Integrand:
    """What is integrated along a step, lane by lane, and how its estimates are judged.

    A *lane* is a set of targets whose integrand is evaluated on its own: one test item
    when items are kept apart (a ReLU kink of one item then refines only that item), or
    all items together. ``values_at(ts, lanes)`` gives the integrand of lane ``lanes[j]``
    at θ + ts[j]Δθ: a Jacobian (C, P_sel) or directional derivatives (K, C) per lane.
    ``along(est)`` is an estimate's φ·Δθ per target of the lane (compared with the exact
    change ``f_at(ts, lanes)``, (m, C)) and ``spread(est)`` the sum of the magnitudes of the
    parts it is reported as; ``error(coarse, fine)`` the per-target
    discrepancy between two estimates, beyond what rounding alone explains. ``cat_dim``
    joins the lanes' results into the whole target vector.
    """

    values_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    along: Callable[[torch.Tensor], torch.Tensor]
    error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    lanes: int
    cat_dim: int
    f_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    preacts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    spread: Callable[[torch.Tensor], torch.Tensor] | None = None  # Σ|reported part| per target


def breakpoints(preacts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], lanes: int, dtype, device,
                stats: QuadStats) -> list[list[float]]:
    """Where each lane's integrand has a kink: the zero crossings of its ReLU pre-activations.

    ``preacts(ts, lanes)`` gives every ReLU input of the lane's forward pass at θ + tΔθ,
    (m, U). A unit whose sign differs at the step's ends crosses zero inside it; the
    crossing is found by the Illinois method (forward passes only, all crossings batched).
    Splitting the step there leaves a smooth integrand on each piece, where a few
    Gauss–Legendre nodes are exact to rounding. Crossings this misses (a unit that
    crosses twice) are still caught by the adaptive error check.
    """
    ln = torch.arange(lanes, device=device)
    ends = torch.cat([torch.zeros(lanes, dtype=dtype, device=device), torch.ones(lanes, dtype=dtype, device=device)])
    z0, z1 = preacts(ends, torch.cat([ln, ln])).split(lanes)  # both ends of every lane in one call
    lane, unit = torch.nonzero(z0 * z1 < 0, as_tuple=True)
    cuts: list[list[float]] = [[] for _ in range(lanes)]
    if len(lane) == 0:
        return cuts
    if len(lane) > MAX_KINKS * lanes:  # too many to place: leave them to the adaptive rule
        return cuts
    a, b = torch.zeros(len(lane), dtype=dtype, device=device), torch.ones(len(lane), dtype=dtype, device=device)
    fa, fb = z0[lane, unit].to(dtype), z1[lane, unit].to(dtype)
    resolution = max(KINK_RESOLUTION, 64 * torch.finfo(dtype).eps)  # float32 cannot place t closer
    noise = 64 * torch.finfo(dtype).eps * (fa.abs() + fb.abs())  # below this a unit's sign is rounding
    for _ in range(KINK_ITERATIONS):
        c = (b - fb * (b - a) / (fb - fa)).clamp(0, 1)
        fc = preacts(c, lane)[torch.arange(len(lane), device=device), unit].to(dtype)
        flip = fc * fb < 0
        moved = (c - b).abs()
        left = fc.abs() * moved / (fc - fb).abs().clamp_min(torch.finfo(dtype).tiny)  # the secant's distance to go
        a, fa = torch.where(flip, b, a), torch.where(flip, fb, fa / 2)  # Illinois: halve the kept end
        b, fb = c, fc
        if bool(((torch.minimum(moved, left) < resolution) | (fc.abs() <= noise)).all()):  # a cut this close costs
            break  # |jump|·resolution
    stats.kinks += len(lane)
    for ln_, t in zip(lane.tolist(), b.tolist()):
        if 0.0 < t < 1.0:
            cuts[ln_].append(t)
    return [_merged(sorted(c)) for c in cuts]


def _merged(ts: list[float], gap: float = 1e-9) -> list[float]:
    """Cuts closer than ``gap`` merged: a piece that short holds a negligible share of the integral."""
    out: list[float] = []
    for t in ts:
        if not out or t - out[-1] > gap:
            out.append(t)
    return out


def beyond_rounding(diff: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|diff| less the rounding noise of quantities of size ``scale``: float32 cannot do better."""
    return (diff.abs() - 16 * torch.finfo(diff.dtype).eps * scale).clamp_min(0)


def integrate(fn: Integrand, n: int, budget: torch.Tensor | None, step: int, stats: QuadStats, dtype, device,
              rule: str = "gauss") -> torch.Tensor:
    """∫_0^1 of the integrand with a fixed n-node rule, or refined adaptively when ``budget`` is given.

    ``budget`` (per target, absolute error of the step) turns on global adaptive
    refinement, per lane. An interval's estimate is its two halves' n-node estimates,
    Richardson-extrapolated with its own n-node estimate; its error is how much the
    halves' estimate differs from its own n-node estimate and, with ``f_at``, how far
    it misses the exact change F(hi) − F(lo): that catches kinks so close to an end that no
    node sees them (``f_at`` is given only when every param is selected, where that is
    exact). Each step is first cut at its located ReLU kinks (:func:`breakpoints`); a piece
    whose n-node estimate meets the exact change (within the budget shrunk by how much the
    reported parts cancel) is kept as it is.
    In each round, the intervals within a factor 2 of each lane's worst are halved,
    all lanes in one batched call, until every lane's summed error fits. A jump in the
    integrand, as at a ReLU kink, costs one split per halving of its error; the halves'
    estimates are reused, so a split costs 2·2n evaluations of one lane.
    """
    L = fn.lanes
    if budget is None:
        ests = _estimates(fn.values_at, [(0.0, 1.0, lane) for lane in range(L)], n, dtype, device, stats, rule)
        return torch.cat(ests, fn.cat_dim)
    shares = budget.reshape(L, -1)
    safe = shares.clamp_min(torch.finfo(budget.dtype).tiny)

    def f_of(points: list[tuple[float, int]]) -> list:
        if fn.f_at is None or not points:
            return [None] * len(points)
        v = fn.f_at(torch.tensor([t for t, _ in points], dtype=dtype, device=device),
                    torch.tensor([lane for _, lane in points], device=device))
        return list(v)

    def pieces_of(spans: list[tuple]) -> list[tuple]:
        if not spans:
            return []
        parts = [h for lo, hi, lane, *_ in spans for h in ((lo, (lo + hi) / 2, lane), ((lo + hi) / 2, hi, lane))]
        ests = _estimates(fn.values_at, parts, n, dtype, device, stats)
        out = []
        for k, (lo, hi, lane, whole, f_lo, f_hi) in enumerate(spans):
            left, halves = ests[2 * k], ests[2 * k] + ests[2 * k + 1]
            err = fn.error(whole, halves)
            # Richardson: the n-node rule's error shrinks 2^(2n)-fold per halving where F is smooth
            fine = halves + (halves - whole) / (4 ** n - 1)
            if f_lo is not None:
                err = torch.maximum(err, beyond_rounding(fn.along(fine) - (f_hi - f_lo), f_hi.abs() + f_lo.abs()))
            out.append((lo, hi, lane, fine, err, f_lo, f_hi, left, halves))
        return out

    cuts = breakpoints(fn.preacts, L, dtype, device, stats) if fn.preacts is not None else [[]] * L
    edges = [(lane, [0.0] + cuts[lane] + [1.0]) for lane in range(L)]
    first = [(lo, hi, lane) for lane, e in edges for lo, hi in zip(e, e[1:])]
    wholes = _estimates(fn.values_at, first, n, dtype, device, stats)
    f_edges = iter(f_of([(t, lane) for lane, e in edges for t in e]))
    f_first = []
    for lane, e in edges:
        f_e = [next(f_edges) for _ in e]
        f_first += list(zip(f_e, f_e[1:]))
    # a piece between located kinks whose n-node estimate already meets the exact change is kept as
    # it is. The exact change checks only the sum of the reported parts, so its miss is scaled up by
    # how much the parts cancel (Σ|part| / |sum|). At a ReLU kink the jump of ∇F·Δθ vanishes only
    # where every group's jump does, so the exact change sees any kink left inside. The rest are halved.
    pieces, pending = [], []
    for (lo, hi, lane), w, (f_lo, f_hi) in zip(first, wholes, f_first):
        if f_lo is not None:
            miss = beyond_rounding(fn.along(w) - (f_hi - f_lo), f_hi.abs() + f_lo.abs())
            if bool((miss * fn.spread(w) <= shares[lane] * fn.along(w).abs()).all()):
                pieces.append((lo, hi, lane, w, miss, f_lo, f_hi, None, None))
                continue
        pending.append((lo, hi, lane, w, f_lo, f_hi))
    pieces += pieces_of(pending)
    piece_bytes = max(1, 3 * L * wholes[0].numel() * wholes[0].element_size())
    max_splits = max(8, min(MAX_SPLITS, PIECES_BYTES // piece_bytes))  # per lane
    splits = [0] * L
    while True:
        err = torch.zeros_like(shares)
        for p in pieces:
            err[p[2]] += p[4]
        over = [lane for lane in range(L) if bool((err[lane] > shares[lane]).any())]
        if not [lane for lane in over if splits[lane] < max_splits]:
            break
        over = [lane for lane in over if splits[lane] < max_splits]
        rank = [float((p[4] / safe[p[2]]).max()) if p[2] in over else -1.0 for p in pieces]
        worst = {lane: max(r for r, p in zip(rank, pieces) if p[2] == lane) for lane in over}
        chosen = [i for i, p in enumerate(pieces) if p[2] in over and rank[i] >= worst[p[2]] / 2]
        mids = f_of([((pieces[i][0] + pieces[i][1]) / 2, pieces[i][2]) for i in chosen])
        spans = []
        for i, f_mid in zip(chosen, mids):
            lo, hi, lane, fine, _, f_lo, f_hi, left, halves = pieces[i]
            if halves is None:  # kept at its n-node estimate: judge it by its halves first
                spans.append((lo, hi, lane, fine, f_lo, f_hi))
                continue
            mid = (lo + hi) / 2
            spans += [(lo, mid, lane, left, f_lo, f_mid), (mid, hi, lane, halves - left, f_mid, f_hi)]
            splits[lane] += 1
        drop = set(chosen)
        pieces = [p for i, p in enumerate(pieces) if i not in drop] + pieces_of(spans)
    if over:  # lanes that hit the split cap
        stats.unconverged.append(step)
        stats.max_error = max(stats.max_error, float((err[over] / safe[over]).max()))
    stats.refined_steps += int(any(splits))
    total = [sum(p[3] for p in pieces if p[2] == lane) for lane in range(L)]
    return torch.cat(total, fn.cat_dim)
