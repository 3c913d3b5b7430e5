"""Targets F(θ): the scalar functions of the model at test items whose change is explained.

Test aggregation (linearity, ``Σ_x ∇F_x = ∇ Σ_x F_x``) happens inside the target: when a
query keeps no test axis the items are summed *before* differentiating, so each
quadrature node takes one gradient instead of one per item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..losses import LossSpec

@dataclass(frozen=True)
class TargetSpec:
    """Which function of which test items; ``keep_*`` say which axes survive aggregation."""

    kind: str
    split: str
    items: tuple[int, ...]
    output: int | None = None
    keep_test: bool = True
    keep_output: bool = False
    positions: int = 0  # a sequence's predicted positions, when its loss is kept per token (by token)


def _at_label(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return v.gather(1, y.long().reshape(-1, 1))


def values(spec: TargetSpec, out: torch.Tensor, y: torch.Tensor, loss: LossSpec) -> torch.Tensor:
    """(T, C') per item (and per output for ``outputs``) before aggregation."""
    out2 = out.reshape(out.shape[0], -1)
    k = spec.kind
    if k == "label":
        return _at_label(out2, y)
    if k == "output":
        return out2[:, spec.output: spec.output + 1]
    if k == "outputs":
        return out2
    if loss.sequence and k in ("loss", "logprob"):  # a sequence: its tokens' losses (log-likelihood: minus)
        v = loss.per_token(out, y) if spec.positions else loss.per_example(out, y).reshape(-1, 1)
        return v if k == "loss" else -v
    if k == "loss":
        return loss.per_example(out, y).reshape(-1, 1)
    if k == "logprob":
        return _at_label(F.log_softmax(out2, dim=1), y)
    if k == "prob":
        return _at_label(F.softmax(out2, dim=1), y)
    if k == "margin":
        own = _at_label(out2, y)
        others = out2.scatter(1, y.long().reshape(-1, 1), float("-inf"))
        return own - others.max(dim=1, keepdim=True).values
    raise ValueError(f"unknown target kind {k!r}")


def make(spec: TargetSpec, y: torch.Tensor, loss: LossSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    """The flat target vector as a function of the model output on the items."""
    def f(out: torch.Tensor) -> torch.Tensor:
        v = values(spec, out, y, loss)
        if not spec.keep_test:
            v = v.sum(0, keepdim=True)
        if not spec.keep_output:
            v = v.sum(1, keepdim=True)
        return v.reshape(-1)
    return f


def labels(spec: TargetSpec, n_out: int) -> list[tuple[int | None, int | None]]:
    """(test item, output) for every entry of the flat target vector; None where summed."""
    tests = list(spec.items) if spec.keep_test else [None]
    if spec.positions:  # by token: the index of each predicted token
        outs: list[int | None] = list(range(1, spec.positions + 1))
    elif spec.kind == "outputs" and spec.keep_output:
        outs = list(range(n_out))
    elif spec.kind == "output":
        outs = [spec.output]
    else:
        outs = [None]
    return [(t, o) for t in tests for o in outs]
