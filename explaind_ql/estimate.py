"""What a query will cost, predicted from a pilot: its own plan run on a few of its steps.

A cost model of FLOPs ranks strategies (:mod:`explaind_ql.plan.cost`) but cannot time them: the
adaptive rule's refinement depends on how many ReLU kinks each step crosses, and the machine's
speed on everything. So ``explain`` runs the query's first engine chunk on up to six steps spread
over its window (after one warm-up step, which pays the one-off costs), each with the whole
window's error allowance; where the engine walks steps in blocks (a smooth model's first rounds are
batched across them), on blocks spread so, about six steps in all. It scales their mean up: time and
gradient evaluations per step times the steps, the replay of a checkpointed store per replayed
step, the chunks, and the resident growth of a step plus the answer. What the pilot computes and
replays is forgotten afterwards, so it never makes the query itself look faster.
``evaluate`` (no contraction) is estimated from a timed forward pass and two timed steps of the walk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import psutil
import torch

from . import model_io
from .engine import budget as engine_budget
from .engine.facts import Facts
from .cache import PHI_CACHE_BYTES, PROJ_CACHE_BYTES, replay_cache_bytes
from .engine.kernels import Engine, Request
from .plan import Plan
from .run import Run
from .semantic import Bound

PILOT_STEPS = 2  # evaluate: steps of the walk timed
PILOT_SAMPLES = 6  # contractions: steps sampled
# resident growth below this is the allocator's and first uses' (polars, torch kernels): noise, not the query's
MEMORY_NOISE = 32 << 20


@dataclass(frozen=True)
class Estimate:
    """A query's predicted cost, and the pilot it was scaled from."""

    seconds: float  # the whole query, in a process that has not run one yet
    one_off: float  # of which: once per process (the model built, first calls), paid by the pilot already
    evaluations: int
    bytes: int  # resident growth of the whole query, in a fresh process
    one_off_bytes: int  # of which: once per process
    replayed_steps: int
    basis: str  # what was measured, in words

    def line(self) -> str:
        fmt = engine_budget.fmt_bytes
        return (f"estimate: {self.seconds:.3g} s ({self.one_off:.2g} s of it once per process), {self.evaluations:,} "
                f"gradient evaluations, +{fmt(self.bytes)} resident ({fmt(self.one_off_bytes)} of it once per "
                f"process), {self.replayed_steps} steps replayed ({self.basis})")

    def against(self, seconds: float, evaluations: int, grown: int, replayed: int) -> str:
        """Estimate against measured, each with its ratio (estimate ÷ measured); time and memory without their
        one-off parts, which the pilot paid before the query ran."""
        def ratio(e: float, m: float) -> str:
            return f"{e / m:.2g}×" if m > 0 else "—"

        def mem_ratio(e: float, m: float) -> str:
            return ratio(max(e, MEMORY_NOISE), max(m, MEMORY_NOISE))
        fmt = engine_budget.fmt_bytes
        warm = self.seconds - self.one_off
        return (f"estimate vs measured: {warm:.3g} s / {seconds:.3g} s ({ratio(warm, seconds)}), "
                f"{self.evaluations:,} / {evaluations:,} evaluations ({ratio(self.evaluations, evaluations)}), "
                f"+{fmt(self.bytes - self.one_off_bytes)} / +{fmt(grown)} resident "
                f"({mem_ratio(self.bytes - self.one_off_bytes, grown)} above {fmt(MEMORY_NOISE)}), "
                f"{self.replayed_steps} / {replayed} steps replayed")


def replays(run: Run, a: int, b: int) -> int:
    """Steps a walk over a..b-1 replays on a checkpointed store: every step from the checkpoint before a."""
    return 0 if run.dense else b - int(run.ckpt_states[run.ckpt_at_or_before(a)])


def _forgetting(run: Run):
    """What the pilot adds to the run's caches, to drop afterwards."""
    caches = (*run.cache.tensor_caches(), run.cache.drift)
    before = [set(c) for c in caches]

    def forget() -> None:
        for c, keys in zip(caches, before):
            for k in [k for k in c if k not in keys]:
                del c[k]
    return forget


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _cache_bytes(run: Run) -> int:
    return sum(c.bytes for c in run.cache.tensor_caches())


def _pilot_request(req: Request, s: int, e: int) -> Request:
    return replace(req, a=s, b=e, step_bin=(0,) * (e - s), n_bins=1, window=req.window or (req.a, req.b),
                   segment_steps=None)


