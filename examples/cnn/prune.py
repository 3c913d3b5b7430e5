"""One-shot pruning of the digits CNN by ExPLAIND influence, against magnitude and random scores.

    python examples/cnn/prune.py                     # 3 seeds, writes examples/cnn/RESULTS.md (~5 min, 2 cores)
    python examples/cnn/prune.py --seeds 0 1 2 3 4   # the paper's 5 seeds

For each seed, ``train.py`` trains and records a fresh run (new initialisation and batch
order, same data split). Every element of the three weight tensors (``conv1.weight``,
``conv2.weight``, ``head.weight``: 1,384 of the 1,418 parameters; biases are never pruned)
then gets a score, and the lowest-scored fraction of them, ranked globally across the
three tensors, is set to zero, with no fine-tuning. Methods:

- ``influence``: the paper's score. The decomposition's influence of the element on each
  validation item's label logit (the default target), summed over steps, training examples
  and terms (gradient, weight decay), then ``Σ_items |influence|``. It comes from one query,
  ``influence of param conv1.weight, param conv2.weight, param head.weight on val[*]
  by test, element``: the training examples enter only through the decomposition, and
  the items it is measured on (``val``) are disjoint from the ``test`` items the accuracy
  is measured on.
- ``net influence``: the same frame summed over the items first, then ``|·|``: the element's
  net influence on the validation logits, where items' contributions can cancel.
- ``magnitude``: ``|θ|`` of the trained model.
- ``random``: a uniform random score (seeded by the run's seed).

Reported per method and fraction (mean ± std over seeds) on the held-out ``test`` split:
accuracy, agreement of the pruned model's predictions with the unpruned model's, and
KL(unpruned ‖ pruned) of the predictive distributions. ``check on test[*]``, with the
quadrature the scores use, is run on the first seed's run (``--check all``: every seed's)
and its residuals are reported.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

import explaind_ql

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import QUADRATURE, check, train  # noqa: E402  (train.py beside this file)

HERE = Path(__file__).resolve().parent
WEIGHTS = ("conv1.weight", "conv2.weight", "head.weight")
METHODS = ("influence", "net influence", "magnitude", "random")
FRACTIONS = tuple(round(0.1 * i, 1) for i in range(10))


def influence_scores(store: str | Path, using: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per weight element: ``Σ_items |I|`` and ``|Σ_items I|`` of its influence on the val label logits."""
    of = ", ".join(f"param {p}" for p in WEIGHTS)
    frame = explaind_ql.open(store).query(f"influence of {of} on val[*] by test, element using {using}")
    per_item = frame.group_by("param", "test", "element").agg(pl.col("influence").sum())  # all terms
    summed = per_item.group_by("param", "element").agg(
        pl.col("influence").abs().sum().alias("paper"), pl.col("influence").sum().abs().alias("net"))
    out: tuple[dict, dict] = ({}, {})
    for name in WEIGHTS:
        rows = summed.filter(pl.col("param") == name).sort("element")
        for scores, col in zip(out, ("paper", "net")):
            scores[name] = torch.from_numpy(rows[col].to_numpy().copy())
    return out


def prune(model: torch.nn.Module, scores: dict[str, torch.Tensor], fraction: float) -> torch.nn.Module:
    """A copy of ``model`` with the lowest-scored ``fraction`` of the weight elements (ranked globally) zeroed."""
    pruned = copy.deepcopy(model)
    flat = torch.cat([scores[n].reshape(-1) for n in WEIGHTS])
    k = int(round(fraction * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:k]] = False
    params = dict(pruned.named_parameters())
    with torch.no_grad():
        for name, mask in zip(WEIGHTS, keep.split([params[n].numel() for n in WEIGHTS])):
            params[name].mul_(mask.reshape(params[name].shape).to(params[name].dtype))
    return pruned


