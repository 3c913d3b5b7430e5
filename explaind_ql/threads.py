"""How many CPU threads a query's torch ops use: ``using threads N``, else ``$EXPLAIND_QL_THREADS``, else
the cores other processes leave free when the query starts.

torch's own default is one thread per physical core whatever else runs. On a shared machine that
oversubscribes: the threads of one op wait on each other while other processes hold the cores, and a
query measured at 10.4 s at load 1.4 took 608.7 s at load 5 on 2 cores (bench/RESULTS_threads.md has
this machine's figures for 1 and 2 threads, busy and idle). The default therefore samples, for
:data:`SAMPLE_SECONDS`, how busy the CPUs are with work other than this process's, and uses the cores
left over, at least one.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

import psutil
import torch

from .errors import ExplaindError

ENV = "EXPLAIND_QL_THREADS"
SAMPLE_SECONDS = 0.05
REUSE_SECONDS = 5.0
_last: tuple[float, int] | None = None  # (when, free cores) of the last sample


def cores() -> int:
    """The physical cores torch would use by default."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def others_busy(seconds: float = SAMPLE_SECONDS) -> float:
    """Cores' worth of CPU time other processes used over the last ``seconds`` (sampled now)."""
    me = psutil.Process()

    def busy() -> tuple[float, float]:
        t = psutil.cpu_times()
        own = me.cpu_times()
        return t.user + t.system + getattr(t, "nice", 0.0), own.user + own.system
    t0, (all0, own0) = time.perf_counter(), busy()
    time.sleep(seconds)
    t1, (all1, own1) = time.perf_counter(), busy()
    return max(0.0, ((all1 - all0) - (own1 - own0)) / max(t1 - t0, 1e-9))


def free_cores() -> int:
    """The physical cores other processes leave free, at least one: the default. Sampled at most once per
    :data:`REUSE_SECONDS`, so a script of small queries does not pay the sample each time."""
    global _last
    now = time.monotonic()
    if _last is None or now - _last[0] > REUSE_SECONDS:
        logical = psutil.cpu_count() or 1
        share = cores() / logical  # busy logical CPUs in physical cores
        _last = (now, max(1, min(cores(), round(cores() - others_busy() * share))))
    return _last[1]


def chosen(option: int | None) -> tuple[int, str]:
    """(threads, where the number came from) for a query whose ``using threads`` is ``option``."""
    if option is not None:
        return option, "using threads"
    env = os.environ.get(ENV)
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ExplaindError(f"{ENV}={env!r} is not a positive number of threads; set it to 1, 2, ... or unset it")
        return n, ENV
    return free_cores(), f"free cores of {cores()}"


@contextmanager
def using(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block, and restored after it."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextmanager
def pinned(n: int) -> Iterator[None]:
    """Every query in the block (and the code around them) on ``n`` threads, as ``$EXPLAIND_QL_THREADS=n``
    would: for callers that know their ops are small (the demo)."""
    before = os.environ.get(ENV)
    os.environ[ENV] = str(n)
    try:
        with using(n):
            yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before
