"""Path integrals φ_s = ∫_0^1 ∇F(θ_s + tΔθ_s) dt by Gauss–Legendre quadrature, adaptively refined.

A step is split in halves wherever its n-node estimate and the sum of its halves' n-node
estimates differ by more than its share of the tolerance; smooth (GELU) steps stop at
once. On ReLU models the integrand jumps where a unit's input crosses zero. Those kinks
are located from the inputs and their t-derivatives at the step's ends, and the n-node
rule is first *corrected* for them (:func:`kink_coefficients`): the model is multilinear
in its ReLU masks, so every kink's jump, weighted by what the rule owes it, is one
forward-mode derivative per node, whatever the number of kinks. Where that corrected
estimate misses the exact change F(θ_{s+1}) − F(θ_s) and kinks of several ReLU calls
(layers) meet, whose jumps change each other's, the step is cut at the rarer calls' kinks;
elsewhere it is halved as before. The halves' estimate is kept.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

MAX_SPLITS = 256
# nodes of the kink-corrected rule: its leading error is each jump's interpolation through the nodes,
# measured 10× smaller with 3 nodes than with 2 on the paper's grokking model, for 1.5× the work
KINKED_NODES = 3
FEW_KINKS = 8  # a span missing with at most this many kinks, all of one call, is cut at each of them
KINK_ITERATIONS = 30  # safeguarded Newton steps on each crossing's cubic (elementwise, no model evaluations)
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
    corrected_lanes: int = 0  # lane-steps whose kink-corrected whole-step estimate met the exact change
    unconverged: list[int] = field(default_factory=list)
    max_error: float = 0.0


Spans = list[tuple[float, float, int]]  # (lo, hi, lane)


@dataclass(frozen=True)
class Rows:
    """The evaluations whose sum an estimate is: row j is the integrand of lane ``lanes[j]`` at ``ts[j]``.

    Plain rows are weighted by ``weights``; kink-corrected rows carry ``jumps`` (weight, tail,
    share, end side; see :func:`kink_coefficients`) and add up as they are. Any linear function
    of the integrand (a gradient instead of a projection) is integrated by the same rule from them.
    """

    ts: torch.Tensor
    lanes: torch.Tensor
    weights: torch.Tensor
    jumps: tuple[torch.Tensor, ...] | None = None


def plain_rows(spans: Spans, n: int, dtype, device, rule: str = "gauss") -> Rows:
    """Every span's n-node rule as rows: the nodes and weights of [0, 1] moved onto each (lo, hi, lane)."""
    t, w = nodes(n, dtype, device, rule)
    lo, hi = (torch.tensor([sp[k] for sp in spans], dtype=dtype, device=device)[:, None] for k in (0, 1))
    lanes = torch.tensor([lane for *_, lane in spans], device=device).repeat_interleave(n)
    return Rows((lo + (hi - lo) * t).flatten(), lanes, ((hi - lo) * w).flatten())


def _estimates(values_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], spans: Spans, n: int,
               dtype, device, stats: QuadStats, rule: str = "gauss") -> list[torch.Tensor]:
    """The n-node estimate of ∫ v(t) dt over each (lo, hi, lane) span, from one batched call."""
    rows = plain_rows(spans, n, dtype, device, rule)
    v = values_at(rows.ts, rows.lanes)  # (len(spans)·n, ...)
    stats.evaluations += len(spans) * n
    w = rows.weights.view(len(spans), n)
    return [torch.tensordot(w[k], v[k * n: (k + 1) * n], dims=1) for k in range(len(spans))]


