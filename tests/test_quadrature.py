"""The quadrature on its own: Gauss–Legendre rules, adaptive refinement, and splitting at kinks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from explaind_ql.engine import quadrature as q

D = torch.float64


def integrand(kinks: list[float], jumps: list[float], with_kinks: bool, lanes: int = 1,
              segments: tuple[int, ...] | None = None, cross: float = 0.0, curve: float = 0.0) -> q.Integrand:
    """A smooth function (a training step's integrand is nearly flat) plus steps of height ``jumps`` at ``kinks``.

    The ReLU inputs are z = (t − kink)(1 + t/3), so their zeros are the kinks and their slopes
    are known. ``cross`` adds cross·[t > kinks[0]]·[t > kinks[-1]]: a jump of one unit that the
    other's mask changes, as when two layers' units cross in one step. ``curve`` adds
    curve·(t − kinks[0])·[t > kinks[0]]: a jump that grows away from its kink, which the
    first-order correction does not owe (as after a softmax).
    """
    def masks(ts):
        return torch.stack([(ts > k).to(D) for k in kinks], dim=1)  # (m, U)

    def values_at(ts, lanes_):
        m = masks(ts)
        v = torch.exp(0.1 * ts) + m @ torch.tensor(jumps, dtype=D) + cross * m[:, 0] * m[:, -1]
        v = v + curve * (ts - kinks[0]) * m[:, 0]
        return v[:, None].repeat(1, 2)

    def slopes(ts, lanes_):
        k = torch.tensor(kinks, dtype=D)
        z = (ts[:, None] - k) * (1 + ts[:, None] / 3)
        return z, (1 + ts[:, None] / 3) + (ts[:, None] - k) / 3

    def jumped(ts, lanes_, w, tail, share, end_side):
        m = masks(ts)
        c = tail - share * (m.bool() == end_side).to(D)  # what each node owes each unit's jump
        dv = torch.tensor(jumps, dtype=D).expand_as(m).clone()  # the value's change when one mask flips
        dv[:, 0] += cross * m[:, -1]
        dv[:, -1] += cross * m[:, 0] if len(kinks) > 1 else 0
        return (w * values_at(ts, lanes_)[:, 0] + (c * dv).sum(1))[:, None].repeat(1, 2)

    def f_at(ts, lanes_):  # the antiderivative: the exact change over any interval
        v = 10 * torch.exp(0.1 * ts)
        for k, j in zip(kinks, jumps):
            v = v + j * (ts - k).clamp_min(0)
        v = v + cross * (ts - max(kinks[0], kinks[-1])).clamp_min(0) + curve * (ts - kinks[0]).clamp_min(0) ** 2 / 2
        return v[:, None].repeat(1, 2)

    return q.Integrand(values_at, lambda est: est, lambda c, f: (f - c).abs(), lanes, 0, f_at,
                       slopes if with_kinks else None, lambda est: est.abs(), jumped if with_kinks else None,
                       segments or (len(kinks),))


def exact(kinks, jumps, cross: float = 0.0) -> float:
    return 10 * (math.exp(0.1) - 1) + sum(j * (1 - k) for k, j in zip(kinks, jumps)) + \
        cross * (1 - max(kinks[0], kinks[-1]))


points = st.lists(st.tuples(st.floats(0.01, 0.99), st.floats(-5, 5).filter(lambda x: abs(x) > 1e-3)),
                  min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(points)
def test_kinks_are_located_from_the_ends(points):
    """The Hermite root of each input's end values and slopes is its zero, for inputs cubic in t."""
    kinks = torch.tensor([k for k, _ in points], dtype=D)
    def z(t):
        return (t - kinks) * (1 + t / 3), (1 + t / 3) + (t - kinks) / 3
    (z0, d0), (z1, d1) = z(torch.tensor(0.0, dtype=D)), z(torch.tensor(1.0, dtype=D))
    found = q.locate_kinks(z0, z1, d0, d1)
    assert torch.allclose(found.t, kinks, atol=1e-12)
    assert (found.sign == 1).all() and found.end_side.all() and found.count == len(points)
    assert q.locate_kinks(z0 + 5, z1 + 5, d0, d1).count == 0  # no sign change: no crossing


@settings(max_examples=40, deadline=None)
@given(points)
def test_the_kink_corrected_rule_is_exact_without_refinement(points):
    """Jumps anywhere in the step are owed exactly by the corrected nodes: no cut, no halving."""
    kinks, jumps = [k for k, _ in points], [j for _, j in points]
    stats = q.QuadStats()
    budget = torch.full((2,), 1e-11, dtype=D)
    got = q.integrate(integrand(kinks, jumps, True), 2, budget, 0, stats, D, "cpu")
    assert abs(float(got[0]) - exact(kinks, jumps)) <= 1e-11
    assert stats.evaluations == q.KINKED_NODES and stats.refined_steps == 0
    assert stats.kinks == len(kinks) and stats.corrected_lanes == 1 and stats.unconverged == []


@settings(max_examples=25, deadline=None)
@given(st.floats(0.15, 0.45), st.floats(0.55, 0.85), st.floats(0.5, 3.0))
def test_kinks_of_two_calls_that_interact_are_cut_apart(ka, kb, cross):
    """A jump the other call's mask changes (here with a node between the two kinks) is not owed by the
    first-order correction: the span is cut
    at the rarer call's kink, and each piece's correction is exact again."""
    kinks, jumps = [ka, 0.3, kb], [1.0, -0.5, 2.0]
    stats = q.QuadStats()
    fn = integrand(kinks, jumps, True, segments=(2, 1), cross=cross)
    budget = torch.full((2,), 1e-11, dtype=D)
    got = q.integrate(fn, 2, budget, 0, stats, D, "cpu")
    assert abs(float(got[0]) - exact(kinks, jumps, cross)) <= 1e-11
    # the corrected whole step missed (the plain rule may hit by chance: ka=0.25, kb=0.55, cross=1)
    assert stats.refined_steps == 1 and stats.evaluations == 3 * q.KINKED_NODES  # one whole step, two pieces


@settings(max_examples=25, deadline=None)
@given(st.floats(0.15, 0.85), st.floats(0.5, 3.0))
def test_a_few_kinks_of_one_call_that_the_correction_misses_are_cut_at(k, curve):
    """A jump that grows away from its kink is owed only to first order: the miss of the exact change
    shows it, the step is cut at the kink, and the smooth pieces are exact."""
    stats = q.QuadStats()
    fn = integrand([k], [1.0], True, curve=curve)
    got = q.integrate(fn, 2, torch.full((2,), 1e-11, dtype=D), 0, stats, D, "cpu")
    want = exact([k], [1.0]) + curve * (1 - k) ** 2 / 2
    assert abs(float(got[0]) - want) <= 1e-11
    assert stats.refined_steps == 1 and stats.evaluations == 3 * q.KINKED_NODES  # the whole step, two pieces


def test_pooled_lanes_share_the_budget_of_their_sum():
    """Items summed afterwards are refined against the sum's budget, not each against its share."""
    kinks, jumps = [0.3137], [2.0]
    alone, pooled = q.QuadStats(), q.QuadStats()
    fn = integrand(kinks, jumps, False, lanes=4)
    budget = torch.full((4 * 2,), 1e-6, dtype=D)
    a = q.integrate(fn, 2, budget, 0, alone, D, "cpu")
    b = q.integrate(fn, 2, torch.full((2,), 4e-6, dtype=D), 0, pooled, D, "cpu", pooled=True)
    for got in (a.reshape(4, 2), b.reshape(4, 2)):
        assert abs(float(got[:, 0].sum()) - 4 * exact(kinks, jumps)) <= 4e-6
    assert pooled.evaluations <= alone.evaluations


def test_without_kinks_the_adaptive_rule_refines_and_converges():
    kinks, jumps = [0.3137], [2.0]
    with_kinks, without = q.QuadStats(), q.QuadStats()
    budget = torch.full((2,), 1e-10, dtype=D)
    a = q.integrate(integrand(kinks, jumps, True), 2, budget, 0, with_kinks, D, "cpu")
    b = q.integrate(integrand(kinks, jumps, False), 2, budget, 0, without, D, "cpu")
    for got in (a, b):
        assert abs(float(got[0]) - exact(kinks, jumps)) <= 1e-9
    assert without.refined_steps == 1 and with_kinks.kinks == 1
    assert with_kinks.evaluations < without.evaluations / 4


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_fixed_gauss_rule_is_exact_for_polynomials_of_degree_2n_minus_1(n):
    t, w = q.nodes(n, D, "cpu")
    for deg in range(2 * n):
        assert abs(float((w * t ** deg).sum()) - 1 / (deg + 1)) <= 1e-14


def test_cap_on_splits_reports_unconverged():
    """A jump the rule cannot see coming (no ReLU inputs) with an impossible budget: reported, not hidden."""
    stats = q.QuadStats()
    q.integrate(integrand([0.5 + 1e-7], [1.0], False), 2, torch.full((2,), 1e-300, dtype=D), 7, stats, D, "cpu")
    assert stats.refined_steps == 1
    assert stats.unconverged == [7]
    assert stats.max_error > 1


def _left(errors: list[float], kept: list[bool], signs: list[float], rest: set[int]) -> float:
    """The error the pieces ``rest`` leave: their own, and the kept ones' as the |sum| of their signed misses."""
    return (sum(errors[i] for i in rest if not kept[i])
            + abs(sum(signs[i] * errors[i] for i in rest if kept[i])))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 50.0), st.booleans(), st.sampled_from([-1.0, 1.0])), min_size=1, max_size=12))
