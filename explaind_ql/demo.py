"""`explaind-ql demo`: record a small grokking run, ask it a handful of questions, say what next.

The run is the paper's one-layer modular-addition transformer at p = 47 (the ``small``
config of ``examples/grokking/train.py``): full-batch AdamW with strong weight decay,
so it memorises its 676 training pairs by step ~200 and only generalises to the 452
held-out pairs around steps 400-600 (grokking). The demo then runs five example
queries against the recorded store, printing each frame and its time, and ends with
the store's path and the commands to explore it further.

``quick=True`` records a much smaller run (p = 23, 120 steps: memorisation only, too
short to grok) and runs the same five kinds of query on it in a few seconds; the
tests use it.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import threads

# The model and optimizer of examples/grokking/train.py --config small (keep them in sync).
SMALL = dict(p=47, n_train=676, n_test=452, d_model=32, n_heads=4, d_mlp=128, act="relu",
             lr=1e-2, betas=(0.9, 0.98), weight_decay=1.5, seed=1, data_seed=43)
QUICK = dict(SMALL, p=23, n_train=165, n_test=111, d_mlp=64)


@dataclass(frozen=True)
class Mode:
    name: str
    config: dict
    steps: int
    checkpoint_every: int
    log_every: int
    queries: tuple[tuple[str, str, str], ...]  # (title, what it shows, query text)


FULL_MODE = Mode(
    "full", SMALL, steps=800, checkpoint_every=50, log_every=100,
    queries=(
        ("the grokking curve", "Test accuracy read back from the store; the states between checkpoints "
         "are replayed exactly.", "evaluate on test[*] at steps 0..800 every 100"),
        ("influence per layer and phase", "How much each layer's updates moved the log-probability of the "
         "right answer on 64 test pairs, per 100 steps (all terms summed): down while the model memorises, "
         "up when it generalises.", "influence on test[0..63] by layer, step every 100 using quadrature 2"),
        ("the training pairs behind the jump", "The training pairs whose gradients raised or lowered those "
         "test log-probabilities most during the jump (weight decay is a row of its own).",
         "influence on test[0..63] over steps 400:600 by example top 5 abs using quadrature 2"),
        ("a kernel matrix", "Test item x training pair: each pair's gradient contribution to each test item "
         "during steps 450-500.", "kernel on test[0..3] from train[0..5] over steps 450:500 using quadrature 2"),
        ("exactness", "The decomposition against the model's real change (adaptive quadrature): the "
         "residual is the only approximation.", "check on test[0..3] over steps 450:460"),
    ))

QUICK_MODE = Mode(
    "quick", QUICK, steps=120, checkpoint_every=20, log_every=30,
    queries=(
        ("the accuracy curve", "Test accuracy read back from the store.",
         "evaluate on test[*] at steps 0..120 every 30"),
        ("influence per layer and phase", "How much each layer moved the test log-probabilities, per 40 steps.",
         "influence on test[0..15] by layer, step every 40 using quadrature 2"),
        ("the most influential training pairs", "Training pairs ranked by their contribution in steps 40-80.",
         "influence on test[0..15] over steps 40:80 by example top 5 abs using quadrature 2"),
        ("a kernel matrix", "Test item x training pair, gradient term, steps 60-80.",
         "kernel on test[0..3] from train[0..5] over steps 60:80 using quadrature 2"),
        ("exactness", "The decomposition against the model's real change.",
         "check on test[0..3] over steps 60:65"),
    ))

# The demo's ops are tiny: one thread is as fast on an idle machine and much faster on a busy one.
DEMO_THREADS = 1


def record_grokking(path: str | Path, config: dict, steps: int, checkpoint_every: int | None | str = 50,
                    log: Callable[[str], None] = print, log_every: int = 100, device: str = "cpu") -> list[dict]:
    """Train the modular-addition transformer full batch on ``device`` and record it into ``path``.

    Returns the accuracy curve (one row per ``log_every`` steps, for the state after the step).
    """
    from .models import ModAddTransformer, modadd_data
    from .recorder import Recorder

    cfg = config
    xtr, ytr, xte, yte = modadd_data(cfg["p"], cfg["n_train"], cfg["n_test"], seed=cfg["data_seed"])
    torch.manual_seed(cfg["seed"])
    kw = {k: cfg[k] for k in ("p", "d_model", "n_heads", "d_mlp", "act")}
    model = ModAddTransformer(**kw).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=cfg["betas"], weight_decay=cfg["weight_decay"])
    xd, yd, xted, yted = (t.to(device) for t in (xtr, ytr, xte, yte))
    batch = torch.arange(len(xtr))
    curve = []
    with Recorder(path, model, opt, train=(xtr, ytr), test=(xte, yte), loss="nll",
                  factory="explaind_ql.models:ModAddTransformer", factory_kwargs=kw,
                  checkpoint_every=checkpoint_every, overwrite=True) as rec:
        for step in range(steps):
            loss = F.nll_loss(model(xd), yd)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(batch, loss=loss)
            if (step + 1) % log_every == 0 or step == steps - 1:
                with torch.no_grad():
                    row = {"step": step + 1, "loss": float(loss.detach()),
                           "train_acc": float((model(xd).argmax(-1) == yd).float().mean()),
                           "test_acc": float((model(xted).argmax(-1) == yted).float().mean())}
                curve.append(row)
                log(f"  after step {row['step']:4d}: loss {row['loss']:.3f}   train accuracy "
                    f"{row['train_acc']:6.1%}   test accuracy {row['test_acc']:6.1%}")
    return curve


def _show(frame, query: str) -> str:
    """How the demo prints a frame: kernel frames as a test x example matrix, the rest as is."""
    import polars as pl

    if {"layer", "step"} <= set(frame.columns) and "example" not in frame.columns:
        table = frame.group_by("step", "layer", maintain_order=True).agg(pl.col("influence").sum())
        table = table.pivot(on="layer", index="step", values="influence").sort("step")
        return (f"{table}\n(pivoted for display, all terms summed: the query returns one row per layer, step "
                "and term; rows here: the first step of each bin; columns: layers)")
    if query.startswith("kernel") and "example" in frame.columns:
        grad = frame.filter(pl.col("term") == "gradient")
        matrix = grad.pivot(on="example", index="test", values="influence", aggregate_function="sum")
        matrix = matrix.rename({c: f"train {c}" for c in matrix.columns if c != "test"})
        rest = frame.filter(pl.col("term") != "gradient").group_by("term", maintain_order=True).agg(
            pl.col("influence").sum())
        other = ", ".join(f"{t} {v:+.4g}" for t, v in rest.iter_rows())
        return (f"{matrix}\n(pivoted for display: the query returns one row per test item, pair and term; gradient "
                f"term per pair here; the non-data terms over these test items: {other or 'none'})")
    return str(frame)


def run_demo(out: str | Path | None = None, quick: bool = False) -> Path:
    """Record the demo run into ``out`` (a directory; a new temporary one if None), run the
    example queries, print everything to stdout, and return the store's path."""
    import polars as pl
    from rich.console import Console

    from . import open as open_run
    from .store import SUFFIX

    console = Console(highlight=False, soft_wrap=True)

    def say(text: str, style: str | None = None) -> None:
        console.print(text, style=style, markup=False)

    mode = QUICK_MODE if quick else FULL_MODE
    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="explaind-ql-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    store = (root / f"grokking{'-quick' if quick else ''}{SUFFIX}").resolve()
    cfg = mode.config
    timings: list[tuple[str, float]] = []
    t_all = time.perf_counter()
    with threads.pinned(DEMO_THREADS):
        say(f"explaind-ql demo ({mode.name}): a one-layer transformer learns a + b mod {cfg['p']}", "bold")
        say(f"  {cfg['n_train']} training pairs, {cfg['n_test']} test pairs, d_model {cfg['d_model']}, "
            f"{cfg['n_heads']} heads, MLP {cfg['d_mlp']}; AdamW lr {cfg['lr']:g}, weight decay "
            f"{cfg['weight_decay']:g}, full batch, {mode.steps} steps, a checkpoint every "
            f"{mode.checkpoint_every} steps")
        say(f"  store: {store}")

        console.rule("1. train and record")
        t = time.perf_counter()
        record_grokking(store, cfg, mode.steps, mode.checkpoint_every, log=say,
                        log_every=mode.log_every)
        timings.append(("train + record", time.perf_counter() - t))
        say(f"  recorded in {timings[-1][1]:.1f} s (every update verified against the optimizer as it was taken)")

        t = time.perf_counter()
        run = open_run(store)
        info = run.info()
        timings.append(("open", time.perf_counter() - t))
        say(f"  {run!r}; {info['bytes_on_disk'] / 2**20:.1f} MiB on disk")

        with pl.Config(tbl_rows=12, tbl_width_chars=160, fmt_str_lengths=40):
            for i, (title, what, query) in enumerate(mode.queries, start=2):
                console.rule(f"{i}. {title}")
                say(what)
                say(f">>> {query}", "bold")
                t = time.perf_counter()
                frame = run.query(query)
                dt = time.perf_counter() - t
                timings.append((query, dt))
                print(_show(frame, query), flush=True)
                say(f"  ({dt:.1f} s)")

        total = time.perf_counter() - t_all
        console.rule("timing")
        for name, dt in timings:
            say(f"  {dt:6.1f} s  {name}")
        say(f"  {total:6.1f} s  total")

        console.rule("next")
        q = shlex.quote(str(store))
        window = "over steps 400:600" if not quick else "over steps 40:80"
        say(f"The recorded run is in {store}")
        say("Explore it interactively:")
        say(f"  explaind-ql repl {q}")
        say("or ask one question from the shell:")
        say(f"  explaind-ql query {q} \"influence on test[0..9] {window} by layer\"")
        say("The query language is described in docs/language.md; examples/grokking/ reproduces the "
            "paper's grokking analyses.")
    return store


__all__ = ["FULL_MODE", "QUICK_MODE", "SMALL", "record_grokking", "run_demo"]
