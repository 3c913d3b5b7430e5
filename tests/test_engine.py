"""The invariants of math.md, on a GELU MLP, a tiny transformer and a tiny CNN, for every optimizer.

Every toy run has an LR schedule, two param groups with their own hyperparameters,
gradient clipping and an uneven last batch (see explaind_ql.toy).
"""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest
import torch

import explaind_ql as eq
from explaind_ql.engine.budget import Split, execute, plan
from explaind_ql.engine.kernels import Engine, Request
from explaind_ql.engine.reconstruct import update_errors
from explaind_ql.engine.targets import TargetSpec
from explaind_ql.errors import BudgetError
from explaind_ql.toy import MODELS, OPTIMIZERS

STEPS = 12


def test_default_tolerance_is_met_and_spent(toy_run):
    """The default (1e-6) is met on a ReLU model, with fewer evaluations than asking for 1e-10."""
    run = eq.open(toy_run("transformer", "adamw", act="relu", steps=STEPS))
    eng = Engine(run)
    names = tuple(run.space.names)
    target = TargetSpec("outputs", "test", tuple(range(run.split_size("test"))), keep_output=True)
    results = {}
    for tol in (1e-6, 1e-10):
        run.cache.clear()
        results[tol] = eng.run_request(Request(0, STEPS, target, names, tuple(range(len(names))), len(names),
                                               tolerance=tol, strategy="project"))
    for tol, r in results.items():
        assert rel(r.total(), r.actual) <= tol
        assert not r.stats["unconverged_steps"]
    assert results[1e-6].stats["evaluations"] < results[1e-10].stats["evaluations"]


def request(run, *, by="param", items=None, keep_test=True, kind="label", **kw) -> Request:
    names = tuple(run.space.names)
    if by == "param":
        groups, n = tuple(range(len(names))), len(names)
    else:  # one group for everything
        groups, n = tuple(0 for _ in names), 1
    items = tuple(range(run.split_size("test"))) if items is None else items
    target = TargetSpec(kind, "test", items, keep_test=keep_test, keep_output=kind == "outputs")
    kw.setdefault("tolerance", 1e-10)  # exactness to 1e-10 is asked for, not the default 1e-6
    data = kw.get("keep_examples") or kw.get("examples") is not None  # the engine runs the strategy it is given
    kw.setdefault("strategy", ("fold" if kw.get("n_bins", 1) == 1 else "momentum") if data else "delta")
    return Request(kw.pop("a", 0), kw.pop("b", run.n_steps), target,
                   names, groups, n, **kw)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest reference entry (0 when both are all zero)."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_replication_and_step_closure_float64(toy_run, model, optimizer):
    """Invariants 1 and 2 for all four strategies: F(θ_0) + Σ terms = F(θ_N); per-step closure."""
    run = eq.open(toy_run(model, optimizer, steps=STEPS))
    eng = Engine(run)
    per_step = dict(step_bin=tuple(range(STEPS)), n_bins=STEPS)
    results = {
        "delta": eng.run_request(request(run, **per_step)),
        "project": eng.run_request(request(run, strategy="project", kind="outputs", **per_step)),
        "fold": eng.run_request(request(run, keep_examples=True)),
        "momentum": eng.run_request(request(run, keep_examples=True, **per_step)),
    }
    for name, r in results.items():
        assert rel(r.total(), r.actual) <= 1e-10, name                 # invariant 1
        assert rel(r.explained, r.actual) <= 1e-10, name
        assert r.stats["strategy"] == name
    for name in ("delta", "project", "momentum"):                        # invariant 2, per step
        r = results[name]
        per = r.gradient.sum((2, 3)) + r.weight_decay.sum(2) + r.momentum.sum(2)
        assert rel(per, r.step_explained) <= 1e-10, name
    # the strategies agree on every param's gradient and decay terms
    d, f, m = results["delta"], results["fold"], results["momentum"]
    assert rel(f.gradient.sum((0, 2)), d.gradient.sum((0, 2))) <= 1e-9
    assert rel(m.gradient.sum((0, 2)), d.gradient.sum((0, 2))) <= 1e-9
    assert rel(f.weight_decay.sum(0), d.weight_decay.sum(0)) <= 1e-9
    # project (forward-mode projections, no φ) equals delta term by term, per step and param
    p_ = results["project"]
    d_out = eng.run_request(request(run, kind="outputs", **per_step))
    for term in ("gradient", "weight_decay", "momentum"):
        assert rel(getattr(p_, term), getattr(d_out, term)) <= 1e-9, term


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_update_reconstruction(toy_run, model, optimizer):
    """Invariant 3: per-example gradients + recorded state rebuild every recorded Δθ_s."""
    run = eq.open(toy_run(model, optimizer, steps=STEPS))
    errs = update_errors(Engine(run), 0, run.n_steps)
    assert len(errs) == STEPS
    assert float(errs.max()) <= 1e-10


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_float32_replication(toy_run, optimizer):
    run = eq.open(toy_run("mlp", optimizer, dtype=torch.float32, steps=STEPS))
    for dtype in (torch.float32, torch.float64):
        eng = Engine(run, dtype=dtype)
        for r in (eng.run_request(request(run)), eng.run_request(request(run, keep_examples=True))):
            assert rel(r.total(), r.actual) <= 1e-4
    assert float(update_errors(Engine(run, dtype=torch.float32), 0, STEPS).max()) <= 1e-4


