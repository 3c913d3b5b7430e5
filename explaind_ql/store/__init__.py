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


def run_name(path: str | os.PathLike) -> str:
    """A run's display name: its directory's name without the store suffix."""
    return os.path.basename(os.path.normpath(path)).removesuffix(SUFFIX)


__all__ = ["FORMAT_KEY", "FORMAT_VERSION", "SUFFIX", "Layout", "Reader", "Writer", "create_writer",
           "input_array", "lock_path", "open_reader", "run_name", "stamp"]
