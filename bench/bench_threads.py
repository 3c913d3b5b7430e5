"""Threads against load: one query at 1, 2 and the default number of threads, on an idle and a busy machine.

Records the paper config (``examples/grokking/train.py --config paper``) for ``--steps`` steps, then runs
``influence on test[0..99] by layer, step`` in a fresh process per setting: ``using`` 1 thread, 2 threads
(all cores here) and the package's default (``explaind_ql.threads``: the cores other processes leave free
when the query starts), first on an idle machine, then while ``--busy`` other processes spin on the CPUs.
Prints seconds per setting, the threads the default chose, and the slowdown under load.

Run: ``python bench/bench_threads.py [--steps 5] [--busy 2] [--write]``; ``--write`` keeps the table as
``bench/RESULTS_threads.md``. Read the ratios: they are measured side by side, in one run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_paper import run_child

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent / "examples" / "grokking"))
QUERY = "influence on test[0..99] by layer, step"
SETTINGS = ((1, "1 thread"), (2, "2 threads"), (0, "default"))


def _spin() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="spinning processes for the busy runs")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=2, metavar=("STORE", "QUERY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        from bench_paper import child
        return child(*args.child, args.threads)
    from train import train
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "paper.zarr")
        train(store, "paper", log_every=10 ** 9, steps=args.steps, checkpoint_every=1)
        results: dict[tuple[str, int], dict | str] = {}
        for load in ("idle", "busy"):
            spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy if load == "busy" else 0)]
            for p in spinners:
                p.start()
            time.sleep(1.0 if spinners else 0.0)
            try:
                for n, _ in SETTINGS:
                    results[load, n] = run_child(__file__, store, QUERY, n, args.timeout)
                    print(load, n, results[load, n], flush=True)
            finally:
                for p in spinners:
                    p.terminate()
    lines = [f"# Threads against load ({time.strftime('%Y-%m-%d')})", "",
             f"`python bench/bench_threads.py --steps {args.steps} --busy {args.busy}`: `{QUERY}` on the paper config, "
             f"{args.steps} steps, each setting in a fresh process; {os.cpu_count()} CPUs; busy: {args.busy} other "
             f"processes spinning. torch {torch.__version__}.", "",
             "| threads | idle s | busy s | busy ÷ idle | threads the default chose (idle / busy) |", "|---|---|---|---|---|"]
    for n, label in SETTINGS:
        idle, busy = results["idle", n], results["busy", n]
        if isinstance(idle, str) or isinstance(busy, str):
            shown = [r if isinstance(r, str) else f"{r['wall']:.1f}" for r in (idle, busy)]
            lines.append(f"| {label} | {shown[0]} | {shown[1]} | — | — |")
            continue
        chose = f"{idle['threads']} / {busy['threads']}" if n == 0 else "—"
        lines.append(f"| {label} | {idle['wall']:.1f} | {busy['wall']:.1f} | {busy['wall'] / idle['wall']:.1f}× | {chose} |")
    print("\n".join(lines))
    if args.write:
        (HERE / "RESULTS_threads.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
