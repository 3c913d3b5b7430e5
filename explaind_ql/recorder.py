"""Recording a training run: a few lines in the user's loop, verified at every step.

The recorder keeps θ_s and the optimizer state of the previous step (one flat copy
each), and after each ``optimizer.step()`` it re-takes the step with the model of
:mod:`explaind_ql.optim` from the gradients the optimizer saw. A mismatch means the
run cannot be decomposed exactly (a hyperparameter changed, an unrecorded clip, an
unsupported option), so it is raised at once, naming step, param and error size.

Cost per step: O(P) elementwise work (copying params, gradients and optimizer
buffers, one modelled update, one comparison), no extra forward or backward passes
except for the gradient check (one forward+backward on step 0 and every
``grad_check_every`` steps) that confirms the recorded loss and batch rebuild the
gradient.
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Any, Union

import torch

from .engine.facts import MODEL_FACTS, measured
from . import dropout, model_io
from .dropout import DROPOUT_SEED, STOCHASTIC
from .errors import RecordingError, VerificationError
from .factory import check_factory, derive_factory
from .hf import architecture
from .losses import IGNORE, LossSpec
from .model_io import Adapter
from .optim import OptimizerSpec, OptState, advance, spec_from_torch, static_mismatch
from .params import ParamSpace
from .store import FORMAT_KEY, FORMAT_VERSION, Layout, create_writer

# below this many bytes of params + optimizer state, dense storage costs little and saves replay
DENSE_AUTO_BYTES = 1 << 20
AUTO_CHECKPOINT_EVERY = 100


def default_checkpoint_every(n_elem: int, itemsize: int, n_buffers: int) -> int | None:
    """``None`` (dense) for models whose whole state is under 1 MiB, else every 100 steps."""
    return None if n_elem * itemsize * (1 + n_buffers) <= DENSE_AUTO_BYTES else AUTO_CHECKPOINT_EVERY


def _jsonable(v):
    """Hyperparameters as JSON: tuples become lists, tensors numbers, anything else its text."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v if isinstance(v, (int, float, bool, str, type(None))) else str(v)


