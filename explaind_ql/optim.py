"""Exact models of PyTorch's AdamW, Adam and SGD as *linear momentum* updates.

Every supported optimizer step, written over the flat parameter vector, has the form

    g'_s  = g_s + lam_c * theta_s                      (coupled L2 decay; 0 for AdamW)
    M_s   = a_s * M_{s-1} + b_s * g'_s                 (momentum / first moment)
    dth_s = -eta_s * (P_s * (alpha_s * M_s + gamma_s * g'_s) + lam_d * theta_s)

with per-element vectors (hyperparameters broadcast from param groups) and a
preconditioner ``P_s`` that is fixed once the step is taken (Adam's ``D_s``, SGD's 1).
The recorder uses :func:`advance` to verify every real update, the replay uses it to
recreate intermediate states, and the engine uses the same :class:`LinearStep` to
split each update into gradient, weight-decay and carried-momentum parts. One code
path for all three is what makes the decomposition trustworthy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .errors import RecordingError

SUPPORTED = ("AdamW", "Adam", "SGD")


@dataclass(frozen=True)
class GroupStatic:
    """Hyperparameters of one param group that must stay constant during a run."""

    beta1: float = 0.0
    beta2: float = 0.0
    eps: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False


@dataclass(frozen=True)
class OptimizerSpec:
    """Which optimizer, and its constant per-group hyperparameters (lr and decay are per step)."""

    cls: str
    groups: tuple[GroupStatic, ...]

    @property
    def adam(self) -> bool:
        return self.cls in ("Adam", "AdamW")

    @property
    def decoupled(self) -> bool:
        return self.cls == "AdamW"

    @property
    def buffers(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") if self.adam else ("momentum_buffer",)

    def to_json(self) -> dict:
        return {"cls": self.cls, "groups": [asdict(g) for g in self.groups]}

    @staticmethod
    def from_json(d: dict) -> OptimizerSpec:
        return OptimizerSpec(d["cls"], tuple(GroupStatic(**g) for g in d["groups"]))


def _refuse(setting: str, fix: str) -> RecordingError:
    return RecordingError(f"unsupported optimizer setting: {setting}; {fix}")


def spec_from_torch(opt: torch.optim.Optimizer) -> OptimizerSpec:
    """Read a live optimizer, refusing (one line, naming the setting) what cannot be modelled."""
    name = type(opt).__name__
    if name not in SUPPORTED or type(opt).__module__.split(".")[:2] != ["torch", "optim"]:
        raise _refuse(f"optimizer class {name}", "use torch.optim.AdamW, Adam or SGD")
    groups = []
    decoupled_adam = False
    for gi, g in enumerate(opt.param_groups):
        where = f"param group {gi}"
        for flag in ("maximize", "amsgrad", "differentiable", "capturable"):
            if g.get(flag):
                raise _refuse(f"{flag}=True in {where}", f"construct {name} with {flag}=False")
        if g.get("decoupled_weight_decay") and name == "Adam":
            decoupled_adam = True
        if name == "SGD":
            mom, damp = float(g["momentum"]), float(g["dampening"])
            if g["nesterov"] and (mom <= 0 or damp != 0):
                raise _refuse(f"nesterov with momentum={mom}, dampening={damp} in {where}",
                              "nesterov needs momentum > 0 and dampening 0")
            groups.append(GroupStatic(momentum=mom, dampening=damp, nesterov=bool(g["nesterov"])))
        else:
            b1, b2 = (float(b) for b in g["betas"])
            groups.append(GroupStatic(beta1=b1, beta2=b2, eps=float(g["eps"])))
        for p in g["params"]:
            if p.requires_grad and p.is_complex():
                raise _refuse(f"complex parameter in {where}", "use real parameters")
    return OptimizerSpec("AdamW" if decoupled_adam else name, tuple(groups))


def static_mismatch(spec: OptimizerSpec, opt: torch.optim.Optimizer) -> str | None:
    """Name a constant hyperparameter that changed since recording began, if any."""
    now = spec_from_torch(opt)
    for gi, (a, b) in enumerate(zip(spec.groups, now.groups)):
        for field, va in asdict(a).items():
            vb = getattr(b, field)
            if va != vb:
                return f"{field} of param group {gi} changed from {va} to {vb}"
    return None


@dataclass
class OptState:
    """Flat optimizer state *before* a step: moment buffers, Adam's step count, SGD's buffer flag."""

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
        return self.bufs["exp_avg"] if "exp_avg" in self.bufs else self.bufs["momentum_buffer"]


def fresh_state(spec: OptimizerSpec, n: int, dtype: torch.dtype, device=None) -> OptState:
    return OptState({b: torch.zeros(n, dtype=dtype, device=device) for b in spec.buffers}, 0, False)


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


def _per_elem(values, group_index: torch.Tensor) -> torch.Tensor:
    """Per-group values broadcast to elements (a 0-d tensor when all groups agree: cheaper)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=group_index.device)
    return t[0] if bool((t == t[0]).all()) else t[group_index]


