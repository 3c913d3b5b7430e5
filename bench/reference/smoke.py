"""Smoke test of the reference adapter: tiny run, shapes, the reference's own replication.

    python bench/reference/smoke.py            # float64 (adapter's one documented patch) + float32 (stock)

Checks (prints, and exits 1 on failure):
- the reference's predicted change vs the true change f(theta_N) - f(theta_0), relative error;
- its internal closure: kernel term + weight-decay term == predicted change, per-tensor
  kernel sums add up to the kernel term, per-example kernel matrix rows add up to it;
- the recorded trajectory is replayable: plain torch.optim.AdamW from theta[0] over `batches`
  reproduces theta[N] (so the dict is usable as ground truth by another implementation).
Expected time: ~10 s on 2 idle CPU cores (several times longer when the cores are shared).
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapter import run_reference  # noqa: E402


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def replay(r):
    """Plain-torch replay of the recorded full-batch AdamW trajectory."""
    m = r["model_factory"]()
    m.load_state_dict(r["theta"][0])
    hp = r["optimizer_hparams"]
    opt = torch.optim.AdamW(m.parameters(), lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                            weight_decay=hp["weight_decay"])
    worst = 0.0
    for s, idx in enumerate(r["batches"]):
        opt.zero_grad()
        out = m(r["X_train"][idx])
        torch.nn.functional.nll_loss(out, r["y_train"][idx]).backward()
        opt.step()
        for k, v in m.state_dict().items():
            worst = max(worst, float((v - r["theta"][s + 1][k]).abs().max()))
    return worst


def check(dtype, steps, nodes, tol_rel, tol_closure, tol_replay):
    t0 = time.perf_counter()
    r = run_reference(p=13, n_train=30, n_test=4, steps=steps, seed=0, d_model=16, n_heads=4, d_mlp=32,
                      lr=1e-2, weight_decay=1.0, dtype=dtype, integral_nodes=nodes)
    wall = time.perf_counter() - t0
    m, m0 = r["model"], r["model_factory"]()
    m0.load_state_dict(r["theta"][0])
    with torch.no_grad():
        f0, fN = m0(r["X_test"]), m(r["X_test"])
    true = fN - f0
    print(f"\n== dtype={dtype}  steps={steps}  midpoint nodes={nodes}  patched={r['reference_patched']}")
    print(f"   X_train {tuple(r['X_train'].shape)}  X_test {tuple(r['X_test'].shape)}  theta: {len(r['theta'])} state dicts,"
          f" {r['n_params']} params ({len(r['param_names'])} tensors)  batches: {len(r['batches'])} x {len(r['batches'][0])}"
          f" (shuffled={r['shuffle']}, first ids {r['batches'][0][:6].tolist()})")
    print(f"   ref_pred {tuple(r['ref_pred'].shape)}  ref_kernel_term {tuple(r['ref_kernel_term'].shape)}"
          f"  ref_wd_term {tuple(r['ref_wd_term'].shape)}  ref_kernel_matrix {tuple(r['ref_kernel_matrix'].shape)}"
          f" (columns valid: {r['ref_kernel_matrix_columns_valid']})")
    k0 = r["param_names"][0]
    print(f"   ref_param_kernel[{k0!r}] {tuple(r['ref_param_kernel'][k0].shape)}"
          f"  ref_param_kernel_elementwise[{k0!r}] {tuple(r['ref_param_kernel_elementwise'][k0].shape)}"
          f"  ref_param_wd_classsum[{k0!r}] {tuple(r['ref_param_wd_classsum'][k0].shape)}")
    e_rep = rel(r["ref_change"], true)
    e_init = float((r["ref_initial"] - f0).abs().max())
    e_cl = float((r["ref_kernel_term"] + r["ref_wd_term"] - r["ref_change"]).abs().max())
    e_pk = float((sum(r["ref_param_kernel"].values()) - r["ref_kernel_term"]).abs().max())
    e_km = float((r["ref_kernel_matrix"].sum(-1) - r["ref_kernel_term"]).abs().max())
    e_wd = float((sum(r["ref_param_wd_classsum"].values()) - r["ref_wd_term"].sum(1)).abs().max())
    e_replay = replay(r)
    scale = float(true.abs().max())
    print(f"   replication: rel. L2 error of reference change vs true f(theta_N)-f(theta_0) = {e_rep:.3e}"
          f"  (max |true change| {scale:.3f}, max |wd term| {float(r['ref_wd_term'].abs().max()):.3f})")
    print(f"   f(theta_0) match {e_init:.1e} | kernel+wd-change {e_cl:.1e} | sum param kernels-kernel {e_pk:.1e}"
          f" | kernel-matrix rows-kernel {e_km:.1e} | param wd (class-summed) {e_wd:.1e}")
    print(f"   replay of theta with torch AdamW: max abs diff {e_replay:.1e}")
    print(f"   time: train {r['train_wall_s']:.2f}s, reference decomposition {r['decomp_wall_s']:.2f}s, call {wall:.2f}s;"
          f" decomposition peak RSS delta {r['decomp_peak_rss_delta_bytes'] / 2**20:.1f} MiB;"
          f" trajectory held {sum(r['trajectory_bytes'].values()) / 2**10:.0f} KiB")
    ok = (e_rep < tol_rel and e_init == 0.0 and max(e_cl, e_pk, e_km) < tol_closure * max(scale, 1.0)
          and e_replay < tol_replay)
    print("   OK" if ok else "   FAILED")
    return ok


if __name__ == "__main__":
    t = time.perf_counter()
    ok = check(torch.float64, steps=6, nodes=16, tol_rel=5e-2, tol_closure=1e-10, tol_replay=1e-12)
    ok &= check(torch.float32, steps=4, nodes=8, tol_rel=5e-2, tol_closure=1e-4, tol_replay=1e-5)
    print(f"\ntotal {time.perf_counter() - t:.1f}s")
    sys.exit(0 if ok else 1)