def _refuse_modules(model: torch.nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training:
            raise RecordingError(f"module '{name}' ({type(m).__name__}) couples the examples of a "
                                 "batch, so its update has no per-example decomposition; remove it "
                                 "or use LayerNorm/GroupNorm")


Split = Union[tuple[model_io.Inputs, torch.Tensor], dict[str, torch.Tensor]]


def _split(name: str, xy: Split, loss: LossSpec) -> tuple[model_io.Inputs, torch.Tensor]:
    """(inputs, labels) of a split given as an (X, y) pair, or as a dict of tensors as Hugging Face batches
    come: its ``labels`` are the labels, else (for the LM loss) its ``input_ids``; for the LM loss, tokens
    outside the ``attention_mask`` get the ignored label ``-100``, as padding must."""
    if isinstance(xy, dict):
        x = {k: v for k, v in xy.items() if k != "labels"}
        if "labels" in xy:
            y = xy["labels"]
        elif loss.sequence and isinstance(xy.get("input_ids"), torch.Tensor):
            y = xy["input_ids"]
        else:
            raise RecordingError(f"split '{name}' is a dict without 'labels'; add them, or pass an (inputs, labels) pair")
    elif isinstance(xy, tuple) and len(xy) == 2:
        x, y = xy
    else:
        raise RecordingError(f"split '{name}' must be an (inputs, labels) pair, or a dict of tensors with 'labels'")
    model_io.parts(x, f"split '{name}'")
    if not isinstance(y, torch.Tensor) or len(y) != model_io.count(x):
        raise RecordingError(f"split '{name}' must hold one label (row) per input item")
    if loss.sequence:
        if y.dim() != 2 or y.dtype.is_floating_point:
            raise RecordingError(f"split '{name}': the LM loss takes token labels of shape (items, positions)")
        mask = x.get("attention_mask") if isinstance(x, dict) else None
        if isinstance(mask, torch.Tensor) and mask.shape == y.shape:
            y = y.masked_fill(mask == 0, IGNORE)
    return x, y


def _record_norm(norms: dict[int, float], p: torch.Tensor) -> None:
    """Post-accumulate grad hook: the gradient's norm as backward() left it, before any clipping."""
    norms[id(p)] = float(p.grad.detach().double().norm())


class Recorder:
    """Record a training run into a zarr trajectory store.

    Call :meth:`step` with the batch's indices into the ``train`` split after every
    ``optimizer.step()``. ``checkpoint_every=None`` stores every state (dense); an
    integer K stores every K-th state and the rest are replayed exactly at query time.
    """

    def __init__(self, path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 *, train: Split, test: Split | None = None,
                 loss: str = "cross_entropy", reduction: str = "mean", output: Adapter | str = "auto",
                 factory: str | None = None, factory_kwargs: dict[str, Any] | None = None,
                 checkpoint_every: int | None | str = "auto", chunk_steps: int = 64, grad_check_every: int = 0,
                 dropout_seed: int | None = None, overwrite: bool = False, **splits: Split):
        self.model, self.optimizer = model, optimizer
        self.spec: OptimizerSpec = spec_from_torch(optimizer)
        self.dropout_seed = int.from_bytes(os.urandom(8), "little") >> 2 if dropout_seed is None else int(dropout_seed)
        self.loss = LossSpec(loss, reduction)
        _refuse_modules(model)
        factory_kwargs = dict(factory_kwargs or {})
        hf = architecture.describe(model) if factory is None else None
        if factory is not None:
            check_factory(factory, factory_kwargs, model)
        elif hf is None:
            factory = derive_factory(model, factory_kwargs)
        self.splits = {name: _split(name, xy, self.loss)
                       for name, xy in {"train": train, **({"test": test} if test is not None else {}), **splits}.items()}
        kinds = {name: model_io.parts(x, f"split '{name}'") for name, (x, _) in self.splits.items()}
        if len({(kind, tuple(named)) for kind, named in kinds.values()}) > 1:
            raise RecordingError("every split must hold the same kind of inputs (the same keys), as the model takes them")
        self.input_kind, named = kinds["train"]
        self.n_train = model_io.count(self.splits["train"][0])

        self._params, entries = self._trainable(model, optimizer)
        self.space = ParamSpace.build(entries)
        self.gidx = self.space.group_index.to(self._params[0].device)
        first = self._params[0]
        self.dtype = first.dtype
        if any(p.dtype != self.dtype for p in self._params):
            raise RecordingError("all trained parameters must share one dtype (float32 or float64)")
        if self.dtype not in (torch.float32, torch.float64):
            raise RecordingError(f"parameters are {self.dtype}; record in float32 or float64")
        itemsize = first.element_size()
        if checkpoint_every == "auto":
            checkpoint_every = default_checkpoint_every(self.space.size, itemsize, len(self.spec.buffers))
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise RecordingError(f"checkpoint_every must be None (dense) or an integer >= 1, "
                                 f"not {checkpoint_every!r}")
        self.dense = checkpoint_every is None
        self.every = 1 if self.dense else checkpoint_every
        self.grad_check_every = grad_check_every
        self.n_steps = 0
        self.closed = False

        self.theta = self._flat_params()
        self.state = self._read_state()
        if self.spec.model.counts_steps and len({int(self._param_state(p).get("step", 0)) for p in self._params}) > 1:
            raise RecordingError("the optimizer's params are at different step counts; record from a "
                                 "fresh optimizer or one whose params all took the same steps")
        constants = [t.detach().clone() for t in self._constants(model)]
        attrs = {
            FORMAT_KEY: FORMAT_VERSION,
            "optimizer": self.spec.to_json(),
            "hyperparameters": [{k: _jsonable(v) for k, v in g.items() if k != "params"}
                                for g in optimizer.param_groups],
            "optimizer_class": type(optimizer).__name__,
            "loss": {"name": self.loss.name, "reduction": self.loss.reduction},
            "factory": factory, "factory_kwargs": factory_kwargs, **({architecture.KEY: hf} if hf else {}),
            "inputs": self.input_kind, "input_keys": list(named),
            "torch_version": torch.__version__, "dtype": str(self.dtype).removeprefix("torch."),
            "params": self.space.to_json(), "constants": self._constant_names(model),
            "checkpoint_every": None if self.dense else self.every, "splits": list(self.splits),
            "n_groups": len(optimizer.param_groups), DROPOUT_SEED: self.dropout_seed,
        }
        self.output = self._adapter(model, output, first)
        attrs.update({"output": self.output, MODEL_FACTS: self._model_facts(model, first)})
        self.n_groups = len(optimizer.param_groups)
        layout = Layout(attrs, self.n_groups, self.space.size, self.dtype, self.spec.buffers, chunk_steps,
                        chunk_steps if self.dense else 1, self.splits, constants)
        self.writer = create_writer(path, layout, overwrite)
        self.writer.add_ckpt(0, self.theta, self.state.bufs, self.state.step, self.state.has_buf)
        self.writer.flush(final=False)
        self._hyper = self._read_hyper()
        self._hyper_at_step = False  # whether the lr scheduler steps after rec.step(), not before it
        self._raw_norms: dict[int, float] = {}
        self._clip: float | None = None
        # the hooks hold only the norms dict: a hook bound to the recorder would keep it (and its
        # store lock) alive for as long as the model lives, even after the user dropped it
        norms = self._raw_norms
        self._hooks = [p.register_post_accumulate_grad_hook(partial(_record_norm, norms)) for p in self._params]
        self.training = dropout.Training(model, self.dropout_seed)

    # -- setup helpers -----------------------------------------------------------------------
    @staticmethod
    def _trainable(model, optimizer):
        names = {id(p): n for n, p in model.named_parameters()}
        params, entries = [], []
        for gi, g in enumerate(optimizer.param_groups):
            for p in g["params"]:
                if not p.requires_grad:
                    continue
                if id(p) not in names:
                    raise RecordingError(f"param group {gi} holds a tensor that is not a parameter of "
                                         "the model; pass the model the optimizer trains")
                params.append(p)
                entries.append((names[id(p)], tuple(p.shape), gi))
        if not params:
            raise RecordingError("the optimizer trains no parameter that requires grad")
        order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
        perm = sorted(range(len(params)), key=lambda i: order[entries[i][0]])
        return [params[i] for i in perm], [entries[i] for i in perm]

    def _constant_names(self, model) -> list[str]:
        trained = set(self.space.names)
        return [n for n, _ in model.named_parameters() if n not in trained] + \
               [n for n, _ in model.named_buffers()]

    def _constants(self, model):
        trained = set(self.space.names)
        return [p for n, p in model.named_parameters() if n not in trained] + [b for _, b in model.named_buffers()]

    def _flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params]).clone()

    def _param_state(self, p) -> dict:
        return self.optimizer.state.get(p, {})

    def _read_state(self) -> OptState:
        bufs, has_buf = {}, False
        for b in self.spec.buffers:
            parts = []
            for p in self._params:
                t = self._param_state(p).get(b)
                has_buf = has_buf or t is not None
                parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if t is None else t.detach().reshape(-1))
            bufs[b] = torch.cat(parts).clone()
        step = int(self._param_state(self._params[0]).get("step", 0)) if self.spec.model.counts_steps else 0
        return OptState(bufs, step, has_buf)

    def _first_item(self, param: torch.Tensor) -> model_io.Inputs:
        return model_io.to(model_io.apply(self.splits["train"][0], lambda t: t[:1]), param.device, param.dtype)

    def _adapter(self, model: torch.nn.Module, output: Adapter | str, param: torch.Tensor) -> Adapter:
        """The adapter from what the model returns to its output tensor (``.logits`` of a ModelOutput)."""
        x = self._first_item(param)
        with torch.no_grad():
            out = self._forward_or_refuse(lambda: model_io.forward(model, x, None))
        return model_io.adapter_for(out, output)

    def _model_facts(self, model: torch.nn.Module, param: torch.Tensor) -> dict:
        """What the planner reads of the model (engine.facts), from one forward pass on the first train item."""
        x = self._first_item(param)
        return self._forward_or_refuse(lambda: measured(lambda: model_io.forward(model, x, self.output)))

    def _forward_or_refuse(self, f):
        """``f()`` (a forward pass on the first item) in eval mode, so that it draws no dropout from the user's RNG."""
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            return f()
        except Exception as exc:  # noqa: BLE001 - the user's forward pass may raise anything
            raise RecordingError(f"the model's forward pass on the first train item failed ({type(exc).__name__}: "
                                 f"{exc}); train must hold the model's inputs") from None
        finally:
            for m, training in modes.items():
                m.training = training

    # -- the loop ----------------------------------------------------------------------------
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the trained params, recording the scale exactly."""
        total = torch.nn.utils.clip_grad_norm_(self._params, max_norm, norm_type=norm_type)
        # the very factor torch multiplied the gradients by (its own dtype and rounding)
        self._clip = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        return total

    def clipped(self, max_norm: float) -> None:
        """Record that the gradients were clipped (elsewhere: a Trainer) to total 2-norm ``max_norm``: the scale
        ``torch.nn.utils.clip_grad_norm_`` applied, from the norms backward() left (before the clip)."""
        total = math.sqrt(sum(n * n for n in self._raw_norms.values()))
        self._clip = min(1.0, max_norm / (total + 1e-6))

    def step(self, batch_indices, loss: float | torch.Tensor | None = None, clip: float | None = None,
             weight: float | None = None) -> None:
        """Record the update just taken by ``optimizer.step()`` on the batch ``batch_indices``.

        ``weight``: each example's weight in the batch loss, where the loop divides by something other than the
        loss's own reduction (a Trainer's ``num_items_in_batch``); the gradient check holds it to training's."""
        if self.closed:
            raise RecordingError("the recorder is closed; build a new Recorder to record more steps")
        s = self.n_steps
        idx = self._indices(s, batch_indices)
        if idx.numel() == 0:
            raise RecordingError(f"step {s}: empty batch")
        if int(idx.min()) < 0 or int(idx.max()) >= self.n_train:
            raise RecordingError(f"step {s}: batch indices must lie in 0..{self.n_train - 1} (the train split)")
        c = self._clip if clip is None else float(clip)
        c = 1.0 if c is None else c
        if not (math.isfinite(c) and c > 0):
            raise RecordingError(f"step {s}: clip scale {c!r} is not a positive finite number")
        self._same_params(s)
        grad = self._flat_grad(s, c)
        changed = static_mismatch(self.spec, self.optimizer)
        if changed:
            raise VerificationError(f"step {s}: {changed}; only lr and weight_decay may change during a run")
        theta_new = self._flat_params()
        real_state = self._read_state()
        loss_value = math.nan if loss is None else float(torch.as_tensor(loss).detach())
        self._refuse_nonfinite(s, loss, loss_value, grad, theta_new)
        lr, wd = self._hyper_used(s, grad, theta_new)
        weight = self.loss.weight(self.splits["train"][1][idx]) if weight is None else float(weight)
        if self.grad_check_every >= 0 and (s == 0 or (self.grad_check_every and s % self.grad_check_every == 0)):
            self._check_gradient(s, idx, grad / c, weight)
        self.writer.add_step({"loss": loss_value, "clip": c, "weight": weight,
                              "lr": lr, "weight_decay": wd}, idx.numpy())
        if self.training.fired:
            self.writer.set_attr(STOCHASTIC, True)
        self.training.next_step(s + 1, len(idx))
        self.n_steps = s + 1
        self.theta, self.state = theta_new, real_state
        if self.n_steps % self.every == 0:
            self.writer.add_ckpt(self.n_steps, theta_new, real_state.bufs, real_state.step, real_state.has_buf)
        self.writer.maybe_flush()
        self._clip = None
        self._raw_norms.clear()
        self._hyper = self._read_hyper()

    @staticmethod
    def _indices(s: int, batch_indices) -> torch.Tensor:
        """The batch as int64 indices; anything but integers (floats, strings, bools) is refused."""
        try:
            idx = torch.as_tensor(batch_indices)
        except (TypeError, ValueError, RuntimeError):
            raise RecordingError(f"step {s}: batch indices must be integers into the train split, not "
                                 f"{type(batch_indices).__name__} {str(batch_indices)[:40]!r}") from None
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise RecordingError(f"step {s}: batch indices must be integers into the train split, not "
                                 f"{idx.dtype} (a float index would be truncated; pass a LongTensor)")
        return idx.reshape(-1).long().cpu()

    def _same_params(self, s: int) -> None:
        """The optimizer still trains exactly the params the recording started with."""
        now = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        if len(self.optimizer.param_groups) != self.n_groups or {id(p) for p in now} != {id(p) for p in self._params}:
            raise RecordingError(f"step {s}: the optimizer's param groups changed since recording began "
                                 "(add_param_group, or a param (un)frozen); a run must train one fixed "
                                 "set of params: start a new Recorder for the new set")

    def _refuse_nonfinite(self, s: int, loss, loss_value: float, grad: torch.Tensor, theta: torch.Tensor) -> None:
        if loss is not None and not math.isfinite(loss_value):
            raise RecordingError(f"step {s}: the loss is {loss_value}; a run with non-finite values "
                                 "cannot be decomposed (lower the lr, or clip)")
        for what, t in (("gradient", grad), ("updated parameters", theta)):
            bad = ~torch.isfinite(t)
            if bool(bad.any()):
                k = int(bad.nonzero()[0])
                name = next(i.name for i in self.space.params if i.offset <= k < i.stop)
                raise RecordingError(f"step {s}: the {what} of '{name}' hold NaN or inf; a run with "
                                     "non-finite values cannot be decomposed (lower the lr, or clip)")

    def _read_hyper(self) -> tuple[list[float], list[float]]:
        groups = self.optimizer.param_groups
        return [float(g["lr"]) for g in groups], [float(g.get("weight_decay", 0.0)) for g in groups]

    def _hyper_used(self, s: int, grad: torch.Tensor, theta_new: torch.Tensor) -> tuple[list[float], list[float]]:
        """The lr and weight decay that optimizer.step() used, verified against the real update.

        A scheduler stepped before rec.step() has already moved them on: then they are the ones
        read after the previous rec.step(). Stepped after rec.step(), they are the current ones.
        The order that verifies is tried first from then on, so a step models one update.
        """
        before, now = self._hyper, self._read_hyper()
        first, second = (now, before) if self._hyper_at_step else (before, now)
        try:
            self._verify(s, theta_new, self._modelled(first, grad))
            used = first
        except VerificationError:
            if first == second:
                raise
            self._verify(s, theta_new, self._modelled(second, grad))
            used = second
        self._hyper_at_step = used is now
        return used

    def _modelled(self, hyper: tuple[list[float], list[float]], grad: torch.Tensor) -> torch.Tensor:
        _, _, delta = advance(self.spec, self.gidx, *hyper, self.theta.double(), grad.double(),
                              self.state.to(torch.float64))
        return self.theta.double() + delta

    def _flat_grad(self, s: int, c: float) -> torch.Tensor:
        parts = []
        for p, info in zip(self._params, self.space.params):
            name = info.name
            if p.grad is None:
                raise RecordingError(f"step {s}: param '{name}' got no gradient; freeze it "
                                     "(requires_grad=False) before building the Recorder")
            if p.grad.is_sparse:
                raise RecordingError(f"step {s}: param '{name}' has a sparse gradient; use dense embeddings")
            raw = self._raw_norms.get(id(p))
            seen = float(p.grad.detach().double().norm())
            if raw is not None and raw > 0 and abs(seen / raw - c) > 1e-4 * max(1.0, c):
                raise VerificationError(
                    f"step {s}: gradients of '{name}' were rescaled by {seen / raw:.6g} after backward() "
                    f"but the recorded clip scale is {c:.6g}; clip with rec.clip_grad_norm_(max_norm) "
                    "or pass clip= to rec.step")
            parts.append(p.grad.detach().reshape(-1))
        return torch.cat(parts)

    def _verify(self, s: int, real: torch.Tensor, modelled: torch.Tensor) -> None:
        rtol = 1e-9 if self.dtype == torch.float64 else 2e-4
        eps = torch.finfo(self.dtype).eps
        real64 = real.double()
        for info in self.space.params:
            sl = slice(info.offset, info.stop)
            dr = real64[sl] - self.theta[sl].double()
            err = ((modelled[sl] - real64[sl]).abs() - 4 * eps * real64[sl].abs()).clamp_min(0).max()
            scale = float(dr.abs().max())
            if float(err) > rtol * scale + 1e-300 and scale == 0:
                raise VerificationError(
                    f"step {s}: '{info.name}' did not change since the last rec.step() although the "
                    f"{self.spec.cls} model predicts an update; call rec.step() once after each "
                    "optimizer.step(), not twice")
            if float(err) > rtol * scale + 1e-300:
                raise VerificationError(
                    f"step {s}: the {self.spec.cls} model does not reproduce the update of '{info.name}' "
                    f"(max error {float(err):.3g}, {float(err) / max(scale, 1e-300):.2%} of the update); "
                    "a hyperparameter changed, a clip went unrecorded or an unsupported option is in use")

    def _check_gradient(self, s: int, idx: torch.Tensor, raw_grad: torch.Tensor, weight: float) -> None:
        """Recompute the batch gradient from the recorded batch and loss; it must match training's."""
        x, y = self.splits["train"]
        dev = self._params[0].device
        theta = self.theta.to(dev).requires_grad_(True)
        named = self.space.unflatten(theta)
        masks = self.training.replay(s, len(idx))
        self.training.paused = True
        try:
            with torch.enable_grad(), masks:
                out = model_io.call(self.model, named, model_io.to(model_io.apply(x, lambda t: t[idx]), dev,
                                                                   self.dtype), self.output)
                total = (self.loss.per_example(out, y[idx].to(dev)) * weight).sum()
                (g,) = torch.autograd.grad(total, theta)
        finally:
            self.training.paused = False
        err = float((g.detach().cpu().double() - raw_grad.cpu().double()).abs().max())
        scale = float(raw_grad.abs().max())
        # Hugging Face computes its LM loss in float32 whatever the model's dtype (it upcasts the logits), so a
        # float64 model's training gradient carries float32 rounding there
        exact = self.dtype == torch.float64 and not self.loss.sequence
        tol = (1e-8 if exact else 1e-6 if self.dtype == torch.float64 else 1e-3) * scale + 1e-12
        if err > tol:
            raise VerificationError(
                f"step {s}: the gradient rebuilt from the recorded batch and loss "
                f"'{self.loss.name}' ({self.loss.reduction}) differs from training's by {err:.3g} "
                f"(max |g| {scale:.3g}); pass the batch's indices, the loss and the reduction "
                "that training used")

    def close(self) -> None:
        """Store the final state, flush everything, and mark the run closed."""
        if self.closed:
            return
        if self.n_steps % self.every:
            self.writer.add_ckpt(self.n_steps, self.theta, self.state.bufs, self.state.step, self.state.has_buf)
        self.writer.flush(final=True)
        for h in self._hooks:
            h.remove()
        self.training.remove()
        self.closed = True

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Recorder", "default_checkpoint_every"]