def linear_step(spec: OptimizerSpec, group_index: torch.Tensor, lr, wd, state_before: OptState,
                exp_avg_sq_after: torch.Tensor | None, dtype: torch.dtype) -> LinearStep:
    """Linear form of the step taken from ``state_before`` with per-group ``lr``, ``wd``.

    For Adam the preconditioner needs the second moment *after* the step (``v_s``).
    """
    gs = spec.groups
    lr_e = _per_elem(lr, group_index).to(dtype)
    wd_e = _per_elem(wd, group_index).to(dtype)
    zero = torch.zeros_like(lr_e)
    one = torch.ones_like(lr_e)
    if spec.adam:
        t = state_before.step + 1
        b1 = _per_elem([g.beta1 for g in gs], group_index).to(dtype)
        bc1 = _per_elem([1 - g.beta1 ** t for g in gs], group_index).to(dtype)
        bc2s = _per_elem([math.sqrt(1 - g.beta2 ** t) for g in gs], group_index).to(dtype)
        eps = _per_elem([g.eps for g in gs], group_index).to(dtype)
        precond = 1.0 / (bc1 * (exp_avg_sq_after.to(dtype).sqrt() / bc2s + eps))
        lam_c, lam_d = (zero, wd_e) if spec.decoupled else (wd_e, zero)
        return LinearStep(lr_e, b1, 1 - b1, one, zero, lam_c, lam_d, precond)
    mu = _per_elem([g.momentum for g in gs], group_index).to(dtype)
    damp = _per_elem([g.dampening for g in gs], group_index).to(dtype)
    nest = _per_elem([float(g.nesterov) for g in gs], group_index).to(dtype)
    has_mom = (mu != 0).to(dtype)
    if state_before.has_buf:
        a, b = mu, has_mom * (1 - damp)
    else:  # PyTorch's first step: buf = clone(g'), no dampening
        a, b = zero, has_mom
    alpha = has_mom * torch.where(nest > 0, mu, one)
    gamma = torch.where(has_mom > 0, nest, one)
    return LinearStep(lr_e, a, b, alpha, gamma, wd_e, zero, one)


def advance(spec: OptimizerSpec, group_index: torch.Tensor, lr, wd, theta: torch.Tensor,
            grad: torch.Tensor, state: OptState) -> tuple[LinearStep, OptState, torch.Tensor]:
    """Take one optimizer step on flat tensors: (linear form, state after, delta theta).

    ``grad`` is the batch gradient as the optimizer saw it (after clipping).
    """
    dtype = theta.dtype
    new = state.clone()
    new.step = state.step + 1
    v_after = None
    if spec.adam:
        lam_c = _per_elem(wd, group_index).to(dtype) if not spec.decoupled else 0.0
        drive = grad + lam_c * theta
        b2 = _per_elem([g.beta2 for g in spec.groups], group_index).to(dtype)
        v_after = b2 * state.bufs["exp_avg_sq"] + (1 - b2) * drive * drive
        new.bufs["exp_avg_sq"] = v_after
    ls = linear_step(spec, group_index, lr, wd, state, v_after, dtype)
    drive = ls.drive(theta, grad)
    m_new = ls.a * state.momentum + ls.b * drive
    new.bufs["exp_avg" if spec.adam else "momentum_buffer"] = m_new
    new.has_buf = state.has_buf or (not spec.adam and bool((ls.b != 0).any()))
    return ls, new, ls.delta(theta, m_new, drive)