def test_weight_decay_and_carried_momentum_terms(toy_run):
    """A mid-trajectory window reports the momentum carried in as its own term."""
    run = eq.open(toy_run("mlp", "sgd", steps=STEPS))
    eng = Engine(run)
    full = eng.run_request(request(run, step_bin=tuple(range(STEPS)), n_bins=STEPS))
    win = eng.run_request(request(run, a=4, b=9))
    assert float(win.momentum.abs().sum()) > 0
    assert float(full.weight_decay.abs().sum()) > 0
    # invariant 5 for steps: the window's total equals the full query's steps 4..8
    assert rel(win.total(), (full.gradient.sum((2, 3)) + full.weight_decay.sum(2) + full.momentum.sum(2))[4:9].sum(0)) <= 1e-10
    # with decoupled decay, the momentum carried in holds only gradients: window gradient +
    # carried momentum equals the full query's gradient term of those steps
    run_w = eq.open(toy_run("mlp", "adamw", steps=STEPS))
    eng_w = Engine(run_w)
    full_w = eng_w.run_request(request(run_w, step_bin=tuple(range(STEPS)), n_bins=STEPS))
    win_w = eng_w.run_request(request(run_w, a=4, b=9))
    assert rel(win_w.gradient.sum((0, 2)) + win_w.momentum.sum(0), full_w.gradient[4:9].sum((0, 2))) <= 1e-10
    assert rel(win_w.weight_decay.sum(0), full_w.weight_decay[4:9].sum(0)) <= 1e-10
    # the data strategies agree with the window, carried momentum included
    proj = eng.run_request(request(run, a=4, b=9, strategy="project"))
    for term in ("gradient", "weight_decay", "momentum"):
        assert rel(getattr(proj, term), getattr(win, term)) <= 1e-9, term
    fold = eng.run_request(request(run, a=4, b=9, keep_examples=True))
    assert rel(fold.momentum.sum(0), win.momentum.sum(0)) <= 1e-9
    assert rel(fold.total(), win.actual) <= 1e-10


