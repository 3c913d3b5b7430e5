"""Working-set estimates, and chunking a request so that it fits a memory budget.

Every term is additive over params and independent across test items and training
examples, so a request that does not fit is split along those axes and the partial
results are joined exactly. When even the smallest chunk does not fit, the query is
refused with the selection to narrow, before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import psutil
import torch

from ..errors import BudgetError
from .facts import Facts
from .kernels import GROUP_LOOP_MAX, Request, Result

SAFE_FRACTION = 0.5
OVERHEAD = 4.0  # autograd intermediates per gradient evaluation, relative to the outputs kept
ADAPTIVE_NODES = 3  # nodes per step an adaptive rule is assumed to spend, per node of its base rule


def expected_nodes(req: Request) -> int:
    """Quadrature nodes per step that the estimates assume."""
    return ADAPTIVE_NODES * req.nodes if req.tolerance is not None else req.nodes


def default_budget(device: torch.device) -> int:
    """Half of what the device has free now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(SAFE_FRACTION * free)
    return int(SAFE_FRACTION * psutil.virtual_memory().available)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def estimate(req: Request, n_total: int, n_sel: int, n_targets: int, n_train: int, batch: int,
             itemsize: int) -> int:
    """Bytes the request holds at its peak."""
    T, G = n_targets, (n_sel if req.by_element else req.n_groups)
    nodes = expected_nodes(req)
    strategy = req.strategy
    if strategy == "project":  # three vectors over the selection, (3G, T) per node: no Jacobian is held
        k = 3 * G
        b = 3 * n_sel * OVERHEAD + nodes * k * T + 12 * n_total + 3 * req.n_bins * T * G
    else:
        b = nodes * T * n_sel * OVERHEAD + 12 * n_total + 3 * req.n_bins * T * G
    n_ex = n_train if req.examples is None else len(req.examples)
    e_out = n_ex if req.keep_examples else 1
    per_batch = min(batch, n_ex)  # a step's per-example work covers its selected examples only
    if strategy not in ("delta", "project"):
        b += req.n_bins * T * e_out * G + per_batch * n_sel * OVERHEAD
    if strategy == "momentum":
        b += 2 * n_ex * n_sel + T * per_batch * (G if G <= GROUP_LOOP_MAX else n_sel)
    if strategy == "fold":
        seg = req.segment_steps or (req.b - req.a)
        b += seg * (n_total + (T + 6) * n_sel) + T * per_batch * G
    return int(b * itemsize)


# bytes per answer row while the frame is built: four int64 engine indices, the value, the term,
# up to six key columns, and the copies that concat, relabelling and a regroup make of them
FRAME_ROW_BYTES = 320


@dataclass(frozen=True)
class Output:
    """What the answer itself holds: the result tensors (twice while chunks merge) and the frame."""

    cells: int                      # gradient cells, plus the decay and momentum rows
    result_bytes: int
    frame_bytes: int
    axes: tuple[tuple[str, int], ...]  # (axis, extent) of the answer, largest first

    @property
    def bytes(self) -> int:
        return 2 * self.result_bytes + self.frame_bytes


def output(req: Request, n_sel: int, n_targets: int, n_train: int, itemsize: int) -> Output:
    """The answer's size: (bins, targets, examples, groups) gradient cells plus two (bins, targets,
    groups) terms, as tensors and as frame rows."""
    G = n_sel if req.by_element else req.n_groups
    E = (n_train if req.examples is None else len(req.examples)) if req.keep_examples else 1
    cells = req.n_bins * n_targets * G * (E + 2)
    axes = sorted([("element" if req.by_element else "group", G), ("example", E), ("step", req.n_bins),
                   ("test", n_targets)], key=lambda a: -a[1])
    return Output(cells, cells * itemsize, cells * FRAME_ROW_BYTES, tuple(axes))


def refuse_output(out: Output, budget: int) -> BudgetError:
    narrow = {"element": "by param or by layer instead of by element, or of fewer params",
              "group": "fewer layers or params in the by keys",
              "example": "fewer training examples (from train[...]) or top k",
              "step": "fewer step bins (by step every N, or over steps a:b)",
              "test": "fewer test items, or drop test from the by keys"}
    axis, extent = out.axes[0]
    return BudgetError(f"the answer alone would hold {out.cells:,} values (about {fmt_bytes(out.bytes)} with "
                       f"its frame), over the {fmt_bytes(budget)} budget; the largest axis is {axis} "
                       f"({extent:,}): ask for {narrow[axis]}, or raise the budget with 'using budget ...'")


@dataclass(frozen=True)
class Leaf:
    """One engine request that fits the budget, with the working set estimated for it."""

    request: Request
    bytes: int

    def leaves(self) -> tuple[Request, ...]:
        return (self.request,)

    @property
    def max_bytes(self) -> int:
        return self.bytes

    @property
    def by_element(self) -> bool:
        return self.request.by_element


@dataclass(frozen=True)
class Split:
    """A request split along ``axis`` (test, example, param, segment) into parts that merge exactly."""

    axis: str
    parts: tuple[Leaf | Split, ...]

    def leaves(self) -> tuple[Request, ...]:
        return tuple(r for p in self.parts for r in p.leaves())

    @property
    def max_bytes(self) -> int:
        return max(p.max_bytes for p in self.parts)

    @property
    def by_element(self) -> bool:
        return self.parts[0].by_element


Chunks = Leaf | Split


def _halves(items: tuple) -> list[tuple]:
    mid = len(items) // 2
    return [items[:mid], items[mid:]]


