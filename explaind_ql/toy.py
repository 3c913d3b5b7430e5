"""Toy training runs, recorded with the Recorder: the fixtures of tests, benchmarks and the demo.

Each run exercises what exactness depends on: an LR schedule, two param groups with
their own hyperparameters, gradient clipping, uneven mini-batches.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .models import MLP, ModAddTransformer, TinyCNN, modadd_data
from .recorder import Recorder

MODELS = ("mlp", "transformer", "cnn")
OPTIMIZERS = ("adamw", "adam", "sgd")


def toy_model(kind: str, act: str = "gelu"):
    """(factory kwargs, model) for a toy model kind."""
    if kind == "mlp":
        kw = {"sizes": [6, 12, 3], "act": act}
        return "explaind_ql.models:MLP", kw, MLP(**kw)
    if kind == "transformer":
        kw = {"p": 5, "d_model": 8, "n_heads": 2, "d_mlp": 16, "act": act}
        return "explaind_ql.models:ModAddTransformer", kw, ModAddTransformer(**kw)
    if kind == "cnn":
        kw = {"in_ch": 1, "classes": 3, "width": 2, "act": act}
        return "explaind_ql.models:TinyCNN", kw, TinyCNN(**kw)
    raise ValueError(f"unknown toy model {kind!r}; use one of {MODELS}")


def toy_data(kind: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kind == "transformer":
        return modadd_data(p=5, n_train=10, n_test=5, seed=seed)
    shape = (6,) if kind == "mlp" else (1, 5, 5)
    x = torch.randn(24, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (24,), generator=g)
    return x[:16], y[:16], x[16:], y[16:]


def toy_optimizer(kind: str, model: torch.nn.Module, betas: tuple[float, float] = (0.9, 0.98)):
    """Two param groups (first tensor vs the rest) with their own hyperparameters (``betas``: AdamW's)."""
    params = [p for p in model.parameters() if p.requires_grad]
    g1, g2 = params[:1], params[1:]
    if kind == "adamw":
        return torch.optim.AdamW([{"params": g1}, {"params": g2, "lr": 5e-3, "weight_decay": 0.3}],
                                 lr=1e-2, betas=betas, weight_decay=1.0)
    if kind == "adam":
        return torch.optim.Adam([{"params": g1}, {"params": g2, "lr": 5e-3, "betas": (0.8, 0.99)}],
                                lr=1e-2, weight_decay=0.05)
    if kind == "sgd":
        return torch.optim.SGD([{"params": g1}, {"params": g2, "lr": 0.05, "momentum": 0.5}],
                               lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    raise ValueError(f"unknown toy optimizer {kind!r}; use one of {OPTIMIZERS}")


def record_toy(path: str | Path, model: str = "mlp", optimizer: str = "adamw", dtype=torch.float64,
               steps: int = 12, checkpoint_every: int | None = None, act: str = "gelu", seed: int = 0,
               clip: float = 1.0, batch: int = 5, betas: tuple[float, float] = (0.9, 0.98)) -> Path:
    """Train a toy model for ``steps`` mini-batch steps and record it; returns the store path."""
    torch.manual_seed(seed)
    factory, kw, net = toy_model(model, act)
    net = net.to(dtype)
    xtr, ytr, xte, yte = toy_data(model, dtype, seed)
    opt = toy_optimizer(optimizer, net, betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    g = torch.Generator().manual_seed(seed + 1)
    n = len(xtr)
    with Recorder(path, net, opt, train=(xtr, ytr), test=(xte, yte), loss="cross_entropy",
                  factory=factory, factory_kwargs=kw, checkpoint_every=checkpoint_every,
                  chunk_steps=4, overwrite=True) as rec:
        order = torch.randperm(n, generator=g)
        pos = 0
        for _ in range(steps):
            if pos >= n:
                order, pos = torch.randperm(n, generator=g), 0
            idx = order[pos: pos + batch]  # the last batch of an epoch is smaller
            pos += batch
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            rec.clip_grad_norm_(clip)
            opt.step()
            sched.step()
            rec.step(idx, loss=loss)
    return Path(path)
