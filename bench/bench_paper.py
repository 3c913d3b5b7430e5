"""The paper's own scale: the grokking config at p = 113, default adaptive tolerance, per step.

Records ``examples/grokking/train.py --config paper`` for ``--steps`` steps twice (a dense store,
every state kept, and the config's checkpointed store), measures the floor in the same run
(one gradient of the summed target over 100 test items, one forward pass over them, one batch
JVP over the 4,000 training pairs, one full-batch gradient: what replaying a step costs), then
runs each query of the issue's table in a fresh process and prints seconds per step, the ratio
to the floor, peak memory, the achieved replication residual and where the time went.

Run: ``python bench/bench_paper.py [--steps 40] [--threads 2] [--store DIR] [--write]``.
``--write`` keeps the table as ``bench/RESULTS_paper.md``. Timings on shared cores move by
±20 %: read the ratios, which are measured side by side. The reference implementation is run on
its own question when ``explaind`` 0.1.0 is installed (see bench/reference/NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent / "examples" / "grokking"))  # train.py: the paper config

# the table: (label, store, query, floor it is measured against)
QUERIES = [
    ("by layer, step (dense)", "dense", "influence on test[0..99] by layer, step", "2 nodes"),
    ("by layer, step (checkpointed)", "ckpt", "influence on test[0..99] by layer, step", "2 nodes + replay"),
    ("by example", "dense", "influence on test[0..99] by example", "2 nodes + JVP"),
    ("check", "dense", "check on test[0..99]", "2 nodes + replay"),  # check rebuilds each update: a full-batch gradient
    ("kernel test[0..31] × train[0..127]", "dense", "kernel on test[0..31] from train[0..127]", "2 nodes + JVP"),
    ("similarity on 32 items", "dense", "similarity on test[0..31]", "2 nodes"),
]


def _peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1])
    return 0


def child(store: str, query: str, threads: int, floor_of: Callable[[str, int], dict[str, float]] | None = None) -> None:
    """One query in this (fresh) process: print its measurements as one JSON line (``threads`` 0: the
    package's default, the cores free when the query starts). With ``floor_of``, the floor is timed here
    too, just before the query, so that its ratio is measured side by side on the same machine state."""
    import explaind_ql as eq
    from explaind_ql import threads as thread_policy
    if threads:
        torch.set_num_threads(threads)
        os.environ[thread_policy.ENV] = str(threads)
    else:
        os.environ.pop(thread_policy.ENV, None)
    run = eq.open(store)
    t0 = time.perf_counter()
    run.build_model()  # once per process: importing the model's library (transformers: seconds) and building it
    t1 = time.perf_counter()
    floors = floor_of(store, threads) if floor_of else None
    run = eq.open(store)  # what the floor touched is not this query's
    run.build_model()
    t2 = time.perf_counter()
    frame = run.query(query)
    secs = time.perf_counter() - t2
    st = run.cache.last_stats
    if "residual" in st:
        residual = st["residual"] / st["change"] if st["change"] else 0.0
    elif "relative_residual" in frame.columns:  # check reports it per item
        residual = float(frame["relative_residual"].max())
    else:
        residual = None
    print(json.dumps({"wall": secs, "once": t1 - t0, "floor": floors, "engine": st.get("seconds"),
                      "peak_mib": _peak_kib() / 1024, "rows": frame.height, "threads": st.get("threads"),
                      "residual": residual, **{k: st.get(k) for k in ("test_seconds", "trajectory_seconds", "evaluations",
                                                                    "kinks", "refined_steps", "replayed_steps")}}))


HEADER = ["| query | s/step | floor s/step | × floor | wall s (+ once) | peak MiB | residual | evaluations/step "
          "| kinks/step | test s | trajectory s | train s | frames s |", "|" + "---|" * 13]
PHASES = ("Residual: the replication residual the result reports (largest |exact change − sum of terms| "
          "over targets, relative to the largest change; for `check`, the largest per item). "
          "Phases are summed over the whole query: test side (φ or projections, kink location and "
          "correction), trajectory (reading and replaying states), train side (per-example gradients "
          "and JVPs), frames (the rest of the query's wall time: the plan, the engine, the frame). "
          "s/step is the query's wall time over the steps; \"+ once\" is what a fresh process pays before "
          "its first query, importing and building the model (transformers alone: seconds), kept out of "
          "s/step and shown beside the query's wall time. Each row's floor was timed in the query's own "
          "process just before it (the table of floors above is the parent's, for reference).")


def floors(res: dict | str, fl: dict[str, float]) -> dict[str, float]:
    """A query's floors, from what its own process timed just before it (else the run's, ``fl``)."""
    fl = res["floor"] if isinstance(res, dict) and res.get("floor") else fl
    g, jvp, replay = (fl["gradient, 100 test items summed"], fl["batch JVP, 4,000 train pairs"],
                      fl["full-batch gradient (= one replayed step)"])
    return {"2 nodes": 2 * g, "2 nodes + replay": 2 * g + replay, "2 nodes + JVP": 2 * g + jvp}


def run_child(script: str, store: str, query: str, threads: int, timeout: float) -> dict | str:
    """``query`` on ``store`` in a fresh process (``script --child``): its measurements, or why there are none."""
    cmd = [sys.executable, script, "--threads", str(threads), "--child", store, query]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out (over {timeout:.0f} s)"
    if p.returncode != 0:
        return (p.stderr.strip().splitlines() or ["failed"])[-1][:120]
    return json.loads(p.stdout.strip().splitlines()[-1])


def table_row(label: str, query: str, res: dict | str, steps: int, floor_s: float) -> str:
    """One row of the per-step table: seconds per step beside the floor, and where the time went."""
    if isinstance(res, str):
        return f"| {label} | {res} |"
    engine = res["engine"] if res["engine"] is not None else res["wall"]  # check & co: all engine
    test, traj = res["test_seconds"] or 0.0, res["trajectory_seconds"] or 0.0
    train_s = max(0.0, engine - test - traj)
    frames = res["wall"] - engine
    per = res["wall"] / steps
    wall = f"{res['wall']:.1f} (+ {res.get('once', 0.0):.1f})"
    resid = "—" if res["residual"] is None else f"{res['residual']:.1e}"
    ev = "—" if res["evaluations"] is None else f"{res['evaluations'] / steps:.0f}"
    kk = "—" if res["kinks"] is None else f"{res['kinks'] / steps:.0f}"
    phases = (f"{test:.1f} | {traj:.1f} | {train_s:.1f} | {frames:.1f}" if res["engine"] is not None
              else "— | — | — | —")  # check, similarity: the model run directly, no phases
    return (f"| {label}: `{query}` | {per:.3f} | {floor_s:.3f} | {per / floor_s:.1f}× | {wall} | {res['peak_mib']:.0f} "
            f"| {resid} "
            f"| {ev} | {kk} | {phases} |")


def floor(store: str, threads: int) -> dict[str, float]:
    """Seconds of what a step physically needs, each timed alone (median of 5)."""
    torch.set_num_threads(threads)
    import explaind_ql as eq
    from explaind_ql.engine.kernels import Engine
    run = eq.open(store)
    eng = Engine(run)
    theta = eng.theta0
    xt, yt = eng.split("test")
    xs, ys = eng.split("train")
    xt, yt = xt[:100], yt[:100]
    fn = eng.fn

    def grad_test():
        th = theta.clone().requires_grad_(True)
        fn._call(th, None, None, xt).gather(1, yt.view(-1, 1)).sum().backward()

    def forward_test():
        fn.forward(theta, xt)

    def jvp_train():
        fn.per_example_jvp(run.space, theta, theta, xs, ys, theta[None] * 1e-3)

    def grad_train():
        th = theta.clone().requires_grad_(True)
        run.loss.fn(fn._call(th, None, None, xs), ys).mean().backward()

    return timed([("gradient, 100 test items summed", grad_test), ("forward, 100 test items", forward_test),
                  ("batch JVP, 4,000 train pairs", jvp_train), ("full-batch gradient (= one replayed step)", grad_train)])


def timed(work: list[tuple[str, Callable[[], object]]]) -> dict[str, float]:
    """Seconds of each named piece of work, timed alone after a warm-up call (median of 5)."""
    out = {}
    for name, f in work:
        f()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def record(dest: Path, steps: int) -> dict[str, tuple[str, float]]:
    from train import train
    out = {}
    for kind, every in [("dense", 1), ("ckpt", "auto")]:
        path = dest / f"paper-{kind}.zarr"
        t0 = time.perf_counter()
        train(path, "paper", log_every=10 ** 9, steps=steps, checkpoint_every=every)
        out[kind] = (str(path), time.perf_counter() - t0)
    return out


def reference_line() -> str:
    try:
        import explaind  # noqa: F401
    except ImportError:
        return ("The reference (`explaind` 0.1.0) is not installed here, so its side-by-side run on its own question "
                "(5 steps, 1 item, all outputs) was skipped: `pip install --no-deps --ignore-requires-python "
                "explaind==0.1.0` finds no distribution on this machine's package index.")
    return "The reference is installed: run `python bench/bench_reference.py` for its side-by-side comparison."


def arguments(doc: str, steps: int, timeout: float, results: str) -> argparse.ArgumentParser:
    """The options every per-step benchmark takes (``--child`` runs one query, in a fresh process)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=timeout, help="seconds one query may take")
    ap.add_argument("--write", action="store_true", help=f"save the table as bench/{results}")
    ap.add_argument("--child", nargs=2, metavar=("STORE", "QUERY"), help=argparse.SUPPRESS)
    return ap


