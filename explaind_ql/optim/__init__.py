"""Exact models of PyTorch's AdamW, Adam and SGD as *linear momentum* updates (see :mod:`.base`).

The recorder uses :func:`advance` to verify every real update, the replay uses it to
recreate intermediate states, and the engine uses the same :class:`LinearStep` to
split each update into gradient, weight-decay and carried-momentum parts. One code
path for all three is what makes the decomposition trustworthy.

Each optimizer is one module implementing :class:`OptimizerModel` (:mod:`.adam`,
:mod:`.sgd`); :data:`MODELS` names them. Adding one is a module plus its entry here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .adam import ADAM, ADAMW
from .base import GroupStatic, LinearStep, OptimizerModel, OptState, per_elem, refuse, static_fields
from .sgd import SGD_MODEL

MODELS: dict[str, OptimizerModel] = {m.name: m for m in (ADAMW, ADAM, SGD_MODEL)}
SUPPORTED = tuple(MODELS)


@dataclass(frozen=True)
class OptimizerSpec:
    """Which optimizer, and its constant per-group hyperparameters (lr and decay are per step)."""

    cls: str
    groups: tuple[GroupStatic, ...]

    @property
    def model(self) -> OptimizerModel:
        return MODELS[self.cls]

    @property
    def buffers(self) -> tuple[str, ...]:
        return self.model.buffers

    def to_json(self) -> dict:
        return {"cls": self.cls, "groups": [asdict(g) for g in self.groups]}

    @staticmethod
    def from_json(d: dict) -> OptimizerSpec:
        return OptimizerSpec(d["cls"], tuple(GroupStatic(**g) for g in d["groups"]))


def spec_from_torch(opt: torch.optim.Optimizer) -> OptimizerSpec:
    """Read a live optimizer, refusing (one line, naming the setting) what cannot be modelled."""
    name = type(opt).__name__
    if name not in MODELS or type(opt).__module__.split(".")[:2] != ["torch", "optim"]:
        raise refuse(f"optimizer class {name}", f"use torch.optim.{', '.join(SUPPORTED[:-1])} or {SUPPORTED[-1]}")
    model = MODELS[name]
    groups = []
    for gi, g in enumerate(opt.param_groups):
        where = f"param group {gi}"
        for flag in ("maximize", "amsgrad", "differentiable", "capturable"):
            if g.get(flag):
                raise refuse(f"{flag}=True in {where}", f"construct {name} with {flag}=False")
        groups.append(model.group_static(g, where))
        for p in g["params"]:
            if p.requires_grad and p.is_complex():
                raise refuse(f"complex parameter in {where}", "use real parameters")
    return OptimizerSpec(model.recorded_as(opt.param_groups), tuple(groups))


def static_mismatch(spec: OptimizerSpec, opt: torch.optim.Optimizer) -> str | None:
    """Name a constant hyperparameter that changed since recording began, if any."""
    return static_fields(spec.groups, spec_from_torch(opt).groups)


def fresh_state(spec: OptimizerSpec, n: int, dtype: torch.dtype, device=None) -> OptState:
    return OptState({b: torch.zeros(n, dtype=dtype, device=device) for b in spec.buffers}, 0, False)


def linear_step(spec: OptimizerSpec, group_index: torch.Tensor, lr, wd, state_before: OptState,
                after: dict[str, torch.Tensor], dtype: torch.dtype) -> LinearStep:
    """Linear form of the step taken from ``state_before`` with per-group ``lr``, ``wd``; ``after`` holds the
    buffers the step updated besides the momentum (Adam's second moment *after* the step, ``v_s``)."""
    lr_e = per_elem(lr, group_index).to(dtype)
    wd_e = per_elem(wd, group_index).to(dtype)
    return spec.model.linear_step(spec.groups, group_index, lr_e, wd_e, state_before, after, dtype)


def advance(spec: OptimizerSpec, group_index: torch.Tensor, lr, wd, theta: torch.Tensor,
            grad: torch.Tensor, state: OptState) -> tuple[LinearStep, OptState, torch.Tensor]:
    """Take one optimizer step on flat tensors: (linear form, state after, delta theta).

    ``grad`` is the batch gradient as the optimizer saw it (after clipping).
    """
    model = spec.model
    after = model.preconditioner(spec.groups, group_index, per_elem(wd, group_index).to(theta.dtype), theta,
                                 grad, state)
    ls = linear_step(spec, group_index, lr, wd, state, after, theta.dtype)
    drive = ls.drive(theta, grad)
    m_new = ls.a * state.momentum + ls.b * drive
    bufs = {model.buffers[0]: m_new}
    for b in model.buffers[1:]:
        bufs[b] = after[b] if b in after else state.bufs[b].clone()
    return ls, OptState(bufs, state.step + 1, model.started(ls, state)), ls.delta(theta, m_new, drive)


__all__ = ["MODELS", "SUPPORTED", "GroupStatic", "LinearStep", "OptState", "OptimizerModel", "OptimizerSpec",
           "advance", "fresh_state", "linear_step", "spec_from_torch", "static_mismatch"]
