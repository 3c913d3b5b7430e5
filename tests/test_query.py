"""Language → semantic check → planner → engine → polars, on a recorded tiny run."""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest
import torch

import explaind_ql as eq
from explaind_ql.engine.budget import Leaf, Split
from explaind_ql.errors import ExplaindError, QueryError, SemanticError
from explaind_ql.engine.facts import MODEL_FACTS, facts_for, measured
from explaind_ql.execute import run_query
from explaind_ql.lang import parse
from explaind_ql.engine.kernels import Engine
from explaind_ql.plan import (RULES, WITHOUT_PUSHDOWN, Context, Node, aggregate_tests, choose_strategy,
                              chunk_under_budget, distribute, logical, optimise, pushdown_restrictions, render, tree)
from explaind_ql.measures import bind

STEPS = 12


@pytest.fixture(scope="module")
def run(toy_run):
    return eq.open(toy_run("transformer", "adamw", steps=STEPS))


@pytest.fixture(scope="module")
def sgd_run(toy_run):
    return eq.open(toy_run("mlp", "sgd", steps=STEPS))


def total(df: pl.DataFrame) -> float:
    return float(df["influence"].sum())


def actual_change(run, on: str) -> float:
    chk = run.query(f"check on {on}")
    return float(chk["actual"].sum())


def test_verbatim_example(run):
    """The brief's example parses verbatim; against this 12-step run the check names the valid range."""
    q = "influence of layer emb on test[0..9] over steps 1000:5000 by example"
    with pytest.raises(SemanticError, match="out of range: test has 5 items"):
        run.query(q)
    with pytest.raises(SemanticError, match="steps 1000:5000 are out of range: the run has 12 steps"):
        run.query(q.replace("test[0..9]", "test[0..4]"))
    df = run.query(q.replace("test[0..9]", "test[0..4]").replace("1000:5000", "2:10"))
    assert df.columns == ["example", "label", "term", "influence"]
    assert set(df["term"]) == {"gradient", "weight_decay", "momentum"}
    assert df.filter(pl.col("term") == "gradient")["example"].to_list() == list(range(run.split_size("train")))


def test_frame_sum_is_the_exact_change(run):
    on = "test[0..3]"
    change = actual_change(run, on)
    for by in ("", "by layer", "by param", "by step", "by layer, step every 5", "by example", "by test",
               "by element"):
        df = run.query(f"influence on {on} {by} using tolerance 1e-11")  # exactness, not the default 1e-6
        assert total(df) == pytest.approx(change, rel=1e-9, abs=1e-12), by
        assert "influence" in df.columns and "term" in df.columns
        for key in by.replace("by", "").replace("every 5", "").replace(",", " ").split():
            assert key in df.columns


