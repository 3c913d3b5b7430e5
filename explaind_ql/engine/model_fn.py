"""The rebuilt model as pure functions of flat parameter vectors (torch.func).

Restriction pushdown to params happens here: derivatives are taken only with respect
to the selected sub-vector ``theta_sel``; every other parameter enters as a constant
read from the full vector.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.func import grad, jacfwd, jacrev, jvp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from .. import dropout, model_io
from ..losses import LossSpec
from ..model_io import Adapter, Inputs
from ..params import ParamSpace

if TYPE_CHECKING:
    from ..run import Run
    from .kernels import Groups


KINKED = {torch.relu, F.relu, torch.Tensor.relu, F.leaky_relu, F.relu6, F.hardtanh}


def _kink_sites(func, args, kwargs) -> list[tuple[torch.Tensor, float]]:
    """A ReLU-family call's inputs shifted so each kink sits at 0, with the slope's jump across it.

    The slope jump is what the output's derivative gains when the shifted input turns positive.
    """
    z = args[0]
    if kwargs.get("inplace") or (len(args) > 1 and args[-1] is True):  # the call would overwrite z
        z = z.clone()
    if func in (F.relu6, F.hardtanh):  # kinks at both bounds
        lo, hi = (0.0, 6.0) if func is F.relu6 else _hardtanh_bounds(args, kwargs)
        return [(z - lo, 1.0), (z - hi, -1.0)]
    if func is F.leaky_relu:
        slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
        return [(z, 1.0 - float(slope))]
    return [(z, 1.0)]


def _scaled(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x·s for a 0-dim ``s``, expanded first: under vmap and forward mode (a row's t, the jumps' ε) a
    0-dim factor's broadcast runs through torch's Python reference kernels, 3-4× slower than this."""
    return x * s.expand(x.shape)


class _ReluInputs(TorchFunctionMode):
    """Records the shifted inputs of ReLU-family calls (their zero crossings are the integrand's kinks)."""

    def __init__(self):
        super().__init__()
        self.z: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in KINKED:
            self.z += [z for z, _ in _kink_sites(func, args, kwargs)]
        return func(*args, **kwargs)


