"""What restriction pushdown buys: a layer- and step-restricted query, optimised and un-optimised.

The un-optimised plan is the logical plan as is: every param, every step and every example
computed, then filtered and regrouped (``explaind_ql.execute.run_query(..., rules=WITHOUT_PUSHDOWN)``).
Both run in this one process on the same run; the frames must agree.

Run: ``python bench/bench_pushdown.py [--steps 60] [--write]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from report import emit  # noqa: E402  (bench/ is on sys.path when run as a script)
import explaind_ql as eq
from explaind_ql.execute import run_query
from explaind_ql.plan import WITHOUT_PUSHDOWN
from explaind_ql.toy import record_toy

QUERIES = [
    "influence of layer attn on test[*] over steps {a}:{b} by step using quadrature 2",
    "influence of layer emb on test[0..3] over steps {a}:{b} by example using quadrature 2",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = [f"# Restriction pushdown ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python bench/bench_pushdown.py --steps {args.steps}`; toy transformer (p = 5), "
             f"{args.steps} AdamW steps; window = the last quarter of the steps; 1 torch thread.", "",
             "| query | pushed down s | full then filtered s | speed-up | max abs difference |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        run = eq.open(record_toy(Path(d) / "t.zarr", "transformer", "adamw", steps=args.steps))
        a, b = args.steps * 3 // 4, args.steps
        for template in QUERIES:
            q = template.format(a=a, b=b)
            run_query(run, template.format(a=b - 1, b=b))  # warm-up: torch.func traces once per shape
            run_query(run, template.format(a=b - 1, b=b), rules=WITHOUT_PUSHDOWN)
            run.cache.forget_test_side()
            t0 = time.perf_counter()
            fast = run_query(run, q)
            t_fast = time.perf_counter() - t0
            run.cache.forget_test_side()
            t0 = time.perf_counter()
            full = run_query(run, q, rules=WITHOUT_PUSHDOWN)
            t_full = time.perf_counter() - t0
            total_diff = abs(float(fast["influence"].sum()) - float(full["influence"].sum()))
            lines.append(f"| `{q}` | {t_fast:.2f} | {t_full:.2f} | {t_full / t_fast:.1f}× | {total_diff:.1e} (frame totals) |")
            print(lines[-1], flush=True)
    emit(lines, "RESULTS_pushdown.md", args.write)


if __name__ == "__main__":
    main()