@example([(11.0, False, 1.0), (1.3097402232399311, False, 1.0), (21.30974022323993, False, 1.0), (0.5, False, 1.0)])
@example([(30.0, True, 1.0), (29.0, True, -1.0), (2.0, True, 1.0), (2.0, True, 1.0)])  # misses that cancel
def test_a_round_refines_worst_first_until_the_rest_fits_half_the_budget(pieces_):
    """Rows are nearly free up to a call's size, rounds are not: a round takes the worst pieces (all within
    a factor 2 of the worst, then more, worst first) until what the others leave fits half the budget. A
    pool's kept pieces leave the |sum| of their signed misses, which cancel: taking one out may leave more."""
    errors, kept, signs = (list(v) for v in zip(*pieces_))
    share = torch.ones(1, 1, dtype=D)
    pieces = [(0.0 + i, 1.0 + i, 0, None, torch.tensor([e], dtype=D), None, None, None if k else 1, None)
              for i, (e, k) in enumerate(zip(errors, kept))]
    signed = {p[:3]: (torch.tensor([sg * e], dtype=D), torch.zeros(1, dtype=D))
              for p, e, k, sg in zip(pieces, errors, kept, signs) if k}
    rank = {i: e for i, e in enumerate(errors)}
    chosen = q._marked(list(range(len(errors))), rank, {0: max(errors)}, pieces, [0], share, signed)
    rest = {i for i in range(len(errors)) if i not in chosen}
    scale = 1e-9 * (1 + sum(errors))
    assert {i for i, e in enumerate(errors) if e >= max(errors) / 2} <= set(chosen)
    assert _left(errors, kept, signs, rest) <= 0.5 + scale or not rest
    assert all(errors[i] <= min(errors[c] for c in chosen) for i in rest)  # worst first
    unforced = [i for i in chosen if errors[i] < max(errors) / 2]
    if unforced:  # each piece beyond the forced ones was needed when it was taken
        last = sorted(unforced, key=lambda i: -errors[i])[-1]  # the last taken (the sort is stable)
        assert _left(errors, kept, signs, rest | {last}) > 0.5 - scale
