"""Run the grokking analyses of ``queries.eql`` through the Python API and render REPORT.md.

    python examples/grokking/train.py                 # records runs/small.zarr (small config)
    python examples/grokking/report.py                # runs queries.eql on it, writes REPORT.md + PNGs

Every analysis is one named query of ``queries.eql`` (parsed with its ``param`` defaults,
overridable with ``--param NAME=VALUE``); the similarity query is run once per window of
``--window`` steps by binding ``$a``/``$b``. The plots are written next to this file
(``--out`` to change), with REPORT.md linking them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

import explaind_ql
from explaind_ql.lang import parse_script, unparse

HERE = Path(__file__).resolve().parent
PAPER_TIMES = HERE.parents[1] / "bench" / "RESULTS_grokking.md"  # bench/bench_grokking.py --write
OUTER = ("emb", "unembed")
INNER = ("attn", "linear1", "linear2")
LAYERS = ("emb", "attn", "linear1", "linear2", "unembed")
COLORS = dict(zip(LAYERS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))


# -- running the script ---------------------------------------------------------------------

def script_entries(text: str, params: dict) -> dict[str, str]:
    """Result name -> query text (parameters bound) for each named query of an .eql script."""
    return {e.name: unparse(e.query) for e in parse_script(text, params) if e.name}


class Runner:
    """Runs queries on one opened run, logging and timing each."""

    def __init__(self, run):
        self.run = run
        self.timings: list[tuple[str, str, float]] = []

    def __call__(self, name: str, query: str) -> pl.DataFrame:
        t = time.perf_counter()
        frame = self.run.query(query)
        dt = time.perf_counter() - t
        self.timings.append((name, query, dt))
        print(f"{dt:7.1f} s  {name}: {query}", flush=True)
        return frame


# -- analysis helpers -----------------------------------------------------------------------

def first_step(curve: pl.DataFrame, threshold: float) -> int | None:
    hit = curve.filter(pl.col("accuracy") >= threshold)
    return int(hit["step"][0]) if len(hit) else None


def per_layer_series(frame: pl.DataFrame, term: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """layer -> (bin start steps, influence per bin), all terms summed unless ``term``."""
    f = frame if term is None else frame.filter(pl.col("term") == term)
    f = f.group_by("layer", "step").agg(pl.col("influence").sum()).sort("step")
    return {lay: (f.filter(pl.col("layer") == lay)["step"].to_numpy(),
                  f.filter(pl.col("layer") == lay)["influence"].to_numpy()) for lay in LAYERS}


def kernel_matrix(frame: pl.DataFrame, test_labels: np.ndarray):
    """(matrix test x example of the gradient term, test labels, train labels), both sorted by label."""
    g = frame.filter(pl.col("term") == "gradient")
    tests = np.array(sorted(set(g["test"].to_list()), key=lambda t: (test_labels[t], t)))
    ex = g.select("example", "label").unique().sort("label", "example")
    examples, ex_labels = ex["example"].to_numpy(), ex["label"].to_numpy()
    ti = {t: i for i, t in enumerate(tests)}
    ei = {e: i for i, e in enumerate(examples)}
    m = np.zeros((len(tests), len(examples)))
    for t, e, v in g.select("test", "example", "influence").iter_rows():
        m[ti[t], ei[e]] += v
    return m, test_labels[tests], ex_labels


def block_contrast(m: np.ndarray, tl: np.ndarray, el: np.ndarray) -> tuple[float, float]:
    """Mean kernel entry between pairs of the same label and of different labels."""
    same = tl[:, None] == el[None, :]
    return float(m[same].mean()), float(m[~same].mean())


def similarity_matrices(frame: pl.DataFrame) -> dict[str, np.ndarray]:
    out = {}
    for lay in frame["layer"].unique().to_list():
        f = frame.filter(pl.col("layer") == lay)
        tests = sorted(set(f["test"].to_list()))
        idx = {t: i for i, t in enumerate(tests)}
        m = np.full((len(tests), len(tests)), np.nan)
        for t, u, c in f.select("test", "test_2", "cosine").iter_rows():
            m[idx[t], idx[u]] = c
        out[lay] = m
    return out


def layer_kernel_matrices(frame: pl.DataFrame) -> dict[str, np.ndarray]:
    """layer -> test x example matrix of the gradient term (rows and columns in index order)."""
    g = frame.filter(pl.col("term") == "gradient")
    tests = sorted(set(g["test"].to_list()))
    examples = sorted(set(g["example"].to_list()))
    ti = {t: i for i, t in enumerate(tests)}
    ei = {e: i for i, e in enumerate(examples)}
    out = {}
    for lay in g["layer"].unique().to_list():
        m = np.zeros((len(tests), len(examples)))
        for t, e, v in g.filter(pl.col("layer") == lay).select("test", "example", "influence").iter_rows():
            m[ti[t], ei[e]] += v
        out[lay] = m
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.ravel(), b.ravel()
    if np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def alignment(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the off-diagonal entries of two test x test similarity matrices."""
    off = ~np.eye(len(a), dtype=bool)
    x, y = a[off], b[off]
    if np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


