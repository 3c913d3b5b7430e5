"""The memory budget covers the whole query: working set, merged result and frame."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import explaind_ql as eq
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
