"""The quadrature on its own: Gauss–Legendre rules, adaptive refinement, and splitting at kinks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from explaind_ql.engine import quadrature as q

D = torch.float64


def integrand(kinks: list[float], jumps: list[float], with_preacts: bool, lanes: int = 1) -> q.Integrand:
    """A smooth function (a training step's integrand is nearly flat) plus steps of height ``jumps`` at ``kinks``; ReLU inputs z = t − kink."""
    def values_at(ts, lanes_):
        v = torch.exp(0.1 * ts)[:, None].repeat(1, 2)
        for k, j in zip(kinks, jumps):
            v = v + j * (ts >= k).to(D)[:, None]
        return v

    def preacts(ts, lanes_):
        return torch.stack([ts - k for k in kinks] + [torch.ones_like(ts)], dim=1)

    def f_at(ts, lanes_):  # the antiderivative: the exact change over any interval
        v = 10 * torch.exp(0.1 * ts)
        for k, j in zip(kinks, jumps):
            v = v + j * (ts - k).clamp_min(0)
        return v[:, None].repeat(1, 2)

    return q.Integrand(values_at, lambda est: est, lambda c, f: (f - c).abs(), lanes, 0, f_at,
                       preacts if with_preacts else None, lambda est: est.abs())


def exact(kinks, jumps) -> float:
    return 10 * (math.exp(0.1) - 1) + sum(j * (1 - k) for k, j in zip(kinks, jumps))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 0.99), st.floats(-5, 5).filter(lambda x: abs(x) > 1e-3)),
                min_size=1, max_size=4))
def test_kinks_are_located_and_make_the_rule_exact(points):
    kinks, jumps = [k for k, _ in points], [j for _, j in points]
    stats = q.QuadStats()
    cuts = q.breakpoints(integrand(kinks, jumps, True).preacts, 1, D, "cpu", stats)[0]
    for k in kinks:
        assert min(abs(c - k) for c in cuts) <= 1e-9
    budget = torch.full((2,), 1e-12, dtype=D)
    got = q.integrate(integrand(kinks, jumps, True), 2, budget, 0, stats, D, "cpu")
    assert abs(float(got[0]) - exact(kinks, jumps)) <= 1e-11
    assert stats.unconverged == []


def test_without_kinks_the_adaptive_rule_refines_and_converges():
    kinks, jumps = [0.3137], [2.0]
    with_cuts, without = q.QuadStats(), q.QuadStats()
    budget = torch.full((2,), 1e-10, dtype=D)
    a = q.integrate(integrand(kinks, jumps, True), 2, budget, 0, with_cuts, D, "cpu")
    b = q.integrate(integrand(kinks, jumps, False), 2, budget, 0, without, D, "cpu")
    for got in (a, b):
        assert abs(float(got[0]) - exact(kinks, jumps)) <= 1e-9
    assert without.refined_steps == 1 and with_cuts.kinks == 1
    assert with_cuts.evaluations < without.evaluations / 4


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
