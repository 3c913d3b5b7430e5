"""The rebuilt model as pure functions of flat parameter vectors (torch.func).

Restriction pushdown to params happens here: derivatives are taken only with respect
to the selected sub-vector ``theta_sel``; every other parameter enters as a constant
read from the full vector.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.overrides import TorchFunctionMode

from ..losses import LossSpec
from ..params import ParamSpace


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

    def lane_values(self, target: Callable, points: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(m, C) target values of each row's lane at its point (no derivative)."""
        f = self._lane_fn(None, target)
        with torch.no_grad():
            return vmap(lambda b, xi, yi: f(None, b, xi, yi))(points, x, y)

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

    def lane_preacts(self, points: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(m, U) every ReLU input of each row's forward pass: where the integrand has kinks."""
        def f(b, xi):
            with _ReluInputs() as seen:
                self._call(b, None, None, xi)
            return torch.cat([z.reshape(-1) for z in seen.z]) if seen.z else b[:0]
        with torch.no_grad():
            return vmap(f)(points, x)

    def lane_jacobian(self, sel: ParamSpace, target: Callable, theta_sel: torch.Tensor, points: torch.Tensor,
                      x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(m, C, P_sel) Jacobian of each row's lane targets wrt the selected params at its point."""
        return vmap(torch.func.jacrev(self._lane_fn(sel, target)))(theta_sel, points, x, y)

    def lane_directional(self, sel: ParamSpace, target: Callable, theta_sel: torch.Tensor, points: torch.Tensor,
                         x: torch.Tensor, y: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
        """(m, K, C) derivatives of each row's lane targets along K tangents of the selected params.

        Forward mode: each tangent costs about one forward pass over the lane's items,
        however many targets there are, and no (C, P_sel) Jacobian is ever held.
        """
        f = self._lane_fn(sel, target)

        def at(a, b, xi, yi):
            return vmap(lambda t: jvp(lambda s: f(s, b, xi, yi), (a,), (t,))[1])(tangents)
        try:
            return vmap(at)(theta_sel, points, x, y)
        except (RuntimeError, NotImplementedError):  # an op without forward-mode AD: contract explicitly
            j = self.lane_jacobian(sel, target, theta_sel, points, x, y)
            return torch.einsum("mcp,kp->mkc", j, tangents)
