"""GPU benchmark: the grokking-size model recorded on the device, then the same requests on CUDA and CPU.

Run: ``python bench/bench_gpu.py [--steps 200] [--window 40] [--out FILE.md]``. It uses the
engine API directly (no polars needed on the device) and prints, side by side from one
process, the wall time of each request on each device and the replication residual.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

import explaind_ql as eq
from explaind_ql.engine.kernels import Engine, Request
from explaind_ql.engine.targets import TargetSpec
from explaind_ql.demo import record_grokking


# a grokking-size model (p = 113, as in the paper), trained full batch
GROKKING = dict(p=113, n_train=4000, n_test=2000, d_model=64, n_heads=4, d_mlp=512, act="relu",
                lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0, seed=43, data_seed=43)


def record(path: Path, steps: int, device: str) -> float:
    """Seconds to train and record ``steps`` steps on ``device``."""
    t0 = time.perf_counter()
    record_grokking(path, GROKKING, steps, checkpoint_every=50, log=lambda _: None, log_every=steps, device=device)
    return time.perf_counter() - t0


def requests(run, a: int, b: int) -> dict[str, Request]:
    names = tuple(run.space.names)
    layers = sorted({run.space.top_layer(n) for n in names})
    by_layer = tuple(layers.index(run.space.top_layer(n)) for n in names)
    tests = TargetSpec("label", "test", tuple(range(100)), keep_test=False)
    kept = TargetSpec("label", "test", tuple(range(100)), keep_test=True)
    return {
        "model x training, by layer (delta)": Request(a, b, tests, names, by_layer, len(layers), nodes=2, tolerance=None,
                                                      strategy="delta"),
        "replication, 100 items summed (delta, adaptive 1e-6)": Request(a, b, tests, names, tuple(0 for _ in names), 1,
                                                                        strategy="delta"),
        "per-item replication (delta, fixed 4 nodes)": Request(a, b, kept, names, tuple(0 for _ in names), 1,
                                                               nodes=4, tolerance=None, strategy="delta"),
        "data, 1000 examples kept (fold, JVP)": Request(a, b, tests, names, tuple(0 for _ in names), 1,
                                                         examples=tuple(range(1000)), keep_examples=True,
                                                         nodes=2, tolerance=None, strategy="fold"),
    }


def timed(eng: Engine, req: Request):
    t0 = time.perf_counter()
    r = eng.run_request(req)
    if eng.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, r


def rel_residual(r) -> float:
    return float(((r.total() - r.actual).abs().max() / r.actual.abs().max()).cpu())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--window", type=int, default=40, help="steps per request (the CPU side is slow)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    lines = [f"# GPU benchmark ({time.strftime('%Y-%m-%d')})", "",
             f"torch {torch.__version__}; GPU {torch.cuda.get_device_name() if cuda else 'none'}; "
             f"host {platform.machine()}, {torch.get_num_threads()} CPU threads", "",
             f"Grokking-size model (p = 113, d_model 64, 4 heads, MLP 512, ReLU), 4,000 train pairs, full-batch "
             f"AdamW, {args.steps} steps recorded on {dev} (float32, checkpoint every 50); requests in float64 "
             f"over steps {args.steps - args.window}:{args.steps}, 100 test items.", ""]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "grok.zarr"
        rec_s = record(path, args.steps, dev)
        lines += [f"recording on {dev}: {rec_s:.1f} s ({rec_s / args.steps * 1000:.1f} ms/step)", "",
                  "| request | cuda s | cpu s | cpu / cuda | residual cuda | residual cpu |", "|---|---|---|---|---|---|"]
        run = eq.open(path)
        a, b = args.steps - args.window, args.steps
        engines = {"cpu": Engine(run, "cpu")}
        if cuda:
            engines["cuda"] = Engine(run, "cuda")
            timed(engines["cuda"], requests(run, b - 2, b)["model x training, by layer (delta)"])  # warm-up
        for name, req in requests(run, a, b).items():
            res = {}
            for dv, eng in engines.items():
                run.cache.forget_test_side()
                res[dv] = timed(eng, req)
            tg = res["cuda"][0] if cuda else float("nan")
            tc = res["cpu"][0]
            lines.append(f"| {name} | {tg:.2f} | {tc:.2f} | {tc / tg:.1f}× | "
                         f"{rel_residual(res['cuda'][1]) if cuda else float('nan'):.1e} | {rel_residual(res['cpu'][1]):.1e} |")
            print(lines[-1], flush=True)
        if cuda:
            full = requests(run, 0, args.steps)["replication, 100 items summed (delta, adaptive 1e-6)"]
            t, r = timed(engines["cuda"], full)
            lines += ["", f"replication over all {args.steps} steps on cuda: {t:.1f} s, max relative residual "
                          f"{rel_residual(r):.1e}, {r.stats['replayed_steps']} steps replayed, "
                          f"{r.stats['evaluations']} gradient evaluations"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
