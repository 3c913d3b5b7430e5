"""The trajectory store, beside the query path: the recorder writes it, a run reads it.

Callers use this package's functions and the :class:`~.base.Reader` / :class:`~.base.Writer`
protocols; only :mod:`.zarr_store` knows how the bytes are held. A second backend is a
module with a reader and a writer class, chosen here by the path.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import zarr_store
from .base import FORMAT_KEY, FORMAT_VERSION, Layout, Reader, Writer, input_array
from .lock import lock_path

SUFFIX = ".zarr"  # the suffix a store's directory conventionally carries


def open_reader(path: str | os.PathLike) -> Reader:
    """The committed prefix of the store at ``path``; a StoreError says why it can't be read."""
    return zarr_store.ZarrReader(path)


def create_writer(path: str | os.PathLike, layout: Layout, overwrite: bool) -> Writer:
    """A new store at ``path`` holding the lock; an existing one is replaced only with ``overwrite``."""
    return zarr_store.ZarrWriter(path, layout, overwrite)


def stamp(path: str | os.PathLike) -> float:
    """Changes whenever the store at ``path`` commits, so caches of open runs can key on it."""
    return zarr_store.stamp(Path(path))


def run_names(paths: list[str | os.PathLike]) -> list[str]:
    """Display names that tell the runs apart: for each, the shortest tail of its path (the store suffix
    dropped) that no other run shares, so ``seed0/run.zarr`` and ``seed1/run.zarr`` are ``seed0/run`` and
    ``seed1/run``. Paths to the same store get the same name."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    parts = [(*q[:-1], q[-1].removesuffix(SUFFIX)) for q in parts]
    names = []
    for q in parts:
        others = {o for o in parts if o != q}
        k = 1
        while k < len(q) and any(o[-k:] == q[-k:] for o in others):
            k += 1
        names.append("/".join(q[-k:]))
    return names


__all__ = ["FORMAT_KEY", "FORMAT_VERSION", "SUFFIX", "Layout", "Reader", "Writer", "create_writer",
           "input_array", "lock_path", "open_reader", "run_names", "stamp"]
