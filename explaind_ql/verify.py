"""``explaind-ql verify PATH``: check a whole store and report every damaged array.

A query reads only the chunks it needs and stops at the first damage; ``verify`` reads
every committed chunk of every array (its crc32c checksum is checked on decode), looks
for chunks the commit needs but that are missing, for non-finite values, and for arrays
that the metadata promises but that are absent or misshapen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .errors import DamagedStoreError, StoreError
from .store import Reader, open_reader

NAN_ALLOWED = ("loss",)  # a step recorded without its loss stores NaN there


@dataclass(frozen=True)
class Damage:
    array: str
    problem: str


@dataclass(frozen=True)
class Report:
    path: str
    steps: int
    arrays: int
    chunks: int
    damage: tuple[Damage, ...]

    @property
    def ok(self) -> bool:
        return not self.damage

    def lines(self) -> list[str]:
        if self.ok:
            return [f"ok: {self.path}: {self.steps} committed steps, {self.arrays} arrays, "
                    f"{self.chunks:,} chunks read, every checksum matches"]
        return [f"damaged: {d.array}: {d.problem}" for d in self.damage] + [
            f"{self.path}: {len(self.damage)} problem(s) in {self.arrays} arrays; re-record the run "
            "or restore it from a copy"]


def _check_array(store: Reader, name: str) -> tuple[int, list[str]]:
    """(chunks read, problems) for one array's committed rows."""
    shape, chunk = store.shape(name), store.chunks(name)
    missing = store.missing_chunks(name)
    if missing:
        return 0, [f"{len(missing)} chunk(s) missing, first {missing[0]}"]
    n = store.committed_rows(name) if shape else 1
    if shape and shape[0] < n:
        return 0, [f"holds {shape[0]} rows, the commit says {n}"]
    step = chunk[0] if shape else 1
    problems, chunks, finite = [], 0, True
    for lo in range(0, max(n, 1), step):
        try:
            block = store.read(name, slice(lo, min(n, lo + step))) if shape else store.read(name)
        except DamagedStoreError as exc:
            problems.append(f"rows {lo}..{min(n, lo + step) - 1}: {exc.reason}")
            continue
        chunks += int(np.prod([-(-s // c) for s, c in zip(shape[1:], chunk[1:])])) if shape else 1
        if block.dtype.kind == "f" and name not in NAN_ALLOWED and not np.isfinite(block).all():
            finite = False
    if not finite:
        problems.append("holds NaN or infinite values")
    return chunks, problems


def verify(path: str | os.PathLike) -> Report:
    """Read every committed chunk of the store at ``path``; a StoreError if it cannot be opened at all."""
    from .run import Run
    store = open_reader(path)
    damage, chunks = [], 0
    try:
        Run(path)
    except StoreError as exc:
        damage.append(Damage("metadata", str(exc)))
    names = store.names()
    for name in names:
        try:
            n, problems = _check_array(store, name)
        except StoreError as exc:
            n, problems = 0, [str(exc)]
        chunks += n
        damage += [Damage(name, p) for p in problems]
    return Report(str(path), store.n_steps, len(names), chunks, tuple(damage))


__all__ = ["Damage", "Report", "verify"]