def main() -> None:
    ap = arguments(__doc__, 40, 1800, "RESULTS_paper.md")
    ap.add_argument("--store", help="record into this folder (kept) instead of a temporary one")
    ap.add_argument("--only", nargs="*", help="labels (substrings) of the queries to run")
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.threads, floor)
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(args.store or tmp)
        dest.mkdir(parents=True, exist_ok=True)
        stores = record(dest, args.steps)
        fl = floor(stores["dense"][0], args.threads)
        lines = [f"# The paper's scale ({time.strftime('%Y-%m-%d')})", "",
                 f"`python bench/bench_paper.py --steps {args.steps} --threads {args.threads}`: the paper config "
                 f"(p = 113, 89,024 params, 4,000 train and 2,000 test pairs, ReLU, float32, full-batch AdamW), "
                 f"{args.steps} steps, recorded dense in {stores['dense'][1]:.1f} s and checkpointed in "
                 f"{stores['ckpt'][1]:.1f} s. Each query ran in its own process on {args.threads} threads, with "
                 "the default adaptive tolerance (1e-6). torch " + torch.__version__ + ".", "",
                 "## The floor, measured in this run", "", "| what | ms |", "|---|---|"]
        lines += [f"| {k} | {v * 1e3:.1f} |" for k, v in fl.items()]
        lines += ["", "## Per step", "", *HEADER]
        print("\n".join(lines), flush=True)
        for label, store, query, fname in QUERIES:
            if args.only and not any(o in label for o in args.only):
                continue
            res = run_child(__file__, stores[store][0], query, args.threads, args.timeout)
            lines.append(table_row(label, query, res, args.steps, floors(res, fl)[fname]))
            print(lines[-1], flush=True)
        lines += ["", PHASES, "", reference_line()]
        print("\n".join(lines[-3:]))
        if args.write:
            (HERE / "RESULTS_paper.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
