"""The contraction kernels: one request in, the decomposition's terms out.

Three strategies compute the same sum (math.md, Step 3) in different orders:

``delta``     model × training queries (no example axis, no example filter): φ_s ⊙ Δθ_s,
              with Δθ_s split into weight decay, carried momentum and the gradient rest.
              No per-example gradient is taken.
``project``   the same question without φ: each group's share of Δθ_s, of the decay and of
              the carried momentum enters the layers as a scalar α (model_fn.Path), and
              the path integral of the targets' derivatives in those scalars is taken by
              reverse or forward mode, whichever needs fewer passes. Cheaper than
              ``delta`` unless groups are single elements.
``fold``      data queries without a step axis: a backward recurrence folds momentum
              into A_i = Σ_{s≥i} (coefficients) φ_s, and each batch's influence is a
              forward-mode JVP of the per-example losses along A_i.
``momentum``  data queries with a step axis: per-example momentum kept only for the
              selected examples and params.

Every strategy reports the ``weight_decay`` and ``momentum`` (carried in from before the
selected steps) terms separately from the ``gradient`` term. The per-example strategies also
report ``rounding``: ∫∇F·(Δθ_recorded − Δθ_rebuilt), the part of the recorded update that its
per-example gradients do not rebuild (a float32 recording's rounding), so that their terms
still sum to the real change. ``check`` asks for it directly (``Request.rebuild``).

On the test side each step's path integral is refined on its own (quadrature.integrate). On
smooth models the first round of several steps (each lane's nodes, the targets at the stored
states they start and end at) is evaluated first, in batched calls across the steps
(``_Context._prefetch``): on small models a call's cost is mostly fixed, and most smooth steps
need nothing more. φ's rows are evaluated as gradients and kept, so φ is its rule's weighted sum
of them, with no second pass. Each stored state's targets are evaluated once a request, for the
exact change of the steps on both sides of it and for ``check_step``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Iterator

import psutil
import torch

from .. import dropout, model_io, progress
from ..cache import TensorCache
from ..optim import LinearStep
from ..params import ParamSpace
from ..run import Run
from . import quadrature, reconstruct, targets
from .facts import facts_for, measured
from .model_fn import Draw, ModelFn, Path
from .targets import TargetSpec
from .trajectory import StepRecord, Trajectory

STRATEGIES = ("delta", "project", "fold", "momentum")
# rows of one batched call at most. A kink-corrected call on the paper's model took 13.6–17 ms for 1–16 rows,
# 21–24 for 32, 30 for 48, 39–60 for 64: its fixed cost is amortised by 32, but a step's rows come in fewer
# calls with more: `by layer, step` on steps 1:4 of the paper run took 6.0–7.0 s at 32 rows, 3.2–3.8 s at 128;
# on 40 steps 12.5–12.6 s at 128, 11.0–11.7 at 256, 10.2–10.8 at 384, 10.5 at 512, 11.1 at 768 (the same
# peak memory: calls are bounded by CALL_BYTES too); check, by example, kernel and similarity gained 2–17 %
ROWS_PER_CALL = 384
# ... and of a call of rows' own gradients (each with its own params and weight gradients): tiny GPT-2's
# `kernel`, 40 steps, took 5.4–6.6 s at 32 rows a call, 7.0–7.3 s at 128
GRADIENT_ROWS_PER_CALL = 32
# lanes kept apart with fewer rows each than this take their rows' gradients one by one, all lanes in one
# call: a lane's own backward pass costs about as much as 8–10 rows' own gradients (17–24 ms against ~2 ms
# a row; tiny GPT-2 and the paper's model)
ROWS_APART = 8
JVP_MAX_TANGENTS = 16
# lanes kept apart share a call of their φ's gradients when each has at least this share of the rows of the call's
# largest (the others' rows are padded to it)
PADDED_SHARE = 0.75
# a projection row is evaluated from its own gradient (weight gradients and all: _Context._gradient_rows) only
# where its activations outweigh the params this many times; below, the weight gradients dominate (tiny GPT-2:
# a 10-sequence row is 21× its 28k params, a 1-sequence row 2×: `check` 3.8–4.2 s as projections, 6.2 s as
# gradients)
HEAVY_ROWS = 8
# what one batched test-side call (Jacobians or derivatives at nodes) may hold at most: its fixed cost (ms of
# dispatch) wants many rows a call. The paper's model's forward-mode ReLU slopes: 16 ms for 64 one-item rows,
# 41 ms for 256; tiny GPT-2's `by example`, 10 steps: 4.5 s at 16 MiB (3 rows a call), 2.9 at 64, 1.8 at 256
CALL_BYTES = 256 << 20
GROUP_LOOP_MAX = 64
# a change below √ε·(1 + |F|) is rounding of F itself: residuals are relative to at least that
CHANGE_FLOOR = float(torch.finfo(torch.float64).eps) ** 0.5


@dataclass(frozen=True)
class Request:
    """A fully resolved contraction over update steps ``a..b-1``.

    ``group_of_param`` maps each selected param (in ``params`` order) to an output group;
    ``by_element`` makes every element its own group instead. ``step_bin`` maps each step
    of the range to an output bin (None: one bin). ``examples`` restricts the training
    examples (None: all); ``keep_examples`` keeps them as an axis.
    """

    a: int
    b: int
    target: TargetSpec
    params: tuple[str, ...]
    group_of_param: tuple[int, ...]
    n_groups: int
    by_element: bool = False
    step_bin: tuple[int, ...] | None = None
    n_bins: int = 1
    examples: tuple[int, ...] | None = None
    keep_examples: bool = False
    nodes: int = 2
    tolerance: float | None = 1e-6
    strategy: str | None = None
    segment_steps: int | None = None
    rule: str = "gauss"  # fixed-node rule when tolerance is None: "gauss" or "midpoint"
    call_bytes: int = CALL_BYTES  # what one batched test-side call may hold (the planner sets it from the budget)
    # one step chunk of a longer query (explaind_ql.distributed): ``window`` is the whole
    # query's steps (it sets the quadrature error allowance, so chunks integrate as the whole
    # query would); ``carry_response`` starts the momentum at zero and returns the chunk's
    # linear response to the momentum entering it (Result.response and the fields after it)
    window: tuple[int, int] | None = None
    carry_response: bool = False
    # check: rebuild each step's update from its batch's gradients (invariant 3), report each step's
    # update error, and keep the gap's share of the change apart as the ``rounding`` term
    rebuild: bool = False

    @property
    def data(self) -> bool:
        return self.keep_examples or self.examples is not None


@dataclass
class Result:
    """Terms with axes (bin, target, [example,] group); ``actual``/``explained`` per target."""

    gradient: torch.Tensor
    weight_decay: torch.Tensor
    momentum: torch.Tensor
    target_labels: list[tuple[int | None, int | None]]
    example_ids: torch.Tensor
    actual: torch.Tensor
    explained: torch.Tensor
    step_actual: torch.Tensor
    step_explained: torch.Tensor
    stats: dict = field(default_factory=dict)
    # with Request.carry_response (forward strategies): m_in entering the chunk adds
    # contract(response[bin], transfer-propagated m_in) to each bin; see explaind_ql.distributed
    response: torch.Tensor | None = None          # (bins, T, P_sel): Σ_s φ_s ⊙ out_coef_s ⊙ Π_{c≤r≤s} a_r
    transfer: torch.Tensor | None = None          # (P_sel,): Π_s a_s over the chunk
    decay_momentum: torch.Tensor | None = None    # (P_sel,): decay momentum built up inside the chunk
    example_momentum: torch.Tensor | None = None  # (E_tracked, P_sel): per-example momentum built up inside
    momentum_in: torch.Tensor | None = None       # (P_sel,): recorded momentum before the chunk's first step
    # the per-example strategies: (bins, T, G) Σ_s ∫∇F·Δθ_s of the recorded updates, which the terms of
    # every example sum to but for the rebuild's gap (:meth:`rounding`)
    along: torch.Tensor | None = None
    rebuild_gap: torch.Tensor | None = None       # Request.rebuild: (bins, T, G) ∫∇F·(Δθ_recorded − Δθ_rebuilt)
    start: torch.Tensor | None = None             # (T,) F(θ_a): what a change too small to judge is measured against

    def rounding(self, n_train: int | None) -> torch.Tensor | None:
        """(bins, T, G) the part of the change the per-example gradients do not rebuild, or None when the
        result has no such term (no example axis, or not all ``n_train`` training examples; None: only the
        gap a rebuilding request measured)."""
        if self.rebuild_gap is not None:
            return self.rebuild_gap
        if self.along is None or n_train is None or len(set(self.example_ids.tolist())) < n_train:
            return None
        return self.along - self.gradient.sum(2) - self.weight_decay - self.momentum

    def replication(self, n_train: int) -> dict[str, float]:
        """The exact change F(θ_b) − F(θ_a) against the sum of every term: the stats' ``residual`` (largest
        over targets), ``change`` (the largest change) and, with a rounding term, ``rounding`` (its largest),
        for a result of the whole model and every example."""
        out = {"residual": float((self.actual - self.total(n_train)).abs().max()),
               "change": float(self.actual.abs().max())}
        r = self.rounding(n_train)
        if r is not None:  # what the frame's rounding term holds: the largest over targets
            out["rounding"] = float(r.sum((0, 2)).abs().max())
        return out

    def total(self, n_train: int | None = None) -> torch.Tensor:
        """Sum of every term per target: what the frame's ``influence`` column sums to. With ``n_train``, the
        rounding term of a result over all those training examples too; without, the terms the per-example
        gradients rebuild (invariant 1's sum)."""
        r = self.rounding(n_train)
        return (self.gradient.sum((0, 2, 3)) + self.weight_decay.sum((0, 2)) + self.momentum.sum((0, 2))
                + (0 if r is None else r.sum((0, 2))))


class Engine:
    """Runs requests against one run on one device/dtype, sharing its caches."""

    def __init__(self, run: Run, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
        self.run, self.device, self.dtype = run, torch.device(device), dtype
        self.fn = ModelFn.for_run(run, self.device, dtype)
        self.dropout_seed = run.dropout_seed
        self.traj = Trajectory(run, self.device, dtype)
        self._split_cache: dict[str, tuple[model_io.Inputs, torch.Tensor]] = {}
        self.theta0 = run.stored_state(0)[0].to(self.device, dtype)
        first = model_io.apply(self.split(run.splits[0])[0], lambda t: t[:1])
        self.facts = facts_for(run, self.device, dtype, lambda: measured(lambda: self.fn._call(self.theta0, None, None, first)))

    def target_labels(self, spec: TargetSpec) -> list[tuple[int | None, int | None]]:
        return self.facts.target_labels(spec)

    # -- inputs ------------------------------------------------------------------------------
    def split(self, name: str) -> tuple[model_io.Inputs, torch.Tensor]:
        if name not in self._split_cache:
            x, y = self.run.split(name)
            self._split_cache[name] = (model_io.to(x, self.device, self.dtype), y.to(self.device))
        return self._split_cache[name]

    def train_items(self, rec: StepRecord, pos: torch.Tensor) -> tuple[model_io.Inputs, torch.Tensor, Draw | None]:
        """Inputs, labels and dropout draw of the items at positions ``pos`` of step ``rec``'s batch."""
        index = rec.meta.batch.to(self.device)[pos]
        x, y = self.split("train")
        draw = None if self.dropout_seed is None else (dropout.step_seed(self.dropout_seed, rec.s), pos)
        return model_io.apply(x, lambda t: t[index]), y[index], draw

    # -- entry point -------------------------------------------------------------------------
    def run_request(self, req: Request) -> Result:
        strategy = req.strategy
        if strategy not in STRATEGIES:  # the planner's strategy choice (explaind_ql.plan.cheapest) decides it
            raise ValueError(f"unknown strategy {strategy!r}: a request runs the strategy it was planned with, "
                             f"one of {', '.join(STRATEGIES)}")
        if strategy == "fold" and req.n_bins != 1:
            raise ValueError("the fold strategy keeps no step axis")
        if strategy in ("delta", "project") and req.data:
            raise ValueError(f"the {strategy} strategy has no example axis")
        if strategy == "project" and req.by_element:
            raise ValueError("the project strategy has no element axis")
        if req.carry_response and strategy not in ("delta", "momentum"):
            raise ValueError(f"the {strategy} strategy returns no momentum response")
        ctx = _Context(self, req)
        t0 = time.perf_counter()
        replay0 = self.traj.replayed_steps
        with progress.task(f"{strategy}: steps {req.a}:{req.b}", req.b - req.a) as ctx.bar:
            if strategy == "fold":
                ctx.run_fold()
            else:
                ctx.run_forward(per_example=strategy == "momentum", project=strategy == "project")
        ctx.stats.update(strategy=strategy, seconds=time.perf_counter() - t0,
                         replayed_steps=self.traj.replayed_steps - replay0)
        return ctx.result()


class Groups:
    """The output group of each selected element, and the per-group contraction of the terms.

    Shared by the engine and by the client that composes distributed chunks.
    """

    def __init__(self, sel: ParamSpace, req: Request, device):
        if req.by_element:
            self.gidx, self.G = torch.arange(sel.size, device=device), sel.size
        else:
            order = {n: i for i, n in enumerate(req.params)}
            self.per_param = [req.group_of_param[order[p.name]] for p in sel.params]
            self.gidx = torch.cat([torch.full((p.numel,), g, dtype=torch.long)
                                   for p, g in zip(sel.params, self.per_param)]).to(device)
            self.G = req.n_groups
        self.masks = ([torch.nonzero(self.gidx == g).flatten() for g in range(self.G)]
                      if self.G <= GROUP_LOOP_MAX else None)

    def contract(self, phi: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """Σ over each group's elements of φ ⊙ vec: (T,P)×(P) → (T,G); (T,P)×(E,P) → (T,E,G)."""
        if vec.dim() == 1:
            return phi.new_zeros(phi.shape[0], self.G).index_add_(1, self.gidx, phi * vec)
        if self.masks is not None:
            return torch.stack([phi[:, m] @ vec[:, m].T for m in self.masks], dim=-1)
        return phi.new_zeros(phi.shape[0], vec.shape[0], self.G).index_add_(2, self.gidx, phi[:, None, :] * vec[None])


def example_columns(n_train: int, req: Request, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(output column of every train index, -1 where not selected; the selected indices).

    Kept examples get a column each, in selection order; otherwise every selected one adds into column 0.
    """
    col = torch.full((n_train,), -1, dtype=torch.long, device=device)
    chosen = (torch.arange(n_train, device=device) if req.examples is None
              else torch.tensor(req.examples, device=device))
    col[chosen] = torch.arange(len(chosen), device=device) if req.keep_examples else 0
    return col, chosen


@dataclass(frozen=True)
class Lanes:
    """Test items grouped into quadrature lanes, each integrated on its own.

    ``x``/``y`` hold each lane's items, (L, items per lane, ...); ``target`` maps a lane's model
    output and labels to its flat target vector; ``summed``: the lanes' results add up to the
    request's targets (items integrated apart, aggregated afterwards). ``live`` (L, U) says which
    of a lane's ReLU inputs reach its targets, ``segments`` how many of them each ReLU call has.
    """

    x: model_io.Inputs
    y: torch.Tensor
    target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    summed: bool = False
    live: torch.Tensor | None = None
    segments: tuple[int, ...] = ()

    @property
    def count(self) -> int:
        return model_io.count(self.x)

    def targets_per_lane(self, T: int) -> int:
        return T if self.summed else T // self.count

    def subset(self, keep: torch.Tensor) -> Lanes:
        """The one-item lanes of ``keep`` (a mask over them), still summed."""
        return dataclasses.replace(self, x=self.xs(keep), y=self.y[keep],
                                   live=None if self.live is None else self.live[keep])

    def joined(self, keep: torch.Tensor, target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Lanes:
        """One lane of the one-item lanes of ``keep``, integrated as one summed target by the plain rule
        (their steps have no kinks)."""
        return Lanes(model_io.apply(self.x, lambda t: t[keep][None, :, 0]), self.y[keep][None, :, 0], target)

    def xs(self, index) -> model_io.Inputs:
        """The inputs of the lanes ``index`` picks."""
        return model_io.apply(self.x, lambda t: t[index])


def _same(v: torch.Tensor) -> torch.Tensor:
    return v


def _rss() -> int:
    return psutil.Process().memory_info().rss


Row = tuple[float, int]  # (node t, lane)


@dataclass(frozen=True)
class ProjectVecs:
    """A step's vectors for the project strategy (Δθ, decay, then carry and gap where present), and the window
    start they depend on: None where they do not (:meth:`_Context._project_vecs`), so that queries over other
    windows share their projections."""

    vecs: torch.Tensor
    carry: bool
    gap: bool
    window: int | None


@dataclass
class Memo:
    """One step's rows evaluated already, keyed by (t, lane): its first round's row values, beside other steps'
    rows in batched calls (:meth:`_Context._prefetch`); the targets at its ends (the stored states',
    :meth:`_Context._at_state`) and, on ReLU models, the ReLU inputs there (:meth:`_Context._lane_sets`); and,
    for φ, the gradient of every row its rule evaluated (:meth:`_Context._gradient_rows`)."""

    values: dict[Row, torch.Tensor] = field(default_factory=dict)
    ends: dict[Row, torch.Tensor] = field(default_factory=dict)
    grads: dict[Row, torch.Tensor] = field(default_factory=dict)
    slopes: dict[Row, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # ReLU inputs, d/dt

    @staticmethod
    def rows(table: dict, ts: torch.Tensor, lanes: torch.Tensor):
        """The rows asked for, stacked (each of a pair apart), when ``table`` holds every one of them."""
        keys = list(zip(ts.tolist(), lanes.tolist()))
        if not keys or any(k not in table for k in keys):
            return None
        if isinstance(table[keys[0]], tuple):
            return tuple(torch.stack(part) for part in zip(*(table[k] for k in keys)))
        return torch.stack([table[k] for k in keys])

    def serve(self, table: dict, compute: Callable) -> Callable:
        """``compute(ts, lanes, *extra)``, answered from ``table`` where it holds every row asked for."""
        def look(ts: torch.Tensor, lanes: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
            known = None if extra else self.rows(table, ts, lanes)
            return compute(ts, lanes, *extra) if known is None else known
        return look


class _Context:
    """State of one request's execution (kept off the Engine so requests never share it)."""

    def __init__(self, eng: Engine, req: Request):
        self.eng, self.req = eng, req
        dev, dt = eng.device, eng.dtype
        space: ParamSpace = eng.run.space
        self.sel = space.subspace(list(req.params))
        self.idx = space.element_index(self.sel).to(dev)
        self.all_params = self.sel.size == space.size
        self.groups = Groups(self.sel, req, dev)
        self.gidx, self.G, self.masks = self.groups.gidx, self.groups.G, self.groups.masks
        x, y = eng.split(req.target.split)
        items = torch.tensor(req.target.items, device=dev)
        self.x_items = model_io.apply(x, lambda t: t[items])
        # quadrature lanes: each test item on its own when items are kept, or when the model has ReLU
        # kinks (aggregated targets are then summed afterwards, and each step joins the items without
        # kinks into one lane again: _lane_sets); else one lane of all items, which takes one gradient
        # of the summed target per node
        self.kinked = bool(eng.facts.kink_segments)
        per_item = len(req.target.items) > 1 and (req.target.keep_test or self.kinked)
        spec = dataclasses.replace(req.target, keep_test=True) if per_item else req.target
        loss = eng.run.loss
        lanes = Lanes(model_io.apply(self.x_items, lambda t: t[:, None] if per_item else t[None]),
                      y[items][:, None] if per_item else y[items][None],
                      lambda out, yl: targets.make(spec, yl, loss)(out),
                      summed=per_item and not req.target.keep_test, segments=eng.facts.kink_segments)
        # which ReLU inputs reach the targets at all: the adaptive rule cuts only at those
        live = (eng.fn.live_sites(eng.theta0, lanes.target, lanes.x, lanes.y)
                if self.kinked and req.tolerance is not None else None)
        self.lanes = dataclasses.replace(lanes, live=live)
        self.joint_target = lambda out, yl: targets.make(req.target, yl, loss)(out)
        self.lane_targets = targets.make(spec, y[items], loss)  # every lane's targets from one forward pass, lane-major
        self.joinable = live is not None and lanes.summed and self._joinable()
        self.labels = eng.target_labels(req.target)
        self.T = len(self.labels)
        self.col, self.chosen = example_columns(eng.run.split_size("train"), req, dev)
        self.example_ids = self.chosen if req.keep_examples else torch.zeros(0, dtype=torch.long, device=dev)
        self.E = max(1, len(self.example_ids))
        n_steps = req.b - req.a
        self.bin = (torch.tensor(req.step_bin, dtype=torch.long) if req.step_bin is not None
                    else torch.zeros(n_steps, dtype=torch.long))
        B, T, G = req.n_bins, self.T, self.G
        self.grad = torch.zeros(B, T, self.E if req.data else 1, G, dtype=dt, device=dev)
        self.wd = torch.zeros(B, T, G, dtype=dt, device=dev)
        self.mom = torch.zeros(B, T, G, dtype=dt, device=dev)
        # Σ φ·Δθ of the recorded steps (Result.along), the rebuild's gap (Request.rebuild)
        self.along = torch.zeros(B, T, G, dtype=dt, device=dev) if req.keep_examples else None
        self.gap = torch.zeros(B, T, G, dtype=dt, device=dev) if req.rebuild else None
        self.update_errors: list[float] = []
        self.start: torch.Tensor | None = None  # F(θ_a) per target
        self.step_actual = torch.zeros(n_steps, T, dtype=dt, device=dev)
        self.step_explained = torch.zeros(n_steps, T, dtype=dt, device=dev)
        self.qstats = quadrature.QuadStats()
        self.joined_items = 0  # item-steps integrated on a kink-free lane of several items (_lane_sets)
        self.prefetched = 0  # steps whose first round was evaluated in calls with other steps' (_prefetch)
        self.block_steps = 1  # steps walked in one block (_blocks): a pilot of the query times blocks of this many
        self.stats: dict = {}
        self.response_out: dict = {}  # Request.carry_response: the Result's response fields
        self.seconds = {"test": 0.0, "trajectory": 0.0}
        self.grown = {"test": 0, "trajectory": 0, "train": 0}  # largest resident growth in one unit of work
        self.bar = progress.Task()
        self.budget = self._quad_budget()
        # (kind, step) → the first-round rows of that step's integration, evaluated with other steps' (_prefetch)
        self.memo: dict[tuple[str, int], Memo] = {}
        self.states: dict[int, torch.Tensor] = {}  # stored state s → every lane's targets there (_states_at)

    # -- test side ---------------------------------------------------------------------------
    def _quad_budget(self) -> torch.Tensor | None:
        """Per-step absolute error allowance of each target: tolerance × its |ΔF over the enclosing stored
        states| / steps, so that every target's residual is held relative to its own change (check's
        relative_residual), floored like that residual for a target that barely moves."""
        req, run = self.req, self.eng.run
        if req.tolerance is None:
            return None
        a, b = req.window or (req.a, req.b)
        lo = run.ckpt_at_or_before(a)
        hi = min(len(run.ckpt_states) - 1, int(torch.searchsorted(torch.as_tensor(run.ckpt_states), b)))
        f = self._targets(self._lane_values(torch.stack([run.stored_state(p)[0].to(self.eng.device, self.eng.dtype)
                                                         for p in (lo, hi)])))
        scale = torch.maximum((f[1] - f[0]).abs(), CHANGE_FLOOR * (1 + f[0].abs()))
        # below a few roundings of F the exact-change check measures noise, not quadrature error
        noise = 16 * torch.finfo(self.eng.dtype).eps * (1 + f[0].abs() + f[1].abs())
        return torch.maximum(req.tolerance * scale / max(1, b - a), noise)

    def walk(self, a: int, b: int):
        """The trajectory's records, timing how long reading and replaying take."""
        it = self.eng.traj.walk(a, b)
        while True:
            t0, rss0 = time.perf_counter(), _rss()
            rec = next(it, None)
            self.seconds["trajectory"] += time.perf_counter() - t0
            self.grown["trajectory"] = max(self.grown["trajectory"], _rss() - rss0)
            if rec is None:
                return
            yield rec
            self.bar.advance()

    def _key(self, key: tuple) -> tuple:
        return key + (self.req.target, self.req.params, self.req.nodes, self.req.tolerance, self.req.rule,
                      str(self.eng.device), self.eng.dtype)

    def _cache(self, key: tuple) -> TensorCache:
        """The open run's cache of ``key``'s kind: φ, or projections."""
        return self.eng.run.cache.proj if key[0] == "proj" else self.eng.run.cache.phi

    def _is_cached(self, key: tuple) -> bool:
        return self._key(key) in self._cache(key)

    def _cached(self, key: tuple, compute) -> torch.Tensor:
        """A test-side tensor of one step, cached per open run (queries in a session share them)."""
        cache = self._cache(key)
        key = self._key(key)
        if key in cache:
            self.stats["phi_cache_hits"] = self.stats.get("phi_cache_hits", 0) + 1
            return cache[key]
        t0, rss0 = time.perf_counter(), _rss()
        out = compute()
        self.seconds["test"] += time.perf_counter() - t0
        self.grown["test"] = max(self.grown["test"], _rss() - rss0)
        cache[key] = out
        return out

    def _joinable(self) -> bool:
        """Whether a batch of items runs every ReLU call on their inputs item by item (batch-major),
        so that one forward pass over all items tells which items' units cross zero."""
        x = self.lanes.xs((slice(0, 2), 0))
        return self.eng.fn.kink_segments(self.eng.theta0, x) == tuple(2 * s for s in self.lanes.segments)

    def _lane_values(self, thetas: torch.Tensor) -> torch.Tensor:
        """(n, L, C) every lane's targets at each of the params ``thetas`` (n, P): a forward pass of all items
        for each, in calls across them (where each lane's own would take L)."""
        fn, per = self.eng.fn, self._forward_rows(self.lanes, self.lanes.count)
        out = [fn.values_at(lambda o, _: self.lane_targets(o), thetas[k],
                            model_io.apply(self.x_items, lambda t: t.expand(len(k), *t.shape)), thetas.new_zeros(len(k)))
               for k in torch.arange(len(thetas), device=thetas.device).split(per)]
        return torch.cat(out).view(len(thetas), self.lanes.count, -1)

    def _forward_rows(self, lanes: Lanes, lanes_a_row: int = 1) -> int:
        """Forward-only rows of ``lanes`` (each of ``lanes_a_row`` lanes' items) one call holds: a row keeps 2.5
        of the largest activations at its live peak (torch.profiler), 4 allowed."""
        return max(1, int(self.req.call_bytes // (4 * self.eng.fn.itemsize * lanes_a_row
                                                  * max(1, self._activations(lanes)[1]))))

    def _states_at(self, want: dict[int, torch.Tensor]) -> None:
        """Every lane's targets at the stored states ``want`` (s → θ_s) not evaluated yet, kept in :attr:`states`:
        each is the exact change's end of step s − 1 and its start of step s, for the quadrature (its lanes'
        ``f_at`` at t = 0 and 1) and :meth:`check_step` alike, evaluated once."""
        todo = [(s, th) for s, th in want.items() if s not in self.states]
        if todo:
            self.states.update(zip((s for s, _ in todo), self._lane_values(torch.stack([th for _, th in todo]))))

    def _at_state(self, s: int, theta: torch.Tensor) -> torch.Tensor:
        """(L, C) every lane's targets at the stored state θ_s (:meth:`_states_at`)."""
        self._states_at({s: theta})
        return self.states[s]

    def _targets(self, lane_values: torch.Tensor) -> torch.Tensor:
        """The request's target vectors from every lane's targets (..., L, C): summed over lanes, or laid end to end."""
        return lane_values.sum(-2) if self.lanes.summed else lane_values.flatten(-2)

    def _lane_sets(self, path: Path) -> tuple[list[tuple[Lanes, float, Callable[[torch.Tensor], torch.Tensor]]],
                                              tuple[torch.Tensor, torch.Tensor] | None]:
        """This step's lanes, each with its share of the error budget and how its lanes' values are read from
        all lanes' ((L, C) targets, (L, U) ReLU inputs); and, where they were evaluated to tell the sets
        apart, every lane's ReLU inputs and their t-derivatives at the step's ends, (2, L, U) each.

        An item none of whose live ReLU inputs changes sign over the step has a smooth integrand
        there. Such items join one lane again, integrated by the plain rule: one gradient of their
        summed target per node instead of a kink-corrected row per item. The others keep their own
        lanes, where their kinks are corrected for and cut at.
        """
        lanes = self.lanes
        if not self.joinable or lanes.count < 2:
            return [(lanes, 1.0, _same)], None
        x = model_io.apply(lanes.x, lambda t: t[None, :, 0].expand(2, *t[:, 0].shape))
        z, d = path.slopes(torch.tensor([0.0, 1.0], dtype=self.eng.dtype, device=self.eng.device), x)

        def per_lane(v: torch.Tensor) -> torch.Tensor:  # (2, U·L) of each call's inputs, item-major → (2, L, U)
            return torch.cat([c.unflatten(1, (lanes.count, -1))
                              for c in v.split(tuple(lanes.count * s for s in lanes.segments), 1)], 2)
        ends = per_lane(z), per_lane(d)
        crossing = quadrature.locate_kinks(ends[0][0], ends[0][1], ends[1][0], ends[1][1]).sign != 0  # (L, U)
        kinked = (crossing & lanes.live).any(1)
        if lanes.count - int(kinked.sum()) < 2:
            return [(lanes, 1.0, _same)], ends
        share = 1 - float(kinked.float().mean())
        smooth = lanes.joined(~kinked, self.joint_target)
        self.joined_items += model_io.count(smooth.xs(0))
        return [(smooth, share, lambda v: v[~kinked].sum(0, keepdim=True))] + (
            [(lanes.subset(kinked), 1 - share, lambda v: v[kinked])] if bool(kinked.any()) else []), ends

    def _integrate(self, rec: StepRecord, path: Path, at_rows, along, spread, error, row_bytes, cat_dim: int,
                   finish=None, memo: Memo | None = None, values=None) -> torch.Tensor:
        """Quadrature along the step of ``at_rows(target, ts, x, y, jumps=None)``: one row per (node t, lane).

        ``row_bytes(lanes)`` is what one derivative row of those lanes holds. With ``finish(lanes, rows)``
        each lane set's result is what it makes of the rows of the rule found (lanes summed already).
        ``memo`` holds rows of the request's own lanes evaluated already (:meth:`_prefetch`); ``values(ts,
        lanes)``, where given, evaluates those lanes' plain rows instead of ``at_rows``.
        """
        out = 0
        sets, slopes = self._lane_sets(path)
        for lanes, share, pick in sets:
            own = memo if lanes is self.lanes and memo is not None else Memo()
            if self.budget is not None:  # the exact change's ends, from the stored states
                for t, v in ((0.0, self._at_state(rec.s, rec.theta)), (1.0, self._at_state(rec.s + 1, rec.theta_next))):
                    for lane, end in enumerate(pick(v)):
                        own.ends.setdefault((t, lane), end)
            if slopes is not None and lanes.segments:  # the ReLU inputs at the ends, from the lane sets' own
                for e, t in enumerate((0.0, 1.0)):
                    for lane, zd in enumerate(zip(pick(slopes[0][e]), pick(slopes[1][e]))):
                        own.slopes[(t, lane)] = zd
            part = self._integrate_lanes(rec, lanes, path, partial(at_rows, lanes.target), along, spread, error,
                                         row_bytes(lanes), cat_dim, None if self.budget is None else self.budget * share,
                                         finish is not None, own, values if lanes is self.lanes else None)
            if finish is not None:
                out = out + finish(lanes, part[1])
            else:
                out = out + (part.unflatten(cat_dim, (lanes.count, -1)).sum(cat_dim) if lanes.summed else part)
        return out  # Σ_x ∫∇F_x

    def _integrate_lanes(self, rec: StepRecord, lanes: Lanes, path: Path, at_rows, along, spread, error,
                         row_bytes: float, cat_dim: int, budget: torch.Tensor | None, keep_rows: bool = False,
                         memo: Memo | None = None, values=None):
        # bounded memory per call: derivative rows as estimated (twice that with the kink jumps'
        # forward-mode pass), forward-only rows by _forward_rows
        per_call = max(1, min(ROWS_PER_CALL, int(self.req.call_bytes // max(1.0, row_bytes))))
        per_forward = self._forward_rows(lanes)

        def rows(per: int, f, ts: torch.Tensor, ln: torch.Tensor, *extra: torch.Tensor):
            parts = zip(ts.split(per), ln.split(per), *(e.split(per) for e in extra))
            outs = [f(t, lanes.xs(lane), lanes.y[lane], *ex) for t, lane, *ex in parts]
            return tuple(map(torch.cat, zip(*outs))) if isinstance(outs[0], tuple) else torch.cat(outs)

        # the exact change F(θ + tΔθ): the integrands of a restricted selection carry the other params'
        # part (:meth:`_rest`), so every selection is held to it, as the whole model is
        f_at = partial(rows, per_forward, lambda t, x, y: path.values(lanes.target, t, x, y))
        kinked = self.kinked and bool(lanes.segments)
        slopes = partial(rows, per_forward, lambda t, x, y: path.slopes(t, x)) if kinked else None
        per_jumped = max(1, min(ROWS_PER_CALL, int(self.req.call_bytes // max(1.0, 2 * row_bytes))))
        jumped = (partial(rows, per_jumped, lambda t, x, y, *jumps: at_rows(t, x, y, jumps))
                  if kinked else None)
        values = values or partial(rows, per_call, at_rows)
        if memo is not None:
            values, f_at = memo.serve(memo.values, values), memo.serve(memo.ends, f_at)
            if slopes is not None:
                slopes = memo.serve(memo.slopes, slopes)
        integrand = quadrature.Integrand(values, along, error, lanes.count, cat_dim,
                                         f_at, slopes, spread, jumped, lanes.segments, lanes.live)
        # a kink-free lane of a kinked model's items (_lane_sets) starts at the kinked rule's nodes too: on the
        # paper's model its 2-node estimate missed the exact change 2e-6 relative on late steps, and the halvings
        # that followed took 14 rows where 3 nodes meet it at once
        nodes = self.req.nodes if budget is None or kinked or not self.kinked else max(self.req.nodes,
                                                                                        quadrature.KINKED_NODES)
        return quadrature.integrate(integrand, nodes, budget, rec.s, self.qstats, self.eng.dtype,
                                    self.eng.device, self.req.rule, pooled=lanes.summed, rows=keep_rows)

    def _rest(self) -> bool:
        """Whether the test-side integrands carry the unselected params' part of the step.

        The adaptive rule holds an estimate to the exact change F(θ_{s+1}) − F(θ_s), which only the
        whole step's φ·Δθ has. Without it a selection is judged by its halvings alone, which cannot
        see a jump of the integrand that falls mid-span (the two rules then weigh both sides alike:
        the margin's switch of the largest other logit on a smooth model), so ``of X`` would be
        integrated on other spans, to another value, than X's rows of the unrestricted query. The
        other params therefore enter as one more part, their derivative along their own Δθ, which
        is checked with the selection and never reported: a restriction is a pure restriction.
        """
        return not self.all_params and self.budget is not None

    def phi(self, rec: StepRecord) -> torch.Tensor:
        """(T, P_sel) path-integrated target gradient.

        The rule (nodes, spans, kink corrections) is chosen on each selected param's φ·Δθ, a scalar
        per target and param that a row gets from one reverse pass of its few targets. φ is then that
        rule's weighted sum of gradients, each lane set's rows in one backward pass with shared weights
        (:meth:`Path.gradient`): a gradient of a batch, where a Jacobian per row would take every
        row's weight gradients apart. The rule is held to the same exact-change check.
        """
        rest = None
        if self._rest():  # the other params' Δθ: their part is one more column, ∇F · Δθ_rest
            rest = rec.delta.clone()
            rest[self.idx] = 0
        n = len(self.req.params)  # each param a group: its φ·Δθ

        def error(c: torch.Tensor, f: torch.Tensor) -> torch.Tensor:  # of the selection's part, and of the whole
            sel = quadrature.beyond_rounding((f - c)[:n].sum(0), f[:n].abs().sum(0))
            return sel if rest is None else torch.maximum(
                sel, quadrature.beyond_rounding((f - c).sum(0), f.abs().sum(0)))

        def integrate() -> torch.Tensor:
            memo = self.memo.pop(("phi", rec.s), None) or Memo()
            out = self._path_integral(rec, rec.delta[self.idx][None], tuple(range(n)), n, error,
                                      lambda path, lanes, rows: self._gradient(path, lanes, rows, rest, memo), memo,
                                      rest is None and self._keeps_gradients())
            return out if rest is None else out[:, :-1].contiguous()
        return self._cached(self._phi_key(rec), integrate)

    def _phi_key(self, rec: StepRecord) -> tuple:
        return ("phi", rec.s)

    def _proj_key(self, rec: StepRecord, pv: ProjectVecs) -> tuple:
        return ("proj", rec.s, pv.window, self.req.group_of_param, len(pv.vecs), self.req.rebuild)

    def _gradient(self, path: Path, lanes: Lanes, rows: quadrature.Rows, rest: torch.Tensor | None,
                  memo: Memo | None = None) -> torch.Tensor:
        """(T, P_sel[+1]) the lanes' share of φ from their rule's rows: lanes summed into their targets,
        or kept lane after lane; rows in calls bounded by the request's call bytes. Rows whose gradients
        were evaluated already (``memo``), and the rows of lanes kept apart with few rows each, are
        weighted row by row instead."""
        fn = self.eng.fn
        jumps = rows.jumps or ()
        everything = torch.arange(len(rows.ts), device=rows.ts.device)
        one = lanes.summed or lanes.count == 1
        each = None
        if rest is None and memo is not None and not jumps:
            each = Memo.rows(memo.grads, rows.ts, rows.lanes)
            each = None if each is None else each * rows.weights[:, None, None]
        if each is None and rest is None and not one and len(rows.ts) < ROWS_APART * lanes.count:
            each = self._row_gradients(path, lanes, rows)
        if each is not None:  # (m, C, P_sel), weighted: summed, or added into each row's lane
            return each.sum(0) if one else each.new_zeros(lanes.count, *each.shape[1:]).index_add_(
                0, rows.lanes, each).flatten(0, 1)
        row_bytes = fn.itemsize * (3 * lanes.targets_per_lane(self.T) + 1) * self._activations(lanes)[0]
        per = max(1, int(self.req.call_bytes // max(1.0, row_bytes)))

        def of(pick: torch.Tensor) -> torch.Tensor:
            return sum(path.gradient(self.sel, lanes.target, rows.ts[k], rows.weights[k], lanes.xs(rows.lanes[k]),
                                     lanes.y[rows.lanes[k]], tuple(j[k] for j in jumps) or None, rest)
                       for k in pick.split(per))
        if one:
            return of(everything)
        return self._lane_gradients(path, lanes, rows, rest, row_bytes)

    def _lane_gradients(self, path: Path, lanes: Lanes, rows: quadrature.Rows, rest: torch.Tensor | None,
                        row_bytes: float) -> torch.Tensor:
        """(L·C, P_sel[+1]) each kept lane's share of φ from its rows, several lanes in one call (a lane's own
        call per lane paid a call's fixed cost each: 32 one-item lanes of the paper's model, 19 ms a lane).

        A call's lanes have their rows padded with rows of weight 0 to the most any of them has, so lanes go
        into calls in order of their row counts, each call's fewest at least :data:`PADDED_SHARE` of its most.
        """
        L, dev = lanes.count, rows.ts.device
        counts = torch.bincount(rows.lanes, minlength=L)
        order = torch.argsort(rows.lanes, stable=True)
        slot = torch.arange(len(order), device=dev) - (torch.cumsum(counts, 0) - counts)[rows.lanes[order]]
        pick = torch.full((L, int(counts.max())), -1, dtype=torch.long, device=dev)
        pick[rows.lanes[order], slot] = order
        real = pick >= 0
        pick = pick.clamp_min(0)

        def padded(v: torch.Tensor, k: torch.Tensor, width: int) -> torch.Tensor:  # rows of lanes k, 0 in the padding
            mask = real[k, :width]
            return v[pick[k, :width]] * mask.view(*mask.shape, *[1] * (v.dim() - 1)).to(v.dtype)
        C, P = lanes.targets_per_lane(self.T), self.sel.size + (rest is not None)
        budget = self.req.call_bytes
        calls, lane_order = [], torch.argsort(counts, descending=True, stable=True).tolist()
        while lane_order:  # the most rows first; a call ends where the padding or the bytes would grow too large
            width = int(counts[lane_order[0]])
            take = 1
            while (take < len(lane_order) and int(counts[lane_order[take]]) >= PADDED_SHARE * width
                   and (take + 1) * (width * row_bytes + 2 * C * P * self.eng.fn.itemsize) <= budget):
                take += 1
            calls.append((torch.tensor(lane_order[:take], device=dev), width))
            lane_order = lane_order[take:]
        out = torch.empty(L, C, P, dtype=self.eng.dtype, device=dev)
        for k, width in calls:
            jumps = None
            if rows.jumps:  # a padding row's jumps weigh nothing either: weight, tail and share 0
                w, tail, share, side = rows.jumps
                jumps = (padded(w, k, width), padded(tail, k, width), padded(share, k, width), side[pick[k, :width]])
            lane = k[:, None].expand(-1, width)
            out[k] = path.gradient(self.sel, lanes.target, rows.ts[pick[k, :width]], padded(rows.weights, k, width),
                                   lanes.xs(lane), lanes.y[lane], jumps, rest)
        return out.flatten(0, 1)

    def _row_gradients(self, path: Path, lanes: Lanes, rows: quadrature.Rows) -> torch.Tensor:
        """(m, C, P_sel) each row's weighted gradient (its kink jumps with it), rows of every lane in calls
        together: for lanes kept apart with fewer rows each than a lane's own backward pass is worth."""
        m = len(rows.ts)
        g = self._row_grads(lanes, self.sel, path.theta.expand(m, -1), path.delta.expand(m, -1), rows.ts, rows.lanes,
                            rows.jumps or ())
        return g if rows.jumps else g * rows.weights[:, None, None]

    def _gradient_rows(self, sel: ParamSpace, groups: Groups, theta: torch.Tensor, delta: torch.Tensor,
                       ts: torch.Tensor, ln: torch.Tensor, vecs: torch.Tensor, kept: list[Memo] | None) -> torch.Tensor:
        """(m, V·G, C) an integrand's rows along each row's vectors ``vecs[j]`` (V, P_sel) on each group, from
        each row's own gradient over ``sel`` at θ_j + t_jΔθ_j (``theta``, ``delta``: (m, P), rows of one step
        or of several). With ``kept`` (a Memo per row) each gradient is kept there by (t, lane): φ is its
        rule's weighted sum of them (:meth:`_gradient`), so no row is evaluated twice."""
        g = self._row_grads(self.lanes, sel, theta, delta, ts, ln)  # (m, C, P_sel)
        shares = torch.stack([g.new_zeros(*g.shape[:2], groups.G).index_add_(2, groups.gidx, g * vecs[:, v][:, None])
                              for v in range(vecs.shape[1])], 1)  # (m, V, C, G)
        if kept is not None:
            for r, key in enumerate(zip(ts.tolist(), ln.tolist())):
                kept[r].grads[key] = g[r]
        return shares.transpose(2, 3).flatten(1, 2)  # as the step's own rows are laid out

    def _row_grads(self, lanes: Lanes, sel: ParamSpace, theta: torch.Tensor, delta: torch.Tensor, ts: torch.Tensor,
                   ln: torch.Tensor, jumps: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """(m, C, P_sel) each row's gradient over ``sel`` at its own θ_j + t_jΔθ_j (``theta``, ``delta``: (m, P)),
        with ``jumps`` its weighted value's plus its kink jumps'; in calls of as many rows as one holds."""
        idx = self.eng.run.space.element_index(sel).to(ts.device)
        everything = torch.equal(idx, torch.arange(theta.shape[1], device=idx.device))  # sel is the flat vector
        out = []
        for k in torch.arange(len(ts), device=ts.device).split(self._gradient_rows_per_call(lanes)):
            points = torch.addcmul(theta[k], ts[k, None], delta[k])
            out.append(self.eng.fn.lane_jacobian(sel, lanes.target, points if everything else points[:, idx], points,
                                                 lanes.xs(ln[k]), lanes.y[ln[k]], tuple(j[k] for j in jumps) or None))
        return torch.cat(out)

    def _keeps_gradients(self) -> bool:
        """Whether φ's rows are evaluated as gradients and kept (:meth:`_gradient_rows`): on smooth models,
        where a step's rows are few, while 64 rows' gradients fit one call."""
        C = self.lanes.targets_per_lane(self.T)
        return not self.kinked and 64 * C * self.sel.size * self.eng.fn.itemsize <= self.req.call_bytes

    def _gradient_rows_per_call(self, lanes: Lanes | None = None) -> int:
        """How many rows' own gradients one call holds: each row its forward pass, its reverse pass per
        target, its own params and its gradient."""
        lanes = lanes or self.lanes
        C, (every, largest) = lanes.targets_per_lane(self.T), self._activations(lanes)
        row = self.eng.fn.itemsize * (every + 2 * C * largest + C * self.eng.run.space.size + self.eng.run.space.size)
        return max(1, min(GRADIENT_ROWS_PER_CALL, int(self.req.call_bytes // row)))

    def projections(self, rec: StepRecord, pv: ProjectVecs) -> torch.Tensor:
        """(V, G, T): φ_s · (each vector of ``pv.vecs`` restricted to each group), without φ.

        ``vecs[0]`` must be Δθ_s restricted to the selection (the exact-change check uses
        it). Every projection is held to the tolerance, not only their sum.
        """
        vecs = pv.vecs

        def integrate() -> torch.Tensor:
            return self._path_integral(rec, vecs, self.req.group_of_param, self.G,
                                       lambda c, f: quadrature.beyond_rounding(f - c, f.abs()).amax(0),
                                       memo=self.memo.pop(("proj", rec.s), None))
        out = self._cached(self._proj_key(rec, pv), integrate)
        return out.reshape(len(vecs), self.G, -1)

    def _path_integral(self, rec: StepRecord, vecs: torch.Tensor, group_of_param: tuple[int, ...], G: int,
                       error, finish=None, memo: Memo | None = None, gradients: bool = False) -> torch.Tensor:
        """(V·G, T) ∫ ∇F · (each of ``vecs`` on each group) along the step, or with ``finish(path, lanes, rows)``
        what it makes of each lane set's rule instead (the rows' gradients: :meth:`phi`).

        The groups' shares of the vectors enter the layers as scalars (:class:`Path`), and a row's
        derivatives in them are taken by reverse or forward mode, whichever needs fewer passes.
        """
        fn, V = self.eng.fn, len(vecs)
        moved_rows = self._moved_rows(V * G)

        def row_bytes(lanes: Lanes) -> float:
            return self._row_bytes(lanes, V * G, moved_rows)

        sel, groups, H, vecs = self._grouped(rec, vecs, group_of_param, G)
        path = fn.path(rec.theta, rec.delta, sel, vecs, groups, moved_rows)
        C = self.lanes.targets_per_lane(self.T)

        def from_gradients(ts: torch.Tensor, ln: torch.Tensor) -> torch.Tensor:
            m = len(ts)
            return self._gradient_rows(sel, groups, rec.theta.expand(m, -1), rec.delta.expand(m, -1), ts, ln,
                                       vecs.expand(m, *vecs.shape), [memo] * m)
        out = self._integrate(
            rec, path, lambda target, ts, x, y, jumps=None: path.projections(target, ts, x, y, C, jumps).flatten(1, 2),
            lambda est: est[:H].sum(0), lambda est: est.abs().sum(0), error, row_bytes, 1,
            None if finish is None else partial(finish, path), memo, from_gradients if gradients else None)
        return out if finish is not None else out.reshape(V, H, -1)[:, :G].flatten(0, 1)

    def _row_elements(self, lanes: Lanes, directions: int) -> int:
        """What one derivative row of ``lanes`` keeps along ``directions`` (vectors × groups): its forward
        pass, and about two of the largest intermediates per target (reverse mode) or ten per direction
        (forward mode), the live peak torch.profiler measures."""
        every, largest = self._activations(lanes)
        C = lanes.targets_per_lane(self.T)
        return every + (2 * C if C <= directions else 10 * directions) * largest

    def _moved_rows(self, directions: int) -> bool:
        """Whether rows get their own moved params: when those are no larger than what a row keeps."""
        return self.eng.run.space.size <= self._row_elements(self.lanes, directions)

    def _row_bytes(self, lanes: Lanes, directions: int, moved_rows: bool) -> float:
        return self.eng.fn.itemsize * (self._row_elements(lanes, directions) + moved_rows * self.eng.run.space.size)

    # -- test side, several steps at once -----------------------------------------------------
    def _blocks(self, recs: Iterable[StepRecord]) -> Iterator[list[StepRecord]]:
        """The records in blocks of as many steps as one batched call holds the first-round rows of
        (:meth:`_prefetch`, each row with its own params); one at a time on kinked models, whose steps
        are each located and cut."""
        size = 1 if self.kinked else max(1, self._gradient_rows_per_call() // (self.lanes.count * self.req.nodes))
        self.block_steps = size
        block: list[StepRecord] = []
        for rec in recs:
            block.append(rec)
            if len(block) == size:
                yield block
                block = []
        if block:
            yield block

    def _prefetch(self, block: list[StepRecord], vecs: list[ProjectVecs] | None = None) -> None:
        """The first-round rows of every step of ``block`` (each lane's n nodes over the whole step, and the
        targets at the stored states the steps start and end at), evaluated in calls across the steps and kept in
        :attr:`memo` for each step's own integration, which refines from there as before.

        On a small model a call costs about as much for 1 row as for 32 (dispatch), and a smooth step
        mostly needs only its first round, so this takes a call for several steps instead of two a step.
        ``vecs``: each step's :class:`ProjectVecs` for :meth:`projections`; without, :meth:`phi`'s rows: each row's
        gradient, from which both its rule's rows and φ are contracted.
        """
        if len(block) < 2 or self.kinked or (vecs is None and (self._rest() or not self._keeps_gradients())):
            return
        if vecs is not None and self._activations(self.lanes)[0] < HEAVY_ROWS * self.eng.run.space.size:
            return  # light rows: their own gradients cost more than their projections (no weight gradients)
        t0, rss0 = time.perf_counter(), _rss()
        n_phi = len(self.req.params)
        todo = []  # (record, its vectors over the integrand's params); the params and Groups are every step's
        for i, rec in enumerate(block):
            if vecs is None and not self._is_cached(self._phi_key(rec)):
                sel, groups, _, v = self._grouped(rec, rec.delta[self.idx][None], tuple(range(n_phi)), n_phi)
                todo.append((rec, v))
            elif vecs is not None and not self._is_cached(self._proj_key(rec, vecs[i])):
                sel, groups, _, v = self._grouped(rec, vecs[i].vecs, self.req.group_of_param, self.G)
                todo.append((rec, v))
        if len(todo) < 2:
            return
        for shape in dict.fromkeys(tuple(v.shape) for _, v in todo):  # steps whose vectors stack
            part = [(rec, v) for rec, v in todo if tuple(v.shape) == shape]
            memos = [self.memo.setdefault(("phi" if vecs is None else "proj", rec.s), Memo()) for rec, _ in part]
            self.prefetched += len(part)
            self._prefetch_rows(part, memos, sel, groups, vecs is None)
        if self.budget is not None:  # the targets at every stored state the steps start or end at
            self._states_at({s: th for rec, _ in todo for s, th in ((rec.s, rec.theta), (rec.s + 1, rec.theta_next))})
        self.seconds["test"] += time.perf_counter() - t0
        self.grown["test"] = max(self.grown["test"], _rss() - rss0)

    def _prefetch_rows(self, part: list[tuple[StepRecord, torch.Tensor]], memos: list[Memo], sel: ParamSpace,
                       groups: Groups, phi: bool) -> None:
        """:meth:`_prefetch` for steps whose vectors have one shape: each row from its own gradient at its
        step's θ_s + tΔθ_s (:meth:`_gradient_rows`; for :meth:`phi` the gradients are kept too). The targets
        at the steps' ends are the stored states' (:meth:`_at_state`)."""
        lanes, dev, dt = self.lanes, self.eng.device, self.eng.dtype
        theta, delta = torch.stack([rec.theta for rec, _ in part]), torch.stack([rec.delta for rec, _ in part])
        vv = torch.stack([v for _, v in part])  # (steps, V, P_sel)
        first = quadrature.plain_rows([(0.0, 1.0, lane) for lane in range(lanes.count)], self.req.nodes, dt, dev,
                                      self.req.rule if self.budget is None else "gauss")
        step = torch.arange(len(part), device=dev).repeat_interleave(len(first.ts))
        ts, ln = first.ts.repeat(len(part)), first.lanes.repeat(len(part))
        out = self._gradient_rows(sel, groups, theta[step], delta[step], ts, ln, vv[step],
                                  [memos[j] for j in step.tolist()] if phi else None)
        for r, key in enumerate(zip(ts.tolist(), ln.tolist())):
            memos[int(step[r])].values[key] = out[r]

    def _grouped(self, rec: StepRecord, vecs: torch.Tensor, group_of_param: tuple[int, ...],
                 G: int) -> tuple[ParamSpace, Groups, int, torch.Tensor]:
        """(params, their Groups, how many groups, ``vecs`` over those params) for a test-side path.

        The selected params go to ``group_of_param``. With :meth:`_rest` every param takes part, the
        unselected ones as group G, and ``vecs`` are over all of them: Δθ there for the first vector
        (the step itself), zero for the others (decay and carried momentum are the selection's).
        """
        req, dev = self.req, self.eng.device
        if not self._rest():
            return self.sel, Groups(self.sel, dataclasses.replace(
                req, group_of_param=group_of_param, n_groups=G, by_element=False), dev), G, vecs
        space = self.eng.run.space
        own = dict(zip(req.params, group_of_param))
        names = tuple(space.names)
        groups = Groups(space, dataclasses.replace(req, params=names, group_of_param=tuple(
            own.get(n, G) for n in names), n_groups=G + 1, by_element=False), dev)
        full = vecs.new_zeros(len(vecs), space.size)
        full[:, self.idx] = vecs
        full[0] = rec.delta
        return space, groups, G + 1, full

    def _activations(self, lanes: Lanes) -> tuple[int, int]:
        """(all, largest) intermediate elements of one lane's forward pass (measured once per shape)."""
        return self.eng.fn.activation_elements(self.eng.theta0, lanes.xs(0))

    def check_step(self, k: int, rec: StepRecord, explained: torch.Tensor) -> None:
        before = self._targets(self._at_state(rec.s, rec.theta))
        if k == 0:
            self.start = before
        self.step_actual[k] = self._targets(self._at_state(rec.s + 1, rec.theta_next)) - before
        self.step_explained[k] = explained
        self.states = {s: v for s, v in self.states.items() if s > rec.s}  # θ_s is behind the walk

    # -- contraction helpers -----------------------------------------------------------------
    def contract(self, phi: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        return self.groups.contract(phi, vec)

    def batch_examples(self, rec: StepRecord) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Selected examples of the step's batch: train indices, output columns, positions in the batch."""
        b = rec.meta.batch.to(self.eng.device)
        cols = self.col[b]
        keep = cols >= 0
        return b[keep], cols[keep], keep.nonzero()[:, 0]

    def pegrads(self, rec: StepRecord, pos: torch.Tensor) -> torch.Tensor:
        """c_s w_s g_{s,k}: (n, P_sel) clipped, weighted per-example gradients of the selected params."""
        rss0 = _rss()
        g = self.eng.fn.per_example_grads(self.sel, rec.theta[self.idx], rec.theta, *self.eng.train_items(rec, pos))
        self.grown["train"] = max(self.grown["train"], _rss() - rss0)
        return g * (rec.meta.clip * rec.meta.weight)

    # -- forward strategies (delta, momentum) ------------------------------------------------
    def run_forward(self, per_example: bool, project: bool = False) -> None:
        req, idx = self.req, self.idx
        m_wd = m_carry = m_ex = None
        ex_cols = slot = None
        if per_example:
            tracked = self.chosen
            slot = torch.full_like(self.col, -1)
            slot[tracked] = torch.arange(len(tracked), device=self.eng.device)
            ex_cols = self.col[tracked]
            m_ex = torch.zeros(len(tracked), self.sel.size, dtype=self.eng.dtype, device=self.eng.device)
        k = -1
        for block in self._blocks(self.walk(req.a, req.b)):
            steps = []  # (k, record, its linear step, decay and carried momentum, its projections' vectors)
            for rec in block:
                k += 1
                ls = rec.linear.take(idx)
                th = rec.theta[idx]
                if m_wd is None:
                    m_wd = torch.zeros_like(th)
                    m_carry = rec.state_before.momentum.to(self.eng.device, self.eng.dtype)[idx].clone()
                    if req.carry_response:  # the momentum entering the chunk is applied by the caller
                        self.response_out = {"momentum_in": m_carry, "transfer": torch.ones_like(th),
                                             "response": th.new_zeros(req.n_bins, self.T, self.sel.size)}
                        m_carry = torch.zeros_like(th)
                decay_drive = ls.lam_c * th
                m_wd = ls.a * m_wd + ls.b * decay_drive
                m_carry = ls.a * m_carry
                decay = ls.out_coef() * m_wd + ls.direct_coef() * decay_drive - ls.eta * ls.lam_d * th
                carry = ls.out_coef() * m_carry
                steps.append((k, rec, ls, decay, carry, self._project_vecs(rec, ls, decay, carry) if project else None))
            self._prefetch(block, [pv for *_, pv in steps] if project else None)
            for k, rec, ls, decay, carry, pv in steps:
                self._forward_step(k, rec, ls, decay, carry, pv, per_example, slot, ex_cols, m_ex)
        if req.carry_response:
            self.response_out.update(decay_momentum=m_wd, example_momentum=m_ex)

    def _forward_step(self, k: int, rec: StepRecord, ls: LinearStep, decay: torch.Tensor, carry: torch.Tensor,
                      pv: ProjectVecs | None, per_example: bool, slot, ex_cols, m_ex) -> None:
        """One step's terms of a forward strategy: from its projections (``pv``), or from its φ."""
        req, idx = self.req, self.idx
        bn = int(self.bin[k])
        if pv is not None:
            self._project_step(k, bn, rec, pv)
            return
        phi = self.phi(rec)
        self.check_step(k, rec, phi @ rec.delta[idx])
        if self.along is not None:
            self.along[bn] += self.contract(phi, rec.delta[idx])
        if req.carry_response:
            resp = self.response_out
            resp["transfer"] = ls.a * resp["transfer"]
            resp["response"][bn] += phi * (ls.out_coef() * resp["transfer"])
        self.wd[bn] += self.contract(phi, decay)
        self.mom[bn] += self.contract(phi, carry)
        if not per_example:
            rest = rec.delta[idx] - decay - carry
            gap = self._gap(rec)
            if gap is not None:
                self.gap[bn] += self.contract(phi, gap)
                rest = rest - gap
            self.grad[bn, :, 0] += self.contract(phi, rest)
            return
        ex, _, pos = self.batch_examples(rec)
        m_ex *= ls.a
        x_now = torch.zeros(0)
        if len(ex):
            g = self.pegrads(rec, pos)
            m_ex.index_add_(0, slot[ex], ls.b * g)
            x_now = ls.out_coef() * m_ex
            x_now.index_add_(0, slot[ex], ls.direct_coef() * g)
        else:
            x_now = ls.out_coef() * m_ex
        contrib = self.contract(phi, x_now)  # (T, E_tracked, G)
        self.grad[bn].index_add_(1, ex_cols, contrib)

    def _project_vecs(self, rec: StepRecord, ls: LinearStep, decay: torch.Tensor, carry: torch.Tensor) -> ProjectVecs:
        """A step's vectors for the project strategy: Δθ, its decay, the momentum carried into the window
        (where it is above rounding) and its rebuild's gap (with Request.rebuild, noted once per step).

        The carried momentum decays by β1 a step. Once no element of it is above the float epsilon times
        Δθ's largest, its projection is within the rounding bound of Δθ's own (ε·Σ|φ||Δθ|), and it is left in
        the gradient term. Without it, and without coupled decay (whose momentum starts at the window), the
        vectors no longer depend on the window's start: a query over a later window (the grokking file's
        balance over steps 350:2000) then shares the projections of one from step 0 for most of its steps.
        """
        delta = rec.delta[self.idx]
        carried = bool(carry.abs().max() > torch.finfo(carry.dtype).eps * delta.abs().max())
        gap = self._gap(rec)
        vecs = torch.stack([delta, decay] + ([carry] if carried else []) + ([gap] if gap is not None else []))
        window = self.req.a if carried or bool(ls.lam_c.any()) else None
        return ProjectVecs(vecs, carried, gap is not None, window)

    def _project_step(self, k: int, bn: int, rec: StepRecord, pv: ProjectVecs) -> None:
        """One step of the project strategy: the terms straight from the projections."""
        proj = self.projections(rec, pv).transpose(1, 2)  # (V, T, G)
        self.check_step(k, rec, proj[0].sum(1))
        self.wd[bn] += proj[1]
        rest = proj[0] - proj[1]
        if pv.carry:
            self.mom[bn] += proj[2]
            rest = rest - proj[2]
        if pv.gap:
            self.gap[bn] += proj[-1]
            rest = rest - proj[-1]
        self.grad[bn, :, 0] += rest

    def _gap(self, rec: StepRecord) -> torch.Tensor | None:
        """With Request.rebuild: Δθ_recorded − Δθ_rebuilt of the selection, the step's update error noted."""
        if not self.req.rebuild:
            return None
        rebuilt = reconstruct.rebuilt(self.eng, rec)
        self.update_errors.append(reconstruct.update_error(rec, rebuilt))
        return (rec.delta - rebuilt)[self.idx]

    # -- backward strategy (fold) ------------------------------------------------------------
    def run_fold(self) -> None:
        """Backward over steps, Q_i = R_i + a_{i+1} Q_{i+1}; influence of batch i is g_{i,k}·A_i.

        Steps are processed in segments, last segment first: each is walked forward (its φ
        and θ kept), then folded backward, so memory holds one segment, not the whole range.
        """
        req = self.req
        seg = max(1, self.req.segment_steps or (req.b - req.a))
        starts = list(range(req.a, req.b, seg))
        q = a_next = m0 = None
        for lo in reversed(starts):
            hi = min(lo + seg, req.b)
            records = []
            for block in self._blocks(self.walk(lo, hi)):
                self._prefetch(block)
                for rec in block:
                    if rec.s == req.a:
                        m0 = rec.state_before.momentum.to(self.eng.device, self.eng.dtype)[self.idx]
                    phi = self.phi(rec)
                    self.check_step(rec.s - req.a, rec, phi @ rec.delta[self.idx])
                    if self.along is not None:
                        self.along[0] += self.contract(phi, rec.delta[self.idx])
                    rec.state_before = None
                    records.append((rec, rec.linear.take(self.idx), phi))
            for rec, ls, phi in reversed(records):
                q, a_next = self._fold_step(rec, ls, phi, q, a_next)
        if q is not None:
            self.mom[0] += self.contract(a_next * q, m0)

    def _fold_step(self, rec: StepRecord, ls: LinearStep, phi: torch.Tensor, q, a_next):
        r = ls.out_coef() * phi
        q = r if q is None else r + a_next * q
        a_vec = ls.b * q + ls.direct_coef() * phi  # A_i, (T, P_sel)
        th = rec.theta[self.idx]
        self.wd[0] += self.contract(a_vec, ls.lam_c * th) + self.contract(phi, -ls.eta * ls.lam_d * th)
        ex, cols, pos = self.batch_examples(rec)
        if len(ex):
            scale = rec.meta.clip * rec.meta.weight
            self.grad[0].index_add_(1, cols, self._batch_influence(rec, pos, a_vec) * scale)
        return q, ls.a

    def _batch_influence(self, rec: StepRecord, pos: torch.Tensor, a_vec: torch.Tensor) -> torch.Tensor:
        """(T, n, G): g_{i,k}·A_i per group for the batch's selected examples."""
        rss0 = _rss()
        out = self._batch_influence_of(rec, pos, a_vec)
        self.grown["train"] = max(self.grown["train"], _rss() - rss0)
        return out

    def _batch_influence_of(self, rec: StepRecord, pos: torch.Tensor, a_vec: torch.Tensor) -> torch.Tensor:
        T, G = a_vec.shape[0], self.G
        if T * G <= JVP_MAX_TANGENTS and self.masks is not None:
            onehot = torch.zeros(G, self.sel.size, dtype=a_vec.dtype, device=a_vec.device)
            onehot[self.gidx, torch.arange(self.sel.size, device=a_vec.device)] = 1
            tangents = (a_vec[:, None, :] * onehot[None]).reshape(T * G, -1)
            x, y, draw = self.eng.train_items(rec, pos)
            d = self.eng.fn.per_example_jvp(self.sel, rec.theta[self.idx], rec.theta, x, y, tangents, draw)
            self.stats["jvp"] = True
            return d.reshape(T, G, -1).permute(0, 2, 1)
        return self.contract(a_vec, self.eng.fn.per_example_grads(
            self.sel, rec.theta[self.idx], rec.theta, *self.eng.train_items(rec, pos)))

    # -- result ------------------------------------------------------------------------------
    def result(self) -> Result:
        n_train = self.eng.run.split_size("train")
        every_example = self.req.examples is None or len(set(self.req.examples)) == n_train
        out = Result(self.grad, self.wd, self.mom, self.labels, self.example_ids.cpu(),
                     self.step_actual.sum(0), self.step_explained.sum(0), self.step_actual,
                     self.step_explained, self.stats, **self.response_out, along=self.along, rebuild_gap=self.gap,
                     start=self.start)
        if self.all_params and every_example:
            self.stats.update(out.replication(n_train))
        self.stats.update(tolerance=self.req.tolerance, nodes=self.req.nodes)
        self.stats.update(test_seconds=self.seconds["test"], trajectory_seconds=self.seconds["trajectory"],
                          test_bytes=self.grown["test"], trajectory_bytes=self.grown["trajectory"],
                          train_bytes=self.grown["train"],
                          evaluations=self.qstats.evaluations, refined_steps=self.qstats.refined_steps,
                          kinks=self.qstats.kinks, corrected_lanes=self.qstats.corrected_lanes,
                          joined_items=self.joined_items, prefetched_steps=self.prefetched,
                          block_steps=self.block_steps,
                          unconverged_steps=list(self.qstats.unconverged))
        if self.req.rebuild:
            self.stats.update(update_errors=self.update_errors)
        return out