# -- plots ----------------------------------------------------------------------------------

def shade_phases(ax, phases):
    for (a, b), color in zip(phases, ("#dddddd", "#fde9c9", "#d5ecd4")):
        if a is not None and b is not None and b > a:
            ax.axvspan(a, b, color=color, alpha=0.6, lw=0)


def plot_curves(plt, acc_train, acc_test, phases, path):
    fig, ax = plt.subplots(figsize=(7, 3.2))
    shade_phases(ax, phases)
    ax.plot(acc_train["step"], acc_train["accuracy"], label="train", color="k")
    ax.plot(acc_test["step"], acc_test["accuracy"], label="test", color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="center right")
    ax.set_title("Learning curves (evaluate, read back from the store)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layer_influence(plt, test_frame, train_frame, phases, path):
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.2), sharex=True)
    for col, (frame, what) in enumerate(((test_frame, "test pairs (all 452)"), (train_frame, "training pairs 0-255"))):
        series = per_layer_series(frame)
        for row, cumulative in enumerate((False, True)):
            ax = axes[row, col]
            shade_phases(ax, phases)
            for lay, (steps, vals) in series.items():
                ax.plot(steps, np.cumsum(vals) if cumulative else vals, label=lay, color=COLORS[lay])
            ax.axhline(0, color="k", lw=0.5)
            ax.set_title(f"{'cumulative ' if cumulative else ''}influence on {what}", fontsize=10)
            if col == 0:
                ax.set_ylabel("Δ Σ log p(label)" + (" since step 0" if cumulative else " per bin"))
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=8, ncol=2)
    fig.suptitle("Per-layer influence over training (all terms: gradient + weight decay)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kernels(plt, kernels, path):
    fig, axes = plt.subplots(1, len(kernels), figsize=(4.2 * len(kernels), 3.8))
    for ax, (title, (m, tl, el)) in zip(np.atleast_1d(axes), kernels):
        lim = float(np.abs(m).max()) or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        for bounds, draw in ((np.nonzero(np.diff(tl))[0], ax.axhline), (np.nonzero(np.diff(el))[0], ax.axvline)):
            for bnd in bounds:
                draw(bnd + 0.5, color="k", lw=0.6)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"training pairs (by label {', '.join(map(str, sorted(set(el.tolist()))))})", fontsize=8)
        ax.set_ylabel("test pairs (by label)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    fig.suptitle("Test x train kernel matrices (gradient term) in 50-step windows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_balance(plt, train_frame, test_frame, phases, path):
    fig, axes = plt.subplots(2, len(LAYERS), figsize=(14, 5.4), sharex=True)
    for row, (frame, what) in enumerate(((train_frame, "train"), (test_frame, "test"))):
        grad = per_layer_series(frame, "gradient")
        wd = per_layer_series(frame, "weight_decay")
        for col, lay in enumerate(LAYERS):
            ax = axes[row, col]
            shade_phases(ax, phases)
            ax.plot(*grad[lay], color="tab:blue", label="gradient (kernel)")
            ax.plot(wd[lay][0], -wd[lay][1], color="tab:red", ls="--", label="− weight decay")
            ax.plot(grad[lay][0], grad[lay][1] + wd[lay][1], color="k", lw=0.8, label="net (sum)")
            ax.axhline(0, color="k", lw=0.5)
            ax.set_title(f"{lay} ({what})", fontsize=10)
            if row == 1:
                ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Kernel (gradient) term vs weight-decay term per layer, per bin of steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_similarity(plt, windows, aligned, kernel_agree, mean_cos, phases, path):
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    mids = [(a + b) / 2 for a, b in windows]
    for ax, values, title, ylabel in (
            (axes[0], aligned, "similarity: outer layer vs inner pipeline",
             "corr. of test x test cosine matrices"),
            (axes[1], kernel_agree, "kernels: outer layer vs inner pipeline",
             "corr. of test x train kernel matrices")):
        shade_phases(ax, phases)
        for lay in OUTER:
            ax.plot(mids, values[lay], marker="o", label=lay, color=COLORS[lay])
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_xlabel("step (window centre)")
        ax.legend(fontsize=8)
    ax = axes[2]
    shade_phases(ax, phases)
    for lay in LAYERS:
        ax.plot(mids, mean_cos[lay], marker=".", label=lay, color=COLORS[lay])
    ax.axhline(0, color="k", lw=0.5)
    ax.set_title("similarity: mean off-diagonal cosine per layer", fontsize=10)
    ax.set_xlabel("step (window centre)")
    ax.legend(fontsize=8, ncol=2)
    fig.suptitle("Outer layers (emb, unembed) vs the inner pipeline (attn, linear1, linear2), "
                 f"{windows[0][1] - windows[0][0]}-step windows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the report -----------------------------------------------------------------------------

def md_table(frame: pl.DataFrame, digits: int = 4) -> str:
    cols = frame.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.iter_rows():
        cells = [f"{v:.{digits}g}" if isinstance(v, float) else ("" if v is None else str(v)) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default=str(HERE / "runs" / "small.zarr"), help="the recorded run")
    ap.add_argument("--queries", default=str(HERE / "queries.eql"))
    ap.add_argument("--out", default=str(HERE), help="where REPORT.md and the PNGs go")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="override a `param` default of the script; repeatable")
    ap.add_argument("--window", type=int, default=100, help="steps per similarity window")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the model is tiny)")
    args = ap.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.set_num_threads(args.threads)
    store, out = Path(args.store), Path(args.out)
    if not store.exists():
        sys.exit(f"no run at {store}; record it first: python {HERE / 'train.py'} --out {store}")
    out.mkdir(parents=True, exist_ok=True)
    params = dict(p.split("=", 1) for p in args.param)
    text = Path(args.queries).read_text()
    entries = script_entries(text, params)
    t_start = time.perf_counter()
    run = explaind_ql.open(store)
    print(run, flush=True)
    q = Runner(run)
    windowed = ("similarity", "layer_kernels")  # run once per window below
    res = {name: q(name, query) for name, query in entries.items() if name not in windowed}

    # phases from the learning curves
    acc_train, acc_test = res["accuracy_train"], res["accuracy_test"]
    mem = first_step(acc_train, 0.99)
    onset = first_step(acc_test, 0.10)
    grok = first_step(acc_test, 0.50)
    done = first_step(acc_test, 0.95)
    phases = [(0, mem), (mem, grok if grok is not None else run.n_steps),
              (grok, done if done is not None else run.n_steps)]

    # similarity windows: outer layers vs the inner pipeline, two ways
    win = args.window
    windows = [(a, min(a + win, run.n_steps)) for a in range(0, run.n_steps, win)]
    aligned = {lay: [] for lay in OUTER}
    kernel_agree = {lay: [] for lay in OUTER}
    mean_cos = {lay: [] for lay in LAYERS}
    for a, b in windows:
        bound = script_entries(text, {**params, "a": str(a), "b": str(b)})
        mats = similarity_matrices(q(f"similarity {a}:{b}", bound["similarity"]))
        inner = np.mean([mats[lay] for lay in INNER], axis=0)
        off = ~np.eye(len(inner), dtype=bool)
        for lay in OUTER:
            aligned[lay].append(alignment(mats[lay], inner))
        for lay in LAYERS:
            mean_cos[lay].append(float(mats[lay][off].mean()))
        kmats = layer_kernel_matrices(q(f"layer_kernels {a}:{b}", bound["layer_kernels"]))
        kinner = sum(kmats[lay] for lay in INNER)
        for lay in OUTER:
            kernel_agree[lay].append(pearson(kmats[lay], kinner))

    # kernels
    test_labels = run.split("test")[1].numpy()
    kernel_names = [n for n in res if n.startswith("kernel_")]
    kernels = []
    kernel_rows = []
    for name in kernel_names:
        m, tl, el = kernel_matrix(res[name], test_labels)
        window = entries[name].split("over steps ")[1].split()[0]
        kernels.append((f"{name.removeprefix('kernel_')} (steps {window})", (m, tl, el)))
        same, diff = block_contrast(m, tl, el)
        kernel_rows.append({"window": name.removeprefix("kernel_"), "steps": window, "test pairs": m.shape[0],
                            "training pairs": m.shape[1], "mean same-label entry": same,
                            "mean other-label entry": diff, "max abs entry": float(np.abs(m).max())})

    plot_curves(plt, acc_train, acc_test, phases, out / "curves.png")
    plot_layer_influence(plt, res["layer_influence_test"], res["layer_influence_train"], phases,
                         out / "layer_influence.png")
    plot_kernels(plt, kernels, out / "kernels.png")
    plot_balance(plt, res["layer_influence_train"], res["layer_influence_test"], phases, out / "balance.png")
    plot_similarity(plt, windows, aligned, kernel_agree, mean_cos, phases, out / "similarity.png")
    total = time.perf_counter() - t_start

    write_report(out / "REPORT.md", run, args, entries, res, phases, (mem, onset, grok, done), kernel_rows,
                 windows, aligned, kernel_agree, mean_cos, q.timings, total)
    print(f"wrote {out / 'REPORT.md'} and 5 PNGs in {total:.0f} s")


