"""Recording from ``transformers.Trainer``: ``callbacks=[explaind_ql.hf.Callback("run.zarr")]``.

The Trainer runs its own loop, so the callback reads what a hand-written loop would pass
to :class:`~explaind_ql.Recorder`: the train split is the train dataset collated by the
Trainer's own collator; each step's dataset indices are tapped from its batch sampler, in
the order the forwards consume them (each forward's inputs are checked against the stored
rows of its indices, so a wrong guess cannot pass); the max-grad-norm clip is recorded from
the gradients' norms before clipping; gradient accumulation's micro-batches join one step;
the LR schedule (warmup included) is read from the optimizer at each step. What cannot be
exact is refused by name when training begins.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

import torch
from transformers import TrainerCallback

from ..errors import RecordingError
from ..recorder import Recorder

LM_CLASSES = ("LMHeadModel", "ForCausalLM")


def _refuse(args) -> None:
    """The Trainer settings whose updates have no exact per-example decomposition here."""
    checks = [
        (args.fp16 or args.bf16, "fp16/bf16 mixed precision (autocast changes the forward, and loss scaling skips "
                                 "steps)", "train in float32 or float64"),
        (bool(args.deepspeed), "DeepSpeed", "train without it"),
        (bool(args.fsdp), "FSDP", "train on one device"),
        (args.world_size > 1 or args.n_gpu > 1, f"{max(args.world_size, args.n_gpu)} processes/devices",
         "train on one device"),
        (args.gradient_checkpointing, "gradient checkpointing (it reruns forwards)", "turn it off"),
        (args.torch_compile, "torch_compile", "turn it off"),
        (args.label_smoothing_factor > 0, "label smoothing (the Trainer's own loss)", "set label_smoothing_factor=0"),
        (args.neftune_noise_alpha is not None, "NEFTune (random noise in the embeddings)", "turn it off"),
    ]
    for bad, what, fix in checks:
        if bad:
            raise RecordingError(f"the Trainer uses {what}, which explaind_ql cannot decompose exactly; {fix}")


def _collated(dataset, collate) -> dict[str, torch.Tensor]:
    """A whole dataset as one batch of the Trainer's collator (padded to its longest item)."""
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        raise RecordingError("the train dataset is iterable; recording needs an indexable dataset (its items by index)")
    batch = collate([dataset[i] for i in range(len(dataset))])
    if not isinstance(batch, dict):
        raise RecordingError(f"the Trainer's collator returns {type(batch).__name__}; it must return a dict of tensors")
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


class _Tap:
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


class Callback(TrainerCallback):
    """Record a ``transformers.Trainer`` run into ``path``.

    ``test``: a dataset or dict of tensors for the test split (default: the eval dataset, when the
    Trainer has one); ``loss``: ``"lm"`` for causal LMs (the default for ``*ForCausalLM`` and
    ``*LMHeadModel`` classes), else ``"cross_entropy"``. Other keywords go to :class:`Recorder`.
    """

    def __init__(self, path: str | os.PathLike, test: Any = None, loss: str | None = None, **recorder: Any):
        self.path, self.test, self.loss, self.kwargs = path, test, loss, recorder
        self.rec: Recorder | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None,
                       eval_dataloader=None, **_):
        _refuse(args)
        collate = train_dataloader.collate_fn
        train = _collated(train_dataloader.dataset, collate)
        test = self.test if self.test is not None else getattr(eval_dataloader, "dataset", None)
        if test is not None and not isinstance(test, dict):
            test = _collated(test, collate)
        loss = self.loss or ("lm" if type(model).__name__.endswith(LM_CLASSES) else "cross_entropy")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds torch's optimizer
        self.rec = Recorder(self.path, model, optimizer, train=train, test=test, loss=loss, **self.kwargs)
        self.train_x, self.tap = self.rec.splits["train"][0], _Tap(train_dataloader.batch_sampler)
        self.step_items: list[int] = []
        self.step_divisors: set[float | None] = set()  # the loss's divisor in each forward of the step
        self.step_loss = 0.0
        self.accumulation = args.gradient_accumulation_steps
        self.hooks = [model.register_forward_pre_hook(self._forward, with_kwargs=True),
                      model.register_forward_hook(self._loss)]

    def _forward(self, module, args, kwargs) -> None:
        if not module.training or self.rec.training.paused:
            return
        if not self.tap.queue:
            raise RecordingError("a training forward ran with no batch drawn from the train sampler; explaind_ql "
                                 "records the batches of the Trainer's own train dataloader only")
        idx = self.tap.queue.popleft()
        for key, stored in (self.train_x.items() if isinstance(self.train_x, dict) else ()):
            given = kwargs.get(key)
            rows = stored[idx]
            if isinstance(given, torch.Tensor) and given.shape[1:] != rows.shape[1:]:  # padded to the batch's longest
                rows = rows[tuple(slice(0, n) for n in given.shape)]
            if not (isinstance(given, torch.Tensor) and given.shape == rows.shape
                    and torch.equal(given.to(rows.device, rows.dtype), rows)):
                raise RecordingError(f"the Trainer's batch '{key}' is not the train dataset's items {idx[:4]}…; "
                                     "the sampler's order could not be followed (a custom sampler or collator "
                                     "that reorders?)")
        self.step_items += idx
        n = kwargs.get("num_items_in_batch")
        self.step_divisors.add(None if n is None else float(n))

    def _loss(self, module, args, out) -> None:
        if module.training and not self.rec.training.paused and getattr(out, "loss", None) is not None:
            self.step_loss += float(out.loss.detach())

    def on_optimizer_step(self, args, state, control, **_):
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            self.rec.clipped(args.max_grad_norm)
        items, self.step_items = self.step_items, []
        loss, self.step_loss = self.step_loss, 0.0
        divisors, self.step_divisors = self.step_divisors, set()
        self.rec.step(items, loss=loss, weight=self._weight(divisors))

    def _weight(self, divisors: set[float | None]) -> float | None:
        """Each example's weight in the step's loss: 1/num_items_in_batch where the Trainer passed it (it counts
        the step's labels its own way), else the loss's own mean, which gradient accumulation would split unequally."""
        if len(divisors) == 1 and None not in divisors:
            return 1.0 / next(iter(divisors))
        if self.accumulation > 1:
            raise RecordingError("gradient accumulation without num_items_in_batch (a model whose forward takes no "
                                 "loss kwargs) weighs the micro-batches' examples unequally; set "
                                 "gradient_accumulation_steps=1")
        return None

    def on_train_end(self, args, state, control, **_):
        if self.rec is not None:
            self.rec.close()
            self.tap.remove()
            for h in self.hooks:
                h.remove()
