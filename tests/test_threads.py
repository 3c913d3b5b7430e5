"""Threads: `using threads N`, then $EXPLAIND_QL_THREADS, then the cores other processes leave free."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch

import explaind_ql as eq
from explaind_ql import threads
from explaind_ql.errors import ExplaindError


def _spin(seconds: float, started=None) -> None:
    if started is not None:  # a spawned interpreter takes seconds to import this module: say when it spins
        started.set()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.fixture(autouse=True)
def fresh_sample(monkeypatch):
    """Each test samples the load afresh (a sample is reused for a few seconds)."""
    monkeypatch.setattr(threads, "_last", None)


def test_the_option_then_the_environment_then_the_free_cores(monkeypatch):
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.chosen(2) == (2, "using threads")
    assert threads.chosen(None) == (3, threads.ENV)
    monkeypatch.delenv(threads.ENV)
    monkeypatch.setattr(threads, "cores", lambda: 4)
    monkeypatch.setattr(threads.psutil, "cpu_count", lambda logical=True: 4)
    for busy, free in ((0.0, 4), (1.2, 3), (3.6, 1), (9.0, 1)):
        monkeypatch.setattr(threads, "others_busy", lambda b=busy: b)
        monkeypatch.setattr(threads, "_last", None)
        assert threads.chosen(None) == (free, "free cores of 4")
    monkeypatch.setenv(threads.ENV, "many")
    with pytest.raises(ExplaindError, match="EXPLAIND_QL_THREADS='many' is not a positive number"):
        threads.chosen(None)


def test_another_processs_work_counts_as_busy_and_this_ones_does_not():
    assert threads.others_busy(0.2) < 0.9 * threads.cores() + 0.5  # this process alone does not fill the machine
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    other = ctx.Process(target=_spin, args=(3.0, started))
    other.start()
    try:
        assert started.wait(60)
        time.sleep(0.1)
        assert threads.others_busy(0.5) > 0.6  # a spinning process is most of a core
    finally:
        other.terminate()


def test_a_query_runs_on_its_threads_and_restores_them(run_path, monkeypatch):
    run = eq.open(run_path)
    before = torch.get_num_threads()
    run.query("influence on test[0] by layer using threads 2")
    assert run.cache.last_stats["threads"] == 2 and run.cache.last_stats["threads_from"] == "using threads"
    assert torch.get_num_threads() == before
    monkeypatch.delenv(threads.ENV)
    run.query("influence on test[0] by layer")
    assert run.cache.last_stats["threads_from"].startswith("free cores of")
    assert 1 <= run.cache.last_stats["threads"] <= threads.cores()