class _KinkJumps(TorchFunctionMode):
    """Adds ε·c·(slope jump)·z to every ReLU-family output, site by site (in :class:`_ReluInputs` order).

    The model is multilinear in its ReLU masks, so ∂/∂ε at ε = 0 is Σ_u c_u times the change of
    the target when unit u's mask flips: the jump of the integrand that a kink of u causes. The
    coefficient is ``c = tail − share·[u is on its end-of-step side here]`` (see
    :func:`explaind_ql.engine.quadrature.kink_coefficients`).
    """

    def __init__(self, eps: torch.Tensor, tail: torch.Tensor, share: torch.Tensor, end_side: torch.Tensor):
        super().__init__()
        self.eps, self.tail, self.share, self.end_side = eps, tail, share, end_side
        self.offset = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in KINKED:
            return func(*args, **kwargs)
        sites = _kink_sites(func, args, kwargs)
        out = func(*args, **kwargs)
        for z, jump in sites:
            n = z.numel()
            part = slice(self.offset, self.offset + n)
            self.offset += n
            on_end_side = ((z > 0) == self.end_side[part].view_as(z)).to(z.dtype)
            c = self.tail[part].view_as(z) - self.share[part].view_as(z) * on_end_side
            out = out + _scaled(z * (jump * c.detach()), self.eps)
        return out


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
        # Hugging Face's Conv1D: addmm(bias, x, W), W stored (in, out)
        torch.addmm: {0: (lambda a, D: D, lambda a, S: S.movedim(0, -1)),
                      2: (lambda a, D: a[1] @ D,
                          lambda a, S: (a[1] @ S.permute(1, 2, 0).flatten(1)).unflatten(-1, (S.shape[2], len(S))))},
        # a user's own layers: x @ W, W @ x, einsum with a weight
        **{mm: {0: (lambda a, D: torch.matmul(D, a[1]), None), 1: (lambda a, D: torch.matmul(a[0], D), None)}
           for mm in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)},
        torch.einsum: {i: (lambda a, D, i=i: torch.einsum(*a[:i], D, *a[i + 1:]), None) for i in range(1, 9)},
    }
    # ops linear in each of these arguments alone, not jointly: with params in two of them, the product of
    # their changes is missed by a sum of one-argument terms, so such a call takes the materialised path
    PRODUCTS = {torch.addmm: {1, 2}, torch.matmul: {0, 1}, torch.Tensor.matmul: {0, 1}, torch.Tensor.__matmul__: {0, 1},
                torch.einsum: set(range(1, 9))}
    SIGNATURES = {F.linear: ("input", "weight", "bias"),
                  F.embedding: ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                                "sparse"),
                  F.conv1d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
                  torch.addmm: ("input", "mat1", "mat2")}

    def __init__(self, info: dict[int, tuple], t: torch.Tensor, alpha: torch.Tensor | None):
        super().__init__()
        self.info, self.t, self.alpha = info, t, alpha  # info: id(W) → (group, ΔW or None, V stacked or None)

    def _moved(self, w: torch.Tensor) -> torch.Tensor:
        g, dw, vs = self.info[id(w)]
        out = w if dw is None else w + _scaled(dw, self.t)
        if vs is None or self.alpha is None:
            return out
        return out + (self.alpha[g] @ vs.flatten(1)).view_as(w)

    def _terms(self, rule: tuple, a: list, w: torch.Tensor) -> torch.Tensor:
        part, stacked = rule
        g, dw, vs = self.info[id(w)]
        out = 0 if dw is None else _scaled(part(a, dw), self.t)
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
        nonlinear = (func is F.embedding and len(a) > 3 and a[3] is not None  # max_norm renormalises W
                     or len(set(known) & self.PRODUCTS.get(func, set())) > 1)
        if kwargs or nonlinear or len(known) < n_params or not set(known) <= set(rules):
            a, kwargs = tree_map(lambda x: self._moved(x) if self._param(x) else x, (a, kwargs))
            return func(*a, **kwargs)
        out = func(*a)
        for i in known:
            out = out + self._terms(rules[i], a, a[i])
        return out


class _Probed(TorchFunctionMode):
    """Runs every ReLU-family call as the identity plus one probe per site (in :class:`_ReluInputs` order).

    With every mask on, ∂F/∂probe is nonzero exactly where a site's output reaches F at all.
    """

    def __init__(self, probes: torch.Tensor):
        super().__init__()
        self.probes, self.offset = probes, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in KINKED:
            return func(*args, **kwargs)
        out = args[0]
        for z, _ in _kink_sites(func, args, kwargs):
            out = out + self.probes[self.offset: self.offset + z.numel()].view_as(z)
            self.offset += z.numel()
        return out


Draw = tuple[int, torch.Tensor]  # a step's dropout seed, and the positions of items in its batch
Jumps = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # one row's (weight, tail, share, end side)


def _with_jumps(f: Callable[[], torch.Tensor], jumps: Jumps) -> torch.Tensor:
    """w·f() plus the ε-derivative of f() under :class:`_KinkJumps`: a node's weighted value with the
    jumps it owes the rule for the kinks of its step (one forward-mode pass)."""
    w, tail, share, side = jumps

    def perturbed(eps):
        with _KinkJumps(eps, tail, share, side):
            return f()
    value, slope = jvp(perturbed, (w.new_zeros(()),), (w.new_ones(()),))
    return w * value + slope


def forward_facts(call: Callable[[], torch.Tensor]) -> tuple[int, tuple[int, ...]]:
    """(outputs per item, ReLU-family inputs of each kinked call, in call order) of the forward pass ``call()``."""
    with torch.no_grad(), _ReluInputs() as seen:
        out = call()
    return int(out.reshape(out.shape[0], -1).shape[1]), tuple(z.numel() for z in seen.z)


def _hardtanh_bounds(args, kwargs) -> tuple[float, float]:
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return float(lo), float(hi)


