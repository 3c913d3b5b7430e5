#!/usr/bin/env python
"""Recording overhead vs the bare training loop, store size dense vs checkpointed, replay drift.

    python bench/bench_record.py --quick            # reduced size, < 2 min
    python bench/bench_record.py --write            # full size; writes bench/RESULTS_record.md
    python bench/bench_record.py --steps 500        # other sizes; see --help

Issue goals (grokking-size model, ~89k params, 2,000 full-batch AdamW steps):
  * recording in checkpointed mode costs at most 1.3x the bare loop;
  * a checkpointed store (K=100) is under 5% of the dense store;
  * report the replay drift over 100 steps.

How it measures (one process):
  1. Three copies of the model, built from the same seed, are trained side by side in
     LOCKSTEP for the first ``--timed-steps`` steps: (a) bare loop, (b) recorded with
     ``checkpoint_every=K``, (c) recorded dense. Each step runs the three modes one after
     another (order rotated every step), so background load on a shared machine hits all
     three alike. Wall time = Recorder construction + the steps (train + rec.step) +
     rec.close(); model/data construction is excluded. After the window the three
     parameter vectors are compared (recording must not perturb training: expected 0).
  2. Dense stops after the window (``--dense-steps``, default = window); its size at N is
     EXTRAPOLATED linearly from the empty store and the D-step store. Dense at 2,000 steps
     would write ~2 GB and take several times the window's time on 2 cores.
  3. The checkpointed run continues alone to N steps (so its store size at N is measured,
     not extrapolated); the rec.step calls of some continuation steps run under cProfile to
     show where the recording time goes.
  4. Threads: by default torch runs with ONE intra-op thread (``--threads 1``). On a shared
     2-core machine torch's default of 2 threads makes every small elementwise op wait for
     a descheduled partner thread; rec.step (dozens of ops on 89k-element vectors) then
     measured 0.58 s instead of 0.01 s, i.e. the benchmark would time the OS scheduler.
     ``--threads 0`` keeps torch's default; a short probe (``--probe-steps``) right after the
     window re-times bare and checkpointed side by side with torch's default thread count.
  5. The checkpointed store is reopened and walked over ``--drift-len`` steps from state 0
     and from a mid-run checkpoint with Trajectory in float32 (the recorded dtype) and in
     float64 (each on a freshly opened run, so nothing comes from the replay cache); the
     drift at the checkpoint reached and the time per walked step are reported.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import os
import platform
import pstats
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import explaind_ql as eq
from explaind_ql.engine.trajectory import Trajectory
from explaind_ql.models import ModAddTransformer, modadd_data

FACTORY = "explaind_ql.models:ModAddTransformer"
MODEL_KW = dict(p=113, d_model=64, n_heads=4, d_mlp=512, act="relu")
OPT_KW = dict(lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0)
OVERHEAD_GOAL = 1.3
SIZE_GOAL = 0.05

LINES: list[str] = []


def out(s: str = "") -> None:
    print(s, flush=True)
    LINES.append(s)


def mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


class Mode:
    """One training copy: bare, or recorded into ``path`` with ``checkpoint_every=every``."""

    def __init__(self, name: str, data, seed: int, path: Path | None = None, every: int | None = None):
        self.name, self.path, self.every = name, path, every
        self.X, self.y, self.Xt, self.yt = data
        self.idx = torch.arange(len(self.X))
        torch.manual_seed(seed)
        self.model = ModAddTransformer(**MODEL_KW)  # float32, like the reference code
        self.opt = torch.optim.AdamW(self.model.parameters(), **OPT_KW)
        self.rec = None
        self.t_setup = self.t_close = 0.0
        self.t_train: list[float] = []   # zero_grad + forward + backward + optimizer.step
        self.t_rec: list[float] = []     # rec.step
        self.base_bytes = 0

    @property
    def recorded(self) -> bool:
        return self.path is not None

    def start(self) -> None:
        if not self.recorded:
            return
        t0 = time.perf_counter()
        self.rec = eq.Recorder(self.path, self.model, self.opt, train=(self.X, self.y), test=(self.Xt, self.yt),
                               loss="nll", reduction="mean", factory=FACTORY, factory_kwargs=MODEL_KW,
                               checkpoint_every=self.every, overwrite=True)
        self.t_setup = time.perf_counter() - t0
        self.base_bytes = dir_bytes(self.path)

    def step(self, profiler: cProfile.Profile | None = None) -> None:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = F.nll_loss(self.model(self.X), self.y)
        loss.backward()
        self.opt.step()
        t1 = time.perf_counter()
        self.t_train.append(t1 - t0)
        if self.rec is not None:
            if profiler is not None:
                profiler.enable()
            self.rec.step(self.idx, loss=loss)
            if profiler is not None:
                profiler.disable()
            self.t_rec.append(time.perf_counter() - t1)

    def close(self) -> None:
        if self.rec is not None:
            t0 = time.perf_counter()
            self.rec.close()
            self.t_close = time.perf_counter() - t0

    def seconds(self, n: int) -> float:
        """Wall time of the first n steps, plus the recorder's construction and close."""
        return self.t_setup + sum(self.t_train[:n]) + sum(self.t_rec[:n]) + self.t_close

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    la = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"nproc {os.cpu_count()}, {cpu}, torch {torch.__version__} ({torch.get_num_threads()} threads used; "
            f"torch default {DEFAULT_THREADS}), "
            f"Python {platform.python_version()}, load average {la}")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced size (30 steps, K=10, window 20), < 2 min")
    ap.add_argument("--steps", type=int, help="N: steps of the checkpointed recording (default 2000)")
    ap.add_argument("--every", type=int, help="K: checkpoint_every of the checkpointed mode (default 100)")
    ap.add_argument("--timed-steps", type=int, help="lockstep window for the bare/ckpt/dense timing (default 128)")
    ap.add_argument("--dense-steps", type=int, help="steps recorded densely, <= window (default = window)")
    ap.add_argument("--drift-len", type=int, help="steps per replay walk (default 100)")
    ap.add_argument("--profile-steps", type=int, help="continuation steps whose rec.step is profiled (default 100)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads for training, recording and replay; 0 = torch's default (default 1)")
    ap.add_argument("--probe-steps", type=int, help="steps re-timed with torch's default threads (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where the stores go (default: a temp dir, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument("--write", action="store_true", help="write bench/RESULTS_record.md")
    a = ap.parse_args()
    q = a.quick
    a.steps = a.steps or (30 if q else 2000)
    a.every = a.every or (10 if q else 100)
    a.timed_steps = min(a.timed_steps or (20 if q else 128), a.steps)
    a.dense_steps = min(a.dense_steps or a.timed_steps, a.timed_steps)
    a.drift_len = a.drift_len or (10 if q else 100)
    a.profile_steps = a.profile_steps if a.profile_steps is not None else (5 if q else 100)
    a.probe_steps = a.probe_steps if a.probe_steps is not None else (4 if q else 8)
    a.probe_steps = min(a.probe_steps, a.steps - a.timed_steps)
    a.profile_steps = min(a.profile_steps, a.steps - a.timed_steps - a.probe_steps)
    return a


DEFAULT_THREADS = torch.get_num_threads()


def main() -> int:
    a = parse()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    cmd = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    N, K, T, D = a.steps, a.every, a.timed_steps, a.dense_steps
    out(f"# Recording benchmark: overhead, store size, replay drift{' (QUICK)' if a.quick else ''}")
    out()
    out(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    out(f"- command: `{cmd}`")
    out(f"- machine at start: {machine()}")

    X, y, Xt, yt = modadd_data(MODEL_KW["p"], 4000, 2000, seed=43)
    data = (X, y, Xt, yt)
    n_params = sum(p.numel() for p in ModAddTransformer(**MODEL_KW).parameters())
    out(f"- model: ModAddTransformer({', '.join(f'{k}={v}' for k, v in MODEL_KW.items())}), {n_params:,} params, "
        f"float32; full batch {len(X)} train pairs ({len(Xt)} test); AdamW lr {OPT_KW['lr']}, betas "
        f"{OPT_KW['betas']}, weight_decay {OPT_KW['weight_decay']}; loss nll (mean)")
    out(f"- sizes: N={N} steps checkpointed (K={K}); lockstep timing window {T} steps (bare | ckpt | dense); "
        f"dense recorded for {D} steps")

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_record_"))
    work.mkdir(parents=True, exist_ok=True)
    state_bytes = n_params * 4 * 3  # theta + exp_avg + exp_avg_sq, float32, uncompressed
    need = state_bytes * (D + 1 + N // K + 2) * 1.2 + 50e6
    free = shutil.disk_usage(work).free
    if need > free * 0.5:
        D_fit = max(1, int((free * 0.5 - 50e6) / (state_bytes * 1.2)) - N // K - 3)
        out(f"- disk: {mb(free)} free at {work}; dense at {D} steps would need ~{mb(need)}: dense cut to {D_fit} steps")
        D = min(D, D_fit)
    else:
        out(f"- disk: {mb(free)} free at {work}; this run needs at most ~{mb(need)}")

    bare = Mode("bare", data, a.seed)
    ckpt = Mode(f"checkpointed K={K}", data, a.seed, work / "ckpt.zarr", K)
    dense = Mode("dense", data, a.seed, work / "dense.zarr", None)
    try:
        return run(a, N, K, T, D, bare, ckpt, dense, work, t_start, cmd, n_params, state_bytes)
    finally:
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


def run(a, N, K, T, D, bare, ckpt, dense, work, t_start, cmd, n_params, state_bytes) -> int:
    # ---- 1. lockstep window ------------------------------------------------------------------
    out()
    out(f"Training {T} steps in lockstep (bare | ckpt | dense), then ckpt alone to {N} ...")
    modes = [bare, ckpt, dense]
    for m in modes:
        m.start()
    t_report = time.perf_counter()
    for s in range(T):
        for j in range(3):
            m = modes[(s + j) % 3]
            if m is dense and s >= D:
                continue
            m.step()
        if time.perf_counter() - t_report > 60:
            t_report = time.perf_counter()
            print(f"  step {s + 1}/{T}  ({time.perf_counter() - t_start:.0f} s elapsed)", file=sys.stderr, flush=True)
    dense.close()
    d_bare_ckpt = float((bare.flat() - ckpt.flat()).abs().max())
    d_bare_dense = float((bare.flat() - dense.flat()).abs().max()) if D == T else float("nan")
    dense_run = eq.open(dense.path)
    dense_bytes_D = dense_run.bytes_on_disk
    assert dense_run.n_steps == D, (dense_run.n_steps, D)
    del dense_run
    dense.model = dense.opt = None

    # ---- thread probe: bare | ckpt side by side with torch's default thread count -------------
    P = a.probe_steps if DEFAULT_THREADS != torch.get_num_threads() else 0
    if P:
        used = torch.get_num_threads()
        torch.set_num_threads(DEFAULT_THREADS)
        for s in range(T, T + P):
            for m in ((bare, ckpt) if s % 2 else (ckpt, bare)):
                m.step()
        torch.set_num_threads(used)

    # ---- 2. checkpointed run continues alone -------------------------------------------------
    prof = cProfile.Profile()
    n_prof = a.profile_steps
    p0 = T + P  # first profiled step; unprofiled continuation starts at p0 + n_prof
    t_report = time.perf_counter()
    for s in range(p0, N):
        ckpt.step(prof if s < p0 + n_prof else None)
        if time.perf_counter() - t_report > 60:
            t_report = time.perf_counter()
            print(f"  ckpt step {s + 1}/{N}  ({time.perf_counter() - t_start:.0f} s elapsed)", file=sys.stderr, flush=True)
    ckpt.close()
    ckpt_run = eq.open(ckpt.path)
    assert ckpt_run.n_steps == N, (ckpt_run.n_steps, N)
    ckpt_bytes_N = ckpt_run.bytes_on_disk
    n_ckpts = len(ckpt_run.ckpt_states)
    del ckpt_run

    # ---- 3. table ----------------------------------------------------------------------------
    bare_s = bare.seconds(T)
    ckpt_s = ckpt.seconds(T)  # setup + first T steps + close (close happens at N)
    dense_s = dense.seconds(D)
    bare_s_D = bare.seconds(D)
    per_step_dense_bytes = (dense_bytes_D - dense.base_bytes) / D
    dense_bytes_N = dense.base_bytes + per_step_dense_bytes * N
    extrap = D != N
    out()
    out("## Overhead and store size")
    out()
    out("| mode | timed steps | seconds | s/step (median) | x bare | steps stored | store bytes | x dense (at N) |")
    out("|---|---:|---:|---:|---:|---:|---:|---:|")
    out(f"| bare loop | {T} | {bare_s:.1f} | {med(bare.t_train):.3f} | 1.00 | - | - | - |")
    ck_med = med([t + r for t, r in zip(ckpt.t_train[:T], ckpt.t_rec[:T])])
    de_med = med([t + r for t, r in zip(dense.t_train, dense.t_rec)])
    out(f"| checkpointed K={K} | {T} | {ckpt_s:.1f} | {ck_med:.3f} | {ckpt_s / bare_s:.2f} | {N} ({n_ckpts} states) "
        f"| {ckpt_bytes_N:,} | {ckpt_bytes_N / dense_bytes_N:.4f} |")
    dense_ratio = dense_s / bare_s_D
    out(f"| dense | {D} | {dense_s:.1f} | {de_med:.3f} | {dense_ratio:.2f} | {D} ({D + 1} states) | {dense_bytes_D:,} "
        f"| {'1' if not extrap else '-'} |")
    if extrap:
        out(f"| dense, extrapolated to N={N} | - | - | - | - | ({N + 1} states) | {dense_bytes_N:,.0f} | 1 |")
    out()
    if extrap:
        out(f"Dense size at N={N} is EXTRAPOLATED linearly, not measured: empty store {dense.base_bytes:,} B + "
            f"{per_step_dense_bytes:,.0f} B/step x {N} (from the {D}-step dense store, {dense_bytes_D:,} B). "
            f"Uncompressed state payload is {state_bytes:,} B/state (params + exp_avg + exp_avg_sq, float32).")
    out(f"Seconds = Recorder construction + the timed steps (train + rec.step) + rec.close(); the checkpointed "
        f"row's close ran at step {N} ({ckpt.t_close:.2f} s). Setup: ckpt {ckpt.t_setup:.2f} s, dense "
        f"{dense.t_setup:.2f} s; dense close {dense.t_close:.2f} s.")
    out(f"Training identical across modes after {T} steps: max |bare - ckpt| = {d_bare_ckpt:.3g}, "
        f"max |bare - dense| = {d_bare_dense:.3g}.")
    ratio_med = ck_med / med(bare.t_train[:T])
    out()
    out("## Goals")
    out()
    ov_ok = ckpt_s / bare_s <= OVERHEAD_GOAL
    sz_ok = ckpt_bytes_N / dense_bytes_N < SIZE_GOAL
    note = "" if (K == 100 and N == 2000) else f" (goal is stated for K=100, N=2000; this run K={K}, N={N})"
    out(f"- overhead, checkpointed <= {OVERHEAD_GOAL}x bare: {ckpt_s / bare_s:.2f}x total over the {T}-step window "
        f"({ratio_med:.2f}x by per-step medians) -> {'MET' if ov_ok else 'NOT MET'}")
    out(f"- store size, checkpointed < {SIZE_GOAL:.0%} of dense: {ckpt_bytes_N / dense_bytes_N:.2%} "
        f"({mb(ckpt_bytes_N)} vs {mb(dense_bytes_N)}{' extrapolated' if extrap else ''}) -> "
        f"{'MET' if sz_ok else 'NOT MET'}{note}")

    # ---- where the recording time goes -------------------------------------------------------
    out()
    out("## Where the recording time goes (lockstep window, median s/step)")
    out()
    out("| mode | train part (fwd+bwd+opt.step) | rec.step | rec.step at step 0 | rec.step on flush/ckpt steps |")
    out("|---|---:|---:|---:|---:|")
    out(f"| bare loop | {med(bare.t_train[:T]):.4f} | - | - | - |")
    for m, n, every in ((ckpt, T, K), (dense, D, 1)):
        flush = [m.t_rec[s] for s in range(1, n) if (s + 1) % 64 == 0 or (every > 1 and (s + 1) % every == 0)]
        out(f"| {m.name} | {med(m.t_train[:n]):.4f} | {med(m.t_rec[1:n]):.4f} | {m.t_rec[0]:.4f} | "
            + (f"{med(flush):.4f} (n={len(flush)}) |" if flush else "- (none in window) |"))
    out()
    out("The train part of a recorded mode includes the Recorder's post-accumulate-grad hooks (a float64 grad "
        "norm per param); rec.step at step 0 includes the gradient check (one extra forward + backward); "
        "dense rec.step flushes 64 states (~68 MB before compression) every 64 steps.")
    c0 = p0 + n_prof
    cont = [t + r for t, r in zip(ckpt.t_train[c0:], ckpt.t_rec[c0:])]
    if cont:
        out(f"Checkpointed run alone, steps {c0}..{N - 1} (unprofiled, not side by side with bare, indicative): "
            f"median {med(cont):.3f} s/step (train {med(ckpt.t_train[c0:]):.3f} + rec.step "
            f"{med(ckpt.t_rec[c0:]):.4f}).")
    if P:
        bt, ct, cr = bare.t_train[T:T + P], ckpt.t_train[T:T + P], ckpt.t_rec[T:T + P]
        out()
        out(f"Thread probe, steps {T}..{T + P - 1}, bare | checkpointed side by side with torch's default "
            f"{DEFAULT_THREADS} threads (the rest of the run used {torch.get_num_threads()}): bare {med(bt):.3f} s/step; "
            f"checkpointed train part {med(ct):.3f} + rec.step {med(cr):.4f} = {med(ct) + med(cr):.3f} s/step "
            f"({(sum(ct) + sum(cr)) / sum(bt):.2f}x bare, total over the probe).")
    if n_prof:
        out()
        out(f"cProfile of rec.step over steps {p0}..{p0 + n_prof - 1} of the checkpointed run "
            f"(explaind_ql functions by cumulative time, then everything by own time):")
        out()
        s = io.StringIO()
        st = pstats.Stats(prof, stream=s)
        st.strip_dirs().sort_stats("cumulative").print_stats(r"recorder|optim|store|params", 14)
        st.sort_stats("tottime").print_stats(12)
        text = s.getvalue()
        keep = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("   Ordered", "   List reduced"))]
        out("```")
        for ln in keep:
            out(ln.rstrip())
        out("```")

    # ---- 4. replay drift ---------------------------------------------------------------------
    W = min(a.drift_len, N)
    starts = [0]
    mid = (N // 2) // K * K
    if mid > 0 and mid + W <= N:
        starts.append(mid)
    out()
    out(f"## Replay drift ({W}-step walks of the checkpointed store, K={K})")
    out()
    out("| Trajectory dtype | window | walked | replayed | seconds | s/walked step | drift at state | abs error | rel error |")
    out("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    last: dict[tuple[str, int], torch.Tensor] = {}
    for dt in (torch.float32, torch.float64):
        run_ = eq.open(ckpt.path)  # fresh: replay cache and drift dict are per open run
        traj = Trajectory(run_, torch.device("cpu"), dt)
        for a0 in starts:
            r0 = traj.replayed_steps
            t0 = time.perf_counter()
            n = 0
            rec = None
            for rec in traj.walk(a0, a0 + W):
                n += 1
            sec = time.perf_counter() - t0
            last[(str(dt), a0)] = rec.theta_next.double()
            drift = {st: d for st, d in run_.cache.drift.items() if a0 < st <= a0 + W}
            ds = sorted(drift.values(), key=lambda d: d.state) or [None]
            for d in ds:
                out(f"| {str(dt).removeprefix('torch.')} | {a0}..{a0 + W} | {n} | {traj.replayed_steps - r0} | "
                    f"{sec:.1f} | {sec / max(n, 1):.3f} | "
                    + (f"{d.state} | {d.abs_error:.3g} | {d.rel_error:.3g} |" if d else "- | - | - |"))
    out()
    out("abs error = max |replayed - stored| over the params at the checkpoint; rel error = that / max |stored "
        "checkpoint - segment-start checkpoint| (how far the params moved over the segment).")
    diffs = [float((last[("torch.float64", a0)] - last[("torch.float32", a0)]).abs().max()) for a0 in starts]
    out(f"float64 walk vs float32 walk, last theta_next of each window: max |diff| = "
        f"{', '.join(f'{x:.3g}' for x in diffs)} (replay runs in the recorded dtype, float32, whatever the "
        "Trajectory dtype; the dtype only casts the yielded records).")

    out()
    out(f"- machine at end: {machine()}")
    out(f"- total benchmark wall time: {time.perf_counter() - t_start:.0f} s")
    if a.write:
        dest = Path(__file__).resolve().parent / "RESULTS_record.md"
        dest.write_text("\n".join(LINES) + "\n")
        print(f"wrote {dest}", file=sys.stderr)
    if a.keep or a.workdir:
        print(f"stores kept under {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