def paper_section() -> str:
    """The whole file on the paper config's run at the default tolerance, as bench/bench_grokking.py last measured
    it (its table and notes, without its title): too long to rerun with every report."""
    if not PAPER_TIMES.exists():
        return "Not measured on this checkout: `python bench/bench_grokking.py --write`."
    return PAPER_TIMES.read_text().split("\n", 1)[1].strip()


def write_report(path, run, args, entries, res, phases, marks, kernel_rows, windows, aligned, kernel_agree,
                 mean_cos, timings, total) -> None:
    mem, onset, grok, done = marks
    params = dict(p.split("=", 1) for p in args.param)
    info = run.info()
    hyper = info["optimizer"]["groups"][0]
    n_train, n_test = info["splits"]["train"], info["splits"]["test"]
    betas = hyper["betas"]
    betas = f"({', '.join(f'{b:g}' for b in betas)})" if isinstance(betas, (list, tuple)) else betas
    fk = run.attrs["factory_kwargs"]
    acc_test, acc_train = res["accuracy_test"], res["accuracy_train"]
    final_test = float(acc_test["accuracy"][-1])
    regen = "python examples/grokking/train.py && python examples/grokking/report.py"
    extra = " ".join(f"--param {shlex.quote(p)}" for p in args.param)
    if extra:
        regen = f"{regen} {extra}"

    def lay_sum(frame, lo, hi=None, term=None):
        f = frame.filter(pl.col("step") >= lo)
        if hi is not None:
            f = f.filter(pl.col("step") < hi)
        if term is not None:
            f = f.filter(pl.col("term") == term)
        return f.group_by("layer").agg(pl.col("influence").sum())

    # per-layer totals per phase (test)
    lit = res["layer_influence_test"]
    bounds = [("memorisation", 0, mem), ("plateau", mem, grok), ("generalisation", grok, done),
              ("cleanup", done, None)]
    rows = []
    for name, lo, hi in bounds:
        if lo is None:
            continue
        s = {r[0]: r[1] for r in lay_sum(lit, lo, hi).iter_rows()}
        rows.append({"phase": name, "steps": f"{lo}:{'' if hi is None else hi}",
                     **{lay: s.get(lay, 0.0) for lay in LAYERS}})
    phase_table = pl.DataFrame(rows)

    bal = []
    for split in ("train", "test"):
        f = res[f"balance_{split}"]
        for lay in LAYERS:
            g = f.filter((pl.col("layer") == lay))
            terms = {t: float(g.filter(pl.col("term") == t)["influence"].sum())
                     for t in ("gradient", "weight_decay", "momentum")}
            bal.append({"split": split, "layer": lay, **terms,
                        "total": sum(terms.values()),
                        "decay / gradient (abs)": abs(terms["weight_decay"]) / max(abs(terms["gradient"]), 1e-300)})
    bal_table = pl.DataFrame(bal)

    sim_rows = [{"window": f"{a}:{b}", **{f"{lay} vs inner (similarity)": aligned[lay][i] for lay in OUTER},
                 **{f"{lay} vs inner (kernel)": kernel_agree[lay][i] for lay in OUTER},
                 **{f"mean cos {lay}": mean_cos[lay][i] for lay in LAYERS}} for i, (a, b) in enumerate(windows)]
    sources = {e.name: " ".join(e.source.split()) for e in parse_script(Path(args.queries).read_text(), params)
               if e.name}
    check = res["check_jump"].select("test", "actual", "explained", "residual", "relative_residual",
                                     "max_update_error")
    curve_rows = acc_test.join(acc_train, on="step", suffix="_train").filter(pl.col("step") % 100 == 0).select(
        "step", pl.col("accuracy_train").alias("train accuracy"), pl.col("accuracy").alias("test accuracy"),
        pl.col("loss").alias("test loss"))
    timing_table = pl.DataFrame({"result": [t[0] for t in timings], "seconds": [round(t[2], 1) for t in timings]})

    md = f"""# Grokking, decomposed: the ExPLAIND analyses on the small config

Regenerate this report and its plots (queries: about {max(1, round(total / 60))} minutes on 2 CPU
cores; training: under a minute):

```bash
{regen}
```

The run is the **small config** of `train.py` (the paper's p = 113 setup takes half an hour
to query on a CPU: its times are the last section): the paper's one-layer modular-addition
transformer (no LayerNorm, ReLU MLP) at p = {fk['p']}, d_model {fk['d_model']}, {fk['n_heads']} heads,
MLP {fk['d_mlp']}, trained full batch on {n_train} of the {n_train + n_test}
pairs a ≥ b ({n_test} held out) with AdamW (lr {hyper['lr']:g}, betas {betas},
weight decay {hyper['weight_decay']:g}) for {run.n_steps} steps, a checkpoint every {run.checkpoint_every} steps
({info['bytes_on_disk'] / 2**20:.1f} MiB). Every number below is a query of
[`queries.eql`](queries.eql) on that store, run by [`report.py`](report.py); influence is
measured on the log-probability of the right answer, summed over the selected pairs, with
`using quadrature 2` (two Gauss–Legendre nodes per step, see the replication check at the end).

## Summary

{summary(res, phase_table, bal_table, kernel_rows, windows, aligned, kernel_agree, marks)}

## Learning curves: memorisation, then grokking

![learning curves](curves.png)

Train accuracy reaches 99 % at step **{mem}**; test accuracy stays near chance
(1/{fk['p']}) until it passes 10 % at step **{onset}**, 50 % at step **{grok}** and 95 % at
step **{done}**, ending at {final_test:.1%}: the generalisation jump comes about
{(grok or 0) - (mem or 0)} steps after memorisation. Shading: memorisation (grey), plateau
(orange), generalisation jump (green).

{md_table(curve_rows)}

## 1. Per-layer influence over training steps

`layer_influence_test`: {entries['layer_influence_test']}
`layer_influence_train`: {entries['layer_influence_train']}

![per-layer influence](layer_influence.png)

Per phase, summed over the bins (test pairs, Δ of Σ log p(label), all terms):

{md_table(phase_table, 3)}

{layer_prose(phase_table)}

## 2. Kernel matrices around the phase changes

`kernel_*`: {entries[[n for n in entries if n.startswith('kernel_')][0]]} (and the other windows)

![kernel matrices](kernels.png)

{md_table(pl.DataFrame(kernel_rows), 3)}

{kernel_prose(kernel_rows)}

## 3. Kernel vs weight decay, per layer

Per bin (the `term` column of the layer-influence queries; top row: training pairs 0-255,
bottom row: test pairs; the decay term is drawn negated, so where the curves meet the two
cancel):

![kernel vs weight decay](balance.png)

Over everything after memorisation (`balance_train`: {entries['balance_train']};
`balance_test` likewise on the test pairs):

{md_table(bal_table, 3)}

{balance_prose(bal_table)}

## 4. Outer layers vs the inner pipeline over time

Two queries per window of {args.window} steps (`$a:$b` slides over the run):

- `similarity`: {sources['similarity']}
- `layer_kernels`: {sources['layer_kernels']}

`similarity` gives, per layer, the test × test cosine similarities of the test pairs'
per-parameter influence vectors (32 test pairs). The left panel correlates the
embedding's and the unembedding's matrices with the mean matrix of the inner layers
(attn, linear1, linear2); the middle panel asks the same in data-attribution terms, the
correlation of each outer layer's test × train kernel matrix (32 × 128 pairs, gradient
term) with the inner layers' summed kernel; the right panel is the mean off-diagonal
cosine of each layer (how much the test pairs share their parameter updates). Rising
curves in the first two panels would mean that the outer layers come to treat the test
pairs the way the inner pipeline does.

![outer vs inner similarity](similarity.png)

{md_table(pl.DataFrame(sim_rows), 3)}

{similarity_prose(windows, aligned, kernel_agree, grok)}

## 5. Replication check

`check_jump` (adaptive quadrature, tolerance 1e-6): {entries['check_jump']}

{md_table(check, 3)}

`max_update_error` is invariant 3 (the recorded update rebuilt from per-example float64
gradients, relative to the update's largest element); on this float32 ReLU run it can
exceed 1e-6 at a step where a unit sits on its ReLU kink and float32 and float64 round to
different sides. Record with `--dtype float64` to remove that.

## Query times

{md_table(timing_table)}

Total {total:.0f} s ({run!r}).

## The same file at the paper's scale

The paper config (`train.py --config paper`: p = 113, 2,000 steps), every query of the file at the
default adaptive tolerance instead of `using quadrature 2`, the influence queries on 100 test pairs
(measured apart from this report, whose sliding similarity windows would cover all 2,000 steps):

{paper_section()}
"""
    path.write_text(md)