def pilot_steps(a: int, b: int, count: int = PILOT_SAMPLES) -> list[int]:
    """Up to ``count`` steps spread evenly over a..b-1: steps differ (a ReLU model's kinks per step varied
    36-fold over one 24-step toy run), so one step from the middle does not stand for them."""
    k = min(b - a, count)
    return sorted({a + (2 * i + 1) * (b - a) // (2 * k) for i in range(k)})


def of_plan(run: Run, engine: Engine, plan: Plan, facts: Facts) -> Estimate:
    """The cost of running ``plan``, from a pilot of its first chunk on steps spread over its window."""
    leaves = plan.chunks.leaves() if plan.chunks is not None else (plan.request,)
    req = leaves[0]
    a, b = req.a, req.b
    steps = b - a
    middle = pilot_steps(a, b)
    warm_up = middle[len(middle) // 2] if len(middle) > 1 else None  # run first: it pays the one-off costs
    forget = _forgetting(run)
    measured, grown, cached, spans = [], [], [], []  # per pilot request; spans: its steps, (first, end)

    def pilot(s: int, e: int) -> dict:
        t0, rss0, cache0 = time.perf_counter(), _rss(), _cache_bytes(run)
        r = engine.run_request(_pilot_request(req, s, e))
        measured.append((time.perf_counter() - t0, r.stats))
        grown.append(max(0, _rss() - rss0))
        cached.append(max(0, _cache_bytes(run) - cache0) / (e - s))  # what the run keeps of a step for later
        spans.append((s, e))
        return r.stats
    try:
        # steps the engine walks together (a smooth model's first rounds batched across them) are timed so
        block = pilot(warm_up, warm_up + 1).get("block_steps", 1) if warm_up is not None else 1
        forget()  # the warm-up's cached φ would be a hit for the samples
        sample = pilot_steps(a, b, max(1, PILOT_SAMPLES // block))
        for s in sample:
            pilot(s, min(b, s + block))
    finally:
        forget()
    runs = [(m, e - s) for m, (s, e) in zip(measured, spans)][1 if warm_up is not None else 0:]
    replayed = sum(st.get("replayed_steps", 0) for _, st in measured)

    def compute(m: tuple[float, dict]) -> float:  # a request's own work; with replay, the walk is counted apart
        return m[0] - (m[1].get("trajectory_seconds", 0.0) if replayed else 0.0)
    per_step = sum(compute(m) for m, _ in runs) / sum(k for _, k in runs)
    fixed = max(0.0, compute(measured[0]) - per_step) if warm_up is not None else 0.0
    per_replay = sum(st.get("trajectory_seconds", 0.0) for _, st in measured) / replayed if replayed else 0.0
    n_replays = replays(run, a, b)  # once: later chunks find the replayed states in the run's cache
    evaluations = sum(m[1].get("evaluations", 0) for m, _ in runs) / sum(k for _, k in runs)
    n = len(leaves)
    # resident growth: the warm-up's beyond a sampled step's is once per process; a step's own, the caches'
    # share of every step (to their caps) and the answer are the query's
    step_bytes = max(grown[1:] if warm_up is not None else grown)
    kept = min(n * steps * sum(cached[-len(runs):]) / len(runs), PHI_CACHE_BYTES + PROJ_CACHE_BYTES + replay_cache_bytes())
    steady_bytes = int(step_bytes + kept + engine_budget.answer(facts, plan.request).bytes)
    one_off_bytes = max(0, grown[0] - step_bytes) if warm_up is not None else 0
    shown = ", ".join(str(s) if e - s == 1 else f"{s}–{e - 1}" for s, e in spans[len(spans) - len(runs):])
    return Estimate(seconds=fixed + n * per_step * steps + per_replay * n_replays, one_off=fixed,
                    evaluations=round(n * evaluations * steps), bytes=steady_bytes + one_off_bytes,
                    one_off_bytes=one_off_bytes, replayed_steps=n_replays,
                    basis=f"pilot of step{'s' if len(sample) > 1 or block > 1 else ''} {shown}"
                          + (f" of the first of {n} chunks" if n > 1 else ""))


def of_evaluation(run: Run, engine: Engine, bound: Bound, states: tuple[int, ...]) -> Estimate:
    """The cost of ``evaluate`` at ``states``: a forward pass and its log-probabilities per state (and the
    final one), and the walk over every step to the final state (read, or replayed)."""
    import torch.nn.functional as F
    x = engine.split(bound.target_split)[0]
    idx = torch.tensor(bound.test_items, device=engine.device)
    x = model_io.apply(x, lambda t: t[idx])
    n = run.n_steps
    mid = max(0, min(n - PILOT_STEPS - 1, n // 2))
    forget = _forgetting(run)

    def state() -> None:
        out = engine.fn.forward(engine.theta0, x)
        F.log_softmax(out.reshape(len(out), -1), dim=1)
    try:
        t0 = time.perf_counter()
        state()  # warm-up: the one-off part
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        state()
        per_state = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in engine.traj.walk(mid, min(n, mid + 1)):  # warm-up: a checkpointed store builds its replayer
            pass
        first += time.perf_counter() - t0
        t0 = time.perf_counter()
        walked = sum(1 for _ in engine.traj.walk(mid + 1, min(n, mid + 1 + PILOT_STEPS)))
        per_step = (time.perf_counter() - t0) / max(1, walked)
    finally:
        forget()
    return Estimate(seconds=first + per_state * len(states) + per_step * n, one_off=first, evaluations=0,
                    bytes=0, one_off_bytes=0,
                    replayed_steps=replays(run, 0, n), basis=f"a forward pass and steps {mid + 1}–{mid + walked} "
                    "of the walk, timed")
