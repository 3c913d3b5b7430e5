"""Semantic check: a parsed query against one run, resolved into concrete selections.

Everything that depends on the run is decided here — which params a component names,
which items a split selection picks, which steps a window covers, which options apply —
so the planner only ever sees valid, explicit selections. Every error points at the
clause with a caret and suggests the fix (did-you-mean names, valid ranges).

Selections pick each item at most once and at least one item; a clause the measure has
no use for (`check ... from train[0]`) is refused, not ignored (`check_clauses`, reading the
measure's :class:`Clauses`). What only one measure needs is checked by that measure's
``complete`` (:mod:`explaind_ql.measures`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .engine.facts import facts_for
from .errors import SemanticError
from .lang.ast import AllItems, Components, IndexList, IndexRange, Query, SplitSel, selection_text
from .run import Run

DEFAULT_TOLERANCE = 1e-6
DEFAULT_NODES = 2


@dataclass(frozen=True)
class Bound:
    """A query resolved against a run: what to compute, with every choice explicit."""

    query: Query
    measure: str
    params: tuple[str, ...]                 # selected param tensors, in store order
    target_kind: str
    target_split: str
    test_items: tuple[int, ...]
    output: int | None
    examples: tuple[int, ...] | None        # None: every training example
    a: int
    b: int
    dims: tuple[str, ...]
    step_every: int
    top: int | None
    top_abs: bool
    nodes: int
    tolerance: float | None
    device: str
    dtype: torch.dtype
    budget: int | None
    measure_args: Any = None                # what only this measure needs (its module's own type)
    cluster: str | None = None              # `using cluster "ADDRESS"`: a Dask scheduler
    device_pinned: bool = False             # the query names its device (else workers use their GPU)
    threads: int | None = None              # `using threads N` (None: explaind_ql.threads decides)


def query_error(q: Query, msg: str, pos: int, hint: str | None = None) -> SemanticError:
    """An error in ``q``'s text at ``pos``, shown with a caret and the hint."""
    return SemanticError(msg, q.text, pos, hint)


def _suggest(word: str, choices) -> str | None:
    """The closest of ``choices``, ignoring case (``TEST`` → ``test``)."""
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.5)
    return f"did you mean '{by_lower[close[0]]}'?" if close else None


def resolve_components(q: Query, comps: Components | None, run: Run) -> tuple[str, ...]:
    space = run.space
    if comps is None:
        return tuple(space.names)

    def names(ref) -> list[str]:
        found = space.match(ref.kind, ref.pattern)
        if not found:
            pool = space.layers() if ref.kind == "layer" else space.names
            raise query_error(q, f"unknown {ref.kind} '{ref.pattern}'", ref.pos,
                       _suggest(ref.pattern, pool) or f"{ref.kind}s are: {', '.join(pool[:12])}")
        return found

    chosen = set(space.names) if not comps.include else {n for r in comps.include for n in names(r)}
    for ref in comps.exclude:
        chosen -= set(names(ref))
    if not chosen:
        raise query_error(q, "the component selection is empty after 'except'", comps.pos)
    return tuple(n for n in space.names if n in chosen)


