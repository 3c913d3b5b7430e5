"""explaind_ql against the reference implementation (explaind 0.1.0), side by side in one run.

Same trajectory (the reference trains; explaind_ql re-takes and records the very same steps),
same question: every class's log-prob change at every test item, and its kernel sum per
parameter tensor. Reported: wall time, peak memory (RSS growth, /proc/self/status VmHWM
after a reset) and replication error against the model's real change. Then how our cost
grows with steps, test items, training examples and params.

Timings on shared cores move by ±20 % from run to run, so each tool is run ``--repeat`` times
(default 3), every run in a fresh process, and the table gives medians and the range of the ratios.

Run: ``python bench/bench_reference.py [--quick] [--repeat N] [--write]`` (needs the reference:
``pip install --no-deps --ignore-requires-python explaind==0.1.0 tqdm``).
"""

from __future__ import annotations

import argparse
import ast
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "reference"))

from adapter import _reset_peak_rss, _vm_kib, run_reference  # noqa: E402
from shared import REF_FACTORY, record_shared  # noqa: E402

from report import emit  # noqa: E402  (bench/ is on sys.path when run as a script)
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


QUESTION = "influence on output(test[*]) by test, output, param"
MODES = {  # row label → how our side is run (each in a fresh process, so peak memory is its own)
    "default": "adaptive Gauss–Legendre, tol 1e-6, split at ReLU kinks",
    "float32": "the same, `using dtype float32`",
    "budget": "the same, `using budget 16MiB` (2 MiB per batched call)",
    "lean": "the same, `using dtype float32, budget 16MiB`",
    "midpoint": "midpoint, 100 nodes/step (like for like)",
}


def ours(store: str, mode: str, out: str) -> None:
    """Child process: answer QUESTION on ``store`` and save time, peak memory and the predictions."""
    torch.set_num_threads(1)
    run = eq.open(store, trust=[REF_FACTORY.partition(":")[0]])  # the reference's model, installed by hand
    n_test = run.split_size("test")
    using = {"float32": " using dtype float32", "budget": " using budget 16MiB",
             "lean": " using dtype float32, budget 16MiB"}.get(mode, "")
    # warm-up on one step and one item with the same options, so that one-time tracing and imports (in
    # the query's dtype) are not timed; clearing the cache then drops its engine and every cached result
    run.query("influence on output(test[0]) over steps 0:1 by output" + using)
    run.cache.clear()
    if mode == "midpoint":  # the reference's rule is not a language option: the engine, as the planner would
        names = tuple(run.space.names)
        target = TargetSpec("outputs", "test", tuple(range(n_test)), keep_test=True, keep_output=True)
        req = Request(0, run.n_steps, target, names, tuple(range(len(names))), len(names), nodes=100,
                      tolerance=None, rule="midpoint", strategy="project")
        secs, peak, r = measure(lambda: Engine(run).run_request(req))
        pred = r.total().reshape(n_test, -1)
    else:
        secs, peak, frame = measure(lambda: run.query(QUESTION + using))
        tot = frame.group_by(["test", "output"]).agg(pl.col("influence").sum()).sort(["test", "output"])
        pred = torch.tensor(tot["influence"].to_numpy()).reshape(n_test, -1)
    check = run.query("check on output(test[*])").sort(["test", "output"])
    actual = torch.tensor(check["actual"].to_numpy()).reshape(n_test, -1)
    strategy = run.cache.last_stats.get("strategy", "project")
    torch.save(dict(seconds=secs, peak=peak, pred=pred, actual=actual, strategy=strategy), out)


def reference_child(cfg: dict, out: str) -> None:
    """Child process: one run of the reference, its time and peak memory saved."""
    torch.set_num_threads(1)
    ref = run_reference(**cfg, dtype=torch.float32, integral_nodes=100, keep_kernel_matrix=False)
    torch.save(dict(seconds=ref["decomp_wall_s"], peak=ref["decomp_peak_rss_delta_bytes"]), out)


def fresh(args: list[str], out: Path) -> dict:
    subprocess.run([sys.executable, __file__, *args, "--out", str(out)], check=True)
    return torch.load(out)


def median_runs(runs: list[dict]) -> dict:
    """The first run's predictions, with every run's seconds and peak kept for medians and ranges."""
    return dict(runs[0], seconds=[r["seconds"] for r in runs], peak=[r["peak"] for r in runs])


def ratio(ref: list[float], ours: list[float]) -> str:
    """Median ratio, and its range over the runs (slowest of one against fastest of the other)."""
    mid = statistics.median(ref) / statistics.median(ours)
    return f"{mid:.1f}× ({min(ref) / max(ours):.1f}–{max(ref) / min(ours):.1f})"


