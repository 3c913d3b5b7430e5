"""Minimal numeric demonstrations of defects in the reference (``explaind`` 0.1.0).

    python bench/reference/defects.py            # all sections, ~1 min (1 thread)
    python bench/reference/defects.py perm uneven   # only some: perm uneven mutable lr2 crash quad

Sections
- perm:    full batch + shuffle -> the per-example kernel matrix columns are scrambled
           (checked against an independent from-scratch computation of the same quantity).
- uneven:  mini-batches of unequal size (12/12/12/4) -> the prediction is badly wrong.
- mutable: AdamWOptimizerPath's default ``checkpoints=[]`` is one shared list -> a second
           run in the same process silently decomposes garbage.
- lr2:     the weight-decay matrix returned by ``predict`` (4th item) carries lr twice.
- crash:   the crashing calls (README constructors, default flags, p != 113, eps 1.0, float64).
           README_CALL=1 also runs the README's (working, slow) ExactPathKernelModel call.
- quad:    convergence of the reference's midpoint rule in the number of nodes Q.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import traceback

import numpy as np
import torch
from torch.func import functional_call, grad, jacrev, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapter import run_reference  # noqa: E402

from explaind.data_paths import DataPath  # noqa: E402
from explaind.epk_model import ExactPathKernelModel  # noqa: E402
from explaind.model_paths import ModelPath  # noqa: E402
from explaind.modulo_model.data import ClassificationDataset, ModulusDataGenerator  # noqa: E402
from explaind.modulo_model.loss import RegularizedCrossEntropyLoss  # noqa: E402
from explaind.modulo_model.model import SingleLayerTransformerClassifier  # noqa: E402
from explaind.optimizer_paths import AdamWOptimizerPath  # noqa: E402

torch.set_num_threads(1)  # tiny ops; 2 threads on shared cores spin and slow down 5-10x
_SINK = open(os.devnull, "w")  # noqa: SIM115


@contextlib.contextmanager
def mute():
    with contextlib.redirect_stdout(_SINK), contextlib.redirect_stderr(_SINK):
        yield


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


# ----------------------------------------------------------------------------- independent maths
def brute_force(r, nodes):
    """From-scratch per-example kernel matrix (n_test, C, n_train) and weight-decay term
    (n_test, C) of a full-batch AdamW run returned by run_reference (math.md, Step 3):
    I[t,c,k] = sum_s lr/B * phi_s[t,c] . D_s * sum_{i<=s} (1-b1) b1^(s-i) grad log p_{y_k}(theta_i; x_k)
    with phi_s the same Q-node midpoint average the reference uses. Column k = X_train[k]."""
    model = r["model_factory"]()
    hp = r["optimizer_hparams"]
    lr, (b1, b2), eps, wd = hp["lr"], hp["betas"], hp["eps"], hp["weight_decay"]
    theta, Xtr, ytr, Xte = r["theta"], r["X_train"], r["y_train"], r["X_test"]
    B = len(Xtr)
    names = [n for n in r["param_names"] if n in r["opt_state"][1]["exp_avg_sq"]]  # skips the unused pe

    def out(params, x):
        return functional_call(model, params, (x.unsqueeze(0),))[0]

    per_ex = vmap(grad(lambda prm, x, y: out(prm, x).gather(0, y.unsqueeze(0)).sum()), in_dims=(None, 0, 0))
    jac = vmap(jacrev(out), in_dims=(None, 0))
    M = {n: torch.zeros((B,) + theta[0][n].shape, dtype=theta[0][n].dtype) for n in names}
    C = out(theta[0], Xte[0]).shape[0]
    I = torch.zeros(len(Xte), C, B, dtype=theta[0][names[0]].dtype)
    W = torch.zeros(len(Xte), C, dtype=I.dtype)
    for s in range(len(r["batches"])):
        g = per_ex(theta[s], Xtr, ytr)
        v = r["opt_state"][s + 1]["exp_avg_sq"]
        phi = {n: 0.0 for n in names}
        for j in range(nodes):
            u = (j + 0.5) / nodes
            J = jac({n: theta[s][n] + u * (theta[s + 1][n] - theta[s][n]) for n in theta[s]}, Xte)
            phi = {n: phi[n] + J[n] / nodes for n in names}
        for n in names:
            M[n] = b1 * M[n] + (1 - b1) * g[n]
            D = 1.0 / ((1 - b1 ** (s + 1)) * (torch.sqrt(v[n] / (1 - b2 ** (s + 1))) + eps))
            I += lr / B * torch.einsum("tcp,kp->tck", phi[n].flatten(2), (D * M[n]).flatten(1))
            W += -lr * wd * torch.einsum("tcp,p->tc", phi[n].flatten(2), theta[s][n].flatten())
    return I, W


def sec_perm():
    print("\n[perm] full batch + shuffle=True: per-example columns of the kernel matrix")
    kw = dict(p=13, n_train=24, n_test=4, steps=6, seed=3, lr=1e-2, weight_decay=1.0,
              dtype=torch.float64, integral_nodes=10)
    a = run_reference(**kw)                          # stock
    b = run_reference(sort_full_batches=True, **kw)  # same trajectory, batch handed over index-sorted
    same = all(torch.equal(x[k], y[k]) for x, y in zip(a["theta"], b["theta"]) for k in x)
    print(f"  identical trajectories: {same}; batch order of step 0: {a['batches'][0][:8].tolist()} ...")
    Ib, Wb = brute_force(a, nodes=kw["integral_nodes"])
    Ka, Kb = a["ref_kernel_matrix"], b["ref_kernel_matrix"]
    print(f"  predictions stock vs sorted: max |diff| {float((a['ref_pred'] - b['ref_pred']).abs().max()):.1e}"
          f" (row sums are order-free)")
    print(f"  kernel matrix, rel. Frobenius error vs independent computation: stock {rel(Ka, Ib):.3f},"
          f" index-sorted batches {rel(Kb, Ib):.1e}")
    cs = float(torch.nn.functional.cosine_similarity(Ka.flatten(), Ib.flatten(), dim=0))
    print(f"  cosine(stock, truth) = {cs:.3f}; weight-decay term vs independent: {rel(a['ref_wd_term'], Wb):.1e};"
          f" kernel row sums vs independent: {rel(a['ref_kernel_term'], Ib.sum(-1)):.1e}")
    print("  cause: optimizer_paths.py:335-353 returns the momentum features for ALL examples in dataset order"
          " (the (1,N,P) buffer 'previous'), but epk_model.py:146-147 sees v.shape[-1] == len(ids) (true only"
          " when the batch is the whole set) and scatters them to kernel[..., ids], i.e. column j -> ids[j].")
    return rel(Ka, Ib) > 0.1 and rel(Kb, Ib) < 1e-8


# ----------------------------------------------------------------------------- stock tooling runs
def train_ref(p=13, n_train=40, n_test=6, epochs=3, bs=None, seed=0, lr=1e-2, wd=1.0, default_ckpts=False):
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)
    (tx, ty), (vx, vy), _ = ModulusDataGenerator(num_samples=n_train, val_num_samples=n_test, test_num_samples=0,
                                                 P=p).generate_data()
    loader = torch.utils.data.DataLoader(ClassificationDataset(tx, ty), batch_size=bs or n_train, shuffle=True)
    with mute():
        model = ModelPath(SingleLayerTransformerClassifier(p + 2, d_model=16, nhead=4, dim_mlp=32, dropout=0.0),
                          device="cpu", overwrite=True, output_dim=p + 2)
        okw = {} if default_ckpts else dict(checkpoints=[])
        opt = AdamWOptimizerPath(model, lr=lr, weight_decay=wd, betas=(0.9, 0.98), overwrite=True, device="cpu", **okw)
        dp = DataPath(loader, overwrite=True, full_batch=False)
        loss_fn = RegularizedCrossEntropyLoss(alpha=0.0)
        for _ in range(epochs):
            for batch in loader:
                x, y = dp.get_batch(batch)
                opt.zero_grad()
                loss, _ = loss_fn(model.forward(x), y, params=model.parameters(), output_reg=True)
                loss.backward()
                opt.step()
                model.log_checkpoint()
                opt.log_checkpoint()
    X = ClassificationDataset(vx, vy).data
    return model, opt, dp, X


def decompose(model, opt, dp, X, nodes=20, **kw):
    eps = 1.0 / (nodes + 0.5)
    args = dict(integral_eps=eps, early_integral_eps=eps, early_steps=0, device="cpu",
                keep_param_wise_kernel=True, param_wise_kernel_keep_out_dims=True, kernel_store_interval=10**12)
    args.update(kw)
    with mute():
        e = ExactPathKernelModel(model=model, optimizer=opt, loss_fn=RegularizedCrossEntropyLoss(alpha=0.0),
                                 data_path=dp, **args)
        cur, init, K, R, ev = e.predict(X, y_test=None, keep_kernel_matrices=True)
    fin = model.forward(X, step=len(model.checkpoints) - 1).detach()
    return cur, init, fin, R, ev


def sec_uneven():
    print("\n[uneven] mini-batches of unequal size, n_train=40, 3 epochs, 20 midpoint nodes, float32 (stock)")
    res = {}
    for bs in (40, 10, 12, 16):
        m, o, d, X = train_ref(bs=bs)
        cur, init, fin, _, _ = decompose(m, o, d, X)
        sizes = [len(c["indices"]) for c in d.checkpoints]
        res[bs] = rel(cur - init, fin - init)
        print(f"  batch_size={bs:2d} -> batch sizes {sizes[:5]}...: rel. error of predicted change {res[bs]:.2e}")
    print("  cause: epk_model.py:110 divides the kernel summed over the WHOLE momentum buffer (every example seen"
          " so far, each from its own batch) by len(ids) of the CURRENT batch; so does epk_model.py:287 for the"
          " param-wise kernel. Right only when every batch has the same size.")
    return res[12] > 0.1 and res[16] > 0.1 and res[10] < 1e-2


def sec_mutable():
    print("\n[mutable] AdamWOptimizerPath(..., checkpoints=[] default) twice in one process")
    m1, o1, d1, X1 = train_ref(default_ckpts=True, seed=0)
    n1 = len(o1.checkpoints)
    m2, o2, d2, X2 = train_ref(default_ckpts=True, seed=1)
    print(f"  run 1 optimizer history: {n1} entries; run 2: {len(o2.checkpoints)} entries;"
          f" same list object: {o1.checkpoints is o2.checkpoints}")
    cur, init, fin, _, _ = decompose(m2, o2, d2, X2)
    e_bad = rel(cur - init, fin - init)
    m3, o3, d3, X3 = train_ref(default_ckpts=False, seed=1)
    cur, init, fin, _, _ = decompose(m3, o3, d3, X3)
    e_ok = rel(cur - init, fin - init)
    print(f"  run 2 rel. error with the shared default: {e_bad:.2e}; same run with checkpoints=[] passed: {e_ok:.2e}")
    print("  cause: optimizer_paths.py:165 `checkpoints=[]` default is stored and appended to (:28, :198, :214);"
          " run 2 then reads run 1's exp_avg_sq at optimizer_paths.py:238-239.")
    return e_bad > 1.0 and e_ok < 1e-2


def sec_lr2():
    print("\n[lr2] the weight-decay matrix returned by predict() (4th item)")
    m, o, d, X = train_ref(epochs=4)
    cur, init, fin, R, ev = decompose(m, o, d, X)
    wd = torch.stack(ev["regularization_term"]).sum(0)
    print(f"  sum of per-step regularization_term (what enters the prediction): max |.| {float(wd.abs().max()):.3e}")
    print(f"  predict()[3]: max |.| {float(R.abs().max()):.3e}; predict()[3] / lr vs that sum: max diff"
          f" {float((R / o.get_learning_rate(1) - wd).abs().max()):.1e}")
    print("  cause: optimizer_paths.py:427 already returns -lr * reg, epk_model.py:133/164 multiply by lr again.")
    return float((R / o.get_learning_rate(1) - wd).abs().max()) < 1e-5


def sec_crash():
    print("\n[crash] calls that raise")

    def attempt(name, fn):
        try:
            with mute():
                fn()
            print(f"  OK     {name}")
            return False
        except Exception as e:  # noqa: BLE001
            tb = traceback.extract_tb(e.__traceback__)
            fr = next((f for f in reversed(tb) if "explaind" in f.filename), tb[-1])
            loc = fr.filename.split("site-packages/")[-1]
            print(f"  CRASH  {name}: {type(e).__name__}: {str(e)[:90]} @ {loc}:{fr.lineno}")
            return True

    import tempfile
    cwd = os.getcwd()
    tmp = tempfile.mkdtemp()
    os.chdir(tmp)
    try:
        attempt("SingleLayerTransformerClassifier()  (README)", lambda: SingleLayerTransformerClassifier())
        attempt('ModelPath(model, device=device, checkpoint_path="model_checkpoint.pt")  (README)',
                lambda: ModelPath(SingleLayerTransformerClassifier(115), device="cpu", checkpoint_path="model_checkpoint.pt"))
        attempt('ModelPath(model, checkpoint_path="ck/model.pt")  (file absent, overwrite=False)',
                lambda: ModelPath(SingleLayerTransformerClassifier(115), device="cpu", checkpoint_path="ck/model.pt"))
        attempt('AdamWOptimizerPath(model, checkpoint_path="optimizer_checkpoint.pt")  (README)',
                lambda: AdamWOptimizerPath(ModelPath(SingleLayerTransformerClassifier(115), device="cpu"),
                                           checkpoint_path="optimizer_checkpoint.pt", checkpoints=[]))
    finally:
        os.chdir(cwd)
    m, o, d, X = train_ref(epochs=5)
    X = X[:2]  # the default early_integral_eps=0.001 means 1000 nodes on steps 0-3: keep the probes cheap

    def epk(**kw):
        return ExactPathKernelModel(model=m, optimizer=o, loss_fn=RegularizedCrossEntropyLoss(alpha=0.0),
                                    data_path=d, device="cpu", **kw)
    attempt("ExactPathKernelModel(...) with default flags, predict(X)", lambda: epk().predict(X))
    if os.environ.get("README_CALL"):  # works; slow (1000 nodes on steps 0-3), so opt-in
        attempt("README's ExactPathKernelModel(...) call, predict(X, y_test, keep_kernel_matrices=True)",
            lambda: epk(integral_eps=0.01, evaluate_predictions=True, keep_param_wise_kernel=True,
                        param_wise_kernel_keep_out_dims=True).predict(X[:1], y_test=torch.zeros(1, dtype=torch.long),
                                                                      keep_kernel_matrices=True))
    attempt("integral_eps=1.0 (float)", lambda: epk(integral_eps=1.0, keep_param_wise_kernel=True).predict(X))
    attempt("integral_eps=1 (int), early_integral_eps=1", lambda: epk(integral_eps=1, early_integral_eps=1,
                                                                      keep_param_wise_kernel=True).predict(X))
    np.random.seed(0)
    torch.manual_seed(0)
    (tx, ty), (vx, vy), _ = ModulusDataGenerator(num_samples=20, val_num_samples=4, test_num_samples=0, P=13).generate_data()

    def fresh_loader():  # DataPath mutates dataset.targets in place, so every DataPath needs a fresh dataset
        return torch.utils.data.DataLoader(ClassificationDataset(tx, ty), batch_size=20)

    def train_and_predict(model, **path_kw):
        """The reference's own loop: one epoch of mini-batches, then its decomposition."""
        loader = fresh_loader()
        mp = ModelPath(model, device="cpu", overwrite=True, **path_kw)
        op = AdamWOptimizerPath(mp, checkpoints=[], device="cpu")
        dp = DataPath(loader, full_batch=False, overwrite=True)
        for batch in loader:
            x, y = dp.get_batch(batch)
            op.zero_grad()
            torch.nn.functional.nll_loss(mp.forward(x), y).backward()
            op.step()
            mp.log_checkpoint()
            op.log_checkpoint()
        ExactPathKernelModel(model=mp, optimizer=op, loss_fn=RegularizedCrossEntropyLoss(alpha=0.0), data_path=dp,
                             device="cpu", keep_param_wise_kernel=True).predict(ClassificationDataset(vx, vy).data)

    attempt("p=13 with ModelPath's default output_dim=115",
            lambda: train_and_predict(SingleLayerTransformerClassifier(15, d_model=16, dim_mlp=32)))
    attempt("float64 model (stock ModelPath)",
            lambda: train_and_predict(SingleLayerTransformerClassifier(15, d_model=16, dim_mlp=32).double(),
                                      output_dim=15))

    def datapath_twice():
        loader = fresh_loader()
        DataPath(loader, full_batch=False, overwrite=True)
        DataPath(loader, full_batch=False, overwrite=True)
    attempt("a second DataPath over the same dataset", datapath_twice)

    def out_dims_false():
        ExactPathKernelModel(model=m, optimizer=o, loss_fn=RegularizedCrossEntropyLoss(alpha=0.0), data_path=d,
                             device="cpu", keep_param_wise_kernel=True, early_integral_eps=0.1
                             ).predict(X, y_test=torch.zeros(len(X), dtype=torch.long))
    attempt("keep_param_wise_kernel=True, param_wise_kernel_keep_out_dims=False (default), y_test given", out_dims_false)
    return True