def resolve_items(q: Query, sel: SplitSel, run: Run) -> tuple[int, ...]:
    """The items `sel` picks, in the order written: each at most once, at least one.

    A repeated item (`test[0, 0]`, overlapping ranges `test[0..3, 2]`) is refused for every
    split alike rather than counted twice or merged, and so is a selection with no items.
    """
    if sel.split not in run.splits:
        raise query_error(q, f"unknown split '{sel.split}'", sel.pos,
                   _suggest(sel.split, run.splits) or f"recorded splits: {', '.join(run.splits)}")
    n = run.split_size(sel.split)
    items: list[int] = []
    seen: set[int] = set()

    def add(new: range | list[int], pos: int) -> None:
        for i in new:
            if i in seen:
                raise query_error(q, f"{sel.split} item {i} is selected twice; list each item once", pos)
            seen.add(i)
            items.append(i)

    def rng(r: IndexRange, pos: int) -> range:
        start = 0 if r.start is None else r.start
        stop = n if r.stop is None else r.stop
        if r.stop is not None and start >= r.stop:
            shown = f"{'' if r.start is None else r.start}:{'' if r.stop is None else r.stop}"
            raise query_error(q, f"{sel.split}[{shown}] selects no items", pos,
                       f"{sel.split} has {n} items (0..{n - 1})" if n else f"{sel.split} has no items")
        if start >= n or stop > n:
            raise query_error(q, f"{sel.split}[{start}..{stop - 1}] is out of range: {sel.split} has {n} items "
                          f"(0..{n - 1})", pos)
        return range(start, stop)

    idx = sel.index
    if isinstance(idx, AllItems):
        add(range(n), sel.pos)
    elif isinstance(idx, IndexRange):
        add(rng(idx, idx.pos or sel.pos), idx.pos or sel.pos)
    else:
        assert isinstance(idx, IndexList)
        for it in idx.items:
            if isinstance(it, IndexRange):
                add(rng(it, it.pos or idx.pos), it.pos or idx.pos)
            elif it >= n:
                raise query_error(q, f"{sel.split}[{it}] is out of range: {sel.split} has {n} items (0..{n - 1})",
                           idx.pos or sel.pos)
            else:
                add([it], idx.pos or sel.pos)
    if not items:
        raise query_error(q, f"{sel.split} selects no items: the split is empty", sel.pos)
    if sel.where_label is not None:
        y = run.split(sel.split)[1]
        if y.is_floating_point() or y.dim() != 1:
            raise query_error(q, f"'where label' needs class labels, but {sel.split} has real-valued targets", sel.pos)
        keep = set(sel.where_label)
        n_out = outputs_of(run)
        if any(c >= n_out for c in keep):
            raise query_error(q, f"label {max(keep)} is out of range: the model has {n_out} classes (0..{n_out - 1})",
                              sel.pos)
        items = [i for i in items if int(y[i]) in keep]
        if not items:
            raise query_error(q, f"no item of {sel.split} has label {' or '.join(map(str, sel.where_label))} "
                          "in the selection", sel.pos)
    return tuple(items)


SEQUENCE_TARGETS = ("loss", "logprob")


def outputs_of(run: Run) -> int:
    """How many outputs the model has per item (from the store's model facts: no model is built for a
    store that has them)."""
    return facts_for(run, "cpu", torch.float64).n_out


def _is_classifier(run: Run, split: str) -> bool:
    y = run.split(split)[1]
    return not y.is_floating_point() and y.dim() == 1


@dataclass(frozen=True)
class Clauses:
    """Which clauses a measure takes. ``refuses``: the clauses it would ignore, each with why and what to
    write instead (docs/language.md, "Which clauses each measure takes"), refused rather than dropped;
    ``fixed_shape``: it takes no ``by`` either; ``states``: its steps name the states 0..N the run passed
    through (``evaluate``), not the updates 0..N-1."""

    refuses: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    fixed_shape: bool = False
    states: bool = False


def check_clauses(q: Query, clauses: Clauses) -> None:
    """Refuse the first clause (in the text) that the measure would ignore."""
    unused = clauses.refuses
    found: list[tuple[int, str]] = []
    if q.components is not None and "of" in unused:
        found.append((q.components.pos, "of"))
    if q.target is not None and q.target.kind != "label" and "on" in unused:
        found.append((q.target.pos, "on"))
    if q.train is not None and "from" in unused:
        found.append((q.train.pos, "from"))
    if q.by is not None and clauses.fixed_shape:
        found.append((q.by.pos, "by"))
    if q.top is not None and "top" in unused:
        found.append((q.top.pos, "top"))
    if not found:
        return
    pos, clause = min(found)
    if clause == "by":
        raise query_error(q, f"'{q.measure}' has a fixed shape and takes no 'by' clause", pos)
    why, hint = unused[clause]
    what = f"'{clause}'"
    if clause == "on":
        fn = "output" if q.target.kind in ("output", "outputs") else q.target.kind
        what, hint = f"a target function ('{fn}')", f"write 'on {selection_text(q.target.items)}'"
    raise query_error(q, f"'{q.measure}' does not use {what}: {why}", pos, hint)


