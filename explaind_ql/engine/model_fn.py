"""The rebuilt model as pure functions of flat parameter vectors (torch.func).

Restriction pushdown to params happens here: derivatives are taken only with respect
to the selected sub-vector ``theta_sel``; every other parameter enters as a constant
read from the full vector.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from ..losses import LossSpec
from ..params import ParamSpace

if TYPE_CHECKING:
    from .kernels import Groups


class _ReluInputs(TorchFunctionMode):
    """Records the inputs of ReLU-family calls (their zero crossings are the integrand's kinks)."""

    KINKED = {torch.relu, torch.nn.functional.relu, torch.Tensor.relu, torch.nn.functional.leaky_relu,
              torch.nn.functional.relu6, torch.nn.functional.hardtanh}

    def __init__(self):
        super().__init__()
        self.z: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.KINKED:
            z = args[0]
            if func in (torch.nn.functional.relu6, torch.nn.functional.hardtanh):  # kinks at both bounds
                lo, hi = (0.0, 6.0) if func is torch.nn.functional.relu6 else _hardtanh_bounds(args, kwargs or {})
                self.z += [z - lo, z - hi]
            else:
                self.z.append(z)
        return func(*args, **(kwargs or {}))


class _Sizes(TorchFunctionMode):
    """Counts the elements of every tensor a forward pass creates."""

    def __init__(self):
        super().__init__()
        self.elements = self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and not t._is_view():  # views allocate nothing
                self.elements += t.numel()
                self.largest = max(self.largest, t.numel())
        return out


class _AlongPath(TorchFunctionMode):
    """Runs the model at θ_s + tΔθ with each group's share of V vectors entering as scalars α[g, v].

    Every layer is linear in its own weight W, so op(W_s + tΔW + Σ_v α_gv V_v) =
    op(W_s) + t·op(ΔW) + Σ_v α_gv·op(V_v), and ∂F/∂α_gv at α = 0 is exactly ∇F · (V_v on
    group g). The α-terms never copy a weight per row or direction (such copies dominate
    memory and time otherwise), and a derivative costs activations only. The α-terms read
    their input detached: at α = 0 its dependence on α adds nothing. The t-term is added
    the same way when the rows share W_s (``info`` gives ΔW), or is already in the weight
    when each row brings its own W_s + tΔW (``info`` gives None). Ops without a rule here
    get the weight materialised per row, which is exact, only slower.
    """

    # func → {position of a param argument: (the op's part linear in that argument, given D in its
    # place; the same for V stacked Ds at once, V last, in one call where the op allows)}
    RULES = {
        F.linear: {1: (lambda a, D: F.linear(a[0], D),
                       lambda a, S: F.linear(a[0], S.flatten(0, 1)).unflatten(-1, (len(S), -1)).transpose(-1, -2)),
                   2: (lambda a, D: D, lambda a, S: S.movedim(0, -1))},
        F.embedding: {1: (lambda a, D: F.embedding(a[0], D, *a[2:]),
                          lambda a, S: F.embedding(a[0], S.transpose(0, 1).flatten(1), *a[2:])
                          .unflatten(-1, (len(S), -1)).transpose(-1, -2))},
        F.conv1d: {1: (lambda a, D: F.conv1d(a[0], D, None, *a[3:]), None),
                   2: (lambda a, D: D[:, None], lambda a, S: S.movedim(0, -1)[:, None])},
        F.conv2d: {1: (lambda a, D: F.conv2d(a[0], D, None, *a[3:]), None),
                   2: (lambda a, D: D[:, None, None], lambda a, S: S.movedim(0, -1)[:, None, None])},
        F.layer_norm: {2: (lambda a, D: F.layer_norm(a[0], a[1], D, None, *a[4:]), None),
                       3: (lambda a, D: D, lambda a, S: S.movedim(0, -1))},
    }
    SIGNATURES = {F.linear: ("input", "weight", "bias"),
                  F.embedding: ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                                "sparse"),
                  F.conv1d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps")}

    def __init__(self, info: dict[int, tuple], t: torch.Tensor, alpha: torch.Tensor | None):
        super().__init__()
        self.info, self.t, self.alpha = info, t, alpha  # info: id(W) → (group, ΔW or None, V stacked or None)

    def _moved(self, w: torch.Tensor) -> torch.Tensor:
        g, dw, vs = self.info[id(w)]
        out = w if dw is None else w + self.t * dw
        if vs is None or self.alpha is None:
            return out
        return out + (self.alpha[g] @ vs.flatten(1)).view_as(w)

    def _terms(self, rule: tuple, a: list, w: torch.Tensor) -> torch.Tensor:
        part, stacked = rule
        g, dw, vs = self.info[id(w)]
        out = 0 if dw is None else self.t * part(a, dw)
        if vs is not None and self.alpha is not None:
            detached = [x.detach() if isinstance(x, torch.Tensor) else x for x in a]
            each = stacked(detached, vs) if stacked else torch.stack([part(detached, v) for v in vs], -1)
            out = out + each @ self.alpha[g]
        return out

    def _param(self, x) -> bool:
        return isinstance(x, torch.Tensor) and id(x) in self.info

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flat = (*args, *kwargs.values())
        if any(isinstance(x, (list, tuple, dict)) for x in flat):  # a param may sit inside a container
            flat = tree_leaves(flat)
        n_params = sum(self._param(x) for x in flat)
        if not n_params:
            return func(*args, **kwargs)
        a = list(args)
        for name in self.SIGNATURES.get(func, ())[len(args):]:  # keywords given in order become positional
            if name not in kwargs:
                break
            a.append(kwargs.pop(name))
        known = [i for i, x in enumerate(a) if self._param(x)]
        rules = self.RULES.get(func, {})
        nonlinear = func is F.embedding and len(a) > 3 and a[3] is not None  # max_norm renormalises W
        if kwargs or nonlinear or len(known) < n_params or not set(known) <= set(rules):
            a, kwargs = tree_map(lambda x: self._moved(x) if self._param(x) else x, (a, kwargs))
            return func(*a, **kwargs)
        out = func(*a)
        for i in known:
            out = out + self._terms(rules[i], a, a[i])
        return out


def _hardtanh_bounds(args, kwargs) -> tuple[float, float]:
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return float(lo), float(hi)


class ModelFn:
    """Forward, batch gradient, per-example gradients and JVPs of one rebuilt model."""

    def __init__(self, model: torch.nn.Module, space: ParamSpace, constants: dict[str, torch.Tensor],
                 loss: LossSpec, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.space, self.loss, self.device, self.dtype = space, loss, device, dtype
        self.constants = {n: (c.to(device=device, dtype=dtype) if c.is_floating_point() else c.to(device))
                          for n, c in constants.items()}
        self._loss_fn = loss.fn
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self._activations: dict[tuple, tuple[int, int]] = {}

    def _call(self, theta_full: torch.Tensor, sel: ParamSpace | None, theta_sel: torch.Tensor | None,
              x: torch.Tensor) -> torch.Tensor:
        named = self.space.unflatten(theta_full)
        if sel is not None:
            named.update(sel.unflatten(theta_sel))
        return functional_call(self.model, {**self.constants, **named}, (x,))

    def forward(self, theta_full: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._call(theta_full, None, None, x)

    def per_example_grads(self, sel: ParamSpace, theta_sel: torch.Tensor, theta_full: torch.Tensor,
                          x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, P_sel) loss gradients, one row per example, for the selected params only."""
        def one(th, xi, yi):
            return self._loss_fn(self._call(theta_full, sel, th, xi[None]), yi[None])[0]
        return vmap(grad(one), in_dims=(None, 0, 0))(theta_sel, x, y)

    def per_example_jvp(self, sel: ParamSpace, theta_sel: torch.Tensor, theta_full: torch.Tensor,
                        x: torch.Tensor, y: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
        """(K, B): directional derivatives g_k · t for K tangents, by forward mode (no per-example grads)."""
        def losses(th):
            return self._loss_fn(self._call(theta_full, sel, th, x), y)

        def one(t):
            return jvp(losses, (theta_sel,), (t,))[1]
        try:
            return vmap(one)(tangents)
        except (RuntimeError, NotImplementedError):  # an op without forward-mode AD: contract explicitly
            g = self.per_example_grads(sel, theta_sel, theta_full, x, y)
            return tangents @ g.T

    # -- test side: one row per (point, lane); a lane is a batch of test items and its labels ---------
    def _lane_fn(self, sel: ParamSpace | None, target: Callable) -> Callable:
        def f(th_sel, th_full, x, y):
            return target(self._call(th_full, sel, th_sel, x), y)
        return f

    def activation_elements(self, theta_full: torch.Tensor, x: torch.Tensor) -> tuple[int, int]:
        """(all, largest): elements of the intermediate tensors of one forward pass on ``x``.

        Reverse mode keeps them all; forward mode only a few at a time. Sizes batched calls.
        """
        key = tuple(x.shape)
        if key not in self._activations:
            with torch.no_grad(), _Sizes() as sizes:
                self._call(theta_full, None, None, x)
            self._activations[key] = (sizes.elements, sizes.largest)
        return self._activations[key]

    def lane_jacobian(self, sel: ParamSpace, target: Callable, theta_sel: torch.Tensor, points: torch.Tensor,
                      x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(m, C, P_sel) Jacobian of each row's lane targets wrt the selected params at its point."""
        return vmap(torch.func.jacrev(self._lane_fn(sel, target)))(theta_sel, points, x, y)

    def path(self, theta: torch.Tensor, delta: torch.Tensor, sel: ParamSpace | None = None,
             vecs: torch.Tensor | None = None, groups: Groups | None = None, moved_rows: bool = False) -> Path:
        return Path(self, theta, delta, sel, vecs, groups, moved_rows)


class Path:
    """One step's segment θ + tΔθ: the model run at any t with its weights shared by all rows.

    Built once per step. With ``vecs`` (V vectors over the ``sel`` params) and ``groups``
    (the engine's :class:`~explaind_ql.engine.kernels.Groups` of the selection), each group's
    share of each vector enters as a scalar α (:class:`_AlongPath`), so derivatives along
    them need neither Jacobians nor per-row copies of the directions. ``moved_rows`` gives
    each derivative row its own weights θ + tΔθ: a copy of the params per row, for about a
    third less time per call (fewer ops) than adding t·op(ΔW) to every layer; worth it while
    the params are small beside a row's activations (the caller decides).
    """

    def __init__(self, fn: ModelFn, theta: torch.Tensor, delta: torch.Tensor, sel: ParamSpace | None = None,
                 vecs: torch.Tensor | None = None, groups: Groups | None = None, moved_rows: bool = False):
        self.fn, self.theta, self.delta, self.sel, self.vecs, self.groups = fn, theta, delta, sel, vecs, groups
        self.moved_rows = moved_rows
        self.named, moved = fn.space.unflatten(theta), fn.space.unflatten(delta)
        self.info = {id(w): (0, moved[n], None) for n, w in self.named.items()}
        self.stacks: dict[str, tuple[int, torch.Tensor]] = {}  # param → (group, its share of each vector)
        if vecs is not None:
            parts = [sel.unflatten(v) for v in vecs]
            self.stacks = {p.name: (g, torch.stack([v[p.name] for v in parts]))
                           for p, g in zip(sel.params, groups.per_param)}
            self.info.update({id(self.named[n]): (g, moved[n], vs) for n, (g, vs) in self.stacks.items()})

    def run(self, t: torch.Tensor, alpha: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        named, info = self.named, self.info
        if alpha is not None and self.moved_rows:
            named = self.fn.space.unflatten(self.theta + t * self.delta)
            info = {id(named[n]): (g, None, vs) for n, (g, vs) in self.stacks.items()}
        with _AlongPath(info, t, alpha):
            return functional_call(self.fn.model, {**self.fn.constants, **named}, (x,))

    def values(self, target: Callable, ts: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(m, C) target values of each row's lane at its t (no derivative)."""
        with torch.no_grad():
            return vmap(lambda t, xi, yi: target(self.run(t, None, xi), yi))(ts, x, y)

    def preacts(self, ts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(m, U) every ReLU input of each row's forward pass: where the integrand has kinks."""
        def f(t, xi):
            with _ReluInputs() as seen:
                self.run(t, None, xi)
            return torch.cat([z.reshape(-1) for z in seen.z]) if seen.z else t.new_zeros(0)
        with torch.no_grad():
            return vmap(f)(ts, x)

    def projections(self, target: Callable, ts: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    n_targets: int) -> torch.Tensor:
        """(m, V, G, C): each row's lane targets differentiated at its t along each vector on each group.

        Reverse mode takes a pass per target, forward mode one per (vector, group): whichever is fewer.
        """
        alpha0 = self.theta.new_zeros(self.groups.G, len(self.vecs))

        def f(alpha, t, xi, yi):
            return target(self.run(t, alpha, xi), yi)
        jac = jacrev if n_targets <= alpha0.numel() else jacfwd
        try:
            return vmap(lambda t, xi, yi: jac(f)(alpha0, t, xi, yi))(ts, x, y).permute(0, 3, 2, 1)
        except (RuntimeError, NotImplementedError):  # an op without AD support: contract the Jacobian
            idx = self.fn.space.element_index(self.sel).to(self.theta.device)
            points = self.theta[None] + ts[:, None] * self.delta[None]
            j = self.fn.lane_jacobian(self.sel, target, points[:, idx], points, x, y)  # (m, C, P_sel)
            out = self.groups.contract(j.flatten(0, 1), self.vecs)  # (m·C, V, G)
            return out.unflatten(0, j.shape[:2]).permute(0, 2, 3, 1)