def sec_quad():
    print("\n[quad] midpoint rule: rel. error of the predicted change vs Q (float64, 6 full-batch steps, lr 1e-2)")
    errs = {}
    for q in (5, 10, 20, 40):
        r = run_reference(p=13, n_train=24, n_test=3, steps=6, seed=1, lr=1e-2, weight_decay=1.0,
                          dtype=torch.float64, integral_nodes=q, keep_kernel_matrix=False)
        m0 = r["model_factory"]()
        m0.load_state_dict(r["theta"][0])
        with torch.no_grad():
            true = r["model"](r["X_test"]) - m0(r["X_test"])
        errs[q] = rel(r["ref_change"], true)
        print(f"  Q={q:3d}: {errs[q]:.3e}   (decomposition {r['decomp_wall_s']:.1f}s)")
    qs = sorted(errs)
    orders = [np.log(errs[a] / errs[b]) / np.log(b / a) for a, b in zip(qs, qs[1:])]
    print("  observed order between successive Q: " + ", ".join(f"{o:.2f}" for o in orders))
    return True


SECTIONS = dict(perm=sec_perm, uneven=sec_uneven, mutable=sec_mutable, lr2=sec_lr2, crash=sec_crash, quad=sec_quad)

if __name__ == "__main__":
    chosen = sys.argv[1:] or list(SECTIONS)
    results = {k: SECTIONS[k]() for k in chosen}
    print("\nconfirmed:", {k: bool(v) for k, v in results.items()})
