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
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError("explaind_ql.hf.Callback needs transformers: pip install \"explaind_ql[hf]\"") from None

from ..errors import RecordingError
from ..loops import Forwards, collated, refuse
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
    refuse("Trainer", checks)


class Callback(TrainerCallback):
    """Record a ``transformers.Trainer`` run into ``path``.

    ``test``: a dataset (collated by the Trainer's collator) or dict of tensors for the test split;
    ``loss``: ``"lm"`` for causal LMs (the default for ``*ForCausalLM`` and
    ``*LMHeadModel`` classes), else ``"cross_entropy"``. Other keywords go to :class:`Recorder`.
    """

    def __init__(self, path: str | os.PathLike, test: Any = None, loss: str | None = None, **recorder: Any):
        self.path, self.test, self.loss, self.kwargs = path, test, loss, recorder
        self.rec: Recorder | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **_):
        _refuse(args)
        collate = train_dataloader.collate_fn
        train = collated(train_dataloader.dataset, collate)
        test = self.test if self.test is None or isinstance(self.test, dict) else collated(self.test, collate)
        loss = self.loss or ("lm" if type(model).__name__.endswith(LM_CLASSES) else "cross_entropy")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds torch's optimizer
        self.rec = Recorder(self.path, model, optimizer, train=train, test=test, loss=loss, **self.kwargs)
        self.forwards = Forwards(self.rec, model, train_dataloader.batch_sampler)
        self.step_loss = 0.0
        self.accumulation = args.gradient_accumulation_steps
        self.hook = model.register_forward_hook(self._loss)

    def _loss(self, module, args, out) -> None:
        if module.training and not self.rec.training.paused and getattr(out, "loss", None) is not None:
            self.step_loss += float(out.loss.detach())

    def on_optimizer_step(self, args, state, control, **_):
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            self.rec.clipped(args.max_grad_norm)
        items, seen = self.forwards.take()
        loss, self.step_loss = self.step_loss, 0.0
        divisors = {None if kw.get("num_items_in_batch") is None else float(kw["num_items_in_batch"]) for _, kw in seen}
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
            self.forwards.remove()
            self.hook.remove()
