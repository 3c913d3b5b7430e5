"""All of ``examples/grokking/queries.eql`` on the paper config's whole run, at the default tolerance.

The issue's goal for the paper's study: every query of the file, on 100 test items, over the whole
2,000-step run of ``examples/grokking/train.py --config paper``, with the default adaptive rule (the
file's ``using quadrature $q`` dropped), in one process, as ``explaind-ql script`` runs a file: one open
run, whose caches (replayed states, test-side features) its queries share. Prints each query's seconds,
how many of its steps' test side it found kept by an earlier query, its replication residual where it
reports one, and the total; ``--write`` keeps the table as
``bench/RESULTS_grokking.md``.

Run: ``python bench/bench_grokking.py [--store runs/paper.zarr] [--items 100] [--threads 2] [--write]``
(records the paper run into ``--store`` first when it is not there: about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GROKKING = HERE.parent / "examples" / "grokking"
sys.path.append(str(GROKKING))  # train.py: the paper config

# the file's windows moved to the paper run's phases (its learning curve, read back with `evaluate` every 50
# steps: train accuracy 46 % at step 350, 95 % at 500, 99 % at 600; test accuracy 7 % at 350, 20 % at 400,
# 51 % at 450, 77 % at 500, 95 % at 1,550, 96.2 % at the end)
PAPER_PARAMS = {"mem_a": 300, "mem_b": 350, "onset_a": 350, "onset_b": 400, "jump_a": 450, "jump_b": 500,
                "clean_a": 1500, "clean_b": 1550, "check_b": 460}


def paper_queries(text: str, items: int) -> list[tuple[str, str]]:
    """(name, query) of every named query of the file at the default tolerance, its influence series and balances
    on ``items`` test items (its learning curves stay on all of them: a forward pass each)."""
    from explaind_ql.lang import parse_script, unparse
    text = re.sub(r"\s+using quadrature \$q", "", text).replace("influence on test[*]", f"influence on test[0..{items - 1}]")
    return [(e.name, unparse(e.query)) for e in parse_script(text, {k: str(v) for k, v in PAPER_PARAMS.items()})
            if e.name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=str(GROKKING / "runs" / "paper.zarr"), help="the recorded paper run")
    ap.add_argument("--items", type=int, default=100, help="test items of the file's test[*] queries")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="names (substrings) of the queries to run")
    ap.add_argument("--write", action="store_true", help="save the table as bench/RESULTS_grokking.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import explaind_ql as eq
    from explaind_ql.results.frames import residual_line
    store = Path(args.store)
    recorded = ""
    if not store.exists():
        from train import train
        t0 = time.perf_counter()
        train(store, "paper", log_every=10 ** 9)
        recorded = f" (recorded here in {time.perf_counter() - t0:.0f} s)"
    run = eq.open(store)
    lines = [f"# queries.eql at the paper's scale ({time.strftime('%Y-%m-%d')})", "",
             f"`python bench/bench_grokking.py --items {args.items} --threads {args.threads}`: every query of "
             f"`examples/grokking/queries.eql` on the paper run{recorded} ({run.n_steps:,} steps, p = 113, "
             f"{run.space.size:,} params, float32 AdamW), the influence queries' `test[*]` as `test[0..{args.items - 1}]`, "
             "without its `using quadrature $q` (the default adaptive rule, tolerance 1e-6), in one process "
             f"on {args.threads} threads, as `explaind-ql script` runs the file. torch {torch.__version__}.", "",
             "| query | seconds | steps shared | residual |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    t_all = time.perf_counter()
    for name, query in paper_queries((GROKKING / "queries.eql").read_text(), args.items):
        if args.only and not any(o in name for o in args.only):
            continue
        t0 = time.perf_counter()
        run.query(query)
        dt = time.perf_counter() - t0
        stats = run.cache.take_stats()
        line = residual_line(stats)
        lines.append(f"| `{name}`: `{query}` | {dt:.1f} | {stats.get('phi_cache_hits', 0)} | {line or '—'} |")
        print(lines[-1], flush=True)
    lines += ["", f"Total: **{time.perf_counter() - t_all:.0f} s**."]
    print(lines[-1])
    if args.write:
        (HERE / "RESULTS_grokking.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