def head_to_head(cfg: dict, lines: list[str], repeat: int) -> None:
    ref = run_reference(**cfg, dtype=torch.float32, integral_nodes=100, keep_kernel_matrix=False)
    with tempfile.TemporaryDirectory() as d:
        store = record_shared(ref, Path(d) / "shared.zarr")
        ref_runs = [fresh(["--reference", repr(cfg)], Path(d) / f"ref{k}.pt") for k in range(repeat)]
        rows = {mode: median_runs([fresh(["--ours", str(store), "--mode", mode], Path(d) / f"{mode}{k}.pt")
                                   for k in range(repeat)]) for mode in MODES}
    actual = rows["default"]["actual"].double()  # errors in float64: the reference's float32 is cast up
    err_ref = rel(ref["ref_change"].double(), actual)
    t_ref, m_ref = [r["seconds"] for r in ref_runs], [r["peak"] for r in ref_runs]
    P = sum(v.numel() for v in ref["theta"][0].values())
    lines += [
        f"Trajectory: reference modular-addition transformer (ReLU), p = {cfg['p']}, d_model {cfg['d_model']}, "
        f"MLP {cfg['d_mlp']} ({P:,} params), {cfg['n_train']} train / {cfg['n_test']} test pairs, "
        f"{cfg['steps']} full-batch AdamW steps, float32 training. Question: every class's output (log-prob) "
        f"change at every test item, per parameter tensor, kernel and weight-decay terms apart — in the "
        f"language `{QUESTION}`.", "",
        f"Each tool ran {repeat} times, each run in a fresh process: wall time and peak memory are medians, "
        "and each ratio is the ratio of the medians with, in brackets, its range over the runs.", "",
        "| tool | rule | wall s | peak memory MiB | replication error (max rel.) | speed-up | memory ratio |",
        "|---|---|---|---|---|---|---|",
        f"| reference explaind 0.1.0 | midpoint, 100 nodes/step | {statistics.median(t_ref):.2f} | "
        f"{statistics.median(m_ref) / 2**20:.1f} | {err_ref:.1e} | 1× | 1× |",
    ]
    for mode, label in MODES.items():
        r = rows[mode]
        err = rel(r["pred"].double(), actual)
        peaks = [max(p, 1) for p in r["peak"]]
        lines.append(f"| explaind_ql ({r['strategy']}) | {label} | {statistics.median(r['seconds']):.2f} | "
                     f"{statistics.median(peaks) / 2**20:.1f} | {err:.1e} | {ratio(t_ref, r['seconds'])} | "
                     f"{ratio(m_ref, peaks)} |")
    same = rows["midpoint"]["pred"].double()
    lines += ["", f"Like-for-like (same rule): predictions agree with the reference's to "
                  f"{rel(same, ref['ref_change'].double()):.1e}. Peak memory is the growth of the "
                  "process's peak resident set over the call: the reference's over its predict() (after "
                  "training, in the same fresh process), ours over the query after a one-step warm-up."]


def record_width(path: str, hidden: int, steps: int) -> str:
    """A toy MLP whose parameter count grows linearly with ``hidden`` (for the params row)."""
    from explaind_ql.models import MLP
    torch.manual_seed(0)
    net = MLP([6, hidden, 3]).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    with eq.Recorder(path, net, opt, train=(x, y), test=(x[:8], y[:8]), loss="cross_entropy",
                     factory="explaind_ql.models:MLP", factory_kwargs={"sizes": [6, hidden, 3]},
                     overwrite=True) as rec:
        for s in range(steps):
            idx = torch.arange(s * 10 % 40, s * 10 % 40 + 10)
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(idx, loss=loss)
    return path


def scaling(lines: list[str], quick: bool) -> None:
    """Our wall time as steps, test items, examples and params double (toy MLP, fixed 2-node rule)."""
    lines += ["", "## How our cost grows (toy MLP; each row doubles one size)", "",
              "| size varied | values | seconds | ratio per doubling |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        def t(run, **kw):
            names = tuple(run.space.names)
            items = kw.pop("items", 4)
            req = Request(0, kw.pop("steps", run.n_steps), TargetSpec("label", "test", tuple(range(items))), names,
                          tuple(0 for _ in names), 1, nodes=2, tolerance=None,
                          strategy="fold" if kw.get("keep_examples") else "delta", **kw)
            eng = Engine(run)
            eng.run_request(req)  # warm
            run.cache.forget_test_side()
            t0 = time.perf_counter()
            eng.run_request(req)
            return time.perf_counter() - t0
        base = eq.open(record_toy(f"{d}/s.zarr", "mlp", "adamw", steps=64 if not quick else 16))
        n = base.n_steps
        widths = (64, 128, 256) if not quick else (16, 32, 64)
        wide = [eq.open(record_width(f"{d}/w{h}.zarr", h, 16)) for h in widths]
        rows = {
            "steps": [(s, t(base, steps=s)) for s in (n // 4, n // 2, n)],
            "test items (kept)": [(k, t(base, items=k, )) for k in (2, 4, 8)],
            "training examples (by example)": [(e, t(base, examples=tuple(range(e)), keep_examples=True))
                                               for e in (4, 8, 16)],
            "params (MLP width)": [(r.space.size, t(r)) for r in wide],
        }
    for what, pts in rows.items():
        ratios = [b[1] / a[1] for a, b in zip(pts, pts[1:])]
        lines.append(f"| {what} | {', '.join(str(v) for v, _ in pts)} | {', '.join(f'{s:.3f}' for _, s in pts)} | "
                     f"{', '.join(f'{x:.2f}' for x in ratios)} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="fresh-process runs of each tool (medians reported)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--ours", help=argparse.SUPPRESS)  # child process: one of our rows
    ap.add_argument("--reference", help=argparse.SUPPRESS)  # child process: one reference run (its config)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ours:
        return ours(args.ours, args.mode, args.out)
    if args.reference:
        return reference_child(ast.literal_eval(args.reference), args.out)
    torch.set_num_threads(1)  # both tools on one thread: fair, and stable on shared cores
    cfg = (dict(p=11, n_train=30, n_test=8, steps=8, d_model=16, d_mlp=32) if args.quick else
           dict(p=17, n_train=80, n_test=12, steps=12, d_model=32, d_mlp=64))
    lines = [f"# explaind_ql against the reference ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python bench/bench_reference.py{' --quick' if args.quick else ''}"
             f"{f' --repeat {args.repeat}' if args.repeat != 3 else ''}`; torch "
             f"{torch.__version__}, 1 thread, CPU.", ""]
    head_to_head(dict(cfg, weight_decay=1.0), lines, args.repeat)
    scaling(lines, args.quick)
    emit(lines, "RESULTS_reference.md", args.write)


if __name__ == "__main__":
    main()
