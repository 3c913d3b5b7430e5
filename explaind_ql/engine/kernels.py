"""The contraction kernels: one request in, the decomposition's terms out.

Three strategies compute the same sum (math.md, Step 3) in different orders:

``delta``     model × training queries (no example axis, no example filter): φ_s ⊙ Δθ_s,
              with Δθ_s split into weight decay, carried momentum and the gradient rest.
              No per-example gradient is taken.
``fold``      data queries without a step axis: a backward recurrence folds momentum
              into A_i = Σ_{s≥i} (coefficients) φ_s, and each batch's influence is a
              forward-mode JVP of the per-example losses along A_i.
``momentum``  data queries with a step axis: per-example momentum kept only for the
              selected examples and params.

Every strategy reports the ``weight_decay`` and ``momentum`` (carried in from before the
selected steps) terms separately from the ``gradient`` term.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import psutil
import torch

from .. import progress
from ..optim import LinearStep
from ..params import ParamSpace
from ..run import Run
from . import quadrature, targets
from .model_fn import ModelFn
from .targets import TargetSpec
from .trajectory import StepRecord, TensorCache, Trajectory

STRATEGIES = ("delta", "fold", "momentum")
JVP_MAX_TANGENTS = 16
PHI_CACHE_BYTES = 256 << 20
JAC_CHUNK_BYTES = 64 << 20  # Jacobians at quadrature nodes held at once
GROUP_LOOP_MAX = 64


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

    @property
    def data(self) -> bool:
        return self.keep_examples or self.examples is not None

    def choose_strategy(self) -> str:
        if self.strategy:
            return self.strategy
        if not self.data:
            return "delta"
        return "fold" if self.n_bins == 1 else "momentum"


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

    def total(self) -> torch.Tensor:
        """Sum of every term per target: what the frame's ``influence`` column sums to."""
        return self.gradient.sum((0, 2, 3)) + self.weight_decay.sum((0, 2)) + self.momentum.sum((0, 2))


