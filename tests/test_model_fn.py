"""The along-path evaluation (model_fn.Path) against the plain definitions it replaces.

Path runs the model at θ + tΔθ with weights shared by all rows and each group's share of
a vector entering as a scalar α; every layer rule (linear, embedding, conv, layer norm, HF's Conv1D
addmm, x @ W, W @ x, einsum) and the fallback for other ops (a product of two params, a param inside a
list, tied weights, max_norm) must give
the target values at the moved point and ∇F(θ + tΔθ) · (vector on group) exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from explaind_ql.engine import model_fn
from explaind_ql.engine.kernels import Groups
from explaind_ql.engine.model_fn import ModelFn
from explaind_ql.losses import LossSpec
from explaind_ql.params import ParamSpace


class Everything(nn.Module):
    """One op of each kind that touches a parameter, in one forward pass."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.emb_capped = nn.Embedding(7, 6, max_norm=1.0)  # renormalises its weight: nonlinear, falls back
        self.conv1 = nn.Conv1d(6, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.mix = nn.Parameter(torch.randn(6, 6) / 3)  # used by einsum
        self.hf_w, self.hf_b = nn.Parameter(torch.randn(6, 6) / 3), nn.Parameter(torch.randn(6) / 3)  # HF Conv1D
        self.right, self.left = nn.Parameter(torch.randn(6, 6) / 3), nn.Parameter(torch.randn(5, 5) / 3)
        self.pa, self.pb = nn.Parameter(torch.randn(6, 6) / 3), nn.Parameter(torch.randn(6, 6) / 3)  # their product
        self.pair = nn.Parameter(torch.randn(6) / 3)  # used inside a list: the fallback
        self.head = nn.Linear(6, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (B, L)
        h = self.emb(tokens) + 0.5 * self.emb_capped(tokens.clone())
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)
        h = torch.relu(self.norm(h))
        h = h + self.conv2(h[:, None]).sum(1)
        h = torch.einsum("ij,blj->bli", self.mix, h) + torch.stack([self.pair, self.pair]).sum(0)
        h = torch.addmm(self.hf_b, h.reshape(-1, 6), self.hf_w).view(h.shape)  # transformers.pytorch_utils.Conv1D
        h = h @ self.right + 0.5 * (self.left @ h) + 0.1 * h @ (self.pa @ self.pb)
        h = F.linear(h, self.head.weight, bias=self.head.bias)  # keyword argument
        return F.linear(h, self.head.weight.T[:5, :5]).log_softmax(-1)[:, -1]  # the head twice (tied)


def build(dtype=torch.float64):
    torch.manual_seed(0)
    model = Everything().to(dtype)
    names = [n for n, _ in model.named_parameters()]
    space = ParamSpace.build([(n, tuple(p.shape), i) for i, (n, p) in enumerate(model.named_parameters())])
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    fn = ModelFn(model, space, {}, LossSpec("nll"), torch.device("cpu"), dtype)
    return fn, space, names, theta


def groups_of(sel: ParamSpace, group_of_param: list[int]) -> Groups:
    """The engine's grouping of ``sel``: tensor k in group group_of_param[k]."""
    req = SimpleNamespace(by_element=False, params=tuple(p.name for p in sel.params),
                          group_of_param=tuple(group_of_param), n_groups=max(group_of_param) + 1)
    return Groups(sel, req, "cpu")


@pytest.mark.parametrize("moved_rows", [False, True])  # t-terms on shared weights, or each row's own weights
def test_values_and_projections_match_the_definitions(monkeypatch, moved_rows):
    fn, space, names, theta = build()
    torch.manual_seed(1)
    delta = 0.05 * torch.randn_like(theta)
    sel = space.subspace(names[1::2] + ["head.weight"])  # a restriction: the others still move along Δθ
    groups = [i % 3 for i in range(len(sel.params))]
    G, V = 3, 2
    vecs = torch.randn(V, sel.size, dtype=theta.dtype)
    x = torch.randint(0, 7, (4, 2, 5))  # 4 rows, lanes of 2 items
    y = torch.randint(0, 5, (4, 2))
    ts = torch.tensor([0.0, 0.3, 0.71, 1.0], dtype=theta.dtype)

    def target(out, yl):
        return out.gather(1, yl[:, None])[:, 0]  # the log-prob at each item's label

    path = fn.path(theta, delta, sel, vecs, groups_of(sel, groups), moved_rows)
    points = theta[None] + ts[:, None] * delta[None]
    want = torch.stack([target(fn.forward(p, xi), yi) for p, xi, yi in zip(points, x, y)])
    assert torch.allclose(path.values(target, ts, x, y), want, rtol=0, atol=1e-12)

    idx = space.element_index(sel)
    jac = fn.lane_jacobian(sel, target, points[:, idx], points, x, y)  # (m, C, P_sel)
    gidx = torch.repeat_interleave(torch.tensor(groups), torch.tensor([p.numel for p in sel.params]))
    onehot = torch.zeros(G, sel.size, dtype=theta.dtype)
    onehot[gidx, torch.arange(sel.size)] = 1
    want = torch.einsum("mcp,vp,gp->mvgc", jac, vecs, onehot)
    for n_targets in (1, 100):  # reverse mode (fewer targets than directions) and forward mode
        got = path.projections(target, ts, x, y, n_targets)
        assert got.shape == (4, V, G, 2)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)

    def no_ad(*args, **kwargs):
        raise NotImplementedError("an op without AD support")
    monkeypatch.setattr(model_fn, "jacrev", no_ad)  # the fallback: the Jacobian contracted per group
    got = path.projections(target, ts, x, y, 1)
    assert got.shape == (4, V, G, 2)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_relu_inputs_are_seen_at_the_moved_point():
    fn, space, names, theta = build()
    delta = 0.05 * torch.randn_like(theta)
    x = torch.randint(0, 7, (3, 1, 5))
    ts = torch.tensor([0.0, 0.5, 1.0], dtype=theta.dtype)
    z, dz = fn.path(theta, delta).slopes(ts, x)
    fn.model.emb_capped.max_norm = None  # torch differentiates max_norm's renorm as a constant: compare without
    z, dz = fn.path(theta, delta).slopes(ts, x)
    h = 1e-6
    for k, t in enumerate(ts):  # the ReLU input is the layer norm's output at θ + tΔθ
        still, _ = fn.path(theta + t * delta, torch.zeros_like(delta)).slopes(ts[:1] * 0, x[k:k + 1])
        assert torch.allclose(z[k], still[0], atol=1e-12)
        ahead, _ = fn.path(theta + (t + h) * delta, torch.zeros_like(delta)).slopes(ts[:1] * 0, x[k:k + 1])
        behind, _ = fn.path(theta + (t - h) * delta, torch.zeros_like(delta)).slopes(ts[:1] * 0, x[k:k + 1])
        assert torch.allclose(dz[k], (ahead[0] - behind[0]) / (2 * h), atol=1e-7)  # its t-derivative
    assert z.shape == (3, 5 * 6)
    assert fn.kink_segments(theta, x[0]) == (5 * 6,)


