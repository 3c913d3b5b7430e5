"""Per-example losses: the decomposition needs the batch loss as a weighted sum of them.

A loss spec is stored by name in the run, together with the reduction, so that a query
process can rebuild exactly the gradient training used. Names come from the fixed
registry :data:`BUILTIN`, never from an import: a store is shared data, and a loss name
that imported a module would let it run code (see :mod:`explaind_ql.trust`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import RecordingError


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    diff = out - y.to(out.dtype).reshape(out.shape)
    return (diff * diff).reshape(out.shape[0], -1).sum(1)


BUILTIN: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": lambda out, y: F.cross_entropy(out, y, reduction="none"),
    "nll": lambda out, y: F.nll_loss(out, y, reduction="none"),
    "mse": _mse,
}


@dataclass(frozen=True)
class LossSpec:
    """Which per-example loss, and how a batch reduces it (``mean`` or ``sum``)."""

    name: str
    reduction: str = "mean"

    def __post_init__(self):
        if self.reduction not in ("mean", "sum"):
            raise RecordingError(f"unsupported loss reduction {self.reduction!r}; use 'mean' or 'sum'")
        self.fn  # resolve now: a bad loss is a record-time error, not a query-time one

    @property
    def fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        if self.name not in BUILTIN:
            raise RecordingError(f"unknown loss {self.name!r}; use one of {', '.join(BUILTIN)} "
                                 "(loss names come from a fixed registry and are never imported)")
        return BUILTIN[self.name]

    def per_example(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fn(out, y)

    def weight(self, batch_size: int, out_numel_per_example: int) -> float:
        """w_{s,k}: each example's weight in the batch loss (PyTorch's mean averages mse over elements)."""
        if self.reduction == "sum":
            return 1.0
        per = out_numel_per_example if self.name == "mse" else 1
        return 1.0 / (batch_size * per)
