"""What every optimizer model shares: the linear form of a step, the flat state, and the model protocol.

Every supported optimizer step, written over the flat parameter vector, has the form

    g'_s  = g_s + lam_c * theta_s                      (coupled L2 decay; 0 for AdamW)
    M_s   = a_s * M_{s-1} + b_s * g'_s                 (momentum / first moment)
    dth_s = -eta_s * (P_s * (alpha_s * M_s + gamma_s * g'_s) + lam_d * theta_s)

with per-element vectors (hyperparameters broadcast from param groups) and a
preconditioner ``P_s`` that is fixed once the step is taken (Adam's ``D_s``, SGD's 1).
An :class:`OptimizerModel` says how one torch optimizer maps onto that form; the rest of
the package (recorder, replay, trajectory, engine) only calls the protocol.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import torch

from ..errors import RecordingError


@dataclass(frozen=True)
class GroupStatic:
    """Hyperparameters of one param group that must stay constant during a run (each model uses its own;
    one dataclass for all, so that stores keep one JSON layout)."""

    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False


@dataclass
class OptState:
    """Flat optimizer state *before* a step: the model's buffers (momentum first), the step count, and
    whether the momentum buffer exists yet (SGD creates it on its first step)."""

    bufs: dict[str, torch.Tensor]
    step: int
    has_buf: bool

    def clone(self) -> OptState:
        return OptState({k: v.clone() for k, v in self.bufs.items()}, self.step, self.has_buf)

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> OptState:
        return OptState({k: v.to(device=device, dtype=dtype) for k, v in self.bufs.items()},
                        self.step, self.has_buf)

    @property
    def momentum(self) -> torch.Tensor:
        return next(iter(self.bufs.values()))

    def besides_momentum(self) -> dict[str, torch.Tensor]:
        """The other buffers: after a step, what it updated before its linear form (Adam's second moment)."""
        return dict(list(self.bufs.items())[1:])


@dataclass
class LinearStep:
    """The linear form of one update, per element of the (selected) flat parameter vector."""

    eta: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    alpha: torch.Tensor
    gamma: torch.Tensor
    lam_c: torch.Tensor
    lam_d: torch.Tensor
    precond: torch.Tensor

    def take(self, idx: torch.Tensor) -> LinearStep:
        """Restrict to selected elements (restriction pushdown to the params)."""
        return LinearStep(*(v if v.dim() == 0 else v[idx] for v in (getattr(self, f) for f in self.__dataclass_fields__)))

    def drive(self, theta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """g'_s: what enters the momentum (gradient plus coupled decay)."""
        return grad + self.lam_c * theta

    def delta(self, theta: torch.Tensor, m_new: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
        return -self.eta * (self.precond * (self.alpha * m_new + self.gamma * drive) + self.lam_d * theta)

    def out_coef(self) -> torch.Tensor:
        """Coefficient of the current momentum in the update: -eta * P * alpha."""
        return -self.eta * self.precond * self.alpha

    def direct_coef(self) -> torch.Tensor:
        """Coefficient of this step's own drive in the update, besides momentum: -eta * P * gamma."""
        return -self.eta * self.precond * self.gamma


def per_elem(values, group_index: torch.Tensor) -> torch.Tensor:
    """Per-group values broadcast to elements (a 0-d tensor when all groups agree: cheaper)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=group_index.device)
    return t[0] if bool((t == t[0]).all()) else t[group_index]


def refuse(setting: str, fix: str) -> RecordingError:
    return RecordingError(f"unsupported optimizer setting: {setting}; {fix}")


class OptimizerModel(ABC):
    """How one torch.optim class maps onto the linear form: one module per optimizer implements it.

    ``buffers`` are its flat state's buffers, the momentum first; ``counts_steps`` whether torch
    keeps a per-param step count for it.
    """

    name: str
    buffers: tuple[str, ...]
    counts_steps: bool

    @abstractmethod
    def group_static(self, group: dict, where: str) -> GroupStatic:
        """A param group's constant hyperparameters, or a refusal naming a setting it cannot model."""

    def recorded_as(self, groups: list[dict]) -> str:
        """The name a run with these param groups is recorded under (Adam with decoupled decay is AdamW)."""
        return self.name

    @abstractmethod
    def linear_step(self, groups: tuple[GroupStatic, ...], group_index: torch.Tensor, lr: torch.Tensor,
                    wd: torch.Tensor, state_before: OptState, after: dict[str, torch.Tensor],
                    dtype: torch.dtype) -> LinearStep:
        """The linear form of the step from ``state_before`` (``lr``, ``wd`` per element); ``after`` holds
        the buffers :meth:`preconditioner` updated for this step."""

    def preconditioner(self, groups: tuple[GroupStatic, ...], group_index: torch.Tensor, wd: torch.Tensor,
                       theta: torch.Tensor, grad: torch.Tensor, state: OptState) -> dict[str, torch.Tensor]:
        """Buffers besides the momentum that the step updates before its linear form is known (none)."""
        return {}

    def started(self, ls: LinearStep, state: OptState) -> bool:
        """Whether the momentum buffer exists after this step."""
        return state.has_buf

    @abstractmethod
    def torch_state(self, state: OptState, bufs: dict[str, torch.Tensor], group: dict) -> dict:
        """One param's torch optimizer state for ``state`` (``bufs``: that param's views), for replay."""

    def started_in_torch(self, param_state: dict) -> bool:
        """Whether torch's state for one param has the momentum buffer (after a replayed step)."""
        return False


def static_fields(spec_groups: tuple[GroupStatic, ...], now: tuple[GroupStatic, ...]) -> str | None:
    """Name a constant hyperparameter that differs between two readings of the param groups, if any."""
    for gi, (a, b) in enumerate(zip(spec_groups, now)):
        for field, va in asdict(a).items():
            vb = getattr(b, field)
            if va != vb:
                return f"{field} of param group {gi} changed from {va} to {vb}"
    return None
