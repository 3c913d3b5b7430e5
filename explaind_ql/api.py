"""The Python API the CLI, the REPL and notebooks are thin shells over."""

from __future__ import annotations

import glob
import os
from typing import Any, Iterable, Mapping

import polars as pl

from .errors import StoreError
from .execute import explain_text, prepare, run_query
from .run import Run
from .store import run_names


Trusted = Iterable[str] | str | None


class QueryableRun(Run):
    """What ``explaind_ql.open`` returns: a :class:`Run` that answers queries. The methods live here, above the
    query path, so that the run (beneath it) never imports the language."""

    def query(self, text: str, scheduler: Any = None, **params: Any) -> pl.DataFrame:
        """Run a query on this run (a polars DataFrame): ``run.query("influence on test[0..9] by layer")``.

        ``scheduler``: run it on a Dask cluster (an address or a ``distributed.Client``).
        """
        return query(self, text, scheduler=scheduler, **params)

    def explain(self, text: str, scheduler: Any = None, **params: Any) -> str:
        """The plan a query would run, with the planner's decisions and estimates."""
        return explain(self, text, scheduler=scheduler, **params)


def _as_run(run_or_path: Run | str | os.PathLike, trust: Trusted = None) -> Run:
    return run_or_path if isinstance(run_or_path, Run) else QueryableRun(run_or_path, trust=trust)


def query(run_or_path: Run | str | os.PathLike, text: str, scheduler: Any = None, trust: Trusted = None,
          **params: Any) -> pl.DataFrame:
    """Run one query against a run (or a store path) and return its frame.

    ``scheduler``: a Dask scheduler address (``"tcp://host:8786"``), a ``distributed.Client``
    or a cluster object; the plan then runs on its workers (see docs/distributed.md), as
    with ``using cluster "ADDRESS"`` in the query. None: locally.
    ``trust``: modules a path's store may import its model factory from (docs/store.md).
    """
    run = _as_run(run_or_path, trust)
    return _finite(run_query(run, text, params, scheduler=scheduler), run)


def _finite(frame: pl.DataFrame, run: Run) -> pl.DataFrame:
    """The frame, unless a value in it is NaN or infinite: the recorder refuses non-finite values,
    so one in an answer means the store's data is damaged, and it is an error, never a frame."""
    bad = [name for name, dtype in frame.schema.items() if dtype.is_float() and not frame[name].is_finite().all()]
    if bad:
        raise StoreError(f"the answer's '{bad[0]}' column holds NaN or infinite values, which a recording "
                         f"never holds: {run.path} is damaged; run `explaind-ql verify {run.path}`")
    return frame


def explain(run_or_path: Run | str | os.PathLike, text: str, scheduler: Any = None, trust: Trusted = None,
            **params: Any) -> str:
    """The physical plan of a query, with each pass's decision, and its estimated cost from a pilot of a few of
    its steps (the query itself is not run)."""
    run = _as_run(run_or_path, trust)
    bound, facts, plan = prepare(run, text, params, scheduler=scheduler)
    return explain_text(run, bound, facts, plan)


def expand_runs(runs: Iterable[Run | str | os.PathLike] | Mapping[str, Run | str | os.PathLike]
                ) -> dict[str, Run | str]:
    """Run names to open runs or paths: a dict as given; list entries (paths may be globs) named by the
    shortest tail of their path that tells them apart (:func:`explaind_ql.store.run_names`)."""
    if isinstance(runs, Mapping):
        return {str(k): v if isinstance(v, Run) else str(v) for k, v in runs.items()}
    found: list[Run | str] = []
    for r in runs:
        if isinstance(r, Run):
            found.append(r)
            continue
        found += sorted(glob.glob(str(r))) if any(c in str(r) for c in "*?[") else [str(r)]
    names = run_names([r.path if isinstance(r, Run) else r for r in found])
    return dict(zip(names, found))


def compare(runs: Iterable[Run | str | os.PathLike] | Mapping[str, Run | str | os.PathLike], text: str,
            scheduler: Any = None, trust: Trusted = None, **params: Any) -> pl.DataFrame:
    """The same query over several runs, as one frame with a leading ``run`` column.

    Runs may be given open (``explaind_ql.open``), so that repeated comparisons reuse each
    run's engine and cached results, or as store paths, opened for this call.
    """
    frames = []
    for name, run in expand_runs(runs).items():
        df = query(run, text, scheduler=scheduler, trust=trust, **params)
        frames.append(df.select(pl.lit(name).alias("run"), pl.all()))
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame({"run": []})