def summary(res, phase_table, bal_table, kernel_rows, windows, aligned, kernel_agree, marks) -> str:
    mem, onset, grok, done = marks
    lines = [f"- **Grokking**: train accuracy 99 % at step {mem}, test accuracy 50 % at step {grok} "
             f"({(grok or 0) - (mem or 0)} steps later) and 95 % at step {done}."]
    rows = {r["phase"]: r for r in phase_table.iter_rows(named=True)}
    if "memorisation" in rows and "plateau" in rows:
        m, pl_ = rows["memorisation"], rows["plateau"]
        low = min(LAYERS, key=lambda k: m[k])
        high = max(LAYERS, key=lambda k: pl_[k])
        m_sum = sum(m[k] for k in LAYERS)
        who = "every layer" if all(pl_[k] > 0 for k in LAYERS) else "the layers together"
        lines.append(f"- **Per-layer influence**: while the model memorises, its updates "
                     f"{'lower' if m_sum < 0 else 'raise'} the test log-probabilities (Σ {m_sum:.3g}), most of all "
                     f"through **{low}** ({m[low]:.3g}); in the plateau before the jump {who} "
                     f"{'raises' if sum(pl_[k] for k in LAYERS) > 0 else 'lowers'} them, **{high}** most "
                     f"({pl_[high]:.3g}).")
    tr = bal_table.filter(pl.col("split") == "train")
    te = bal_table.filter(pl.col("split") == "test")
    g_tr, w_tr = float(tr["gradient"].sum()), float(tr["weight_decay"].sum())
    g_te, w_te = float(te["gradient"].sum()), float(te["weight_decay"].sum())
    lit = res["layer_influence_test"]
    grad_bins = lit.filter(pl.col("term") == "gradient").group_by("step").agg(pl.col("influence").sum()).sort("step")
    positive = grad_bins.filter((pl.col("step") >= (mem or 0)) & (pl.col("influence") > 0))
    flip = int(positive["step"][0]) if len(positive) else None
    lines.append(f"- **Kernel vs weight decay**: after memorisation the two terms cancel on the training pairs "
                 f"(gradient {g_tr:.3g}, decay {w_tr:.3g}). On the test pairs the data (gradient) term "
                 f"{'lowers' if g_te < 0 else 'raises'} the log-probabilities ({g_te:.3g}) and decay "
                 f"{'raises' if w_te > 0 else 'lowers'} them ({w_te:.3g})"
                 + (f"; the gradient term on the test pairs turns positive from the bin at step {flip} on."
                    if flip is not None else "."))
    if kernel_rows:
        first, last = kernel_rows[0], kernel_rows[-1]
        lines.append(f"- **Kernel matrices**: block-diagonal by label in every window (same-label entries "
                     f"{first['mean same-label entry']:.3g} vs {first['mean other-label entry']:.3g} in "
                     f"{first['window']}), and shrinking: largest |entry| {first['max abs entry']:.3g} in "
                     f"{first['window']}, {last['max abs entry']:.3g} in {last['window']}.")
    trend = []
    for lay in OUTER:
        for what, vals in (("similarity", aligned[lay]), ("kernel", kernel_agree[lay])):
            trend.append(f"{lay}/{what} {vals[0]:.2f} → {vals[-1]:.2f}")
    lines.append(f"- **Outer vs inner**: correlation with the inner pipeline from the first to the last window: "
                 f"{'; '.join(trend)}.")
    chk = res["check_jump"]
    lines.append(f"- **Replication**: with adaptive quadrature the decomposition matches the real change to a "
                 f"relative residual of at most {float(chk['relative_residual'].max()):.2g} (steps of the jump).")
    return "\n".join(lines)


