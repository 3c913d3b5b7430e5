"""What an open run keeps between queries: one typed field per cache, each with one owner.

A session's queries share test-side features, replayed states and engines. Keeping them on
the open run, and not in module globals, scopes them to it and drops them with it.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import psutil
import torch

PHI_CACHE_BYTES = 256 << 20
PROJ_CACHE_BYTES = 64 << 20
REPLAY_CACHE_MIN_BYTES = 512 << 20


def replay_cache_bytes() -> int:
    """Replayed states an open run keeps: an eighth of the machine's memory, at least 512 MiB.

    A query that walks a checkpointed run replays each skipped state it does not find kept; the paper's
    grokking run skips 1,980 states of 1.07 MB, so at a fixed 512 MiB every whole-run query of a script
    replayed all of them again (160 s each on 2 cores).
    """
    return max(REPLAY_CACHE_MIN_BYTES, psutil.virtual_memory().total // 8)


class TensorCache(OrderedDict):
    """Tensors (or stored states) reused across queries, least recently used out first."""

    def __init__(self, max_bytes: int):
        super().__init__()
        self.max_bytes, self.bytes = max_bytes, 0

    @staticmethod
    def _size(v) -> int:
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        theta, state = v
        return theta.numel() * theta.element_size() * (1 + len(state.bufs))

    def __getitem__(self, key):
        self.move_to_end(key)
        return super().__getitem__(key)

    def clear(self) -> None:
        super().clear()
        self.bytes = 0

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.bytes += self._size(value)
        self._evict()

    def __delitem__(self, key) -> None:
        self.bytes -= self._size(super().__getitem__(key))
        super().__delitem__(key)

    def _evict(self, keep_one: bool = True) -> None:
        while self.bytes > self.max_bytes and len(self) > keep_one:
            _, old = self.popitem(last=False)
            self.bytes -= self._size(old)

    @contextmanager
    def capped(self, max_bytes: int) -> Iterator[None]:
        """At most ``max_bytes`` held during the block (and what fits kept after it)."""
        before = self.max_bytes
        self.max_bytes = min(before, max_bytes)
        self._evict(keep_one=False)
        try:
            yield
        finally:
            self.max_bytes = before


@dataclass
class RunCache:
    """The caches of one open run."""

    engines: dict[tuple[str, torch.dtype], Any] = field(default_factory=dict)  # execute.engine_for
    phi: TensorCache = field(default_factory=lambda: TensorCache(PHI_CACHE_BYTES))  # test-side features: φ per step
    # a step's projections φ·(its vectors on each group), apart from φ, whose entries are up to 10^5 times larger:
    # in one cache the grokking file's four kernels' φ pushed out the 2,000 steps of projections its series had,
    # which its balance over steps 350:2000 would have shared
    proj: TensorCache = field(default_factory=lambda: TensorCache(PROJ_CACHE_BYTES))
    replay: TensorCache = field(default_factory=lambda: TensorCache(replay_cache_bytes()))  # replayed states
    drift: dict[int, Any] = field(default_factory=dict)  # replay drift at each stored state reached
    last_stats: dict = field(default_factory=dict)  # the last influence result's stats
    model_facts: dict | None = None  # engine.facts: what planning reads of the model (outputs, ReLU sites)

    def clear(self) -> None:
        """Forget everything: the next query starts cold."""
        fresh = RunCache()
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))

    def tensor_caches(self) -> tuple[TensorCache, ...]:
        """The caches that hold tensors, each capped in bytes: φ, projections, replayed states."""
        return self.phi, self.proj, self.replay

    def forget_test_side(self) -> None:
        """Drop the test-side features (φ and projections): the next query integrates again, on warm engines
        and replayed states (benchmarks time the test side so)."""
        self.phi.clear()
        self.proj.clear()

    @contextmanager
    def within(self, budget: int | None) -> Iterator[None]:
        """A query's ``using budget``: the caches it grows hold at most a quarter of it each (the projections
        an eighth), so that what the query leaves resident stays inside the budget too."""
        if budget is None:
            yield
            return
        with self.phi.capped(budget // 4), self.proj.capped(budget // 8), self.replay.capped(budget // 4):
            yield

    def take_stats(self) -> dict:
        """The last result's stats, once: a shell prints its residual line under that result only."""
        stats, self.last_stats = self.last_stats, {}
        return stats