class ModelFn:
    """Forward, batch gradient, per-example gradients and JVPs of one rebuilt model."""

    def __init__(self, model: torch.nn.Module, space: ParamSpace, constants: dict[str, torch.Tensor],
                 loss: LossSpec, device: torch.device, dtype: torch.dtype, output: Adapter = None):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.space, self.loss, self.device, self.dtype, self.output = space, loss, device, dtype, output
        self.constants = {n: (c.to(device=device, dtype=dtype) if c.is_floating_point() else c.to(device))
                          for n, c in constants.items()}
        self._loss_fn = loss.fn
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self._activations: dict[tuple, tuple[int, int]] = {}
        self.split_params = True  # params as one split of the flat vector (ParamSpace.unflatten), until the model refuses

    def _call(self, theta_full: torch.Tensor, sel: ParamSpace | None, theta_sel: torch.Tensor | None,
              x: Inputs) -> torch.Tensor:
        named = self.space.unflatten(theta_full, split=self.split_params)
        if sel is not None:
            named.update(sel.unflatten(theta_sel, split=self.split_params))
        try:
            return model_io.call(self.model, {**self.constants, **named}, x, self.output)
        except RuntimeError as e:  # the model changes a weight in place: per-param slices allow it
            if not self.split_params or "returns multiple views" not in str(e):
                raise
            self.split_params = False
            return self._call(theta_full, sel, theta_sel, x)

    @classmethod
    def for_run(cls, run: Run, device: torch.device, dtype: torch.dtype) -> ModelFn:
        """The run's model (given to ``open``, or rebuilt) as functions of its flat params."""
        return cls(run.build_model(), run.space, run.constants, run.loss, device, dtype, run.output)

    def forward(self, theta_full: torch.Tensor, x: Inputs) -> torch.Tensor:
        with torch.no_grad():
            return self._call(theta_full, None, None, x)

    # -- train side: the losses of training examples, with the dropout masks their update drew ------------
    @contextlib.contextmanager
    def _training(self, draw: Draw | None, rows: torch.Tensor | None = None):
        """The model as training ran it on items at positions ``rows`` of a step's batch (``draw``: the step's
        seed and the items' positions; None: a run without dropout, whose training forward is its eval one)."""
        if draw is None:
            yield
            return
        self.model.train()
        try:
            with dropout.Masks(draw[0], draw[1] if rows is None else rows):
                yield
        finally:
            self.model.eval()

    def summed_grad(self, theta: torch.Tensor, x: Inputs, y: torch.Tensor, draw: Draw | None = None) -> torch.Tensor:
        """(P,) Σ_k ∇ loss_k: the per-example gradients' sum, by one backward pass of the batch."""
        def total(th):
            with self._training(draw):
                return self._loss_fn(self._call(th, None, None, x), y).sum()
        return grad(total)(theta)

    def per_example_grads(self, sel: ParamSpace, theta_sel: torch.Tensor, theta_full: torch.Tensor,
                          x: Inputs, y: torch.Tensor, draw: Draw | None = None) -> torch.Tensor:
        """(B, P_sel) loss gradients, one row per example, for the selected params only."""
        rows = draw[1] if draw is not None else torch.zeros(len(y), dtype=torch.long, device=y.device)

        def one(th, xi, yi, ri):
            with self._training(draw, ri[None]):
                out = self._call(theta_full, sel, th, model_io.apply(xi, lambda t: t[None]))
            return self._loss_fn(out, yi[None])[0]
        return vmap(grad(one), in_dims=(None, 0, 0, 0))(theta_sel, x, y, rows)

    def per_example_jvp(self, sel: ParamSpace, theta_sel: torch.Tensor, theta_full: torch.Tensor,
                        x: Inputs, y: torch.Tensor, tangents: torch.Tensor, draw: Draw | None = None) -> torch.Tensor:
        """(K, B): directional derivatives g_k · t for K tangents, by forward mode (no per-example grads)."""
        def losses(th):
            with self._training(draw):
                return self._loss_fn(self._call(theta_full, sel, th, x), y)

        def one(t):
            return jvp(losses, (theta_sel,), (t,))[1]
        try:
            return vmap(one)(tangents)
        except (RuntimeError, NotImplementedError):  # an op without forward-mode AD: contract explicitly
            g = self.per_example_grads(sel, theta_sel, theta_full, x, y, draw)
            return tangents @ g.T

    # -- test side: one row per (point, lane); a lane is a batch of test items and its labels ---------
    def _lane_fn(self, sel: ParamSpace | None, target: Callable) -> Callable:
        def f(th_sel, th_full, x, y):
            return target(self._call(th_full, sel, th_sel, x), y)
        return f

    def activation_elements(self, theta_full: torch.Tensor, x: Inputs) -> tuple[int, int]:
        """(all, largest): elements of the intermediate tensors of one forward pass on ``x``.

        Reverse mode keeps them all; forward mode only a few at a time. Sizes batched calls.
        """
        key = tuple(tuple(t.shape) for t in tree_leaves(x))
        if key not in self._activations:
            with torch.no_grad(), _Sizes() as sizes:
                self._call(theta_full, None, None, x)
            self._activations[key] = (sizes.elements, sizes.largest)
        return self._activations[key]

    def kink_segments(self, theta_full: torch.Tensor, x: Inputs) -> tuple[int, ...]:
        """How many ReLU-family inputs each kinked call of a forward pass on ``x`` has, in call order."""
        return forward_facts(lambda: self._call(theta_full, None, None, x))[1]

    def live_sites(self, theta_full: torch.Tensor, target: Callable, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        """(L, U) for each lane's ReLU inputs: whether that unit's output reaches the lane's targets.

        A unit that does not (a position the output never reads) has no kink that changes F.
        """
        U = sum(self.kink_segments(theta_full, model_io.apply(x, lambda t: t[0])))

        def reach(probe, xi, yi):
            with _Probed(probe):
                return target(self._call(theta_full, None, None, xi), yi).sum()
        return vmap(grad(reach), in_dims=(None, 0, 0))(theta_full.new_zeros(U), x, y) != 0

    def lane_jacobian(self, sel: ParamSpace, target: Callable, theta_sel: torch.Tensor, points: torch.Tensor,
                      x: Inputs, y: torch.Tensor, jumps: Jumps | None = None) -> torch.Tensor:
        """(m, C, P_sel) Jacobian of each row's lane targets wrt the selected params at its point.

        With ``jumps`` (per row), the Jacobian of the row's weighted value plus its kink jumps (:func:`_with_jumps`).
        """
        f = self._lane_fn(sel, target)
        if jumps is None:
            return vmap(torch.func.jacrev(f))(theta_sel, points, x, y)

        def jumped(th, pt, xi, yi, *row):
            return _with_jumps(lambda: f(th, pt, xi, yi), row)
        return vmap(torch.func.jacrev(jumped))(theta_sel, points, x, y, *jumps)

    def values_at(self, target: Callable, points: torch.Tensor, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        """(m, C) each row's lane targets at its own params ``points[j]`` (no derivative): rows of several steps."""
        with torch.no_grad():
            return vmap(lambda p, xi, yi: target(self._call(p, None, None, xi), yi))(points, x, y)

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

    def run(self, t: torch.Tensor, alpha: torch.Tensor | None, x: Inputs) -> torch.Tensor:
        named, info = self.named, self.info
        if alpha is not None and self.moved_rows:
            named = self.fn.space.unflatten(self.theta + _scaled(self.delta, t))
            info = {id(named[n]): (g, None, vs) for n, (g, vs) in self.stacks.items()}
        with _AlongPath(info, t, alpha):
            return model_io.call(self.fn.model, {**self.fn.constants, **named}, x, self.fn.output)

    def gradient(self, sel: ParamSpace, target: Callable, ts: torch.Tensor, weights: torch.Tensor, x: Inputs,
                 y: torch.Tensor, jumps: Jumps | None = None, rest: torch.Tensor | None = None) -> torch.Tensor:
        """(C, P_sel) Σ_j weights_j ∇F(θ + ts_j Δθ) over rows of one lane each, wrt the selected params.

        The rows share the weights θ (every layer runs op(W) + t·op(ΔW), :class:`_AlongPath`), so
        this is one backward pass for all of them, as costly as one gradient of a batch of their
        items, where a Jacobian per row would take each row's weight gradients apart. With
        ``jumps`` (per row) each row is its weighted value plus its kink jumps (:func:`_with_jumps`,
        whose weights are the jumps' own). With ``rest`` (a full-length direction, zero on the selection:
        the step's Δθ of the other params) one more column, (C, P_sel + 1): the targets' derivative along
        it, so that the selection's rule can be held to the exact change of the targets.

        With ``ts`` (L, R) and the other row arguments likewise (L, R, ...), the sums of L sets of R rows
        apart, (L, C, P_sel[+1]): a backward pass per set, all in one batched call (rows of weight 0 pad a set).
        """
        idx = self.fn.space.element_index(sel).to(self.theta.device)
        moved = self.fn.space.unflatten(self.delta)

        def total(th_sel: torch.Tensor, a: torch.Tensor, ts, x, y, weights, *jumps) -> torch.Tensor:
            full = self.theta.index_put((idx,), th_sel)
            if rest is not None:
                full = full + a * rest
            named = self.fn.space.unflatten(full, split=self.fn.split_params)
            info = {id(w): (0, moved[n], None) for n, w in named.items()}

            def row(t, xi, yi, c, *jump):
                def value():
                    with _AlongPath(info, t, None):
                        return target(model_io.call(self.fn.model, {**self.fn.constants, **named}, xi, self.fn.output),
                                      yi)
                return c * value() if not jump else _with_jumps(value, jump)
            return vmap(row)(ts, x, y, weights, *jumps).sum(0)
        rows = (ts, x, y, weights, *(jumps or ()))
        of = jacrev(total, argnums=(0, 1))
        if ts.dim() == 2:
            of = vmap(of, in_dims=(None, None) + (0,) * len(rows))
        j_sel, j_rest = of(self.theta[idx], self.theta.new_zeros(()), *rows)
        return j_sel if rest is None else torch.cat([j_sel, j_rest[..., None]], -1)

    def values(self, target: Callable, ts: torch.Tensor, x: Inputs, y: torch.Tensor) -> torch.Tensor:
        """(m, C) target values of each row's lane at its t (no derivative)."""
        with torch.no_grad():
            return vmap(lambda t, xi, yi: target(self.run(t, None, xi), yi))(ts, x, y)

    def slopes(self, ts: torch.Tensor, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, U) twice: every ReLU input of each row's forward pass and its derivative in t (forward mode)."""
        def f(t, xi):
            def z_of(tt):
                with _ReluInputs() as seen:
                    self.run(tt, None, xi)
                return torch.cat([z.reshape(-1) for z in seen.z]) if seen.z else tt.new_zeros(0)
            return jvp(z_of, (t,), (torch.ones_like(t),))
        return vmap(f)(ts, x)

    def projections(self, target: Callable, ts: torch.Tensor, x: Inputs, y: torch.Tensor,
                    n_targets: int, jumps: Jumps | None = None) -> torch.Tensor:
        """(m, V, G, C): each row's lane targets differentiated at its t along each vector on each group.

        Reverse mode takes a pass per target, forward mode one per (vector, group): whichever is fewer.
        With ``jumps`` (per row), the row's weighted value plus its kink jumps is differentiated (:func:`_with_jumps`).
        """
        alpha0 = self.theta.new_zeros(self.groups.G, len(self.vecs))

        def f(alpha, t, xi, yi, *row):
            value = lambda: target(self.run(t, alpha, xi), yi)  # noqa: E731
            return value() if not row else _with_jumps(value, row)
        jac = jacrev if n_targets <= alpha0.numel() else jacfwd
        rows = () if jumps is None else tuple(jumps)
        try:
            return vmap(lambda t, xi, yi, *row: jac(f)(alpha0, t, xi, yi, *row))(ts, x, y, *rows).permute(0, 3, 2, 1)
        except (RuntimeError, NotImplementedError):  # an op without AD support: contract the Jacobian
            idx = self.fn.space.element_index(self.sel).to(self.theta.device)
            points = self.theta[None] + ts[:, None] * self.delta[None]
            j = self.fn.lane_jacobian(self.sel, target, points[:, idx], points, x, y, jumps)  # (m, C, P_sel)
            out = self.groups.contract(j.flatten(0, 1), self.vecs)  # (m·C, V, G)
            return out.unflatten(0, j.shape[:2]).permute(0, 2, 3, 1)
