"""The Python API the CLI, the REPL and notebooks are thin shells over."""

from __future__ import annotations

import glob
import os
from typing import Any, Iterable, Mapping

import polars as pl

from .execute import explain_text, prepare, run_query
from .run import Run


def open_run(path: str | os.PathLike) -> Run:
    return Run(path)


def _as_run(run_or_path: Run | str | os.PathLike) -> Run:
    return run_or_path if isinstance(run_or_path, Run) else Run(run_or_path)


def query(run_or_path: Run | str | os.PathLike, text: str, scheduler: Any = None, **params: Any) -> pl.DataFrame:
    """Run one query against a run (or a store path) and return its frame.

    ``scheduler``: a Dask scheduler address (``"tcp://host:8786"``), a ``distributed.Client``
    or a cluster object; the plan then runs on its workers (see docs/distributed.md), as
    with ``using cluster "ADDRESS"`` in the query. None: locally.
    """
    return run_query(_as_run(run_or_path), text, params, scheduler=scheduler)


def explain(run_or_path: Run | str | os.PathLike, text: str, scheduler: Any = None, **params: Any) -> str:
    """The physical plan of a query, with each pass's decision, without running it."""
    run = _as_run(run_or_path)
    bound, eng, plan = prepare(run, text, params, scheduler=scheduler)
    return explain_text(run, bound, eng, plan)


def expand_runs(runs: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike]) -> dict[str, str]:
    """Run names to paths: a dict as given; list entries (globs allowed) named after their file."""
    if isinstance(runs, Mapping):
        return {str(k): str(v) for k, v in runs.items()}
    out: dict[str, str] = {}
    for r in runs:
        matches = sorted(glob.glob(str(r))) if any(c in str(r) for c in "*?[") else [str(r)]
        for m in matches:
            out[os.path.basename(os.path.normpath(m)).removesuffix(".zarr")] = m
    return out


def compare(runs: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike], text: str,
            scheduler: Any = None, **params: Any) -> pl.DataFrame:
    """The same query over several runs, as one frame with a leading ``run`` column."""
    frames = []
    for name, path in expand_runs(runs).items():
        df = query(path, text, scheduler=scheduler, **params)
        frames.append(df.select(pl.lit(name).alias("run"), pl.all()))
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame({"run": []})
