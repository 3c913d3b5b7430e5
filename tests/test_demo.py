"""The one-command demo, end to end in its quick mode (the CLI's `explaind-ql demo --quick`)."""

from __future__ import annotations

import time

import torch

import explaind_ql
from explaind_ql.demo import QUICK_MODE, run_demo


def test_quick_demo_records_queries_and_says_what_next(tmp_path, capsys):
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    store = run_demo(out=tmp_path / "demo", quick=True)
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out

    assert store.parent == (tmp_path / "demo").resolve()
    run = explaind_ql.open(store)
    assert run.n_steps == QUICK_MODE.steps and run.closed
    assert set(run.layers()) >= {"emb", "attn", "linear1", "linear2", "unembed"}

    for _, _, query in QUICK_MODE.queries:  # every example query ran and printed a frame
        assert f">>> {query}" in out
    assert out.count("shape: (") == len(QUICK_MODE.queries)
    assert "total" in out and "train + record" in out  # the timing per phase
    assert str(store) in out
    assert f"explaind-ql repl {store}" in out
    assert f"explaind-ql query {store} " in out
    assert torch.get_num_threads() == threads  # the demo's thread setting does not leak
    assert out.count("pivoted for display") == 2  # the layer × step and kernel tables say they are not query's
    curve = run.query(QUICK_MODE.queries[0][2])
    assert curve["step"].to_list()[-1] == QUICK_MODE.steps  # the curve reaches the final state
    assert elapsed < 45, f"the quick demo took {elapsed:.0f} s"


def test_demo_defaults_to_a_fresh_temporary_directory(monkeypatch, tmp_path):
    import explaind_ql.demo as demo

    monkeypatch.setattr(demo.tempfile, "mkdtemp", lambda prefix: str(tmp_path / f"{prefix}x"))
    monkeypatch.setattr(demo, "QUICK_MODE", demo.Mode(
        "quick", demo.QUICK, steps=4, checkpoint_every=2, log_every=2,
        queries=(("one query", "", "influence on test[0..1] by layer using quadrature 2"),)))
    store = run_demo(quick=True)
    assert store == (tmp_path / "explaind-ql-demo-x" / "grokking-quick.zarr").resolve()
    assert explaind_ql.open(store).n_steps == 4
