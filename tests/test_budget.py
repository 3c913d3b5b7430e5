"""The memory budget covers the whole query: working set, merged result and frame."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import explaind_ql as eq
from explaind_ql.cache import PHI_CACHE_BYTES
from explaind_ql.errors import BudgetError

BIG = "influence on test[*] by element, example, step, test"


def test_an_answer_over_the_budget_is_refused_before_it_allocates(run_path):
    run = eq.open(run_path)
    with pytest.raises(BudgetError, match=r"the answer alone would hold [\d,]+ values .* over the 20\.0 MiB "
                                          r"budget; the largest axis is element .* by param or by layer") as exc:
        run.query(f"{BIG} using budget 20MiB")
    assert "\n" not in str(exc.value)
    with pytest.raises(BudgetError, match="largest axis is example"):
        run.query("influence on test[*] by example, test using budget 4KiB")
    text = run.explain(f"{BIG} over steps 0:2 using budget 200MiB")
    assert "answer ≈" in text and "of a 200.0 MiB budget" in text


PEAK = textwrap.dedent("""
    import sys, psutil, torch
    torch.set_num_threads(1)
    import explaind_ql as eq
    from explaind_ql.errors import BudgetError
    run = eq.open(sys.argv[1])
    run.query("influence on test[0] by layer at step 0")  # imports and caches: the baseline
    base = psutil.Process().memory_info().rss
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the baseline
        f.write("5")
    try:
        df = run.query(sys.argv[2])
    except BudgetError:
        print("refused 0")
        sys.exit()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(df.height, peak - base)
""")


@pytest.mark.parametrize("mib", [16, 48])
def test_peak_memory_stays_under_the_budget_plus_the_baseline(run_path, mib):
    """A ~30 MiB answer: refused under 16 MiB (it used to run and grow past it), run under 48 MiB."""
    q = f"{BIG} over steps 0:3 using budget {mib}MiB"
    out = subprocess.run([sys.executable, "-c", PEAK, run_path, q], capture_output=True, text=True, check=True)
    rows, growth = out.stdout.split()
    if mib == 16:
        assert rows == "refused"
    else:
        assert int(rows) > 50_000 and 0 < int(growth) <= mib << 20, (rows, int(growth) / 2 ** 20)


def test_per_example_work_is_estimated_for_the_selected_examples_only(run_path):
    """A step's per-example gradients or JVPs cover its selected examples, not its whole batch: restricting
    the examples shrinks the estimate, and for a few examples it does not grow with the batch (a kernel on
    a few pairs was estimated as if on the whole batch, and split into chunks that each redid the test side)."""
    from explaind_ql.engine.budget import estimate
    from explaind_ql.engine.kernels import Request
    from explaind_ql.engine.targets import TargetSpec
    run = eq.open(run_path)
    names, P, n_train = tuple(run.space.names), run.space.size, run.split_size("train")
    for strategy, bins in (("momentum", (0, 0, 1, 1)), ("fold", None)):
        def est(examples, batch=n_train):
            req = Request(0, 4, TargetSpec("label", "test", (0, 1)), names, tuple(range(len(names))), len(names),
                          step_bin=bins, n_bins=2 if bins else 1, examples=examples, keep_examples=True,
                          strategy=strategy)
            return estimate(req, P, P, 2, n_train, batch, 8)
        assert est((0, 1)) < est(tuple(range(n_train)))
        assert est((0, 1), batch=100 * n_train) == est((0, 1))


def test_the_budget_holds_the_caches_a_query_grows(run_path):
    """What a query leaves resident counts against its budget: the test-side cache keeps at most a quarter of it.
    Without a budget the same query caches 244 KiB of φ, nearly the whole 256 KiB budget."""
    run = eq.open(run_path)
    free = run.query("influence on test[*] by test, example")
    assert run.cache.phi.bytes > 200 << 10
    run.cache.clear()
    held = run.query("influence on test[*] by test, example using budget 256KiB")
    assert 0 < run.cache.phi.bytes <= 64 << 10
    assert run.cache.phi.max_bytes == PHI_CACHE_BYTES  # the cap is the query's; later queries cache as before
    key = ["test", "example", "term"]
    assert held.sort(key)["influence"].to_list() == pytest.approx(free.sort(key)["influence"].to_list(), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("total_gib, kept_gib", [(64, 8), (24, 3), (2, 0.5)])
def test_an_open_run_keeps_replayed_states_by_the_machine_s_memory(toy_run, monkeypatch, total_gib, kept_gib):
    """Replayed states are kept up to an eighth of the machine's memory (at least 512 MiB), so that a script's
    whole-run queries on a checkpointed run replay each skipped state once; a second query replays none."""
    import collections

    import psutil

    from explaind_ql import cache
    memory = collections.namedtuple("memory", "total available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(int(total_gib * 2 ** 30), int(total_gib * 2 ** 29)))
    assert cache.RunCache().replay.max_bytes == int(kept_gib * 2 ** 30)
    run = eq.open(toy_run("mlp", "adamw", steps=12, checkpoint_every=5))
    first = run.query("influence on test[*] by layer")
    replayed = run.cache.replay.bytes
    assert list(run.ckpt_states) == [0, 5, 10, 12]
    assert replayed > 0 and len(run.cache.replay) == 13 - 4  # every state of the 12 steps but the stored ones
    eng = next(iter(run.cache.engines.values()))
    before = eng.traj.replayed_steps
    again = run.query("influence on test[*] by layer, step")
    assert eng.traj.replayed_steps == before  # all found kept
    assert again["influence"].sum() == pytest.approx(first["influence"].sum(), rel=1e-9)
