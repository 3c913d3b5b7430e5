"""Running a query's physical plan on a Dask distributed cluster, split into step chunks.

Every term is a sum over update steps, so a plan's requests split into *step chunks*
that workers compute independently — except for momentum, which carries each step's
gradient (and decay, and the optimizer state the window starts from) into later steps.
That coupling is linear, and each chunk returns it in closed form (math.md, Step 2: the
momentum recurrence ``M_s = a_s ⊙ M_{s-1} + b_s ⊙ g'_s`` is elementwise):

- a chunk [c, d) starts its momenta at zero (``Request.carry_response``) and returns,
  besides its terms, its *momentum response* ``W[bin] = Σ_{s∈bin} φ_s ⊙ out_s ⊙ Π_{c≤r≤s} a_r``
  (any momentum ``m`` entering the chunk adds ``contract(W[bin], m)`` to that bin), its
  *transfer* ``A = Π_s a_s``, and the momenta it built up itself: the decay part ``D`` and,
  for data queries, the per-example part ``L`` of the tracked examples;
- the client walks the chunks in order with the momenta entering each one — the
  optimizer's momentum at the query start (carried), the decay momentum
  (``m_wd ← A ⊙ m_wd + D``) and the per-example momentum (``M ← A ⊙ M + L``) — and adds
  their contractions with ``W`` to the chunk's weight_decay, momentum and gradient terms.

The result equals local execution to rounding, term by term. Each worker task opens the
store itself (the path travels, not the run) on one torch thread, on the worker's GPU
when it has one and the query pins no device. Chunks of checkpointed runs start at
stored checkpoints, so no chunk replays steps another chunk computes. The ``fold``
strategy has no forward momentum to hand on, so each chunk of a fold plan runs the
``momentum`` strategy with one bin (and ``project`` runs as ``delta``); ``explain``
shows this, the chunks and the scheduler.

Failures: tasks of a lost worker are rescheduled by Dask, tasks that raise are retried
(:data:`RETRIES`), and a chunk that fails for good fails the query with one line naming
its steps — a partial result is never returned.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from . import progress
from .engine import budget as engine_budget
from .engine.facts import Facts
from .engine.kernels import Engine, Groups, Request, Result, example_columns
from .errors import ClusterError, ExplaindError
from .run import Run

CONNECT_TIMEOUT = 10.0   # seconds to reach the scheduler
WORKER_TIMEOUT = 60.0    # seconds to wait for a first worker
CHUNKS_PER_THREAD = 2    # step chunks per worker thread: load balance, and less to redo when a worker dies
RETRIES = 2              # re-runs of a chunk whose task raised
DEFAULT_PORT = 8786
PER_CHUNK = {"fold": "momentum", "project": "delta"}  # strategies whose chunks run another way

_clients: dict[str, Any] = {}


# ------------------------------------------------------------------------------ connecting

def _unreachable(address: str, why: str) -> ClusterError:
    return ClusterError(f"cannot reach the Dask scheduler at {address} ({why}); start one with "
                        f"'dask scheduler' and workers with 'dask worker {address}', check the address, "
                        "or drop 'using cluster' / --scheduler to run locally")


def _probe(address: str) -> str:
    """The address with its scheme and port; a refused or unresolvable TCP address fails fast here."""
    from distributed.comm import parse_address, parse_host_port
    try:
        scheme, loc = parse_address(address)
    except ValueError as exc:
        raise _unreachable(address, str(exc)) from None
    if scheme not in ("tcp", "tls"):
        return address
    try:
        host, port = parse_host_port(loc, DEFAULT_PORT)
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except (OSError, ValueError) as exc:
        raise _unreachable(address, getattr(exc, "strerror", None) or str(exc) or type(exc).__name__) from None
    return f"{scheme}://{host}:{port}"


def connect(scheduler: Any) -> tuple[Any, str]:
    """(client, address) for a scheduler address, a ``distributed.Client`` or a cluster object.

    Clients made here are kept per address, so a session's queries share one connection.
    """
    try:
        from distributed import Client
    except ImportError:
        raise ClusterError("running on a cluster needs dask.distributed: pip install 'explaind_ql[dask]'") from None
    if isinstance(scheduler, Client):
        return scheduler, str(scheduler.scheduler.address)
    address = str(getattr(scheduler, "scheduler_address", None) or scheduler).strip()
    client = _clients.pop(address, None)
    if client is not None:
        if client.status == "running":
            _clients[address] = client
            return client, address
        try:  # it lost its scheduler: connect afresh
            client.close(timeout=1)
        except Exception:  # noqa: BLE001 - a broken client may fail to close; it is dropped anyway
            pass
    full = _probe(address)
    try:
        client = Client(full, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except Exception as exc:  # noqa: BLE001 - whatever answers there may not speak Dask's protocol at all
        raise _unreachable(address, str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__) from None
    _clients[address] = client
    return client, address


def scheduler_for(scheduler: Any, cluster: str | None) -> Any:
    """The scheduler a query runs on: the caller's (``scheduler=``) or the query's ``using cluster``."""
    if scheduler is None or cluster is None:
        return scheduler if scheduler is not None else cluster
    given = (str(scheduler.scheduler.address) if hasattr(scheduler, "scheduler")
             else str(getattr(scheduler, "scheduler_address", None) or scheduler))
    if _same_address(given, cluster):
        return scheduler
    raise ClusterError(f"scheduler {given} conflicts with 'using cluster \"{cluster}\"' in the query; give one")


def _same_address(a: str, b: str) -> bool:
    def norm(x: str) -> str:
        x = x.strip()
        x = x if "://" in x else f"tcp://{x}"
        return x if x.rsplit("/", 1)[-1].count(":") else f"{x}:{DEFAULT_PORT}"
    return norm(a) == norm(b)


# ------------------------------------------------------------------------------ planning

@dataclass(frozen=True)
class Distribution:
    """How a physical plan runs on a cluster (``Plan.distribution``)."""

    address: str
    bounds: tuple[int, ...]          # chunk boundaries a = c_0 < c_1 < ... < c_J = b
    aligned: str                     # "even" or "aligned with stored checkpoints"
    workers: int
    threads: int
    device: str | None               # None: each worker's GPU when it has one, else cpu
    strategy: str                    # what each chunk runs
    response_bytes: int              # largest momentum response a chunk returns
    client: Any = field(default=None, compare=False, repr=False)

    @property
    def chunks(self) -> list[tuple[int, int]]:
        return list(zip(self.bounds[:-1], self.bounds[1:]))

    def summary(self) -> str:
        """Where the chunks run, for ``explain``."""
        spans = [f"{c}:{d}" for c, d in self.chunks]
        shown = ", ".join(spans if len(spans) <= 8 else spans[:4] + ["…"] + spans[-2:])
        sizes = sorted({d - c for c, d in self.chunks})
        per = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"
        plural = lambda n, word: f"{n} {word}{'s' * (n != 1)}"  # noqa: E731
        return (f"scheduler {self.address}, {plural(self.workers, 'worker')} ({plural(self.threads, 'thread')}); "
                f"{plural(len(spans), 'step chunk')} of {per} steps ({shown}), {self.aligned}")

    def per_chunk(self) -> str:
        """What each chunk runs, for ``explain``."""
        return (f"each chunk: strategy={self.strategy} on {self.device or 'the worker GPU if any, else cpu'}; "
                f"momentum composed across chunks on the client (response ≤ "
                f"{engine_budget.fmt_bytes(self.response_bytes)} per chunk)")


def chunk_bounds(run: Run, a: int, b: int, n: int) -> tuple[tuple[int, ...], str]:
    """Boundaries of about ``n`` step chunks of ``a..b-1``: even, or at stored checkpoints."""
    n = max(1, min(n, b - a))
    even = [a + round(i * (b - a) / n) for i in range(n + 1)]
    if run.dense:
        return tuple(sorted(set(even))), "even"
    stored = [int(s) for s in run.ckpt_states if a < int(s) < b]
    picks = {min(stored, key=lambda s: abs(s - t)) for t in even[1:-1]} if stored else set()
    return (a, *sorted(picks), b), "aligned with stored checkpoints"


def _chunk(req: Request, c: int, d: int) -> tuple[Request, list[int]]:
    """The request for steps c..d-1 of ``req`` and the query's bin of each of its local bins."""
    if req.step_bin is None:
        local, gbins = None, [0]
    else:
        seq = req.step_bin[c - req.a: d - req.a]
        gbins = list(dict.fromkeys(seq))
        local = tuple(gbins.index(x) for x in seq)
    return dataclasses.replace(req, a=c, b=d, step_bin=local, n_bins=len(gbins), window=(req.a, req.b),
                               carry_response=True), gbins