def bind(q: Query, run: Run, clauses: Clauses, distributed: bool = False) -> Bound:
    """Resolve what every measure shares in ``q`` against ``run``, raising SemanticError with a caret on the
    first problem; ``clauses`` are those the measure takes.

    ``distributed``: the query runs on a cluster given outside its text (``scheduler=``), so
    a CUDA device need only exist on the workers.
    """
    check_clauses(q, clauses)
    params = resolve_components(q, q.components, run)
    # target
    if q.target is not None:
        tsel, kind, output = q.target.items, q.target.kind, q.target.output
        tpos = q.target.pos
    else:
        default = "test" if "test" in run.splits else run.splits[-1]
        tsel, kind, output, tpos = SplitSel(default, AllItems()), "label", None, q.pos
    items = resolve_items(q, tsel, run)
    if kind == "output" and output >= (n_out := outputs_of(run)):
        raise query_error(q, f"output[{output}] is out of range: the model has {n_out} outputs (0..{n_out - 1})", tpos,
                          "write 'output(...)' for every output")
    if run.loss.sequence:  # a sequence's targets are its token loss and its log-likelihood
        if q.target is None:
            kind = "loss"
        elif kind not in SEQUENCE_TARGETS:
            raise query_error(q, f"'{kind}' is a per-class target, but this run's items are token sequences "
                                 f"(LM loss); use {' or '.join(f'{k}(...)' for k in SEQUENCE_TARGETS)}", tpos)
    elif kind in ("label", "logprob", "prob", "margin") and not _is_classifier(run, tsel.split):
        if q.target is not None and kind != "label":
            raise query_error(q, f"'{kind}' needs class labels, but {tsel.split} has real-valued targets", tpos)
        kind = "outputs"  # regression: the default target is every output
    # training examples
    examples = None
    if q.train is not None:
        if q.train.split != "train":
            raise query_error(q, f"training examples come from the train split, not '{q.train.split}'", q.train.pos,
                       "write 'from train[...]'")
        examples = resolve_items(q, q.train, run)
    # steps: the updates 0..N-1, or the states 0..N for a measure of states
    n = run.n_steps + clauses.states
    a, b = 0, n
    if q.steps is not None:
        st = q.steps
        a = 0 if st.start is None else st.start
        b = n if st.stop is None else st.stop
        last = (f"the run's states are 0..{n - 1}" if clauses.states
                else f"the run has {n} steps (0..{n - 1})" if n else "the run has no complete step")
        shown = f"step {a} is" if st.single else f"steps {a}:{b} are"
        if st.stop is not None and a >= b:
            raise query_error(q, f"steps {'' if st.start is None else st.start}:{st.stop} select no steps", st.pos, last)
        if a >= n or b > n or a >= b:
            hint = (f"; step {n} is the final state, which only evaluate reads"
                    if not clauses.states and b == n + 1 and st.single else "")
            raise query_error(q, f"{shown} out of range: {last}{hint}", st.pos)
    dims = tuple(q.by.dims) if q.by is not None else ()
    step_every = (q.by.step_every or 1) if q.by is not None else 1
    if "token" in dims and not (run.loss.sequence and kind in SEQUENCE_TARGETS):
        raise query_error(q, "'by token' splits a sequence's loss by position, but "
                          + ("this run's items are not token sequences (no LM loss)" if not run.loss.sequence
                             else f"'{kind}' is not a sequence's loss"), q.by.pos,
                          "use it on loss(...) or logprob(...) of a run recorded with loss='lm'")
    if "output" in dims and kind not in ("outputs",):
        raise query_error(q, "'by output' needs a target with several outputs", q.by.pos,
                   "write 'on output(test[...])'")
    opts = q.options.as_dict() if q.options is not None else {}
    device = str(opts.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    remote = distributed or "cluster" in opts
    if device.startswith("cuda") and not torch.cuda.is_available() and not remote:
        raise query_error(q, f"device {device} is not available on this machine", q.options.pos, "use 'device cpu'")
    fixed = "quadrature" in opts
    if fixed and "tolerance" in opts:
        raise query_error(q, "'quadrature N' fixes the nodes while 'tolerance' asks for adaptive refinement",
                   q.options.pos, "give one of them")
    nodes = int(opts.get("quadrature", DEFAULT_NODES))
    if nodes < 1 or nodes > 64:
        raise query_error(q, f"quadrature {nodes} is out of range (1..64)", q.options.pos)
    return Bound(
        query=q, measure=q.measure, params=params, target_kind=kind, target_split=tsel.split,
        test_items=items, output=output, examples=examples, a=a, b=b, dims=dims, step_every=step_every,
        top=q.top.k if q.top else None, top_abs=bool(q.top and q.top.by_abs), nodes=nodes,
        tolerance=None if fixed else float(opts.get("tolerance", DEFAULT_TOLERANCE)), device=device,
        dtype=getattr(torch, str(opts.get("dtype", "float64"))), budget=opts.get("budget"),
        cluster=str(opts["cluster"]) if "cluster" in opts else None, device_pinned="device" in opts,
        threads=opts.get("threads"))
