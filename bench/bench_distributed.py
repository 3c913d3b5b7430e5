"""Distributed execution: speed-up with 1, 2 and 4 local Dask workers, and what chunking costs.

A step-heavy query (``influence on test[*] by step`` over a long toy run) runs

- locally, in this process (1 torch thread);
- on one worker as one step chunk, and as J chunks (the overhead of Dask and of chunking:
  each chunk opens the store, builds an engine and returns its momentum response);
- on 1, 2 and 4 workers (1 thread each) with the default chunking (2 chunks per thread).

Every distributed frame is checked against the local one (largest difference reported).
Each cluster is warmed up with a short query first, so worker start-up and the first
``import torch`` are not timed. Not run in CI.

Run: ``python bench/bench_distributed.py [--steps 200] [--workers 1 2 4] [--chunks 8] [--repeat 3] [--write]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from report import emit  # noqa: E402  (bench/ is on sys.path when run as a script)
import explaind_ql as eq
from explaind_ql import distributed as dist
from explaind_ql.execute import compute, prepare
from explaind_ql.toy import record_toy

QUERIES = ["influence on test[*] by step", "influence on test[0..3] by example, step"]


def timed(run, text: str, client=None, chunks: int | None = None):
    """(seconds, frame, step chunks, engine seconds summed over chunks) of one query; ``client`` None: local."""
    t0 = time.perf_counter()
    bound, facts, plan = prepare(run, text)
    if client is not None:
        plan = dist.distribute(plan, run, facts, client, None, chunks=chunks)
    frame = compute(run, bound, facts, plan)
    j = len(plan.distribution.chunks) if client is not None else 0
    return time.perf_counter() - t0, frame, j, run.cache.last_stats["seconds"]


def best(repeat: int, path, *args):
    """The fastest of ``repeat`` runs of :func:`timed`, each on a freshly opened run (no cached φ)."""
    return min((timed(eq.open(path), *args) for _ in range(repeat)), key=lambda r: r[0])


def diff(a, b) -> float:
    keys = [c for c in b.columns if c != "influence"]
    j = b.join(a, on=keys, how="full", nulls_equal=True, suffix="_got")
    return float((j["influence_got"] - j["influence"]).abs().max() / j["influence"].abs().max())


def main() -> None:
    from distributed import Client, LocalCluster

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--chunks", type=int, default=8, help="chunks for the one-worker chunk-overhead row")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest is reported (a shared machine)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = record_toy(Path(d) / "t.zarr", "transformer", "adamw", steps=args.steps)
        warm = "influence on test[*] over steps 0:4 by step"
        local = {}
        for q in QUERIES:
            timed(eq.open(path), warm)
            local[q] = best(args.repeat, path, q)
            rows.append((q, "local (this process)", 0, local[q][0], local[q][3], local[q][0], 0.0, os.getloadavg()[0]))
            print(rows[-1], flush=True)
        for n in args.workers:
            with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                              silence_logs=50) as cluster, Client(cluster, set_as_default=False) as client:
                client.wait_for_workers(n)
                for _ in range(2):  # every worker imports torch and traces once
                    timed(eq.open(path), warm, client, chunks=2 * n)
                for q in QUERIES:
                    variants = [(None, f"{n} worker{'s' * (n > 1)}")]
                    if n == 1:
                        variants = [(1, "1 worker, 1 chunk"), (args.chunks, f"1 worker, {args.chunks} chunks"),
                                    (None, "1 worker")]
                    for chunks, label in variants:
                        t, frame, j, work = best(args.repeat, path, q, client, chunks)
                        rows.append((q, label, j, t, work, local[q][0], diff(frame, local[q][1]), os.getloadavg()[0]))
                        print(rows[-1], flush=True)
    lines = [f"# Distributed execution ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python bench/bench_distributed.py --steps {args.steps} --workers "
             f"{' '.join(map(str, args.workers))} --chunks {args.chunks} --repeat {args.repeat}`; the fastest of "
             f"{args.repeat} runs per row; toy transformer (p = 5), "
             f"{args.steps} AdamW steps, dense store; Dask LocalCluster, worker processes with 1 thread "
             f"each; this machine has {os.cpu_count()} cores. Times include planning, the tasks and "
             "composing the chunks on the client; *engine s* is the engine's own time summed over the "
             "chunks (the rest of a one-worker row is Dask, opening the store and building an engine per "
             "chunk, and composing); *load* is the 1-minute load average when the row finished.", "",
             "| query | where | step chunks | seconds | engine s | speed-up vs local | max rel. difference | load |",
             "|---|---|---|---|---|---|---|---|"]
    for q, label, j, t, work, t_local, err, load in rows:
        lines.append(f"| `{q}` | {label} | {j or '—'} | {t:.2f} | {work:.2f} | {t_local / t:.2f}× | {err:.1e} "
                     f"| {load:.1f} |")
    emit(lines, "RESULTS_distributed.md", args.write)


if __name__ == "__main__":
    main()