def _response_bytes(run: Run, facts: Facts, leaves: list[Request], bounds: tuple[int, ...]) -> int:
    itemsize = torch.empty((), dtype=facts.dtype).element_size()
    most = 0
    for req in leaves:
        n_sel = sum(run.space.by_name[n].numel for n in req.params)
        T = len(facts.target_labels(req.target))
        n_ex = (run.split_size("train") if req.examples is None else len(req.examples)) if req.data else 0
        for c, d in zip(bounds[:-1], bounds[1:]):
            bins = len(_chunk(req, c, d)[1])
            most = max(most, (bins * T + n_ex + 3) * n_sel * itemsize)
    return most


def distribute(plan, run: Run, facts: Facts, scheduler: Any, device: str | None, chunks: int | None = None):
    """``plan`` made to run on the cluster at ``scheduler``: its step chunks and per-chunk strategy.

    ``device`` is the query's pinned device (None: each worker's GPU when it has one);
    ``chunks`` the number of step chunks wanted (default: two per worker thread).
    """
    client, address = connect(scheduler)
    try:
        client.wait_for_workers(1, timeout=WORKER_TIMEOUT)
    except (TimeoutError, OSError):
        raise ClusterError(f"the Dask scheduler at {address} has no workers; start some with "
                           f"'dask worker {address}'") from None
    nthreads = client.nthreads()
    threads = sum(nthreads.values())
    req = plan.request
    strategy = req.strategy
    per_chunk = PER_CHUNK.get(strategy, strategy)
    tree = plan.chunks
    if per_chunk != strategy:
        tree = engine_budget.plan(facts, dataclasses.replace(req, strategy=per_chunk), plan.budget)
    leaves = tree.leaves()
    want = chunks or CHUNKS_PER_THREAD * threads
    bounds, aligned = chunk_bounds(run, req.a, req.b, want)
    resp = _response_bytes(run, facts, leaves, bounds)
    while chunks is None and run.dense and resp > plan.budget // 2 and len(bounds) - 1 < req.b - req.a:
        want *= 2  # smaller chunks hold fewer step bins in their response
        bounds, aligned = chunk_bounds(run, req.a, req.b, want)
        resp = _response_bytes(run, facts, leaves, bounds)
    dist = Distribution(address, bounds, aligned, len(nthreads), threads, device, per_chunk, resp, client)
    what = f"{len(bounds) - 1} step chunks on {address}"
    if per_chunk != strategy:
        what += (f"; {strategy} → {per_chunk} per chunk ("
                 + ("the per-example momentum crosses chunk boundaries" if strategy == "fold"
                    else "the momentum response needs φ") + ")")
    return plan.decide("distribution", what, chunks=tree, distribution=dist)


