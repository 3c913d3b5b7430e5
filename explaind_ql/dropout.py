"""Dropout that a query replays exactly: each mask is a hash of (run seed, step, item, site, position).

Per-example terms need each training example's gradient with the masks the real update
used. torch's RNG cannot give them back: its masks depend on the batch's shape, the device,
and every draw before them. So while recording, every training forward runs under
:class:`Masks`, which draws each dropout mask from a counter-based hash of the run's seed,
the step, the item's position in the step's batch, the dropout call's place in the forward,
and the element's coordinates. A query rebuilds any item's mask alone (under ``vmap``, on
any device, in any dtype, at any padding length), and the masks are as random as torch's.

Only dropout is replayable: any other random draw in a training forward is refused by name.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import model_io
from .errors import RecordingError

DROPOUT_SEED = "dropout_seed"  # store attributes: the run's mask seed, and whether any training forward drew masks
STOCHASTIC = "stochastic"
_M64 = 1 << 64


def _signed(c: int) -> int:
    return c - _M64 if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_C1, _C2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping products; shifts made logical by masking)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _C1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _C2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _wrap(c: int) -> int:
    return _signed(c % _M64)


def step_seed(seed: int, step: int) -> int:
    """The seed of one update step's masks."""
    return int(_mix(torch.tensor([_wrap(seed * 1_000_003 + step)], dtype=torch.int64)))


DROPOUT = {F.dropout: 0, F.dropout1d: 2, F.dropout2d: 2, F.dropout3d: 2}  # func → coordinates drawn (0: all)
RANDOM = {torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like,
          torch.randperm, torch.bernoulli, torch.normal, torch.multinomial, torch.poisson, torch.Tensor.bernoulli_,
          torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.random_, torch.Tensor.exponential_,
          F.alpha_dropout, F.feature_alpha_dropout, F.rrelu}


class Masks(TorchFunctionMode):
    """A training forward (or its replay) with every dropout mask drawn from :func:`keep`.

    ``rows`` (B,) are the positions of the forward's items in the step's batch: the masks of an
    item do not depend on which others share its forward.
    """

    def __init__(self, seed: int, rows: torch.Tensor):
        super().__init__()
        self.seed, self.rows, self.site, self.fired = seed, rows, 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DROPOUT:
            return self._dropout(func, *args, **kwargs)
        if func is F.scaled_dot_product_attention and _arg(args, kwargs, 4, "dropout_p", 0.0) > 0:
            return _attention(self, *args, **kwargs)
        if func in RANDOM and not (func is F.rrelu and not _arg(args, kwargs, 3, "training", False)):
            raise RecordingError(f"the model's training forward draws random numbers with {_name(func)}; only "
                                 "dropout can be replayed exactly: remove it or make it deterministic")
        return func(*args, **kwargs)

    def _dropout(self, func, x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        return x * (self.keep(x, p, DROPOUT[func]).to(x.dtype) / (1 - p))

    def keep(self, x: torch.Tensor, p: float, coords: int = 0) -> torch.Tensor:
        """The mask of one dropout call on ``x`` (first axis: the forward's items): True where kept.

        ``coords``: how many leading axes the mask varies over (channel dropout: 2), 0 for all."""
        if x.dim() == 0 or x.shape[0] != self.rows.shape[0]:
            raise RecordingError(f"dropout on a tensor of shape {tuple(x.shape)} whose first axis is not the "
                                 f"forward's {self.rows.shape[0]} items; only dropout over per-item tensors can "
                                 "be replayed")
        self.fired, site = True, self.site
        self.site += 1
        n = x.dim() if coords == 0 else coords
        h = _mix(self.rows.to(x.device) * _GOLDEN + _wrap(self.seed ^ _wrap(site * _GOLDEN)))
        for axis in range(1, n):
            h = _mix(h.unsqueeze(-1) + torch.arange(x.shape[axis], device=x.device) * _GOLDEN)
        h = h.reshape(*h.shape, *([1] * (x.dim() - n)))
        u = ((h >> 11) & ((1 << 53) - 1)).to(torch.float64) * 2.0 ** -53
        return u >= p


def replaying(seed: int | None, step: int, n: int) -> contextlib.AbstractContextManager:
    """One forward of step ``step``'s ``n`` items, in order, with the masks their training forwards drew (``seed``:
    the run's; None: a run that drew none)."""
    return contextlib.nullcontext() if seed is None else Masks(step_seed(seed, step), torch.arange(n))


def _arg(args, kwargs, pos: int, name: str, default):
    return kwargs.get(name, args[pos] if len(args) > pos else default)


def _name(func) -> str:
    name = getattr(func, "__name__", str(func))
    return f"Tensor.{name}" if getattr(torch.Tensor, name, None) is func else f"torch.{name}"


def _attention(masks: Masks | None, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    """Scaled dot-product attention written out (what torch's math path computes), its dropout drawn by ``masks``:
    torch.func transforms it as any other ops, where its fused kernels have no batching rule."""
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool,
                                                device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    attn = scores.softmax(-1)
    return (attn if masks is None else masks._dropout(F.dropout, attn, dropout_p)) @ v


class Attention(TorchFunctionMode):
    """Scaled dot-product attention as :func:`_attention` (the query side's, which vmap must batch); with dropout
    left to the :class:`Masks` outside, which replays it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and not _arg(args, kwargs, 4, "dropout_p", 0.0) > 0:
            return _attention(None, *args, **kwargs)
        return func(*args, **kwargs)


class Training:
    """The recorder's view of the training forwards of one step: each runs under :class:`Masks`.

    Installed as forward hooks on the model's root (they hold this object, never the recorder).
    The items of a step's forwards are numbered in order, so gradient accumulation's
    micro-batches draw the masks of their place in the step's batch.
    """

    def __init__(self, model: torch.nn.Module, seed: int):
        self.seed, self.step, self.items, self.paused = seed, 0, 0, False
        self.fired = False  # whether a forward of this step drew masks
        self._open: list[Masks] = []
        self.hooks = [model.register_forward_pre_hook(self._enter, with_kwargs=True),
                      model.register_forward_hook(self._exit, with_kwargs=True, always_call=True)]

    def _enter(self, module, args, kwargs):
        if self.paused or not module.training:
            self._open.append(None)
            return
        n = model_io.count((args, kwargs))
        masks = Masks(step_seed(self.seed, self.step), torch.arange(self.items, self.items + n))
        self.items += n
        masks.__enter__()
        self._open.append(masks)

    def _exit(self, module, args, kwargs, out):
        masks = self._open.pop()
        if masks is not None:
            masks.__exit__(None, None, None)
            self.fired = self.fired or masks.fired

    def next_step(self, step: int, batch_size: int) -> None:
        """Close step ``step - 1``, whose forwards must have run exactly its batch when they drew masks."""
        if self.fired and self.items != batch_size:
            raise RecordingError(f"step {step - 1}: the model ran {self.items} items in training mode since the last "
                                 f"rec.step() but the batch has {batch_size}; with dropout, every item of the batch "
                                 "must go through exactly one training forward (use model.eval() for other passes)")
        self.step, self.items, self.fired = step, 0, False

    def replay(self, step: int, n: int) -> contextlib.AbstractContextManager:
        """The masks this step's forwards drew for its ``n`` items, for one forward of all of them (if they drew any)."""
        return replaying(self.seed if self.fired else None, step, n)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
