"""explaind_ql against the reference implementation (explaind 0.1.0), side by side in one process.

Same trajectory (the reference trains; explaind_ql re-takes and records the very same steps),
same question: every class's log-prob change at every test item, and its kernel sum per
parameter tensor. Reported: wall time, peak memory (RSS growth, /proc/self/status VmHWM
after a reset) and replication error against the model's real change. Then how our cost
grows with steps, test items, training examples and params.

Run: ``python bench/bench_reference.py [--quick] [--write]`` (needs the reference:
``pip install --no-deps --ignore-requires-python explaind==0.1.0 tqdm``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "reference"))

from adapter import _reset_peak_rss, _vm_kib, run_reference  # noqa: E402
from shared import our_terms, record_shared  # noqa: E402

import explaind_ql as eq  # noqa: E402
from explaind_ql.engine.kernels import Engine, Request  # noqa: E402
from explaind_ql.engine.targets import TargetSpec  # noqa: E402
from explaind_ql.toy import record_toy  # noqa: E402


def measure(fn):
    """(seconds, peak RSS growth in bytes, result) of ``fn()``."""
    rss0 = _vm_kib("VmRSS")
    _reset_peak_rss()
    t0 = time.perf_counter()
    out = fn()
    secs = time.perf_counter() - t0
    return secs, (_vm_kib("VmHWM") - rss0) * 1024, out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def head_to_head(cfg: dict, lines: list[str]) -> None:
    ref = run_reference(**cfg, dtype=torch.float32, integral_nodes=100, keep_kernel_matrix=False)
    with tempfile.TemporaryDirectory() as d:
        run = eq.open(record_shared(ref, Path(d) / "shared.zarr"))
        # warm-up of torch.func on a 1-step request so that one-time tracing is not timed
        Engine(run).run_request(Request(0, 1, TargetSpec("label", "test", (0,)), tuple(run.space.names),
                                        tuple(0 for _ in run.space.names), 1))
        # cheapest first: RSS growth is only seen by the first run that needs the memory
        t_same, m_same, same = measure(lambda: our_terms(run, nodes=100, rule="midpoint"))
        t_ours, m_ours, ours = measure(lambda: our_terms(run, nodes=None))
    actual = ours.actual.reshape(ref["ref_change"].shape)
    err_ours = rel(ours.total().reshape(actual.shape), actual)
    err_same = rel(same.total().reshape(actual.shape), actual)
    err_ref = rel(ref["ref_change"], actual)
    t_ref = ref["decomp_wall_s"]
    m_ref = ref["decomp_peak_rss_delta_bytes"]
    P = sum(v.numel() for v in ref["theta"][0].values())
    lines += [
        f"Trajectory: reference modular-addition transformer, p = {cfg['p']}, d_model {cfg['d_model']}, "
        f"MLP {cfg['d_mlp']} ({P:,} params), {cfg['n_train']} train / {cfg['n_test']} test pairs, "
        f"{cfg['steps']} full-batch AdamW steps, float32 training; the question covers all "
        f"{cfg['p'] + 2} classes of every test item and every parameter tensor.", "",
        "| tool | rule | wall s | peak memory MiB | replication error (max rel.) |",
        "|---|---|---|---|---|",
        f"| reference explaind 0.1.0 | midpoint, 100 nodes/step | {t_ref:.2f} | {m_ref / 2**20:.1f} | {err_ref:.1e} |",
        f"| explaind_ql | adaptive Gauss–Legendre, tol 1e-6 | {t_ours:.2f} | {m_ours / 2**20:.1f} | {err_ours:.1e} |",
        f"| explaind_ql | midpoint, 100 nodes/step (like for like) | {t_same:.2f} | {m_same / 2**20:.1f} | {err_same:.1e} |",
        "", f"Speed-up (default rule): {t_ref / t_ours:.1f}×; memory ratio: {m_ref / max(m_ours, 1):.1f}×; "
            f"error ratio: {err_ref / max(err_ours, 1e-300):.0f}× smaller.",
        f"Like-for-like (same rule): predictions agree to {rel(same.total().reshape(actual.shape), ref['ref_change']):.1e}.",
    ]


def scaling(lines: list[str], quick: bool) -> None:
    """Our wall time as steps, test items and examples double (toy MLP, fixed 2-node rule)."""
    lines += ["", "## How our cost grows (toy MLP; each row doubles one size)", "",
              "| size varied | values | seconds | ratio per doubling |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        def t(run, **kw):
            names = tuple(run.space.names)
            items = kw.pop("items", 4)
            req = Request(0, kw.pop("steps", run.n_steps), TargetSpec("label", "test", tuple(range(items))), names,
                          tuple(0 for _ in names), 1, nodes=2, tolerance=None, **kw)
            eng = Engine(run)
            eng.run_request(req)  # warm
            run.cache.pop("phi", None)
            t0 = time.perf_counter()
            eng.run_request(req)
            return time.perf_counter() - t0
        base = eq.open(record_toy(f"{d}/s.zarr", "mlp", "adamw", steps=64 if not quick else 16))
        n = base.n_steps
        rows = {
            "steps": [(s, t(base, steps=s)) for s in (n // 4, n // 2, n)],
            "test items (kept)": [(k, t(base, items=k, )) for k in (2, 4, 8)],
            "training examples (by example)": [(e, t(base, examples=tuple(range(e)), keep_examples=True))
                                               for e in (4, 8, 16)],
        }
    for what, pts in rows.items():
        ratios = [b[1] / a[1] for a, b in zip(pts, pts[1:])]
        lines.append(f"| {what} | {', '.join(str(v) for v, _ in pts)} | {', '.join(f'{s:.3f}' for _, s in pts)} | "
                     f"{', '.join(f'{x:.2f}' for x in ratios)} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # both tools on one thread: fair, and stable on shared cores
    cfg = (dict(p=11, n_train=30, n_test=8, steps=8, d_model=16, d_mlp=32) if args.quick else
           dict(p=17, n_train=80, n_test=12, steps=12, d_model=32, d_mlp=64))
    lines = [f"# explaind_ql against the reference ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python bench/bench_reference.py{' --quick' if args.quick else ''}`; torch "
             f"{torch.__version__}, 1 thread, CPU.", ""]
    head_to_head(dict(cfg, weight_decay=1.0), lines)
    scaling(lines, args.quick)
    text = "\n".join(lines)
    print(text)
    if args.write:
        (HERE / "RESULTS_reference.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
