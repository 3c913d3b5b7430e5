"""The optimizer models reproduce PyTorch's own AdamW, Adam and SGD, for every supported option."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from explaind_ql.optim import MODELS, advance, fresh_state, spec_from_torch
from explaind_ql.params import ParamSpace


@st.composite
def configs(draw):
    cls = draw(st.sampled_from(sorted(MODELS)))  # every registered model, so a new one is tested at once
    n_groups = draw(st.integers(1, 2))
    groups = []
    for _ in range(n_groups):
        g = {"lr": draw(st.floats(1e-4, 0.3)), "weight_decay": draw(st.sampled_from([0.0, 0.01, 0.5, 4.0]))}
        if cls == "SGD":
            mom = draw(st.sampled_from([0.0, 0.5, 0.9]))
            nest = mom > 0 and draw(st.booleans())
            g.update(momentum=mom, nesterov=nest, dampening=0.0 if nest else draw(st.sampled_from([0.0, 0.3])))
        else:
            g.update(betas=(draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.999))),
                     eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])))
        groups.append(g)
    steps = draw(st.integers(1, 6))
    lr_scale = draw(st.lists(st.floats(0.1, 2.0), min_size=steps, max_size=steps))
    clips = draw(st.lists(st.floats(0.2, 1.0), min_size=steps, max_size=steps))
    return cls, groups, lr_scale, clips, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(configs())
def test_advance_matches_torch(cfg):
    cls, groups, lr_scale, clips, seed = cfg
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 2, generator=gen, dtype=torch.float64)) for _ in groups]
    params.append(torch.nn.Parameter(torch.randn(4, generator=gen, dtype=torch.float64)))
    pg = [dict(g, params=[params[i]] + ([params[-1]] if i == len(groups) - 1 else [])) for i, g in enumerate(groups)]
    opt = getattr(torch.optim, cls)(pg)
    spec = spec_from_torch(opt)
    space = ParamSpace.build([(f"p{i}", tuple(p.shape), gi) for gi, g in enumerate(opt.param_groups)
                              for i, p in enumerate(g["params"])])
    flat = lambda ts: torch.cat([t.detach().reshape(-1) for g in opt.param_groups for t in ts(g)])  # noqa: E731
    state = fresh_state(spec, space.size, torch.float64)
    base_lr = [g["lr"] for g in opt.param_groups]
    for scale, clip in zip(lr_scale, clips):
        for g, lr in zip(opt.param_groups, base_lr):
            g["lr"] = lr * scale  # an arbitrary schedule
        theta = flat(lambda g: g["params"])
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * clip
        grad = flat(lambda g: [p.grad for p in g["params"]])
        opt.step()
        lr = [g["lr"] for g in opt.param_groups]
        wd = [g["weight_decay"] for g in opt.param_groups]
        _, state, delta = advance(spec, space.group_index, lr, wd, theta, grad, state)
        real = flat(lambda g: g["params"]) - theta
        assert torch.allclose(delta, real, rtol=1e-10, atol=1e-14), (cls, groups)
        theta_state = [opt.state[p] for g in opt.param_groups for p in g["params"]]
        for buf in spec.buffers:
            torch_buf = torch.cat([s[buf].reshape(-1) for s in theta_state]) if all(buf in s and s[buf] is not None
                                                                                   for s in theta_state) else None
            if torch_buf is not None:
                assert torch.allclose(state.bufs[buf], torch_buf, rtol=1e-10, atol=1e-14)