def layer_prose(t: pl.DataFrame) -> str:
    rows = {r["phase"]: r for r in t.iter_rows(named=True)}
    lines = []
    for phase in ("memorisation", "plateau", "generalisation", "cleanup"):
        if phase not in rows:
            continue
        r = rows[phase]
        vals = {lay: r[lay] for lay in LAYERS}
        top = max(vals, key=lambda k: abs(vals[k]))
        sign = "raised" if sum(vals.values()) > 0 else "lowered"
        lines.append(f"- **{phase}** (steps {r['steps']}): the layers together {sign} the test log-probabilities "
                     f"(Σ = {sum(vals.values()):.3g}); the largest share is **{top}** ({vals[top]:.3g}).")
    return "\n".join(lines)


def kernel_prose(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        ratio = r["mean same-label entry"] / max(abs(r["mean other-label entry"]), 1e-300)
        lines.append(f"- **{r['window']}** (steps {r['steps']}): same-label entries average "
                     f"{r['mean same-label entry']:.3g} against {r['mean other-label entry']:.3g} for other labels "
                     f"(ratio {ratio:.2g}); largest |entry| {r['max abs entry']:.3g}.")
    return "\n".join(lines)


def balance_prose(t: pl.DataFrame) -> str:
    out = []
    for split in ("train", "test"):
        f = t.filter(pl.col("split") == split)
        g, w = float(f["gradient"].sum()), float(f["weight_decay"].sum())
        out.append(f"- **{split}**: gradient {g:.3g}, weight decay {w:.3g} (|decay| / |gradient| = "
                   f"{abs(w) / max(abs(g), 1e-300):.2f}), total change {float(f['total'].sum()):.3g}.")
    return "\n".join(out)


def similarity_prose(windows, aligned, kernel_agree, grok) -> str:
    """Per outer layer and measure: first, highest, last; then whether the last window beats the last
    window before the jump (test accuracy 50 %)."""
    lines = []
    rising = []
    before = max([i for i, (_, b) in enumerate(windows) if grok is not None and b <= grok] or [0])
    for lay in OUTER:
        for what, vals in (("similarity", aligned[lay]), ("kernel", kernel_agree[lay])):
            i_max = int(np.nanargmax(vals))
            lines.append(f"- **{lay}** ({what}): correlation with the inner pipeline {vals[0]:.2f} in the first "
                         f"window, highest {vals[i_max]:.2f} in steps {windows[i_max][0]}:{windows[i_max][1]}, "
                         f"{vals[-1]:.2f} in the last.")
            rising.append(vals[-1] > vals[before])
    if not any(rising):
        lines.append("\nOn this small run neither measure shows the outer layers converging on the inner "
                     "pipeline after memorisation: every correlation is lower in the last window than before the "
                     "jump. The paper reports that alignment for the p = 113 model; whether it needs that scale, "
                     "more test pairs, or a different similarity than these two is not settled here "
                     "(run `train.py --config paper` and this report with `--store` to compare).")
    elif all(rising):
        lines.append("\nBoth outer layers correlate more with the inner pipeline at the end of the run than "
                     "before the jump, by both measures: the outer layers align with the inner pipeline after "
                     "memorisation, as the paper reports for its p = 113 model.")
    else:
        lines.append("\nThe two measures disagree on this small run (some correlations rise after the jump, "
                     "others fall), so it neither confirms nor refutes the paper's finding that the outer layers "
                     "align around the inner pipeline after memorisation.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
