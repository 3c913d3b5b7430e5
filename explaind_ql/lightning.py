"""Recording from Lightning: ``Trainer(callbacks=[explaind_ql.lightning.Callback("run.zarr", test=...)])``.

Like :mod:`explaind_ql.hf.callback`, the callback takes the train split as the train dataset collated
by the dataloader's collator. Each step's indices are found by the batches' content among the stored rows
(:class:`explaind_ql.loops.Rows`): Lightning creates its first data iterator before any callback can tap
the sampler. Batches must be ``(inputs, labels)`` pairs. The LightningModule is the model: its ``forward`` on a
batch's inputs must give the outputs its ``training_step`` takes the loss of (``loss=``, a mean by
default), which the recorder checks against training's gradient at every step (``grad_check_every=1``)
because Lightning's own loss is the user's code. ``gradient_clip_val`` (norm clipping), LR schedulers,
``accumulate_grad_batches`` and dropout are followed; manual optimization, several optimizers, mixed
precision, value clipping and several devices are refused by name. Needs ``pip install lightning``.
"""

from __future__ import annotations

import os
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:
    raise ImportError("explaind_ql.lightning needs Lightning: pip install \"explaind_ql[lightning]\"") from None

from .errors import RecordingError
from .loops import Rows, collated, refuse
from .recorder import Recorder


def _refuse(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    clip = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm) or "norm"
    checks = [
        (not module.automatic_optimization, "manual optimization", "use automatic optimization"),
        (len(trainer.optimizers) != 1, f"{len(trainer.optimizers)} optimizers", "train with one optimizer"),
        (str(trainer.precision) not in ("32-true", "64-true", "32", "64"), f"precision {trainer.precision}",
         "train in 32-true or 64-true"),
        (trainer.world_size > 1, f"{trainer.world_size} processes", "train on one device"),
        (trainer.gradient_clip_val and clip != "norm", f"gradient_clip_algorithm={clip!r}", "clip by norm"),
    ]
    refuse("Lightning Trainer", checks)


class Callback(pl.Callback):
    """Record a Lightning run into ``path``. ``test``: a dataset (collated by the train dataloader's collator)
    or an (inputs, labels) pair for the test split; other keywords go to :class:`Recorder`."""

    def __init__(self, path: str | os.PathLike, test: Any = None, **recorder: Any):
        self.path, self.test, self.kwargs = path, test, {"grad_check_every": 1, **recorder}
        self.rec: Recorder | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _refuse(trainer, pl_module)
        loader = trainer.train_dataloader
        loader = getattr(loader, "iterables", loader)  # Lightning's CombinedLoader around the user's loader
        if not hasattr(loader, "batch_sampler"):
            raise RecordingError("the train dataloader is not one torch DataLoader; record with one train dataloader")
        test = self.test
        if test is not None and not isinstance(test, (dict, tuple)):
            test = collated(test, loader.collate_fn)
        self.rec = Recorder(self.path, pl_module, trainer.optimizers[0], train=collated(loader.dataset, loader.collate_fn),
                            test=test, **self.kwargs)
        self.rows = Rows(*self.rec.splits["train"])
        self.items: list[int] = []
        self.sizes: list[int] = []
        self.steps = trainer.global_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
            raise RecordingError(f"a training batch is {type(batch).__name__}; the Lightning callback records "
                                 "(inputs, labels) batches")
        idx = self.rows.of(*batch)
        self.items += idx
        self.sizes.append(len(idx))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.steps:  # accumulating: the optimizer has not stepped yet
            return
        self.steps = trainer.global_step
        if trainer.gradient_clip_val:
            self.rec.clipped(float(trainer.gradient_clip_val))
        items, sizes, self.items, self.sizes = self.items, self.sizes, [], []
        self.rec.step(items, weight=self._weight(trainer.accumulate_grad_batches, sizes))

    def _weight(self, accumulate: int, sizes: list[int]) -> float | None:
        """Lightning divides each micro-batch's loss by ``accumulate_grad_batches``, however many the step had:
        with a mean loss, each example weighs 1/(accumulate · its micro-batch's size)."""
        if accumulate == 1 or self.rec.loss.reduction != "mean" or self.rec.loss.name not in ("cross_entropy", "nll"):
            return None
        if len(set(sizes)) != 1:
            raise RecordingError(f"the step's micro-batches hold {sizes} items: with accumulate_grad_batches their "
                                 "examples weigh unequally; use drop_last=True or a batch size that divides the data")
        return 1.0 / (accumulate * sizes[0])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rec is not None:
            self.rec.close()