def evaluate(model: torch.nn.Module, reference: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy, agreement with the reference model's argmax, KL(reference ‖ model) (mean over items)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(x), -1)
    ref = torch.log_softmax(reference, -1)
    return {"accuracy": float((logp.argmax(-1) == y).double().mean()),
            "agreement": float((logp.argmax(-1) == ref.argmax(-1)).double().mean()),
            "kl": float((ref.exp() * (ref - logp)).sum(-1).mean())}


def one_seed(seed: int, out_dir: Path, fractions, quadrature: int, with_check: bool, log: bool,
             **train_kw) -> dict:
    """Train + record one run, score its weights four ways, prune at every fraction, evaluate on test."""
    t0 = time.perf_counter()
    run = train(out_dir / f"seed{seed}.zarr", seed, log=False, **train_kw)
    model, (xte, yte) = run["model"], run["splits"]["test"]
    using = f"quadrature {quadrature}" if quadrature else "tolerance 1e-6"
    t1 = time.perf_counter()
    paper, net = influence_scores(run["store"], using)
    t2 = time.perf_counter()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    scores = {"influence": paper, "net influence": net,
              "magnitude": {n: params[n].detach().abs() for n in WEIGHTS},
              "random": {n: torch.rand(params[n].shape, generator=g, dtype=torch.float64) for n in WEIGHTS}}
    with torch.no_grad():
        reference = model(xte)
    rows = [{"seed": seed, "method": m, "fraction": f, **evaluate(prune(model, scores[m], f), reference, xte, yte)}
            for m in METHODS for f in fractions]
    t3 = time.perf_counter()
    chk = check(run["store"], using) if with_check else None
    t4 = time.perf_counter()
    times = {"train + record": t1 - t0, "influence query": t2 - t1, "prune + evaluate": t3 - t2, "check": t4 - t3}
    if log:
        print(f"seed {seed}: {run['steps']} steps, test accuracy {run['test_acc']:.1%}; "
              + ", ".join(f"{k} {v:.1f} s" for k, v in times.items())
              + (f"; check max |residual| {chk['max_abs_residual']:.1e}" if chk else ""), flush=True)
    return {"rows": rows, "check": chk, "times": times, "test_acc": run["test_acc"], "steps": run["steps"],
            "store": run["store"],
            "n_weights": sum(params[n].numel() for n in WEIGHTS)}


def experiment(seeds=(0, 1, 2), fractions=FRACTIONS, out_dir: str | Path = HERE / "runs",
               quadrature: int = QUADRATURE, checks: str = "first", log: bool = True, **train_kw) -> dict:
    """Every seed's rows, checks and timings; ``frame`` holds one row per (seed, method, fraction).

    ``checks``: run ``check on test[*]`` for the ``first`` seed, ``all`` seeds or ``none``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    per_seed = [one_seed(s, out_dir, fractions, quadrature, checks == "all" or (checks == "first" and i == 0),
                         log, **train_kw) for i, s in enumerate(seeds)]
    return {"frame": pl.DataFrame([r for p in per_seed for r in p["rows"]]), "seeds": list(seeds),
            "per_seed": per_seed, "seconds": time.perf_counter() - t0}


def table(frame: pl.DataFrame, metric: str, fmt: str) -> str:
    """Markdown: one row per fraction, one column per method, ``mean ± std`` over seeds."""
    stats = frame.group_by("method", "fraction").agg(pl.col(metric).mean().alias("mean"),
                                                     pl.col(metric).std().fill_null(0.0).alias("std"))
    fractions = sorted(frame["fraction"].unique())
    methods = [m for m in METHODS if m in set(frame["method"])]
    lines = ["| pruned | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for f in fractions:
        cells = []
        for m in methods:
            r = stats.filter((pl.col("method") == m) & (pl.col("fraction") == f)).row(0, named=True)
            cells.append(f"{r['mean']:{fmt}} ± {r['std']:{fmt}}")
        lines.append(f"| {f:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(result: dict, command: str) -> str:
    """RESULTS.md: the command, timings, the check residuals, and the tables."""
    frame, per_seed = result["frame"], result["per_seed"]
    accs = np.array([p["test_acc"] for p in per_seed])
    checks = [(seed, p["check"]) for seed, p in zip(result["seeds"], per_seed) if p["check"]]
    phase = {k: sum(p["times"][k] for p in per_seed) for k in per_seed[0]["times"]}
    lines = [
        "# Pruning the digits CNN by influence: results", "",
        "Regenerate with (from the repository root):", "", "```bash", command, "```", "",
        f"Measured wall time: {result['seconds']:.0f} s for {len(per_seed)} seeds, one torch thread ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in phase.items()) + ").", "",
        f"Unpruned models ({len(per_seed)} seeds, {per_seed[0]['steps']} SGD steps each): test accuracy "
        f"{accs.mean():.1%} ± {accs.std(ddof=1) if len(accs) > 1 else 0.0:.1%}.", "",
    ]
    if checks:
        c0 = checks[0][1]
        lines += [
            f"## Replication: `{c0['query']}`", "",
            f"The decomposition's total against the real change of each of the {c0['items']} test items' "
            "label logit over the whole run (`relative_residual` is the residual over the size of the "
            "change; `max_update_error` is how far the recorded optimizer model is from the real updates):", "",
            "| seed | max \\|residual\\| | max relative residual | largest \\|change\\| | max update error "
            "| unconverged steps | seconds |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [f"| {seed} | {c['max_abs_residual']:.1e} | {c['max_relative_residual']:.1e} | "
                  f"{c['max_abs_change']:.3g} | {c['max_update_error']:.1e} | {c['unconverged_steps']} | "
                  f"{c['seconds']:.0f} |" for seed, c in checks]
    for title, metric, fmt in (("Test accuracy", "accuracy", ".3f"),
                               ("Agreement with the unpruned model's predictions", "agreement", ".3f"),
                               ("KL(unpruned ‖ pruned), mean over test items", "kl", ".3f")):
        lines += ["", f"## {title} (mean ± std over seeds)", "",
                  f"Rows: the fraction of the {per_seed[0]['n_weights']:,} weight elements set to zero, "
                  "lowest score first.", "", table(frame, metric, fmt)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one training run each (default 0 1 2)")
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS),
                    help="fractions of the weights to prune (default 0, 0.1, ..., 0.9)")
    ap.add_argument("--epochs", type=int, help="training epochs (default: train.py's, 10)")
    ap.add_argument("--n-train", type=int, help="training images (default 1000)")
    ap.add_argument("--n-val", type=int, help="validation images the scores are measured on (default 200)")
    ap.add_argument("--n-test", type=int, help="test images (default: the 597 that are left)")
    ap.add_argument("--quadrature", type=int, default=QUADRATURE,
                    help=f"Gauss–Legendre nodes per step for the scores and the check (default {QUADRATURE}; "
                         "0: adaptive to a relative tolerance of 1e-6)")
    ap.add_argument("--check", choices=("first", "all", "none"), default="first",
                    help="run `check on test[*]` for the first seed (default), every seed, or none")
    ap.add_argument("--runs", default=str(HERE / "runs"), help="where the recorded runs go")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="the markdown report to write")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the model is tiny: one thread is fastest and leaves the other cores free
    result = experiment(args.seeds, args.fractions, args.runs, args.quadrature, args.check, epochs=args.epochs,
                        n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "examples/cnn/prune.py", *argv])
    out = Path(args.results)
    out.write_text(report(result, command))
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    return out


if __name__ == "__main__":
    main()