@dataclass(frozen=True)
class Integrand:
    """What is integrated along a step, lane by lane, and how its estimates are judged.

    A *lane* is a set of targets whose integrand is evaluated on its own: one test item
    when items are kept apart, or all items together. ``values_at(ts, lanes)`` gives the
    integrand of lane ``lanes[j]`` at θ + ts[j]Δθ: a Jacobian (C, P_sel) or directional
    derivatives (K, C) per lane. ``along(est)`` is an estimate's φ·Δθ per target of the lane
    (compared with the exact change ``f_at(ts, lanes)``, (m, C), so it must cover the whole Δθ:
    a param selection's integrand carries the other params' part as one more, unreported
    column or group, or a jump that its halvings cannot see goes unrefined) and ``spread(est)`` the sum
    of the magnitudes of the parts it is reported as; ``error(coarse, fine)`` the per-target
    discrepancy between two estimates, beyond what rounding alone explains. ``cat_dim``
    joins the lanes' results into the whole target vector.

    On ReLU models ``slopes(ts, lanes)`` gives every ReLU input and its t-derivative, (m, U)
    each, and ``jumped(ts, lanes, w, tail, share, end_side)`` a node's weighted value plus
    the kink jumps it owes the rule (:func:`kink_coefficients`), in the shape of ``values_at``;
    ``segments`` splits the U inputs by the ReLU call they come from, and ``live`` says which
    of them can change the lane's targets (only those are cut at).
    """

    values_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    along: Callable[[torch.Tensor], torch.Tensor]
    error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    lanes: int
    cat_dim: int
    f_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    slopes: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    spread: Callable[[torch.Tensor], torch.Tensor] | None = None  # Σ|reported part| per target
    jumped: Callable[..., torch.Tensor] | None = None
    segments: tuple[int, ...] = ()  # how many of the U inputs each ReLU call has, in order
    live: torch.Tensor | None = None  # (L, U): the inputs whose unit reaches the lane's targets at all


@dataclass(frozen=True)
class Kinks:
    """Zero crossings of a lane's U ReLU inputs inside one span of a step, on the span scaled to [0, 1].

    ``t`` is where a crossing unit's input is zero (0 elsewhere), ``sign`` +1 where the input
    turns positive, −1 where it turns negative, 0 for units that do not cross, and ``end_side``
    whether the input is positive at the step's end.
    """

    t: torch.Tensor
    sign: torch.Tensor
    end_side: torch.Tensor

    @property
    def count(self) -> int:
        return int((self.sign != 0).sum())


def locate_kinks(z0: torch.Tensor, z1: torch.Tensor, d0: torch.Tensor, d1: torch.Tensor) -> Kinks:
    """Crossings of ReLU inputs from their values ``z`` and t-derivatives ``d`` at both ends of a step.

    The input along the step is the cubic Hermite interpolant of those four numbers, which is
    exact to fourth order in the step's length (a training step moves the inputs little and
    smoothly); its root is found by Newton steps kept inside the sign-change bracket. A unit
    whose sign is the same at both ends is taken not to cross (one that crosses twice is left
    to the exact-change check and the adaptive rule).
    """
    dtype = z0.dtype
    crossing = z0 * z1 < 0
    t = torch.zeros_like(z0)
    sign = torch.zeros_like(z0)
    if bool(crossing.any()):
        a, b, p, q = (v[crossing] for v in (z0, z1, d0, d1))
        lo, hi = torch.zeros_like(a), torch.ones_like(a)
        r = (a / (a - b)).clamp(0, 1)  # the secant's root to start
        for _ in range(KINK_ITERATIONS):
            r2, r3 = r * r, r * r * r
            f = (2 * r3 - 3 * r2 + 1) * a + (r3 - 2 * r2 + r) * p + (3 * r2 - 2 * r3) * b + (r3 - r2) * q
            df = (6 * r2 - 6 * r) * (a - b) + (3 * r2 - 4 * r + 1) * p + (3 * r2 - 2 * r) * q
            left = f * a > 0  # still on the start's side: the root lies above r
            lo, hi = torch.where(left, r, lo), torch.where(left, hi, r)
            step = r - f / torch.where(df == 0, torch.ones_like(df), df)
            inside = (step >= lo) & (step <= hi) & (df != 0)
            new = torch.where(f == 0, r, torch.where(inside, step, (lo + hi) / 2))
            done = bool(((new - r).abs() <= 4 * torch.finfo(dtype).eps).all())
            r = new
            if done:
                break
        t[crossing] = r
        sign[crossing] = torch.sign(b)
    return Kinks(t, sign, z1 > 0)


