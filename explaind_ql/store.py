"""The trajectory store: one zarr store written through xarray by a single appending writer.

Layout (format version 1), all on three appendable dimensions:

- ``ckpt``: stored states. ``ckpt_state`` is the state index s (θ_s is the parameters
  *before* update step s; θ_N is the final state). ``theta(ckpt, element)`` and the
  optimizer buffers ``opt_<name>(ckpt, element)``, ``opt_step(ckpt)``, ``opt_has_buf(ckpt)``.
  Dense runs store every state; checkpointed runs every K-th plus the last.
- ``step``: one row per update: ``lr``/``weight_decay`` ``(step, group)``, ``loss``, ``clip``,
  ``weight`` (w_{s,k}, uniform within a batch), ``batch_start``, ``batch_size``.
- ``sample``: the batches end to end, ``batch_index(sample)``.

Plus the splits (``x_<split>``, ``y_<split>``), the model's constant tensors
(``const_<i>``) and attrs. The writer appends whole chunks only (xarray issues #8876,
#8882) and, after each append, commits the number of complete steps in the root attrs
(zarr writes metadata atomically); readers ignore anything past the commit, which is
why a SIGKILLed recording still opens.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import zarr

from .errors import StoreError

FORMAT_VERSION = 1
FORMAT_KEY = "explaind_format"
ELEMENT_CHUNK_BYTES = 8 << 20
STATE_CHUNK_BYTES = 256 << 10  # stored states per chunk: reading one decodes its whole chunk
SAMPLE_CHUNK_MAX = 1 << 20


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@dataclass
class PendingRows:
    """Rows buffered by the writer until they fill a whole chunk."""

    steps: list[dict] = field(default_factory=list)
    samples: list[np.ndarray] = field(default_factory=list)
    ckpts: list[dict] = field(default_factory=list)

    @property
    def n_samples(self) -> int:
        return sum(len(s) for s in self.samples)


class StoreWriter:
    """Append-only writer. Steps, samples and checkpoint rows are flushed in whole chunks."""

    def __init__(self, path: str | os.PathLike, attrs: dict, n_groups: int, n_elem: int,
                 dtype: torch.dtype, buffers: tuple[str, ...], chunk_steps: int, ckpt_flush: int,
                 splits: dict[str, tuple[torch.Tensor, torch.Tensor]], constants: list[torch.Tensor],
                 overwrite: bool):
        self.path = Path(path)
        if self.path.exists():
            if not overwrite:
                raise StoreError(f"{self.path} already exists; choose a new path or pass overwrite=True")
            shutil.rmtree(self.path)
        self.n_groups, self.n_elem, self.buffers = n_groups, n_elem, buffers
        itemsize = torch.empty((), dtype=dtype).element_size()
        # rows are buffered ckpt_flush at a time, and stored in chunks of as many states as fit
        # STATE_CHUNK_BYTES: a query reading one state (θ_0, a checkpoint) then decodes little
        self.chunk_steps, self.ckpt_flush = chunk_steps, ckpt_flush
        self.ckpt_chunk = max(1, min(ckpt_flush, STATE_CHUNK_BYTES // max(1, itemsize * n_elem)))
        self.elem_chunk = int(max(1024, min(n_elem, ELEMENT_CHUNK_BYTES // (itemsize * self.ckpt_chunk))))
        self.pending = PendingRows()
        self.written_steps = 0
        self.written_samples = 0
        self.written_ckpts = 0
        self._created: set[str] = set()
        self._batch_ends: list[int] = []
        self.sample_chunk = 0  # fixed by the first batch: chunk_steps batches of its size
        data = {}
        for name, (x, y) in splits.items():
            data[f"x_{name}"] = xr.Variable([f"{name}_item"] + [f"x_{name}_{i}" for i in range(1, x.dim())], _np(x))
            data[f"y_{name}"] = xr.Variable([f"{name}_item"] + [f"y_{name}_{i}" for i in range(1, y.dim())], _np(y))
        for i, c in enumerate(constants):
            data[f"const_{i}"] = xr.Variable([f"const_{i}_{d}" for d in range(c.dim())], _np(c))
        self.attrs = attrs  # xarray's appends reset the root attrs; every commit rewrites them whole
        ds = xr.Dataset(data, attrs={**attrs, "committed_steps": 0, "committed_ckpts": 0, "closed": False})
        ds.to_zarr(self.path, mode="w", consolidated=False)

    # -- buffering ---------------------------------------------------------------------------
    def add_step(self, row: dict, batch: np.ndarray) -> None:
        if not self.sample_chunk:
            self.sample_chunk = int(min(SAMPLE_CHUNK_MAX, max(1, len(batch) * self.chunk_steps)))
        row = dict(row, batch_start=self.written_samples + self.pending.n_samples, batch_size=len(batch))
        self.pending.steps.append(row)
        self._batch_ends.append(row["batch_start"] + len(batch))
        self.pending.samples.append(batch.astype(np.int64))

    def add_ckpt(self, state: int, theta: torch.Tensor, bufs: dict[str, torch.Tensor], opt_step: int,
                 has_buf: bool) -> None:
        self.pending.ckpts.append({"state": state, "theta": _np(theta),
                                   **{f"opt_{b}": _np(bufs[b]) for b in self.buffers},
                                   "opt_step": opt_step, "opt_has_buf": has_buf})

    def maybe_flush(self) -> None:
        if len(self.pending.steps) >= self.chunk_steps or len(self.pending.ckpts) >= self.ckpt_flush:
            self.flush(final=False)

    # -- writing -----------------------------------------------------------------------------
    def _append(self, ds: xr.Dataset, dim: str, chunks: dict[str, tuple[int, ...]]) -> None:
        names = set(ds.data_vars)
        if not names & self._created:
            enc = {v: {"chunks": chunks[v]} for v in ds.data_vars}
            ds.to_zarr(self.path, mode="a", consolidated=False, encoding=enc)
            self._created |= names
        else:
            ds.to_zarr(self.path, mode="a", append_dim=dim, consolidated=False)

    def flush(self, final: bool) -> None:
        """Write whole chunks (everything if ``final``), then commit the complete-step count."""
        p = self.pending
        n_ck = len(p.ckpts) if final else (len(p.ckpts) // self.ckpt_chunk) * self.ckpt_chunk
        if n_ck:
            rows, p.ckpts = p.ckpts[:n_ck], p.ckpts[n_ck:]
            data = {"ckpt_state": ("ckpt", np.array([r["state"] for r in rows], np.int64)),
                    "opt_step": ("ckpt", np.array([r["opt_step"] for r in rows], np.int64)),
                    "opt_has_buf": ("ckpt", np.array([r["opt_has_buf"] for r in rows], bool))}
            for key in ["theta"] + [f"opt_{b}" for b in self.buffers]:
                data[key] = (("ckpt", "element"), np.stack([r[key] for r in rows]))
            chunks = {k: (self.ckpt_chunk, self.elem_chunk) if len(v[0]) == 2 else (self.ckpt_chunk,)
                      for k, v in data.items()}
            self._append(xr.Dataset(data), "ckpt", chunks)
            self.written_ckpts += n_ck
        all_samples = np.concatenate(p.samples) if p.samples else np.zeros(0, np.int64)
        chunk = max(1, self.sample_chunk)
        n_sa = len(all_samples) if final else (len(all_samples) // chunk) * chunk
        if n_sa:
            self._append(xr.Dataset({"batch_index": ("sample", all_samples[:n_sa])}), "sample",
                         {"batch_index": (chunk,)})
            self.written_samples += n_sa
        p.samples = [all_samples[n_sa:]] if n_sa < len(all_samples) else []
        n_st = len(p.steps) if final else (len(p.steps) // self.chunk_steps) * self.chunk_steps
        if n_st:
            rows, p.steps = p.steps[:n_st], p.steps[n_st:]
            data = {k: ("step", np.array([r[k] for r in rows])) for k in
                    ("loss", "clip", "weight", "batch_start", "batch_size")}
            for k in ("lr", "weight_decay"):
                data[k] = (("step", "group"), np.array([r[k] for r in rows], np.float64))
            chunks = {k: (self.chunk_steps, self.n_groups) if k in ("lr", "weight_decay")
                      else (self.chunk_steps,) for k in data}
            self._append(xr.Dataset(data), "step", chunks)
            self.written_steps += n_st
        self._commit(closed=final)

    def _commit(self, closed: bool) -> None:
        """Count the steps whose rows and samples are all on disk, and publish that number."""
        ends = np.asarray(self._batch_ends[: self.written_steps])
        complete = int(np.searchsorted(ends, self.written_samples, side="right"))
        zarr.open_group(str(self.path), mode="r+").attrs.put({**self.attrs, "committed_steps": complete, "committed_ckpts": self.written_ckpts, "closed": closed})


# ---------------------------------------------------------------------------------------------
# reading

def open_dataset(path: str | os.PathLike) -> tuple[xr.Dataset, dict]:
    """Open a store, checking format and commit, with one-line errors for every failure."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"no run at {p}: the path does not exist; record one with explaind_ql.Recorder")
    try:
        attrs = dict(zarr.open_group(str(p), mode="r").attrs)
    except Exception as exc:  # zarr raises many kinds for damaged metadata
        raise StoreError(f"{p} is not a readable zarr store ({type(exc).__name__}); it is "
                         "corrupted or not an explaind_ql run") from None
    version = attrs.get(FORMAT_KEY)
    if version is None:
        raise StoreError(f"{p} is a zarr store but not an explaind_ql run (no '{FORMAT_KEY}' attribute)")
    if int(version) > FORMAT_VERSION:
        raise StoreError(f"{p} was written in store format {version}, newer than this explaind_ql "
                         f"(format {FORMAT_VERSION}); upgrade explaind_ql to read it")
    try:
        ds = xr.open_zarr(p, consolidated=False, chunks=None)
    except Exception as exc:
        raise StoreError(f"{p} is truncated or corrupted ({type(exc).__name__}: {exc}); "
                         "re-record the run") from None
    if int(attrs.get("committed_ckpts", 0)) < 1 or "theta" not in ds:
        raise StoreError(f"{p} holds no committed state (the recording died before its first "
                         "checkpoint was written); re-record the run")
    return ds, attrs

