"""Adam and AdamW: the first moment is the momentum, the bias-corrected second moment the preconditioner."""

from __future__ import annotations

import math

import torch

from .base import GroupStatic, LinearStep, OptimizerModel, OptState, per_elem


class Adam(OptimizerModel):
    """torch.optim.Adam (coupled L2 decay) or AdamW (decoupled decay)."""

    buffers = ("exp_avg", "exp_avg_sq")
    counts_steps = True

    def __init__(self, name: str, decoupled: bool):
        self.name, self.decoupled = name, decoupled

    def group_static(self, group: dict, where: str) -> GroupStatic:
        b1, b2 = (float(b) for b in group["betas"])
        return GroupStatic(beta1=b1, beta2=b2, eps=float(group["eps"]))

    def recorded_as(self, groups: list[dict]) -> str:
        return "AdamW" if any(g.get("decoupled_weight_decay") for g in groups) else self.name

    def _decays(self, wd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zero = torch.zeros_like(wd)
        return (zero, wd) if self.decoupled else (wd, zero)  # (coupled, decoupled)

    def preconditioner(self, groups, group_index, wd, theta, grad, state):
        drive = grad + self._decays(wd.to(theta.dtype))[0] * theta
        b2 = per_elem([g.beta2 for g in groups], group_index).to(theta.dtype)
        return {"exp_avg_sq": b2 * state.bufs["exp_avg_sq"] + (1 - b2) * drive * drive}

    def linear_step(self, groups, group_index, lr, wd, state_before, after, dtype):
        t = state_before.step + 1
        b1 = per_elem([g.beta1 for g in groups], group_index).to(dtype)
        bc1 = per_elem([1 - g.beta1 ** t for g in groups], group_index).to(dtype)
        bc2s = per_elem([math.sqrt(1 - g.beta2 ** t) for g in groups], group_index).to(dtype)
        eps = per_elem([g.eps for g in groups], group_index).to(dtype)
        precond = 1.0 / (bc1 * (after["exp_avg_sq"].to(dtype).sqrt() / bc2s + eps))
        one, zero = torch.ones_like(lr), torch.zeros_like(lr)
        return LinearStep(lr, b1, 1 - b1, one, zero, *self._decays(wd), precond)

    def torch_state(self, state: OptState, bufs: dict[str, torch.Tensor], group: dict) -> dict:
        return {"step": torch.tensor(float(state.step)), **{b: bufs[b].clone() for b in self.buffers}}


ADAM = Adam("Adam", decoupled=False)
ADAMW = Adam("AdamW", decoupled=True)
