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
from shared import record_shared  # noqa: E402

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
    run = eq.open(store)
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
    strategy = run.cache.get("last_stats", {}).get("strategy", "project")
    torch.save(dict(seconds=secs, peak=peak, pred=pred, actual=actual, strategy=strategy), out)


def fresh(store: Path, mode: str, tmp: Path) -> dict:
    out = tmp / f"{mode}.pt"
    subprocess.run([sys.executable, __file__, "--ours", str(store), "--mode", mode, "--out", str(out)], check=True)
    return torch.load(out)


def head_to_head(cfg: dict, lines: list[str]) -> None:
    ref = run_reference(**cfg, dtype=torch.float32, integral_nodes=100, keep_kernel_matrix=False)
    with tempfile.TemporaryDirectory() as d:
        store = record_shared(ref, Path(d) / "shared.zarr")
        rows = {mode: fresh(store, mode, Path(d)) for mode in MODES}
    actual = rows["default"]["actual"].double()  # errors in float64: the reference's float32 is cast up
    err_ref = rel(ref["ref_change"].double(), actual)
    t_ref, m_ref = ref["decomp_wall_s"], ref["decomp_peak_rss_delta_bytes"]
    P = sum(v.numel() for v in ref["theta"][0].values())
    lines += [
        f"Trajectory: reference modular-addition transformer (ReLU), p = {cfg['p']}, d_model {cfg['d_model']}, "
        f"MLP {cfg['d_mlp']} ({P:,} params), {cfg['n_train']} train / {cfg['n_test']} test pairs, "
        f"{cfg['steps']} full-batch AdamW steps, float32 training. Question: every class's output (log-prob) "
        f"change at every test item, per parameter tensor, kernel and weight-decay terms apart — in the "
        f"language `{QUESTION}`.", "",
        "| tool | rule | wall s | peak memory MiB | replication error (max rel.) | speed-up | memory ratio |",
        "|---|---|---|---|---|---|---|",
        f"| reference explaind 0.1.0 | midpoint, 100 nodes/step | {t_ref:.2f} | {m_ref / 2**20:.1f} | "
        f"{err_ref:.1e} | 1× | 1× |",
    ]
    for mode, label in MODES.items():
        r = rows[mode]
        err = rel(r["pred"].double(), actual)
        lines.append(f"| explaind_ql ({r['strategy']}) | {label} | {r['seconds']:.2f} | {r['peak'] / 2**20:.1f} | "
                     f"{err:.1e} | {t_ref / r['seconds']:.1f}× | {m_ref / max(r['peak'], 1):.1f}× |")
    same = rows["midpoint"]["pred"].double()
    lines += ["", f"Like-for-like (same rule): predictions agree with the reference's to "
                  f"{rel(same, ref['ref_change'].double()):.1e}. Peak memory is the growth of the "
                  "process's peak resident set over the call, each of ours measured in a fresh process "
                  "after a one-step warm-up."]


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
                          tuple(0 for _ in names), 1, nodes=2, tolerance=None, **kw)
            eng = Engine(run)
            eng.run_request(req)  # warm
            run.cache.pop("phi", None)
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
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--ours", help=argparse.SUPPRESS)  # child process: one of our rows
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ours:
        return ours(args.ours, args.mode, args.out)
    torch.set_num_threads(1)  # both tools on one thread: fair, and stable on shared cores
    cfg = (dict(p=11, n_train=30, n_test=8, steps=8, d_model=16, d_mlp=32) if args.quick else
           dict(p=17, n_train=80, n_test=12, steps=12, d_model=32, d_mlp=64))
    lines = [f"# explaind_ql against the reference ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `python bench/bench_reference.py{' --quick' if args.quick else ''}`; torch "
             f"{torch.__version__}, 1 thread, CPU.", ""]
    head_to_head(dict(cfg, weight_decay=1.0), lines)
    scaling(lines, args.quick)
    emit(lines, "RESULTS_reference.md", args.write)


if __name__ == "__main__":
    main()