class Engine:
    """Runs requests against one run on one device/dtype, sharing its caches."""

    def __init__(self, run: Run, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
        self.run, self.device, self.dtype = run, torch.device(device), dtype
        self.fn = ModelFn(run.build_model(), run.space, run.constants, run.loss, self.device, dtype)
        self.traj = Trajectory(run, self.device, dtype)
        self._split_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        theta0 = run.stored_state(0)[0].to(self.device, dtype)
        self.n_out = int(self.fn.forward(theta0, self.split(run.splits[0])[0][:1]).reshape(1, -1).shape[1])
        self.max_batch = int(run.step_var("batch_size").max()) if run.n_steps else 1

    def target_labels(self, spec: TargetSpec) -> list[tuple[int | None, int | None]]:
        return targets.labels(spec, self.n_out)

    # -- inputs ------------------------------------------------------------------------------
    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._split_cache:
            x, y = self.run.split(name)
            x = x.to(self.device, self.dtype) if x.is_floating_point() else x.to(self.device)
            self._split_cache[name] = (x, y.to(self.device))
        return self._split_cache[name]

    def target_values(self, spec: TargetSpec, theta: torch.Tensor) -> torch.Tensor:
        x, y = self.split(spec.split)
        idx = torch.tensor(spec.items, device=self.device)
        f = targets.make(spec, y[idx], self.run.loss)
        return f(self.fn.forward(theta, x[idx]))

    # -- entry point -------------------------------------------------------------------------
    def run_request(self, req: Request) -> Result:
        strategy = req.choose_strategy()
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        if strategy == "fold" and req.n_bins != 1:
            raise ValueError("the fold strategy keeps no step axis")
        if strategy == "delta" and req.data:
            raise ValueError("the delta strategy has no example axis")
        ctx = _Context(self, req)
        t0 = time.perf_counter()
        replay0 = self.traj.replayed_steps
        with progress.task(f"{strategy}: steps {req.a}:{req.b}", req.b - req.a) as ctx.bar:
            if strategy == "fold":
                ctx.run_fold()
            else:
                ctx.run_forward(per_example=strategy == "momentum")
        ctx.stats.update(strategy=strategy, seconds=time.perf_counter() - t0,
                         replayed_steps=self.traj.replayed_steps - replay0)
        return ctx.result()


def _rss() -> int:
    return psutil.Process().memory_info().rss


class _Context:
    """State of one request's execution (kept off the Engine so requests never share it)."""

    def __init__(self, eng: Engine, req: Request):
        self.eng, self.req = eng, req
        dev, dt = eng.device, eng.dtype
        space: ParamSpace = eng.run.space
        self.sel = space.subspace(list(req.params))
        self.idx = space.element_index(self.sel).to(dev)
        self.all_params = self.sel.size == space.size
        if req.by_element:
            self.gidx = torch.arange(self.sel.size, device=dev)
            self.G = self.sel.size
        else:
            order = {n: i for i, n in enumerate(req.params)}
            self.gidx = torch.cat([torch.full((p.numel,), req.group_of_param[order[p.name]], dtype=torch.long)
                                   for p in self.sel.params]).to(dev)
            self.G = req.n_groups
        self.masks = ([torch.nonzero(self.gidx == g).flatten() for g in range(self.G)]
                      if self.G <= GROUP_LOOP_MAX else None)
        x, y = eng.split(req.target.split)
        items = torch.tensor(req.target.items, device=dev)
        self.x_items = x[items]
        self.target_fn = targets.make(req.target, y[items], eng.run.loss)
        self.y_items = y[items]
        one = dataclasses.replace(req.target, keep_test=True)
        self.item_target = ((lambda out, yi: targets.make(one, yi, eng.run.loss)(out))
                            if req.target.keep_test and len(req.target.items) > 1 else None)
        self.labels = eng.target_labels(req.target)
        itemsize = torch.empty((), dtype=dt).element_size()
        self.max_points = max(1, JAC_CHUNK_BYTES // (4 * itemsize * len(self.labels) * max(1, self.sel.size)))
        self.T = len(self.labels)
        # training examples: output column of every train index (-1: not selected)
        n_train = eng.run.split_size("train")
        self.col = torch.full((n_train,), -1, dtype=torch.long, device=dev)
        chosen = torch.arange(n_train, device=dev) if req.examples is None else torch.tensor(req.examples, device=dev)
        if req.keep_examples:
            self.col[chosen] = torch.arange(len(chosen), device=dev)
            self.example_ids = chosen
        else:
            self.col[chosen] = 0
            self.example_ids = torch.zeros(0, dtype=torch.long, device=dev)
        self.E = max(1, len(self.example_ids))
        n_steps = req.b - req.a
        self.bin = (torch.tensor(req.step_bin, dtype=torch.long) if req.step_bin is not None
                    else torch.zeros(n_steps, dtype=torch.long))
        B, T, G = req.n_bins, self.T, self.G
        self.grad = torch.zeros(B, T, self.E if req.data else 1, G, dtype=dt, device=dev)
        self.wd = torch.zeros(B, T, G, dtype=dt, device=dev)
        self.mom = torch.zeros(B, T, G, dtype=dt, device=dev)
        self.step_actual = torch.zeros(n_steps, T, dtype=dt, device=dev)
        self.step_explained = torch.zeros(n_steps, T, dtype=dt, device=dev)
        self.qstats = quadrature.QuadStats()
        self.stats: dict = {}
        self.seconds = {"test": 0.0, "trajectory": 0.0}
        self.grown = {"test": 0, "trajectory": 0, "train": 0}  # largest resident growth in one unit of work
        self.bar = progress.Task()
        self.budget = self._quad_budget()

    # -- test side ---------------------------------------------------------------------------
    def _quad_budget(self) -> torch.Tensor | None:
        """Per-step absolute error allowance: tolerance × |ΔF over the enclosing stored states| / steps."""
        req, run = self.req, self.eng.run
        if req.tolerance is None:
            return None
        lo = run.ckpt_at_or_before(req.a)
        hi = min(len(run.ckpt_states) - 1, int(torch.searchsorted(torch.as_tensor(run.ckpt_states), req.b)))
        f = [self._f(run.stored_state(p)[0].to(self.eng.device, self.eng.dtype)) for p in (lo, hi)]
        # one absolute allowance for every target, from the largest change: what "relative to the
        # total change" means for the frame (targets that barely move are not refined to noise)
        scale = torch.maximum((f[1] - f[0]).abs().max(), 1e-9 * (1 + f[0].abs().max())).expand_as(f[0])
        # below a few roundings of F the exact-change check measures noise, not quadrature error
        noise = 16 * torch.finfo(self.eng.dtype).eps * (1 + f[0].abs() + f[1].abs())
        return torch.maximum(req.tolerance * scale / max(1, req.b - req.a), noise)

    def _f(self, theta: torch.Tensor) -> torch.Tensor:
        return self.target_fn(self.eng.fn.forward(theta, self.x_items))

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

    def phi(self, rec: StepRecord) -> torch.Tensor:
        """(T, P_sel) path-integrated target gradient, cached per open run and step."""
        key = ("phi", rec.s, self.req.target, self.req.params, self.req.nodes, self.req.tolerance, self.req.rule,
               str(self.eng.device), self.eng.dtype)
        cache = self.eng.run.cache.setdefault("phi", TensorCache(PHI_CACHE_BYTES))
        if key in cache:
            self.stats["phi_cache_hits"] = self.stats.get("phi_cache_hits", 0) + 1
            return cache[key]
        t0, rss0 = time.perf_counter(), _rss()
        phi = self._phi(rec)
        self.seconds["test"] += time.perf_counter() - t0
        self.grown["test"] = max(self.grown["test"], _rss() - rss0)
        cache[key] = phi
        return phi

    def _phi(self, rec: StepRecord) -> torch.Tensor:
        theta, delta = rec.theta, rec.delta
        idx, fn = self.idx, self.eng.fn

        def jac_at(ts: torch.Tensor) -> torch.Tensor:
            parts = []
            for chunk in ts.split(self.max_points):  # bounded memory: max_points × T × P_sel at once
                pts = theta[None] + chunk[:, None] * delta[None]
                parts.append(fn.jacobian(self.sel, self.target_fn, pts, lambda p: p[:, idx], self.x_items, self.T,
                                         self.item_target, self.y_items))
            return torch.cat(parts)

        f_at = (lambda t: self._f(theta + t * delta)) if self.all_params else None
        return quadrature.integrate(jac_at, delta[idx], self.req.nodes, self.budget, rec.s, self.qstats,
                                    self.eng.dtype, self.eng.device, f_at, self.req.rule)

    def check_step(self, k: int, rec: StepRecord, phi: torch.Tensor) -> None:
        self.step_actual[k] = self._f(rec.theta_next) - self._f(rec.theta)
        self.step_explained[k] = phi @ rec.delta[self.idx]

    # -- contraction helpers -----------------------------------------------------------------
    def contract(self, phi: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """Σ over each group's elements of φ ⊙ vec: (T,P)×(P) → (T,G); (T,P)×(E,P) → (T,E,G)."""
        G = self.G
        if vec.dim() == 1:
            return torch.zeros(phi.shape[0], G, dtype=phi.dtype, device=phi.device).index_add_(1, self.gidx, phi * vec)
        if self.masks is not None:
            return torch.stack([phi[:, m] @ vec[:, m].T for m in self.masks], dim=-1)
        out = torch.zeros(phi.shape[0], vec.shape[0], G, dtype=phi.dtype, device=phi.device)
        return out.index_add_(2, self.gidx, phi[:, None, :] * vec[None])

    def batch_examples(self, rec: StepRecord) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected examples of the step's batch (train indices) and their output columns."""
        b = rec.meta.batch.to(self.eng.device)
        cols = self.col[b]
        keep = cols >= 0
        return b[keep], cols[keep]

    def pegrads(self, rec: StepRecord, ex: torch.Tensor) -> torch.Tensor:
        """c_s w_s g_{s,k}: (n, P_sel) clipped, weighted per-example gradients of the selected params."""
        rss0 = _rss()
        x, y = self.eng.split("train")
        g = self.eng.fn.per_example_grads(self.sel, rec.theta[self.idx], rec.theta, x[ex], y[ex])
        self.grown["train"] = max(self.grown["train"], _rss() - rss0)
        return g * (rec.meta.clip * rec.meta.weight)

    # -- forward strategies (delta, momentum) ------------------------------------------------
    def run_forward(self, per_example: bool) -> None:
        req, idx = self.req, self.idx
        m_wd = m_carry = m_ex = None
        ex_cols = None
        if per_example:
            tracked = (torch.arange(self.eng.run.split_size("train"), device=self.eng.device)
                       if req.examples is None else torch.tensor(req.examples, device=self.eng.device))
            slot = torch.full_like(self.col, -1)
            slot[tracked] = torch.arange(len(tracked), device=self.eng.device)
            ex_cols = self.col[tracked]
            m_ex = torch.zeros(len(tracked), self.sel.size, dtype=self.eng.dtype, device=self.eng.device)
        for k, rec in enumerate(self.walk(req.a, req.b)):
            ls = rec.linear.take(idx)
            th = rec.theta[idx]
            if m_wd is None:
                m_wd = torch.zeros_like(th)
                m_carry = rec.state_before.momentum.to(self.eng.device, self.eng.dtype)[idx].clone()
            decay_drive = ls.lam_c * th
            m_wd = ls.a * m_wd + ls.b * decay_drive
            m_carry = ls.a * m_carry
            decay = ls.out_coef() * m_wd + ls.direct_coef() * decay_drive - ls.eta * ls.lam_d * th
            carry = ls.out_coef() * m_carry
            phi = self.phi(rec)
            self.check_step(k, rec, phi)
            bn = int(self.bin[k])
            self.wd[bn] += self.contract(phi, decay)
            self.mom[bn] += self.contract(phi, carry)
            if not per_example:
                self.grad[bn, :, 0] += self.contract(phi, rec.delta[idx] - decay - carry)
                continue
            ex, _ = self.batch_examples(rec)
            m_ex *= ls.a
            x_now = torch.zeros(0)
            if len(ex):
                g = self.pegrads(rec, ex)
                m_ex.index_add_(0, slot[ex], ls.b * g)
                x_now = ls.out_coef() * m_ex
                x_now.index_add_(0, slot[ex], ls.direct_coef() * g)
            else:
                x_now = ls.out_coef() * m_ex
            contrib = self.contract(phi, x_now)  # (T, E_tracked, G)
            self.grad[bn].index_add_(1, ex_cols, contrib)

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
            for rec in self.walk(lo, hi):
                if rec.s == req.a:
                    m0 = rec.state_before.momentum.to(self.eng.device, self.eng.dtype)[self.idx]
                phi = self.phi(rec)
                self.check_step(rec.s - req.a, rec, phi)
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
        ex, cols = self.batch_examples(rec)
        if len(ex):
            scale = rec.meta.clip * rec.meta.weight
            self.grad[0].index_add_(1, cols, self._batch_influence(rec, ex, a_vec) * scale)
        return q, ls.a

    def _batch_influence(self, rec: StepRecord, ex: torch.Tensor, a_vec: torch.Tensor) -> torch.Tensor:
        """(T, n, G): g_{i,k}·A_i per group for the batch's selected examples."""
        rss0 = _rss()
        out = self._batch_influence_of(rec, ex, a_vec)
        self.grown["train"] = max(self.grown["train"], _rss() - rss0)
        return out

    def _batch_influence_of(self, rec: StepRecord, ex: torch.Tensor, a_vec: torch.Tensor) -> torch.Tensor:
        T, G = a_vec.shape[0], self.G
        if T * G <= JVP_MAX_TANGENTS and self.masks is not None:
            onehot = torch.zeros(G, self.sel.size, dtype=a_vec.dtype, device=a_vec.device)
            onehot[self.gidx, torch.arange(self.sel.size, device=a_vec.device)] = 1
            tangents = (a_vec[:, None, :] * onehot[None]).reshape(T * G, -1)
            x, y = self.eng.split("train")
            d = self.eng.fn.per_example_jvp(self.sel, rec.theta[self.idx], rec.theta, x[ex], y[ex], tangents)
            self.stats["jvp"] = True
            return d.reshape(T, G, -1).permute(0, 2, 1)
        return self.contract(a_vec, self.eng.fn.per_example_grads(
            self.sel, rec.theta[self.idx], rec.theta, *(t[ex] for t in self.eng.split("train"))))

    # -- result ------------------------------------------------------------------------------
    def result(self) -> Result:
        self.stats.update(test_seconds=self.seconds["test"], trajectory_seconds=self.seconds["trajectory"],
                          test_bytes=self.grown["test"], trajectory_bytes=self.grown["trajectory"],
                          train_bytes=self.grown["train"],
                          evaluations=self.qstats.evaluations, refined_steps=self.qstats.refined_steps,
                          unconverged_steps=list(self.qstats.unconverged))
        return Result(self.grad, self.wd, self.mom, self.labels, self.example_ids.cpu(),
                      self.step_actual.sum(0), self.step_explained.sum(0), self.step_actual,
                      self.step_explained, self.stats)