# ------------------------------------------------------------------------------ worker side

def run_chunk(path: str, req: Request, device: str | None, dtype: torch.dtype,
              trust: tuple[str, ...] = ()) -> Result:
    """One chunk on a worker: open the store (trusting what the client trusts), compute on one
    torch thread, return CPU tensors."""
    import explaind_ql
    torch.set_num_threads(1)
    run = explaind_ql.open(path, trust=trust)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    r = Engine(run, dev, dtype).run_request(req)
    moved = {f.name: getattr(r, f.name).cpu() for f in dataclasses.fields(r)
             if isinstance(getattr(r, f.name), torch.Tensor)}
    r = dataclasses.replace(r, **moved)
    r.stats["worker_pid"] = os.getpid()
    return r


# ------------------------------------------------------------------------------ client side

def compose(run: Run, req: Request, parts: Iterable[tuple[Result, list[int]]]) -> Result:
    """The chunks of ``req`` (in step order, each with its bins' query bins) as one Result.

    Adds, per chunk, the contraction of its momentum response with the momenta entering it.
    """
    groups = Groups(run.space.subspace(list(req.params)), req, "cpu")
    contract = groups.contract
    grad = wd = mom = along = m_carry = m_wd = m_ex = ex_cols = None
    first, actual, explained, stats = None, [], [], []
    for r, gbins in parts:
        if first is None:
            first = r
            T, dt = r.weight_decay.shape[1], r.weight_decay.dtype
            grad = torch.zeros(req.n_bins, T, r.gradient.shape[2], groups.G, dtype=dt)
            wd = torch.zeros(req.n_bins, T, groups.G, dtype=dt)
            mom = torch.zeros_like(wd)
            along = None if r.along is None else torch.zeros_like(wd)
            m_carry, m_wd = r.momentum_in, torch.zeros_like(r.momentum_in)
            if req.data:  # the output column of each tracked example, as the momentum strategy assigns them
                col, chosen = example_columns(run.split_size("train"), req, "cpu")
                ex_cols = col[chosen]
        has_wd, has_carry = bool(m_wd.any()), bool(m_carry.any())
        has_ex = m_ex is not None and bool(m_ex.any())
        for lb, gb in enumerate(gbins):
            w = r.response[lb]
            into_wd = contract(w, m_wd) if has_wd else 0
            into_mom = contract(w, m_carry) if has_carry else 0
            wd[gb] += r.weight_decay[lb] + into_wd
            mom[gb] += r.momentum[lb] + into_mom
            grad[gb] += r.gradient[lb]
            if along is not None:  # a chunk's φ·Δθ holds no momentum from before it
                along[gb] += r.along[lb]
            if not req.data:  # the chunk's Δθ-based gradient term still holds the momenta entering it
                grad[gb, :, 0] -= into_wd + into_mom
            elif has_ex:
                grad[gb].index_add_(1, ex_cols, contract(w, m_ex))
        a = r.transfer
        m_carry, m_wd = a * m_carry, a * m_wd + r.decay_momentum
        if req.data:
            m_ex = r.example_momentum if m_ex is None else a * m_ex + r.example_momentum
        actual.append(r.step_actual)
        explained.append(r.step_explained)
        stats.append(r.stats)
    step_actual, step_explained = torch.cat(actual), torch.cat(explained)
    out = Result(grad, wd, mom, first.target_labels, first.example_ids, step_actual.sum(0),
                 step_explained.sum(0), step_actual, step_explained, _merge_stats(stats), along=along,
                 start=first.start)
    if "residual" in out.stats:  # each chunk's own lacks the momentum entering it: the whole's, again
        out.stats.update(out.replication(run.split_size("train")))
    return out


