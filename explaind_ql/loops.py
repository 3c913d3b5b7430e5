"""Recording a loop the user does not write (a Trainer's): its data, and each step's batch from its sampler.

A :class:`~explaind_ql.Recorder` needs the train split and each step's dataset indices. A
framework's loop hides both, so its callback takes the split as the whole dataset collated by
the loop's own collator, and the indices by tapping the loop's batch sampler (:class:`Tap`), in
the order the training forwards consume them (:class:`Forwards`). Each forward's inputs are
checked against the stored rows of the indices it was given, so an order that could not be
followed (a custom sampler, a collator that reorders) is an error, never a wrong attribution.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from .errors import RecordingError
from .recorder import Recorder


def collated(dataset, collate) -> Any:
    """A whole dataset as one batch of the loop's collator (padded to its longest item): a dict of tensors, or
    an (inputs, labels) pair."""
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise RecordingError("the train dataset is iterable; recording needs an indexable dataset (its items by index)")
    batch = collate([dataset[i] for i in range(len(dataset))])
    if isinstance(batch, dict):
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return tuple(batch)
    raise RecordingError(f"the loop's collator returns {type(batch).__name__}; it must return a dict of tensors or an "
                         "(inputs, labels) pair")


def refuse(loop: str, checks: list[tuple[Any, str, str]]) -> None:
    """Raise for the first ``(bad, what, fix)`` whose ``bad`` holds: a setting of ``loop`` (a Trainer) whose updates
    have no exact per-example decomposition."""
    for bad, what, fix in checks:
        if bad:
            raise RecordingError(f"the {loop} uses {what}, which explaind_ql cannot decompose exactly; {fix}")


class Tap:
    """The batch sampler's index lists, in the order it hands them to the data loader."""

    def __init__(self, sampler):
        self.queue: deque[list[int]] = deque()
        self.sampler, self.cls = sampler, type(sampler)
        queue, cls = self.queue, self.cls

        def tapped(this):
            for batch in cls.__iter__(this):
                queue.append([int(i) for i in batch])
                yield batch
        sampler.__class__ = type(f"Tapped{cls.__name__}", (cls,), {"__iter__": tapped})

    def remove(self) -> None:
        self.sampler.__class__ = self.cls


class Forwards:
    """Each training forward of the model: the dataset indices of its items (from the :class:`Tap`), checked
    against its inputs, gathered into the step's batch until the optimizer steps."""

    def __init__(self, rec: Recorder, model: torch.nn.Module, sampler):
        self.rec, self.tap = rec, Tap(sampler)
        self.train_x = rec.splits["train"][0]
        self.items: list[int] = []
        self.seen: list[tuple[int, dict[str, Any]]] = []  # each forward's items and keywords (num_items_in_batch)
        self.hook = model.register_forward_pre_hook(self._forward, with_kwargs=True)

    def _forward(self, module, args, kwargs) -> None:
        if not module.training or self.rec.training.paused:
            return
        if not self.tap.queue:
            raise RecordingError("a training forward ran with no batch drawn from the train sampler; explaind_ql "
                                 "records the batches of the loop's own train dataloader only")
        idx = self.tap.queue.popleft()
        stored = self.train_x if isinstance(self.train_x, dict) else {"": self.train_x}
        given = kwargs if isinstance(self.train_x, dict) else {"": args[0] if args else None}
        for key, rows in stored.items():
            if not _same_rows(given.get(key), rows[idx]):
                raise RecordingError(f"the loop's batch{f' {key!r}' if key else ''} is not the train dataset's items "
                                     f"{idx[:4]}…; the sampler's order could not be followed (a custom sampler or "
                                     "collator that reorders?)")
        self.items += idx
        self.seen.append((len(idx), kwargs))

    def take(self) -> tuple[list[int], list[tuple[int, dict[str, Any]]]]:
        """The step's items, and each forward's number of items and keywords; cleared for the next step."""
        out = self.items, self.seen
        self.items, self.seen = [], []
        return out

    def remove(self) -> None:
        self.hook.remove()
        self.tap.remove()


class Rows:
    """Dataset indices of a batch found by its content: each (inputs, label) row looked up among the stored train
    rows. For a loop whose sampler cannot be tapped in time (Lightning creates its first iterator before any
    callback runs). Identical rows are interchangeable: their copies are handed out in order."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.where: dict[bytes, list[int]] = {}
        for i in range(len(y)):
            self.where.setdefault(self._key(x[i], y[i]), []).append(i)
        self.used: dict[bytes, int] = {}

    @staticmethod
    def _key(x: torch.Tensor, y: torch.Tensor) -> bytes:
        return x.detach().cpu().contiguous().numpy().tobytes() + b"|" + y.detach().cpu().contiguous().numpy().tobytes()

    def of(self, x: torch.Tensor, y: torch.Tensor) -> list[int]:
        out = []
        for i in range(len(y)):
            key = self._key(x[i], y[i])
            found = self.where.get(key, [])
            if not found:
                raise RecordingError(f"row {i} of a training batch is not in the train dataset; record the loop's own "
                                     "train dataloader (no augmentation that changes the items)")
            k = self.used.get(key, 0)
            out.append(found[k % len(found)])
            self.used[key] = k + 1
        return out


def _same_rows(given, rows: torch.Tensor) -> bool:
    """Whether a forward's input holds these stored rows (cut to its padding length, if shorter)."""
    if not isinstance(given, torch.Tensor):
        return False
    if given.shape[1:] != rows.shape[1:] and given.dim() == rows.dim():  # padded to the batch's longest
        rows = rows[tuple(slice(0, n) for n in given.shape)]
    return given.shape == rows.shape and torch.equal(given.to(rows.device, rows.dtype), rows)


__all__ = ["Forwards", "Rows", "Tap", "collated", "refuse"]
