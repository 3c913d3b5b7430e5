"""What a trajectory store is, whatever holds its bytes: the layout, and the reader and writer
protocols that the recorder, the run and ``verify`` call.

Layout (format version 2), named arrays on three appendable dimensions:

- ``ckpt``: stored states. ``ckpt_state`` is the state index s (θ_s is the parameters
  *before* update step s; θ_N is the final state). ``theta(ckpt, element)`` and the
  optimizer buffers ``opt_<name>(ckpt, element)``, ``opt_step(ckpt)``, ``opt_has_buf(ckpt)``.
  Dense runs store every state; checkpointed runs every K-th plus the last.
- ``step``: one row per update: ``lr``/``weight_decay`` ``(step, group)``, ``loss``, ``clip``,
  ``weight`` (w_{s,k}, uniform within a batch), ``batch_start``, ``batch_size``.
- ``sample``: the batches end to end, ``batch_index(sample)``.

Plus the splits (``x_<split>``, ``y_<split>``; inputs that are a dict or tuple of tensors store
one ``x_<split>__<key>`` each, named by the ``inputs`` and ``input_keys`` attrs), the model's constant tensors
(``const_<i>``) and the root attrs, which carry the commit (``committed_steps``,
``committed_ckpts``, ``closed``).

A backend guarantees (docs/store.md): data first and commit last, so a store killed at any
instant opens at its last commit; a reader sees only the committed prefix; every chunk a
read needs is checked to exist and to decode, so damage is a ``StoreError``, never data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..model_io import Inputs

FORMAT_VERSION = 2
FORMAT_KEY = "explaind_format"


def input_array(split: str, key: str) -> str:
    """The array of one input tensor of a split (``key`` is '' for a plain tensor input)."""
    return f"x_{split}__{key}" if key else f"x_{split}"


@dataclass(frozen=True)
class Layout:
    """What a writer must know before the first row: the root attrs and the arrays' shapes."""

    attrs: dict
    n_groups: int
    n_elem: int
    dtype: torch.dtype
    buffers: tuple[str, ...]
    chunk_steps: int  # step rows per flush
    ckpt_flush: int  # state rows per flush
    splits: dict[str, tuple[Inputs, torch.Tensor]]
    constants: list[torch.Tensor]


class Writer(Protocol):
    """One appending writer, holding the store's lock until ``flush(final=True)``."""

    def add_step(self, row: dict, batch: np.ndarray) -> None:
        """Buffer one update row and its batch's sample indices."""

    def add_ckpt(self, state: int, theta: torch.Tensor, bufs: dict[str, torch.Tensor], opt_step: int,
                 has_buf: bool) -> None:
        """Buffer one stored state."""

    def set_attr(self, key: str, value) -> None:
        """Set a root attribute, written with the next commit."""

    def maybe_flush(self) -> None:
        """Write and commit what fills whole chunks."""

    def flush(self, final: bool) -> None:
        """Write whole chunks (everything if ``final``), then commit; ``final`` releases the lock."""


class Reader(Protocol):
    """The committed prefix of a store, read array by array."""

    path: Path
    attrs: dict
    n_steps: int
    n_ckpts: int

    @property
    def n_samples(self) -> int:
        """Samples of the committed steps' batches."""

    def __contains__(self, name: str) -> bool: ...

    def names(self) -> list[str]:
        """Every array on disk."""

    def read(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """``name``'s committed rows (or the given ``rows`` of them), checked and decoded."""

    def committed_rows(self, name: str) -> int:
        """How many leading rows of ``name`` are committed (all of a split or constant)."""

    def missing_chunks(self, name: str, rows: np.ndarray | None = None) -> list[str]:
        """Keys of the chunks that ``rows`` of ``name`` need but that are not on disk."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def chunks(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> np.dtype: ...

