"""SGD with momentum, dampening and Nesterov: its buffer is the momentum, its preconditioner 1."""

from __future__ import annotations

import torch

from .base import GroupStatic, LinearStep, OptimizerModel, OptState, per_elem, refuse


class SGD(OptimizerModel):
    """torch.optim.SGD: L2 decay coupled into the gradient; the buffer starts on the first step as g'."""

    name = "SGD"
    buffers = ("momentum_buffer",)
    counts_steps = False

    def group_static(self, group: dict, where: str) -> GroupStatic:
        mom, damp = float(group["momentum"]), float(group["dampening"])
        if group["nesterov"] and (mom <= 0 or damp != 0):
            raise refuse(f"nesterov with momentum={mom}, dampening={damp} in {where}",
                         "nesterov needs momentum > 0 and dampening 0")
        return GroupStatic(momentum=mom, dampening=damp, nesterov=bool(group["nesterov"]))

    def linear_step(self, groups, group_index, lr, wd, state_before, after, dtype):
        zero, one = torch.zeros_like(lr), torch.ones_like(lr)
        mu = per_elem([g.momentum for g in groups], group_index).to(dtype)
        damp = per_elem([g.dampening for g in groups], group_index).to(dtype)
        nest = per_elem([float(g.nesterov) for g in groups], group_index).to(dtype)
        has_mom = (mu != 0).to(dtype)
        if state_before.has_buf:
            a, b = mu, has_mom * (1 - damp)
        else:  # PyTorch's first step: buf = clone(g'), no dampening
            a, b = zero, has_mom
        alpha = has_mom * torch.where(nest > 0, mu, one)
        gamma = torch.where(has_mom > 0, nest, one)
        return LinearStep(lr, a, b, alpha, gamma, wd, zero, one)

    def started(self, ls: LinearStep, state: OptState) -> bool:
        return state.has_buf or bool((ls.b != 0).any())

    def torch_state(self, state: OptState, bufs: dict[str, torch.Tensor], group: dict) -> dict:
        if state.has_buf and group["momentum"] != 0:
            return {"momentum_buffer": bufs["momentum_buffer"].clone()}
        return {}

    def started_in_torch(self, param_state: dict) -> bool:
        return param_state.get("momentum_buffer") is not None


SGD_MODEL = SGD()
