"""Running a query: parse → bind (what every measure shares, then the measure's own) → plan → engine →
the measure's frame (:mod:`explaind_ql.measures`)."""

from __future__ import annotations

import time
from typing import Any, Sequence

import polars as pl
import psutil
import torch

from . import distributed, estimate, threads
from .engine import budget as engine_budget
from .engine.facts import Facts, facts_for
from .engine.kernels import Engine
from .errors import StoreError
from .lang import parse
from .measures import MEASURES, Computed, bind
from .plan import RULES, Plan, Rule, optimise, render
from .results.frames import residual_line
from .run import Run
from .semantic import Bound


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
    ``scheduler`` (or the query's ``using cluster``) distributes the plan of a measure that allows it
    (``influence``, ``kernel``); the others run locally. A measure without a contraction has no plan.
    """
    q = parse(text, params or {})
    bound = bind(q, run, distributed=scheduler is not None)
    measure = MEASURES[bound.measure]
    remote = distributed.scheduler_for(scheduler, bound.cluster)
    gpu_elsewhere = remote is not None and bound.device.startswith("cuda") and not torch.cuda.is_available()
    facts = facts_for(run, "cpu" if gpu_elsewhere else bound.device, bound.dtype)  # with a cluster: plans only
    if measure.logical is None:
        return bound, facts, None
    return bound, facts, optimise(bound, run, facts, start=measure.logical, rules=rules,
                                  scheduler=remote if measure.distributable else None,
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
    return _computed(run, bound, facts, plan)[0]


def _computed(run: Run, bound: Bound, facts: Facts, plan: Plan | None) -> tuple[pl.DataFrame, dict]:
    """The measure's frame and the contraction's stats (empty without one)."""
    measure = MEASURES[bound.measure]
    eng = result = None
    n_threads, source = threads.chosen(bound.threads)
    with threads.using(n_threads), run.cache.within(bound.budget):
        if plan is None or plan.distribution is None:
            eng = engine_for(run, str(facts.device), facts.dtype)
            if plan is not None:
                result = engine_budget.execute(eng, plan.chunks)
        else:
            result = distributed.execute(run, plan)
        stats = result.stats if result is not None else {}
        stats.update(threads=n_threads, threads_from=source)
        if measure.reports_residual:
            run.cache.last_stats = stats
        return measure.frame(Computed(run, bound, plan, result, eng)), stats


def explain_text(run: Run, bound: Bound, facts: Facts, plan: Plan | None,
                 cost: estimate.Estimate | None = None) -> str:
    """The plan as text, with the query's estimated cost (from a pilot, unless given). Planning reads the
    store's metadata only; the pilot needs the model, so a store whose model cannot be built here (an
    untrusted factory) gets its plan and the reason there is no estimate."""
    if cost is None:
        try:
            cost = predicted(run, bound, facts, plan)
        except StoreError as exc:
            return f"{_plan_text(run, bound, facts, plan)}\nestimate: unavailable: {exc}"
    return f"{_plan_text(run, bound, facts, plan)}\n{cost.line()}"


def _plan_text(run: Run, bound: Bound, facts: Facts, plan: Plan | None, analyzed: dict | None = None) -> str:
    if plan is None:
        return (f"{bound.measure.capitalize()}  steps {bound.a}:{bound.b}, {len(bound.test_items)} "
                f"{bound.target_split} items, {len(bound.params)} param tensors (runs the model directly)"
                + (f"\nanalyzed: {analyzed['summary']}" if analyzed else ""))
    return render(plan, run, facts, analyzed)


def predicted(run: Run, bound: Bound, facts: Facts, plan: Plan | None) -> estimate.Estimate:
    """The query's cost, from a pilot on this machine (its threads chosen as the query's would be)."""
    eng = engine_for(run, str(facts.device), facts.dtype)
    with threads.using(threads.chosen(bound.threads)[0]):
        if plan is None:
            return estimate.of_evaluation(run, eng, bound, getattr(bound.measure_args, "steps", ()))
        return estimate.of_plan(run, eng, plan, facts)


def analyze(run: Run, bound: Bound, facts: Facts, plan: Plan | None) -> str:
    """Run the query and add measured time and memory per node to the plan, and its estimate against them."""
    cost = predicted(run, bound, facts, plan)
    rss0 = psutil.Process().memory_info().rss
    cuda = facts.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(facts.device)
    traj = engine_for(run, str(facts.device), facts.dtype).traj
    t0, replay0 = time.perf_counter(), traj.replayed_steps
    frame, st = _computed(run, bound, facts, plan)
    total = time.perf_counter() - t0
    st.setdefault("replayed_steps", traj.replayed_steps - replay0)  # a measure without a contraction
    mem = torch.cuda.max_memory_allocated(facts.device) if cuda else max(0, psutil.Process().memory_info().rss - rss0)
    versus = cost.against(total, st.get("evaluations", 0), mem, st.get("replayed_steps", 0))
    if plan is None:
        return (_plan_text(run, bound, facts, plan, {"summary": f"{total:.3f} s, {frame.height} rows"})
                + f"\n{cost.line()}\n{versus}")
    fmt = engine_budget.fmt_bytes
    test_s, traj_s = st.get("test_seconds", 0.0), st.get("trajectory_seconds", 0.0)
    measured = {
        "frame": f"{frame.height} rows",
        "contract": f"{st.get('seconds', total):.3f} s, {st.get('chunks', 1)} chunk(s)",
        "test": f"{test_s:.3f} s, +{fmt(st.get('test_bytes', 0))} peak, {st.get('evaluations', 0)} gradient "
                f"evaluations, {st.get('refined_steps', 0)} steps refined, {st.get('phi_cache_hits', 0)} cache hits"
                + (f", {st['joined_items']} item-steps on kink-free joint lanes" if st.get("joined_items") else "")
                + (f", {st['prefetched_steps']} steps' first rounds in calls across steps"
                   if st.get("prefetched_steps") else ""),
        "train": f"{max(0.0, st.get('seconds', total) - test_s - traj_s):.3f} s, "
                 f"+{fmt(st.get('train_bytes', 0))} peak",
        "trajectory": f"{traj_s:.3f} s, +{fmt(st.get('trajectory_bytes', 0))} peak, "
                      f"{st.get('replayed_steps', 0)} steps replayed",
        "distributed": f"{st.get('wall_seconds', 0.0):.3f} s wall, {st.get('chunks', 1)} tasks on "
                       f"{len(st.get('worker_pids', []))} worker process(es)",
        "summary": f"{total:.3f} s total on {st['threads']} threads ({st['threads_from']}), memory "
                   f"+{engine_budget.fmt_bytes(mem)} ({'peak CUDA' if cuda else 'resident growth'})"
                   + (f"; {line}" if (line := residual_line(st)) else ""),
    }
    return f"{_plan_text(run, bound, facts, plan, measured)}\n{cost.line()}\n{versus}"

