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


IGNORE = -100  # the label of a token no loss is taken on (padding, a prompt), as Hugging Face marks it


def lm_tokens(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, L-1) next-token losses: logits at position i predict label i+1; ``-100`` labels give 0."""
    logits, labels = out[:, :-1], y[:, 1:].long()
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                          reduction="none")
    return tok.view(labels.shape)


def _lm(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A sequence's summed next-token loss."""
    return lm_tokens(out, y).sum(1)


BUILTIN: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": lambda out, y: F.cross_entropy(out, y, reduction="none"),
    "nll": lambda out, y: F.nll_loss(out, y, reduction="none"),
    "mse": _mse,
    # causal language modelling as Hugging Face's models compute it from ``labels``: the mean over the
    # batch's predicted tokens, so an example's loss is its tokens' sum and its weight 1/(batch tokens)
    "lm": _lm,
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

    @property
    def sequence(self) -> bool:
        """Whether an example is a sequence of tokens, each with its own label (its targets are loss and logprob)."""
        return self.name == "lm"

    def per_token(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B, L-1): each predicted token's loss, which :meth:`per_example` sums (sequence losses only)."""
        return lm_tokens(out, y)

    def weight(self, y: torch.Tensor) -> float:
        """w_{s,k} of the batch with labels ``y``: each example's weight in the batch loss (a mean averages
        mse over elements, the LM loss over the batch's predicted tokens)."""
        if self.reduction == "sum":
            return 1.0
        if self.name == "lm":
            return 1.0 / max(1, int((y[:, 1:] != IGNORE).sum()))
        return 1.0 / (len(y) * (int(y[0].numel()) if self.name == "mse" and y.dim() > 1 else 1))