def test_additivity_in_frames(run):
    """Invariant 4: by layer totals are sums of by param rows; binned steps sum per-step rows."""
    by_param = run.query("influence on test[*] by param")
    by_layer = run.query("influence on test[*] by layer")
    regrouped = (by_param.with_columns(layer=pl.col("param").str.replace(r"\.[^.]+$", ""))
                 .group_by("layer", "term").agg(pl.col("influence").sum()))
    joined = by_layer.join(regrouped, on=["layer", "term"])
    assert joined.height == by_layer.height
    assert (joined["influence"] - joined["influence_right"]).abs().max() < 1e-12
    per_step = run.query("influence on test[*] by step")
    binned = run.query("influence on test[*] by step every 4")
    rebinned = per_step.with_columns(step=(pl.col("step") // 4) * 4).group_by("step", "term").agg(pl.col("influence").sum())
    j = binned.join(rebinned, on=["step", "term"])
    assert j.height == binned.height and (j["influence"] - j["influence_right"]).abs().max() < 1e-12


@pytest.mark.parametrize("query", [
    "influence of layer attn on test[0..2] using quadrature 3",
    "influence of layer emb, param unembed.weight on test[1, 3] by layer using quadrature 3",
    "influence of all except layer attn on test[*] over steps 3:9 by layer using quadrature 3",
    "influence of layer linear1 on test[0..2] from train[0..4] by example using quadrature 3",
    "influence of layer emb on test[*] over steps 2:8 by example, step using quadrature 3",
    "influence on test[0..1] from train where label = 2 by step using quadrature 3",
])
def test_restriction_commutes(run, query):
    """Invariant 5: the optimised plan equals the full computation filtered afterwards."""
    fast = run_query(run, query)
    full = run_query(run, query, rules=WITHOUT_PUSHDOWN)
    keys = [c for c in fast.columns if c not in ("influence", "label")]
    fast_t = fast.filter(pl.col("term") != "momentum")
    j = full.join(fast_t, on=keys, how="full", nulls_equal=True, suffix="_fast")
    grad = j.filter(pl.col("term").fill_null(pl.col("term_fast")) == "weight_decay")
    assert (grad["influence"] - grad["influence_fast"]).abs().max() < 1e-10
    # totals agree exactly; the pushed-down plan reports momentum carried into the window apart
    assert total(fast) == pytest.approx(total(full), rel=1e-9, abs=1e-12)
    if "over steps" not in query:
        assert (j["influence"] - j["influence_fast"]).abs().max() < 1e-10


def _pass_fixture(run, text, rules):
    """The logical plan of ``text`` run through ``rules``: the input of the pass under test."""
    ctx = Context(run, facts_for(run, "cpu", torch.float64))
    p = logical(bind(parse(text), run), run)
    for rule in rules:
        p = rule(p, ctx)
    return p, ctx


def test_pushdown_restrictions_pass(run):
    p0, ctx = _pass_fixture(run, "influence of layer emb on test[0..3] over steps 2:10 by example", ())
    assert p0.request.params == tuple(run.space.names) and (p0.request.a, p0.request.b) == (0, STEPS)
    assert p0.post_filter and p0.request.target.keep_test
    p1 = pushdown_restrictions(p0, ctx)
    assert p1.request.params == ("emb.weight",) and (p1.request.a, p1.request.b) == (2, 10)
    assert not p1.post_filter and p1.request.keep_examples
    assert p1.decisions == (("restriction pushdown", "params 8→1 tensors, steps 12→8, examples all"),)


def test_aggregate_tests_pass(run):
    p1, ctx = _pass_fixture(run, "influence on test[0..3] by example", (pushdown_restrictions,))
    assert p1.request.target.keep_test
    assert not aggregate_tests(p1, ctx).request.target.keep_test
    kept, ctx = _pass_fixture(run, "influence on test[*] by test", (pushdown_restrictions,))
    assert aggregate_tests(kept, ctx).request.target.keep_test


@pytest.mark.parametrize("text,strategy,costs", [
    ("influence of layer emb on test[0..3] over steps 2:10 by example", "fold", {"fold", "momentum"}),
    # one summed target: a reverse pass per node beats a Jacobian held and contracted
    ("influence on test[*] by layer", "project", {"delta", "project"}),
    ("influence on test[*] from train[0..3] by step", "momentum", {"momentum"}),
])
def test_choose_strategy_pass(run, text, strategy, costs):
    p2, ctx = _pass_fixture(run, text, (pushdown_restrictions, aggregate_tests))
    assert p2.request.strategy is None
    p3 = choose_strategy(p2, ctx)
    assert p3.request.strategy == strategy and set(p3.costs) == costs
    assert p3.decisions[-1][0] == "strategy choice" and p3.decisions[-1][1].startswith(strategy)


def test_chunk_under_budget_pass(run):
    text = "influence of layer emb on test[0..3] over steps 2:10 by example"
    p3, ctx = _pass_fixture(run, text, (pushdown_restrictions, aggregate_tests, choose_strategy))
    p4 = chunk_under_budget(p3, dataclasses.replace(ctx, budget=1 << 32))
    assert isinstance(p4.chunks, Leaf) and p4.chunks.request == p3.request
    p5 = chunk_under_budget(p3, dataclasses.replace(ctx, budget=int(p4.chunks.bytes * 0.7)))
    assert isinstance(p5.chunks, Split) and p5.chunks.axis == "segment"
    assert [d[0] for d in p4.decisions] == ["restriction pushdown", "test aggregation", "strategy choice", "chunking"]


def test_distribute_pass_changes_nothing_without_a_scheduler(run):
    """Distribution is the last of RULES; a local query's plan leaves it as the chunking pass made it."""
    assert RULES[-1] is distribute
    p4, ctx = _pass_fixture(run, "influence on test[*] by step", RULES[:-1])
    assert ctx.scheduler is None and distribute(p4, ctx) is p4


def _shape(node: Node) -> tuple:
    return (node.name, node.measured, tuple(_shape(c) for c in node.children))


def test_explain_renders_the_plan_node_tree_after_each_pass(run):
    """explain draws the plan's typed nodes; each pass shows in the node it changes."""
    text = "influence of layer emb on test[0..3] over steps 2:10 by example"
    expected = (("Influence", "frame", (("Contract", "contract", (("TestSide", "test", ()), ("TrainSide", "train", ()),
                                                                   ("Trajectory", "trajectory", ()))),)),)
    details = []
    for k in range(len(RULES) + 1):
        p, ctx = _pass_fixture(run, text, RULES[:k])
        nodes = tree(p, run, ctx.facts)
        assert tuple(map(_shape, nodes)) == expected
        contract = nodes[0].children[0]
        details.append((contract.detail.split()[0], *(c.detail for c in contract.children)))
        lines = render(p, run, ctx.facts).split("\n")
        assert lines[:5] == [f"{prefix}{n.name}  {n.detail}" for prefix, n in zip(
            ("", "└─ ", "   ├─ ", "   ├─ ", "   └─ "), (nodes[0], contract, *contract.children))]
        assert len(p.decisions) == min(k, len(RULES) - 1)  # one line per pass, none from a local distribution
        assert lines[5] == "passes:" and len(lines) == 6 + len(p.decisions) + bool(p.post_filter)
    # the logical plan: every step, kept test items, no strategy yet
    assert details[0][0] == "strategy=undecided" and details[0][3].startswith("steps 0:12 of 12; params 8 of 8")
    assert details[1][3].startswith("steps 2:10 of 12; params 1 of 8")  # restriction pushdown
    assert "aggregated" in details[2][1] and "kept" in details[1][1]  # test aggregation
    assert "4 nodes per step" in details[3][1] and "2 nodes per step" in details[2][1]  # quadrature rule (smooth)
    assert details[4][0] == "strategy=fold" and "folded backwards" in details[4][2]  # strategy choice
    assert details[5] == details[6] == details[4]  # chunking and (locally) distribution change no node
    analyzed = render(p, run, ctx.facts, {"test": "1.0 s", "summary": "done"}).split("\n")
    assert analyzed[2].endswith("  [1.0 s]") and analyzed[-1] == "analyzed: done"


def test_the_engine_runs_only_a_planned_strategy(run):
    """The strategy is decided once, by the planner: a request without one is refused, not re-decided."""
    p, ctx = _pass_fixture(run, "influence on test[*] by layer", (pushdown_restrictions, aggregate_tests))
    assert p.request.strategy is None
    with pytest.raises(ValueError, match="the strategy it was planned with"):
        Engine(run).run_request(p.request)


@pytest.mark.parametrize("model,act", [("transformer", "relu"), ("mlp", "gelu"), ("cnn", "relu")])
def test_the_recorded_model_facts_are_what_the_rebuilt_model_measures(toy_run, model, act):
    """Planning reads outputs and ReLU sites from the store; they match the engine's own measurement."""
    run = eq.open(toy_run(model, "adamw", act=act, steps=2))
    recorded = run.attrs[MODEL_FACTS]
    fn, x = Engine(run).fn, run.split("train")[0][:1]
    x = x.double() if x.is_floating_point() else x
    assert recorded == measured(lambda: fn._call(run.stored_state(0)[0].double(), None, None, x))
    assert bool(recorded["kink_segments"]) == (act == "relu")


def test_planning_builds_no_model(toy_run, monkeypatch):
    """Plans come from the run's metadata alone: the model is first built when something runs (explain's
    pilot, for its estimate, or the query)."""
    from explaind_ql.execute import explain_text, prepare
    run = eq.open(toy_run("transformer", "adamw", act="relu", steps=STEPS))
    monkeypatch.setattr(type(run), "build_model", lambda self: pytest.fail("the model was built to plan"))
    bound, facts, plan = prepare(run, "influence on test[*] by layer, step")
    assert plan.chunks is not None and not run.cache.engines
    monkeypatch.undo()
    text = explain_text(run, bound, facts, plan)
    assert "corrected for every ReLU kink" in text and "estimate: " in text and run.cache.engines


def test_a_store_without_model_facts_is_planned_from_its_rebuilt_model(toy_run):
    """Stores recorded before model_facts existed: the model is rebuilt once to measure them, to the same plan."""
    path = toy_run("transformer", "adamw", act="relu", steps=STEPS)
    new, old = eq.open(path), eq.open(path)
    del old.attrs[MODEL_FACTS]
    # a budget of its own: the default is a share of the memory free at the time, which the first explain's pilot moves
    text = "influence of layer emb on test[0..3] over steps 2:10 by example using budget 2GiB"
    plans = [run.explain(text).rsplit("\nestimate: ", 1)[0] for run in (old, new)]  # the estimates are timed
    assert plans[0] == plans[1] and old.cache.model_facts == new.attrs[MODEL_FACTS]


def test_quadrature_rule_starts_smooth_models_from_more_nodes(run, toy_run):
    """A smooth model's adaptive rule starts from 4 nodes; a fixed rule and a ReLU model's keep theirs."""
    smooth, _ = _pass_fixture(run, "influence on test[*] by layer", RULES[:3])
    assert smooth.request.nodes == 4 and "smooth" in smooth.decisions[-1][1]
    fixed, _ = _pass_fixture(run, "influence on test[*] by layer using quadrature 2", RULES[:3])
    assert fixed.request.nodes == 2 and fixed.request.tolerance is None
    relu = eq.open(toy_run("mlp", "adamw", steps=4, act="relu"))
    kinked, _ = _pass_fixture(relu, "influence on test[*] by layer", RULES[:3])
    assert kinked.request.nodes == 2 and "ReLU kinks" in kinked.decisions[-1][1]
    assert [d[0] for d in kinked.decisions][-1] == "quadrature rule"


def test_rules_override(run):
    """optimise runs the passes it is given, in order; the default is RULES."""
    b = bind(parse("influence of layer emb on test[0..3] by layer"), run)
    facts = facts_for(run, "cpu", torch.float64)
    assert [d[0] for d in optimise(b, run, facts).decisions] == [  # distribution: only with a scheduler
        "restriction pushdown", "test aggregation", "quadrature rule", "strategy choice", "chunking"]
    only = optimise(b, run, facts, rules=(pushdown_restrictions,))
    assert [d[0] for d in only.decisions] == ["restriction pushdown"] and only.chunks is None
    assert [d[0] for d in optimise(b, run, facts, rules=WITHOUT_PUSHDOWN).decisions][0] == "test aggregation"


def test_explain_and_analyze(run):
    text = run.explain("influence of layer emb on test[0..3] over steps 2:10 by example")
    for needle in ("strategy=fold", "restriction pushdown", "test aggregation", "chunking", "FLOP", "KiB"):
        assert needle in text
    analyzed = run.query("explain analyze influence on test[*] by layer")["plan"].to_list()
    assert any("gradient evaluations" in line for line in analyzed)
    assert any(line.startswith("analyzed:") and " s total" in line for line in analyzed)


def test_every_measure(run, sgd_run):
    k = run.query("kernel on test[0..1] from train[0..3]")
    assert {"test", "example", "label", "term", "influence"} <= set(k.columns)
    assert k.filter(pl.col("term") == "gradient").height == 2 * 4
    chk = sgd_run.query("check on test[*]")
    assert chk.columns[:4] == ["test", "actual", "explained", "residual"]
    assert chk["relative_residual"].max() < 1e-6 and chk["max_update_error"].max() < 1e-9  # default tolerance
    tight = sgd_run.query("check on test[*] using tolerance 1e-11")
    assert tight["relative_residual"].max() < 1e-9
    sim = run.query("similarity of layer emb, layer linear1 on test[0..2]")
    assert set(sim["layer"]) == {"emb", "linear1"} and sim.height == 2 * 9
    diag = sim.filter(pl.col("test") == pl.col("test_2"))
    assert (diag["cosine"] - 1).abs().max() < 1e-12
    ev = run.query("evaluate on test[*] at steps 0:12 every 4")
    assert ev["step"].to_list() == [0, 4, 8]
    assert ev.columns == ["step", "accuracy", "loss", "kl_to_final"]
    swapped = run.query(f"evaluate on test[*] at steps 0:12 every 4 with all from step {STEPS}")
    assert swapped["kl_to_final"].abs().max() < 1e-12  # every layer from the final step = the final model
    out = run.query("influence on output(test[0]) by output")
    assert out.filter(pl.col("term") == "gradient").height == 7
    top = run.query("influence on test[*] by example top 3 abs")
    ranked = top.filter(pl.col("example").is_not_null())
    assert ranked.height == 3 and ranked["influence"].abs().is_sorted(descending=True)
    assert top.head(3).equals(ranked)  # the examples first; the non-data terms follow, not ranked among them
    every = run.query("influence on test[*] by example")
    assert set(top.filter(pl.col("example").is_null())["term"]) == set(every.filter(pl.col("example").is_null())["term"])
    assert ranked["example"].to_list() == (every.filter(pl.col("example").is_not_null())
                                           .sort(pl.col("influence").abs(), descending=True)["example"].head(3).to_list())
    # the final state is in reach: at step N, and an inclusive range that ends at it
    assert run.query(f"evaluate on test[*] at steps 0..{STEPS} every 4")["step"].to_list() == [0, 4, 8, 12]
    final = run.query(f"evaluate on test[*] at step {STEPS}")
    assert final["step"].to_list() == [STEPS] and abs(final["kl_to_final"][0]) < 1e-12


def test_params_and_options(run):
    a = run.query("influence of layer $layer on test[$i] by step", layer="emb", i=1)
    b = run.query("influence of layer emb on test[1] by step")
    assert a.equals(b)
    f32 = run.query("influence on test[0] using dtype float32, tolerance 1e-4")
    f64 = run.query("influence on test[0]")
    assert total(f32) == pytest.approx(total(f64), rel=1e-4)
    with pytest.raises(QueryError, match="missing parameter"):
        run.query("influence on test[$i]")


@pytest.mark.parametrize("query,needle,col", [
    ("influence of layer embb on test[0]", "unknown layer 'embb'; did you mean 'emb'?", 14),
    ("influence on tset[0]", "unknown split 'tset'; did you mean 'test'?", 14),
    ("influence on test[0..20000]", "out of range: test has 5 items (0..4)", 19),
    ("influence on test[0] over steps 5:400", "steps 5:400 are out of range: the run has 12 steps", 22),
    ("influence on test[0] from test[0..2]", "training examples come from the train split", 27),
    ("check on test[0] by layer", "'check' has a fixed shape", 18),
    ("influence on test[0] by output", "'by output' needs a target with several outputs", 22),
    ("influence on test[0] using quadrature 3, tolerance 1e-3", "fixes the nodes", 22),
    ("influence on test where label = 99", "label 99 is out of range: the model has 7 classes (0..6)", 14),
    ("influence on test[1..4] where label = 6", "no item of test has label 6", 14),
    # every index the language takes is range-checked: outputs, classes, steps (silent zeros before)
    ("influence on output[9](test[0])", "output[9] is out of range: the model has 7 outputs (0..6)", 14),
    ("check on output[7](test[0])", "output[7] is out of range", 10),
    ("influence at step 12", "step 12 is out of range: the run has 12 steps (0..11); step 12 is the final state, "
                             "which only evaluate reads", 11),
    ("evaluate on test[*] at step 13", "step 13 is out of range: the run's states are 0..12", 21),
    ("INFLUENCE ON TEST[0]", "unknown split 'TEST'; did you mean 'test'?", 14),
    # one rule for repeated items, in `on` and `from` alike (never counted twice, never merged)
    ("kernel on test[0,0] from train[0]", "test item 0 is selected twice; list each item once", 15),
    ("kernel on test[0] from train[0, 0]", "train item 0 is selected twice; list each item once", 29),
    ("influence on test[0..3,2]", "test item 2 is selected twice", 18),
    ("influence on test[0..2, 1:4]", "test item 1 is selected twice", 25),
    ("influence on test[0] from train[3:, 0..5]", "train item 3 is selected twice", 37),
    # empty selections
    ("influence on test[:0]", "test[:0] selects no items", 19),
    ("influence on test[0] from train[:0]", "train[:0] selects no items", 33),
    ("check on test[:0]", "test[:0] selects no items", 15),
    ("evaluate on test[1, :0]", "test[:0] selects no items", 21),
    ("influence on test[0] over steps :0", "steps :0 select no steps", 22),
    ("evaluate at steps :0 every 2", "steps :0 select no steps", 10),
    # clauses the measure would ignore
    ("check of layer emb on test[0]", "'check' does not use 'of'", 10),
    ("check on test[0] from train[0..3]", "'check' does not use 'from'", 23),
    ("check on test[0] top 3", "'check' does not use 'top'", 18),
    ("evaluate of layer emb on test[0]", "'evaluate' does not use 'of'", 13),
    ("evaluate on margin(test[0])", "'evaluate' does not use a target function ('margin')", 13),
    ("evaluate on output[3](test[0]) at step 2", "'evaluate' does not use a target function ('output')", 13),
    ("evaluate on test[0] from train[0]", "'evaluate' does not use 'from'", 26),
    ("evaluate on test[0] top 2", "'evaluate' does not use 'top'", 21),
    ("similarity on test[0..2] from train[0]", "'similarity' does not use 'from'", 31),
    ("similarity on test[0..2] top 3", "'similarity' does not use 'top'", 26),
    ("check top 3 from train[0]", "'check' does not use 'top'", 7),  # the first one written
])
def test_semantic_errors_point_at_the_clause(run, query, needle, col):
    with pytest.raises(SemanticError) as exc:
        run.query(query)
    err = exc.value
    assert needle in str(err)
    assert err.exit_code == 3
    assert err.line_col[1] == col, err.render()
    caret_line = str(err).split("\n")[-1]
    assert caret_line.index("^") - 2 == col - 1


def test_what_the_docs_show_stays_valid(run):
    """The refusals above leave every documented form alone: `label(...)` is the bare target."""
    assert run.query("evaluate on label(test[*]) at steps 0:12 every 4").equals(
        run.query("evaluate on test[*] at steps 0:12 every 4"))
    assert run.query("similarity of layer emb on test[0..2] over steps 2:6").height == 9
    assert run.query("check on loss(test[0..1]) over steps 2:4 using quadrature 2").height == 2
    assert run.query("kernel on test[0, 1..2] from train[0:2, 5]").filter(pl.col("term") == "gradient").height == 9


def test_budget_refusal_is_a_clean_error(run):
    with pytest.raises(ExplaindError, match="the answer alone would hold .* the largest axis is"):
        run.query("influence on test[*] by example, test using budget 1KB")
    with pytest.raises(ExplaindError, match="even in the smallest chunks; narrow the selection"):
        run.query("influence on test[0] using budget 4KB")


def test_projections_outlast_larger_features_in_the_run_cache(run):
    """A step's projections are kept apart from φ: kernels whose φ fill the φ cache (here capped at 2 of their
    steps) do not push out the projections an earlier query left, which a later one then reuses at every step."""
    q = "influence on test[0..2] by layer, step using quadrature 2"
    run.cache.clear()
    run.query(q)
    run.cache.phi.max_bytes = 1
    run.query("kernel on test[0..2] from train[0..3] using quadrature 2")
    assert len(run.cache.phi) == 1  # φ evicted down to the newest
    run.query(q)
    assert run.cache.last_stats.get("phi_cache_hits", 0) == STEPS
    run.cache.clear()


def test_repeated_queries_reuse_cached_features(run):
    q = "influence of layer unembed on test[0..2] by step using quadrature 4"
    run.query(q)
    run.query("explain analyze " + q)
    assert run.cache.last_stats.get("phi_cache_hits", 0) == STEPS


def test_compare_two_runs(toy_run):
    a = toy_run("mlp", "adamw", steps=6)
    b = toy_run("mlp", "sgd", steps=6)
    df = eq.compare({"adamw": a, "sgd": b}, "influence on test[*] by layer")
    assert df.columns[0] == "run" and set(df["run"]) == {"adamw", "sgd"}
    one = eq.query(a, "influence on test[*] by layer")
    assert df.filter(pl.col("run") == "adamw").drop("run").equals(one)


def test_compare_takes_open_runs_and_keeps_their_caches(toy_run):
    a, b = eq.open(toy_run("mlp", "adamw", steps=6)), eq.open(toy_run("mlp", "sgd", steps=6))
    q = "influence on test[*] by layer"
    df = eq.compare([a, b], q)
    names = [p.name.removesuffix(".zarr") for p in (a.path, b.path)]
    assert df["run"].unique(maintain_order=True).to_list() == names
    assert df.filter(pl.col("run") == names[1]).drop("run").equals(eq.query(b.path, q))
    again = eq.compare({"x": a, "y": b}, q)
    assert a.cache.last_stats.get("phi_cache_hits", 0) > 0  # the second comparison reused the first's work
    assert again.drop("run").equals(df.drop("run"))


def test_query_on_checkpointed_run_matches_dense(toy_run):
    dense = eq.open(toy_run("mlp", "adam", steps=STEPS))
    ckpt = eq.open(toy_run("mlp", "adam", steps=STEPS, checkpoint_every=5))
    q = "influence on test[*] over steps 3:11 by example, step"
    d, c = dense.query(q), ckpt.query(q)
    assert d.drop("influence").equals(c.drop("influence"))
    assert (d["influence"] - c["influence"]).abs().max() < 1e-10


def test_plan_dataclasses_are_frozen(run):
    b = bind(parse("influence on test[0]"), run)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.a = 3  # type: ignore[misc]


def test_the_run_cache_is_typed_and_scoped_to_the_run(run):
    from explaind_ql.cache import RunCache
    run.query("influence on test[0] by step using quadrature 2")
    cache = run.cache
    assert isinstance(cache, RunCache) and cache.engines and len(cache.proj) > 0 and cache.proj.bytes > 0
    stats = cache.take_stats()
    assert "residual" in stats and cache.take_stats() == {}  # a shell prints a residual line once
    cache.clear()
    assert not cache.engines and len(cache.proj) == 0 and cache.proj.bytes == 0 and not cache.drift
    assert eq.open(run.path).cache is not cache