def split(req: Request, sel_params: list[str]) -> tuple[str, list[Request]] | None:
    """The next way to shrink a request: fold segments, test items, examples, then params."""
    if req.strategy == "fold" and (req.segment_steps or (req.b - req.a)) > 1:
        seg = req.segment_steps or (req.b - req.a)
        return "segment", [replace(req, segment_steps=max(1, seg // 2))]
    if req.target.keep_test and len(req.target.items) > 1:
        return "test", [replace(req, target=replace(req.target, items=h)) for h in _halves(req.target.items)]
    if req.examples is not None and len(req.examples) > 1 and req.strategy == "momentum":
        return "example", [replace(req, examples=h) for h in _halves(req.examples)]
    if len(sel_params) > 1:
        order = {n: i for i, n in enumerate(req.params)}
        parts = []
        for h in _halves(tuple(sel_params)):
            parts.append(replace(req, params=h, group_of_param=tuple(req.group_of_param[order[n]] for n in h)))
        return "param", parts
    return None


def merge(axis: str, parts: list[Result], by_element: bool) -> Result:
    """Join partial results: concatenate along tests/examples/elements, add over params."""
    first = parts[0]
    if len(parts) == 1 or axis == "segment":
        return first
    cat = torch.cat

    def each(name: str, join):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else join(values)
    if axis == "test":
        r = Result(cat([p.gradient for p in parts], 1), cat([p.weight_decay for p in parts], 1),
                   cat([p.momentum for p in parts], 1), sum((p.target_labels for p in parts), []),
                   first.example_ids, cat([p.actual for p in parts]), cat([p.explained for p in parts]),
                   cat([p.step_actual for p in parts], 1), cat([p.step_explained for p in parts], 1),
                   along=each("along", lambda ts: cat(ts, 1)), rebuild_gap=each("rebuild_gap", lambda ts: cat(ts, 1)),
                   start=each("start", cat))
    elif axis == "example":  # Σ φ·Δθ does not depend on the examples: every part has the whole of it
        r = Result(cat([p.gradient for p in parts], 2), first.weight_decay, first.momentum, first.target_labels,
                   cat([p.example_ids for p in parts]), first.actual, first.explained,
                   first.step_actual, first.step_explained, along=first.along, start=first.start)
    else:  # param chunks: element groups concatenate, named groups add
        join = (lambda ts: cat(ts, -1)) if by_element else (lambda ts: sum(ts))
        r = Result(join([p.gradient for p in parts]), join([p.weight_decay for p in parts]),
                   join([p.momentum for p in parts]), first.target_labels, first.example_ids,
                   first.actual, sum(p.explained for p in parts), first.step_actual,
                   sum(p.step_explained for p in parts), along=each("along", join),
                   rebuild_gap=each("rebuild_gap", join), start=first.start)
    r.stats = dict(first.stats, chunks=sum(p.stats.get("chunks", 1) for p in parts),
                   seconds=sum(p.stats.get("seconds", 0.0) for p in parts),
                   evaluations=sum(p.stats.get("evaluations", 0) for p in parts))
    if axis == "test" and "residual" in first.stats:  # each part replicates its own items
        r.stats.update({k: max(p.stats[k] for p in parts) for k in ("residual", "change", "rounding")
                        if k in first.stats})
    return r


def refuse(req: Request, need: int, budget: int) -> BudgetError:
    what = []
    if len(req.target.items) > 1:
        what.append("fewer test items")
    if req.keep_examples or req.examples is not None:
        what.append("fewer training examples (from ...)")
    what.append("fewer layers (of ...)")
    if req.b - req.a > 1:
        what.append("fewer steps (over steps ...)")
    return BudgetError(f"the query needs about {fmt_bytes(need)} but the budget is {fmt_bytes(budget)}, even "
                       f"in the smallest chunks; narrow the selection ({', '.join(what)}) or raise it "
                       "with 'using budget ...'")


def _sizes(facts: Facts, req: Request) -> tuple[list[str], int, int, int]:
    run = facts.run
    sel = [n for n in run.space.names if n in set(req.params)]
    return (sel, sum(run.space.by_name[n].numel for n in sel), len(facts.target_labels(req.target)),
            torch.empty((), dtype=facts.dtype).element_size())


def answer(facts: Facts, req: Request) -> Output:
    """The answer's size for the whole request (before any chunking)."""
    _, n_sel, n_targets, itemsize = _sizes(facts, req)
    return output(req, n_sel, n_targets, facts.run.split_size("train"), max(itemsize, 8))


def plan(facts: Facts, req: Request, budget: int) -> Chunks:
    """The chunk tree for ``req`` under ``budget`` (``facts``: the run on its device, no model needed)."""
    run = facts.run
    sel, n_sel, n_targets, itemsize = _sizes(facts, req)
    need = estimate(req, run.space.size, n_sel, n_targets, run.split_size("train"), facts.max_batch, itemsize)
    if need <= budget:
        return Leaf(req, need)
    nxt = split(req, sel)
    if nxt is None:
        raise refuse(req, need, budget)
    axis, parts = nxt
    return Split(axis, tuple(plan(facts, p, budget) for p in parts))


def execute(engine, tree: Chunks) -> Result:
    if isinstance(tree, Leaf):
        r = engine.run_request(tree.request)
        r.stats["estimated_bytes"] = tree.bytes
        return r
    return merge(tree.axis, [execute(engine, t) for t in tree.parts], tree.by_element)
