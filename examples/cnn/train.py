"""Train and record a small CNN on scikit-learn's bundled 8×8 digits (10 classes, nothing downloaded).

    python examples/cnn/train.py                          # seed 0 into examples/cnn/runs/seed0.zarr, ~5 s
    python examples/cnn/train.py --seed 3 --out runs/cnn-3.zarr --check   # then `check on test[*]` (~2 min)

The model is ``explaind_ql.models:TinyCNN`` (two 3×3 convolutions without BatchNorm, GELU,
global average pooling, a linear head; 1,418 parameters at width 8), trained in float64 with
``torch.optim.SGD(lr=0.3, momentum=0.9, nesterov=True, weight_decay=5e-4)`` on shuffled
minibatches of 50 for 12 epochs (240 steps), the learning rate decaying linearly to 0 and
the gradient norm clipped at 1 (``rec.clip_grad_norm_``). :class:`explaind_ql.Recorder`
verifies every update as it is taken. The store holds three splits:

- ``train``: the 1,000 images the model is trained on (the batches index into it);
- ``val``: 200 held-out images, used only to *score* parameters (``prune.py``);
- ``test``: the other 597 images, used only to measure accuracy and for ``check``.

GELU is smooth, the run is float64, and the decay and the clip keep the late steps short, so
five Gauss–Legendre nodes per step integrate each step's path to ~1e-6 of the change:
``--check`` runs ``check on test[*] using quadrature 5`` and prints its largest residual
(``--quadrature 0``: the default adaptive rule, to 1e-6 relative and beyond, but ~10x slower
here; without the decay and the clip the steps are long enough that 3 fixed nodes leave
residuals of 1e-2).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import explaind_ql
from explaind_ql.models import TinyCNN

HERE = Path(__file__).resolve().parent
FACTORY = "explaind_ql.models:TinyCNN"
DEFAULTS = dict(width=8, lr=0.3, momentum=0.9, weight_decay=5e-4, batch=50, epochs=12, clip=1.0,
                n_train=1000, n_val=200, n_test=None, data_seed=0)
QUADRATURE = 5  # Gauss–Legendre nodes per step for the check (and prune.py's scores)


def digits_splits(n_train: int = 1000, n_val: int = 200, n_test: int | None = None, data_seed: int = 0,
                  dtype: torch.dtype = torch.float64) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The 1,797 digits, shuffled once by ``data_seed``, as train / val / test ``(X, y)`` pairs.

    Images are ``(N, 1, 8, 8)``, standardised with the training split's mean and std.
    ``n_test=None`` gives the test split every image that train and val leave.
    """
    from sklearn.datasets import load_digits  # scikit-learn ships the data set: nothing is downloaded

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=dtype).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(data_seed))
    stop = len(x) if n_test is None else n_train + n_val + n_test
    if n_train < 1 or n_val < 1 or stop > len(x) or stop <= n_train + n_val:
        raise ValueError(f"splits of {n_train}/{n_val}/{n_test} do not fit the {len(x)} digits")
    parts = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val], "test": perm[n_train + n_val:stop]}
    mean, std = x[parts["train"]].mean(), x[parts["train"]].std()
    return {name: ((x[idx] - mean) / std, y[idx]) for name, idx in parts.items()}


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


def train(out: str | Path, seed: int = 0, log: bool = True, **overrides) -> dict:
    """Train TinyCNN on the digits and record the run into ``out``.

    Returns the config, the trained model, the splits, the test accuracy and the seconds taken.
    """
    cfg = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    splits = digits_splits(cfg["n_train"], cfg["n_val"], cfg["n_test"], cfg["data_seed"])
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    torch.manual_seed(seed)
    kw = {"in_ch": 1, "classes": 10, "width": cfg["width"], "act": "gelu"}
    model = TinyCNN(**kw).double()
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True,
                          weight_decay=cfg["weight_decay"])
    total = cfg["epochs"] * -(-len(xtr) // cfg["batch"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / total)  # linear decay to 0
    order_gen = torch.Generator().manual_seed(10_000 + seed)
    t0 = time.perf_counter()
    with explaind_ql.Recorder(out, model, opt, train=splits["train"], test=splits["test"], val=splits["val"],
                              loss="cross_entropy", factory=FACTORY, factory_kwargs=kw, overwrite=True) as rec:
        for epoch in range(cfg["epochs"]):
            order = torch.randperm(len(xtr), generator=order_gen)
            for idx in order.split(cfg["batch"]):  # the last batch may be smaller: that is recorded too
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                rec.clip_grad_norm_(cfg["clip"])  # clips like torch.nn.utils.clip_grad_norm_ and records it
                opt.step()
                sched.step()  # before rec.step: the recorder reads the next step's lr there
                rec.step(idx, loss=loss)
            if log:
                print(f"epoch {epoch + 1:2d}  step {rec.n_steps:4d}  loss {float(loss.detach()):.4f}  "
                      f"test acc {accuracy(model, xte, yte):6.1%}", flush=True)
    return {"config": cfg, "seed": seed, "store": str(out), "model": model, "splits": splits,
            "steps": rec.n_steps, "test_acc": accuracy(model, xte, yte), "seconds": time.perf_counter() - t0}


def check(store: str | Path, using: str = "") -> dict:
    """``check on test[*]`` (with ``using`` options, if any): the decomposition against the real change."""
    query = f"check on test[*]{' using ' + using if using else ''}"
    t0 = time.perf_counter()
    frame = explaind_ql.open(store).query(query)
    return {"query": query, "seconds": time.perf_counter() - t0, "items": frame.height,
            "max_abs_residual": float(frame["residual"].abs().max()),
            "max_relative_residual": float(frame["relative_residual"].max()),
            "max_abs_change": float(frame["actual"].abs().max()),
            "max_update_error": float(frame["max_update_error"].max()),
            "unconverged_steps": int(frame["unconverged_steps"].max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed (default 0)")
    ap.add_argument("--out", help="store path (default: examples/cnn/runs/seed<SEED>.zarr)")
    ap.add_argument("--epochs", type=int, help=f"epochs (default {DEFAULTS['epochs']})")
    ap.add_argument("--check", action="store_true", help="then run `check on test[*]` and print its residuals")
    ap.add_argument("--quadrature", type=int, default=QUADRATURE,
                    help=f"Gauss–Legendre nodes per step for --check (default {QUADRATURE}; 0: adaptive to 1e-6)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the ops are tiny)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else HERE / "runs" / f"seed{args.seed}.zarr"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = train(out, args.seed, epochs=args.epochs)
    print(f"recorded {result['steps']} steps into {out} in {result['seconds']:.1f} s; "
          f"test accuracy {result['test_acc']:.1%}")
    if args.check:
        c = check(out, f"quadrature {args.quadrature}" if args.quadrature else "")
        print(f"{c['query']}: {c['items']} test items, max |residual| {c['max_abs_residual']:.2e} "
              f"(largest |change| {c['max_abs_change']:.3g}), max relative residual "
              f"{c['max_relative_residual']:.2e}, unconverged steps {c['unconverged_steps']} "
              f"({c['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
