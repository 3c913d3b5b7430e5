"""Running a query: parse → bind → plan → engine → frame, for each measure.

``influence`` and ``kernel`` go through the planner and the contraction engine.
``check`` reports replication per test item, plus the update-reconstruction error
(invariant 3) and the replay drift. ``similarity`` builds per-layer cosine matrices of
test items' element-wise influence vectors. ``evaluate`` runs the recorded model itself
at chosen steps, optionally with some layers' weights taken from another step.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Sequence

import polars as pl
import psutil
import torch
import torch.nn.functional as F

from . import distributed
from .engine import budget as engine_budget
from .engine.facts import Facts, facts_for
from .engine.kernels import Engine, Request
from .engine.reconstruct import update_errors
from .engine.targets import TargetSpec
from .lang import parse
from .plan import RULES, Plan, Rule, cheapest, optimise, render
from .results.frames import influence_frame, residual_line
from .run import Run
from .semantic import Bound, bind


def engine_for(run: Run, device: str, dtype: torch.dtype) -> Engine:
    """One engine per (device, dtype) per open run, so caches are shared across queries."""
    engines = run.cache.engines
    key = (device, dtype)
    if key not in engines:
        engines[key] = Engine(run, device, dtype)
    return engines[key]


def prepare(run: Run, text: str, params: dict[str, Any] | None = None, rules: Sequence[Rule] = RULES,
            scheduler: Any = None) -> tuple[Bound, Facts, Plan | None]:
    """Parse, bind and plan, from the run's metadata: no model is built until the query runs.
    ``scheduler`` (or the query's ``using cluster``) distributes the plan.

    ``check``, ``similarity`` and ``evaluate`` always run locally.
    """
    q = parse(text, params or {})
    bound = bind(q, run, distributed=scheduler is not None)
    remote = distributed.scheduler_for(scheduler, bound.cluster)
    gpu_elsewhere = remote is not None and bound.device.startswith("cuda") and not torch.cuda.is_available()
    facts = facts_for(run, "cpu" if gpu_elsewhere else bound.device, bound.dtype)  # with a cluster: plans only
    if bound.measure not in ("influence", "kernel"):
        return bound, facts, None
    return bound, facts, optimise(bound, run, facts, rules=rules, scheduler=remote,
                                  device=bound.device if bound.device_pinned else None)


def run_query(run: Run, text: str, params: dict[str, Any] | None = None, rules: Sequence[Rule] = RULES,
              scheduler: Any = None) -> pl.DataFrame:
    bound, facts, plan = prepare(run, text, params, rules, scheduler)
    if bound.query.explain == "plan":
        return pl.DataFrame({"plan": explain_text(run, bound, facts, plan).split("\n")})
    if bound.query.explain == "analyze":
        return pl.DataFrame({"plan": analyze(run, bound, facts, plan).split("\n")})
    return compute(run, bound, facts, plan)


def compute(run: Run, bound: Bound, facts: Facts, plan: Plan | None) -> pl.DataFrame:
    """Run a planned query: the engine is built (or taken from the run's cache) here."""
    if plan is None or plan.distribution is None:
        eng = engine_for(run, str(facts.device), facts.dtype)
        if plan is None:
            return {"check": check_frame, "similarity": similarity_frame, "evaluate": evaluate_frame}[bound.measure](
                run, bound, eng)
        result = engine_budget.execute(eng, plan.chunks)
    else:
        result = distributed.execute(run, plan)
    run.cache.last_stats = result.stats
    return influence_frame(result, plan, run)


def explain_text(run: Run, bound: Bound, facts: Facts, plan: Plan | None) -> str:
    if plan is None:
        return (f"{bound.measure.capitalize()}  steps {bound.a}:{bound.b}, {len(bound.test_items)} "
                f"{bound.target_split} items, {len(bound.params)} param tensors (runs the model directly)")
    return render(plan, run, facts)


def analyze(run: Run, bound: Bound, facts: Facts, plan: Plan | None) -> str:
    """Run the query and add measured time and memory per node to the plan."""
    rss0 = psutil.Process().memory_info().rss
    cuda = facts.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(facts.device)
    t0 = time.perf_counter()
    frame = compute(run, bound, facts, plan)
    total = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated(facts.device) if cuda else max(0, psutil.Process().memory_info().rss - rss0)
    if plan is None:
        return explain_text(run, bound, facts, plan) + f"\nanalyzed: {total:.3f} s, {frame.height} rows"
    st = run.cache.last_stats
    fmt = engine_budget.fmt_bytes
    test_s, traj_s = st.get("test_seconds", 0.0), st.get("trajectory_seconds", 0.0)
    measured = {
        "frame": f"{frame.height} rows",
        "contract": f"{st.get('seconds', total):.3f} s, {st.get('chunks', 1)} chunk(s)",
        "test": f"{test_s:.3f} s, +{fmt(st.get('test_bytes', 0))} peak, {st.get('evaluations', 0)} gradient "
                f"evaluations, {st.get('refined_steps', 0)} steps refined, {st.get('phi_cache_hits', 0)} cache hits"
                + (f", {st['joined_items']} item-steps on kink-free joint lanes" if st.get("joined_items") else ""),
        "train": f"{max(0.0, st.get('seconds', total) - test_s - traj_s):.3f} s, "
                 f"+{fmt(st.get('train_bytes', 0))} peak",
        "trajectory": f"{traj_s:.3f} s, +{fmt(st.get('trajectory_bytes', 0))} peak, "
                      f"{st.get('replayed_steps', 0)} steps replayed",
        "distributed": f"{st.get('wall_seconds', 0.0):.3f} s wall, {st.get('chunks', 1)} tasks on "
                       f"{len(st.get('worker_pids', []))} worker process(es)",
        "summary": f"{total:.3f} s total, memory +{engine_budget.fmt_bytes(mem)} "
                   f"({'peak CUDA' if cuda else 'resident growth'})"
                   + (f"; {line}" if (line := residual_line(st)) else ""),
    }
    return render(plan, run, facts, measured)


# -- check --------------------------------------------------------------------------------------

def check_frame(run: Run, bound: Bound, eng: Engine) -> pl.DataFrame:
    """Replication per test item: the decomposition's prediction against the real change."""
    target = TargetSpec(bound.target_kind, bound.target_split, bound.test_items, bound.output,
                        keep_test=True, keep_output=bound.target_kind == "outputs")
    names = tuple(run.space.names)
    req = Request(bound.a, bound.b, target, names, tuple(0 for _ in names), 1, nodes=bound.nodes,
                  tolerance=bound.tolerance)
    req = replace(req, strategy=cheapest(req, run, eng.facts)[0])  # one group: `project` needs three directions, not φ
    budget = bound.budget or engine_budget.default_budget(eng.device)
    r = engine_budget.execute(eng, engine_budget.plan(eng.facts, req, budget))
    explained = r.total().cpu()
    actual = r.actual.cpu()
    upd = update_errors(eng, bound.a, bound.b)
    drift = [d.rel_error for s, d in run.cache.drift.items() if bound.a < s <= bound.b]
    scale = float(actual.abs().max()) or 1.0
    return pl.DataFrame({
        "test": [t for t, _ in r.target_labels],
        **({"output": [o for _, o in r.target_labels]} if bound.target_kind == "outputs" else {}),
        "actual": actual.numpy(), "explained": explained.numpy(),
        "residual": (actual - explained).numpy(),
        "relative_residual": ((actual - explained).abs() / scale).numpy(),
        "max_update_error": [float(upd.max()) if len(upd) else 0.0] * len(actual),
        "max_replay_drift": [max(drift) if drift else 0.0] * len(actual),
        "unconverged_steps": [len(r.stats.get("unconverged_steps", []))] * len(actual),
    })


# -- similarity ---------------------------------------------------------------------------------

def similarity_frame(run: Run, bound: Bound, eng: Engine) -> pl.DataFrame:
    """Per layer, cosine similarity between test items' element-wise influence vectors."""
    target = TargetSpec(bound.target_kind, bound.target_split, bound.test_items, bound.output, keep_test=True)
    req = Request(bound.a, bound.b, target, bound.params, tuple(range(len(bound.params))), len(bound.params),
                  by_element=True, nodes=bound.nodes, tolerance=bound.tolerance)
    req = replace(req, strategy=cheapest(req, run, eng.facts)[0])
    budget = bound.budget or engine_budget.default_budget(eng.device)
    r = engine_budget.execute(eng, engine_budget.plan(eng.facts, req, budget))
    vec = (r.gradient.sum((0, 2)) + r.weight_decay.sum(0) + r.momentum.sum(0)).cpu()  # (T, P_sel)
    space = run.space.subspace(list(bound.params))
    layers: dict[str, list[int]] = {}
    for p in space.params:
        layers.setdefault(run.space.top_layer(p.name), []).extend(range(p.offset, p.stop))
    rows = {"layer": [], "test": [], "test_2": [], "cosine": []}
    tests = list(bound.test_items)
    for layer, cols in layers.items():
        v = vec[:, cols]
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)
        cos = (v @ v.T).numpy()
        for i, ti in enumerate(tests):
            for j, tj in enumerate(tests):
                rows["layer"].append(layer)
                rows["test"].append(ti)
                rows["test_2"].append(tj)
                rows["cosine"].append(float(cos[i, j]))
    return pl.DataFrame(rows)


# -- evaluate -----------------------------------------------------------------------------------

def evaluate_frame(run: Run, bound: Bound, eng: Engine) -> pl.DataFrame:
    """The recorded model at chosen steps (optionally with layers swapped in): accuracy, loss, KL."""
    x, y = eng.split(bound.target_split)
    idx = torch.tensor(bound.test_items, device=eng.device)
    x, y = x[idx], y[idx]
    wanted = sorted(set(bound.eval_steps) | {run.n_steps} | ({bound.swap_step} if bound.swap_step is not None else set()))
    states = _states_at(run, eng, wanted)
    swap_idx = None
    if bound.swap_params:
        swap_idx = run.space.element_index(run.space.subspace(list(bound.swap_params))).to(eng.device)
    final_logp = _logp(eng, states[run.n_steps], x)
    rows = {"step": [], "accuracy": [], "loss": [], "kl_to_final": []}
    for s in bound.eval_steps:
        theta = states[s].clone()
        if swap_idx is not None:
            theta[swap_idx] = states[bound.swap_step][swap_idx]
        out = eng.fn.forward(theta, x)
        logp = F.log_softmax(out.reshape(len(x), -1), dim=1)
        rows["step"].append(s)
        classifier = not y.is_floating_point()
        rows["accuracy"].append(float((out.argmax(1) == y).double().mean()) if classifier else float("nan"))
        rows["loss"].append(float(run.loss.per_example(out, y).mean()))
        rows["kl_to_final"].append(float((final_logp.exp() * (final_logp - logp)).sum(1).mean()))
    return pl.DataFrame(rows)


def _logp(eng: Engine, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(eng.fn.forward(theta, x).reshape(len(x), -1), dim=1)


def _states_at(run: Run, eng: Engine, steps: list[int]) -> dict[int, torch.Tensor]:
    """θ_s for each wanted state s (reading stored states, replaying the rest)."""
    out: dict[int, torch.Tensor] = {}
    want = set(steps)
    if 0 in want:
        out[0] = run.stored_state(0)[0].to(eng.device, eng.dtype)
    for rec in eng.traj.walk(0, max(steps)):
        if rec.s + 1 in want:
            out[rec.s + 1] = rec.theta_next
    return out
