"""One shared trajectory for both tools: the reference trains, explaind_ql re-takes and records it.

The reference's own tooling trains its modular-addition model (``adapter.run_reference``);
we then re-take exactly those steps (same θ_0, same shuffled full batches) with
``torch.optim.AdamW`` under ``explaind_ql.Recorder`` and check that every recorded state
equals the reference's checkpoint bit for bit. Both tools then explain the same run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import explaind_ql as eq

REF_FACTORY = "explaind.modulo_model.model:SingleLayerTransformerClassifier"


def record_shared(ref: dict, path: str | Path) -> Path:
    cfg = ref["config"]
    kw = {"n_token": cfg["n_token"], "d_model": cfg["d_model"], "nhead": cfg["nhead"],
          "dim_mlp": cfg["dim_mlp"], "dropout": 0.0}
    model = ref["model_factory"]()
    model.load_state_dict(ref["theta"][0])
    model.positional_encoding.pe.requires_grad_(False)  # never used in forward: a constant
    hp = ref["optimizer_hparams"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=hp["lr"],
                            betas=tuple(hp["betas"]), eps=hp["eps"], weight_decay=hp["weight_decay"])
    x, y = ref["X_train"], ref["y_train"]
    with eq.Recorder(path, model, opt, train=(x, y), test=(ref["X_test"], ref["y_test"]), loss="nll",
                     factory=REF_FACTORY, factory_kwargs=kw, checkpoint_every=None, overwrite=True) as rec:
        for s, idx in enumerate(ref["batches"]):
            loss = F.nll_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(idx, loss=loss)
            for name, t in model.state_dict().items():
                if not torch.equal(t, ref["theta"][s + 1][name]):
                    raise AssertionError(f"step {s}: {name} differs from the reference's trajectory")
    return Path(path)


def our_terms(run, nodes: int | None, rule: str = "gauss", device: str = "cpu"):
    """Our decomposition of every class's log-prob change at every test item, per param tensor.

    Returns the engine Result (axes: bin, target=(test, class), example, param) and the
    flat target labels. ``nodes=None`` means the default adaptive Gauss–Legendre rule.
    """
    from explaind_ql.engine.kernels import Engine, Request
    from explaind_ql.engine.targets import TargetSpec
    names = tuple(run.space.names)
    target = TargetSpec("outputs", "test", tuple(range(run.split_size("test"))), keep_test=True, keep_output=True)
    req = Request(0, run.n_steps, target, names, tuple(range(len(names))), len(names),
                  nodes=nodes or 2, tolerance=None if nodes else 1e-6, rule=rule, strategy="delta")
    return Engine(run, device).run_request(req)
