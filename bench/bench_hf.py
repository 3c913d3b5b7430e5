"""A Hugging Face model as it comes: a tiny GPT-2 (28k params, dropout on), 60 AdamW steps, 10 test sequences.

Records ``GPT2LMHeadModel`` from its config (dropout 0.1, SDPA attention, float32) on random token
sequences with no wrapper, measures the floor in the same run (one gradient of the summed loss of
the 10 test sequences; one batch JVP over a step's 16 training sequences), then runs each query in a
fresh process and prints seconds per step beside the floor, the residual and where the time went.
Building the model (importing transformers, ~3 s) is paid once per process before its first query: it is
shown beside each query's wall time and kept out of seconds per step.

Run: ``python bench/bench_hf.py [--steps 60] [--threads 2] [--write]``; ``--write`` keeps the table as
``bench/RESULTS_hf.md``. Needs the ``hf`` extra.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_paper import HEADER, PHASES, arguments, child, run_child, table_row, timed
from report import emit

QUERIES = [
    ("by layer", "influence on loss(test[0..9]) by layer", "2 nodes"),
    ("by example", "influence on loss(test[0..9]) by example", "2 nodes + JVP"),
    ("kernel", "kernel on loss(test[0..9]) from train[0..31]", "2 nodes + JVP"),
    ("check", "check on loss(test[0..9])", "2 nodes + rebuild"),
]
VOCAB, LENGTH, N_TRAIN, N_TEST, BATCH = 64, 16, 64, 16, 16


def record(path: Path, steps: int) -> float:
    import transformers

    import explaind_ql as eq
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (N_TRAIN + N_TEST, LENGTH), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    with eq.Recorder(path, model, opt, train={"input_ids": ids[:N_TRAIN]}, test={"input_ids": ids[N_TRAIN:]},
                     loss="lm") as rec:
        for _ in range(steps):
            b = torch.randperm(N_TRAIN, generator=g)[:BATCH]
            out = model(input_ids=ids[b], labels=ids[b])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            rec.step(b, loss=out.loss)
    return time.perf_counter() - t0


def floor(store: str, threads: int) -> dict[str, float]:
    """Seconds of what a step physically needs, each timed alone (median of 5)."""
    torch.set_num_threads(threads)
    import explaind_ql as eq
    from explaind_ql import model_io
    from explaind_ql.engine.kernels import Engine
    run = eq.open(store)
    eng = Engine(run)
    fn, theta = eng.fn, eng.theta0
    xt, yt = eng.split("test")
    xt, yt = model_io.apply(xt, lambda t: t[:10]), yt[:10]
    rec = next(eng.traj.walk(0, 1))
    xb, yb, draw = eng.train_items(rec, torch.arange(len(rec.meta.batch)))

    def grad_test():
        th = theta.clone().requires_grad_(True)
        run.loss.fn(fn._call(th, None, None, xt), yt).sum().backward()

    def jvp_train():
        fn.per_example_jvp(run.space, theta, theta, xb, yb, theta[None] * 1e-3, draw)

    def rebuild():
        fn.summed_grad(theta, xb, yb, draw)

    return timed([("gradient, 10 test sequences summed", grad_test),
                  (f"batch JVP, {BATCH} train sequences (dropout replayed)", jvp_train),
                  (f"batch gradient, {BATCH} train sequences (check's rebuild of each update)", rebuild)])


def floors(res: dict | str, fl: dict[str, float]) -> dict[str, float]:
    """A query's floors, from what its own process timed just before it (else the run's, ``fl``)."""
    g, jvp, rebuilt = (res["floor"] if isinstance(res, dict) and res.get("floor") else fl).values()
    return {"2 nodes": 2 * g, "2 nodes + JVP": 2 * g + jvp, "2 nodes + rebuild": 2 * g + rebuilt}


def main() -> None:
    args = arguments(__doc__, 60, 600, "RESULTS_hf.md").parse_args()
    if args.child:
        return child(*args.child, args.threads, floor)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "gpt2.zarr"
        secs = record(store, args.steps)
        fl = floor(str(store), args.threads)
        lines = [f"# A Hugging Face GPT-2 as it comes ({time.strftime('%Y-%m-%d')})", "",
                 f"`python bench/bench_hf.py --steps {args.steps} --threads {args.threads}`: `GPT2LMHeadModel` from "
                 f"its config (28,032 params, 2 layers, dropout 0.1, SDPA attention, float32), AdamW, {BATCH} of "
                 f"{N_TRAIN} random sequences of {LENGTH} tokens per step, recorded in {secs:.1f} s. Each query ran in "
                 f"its own process on {args.threads} threads with the default adaptive tolerance (1e-6). torch "
                 f"{torch.__version__}.", "", "## The floor, measured in this run", "", "| what | ms |", "|---|---|"]
        lines += [f"| {k} | {v * 1e3:.1f} |" for k, v in fl.items()]
        lines += ["", "## Per step", "", *HEADER]
        print("\n".join(lines), flush=True)
        for label, query, fname in QUERIES:
            res = run_child(__file__, str(store), query, args.threads, args.timeout)
            lines.append(table_row(label, query, res, args.steps, floors(res, fl)[fname]))
            print(lines[-1], flush=True)
    lines += ["", PHASES]
    if args.write:
        emit(lines, "RESULTS_hf.md", True)


if __name__ == "__main__":
    sys.exit(main())