def kink_coefficients(kinks: Kinks, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the n-node Gauss rule owes each kink's jump, at each node: (tail, share), (n, U) each.

    Telescoping the masks from the step's start, the integrand is a smooth part plus, for each
    kink u at t_u, its jump D_u(t) switched on after t_u. The rule integrates the smooth part to
    rounding and gets ∫ D_u wrong by ∫_{t_u}^1 D_u − Σ_{τ_j > t_u} w_j D_u(τ_j). With D_u
    interpolated through the nodes (it is smooth: both masks are held), that is
    Σ_j (∫_{t_u}^1 L_j − w_j [τ_j > t_u]) D_u(τ_j) with the Lagrange basis L_j. ``tail`` is
    sign_u ∫_{t_u}^1 L_j and ``share`` sign_u w_j; which side of t_u a node lies on is read
    from the unit's own sign there (model_fn._KinkJumps), so it agrees with the mask used.
    """
    x, w = _rule(n, "gauss")
    basis = np.linalg.inv(np.vander(x, n, increasing=True))  # L_j(t) = Σ_k basis[k, j] t^k
    t = kinks.t
    k = torch.arange(1, n + 1, dtype=t.dtype, device=t.device).view(-1, *[1] * t.dim())
    tails_of_powers = (1 - t[None] ** k) / k  # ∫_t^1 s^(k-1) ds, (n, ...)
    lagrange = torch.tensor(basis.T, dtype=t.dtype, device=t.device)  # (j, k)
    tail = torch.tensordot(lagrange, tails_of_powers, dims=1) * kinks.sign[None]
    share = torch.tensor(w, dtype=t.dtype, device=t.device).view(-1, *[1] * t.dim()) * kinks.sign[None]
    return tail, share


def beyond_rounding(diff: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|diff| less the rounding noise of quantities of size ``scale``: float32 cannot do better."""
    return (diff.abs() - 16 * torch.finfo(diff.dtype).eps * scale).clamp_min(0)


def _miss(fn: Integrand, est: torch.Tensor, f_lo: torch.Tensor, f_hi: torch.Tensor) -> torch.Tensor:
    """How far an estimate's φ·Δθ misses the exact change F(hi) − F(lo), beyond rounding."""
    return beyond_rounding(fn.along(est) - (f_hi - f_lo), f_hi.abs() + f_lo.abs())


def _allowance(fn: Integrand, est: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """The miss of the exact change an estimate may have: its share shrunk by how much its parts cancel.

    The exact change checks only the sum of the reported parts, so the miss is scaled up by how
    much the parts cancel (Σ|part| / |sum|). At a ReLU kink the jump of ∇F·Δθ vanishes only where
    every group's jump does, so the exact change sees any kink the estimate got wrong.
    """
    return share * fn.along(est).abs() / fn.spread(est).clamp_min(torch.finfo(est.dtype).tiny)


class _Rule:
    """n-node estimates over spans (lo, hi, lane) of a step, kink-corrected on ReLU models when adaptive.

    A fixed rule (``using quadrature N``) stays the plain N-node rule the user asked for.

    The ReLU inputs and their t-derivatives are evaluated once per (point, lane) and kept, so
    halving a span costs the slopes at its midpoint only.
    """

    def __init__(self, fn: Integrand, n: int, dtype, device, stats: QuadStats, rule: str, adaptive: bool):
        self.kinked = fn.slopes is not None and fn.jumped is not None and adaptive
        self.n = max(n, KINKED_NODES) if self.kinked else n
        self.fn, self.dtype, self.device, self.stats, self.rule = fn, dtype, device, stats, rule
        self._slopes: dict[tuple[float, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _ensure_slopes(self, points: list[tuple[float, int]]) -> None:
        todo = list(dict.fromkeys(p for p in points if p not in self._slopes))
        if not todo:
            return
        z, d = self.fn.slopes(torch.tensor([t for t, _ in todo], dtype=self.dtype, device=self.device),
                              torch.tensor([lane for _, lane in todo], device=self.device))
        for k, p in enumerate(todo):
            self._slopes[p] = (z[k].to(self.dtype), d[k].to(self.dtype))

    def _ends(self, spans: list[tuple[float, float, int]]) -> tuple[torch.Tensor, ...]:
        """(z, dz/dt) at every span's start, then at its end: (S, U) each, evaluated where not yet kept."""
        self._ensure_slopes([(t, lane) for lo, hi, lane in spans for t in (lo, hi)])
        return tuple(torch.stack([self._slopes[(sp[end], sp[2])][j] for sp in spans])
                     for end in (0, 1) for j in (0, 1))

    def kinks(self, spans: list[tuple[float, float, int]]) -> tuple[Kinks, torch.Tensor, torch.Tensor]:
        """Every span's kinks, (S, U), each in its own coordinate s = (t − lo) / (hi − lo); with lo and hi − lo."""
        z0, d0, z1, d1 = self._ends(spans)
        lo, hi = (torch.tensor([sp[k] for sp in spans], dtype=self.dtype, device=self.device) for k in (0, 1))
        width = (hi - lo)[:, None]
        return locate_kinks(z0, z1, d0 * width, d1 * width), lo, width

    def cuts(self, spans: list[tuple[float, float, int]]) -> list[list[float]]:
        """Where to cut each span whose corrected estimate missed: at the kinks of all its ReLU calls but
        the one with the most, in order; at each kink when they are a few of one call; else nowhere.

        A kink's jump depends on the masks of the other calls' units (a unit's downstream weights,
        or its input), so two calls' kinks on one span leave a cross term the correction does not
        see. The correction is also first order in each mask: where the layers after a unit are
        curved (a softmax right after the last ReLU), its jump away from the kink is off by a term
        that grows with the unit's input, and a cut at the kink removes it.

        A cut is placed at the root of the Hermite interpolant from the span's ends (no evaluations).
        Where a unit's input bends at other kinks the cut lands slightly off its kink, which then sits
        near a piece's end, inside that piece: the piece's correction covers it, and the exact-change
        check refines the piece if not. Evaluating each root and re-bracketing (up to four rounds, one
        batched call each) took a quarter of the test side on the paper's run and saved no evaluations.
        """
        if not self.kinked or not spans:
            return [[] for _ in spans]
        offsets = [0] + list(itertools.accumulate(self.fn.segments))
        chosen = []  # (span, units to cut at)
        kinks = self.kinks(spans)[0]
        for k, (lo, hi, lane) in enumerate(spans):
            crossing = kinks.sign[k] != 0
            if self.fn.live is not None:
                crossing &= self.fn.live[lane]
            parts = crossing.split(self.fn.segments)
            counts = [int(c.sum()) for c in parts]
            if sum(c > 0 for c in counts) >= 2:
                most = counts.index(max(counts))
                chosen.append((k, torch.cat([torch.nonzero(c).flatten() + offsets[j]
                                             for j, c in enumerate(parts) if j != most])))
            elif 0 < sum(counts) <= FEW_KINKS:  # one call's few kinks: cut at each, the pieces are smooth
                chosen.append((k, torch.nonzero(crossing).flatten()))
        out: list[list[float]] = [[] for _ in spans]
        for k, units in chosen:  # each kink where the Hermite interpolant of its unit's input crosses zero
            lo, hi, _ = spans[k]
            for t in (lo + (hi - lo) * kinks.t[k, units]).tolist():
                if lo < t < hi:
                    out[k].append(t)
        return [sorted(dict.fromkeys(c)) for c in out]

    def rows(self, spans: Spans, located: tuple[Kinks, torch.Tensor, torch.Tensor] | None = None) -> Rows:
        """The evaluations of every span's n-node estimate, n rows per span in span order."""
        if not self.kinked:
            return plain_rows(spans, self.n, self.dtype, self.device, self.rule)
        n = self.n
        kinks, _, width = located or self.kinks(spans)  # all spans at once, each on its own [0, 1]
        tail, share = kink_coefficients(kinks, n)  # (n, S, U)
        plain = plain_rows(spans, n, self.dtype, self.device)
        return Rows(plain.ts, plain.lanes, plain.weights,
                    (plain.weights, (tail * width[None]).transpose(0, 1).flatten(0, 1),
                     (share * width[None]).transpose(0, 1).flatten(0, 1), kinks.end_side.repeat_interleave(n, dim=0)))

    def estimates(self, spans: list[tuple[float, float, int]]) -> list[torch.Tensor]:
        if not spans:
            return []
        if not self.kinked:
            return _estimates(self.fn.values_at, spans, self.n, self.dtype, self.device, self.stats, self.rule)
        n, S = self.n, len(spans)
        located = kinks, lo, width = self.kinks(spans)
        whole = (lo == 0) & (width[:, 0] == 1)
        self.stats.kinks += int((kinks.sign[whole] != 0).sum())
        rows = self.rows(spans, located)
        v = self.fn.jumped(rows.ts, rows.lanes, *rows.jumps)
        self.stats.evaluations += S * n
        return list(v.unflatten(0, (S, n)).sum(1))


def _kept_signed(piece: tuple, signed: dict[tuple, tuple[torch.Tensor, torch.Tensor]]):
    """A pool's piece kept at its whole estimate: its (signed miss, rounding), which cancel in the pool's sum;
    None for a piece judged by its unsigned error."""
    return signed.get(piece[:3]) if piece[7] is None else None


def _cancelled(miss_sum: torch.Tensor, rounding: torch.Tensor) -> torch.Tensor:
    """What a pool's kept pieces' signed misses leave together, beyond their rounding."""
    return (miss_sum.abs() - rounding).clamp_min(0)


def _marked(open_: list[int], rank: dict[int, float], worst: dict[int, float], pieces: list[tuple],
            pool: list[int], shares: torch.Tensor, signed: dict[tuple, tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """The pieces to refine this round: those within a factor 2 of their budget's worst, and then, worst
    first, as many more as it takes for the error the others leave, were the chosen ones exact, to fit
    half the budget.

    A batched call costs about the same for 1 row as for 40 (dispatch, not arithmetic, on these
    models), so refining the pieces that the budget cannot carry in one round, rather than only
    the worst few in each of many rounds, spends rows to save rounds. A pool's kept pieces (``signed``)
    enter its error as their sum, whose misses cancel: what they leave is the sum of the others, not the
    pool's error less the chosen ones' (that count stopped after a few pieces whose misses outweighed the
    cancelled sum, round after round: 25 rounds of 3–30 pieces on a step of the paper's model).
    """
    chosen = {i for i in open_ if rank[i] >= worst[pool[pieces[i][2]]] / 2}
    zero = {b: torch.zeros_like(shares[b]) for b in worst}
    unsigned, miss_sum, rounding = dict(zero), dict(zero), dict(zero)

    def add(i: int, sign: int) -> None:
        p = pieces[i]
        b, kept = pool[p[2]], _kept_signed(p, signed)
        if kept is not None:
            miss_sum[b] = miss_sum[b] + sign * kept[0]
            rounding[b] = rounding[b] + sign * kept[1]
        else:
            unsigned[b] = unsigned[b] + sign * p[4]
    for i, p in enumerate(pieces):
        if pool[p[2]] in worst and i not in chosen:
            add(i, 1)
    for i in sorted(open_, key=lambda i: -rank[i]):
        b = pool[pieces[i][2]]
        left = unsigned[b] + _cancelled(miss_sum[b], rounding[b])
        if i in chosen or bool((left <= shares[b] / 2).all()):
            continue
        chosen.add(i)
        add(i, -1)
    return sorted(chosen)


def integrate(fn: Integrand, n: int, budget: torch.Tensor | None, step: int, stats: QuadStats, dtype, device,
              rule: str = "gauss", pooled: bool = False, rows: bool = False) -> torch.Tensor | tuple[torch.Tensor, Rows]:
    """∫_0^1 of the integrand with a fixed n-node rule, or refined adaptively when ``budget`` is given.

    ``budget`` (per target, absolute error of the step) turns on global adaptive refinement;
    on ReLU models every estimate is kink-corrected (:class:`_Rule`). Each lane has its own
    budget, or with ``pooled`` the lanes (items whose results are summed) share one: the
    budget of their sum. A lane's whole-step estimate that meets the exact change (``f_at``;
    the integrand of a param selection carries the other params' part for it; within the budget shrunk
    by how much the reported parts cancel, for pooled lanes those of their sum) is kept as
    it is. A span that misses with kinks of several ReLU calls is cut at all but one call's
    kinks (:meth:`_Rule.cuts`); otherwise its estimate becomes its two halves' estimates,
    Richardson-extrapolated with its own, and its error is how much the halves' estimate
    differs from its own and, with ``f_at``, how far it misses the exact change. In each
    round, the intervals within a factor 2 of each budget's worst are refined, all lanes in
    one batched call, until every budget's summed error fits. The halves' estimates are
    reused, so a halving costs 2·2n evaluations of one lane.

    With ``rows`` the estimate is not extrapolated, and the :class:`Rows` it sums are returned with it,
    so that another linear function of the same integrand gets the same rule.
    """
    L = fn.lanes
    est = _Rule(fn, n, dtype, device, stats, rule if budget is None else "gauss", budget is not None)
    whole = [(0.0, 1.0, lane) for lane in range(L)]
    if budget is None:  # with rows, the rule is all that is wanted
        return (None, est.rows(whole)) if rows else torch.cat(est.estimates(whole), fn.cat_dim)
    shares = budget.reshape(1 if pooled else L, -1)
    safe = shares.clamp_min(torch.finfo(budget.dtype).tiny)
    pool = [0] * L if pooled else list(range(L))

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
        ests = est.estimates(parts)
        out = []
        for k, (lo, hi, lane, coarse, f_lo, f_hi) in enumerate(spans):
            left, halves = ests[2 * k], ests[2 * k] + ests[2 * k + 1]
            err = fn.error(coarse, halves)
            # Richardson: the n-node rule's error shrinks 2^(2n)-fold per halving where F is smooth
            fine = halves if rows else halves + (halves - coarse) / (4 ** est.n - 1)
            if f_lo is not None:
                err = torch.maximum(err, _miss(fn, fine, f_lo, f_hi))
            out.append((lo, hi, lane, fine, err, f_lo, f_hi, left, halves))
        return out

    def judged(spans: list[tuple[float, float, int]]) -> list[tuple]:
        """Pieces of fresh spans, their error the miss of the exact change where that is known.

        A lane's own piece is kept at its estimate where the miss fits its allowance, else judged
        by its halves; pooled pieces, and pieces that will be cut at kinks, start from their miss
        and the worst are refined first.
        """
        f_edges = f_of([(t, lane) for lo, hi, lane in spans for t in (lo, hi)])
        kept, pending, missed = [], [], []
        for k, ((lo, hi, lane), w) in enumerate(zip(spans, est.estimates(spans))):
            f_lo, f_hi = f_edges[2 * k], f_edges[2 * k + 1]
            if f_lo is not None:
                miss = _miss(fn, w, f_lo, f_hi)
                if pooled:  # the pool's error is that of the items' sum: misses of opposite sign cancel in it
                    signed[(lo, hi, lane)] = (fn.along(w) - (f_hi - f_lo),
                                              16 * torch.finfo(w.dtype).eps * (f_hi.abs() + f_lo.abs()))
                piece = (lo, hi, lane, w, miss, f_lo, f_hi, None, None)
                if pooled or bool((miss <= _allowance(fn, w, shares[lane])).all()):
                    kept.append(piece)
                else:
                    missed.append(piece)
                continue
            pending.append((lo, hi, lane, w, f_lo, f_hi))
        for piece, cuts in zip(missed, est.cuts([p[:3] for p in missed])):  # all spans' kinks at once
            if cuts:  # to be cut at kinks: kept at its miss until then
                kept.append(piece)
            else:
                pending.append((*piece[:4], *piece[5:7]))
        return kept + pieces_of(pending)

    signed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # pooled kept pieces: (signed miss, rounding)
    pieces = judged(whole)
    if pooled and fn.f_at is not None:  # the budget of the lanes' sum, shrunk by how much its parts cancel
        shares = torch.minimum(shares, _allowance(fn, sum(p[3] for p in pieces), shares[0]))
        safe = shares.clamp_min(torch.finfo(budget.dtype).tiny)
    piece_bytes = max(1, 3 * L * pieces[0][3].numel() * pieces[0][3].element_size())
    max_splits = max(8, min(MAX_SPLITS, PIECES_BYTES // piece_bytes))  # per lane
    splits = [0] * L
    while True:
        err = torch.zeros_like(shares)
        miss_sum, rounding = torch.zeros_like(shares[0]), torch.zeros_like(shares[0])
        for p in pieces:
            kept = _kept_signed(p, signed)
            if kept is not None:
                miss_sum, rounding = miss_sum + kept[0], rounding + kept[1]
            else:
                err[pool[p[2]]] += p[4]
        if pooled:
            err[0] += _cancelled(miss_sum, rounding)
        over = {b for b in range(len(shares)) if bool((err[b] > shares[b]).any())}
        open_ = [i for i, p in enumerate(pieces) if pool[p[2]] in over and splits[p[2]] < max_splits]
        if not open_:
            break
        rank = {i: float((pieces[i][4] / safe[pool[pieces[i][2]]]).max()) for i in open_}
        worst: dict[int, float] = {}
        for i in open_:
            worst[pool[pieces[i][2]]] = max(worst.get(pool[pieces[i][2]], 0.0), rank[i])
        chosen = _marked(open_, rank, worst, pieces, pool, shares, signed)
        halve, spans, fresh = [], [], []
        for i, cuts in zip(chosen, est.cuts([pieces[i][:3] for i in chosen])):
            lo, hi, lane, fine, _, f_lo, f_hi, left, halves = pieces[i]
            if cuts:  # kinks of several ReLU calls: cut at all but the most frequent call's
                edges = [lo] + cuts + [hi]
                fresh += [(a, b, lane) for a, b in zip(edges, edges[1:])]
                splits[lane] += 1
            elif halves is None:  # kept at its n-node estimate: judge it by its halves first
                spans.append((lo, hi, lane, fine, f_lo, f_hi))
            else:
                halve.append(pieces[i])
        mids = f_of([((p[0] + p[1]) / 2, p[2]) for p in halve])
        for (lo, hi, lane, fine, _, f_lo, f_hi, left, halves), f_mid in zip(halve, mids):
            mid = (lo + hi) / 2
            spans += [(lo, mid, lane, left, f_lo, f_mid), (mid, hi, lane, halves - left, f_mid, f_hi)]
            splits[lane] += 1
        drop = set(chosen)
        pieces = [p for i, p in enumerate(pieces) if i not in drop] + pieces_of(spans) + judged(fresh)
    if over:  # budgets whose lanes hit the split cap
        stats.unconverged.append(step)
        stats.max_error = max(stats.max_error, max(float((err[b] / safe[b]).max()) for b in over))
    stats.refined_steps += int(any(splits))
    stats.corrected_lanes += sum(p[7] is None and p[1] - p[0] == 1.0 for p in pieces) if est.kinked else 0
    total = torch.cat([sum(p[3] for p in pieces if p[2] == lane) for lane in range(L)], fn.cat_dim)
    if not rows:
        return total
    leaves = []  # the spans whose estimates the pieces are: their own, or their halves'
    for lo, hi, lane, *_, halves in pieces:
        leaves += [(lo, hi, lane)] if halves is None else [(lo, (lo + hi) / 2, lane), ((lo + hi) / 2, hi, lane)]
    return total, est.rows(leaves)