def test_additivity_and_restriction_commute(toy_run):
    """Invariants 4 and 5: grouping is a sum; restricting params, steps and examples equals filtering."""
    run = eq.open(toy_run("transformer", "adamw", steps=STEPS))
    eng = Engine(run)
    fixed = dict(tolerance=None, nodes=3)  # identical quadrature in both queries
    by_param = eng.run_request(request(run, **fixed))
    one = eng.run_request(request(run, by="all", **fixed))
    assert rel(one.gradient.sum(-1), by_param.gradient.sum(-1)) <= 1e-12
    names = run.space.names
    some = tuple(n for n in names if n.startswith("attn") or n.startswith("emb"))
    sub = dataclasses.replace(request(run, **fixed), params=some,
                              group_of_param=tuple(names.index(n) for n in some))
    restricted = eng.run_request(sub)
    cols = [names.index(n) for n in some]
    assert rel(restricted.gradient[..., cols], by_param.gradient[..., cols]) <= 1e-12
    assert rel(restricted.weight_decay[..., cols], by_param.weight_decay[..., cols]) <= 1e-12
    # steps binned by 4 equal the sum of per-step rows
    per_step = eng.run_request(request(run, step_bin=tuple(range(STEPS)), n_bins=STEPS, **fixed))
    binned = eng.run_request(request(run, step_bin=tuple(s // 4 for s in range(STEPS)), n_bins=3, **fixed))
    assert rel(binned.gradient, per_step.gradient.reshape(3, 4, *per_step.gradient.shape[1:]).sum(1)) <= 1e-12
    # examples: `from` a subset equals keeping every example and filtering
    all_ex = eng.run_request(request(run, keep_examples=True, **fixed))
    chosen = (1, 4, 7)
    sub_ex = eng.run_request(request(run, keep_examples=True, examples=chosen, **fixed))
    assert rel(sub_ex.gradient, all_ex.gradient[:, :, list(chosen)]) <= 1e-12
    summed = eng.run_request(request(run, examples=chosen, **fixed))
    assert rel(summed.gradient[:, :, 0], all_ex.gradient[:, :, list(chosen)].sum(2)) <= 1e-12


def test_test_aggregation_equals_sum(toy_run):
    """Linearity: summing targets before differentiating equals summing the per-item results."""
    run = eq.open(toy_run("cnn", "adam", steps=STEPS))
    eng = Engine(run)
    kept = eng.run_request(request(run, tolerance=None))
    agg = eng.run_request(request(run, keep_test=False, tolerance=None))
    assert agg.gradient.shape[1] == 1
    assert rel(agg.gradient[:, 0], kept.gradient.sum(1)) <= 1e-10
    assert rel(agg.actual, kept.actual.sum(0, keepdim=True)) <= 1e-12


@pytest.mark.parametrize("kind", ["outputs", "loss", "logprob", "prob", "margin"])
def test_every_target_replicates(toy_run, kind):
    run = eq.open(toy_run("mlp", "adamw", steps=STEPS))
    r = Engine(run).run_request(request(run, kind=kind, items=(0, 1)))
    assert len(r.target_labels) == (2 * 3 if kind == "outputs" else 2)
    assert rel(r.total(), r.actual) <= 1e-9


@pytest.mark.parametrize("strategy", ["delta", "project"])
def test_relu_needs_and_gets_adaptive_quadrature(toy_run, strategy):
    """A ReLU model: a fixed midpoint rule leaves an error; split at the kinks, the tolerance is met."""
    run = eq.open(toy_run("mlp", "sgd", act="relu", steps=STEPS))
    eng = Engine(run)
    mid = eng.run_request(request(run, tolerance=None, nodes=1, strategy=strategy))
    adaptive = eng.run_request(request(run, tolerance=1e-9, nodes=2, strategy=strategy))
    assert rel(adaptive.total(), adaptive.actual) <= 1e-9
    assert not adaptive.stats["unconverged_steps"]
    assert adaptive.stats["kinks"] > 0                       # ReLU crossings were located and split at
    assert rel(adaptive.total(), adaptive.actual) < rel(mid.total(), mid.actual)
    # a restricted selection (no exact-change check): per-param terms still match the full query
    names = run.space.names
    full = eng.run_request(request(run, tolerance=1e-9, strategy=strategy))
    sub = dataclasses.replace(request(run, tolerance=1e-9, strategy=strategy), params=tuple(names[:2]),
                              group_of_param=(0, 1))
    part = eng.run_request(sub)
    assert rel(part.gradient[..., :2], full.gradient[..., :2]) <= 1e-7


def test_checkpointed_replay_matches_dense(toy_run):
    dense = eq.open(toy_run("mlp", "adamw", steps=STEPS))
    ckpt = eq.open(toy_run("mlp", "adamw", steps=STEPS, checkpoint_every=5))
    assert not ckpt.dense and list(ckpt.ckpt_states) == [0, 5, 10, 12]
    rd = Engine(dense).run_request(request(dense, keep_examples=True))
    e = Engine(ckpt)
    rc = e.run_request(request(ckpt, keep_examples=True))
    assert rel(rc.gradient, rd.gradient) <= 1e-10
    assert e.traj.replayed_steps > 0
    assert max(d.rel_error for d in ckpt.cache.drift.values()) <= 1e-10


def test_budget_chunks_exactly_and_refuses(toy_run):
    run = eq.open(toy_run("mlp", "adamw", steps=STEPS))
    eng = Engine(run)
    req = request(run, keep_examples=True, tolerance=None)
    whole = execute(eng, plan(eng.facts, req, 1 << 40))
    tree = plan(eng.facts, req, 40_000)
    assert isinstance(tree, Split)
    chunked = execute(eng, tree)
    assert rel(chunked.gradient, whole.gradient) <= 1e-12
    assert rel(chunked.total(), whole.total()) <= 1e-12
    with pytest.raises(BudgetError, match="narrow the selection"):
        plan(eng.facts, req, 100)


def test_deterministic(toy_run):
    run = eq.open(toy_run("mlp", "adam", steps=STEPS))
    eng = Engine(run)
    a = eng.run_request(request(run, keep_examples=True))
    b = Engine(run).run_request(request(run, keep_examples=True))
    assert torch.equal(a.gradient, b.gradient)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_cuda_matches_cpu(toy_run, optimizer):
    run = eq.open(toy_run("transformer", optimizer, steps=STEPS))
    cpu = Engine(run).run_request(request(run, keep_examples=True))
    gpu = Engine(run, device="cuda").run_request(request(run, keep_examples=True))
    assert gpu.gradient.device.type == "cuda"
    assert rel(gpu.gradient.cpu(), cpu.gradient) <= 1e-9
    assert rel(gpu.total().cpu(), gpu.actual.cpu()) <= 1e-10


@pytest.mark.parametrize("strategy", ["project", "fold"])
def test_relu_aggregated_items_agree_with_items_kept_and_report_their_true_residual(toy_run, strategy):
    """On a ReLU model the aggregated target (items integrated apart, kink-corrected, refined against
    the sum's budget) agrees with the per-item result summed, to the tolerance; and the residual the
    result reports is the true one: the exact change that `check` measures, against the sum of terms."""
    path = toy_run("transformer", "adamw", act="relu", steps=STEPS)
    run = eq.open(path)
    items = tuple(range(run.split_size("test")))
    tol = 1e-8
    base = request(run, by="all", items=items, tolerance=tol, strategy=strategy,
                   **({"examples": tuple(range(run.split_size("train")))} if strategy == "fold" else {}))
    eng = Engine(run)
    agg = eng.run_request(dataclasses.replace(base, target=dataclasses.replace(base.target, keep_test=False)))
    run.cache.clear()
    kept = eng.run_request(base)
    assert agg.stats["kinks"] > 0 and agg.stats["corrected_lanes"] > 0  # the correction did the work
    change = float(kept.actual.sum().abs())
    assert abs(float(agg.total().sum() - kept.total().sum())) <= 2 * tol * change
    assert rel(agg.weight_decay.sum(0), kept.weight_decay.sum((0, 1))) <= 1e-6
    check = eq.open(path).query(f"check on test[0..{len(items) - 1}]")
    actual = float(check["actual"].sum())
    assert abs(actual - float(agg.actual.sum())) <= 1e-12 * max(1.0, abs(actual))
    assert agg.stats["residual"] == pytest.approx(abs(actual - float(agg.total().sum())), rel=1e-6, abs=1e-15)
    assert agg.stats["residual"] <= tol * agg.stats["change"]


def test_a_fixed_rule_reports_its_error_as_not_adaptive(toy_run):
    """`using quadrature 2` on a ReLU model: the residual line says the rule is fixed and gives its error."""
    from explaind_ql.results.frames import residual_line
    run = eq.open(toy_run("transformer", "adamw", act="relu", steps=STEPS))
    frame = run.query("influence on test[*] by layer using quadrature 2")
    st = run.cache.last_stats
    actual = float(run.query("check on test[*]")["actual"].sum())
    assert st["residual"] == pytest.approx(abs(actual - frame["influence"].sum()), rel=1e-6)
    assert st["residual"] > 1e-6 * st["change"]  # two nodes do not resolve the kinks: the error is visible
    line = residual_line(st)
    assert "fixed 2-node rule, not adaptive" in line and f"{st['residual']:.2e}" in line


@pytest.mark.parametrize("strategy", ["project", "fold"])
def test_relu_items_without_kinks_join_one_lane_and_agree_with_their_own_lanes(toy_run, monkeypatch, strategy):
    """Items none of whose live ReLU inputs cross zero in a step are integrated together, by the plain
    rule on their summed target, starting at the kinked rule's nodes; the terms agree with every item on
    its own lane, to the tolerance, and the residual is still met."""
    from explaind_ql.engine import kernels, quadrature
    run = eq.open(toy_run("transformer", "adamw", act="relu", steps=STEPS))
    tol = 1e-8
    req = request(run, by="param", keep_test=False, tolerance=tol, strategy=strategy,
                  **({"examples": tuple(range(run.split_size("train")))} if strategy == "fold" else {}))
    plain_nodes = []  # the nodes each kink-free lane's rule starts at
    integrate = quadrature.integrate

    def logged(fn, n, *args, **kwargs):
        if fn.jumped is None:
            plain_nodes.append(n)
        return integrate(fn, n, *args, **kwargs)
    monkeypatch.setattr(quadrature, "integrate", logged)
    joined = Engine(run).run_request(req)
    n_items = len(req.target.items)
    assert 0 < joined.stats["joined_items"] < n_items * STEPS  # some item-steps joined, some kinked ones did not
    assert plain_nodes and set(plain_nodes) == {quadrature.KINKED_NODES} != {req.nodes}
    run.cache.clear()
    monkeypatch.setattr(kernels._Context, "_joinable", lambda self: False)
    apart = Engine(run).run_request(req)
    assert apart.stats["joined_items"] == 0
    change = float(joined.actual.abs().max())
    for r in (joined, apart):
        assert r.stats["residual"] <= tol * r.stats["change"]
    assert float((joined.total() - apart.total()).abs().max()) <= 2 * tol * change
    assert rel(joined.gradient.sum((0, 2)), apart.gradient.sum((0, 2))) <= 1e-6  # every param's share


@pytest.mark.parametrize("query", [
    "influence on test[*] by layer, step",  # project: Δθ, decay and carry rows
    "influence on test[*] by example",  # fold: φ from the rows' gradients
    "influence on test[*] by example, step",  # momentum: φ per step, forward
    "influence of layer net.0 on test[*] by step",  # a restriction: its rows carry the other params' part
    "kernel on test[0..1] from train[0..5]",  # items kept apart: φ per lane
    "check on test[0..1]",  # each update rebuilt: one more vector, the gap
    "influence on test[*] by layer using quadrature 3",  # a fixed rule
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_first_rounds_batched_across_steps_agree_with_each_step_alone(toy_run, monkeypatch, query, dtype):
    """On a smooth model every step's first-round rows (its n nodes, its ends) are evaluated in calls across
    several steps; each step then integrates, and refines, as it would alone. The frames agree to rounding,
    for float64 and float32 recordings alike (the engine computes in float64)."""
    from explaind_ql.engine import kernels
    path = toy_run("mlp", "adamw", dtype, steps=STEPS)
    monkeypatch.setattr(kernels, "HEAVY_ROWS", 0)  # the toy's rows are light: batch its projections' rows anyway
    steps: list[int] = []
    rows = kernels._Context._prefetch_rows

    def counted(self, part, *args):
        steps.extend(rec.s for rec, _ in part)
        return rows(self, part, *args)
    monkeypatch.setattr(kernels._Context, "_prefetch_rows", counted)
    batched = eq.open(path).query(query)
    assert len(set(steps)) >= STEPS // 2  # most steps' first rounds were batched with others'
    monkeypatch.setattr(kernels._Context, "_prefetch", lambda self, block, vecs=None: None)
    alone = eq.open(path).query(query)
    assert batched.columns == alone.columns and batched.height == alone.height
    floats = [c for c in batched.columns if batched[c].dtype.is_float()]
    scale = max(float(abs(alone[c].to_numpy()).max()) for c in floats)  # residual columns are rounding-sized
    for col in batched.columns:
        if col in floats:
            a, b = batched[col].to_numpy(), alone[col].to_numpy()
            assert float(abs(a - b).max()) <= 1e-10 * scale, col
        else:
            assert batched[col].to_list() == alone[col].to_list(), col


@pytest.mark.parametrize("query", ["kernel on test[*] from train[0..5]", "similarity on test[*]",
                                   "influence of layer net.0 on test[*] by test, example"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kept_lanes_share_calls_and_agree_with_a_call_per_lane(toy_run, monkeypatch, query, dtype):
    """Items kept apart on a ReLU model: each lane's φ is the sum of its own rows' gradients. Lanes share a
    call, their rows padded with rows of weight 0 to the most any of them has; the frames agree to rounding
    with a backward pass per lane, and calls of several lanes with unequal rows did happen."""
    from explaind_ql.engine import kernels
    from explaind_ql.engine.model_fn import Path
    path = toy_run("mlp", "adamw", dtype, act="relu", steps=STEPS)
    monkeypatch.setattr(kernels, "ROWS_APART", 0)  # the toy's lanes have few rows: take their φ by lanes anyway
    monkeypatch.setattr(kernels, "PADDED_SHARE", 0.0)  # and let any lanes share a call, padded
    shared: list[tuple[int, bool]] = []  # (lanes in the call, whether it held padding)
    gradient = Path.gradient

    def counted(self, sel, target, ts, weights, *args):
        if ts.dim() == 2:
            shared.append((ts.shape[0], bool((weights == 0).any())))
        return gradient(self, sel, target, ts, weights, *args)
    monkeypatch.setattr(Path, "gradient", counted)
    batched = eq.open(path).query(query)
    assert any(n >= 2 for n, _ in shared) and any(pad for _, pad in shared)

    def per_lane(self, path, lanes, rows, rest, row_bytes):
        out = []
        for lane in range(lanes.count):
            k = torch.nonzero(rows.lanes == lane).flatten()
            out.append(path.gradient(self.sel, lanes.target, rows.ts[k], rows.weights[k], lanes.xs(rows.lanes[k]),
                                     lanes.y[rows.lanes[k]], tuple(j[k] for j in rows.jumps) if rows.jumps else None,
                                     rest))
        return torch.cat(out)
    monkeypatch.setattr(kernels._Context, "_lane_gradients", per_lane)
    alone = eq.open(path).query(query)
    assert batched.columns == alone.columns and batched.height == alone.height
    floats = [c for c in batched.columns if batched[c].dtype.is_float()]
    scale = max(float(abs(alone[c].to_numpy()).max()) for c in floats)
    for col in floats:
        assert float(abs(batched[col].to_numpy() - alone[col].to_numpy()).max()) <= 1e-10 * scale, col


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_a_later_window_shares_projections_once_its_carried_momentum_is_below_rounding(toy_run, act):
    """The momentum carried into a window decays by β1 a step. Once none of it is above ε·max|Δθ|, its projection
    is within rounding of Δθ's, the step's vectors no longer depend on the window, and a query over a later window
    takes those steps' projections from one that started at step 0; its terms agree with the same query computed
    cold, the momentum term too (the steps it is carried on are the same)."""
    run = eq.open(toy_run("mlp", "adamw", steps=40, betas=(0.1, 0.98), act=act))
    query = "influence on test[*] over steps 10:40 by layer"
    cold = run.query(query)
    assert run.cache.last_stats.get("phi_cache_hits", 0) == 0
    run.cache.clear()
    run.query("influence on test[*] by layer, step every 10")
    warm = run.query(query)
    hits = run.cache.last_stats.get("phi_cache_hits", 0)
    assert 5 <= hits < 30  # the last steps of the window are shared, its first ones carry momentum
    change = abs(float(cold["influence"].sum()))
    key = ["layer", "term"]
    c, w = cold.sort(key), warm.sort(key)
    assert c[key].equals(w[key])
    momentum = c.filter(pl.col("term") == "momentum")["influence"].abs().sum()
    assert momentum > 1e-6 * change  # the carried momentum is a term of its own on the window's first steps
    assert (c["influence"] - w["influence"]).abs().max() <= 2e-6 * change