@pytest.mark.parametrize("moved_rows", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_weights_are_not_copied_per_row(dtype, moved_rows):
    """The point of Path: a call's memory grows with activations, not rows × directions × params.

    With ``moved_rows`` each row holds one copy of the params (its θ + tΔθ), never one per direction.
    (Inside vmap the mode sees each row's logical shapes.)
    """
    fn, space, names, theta = build(dtype)
    sel = space.subspace([n for n in names if n != "emb_capped.weight" and n not in ("mix", "pair")])
    seen: list[int] = []

    class Sizes(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                seen.append(out.numel())
            return out
    vecs = torch.randn(2, sel.size, dtype=dtype)
    path = fn.path(theta, torch.zeros_like(theta), sel, vecs, groups_of(sel, list(range(len(sel.params)))),
                   moved_rows)
    rows = 64
    with Sizes():
        path.projections(lambda out, yl: out[:, 0], torch.rand(rows, dtype=dtype),
                         torch.randint(0, 7, (rows, 1, 5)), torch.zeros(rows, 1, dtype=torch.long), 1)
    assert max(seen) < rows * sel.size  # no tensor as large as one weight copy per row


@pytest.mark.parametrize("with_jumps", [False, True])
def test_a_rules_gradient_is_its_rows_weighted_jacobians(with_jumps):
    """Path.gradient (one backward pass, weights shared by the rows) against the definition: Σ_j w_j times
    row j's Jacobian at θ + t_jΔθ (with its kink jumps), and the extra column along the other params' Δθ."""
    fn, space, names, theta = build()
    fn.model.emb_capped.max_norm = None  # its in-place renorm cannot run under the reference's forward mode
    torch.manual_seed(2)
    delta = 0.05 * torch.randn_like(theta)
    sel = space.subspace(names[1::2] + ["head.weight"])
    idx = space.element_index(sel)
    x = torch.randint(0, 7, (5, 2, 5))  # 5 rows, lanes of 2 items
    y = torch.randint(0, 5, (5, 2))
    ts = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0], dtype=theta.dtype)
    w = torch.rand(5, dtype=theta.dtype)
    jumps = None
    if with_jumps:
        U = sum(fn.kink_segments(theta, x[0]))
        jumps = (w, torch.randn(5, U, dtype=theta.dtype), torch.randn(5, U, dtype=theta.dtype),
                 torch.rand(5, U) > 0.5)

    def target(out, yl):
        return out.gather(1, yl[:, None])[:, 0]
    points = theta[None] + ts[:, None] * delta[None]
    jac = fn.lane_jacobian(sel, target, points[:, idx], points, x, y, jumps)  # (m, C, P_sel): weighted with jumps
    want = jac.sum(0) if with_jumps else torch.einsum("m,mcp->cp", w, jac)
    path = fn.path(theta, delta)
    got = path.gradient(sel, target, ts, w, x, y, jumps)
    assert got.shape == (2, sel.size)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)

    rest = delta.clone()
    rest[idx] = 0
    full = fn.lane_jacobian(space, target, points, points, x, y, jumps)  # every param: the rest column is full · rest
    want_rest = (full.sum(0) if with_jumps else torch.einsum("m,mcp->cp", w, full)) @ rest
    got = path.gradient(sel, target, ts, w, x, y, jumps, rest)
    assert got.shape == (2, sel.size + 1)
    assert torch.allclose(got[:, :-1], want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got[:, -1], want_rest, rtol=1e-10, atol=1e-12)


def test_the_summed_gradient_is_the_per_example_gradients_sum():
    fn, space, names, theta = build()
    fn.model.emb_capped.max_norm = None  # its in-place renorm cannot run under vmap
    x = torch.randint(0, 7, (6, 5))
    y = torch.randint(0, 5, (6,))
    want = fn.per_example_grads(space, theta, theta, x, y).sum(0)
    assert torch.allclose(fn.summed_grad(theta, x, y), want, rtol=1e-10, atol=1e-12)