def _merge_stats(parts: list[dict]) -> dict:
    out: dict = {}
    for st in parts:
        for k, v in st.items():
            if k not in out:
                out[k] = list(v) if isinstance(v, list) else v
            elif isinstance(v, list):
                out[k] += v
            elif isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            elif k.endswith("_bytes"):
                out[k] = max(out[k], v)
            else:
                out[k] += v
    out["chunks"] = len(parts)
    out["worker_pids"] = sorted({st.get("worker_pid") for st in parts} - {None})
    out.pop("worker_pid", None)
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _fetch(fut, c: int, d: int) -> Result:
    try:
        r = fut.result()
    except ExplaindError as exc:
        raise ClusterError(f"the chunk of steps {c}:{d} failed on the cluster: {exc}") from None
    except Exception as exc:
        why = _one_line(exc)
        if type(exc).__name__ == "KilledWorker":
            why = "the workers that ran it kept dying (out of memory?)"
        raise ClusterError(f"the chunk of steps {c}:{d} failed on the cluster ({why}); "
                           "no partial result is returned") from None
    fut.release()
    return r


def execute(run: Run, plan) -> Result:
    """Run a distributed plan: submit every (leaf, chunk) task, compose chunks, merge leaves."""
    dist: Distribution = plan.distribution
    client, path = dist.client, os.path.abspath(run.path)
    token = uuid.uuid4().hex[:8]
    jobs: list[list[tuple[Any, int, int, list[int]]]] = []
    t0 = time.perf_counter()
    futures = []
    try:
        for li, leaf in enumerate(plan.chunks.leaves()):
            row = []
            for j, (c, d) in enumerate(dist.chunks):
                req, gbins = _chunk(leaf, c, d)
                fut = client.submit(run_chunk, path, req, dist.device, plan.bound.dtype, run.trust.modules, pure=False,
                                    retries=RETRIES, priority=-j, key=f"explaind-chunk-{token}-{li}-{c}_{d}")
                futures.append(fut)
                row.append((fut, c, d, gbins))
            jobs.append(row)
        pending = iter(jobs)
        with progress.task(f"cluster: {len(futures)} chunks", len(futures)) as bar:

            def fetched(fut, c: int, d: int) -> Result:
                r = _fetch(fut, c, d)
                bar.advance()
                return r

            def leaf_result(leaf: Request) -> Result:
                row = next(pending)
                return compose(run, leaf, ((fetched(f, c, d), g) for f, c, d, g in row))

            result = _reduce(plan.chunks, leaf_result)
    except BaseException:
        client.cancel([f for f in futures if not f.done()])
        raise
    result.stats.update(wall_seconds=time.perf_counter() - t0, scheduler=dist.address,
                        workers=dist.workers, step_chunks=len(dist.chunks))
    return result


def _reduce(tree: engine_budget.Chunks, leaf_result) -> Result:
    if isinstance(tree, engine_budget.Leaf):
        return leaf_result(tree.request)
    return engine_budget.merge(tree.axis, [_reduce(t, leaf_result) for t in tree.parts], tree.by_element)


__all__ = ["ClusterError", "Distribution", "chunk_bounds", "compose", "connect", "distribute", "execute",
           "run_chunk", "scheduler_for"]
