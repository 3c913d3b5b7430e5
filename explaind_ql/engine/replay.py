"""Bit-exact replay of skipped steps: the rebuilt module and PyTorch's own optimizer.

A checkpointed store keeps every K-th state; the states between are recreated by
re-taking the recorded steps. Training in float32 is too sensitive for anything but
the very same arithmetic: one rounding unit in one element grows to a third of the
parameters' motion over 100 early grokking steps. So the replay runs the ops training
ran — the batch forward, the reduced loss, autograd, the recorded clip scale, and the
optimizer class with the recorded hyperparameters and state — and on the same
platform it reproduces training bit for bit. The drift against each stored
checkpoint is still measured and reported.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .. import model_io
from ..dropout import replaying
from ..optim import OptState
from ..run import Run, StepMeta

REDUCED = {"cross_entropy": F.cross_entropy, "nll": F.nll_loss, "mse": F.mse_loss}


class TorchReplay:
    """Takes recorded steps again with the model's module and a torch.optim optimizer."""

    def __init__(self, run: Run, device: torch.device):
        self.run, self.device = run, device
        # training mode only where it drew dropout masks (replayed by Masks); else eval, which draws none
        self.model = run.build_model().to(device=device, dtype=run.dtype).train(run.dropout_seed is not None)
        self.model.load_state_dict({k: v.to(device) for k, v in run.constants.items()}, strict=False)
        named = dict(self.model.named_parameters())
        trained = set(run.space.names)
        for name, p in named.items():
            p.requires_grad_(name in trained)
        self.params = [named[n] for n in run.space.names]
        cls = getattr(torch.optim, _recorded_class(run))
        accepted = set(inspect.signature(cls).parameters)
        groups = []
        for gi, hyper in enumerate(run.attrs["hyperparameters"]):
            kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in hyper.items() if k in accepted}
            groups.append({**kw, "params": [p for p, info in zip(self.params, run.space.params) if info.group == gi]})
        self.opt = cls(groups)
        x, y = run.split("train")
        self.x, self.y = model_io.to(x, device, run.dtype), y.to(device)
        loss = run.loss
        if loss.name in REDUCED:
            fn = REDUCED[loss.name]
            self.loss = lambda out, t, w: fn(out, t.to(out.dtype) if loss.name == "mse" else t, reduction=loss.reduction)
        else:  # the recorded weight (the LM loss's 1/batch tokens): what the model's own loss divided by
            self.loss = lambda out, t, w: (loss.per_example(out, t) * w).sum()

    def step(self, theta: torch.Tensor, state: OptState, meta: StepMeta) -> tuple[torch.Tensor, OptState]:
        run = self.run
        model = run.spec.model
        views = run.space.unflatten(theta)
        bufs = {b: run.space.unflatten(state.bufs[b]) for b in state.bufs}
        with torch.no_grad():
            for p, info in zip(self.params, run.space.params):
                p.copy_(views[info.name])
                p.grad = None
                st = self.opt.state[p]
                st.clear()
                st.update(model.torch_state(state, {b: v[info.name] for b, v in bufs.items()},
                                            self.opt.param_groups[info.group]))
        for g, lr, wd in zip(self.opt.param_groups, meta.lr, meta.weight_decay):
            g["lr"], g["weight_decay"] = float(lr), float(wd)
        b = meta.batch.to(self.device)
        with replaying(run.dropout_seed, meta.step, len(b)):
            out = model_io.forward(self.model, model_io.apply(self.x, lambda t: t[b]), run.output)
        self.loss(out, self.y[b], meta.weight).backward()
        if meta.clip != 1.0:
            scale = torch.tensor(meta.clip, dtype=run.dtype, device=self.device)
            for p in self.params:
                p.grad.mul_(scale)
        self.opt.step()
        with torch.no_grad():
            new_theta = torch.cat([p.detach().reshape(-1) for p in self.params])
            new_bufs = {}
            for name in state.bufs:
                parts = []
                for p in self.params:
                    t = self.opt.state[p].get(name)
                    parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if t is None
                                 else t.reshape(-1))
                new_bufs[name] = torch.cat(parts).clone()
        has_buf = state.has_buf or any(model.started_in_torch(self.opt.state[p]) for p in self.params)
        return new_theta, OptState(new_bufs, state.step + 1, has_buf)


def _recorded_class(run: Run) -> str:
    """The torch.optim class training used (Adam with decoupled decay is recorded as AdamW)."""
    return run.attrs.get("optimizer_class", run.spec.cls)
