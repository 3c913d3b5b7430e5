"""The rebuilt model as pure functions of flat parameter vectors (torch.func).

Restriction pushdown to params happens here: derivatives are taken only with respect
to the selected sub-vector ``theta_sel``; every other parameter enters as a constant
read from the full vector.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import functional_call, grad, jvp, vmap

from ..losses import LossSpec
from ..params import ParamSpace


class ModelFn:
    """Forward, batch gradient, per-example gradients and JVPs of one rebuilt model."""

    def __init__(self, model: torch.nn.Module, space: ParamSpace, constants: dict[str, torch.Tensor],
                 loss: LossSpec, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.space, self.loss, self.device, self.dtype = space, loss, device, dtype
        self.constants = {n: (c.to(device=device, dtype=dtype) if c.is_floating_point() else c.to(device))
                          for n, c in constants.items()}
        self._loss_fn = loss.fn

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

    def jacobian(self, sel: ParamSpace, target: Callable[[torch.Tensor], torch.Tensor],
                 points: torch.Tensor, theta_sel_of: Callable[[torch.Tensor], torch.Tensor],
                 x: torch.Tensor, n_targets: int,
                 item_target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        """(m, T, P_sel) Jacobian of the target vector wrt the selected params at m full points.

        With ``item_target`` (targets kept per test item) each item is differentiated on
        its own forward pass: T·C reverse passes over one item each, not over the whole batch.
        """
        def tvec(th_sel, th_full):
            return target(self._call(th_full, sel, th_sel, x))

        if n_targets == 1:  # aggregated target: a gradient is cheaper than a Jacobian
            g = vmap(grad(lambda a, b: tvec(a, b)[0]))(theta_sel_of(points), points)
            return g[:, None, :]
        if item_target is not None:
            def one(th_sel, th_full, xi, yi):
                return item_target(self._call(th_full, sel, th_sel, xi[None]), yi[None])
            per_item = vmap(torch.func.jacrev(one), in_dims=(None, None, 0, 0))
            j = vmap(per_item, in_dims=(0, 0, None, None))(theta_sel_of(points), points, x, y)
            return j.reshape(j.shape[0], -1, j.shape[-1])
        return vmap(torch.func.jacrev(tvec))(theta_sel_of(points), points)
