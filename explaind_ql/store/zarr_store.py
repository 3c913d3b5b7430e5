"""The zarr backend: one zarr v3 directory written through xarray by a single appending writer.

How it keeps :mod:`.base`'s guarantees (docs/store.md):

- **Commit last.** The writer appends whole chunks only (xarray issues #8876, #8882) and
  then publishes the number of complete steps in the root attrs, one atomic metadata
  write (zarr's local store writes every key through a rename). xarray's appends rewrite
  the root attrs too, so each append carries the previous commit: on disk the attrs are
  never empty, and a store killed at any instant opens at its last commit. Readers read
  arrays one by one through zarr, each up to the commit, so a reader during appends sees
  a consistent prefix.
- **Integrity.** Every chunk carries a crc32c checksum (zarr v3's ``crc32c`` codec) checked
  on each read, every chunk is written even when it holds only zeros, and a read checks
  that each chunk it needs exists, so fill values are never read as data.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from ..errors import DamagedStoreError, StoreError
from ..model_io import parts
from .base import FORMAT_KEY, FORMAT_VERSION, Layout, input_array
from .lock import WriterLock

ELEMENT_CHUNK_BYTES = 8 << 20
STATE_CHUNK_BYTES = 256 << 10  # stored states per chunk: reading one decodes its whole chunk
SAMPLE_CHUNK_MAX = 1 << 20


CODECS = {"compressors": (ZstdCodec(), Crc32cCodec())}


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


class ZarrWriter:
    """Append-only writer. Steps, samples and checkpoint rows are flushed in whole chunks."""

    def __init__(self, path: str | os.PathLike, layout: Layout, overwrite: bool):
        self.path = Path(path)
        self.lock = WriterLock(self.path, self)
        if self.path.exists():
            if not overwrite:
                self.lock.release()
                raise StoreError(f"{self.path} already exists; choose a new path or pass overwrite=True")
            shutil.rmtree(self.path)
        self.n_groups, self.n_elem, self.buffers = layout.n_groups, layout.n_elem, layout.buffers
        chunk_steps, ckpt_flush, n_elem = layout.chunk_steps, layout.ckpt_flush, layout.n_elem
        itemsize = torch.empty((), dtype=layout.dtype).element_size()
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
        for name, (x, y) in layout.splits.items():
            for key, t in parts(x, f"split '{name}'")[1].items():
                var = input_array(name, key)
                data[var] = xr.Variable([f"{name}_item"] + [f"{var}_{i}" for i in range(1, t.dim())], _np(t))
            data[f"y_{name}"] = xr.Variable([f"{name}_item"] + [f"y_{name}_{i}" for i in range(1, y.dim())], _np(y))
        for i, c in enumerate(layout.constants):
            data[f"const_{i}"] = xr.Variable([f"const_{i}_{d}" for d in range(c.dim())], _np(c))
        self.attrs = layout.attrs
        self.commit = {"committed_steps": 0, "committed_ckpts": 0, "closed": False}
        ds = xr.Dataset(data, attrs=self._root_attrs())
        ds.to_zarr(self.path, mode="w", consolidated=False, write_empty_chunks=True,
                   encoding={v: dict(CODECS) for v in data})

    def _root_attrs(self) -> dict:
        return {**self.attrs, **self.commit}

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

    def set_attr(self, key: str, value) -> None:
        self.attrs = {**self.attrs, key: value}

    def maybe_flush(self) -> None:
        if len(self.pending.steps) >= self.chunk_steps or len(self.pending.ckpts) >= self.ckpt_flush:
            self.flush(final=False)

    # -- writing -----------------------------------------------------------------------------
    def _append(self, ds: xr.Dataset, dim: str, chunks: dict[str, tuple[int, ...]]) -> None:
        # xarray rewrites the root attrs on every append: give it the last commit, never nothing
        ds.attrs = self._root_attrs()
        names = set(ds.data_vars)
        if not names & self._created:
            enc = {v: {"chunks": chunks[v], **CODECS} for v in ds.data_vars}
            ds.to_zarr(self.path, mode="a", consolidated=False, encoding=enc, write_empty_chunks=True)
            self._created |= names
        else:
            ds.to_zarr(self.path, mode="a", append_dim=dim, consolidated=False, write_empty_chunks=True)

    def flush(self, final: bool) -> None:
        """Write whole chunks (everything if ``final``), then commit the complete-step count."""
        p = self.pending
        n_ck = len(p.ckpts) if final else (len(p.ckpts) // self.ckpt_chunk) * self.ckpt_chunk
        if n_ck:
            rows, p.ckpts = p.ckpts[:n_ck], p.ckpts[n_ck:]
            data: dict[str, tuple[tuple[str, ...], np.ndarray]] = {
                "ckpt_state": (("ckpt",), np.array([r["state"] for r in rows], np.int64)),
                "opt_step": (("ckpt",), np.array([r["opt_step"] for r in rows], np.int64)),
                "opt_has_buf": (("ckpt",), np.array([r["opt_has_buf"] for r in rows], bool))}
            for key in ["theta"] + [f"opt_{b}" for b in self.buffers]:
                data[key] = (("ckpt", "element"), np.stack([r[key] for r in rows]))
            chunks: dict[str, tuple[int, ...]] = {
                k: (self.ckpt_chunk, self.elem_chunk) if len(v[0]) == 2 else (self.ckpt_chunk,)
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
            data = {k: (("step",), np.array([r[k] for r in rows])) for k in
                    ("loss", "clip", "weight", "batch_start", "batch_size")}
            for k in ("lr", "weight_decay"):
                data[k] = (("step", "group"), np.array([r[k] for r in rows], np.float64))
            chunks = {k: (self.chunk_steps, self.n_groups) if k in ("lr", "weight_decay")
                      else (self.chunk_steps,) for k in data}
            self._append(xr.Dataset(data), "step", chunks)
            self.written_steps += n_st
        self._commit(closed=final)
        if final:
            self.lock.release()

    def _commit(self, closed: bool) -> None:
        """Count the steps whose rows and samples are all on disk, and publish that number."""
        ends = np.asarray(self._batch_ends[: self.written_steps])
        complete = int(np.searchsorted(ends, self.written_samples, side="right"))
        self.commit = {"committed_steps": complete, "committed_ckpts": self.written_ckpts, "closed": closed}
        zarr.open_group(str(self.path), mode="r+").attrs.put(self._root_attrs())


# ---------------------------------------------------------------------------------------------
# reading

def _count(attrs: dict, key: str, p: Path) -> int:
    v = attrs.get(key, 0)
    if type(v) is not int or v < 0:
        raise StoreError(f"{p} has a damaged commit record ('{key}' is {v!r}, not a count); "
                         "run `explaind-ql verify` on it, then re-record the run")
    return v


class ZarrReader:
    """The committed prefix of a store, read array by array through zarr.

    Each read checks that every chunk it touches exists (zarr would return fill values for
    a missing one) and turns a failed decode (checksum, truncated chunk) into a StoreError
    that names the array.
    """

    def __init__(self, path: str | os.PathLike):
        p = self.path = Path(path)
        if not p.exists():
            raise StoreError(f"no run at {p}: the path does not exist; record one with explaind_ql.Recorder")
        try:
            self.group = zarr.open_group(str(p), mode="r")
            self.attrs = dict(self.group.attrs)
        except Exception as exc:  # zarr raises many kinds for damaged metadata
            raise StoreError(f"{p} is not a readable zarr store ({type(exc).__name__}); it is "
                             "corrupted or not an explaind_ql run") from None
        version = self.attrs.get(FORMAT_KEY)
        if version is None:
            raise StoreError(f"{p} is a zarr store but not an explaind_ql run (no '{FORMAT_KEY}' attribute)")
        if type(version) is not int or version != FORMAT_VERSION:
            newer = type(version) is int and version > FORMAT_VERSION
            raise StoreError(f"{p} was written in store format {version!r}; this explaind_ql reads format "
                             f"{FORMAT_VERSION} only; "
                             + ("upgrade explaind_ql to read it" if newer else "re-record the run"))
        self.n_steps = _count(self.attrs, "committed_steps", p)
        self.n_ckpts = _count(self.attrs, "committed_ckpts", p)
        if self.n_ckpts < 1 or "theta" not in self:
            raise StoreError(f"{p} holds no committed state (the recording died before its first "
                             "checkpoint was written); re-record the run")
        self._arrays: dict[str, zarr.Array] = {}

    def __contains__(self, name: str) -> bool:
        return (self.path / name / "zarr.json").is_file()

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            if name not in self:
                raise StoreError(f"{self.path} is damaged: array '{name}' is missing; run "
                                 f"`explaind-ql verify {self.path}`, then re-record the run")
            try:
                arr = self.group[name]
            except Exception as exc:
                raise self._damaged(name, exc) from None
            if not isinstance(arr, zarr.Array):
                raise StoreError(f"{self.path} is damaged: '{name}' is not an array; re-record the run")
            self._arrays[name] = arr
        return self._arrays[name]

    def committed_rows(self, name: str) -> int:
        """How many leading rows of ``name`` are committed (all of a split or constant)."""
        arr = self.array(name)
        dim = (arr.metadata.dimension_names or (None,))[0]
        if dim == "step":
            return self.n_steps
        if dim == "ckpt":
            return self.n_ckpts
        if dim == "sample":
            return self.n_samples
        return arr.shape[0] if arr.ndim else 1

    @cached_property
    def n_samples(self) -> int:
        """Samples of the committed steps' batches (read once: the commit does not move)."""
        if not self.n_steps:
            return 0
        start = self.read("batch_start", slice(self.n_steps - 1, self.n_steps))
        size = self.read("batch_size", slice(self.n_steps - 1, self.n_steps))
        return int(start[0] + size[0])

    def missing_chunks(self, name: str, rows: np.ndarray | None = None) -> list[str]:
        """Keys of the chunks that ``rows`` of ``name`` (default: its committed rows) need but that
        are not on disk."""
        arr = self.array(name)
        if arr.ndim == 0:
            return [] if (self.path / name / "c").exists() else ["c"]
        rows = np.arange(self.committed_rows(name)) if rows is None else np.asarray(rows)
        c0 = arr.chunks[0]
        grids = [np.unique(rows // c0)] + [np.arange(-(-s // c)) for s, c in zip(arr.shape[1:], arr.chunks[1:])]
        missing = []
        for coords in np.stack(np.meshgrid(*grids, indexing="ij"), -1).reshape(-1, arr.ndim):
            key = arr.metadata.encode_chunk_key(tuple(int(c) for c in coords))
            if not (self.path / name / key).is_file():
                missing.append(key)
        return missing

    def read(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """``name``'s committed rows (or the given ``rows`` of them), checked and decoded."""
        arr = self.array(name)
        n = self.committed_rows(name)
        if arr.ndim and arr.shape[0] < n:
            raise StoreError(f"{self.path} is damaged: '{name}' holds {arr.shape[0]} rows but the commit "
                             f"says {n}; run `explaind-ql verify {self.path}`, then re-record the run")
        if rows is None:
            rows = slice(0, n)
        idx = np.arange(n)[rows] if isinstance(rows, slice) else np.asarray(rows, np.int64)
        if arr.ndim and len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise StoreError(f"{self.path}: rows {idx.min()}..{idx.max()} of '{name}' lie past its "
                             f"{n} committed rows; the store's metadata is damaged")
        missing = self.missing_chunks(name, idx) if arr.ndim else self.missing_chunks(name)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DamagedStoreError(self.path, name, f"chunk {missing[0]}{more} is missing")
        try:
            if not arr.ndim:
                return np.asarray(arr[()])
            if isinstance(rows, slice) and len(idx) and np.all(np.diff(idx) == 1):
                return np.asarray(arr[int(idx[0]): int(idx[-1]) + 1])
            return np.asarray(arr.oindex[idx]) if len(idx) else np.zeros((0, *arr.shape[1:]), arr.dtype)
        except Exception as exc:  # the codecs raise ValueError (checksum), zstd errors, OSError
            raise self._damaged(name, exc) from None

    def _damaged(self, name: str, exc: Exception) -> StoreError:
        text = str(exc).splitlines()[0] if str(exc) else ""
        why = ("a checksum mismatch (its bytes changed on disk)" if "checksum" in text.lower()
               else f"a chunk that does not decode ({type(exc).__name__}: {text[:80]})")
        return DamagedStoreError(self.path, name, why)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.array(name).dtype)

    def chunks(self, name: str) -> tuple[int, ...]:
        return tuple(self.array(name).chunks)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.array(name).shape)

    def names(self) -> list[str]:
        return sorted(d.name for d in self.path.iterdir() if (d / "zarr.json").is_file())


def stamp(path: Path) -> float:
    """The root metadata's mtime: every commit rewrites it."""
    marker = path / "zarr.json"
    return marker.stat().st_mtime if marker.exists() else 0.0
