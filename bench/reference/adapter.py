"""Adapter around the official ExPLAIND reference implementation (PyPI ``explaind`` 0.1.0).

One public function, :func:`run_reference`, that

1. builds the reference's own modular-addition data (``ModulusDataGenerator`` +
   ``ClassificationDataset``) and model (``SingleLayerTransformerClassifier``),
2. trains it the way the paper's script ``experiments/train_models/modulo_model.py`` does:
   full-batch AdamW through the reference wrappers ``ModelPath`` / ``AdamWOptimizerPath`` /
   ``DataPath`` (``DataLoader(batch_size=n_train, shuffle=True)``, one step per epoch,
   ``RegularizedCrossEntropyLoss(alpha=0)`` == mean NLL of the log-softmax output),
3. runs the reference decomposition ``ExactPathKernelModel.predict`` on the held-out split
   (the script's "val" split; it is called ``X_test`` here) and
4. returns the trajectory plus the reference's outputs in a plain dict.

Install (see NOTES.md)::

    pip install --no-deps --ignore-requires-python explaind==0.1.0
    pip install --no-deps tqdm          # the only extra module the used code path imports

Nothing from the reference is modified, with ONE exception that is only active when
``dtype=torch.float64``: the reference's ``ModelPath._grad_feature_map`` keeps only the
parameters whose dtype is ``torch.float`` (float32; explaind/model_paths.py:263), so a
float64 model yields empty feature dicts and crashes at explaind/optimizer_paths.py:345.
For float64 the adapter uses a subclass whose ``_grad_feature_map`` is a verbatim copy
with that one filter widened to any floating dtype, and runs ``predict`` under
``torch.set_default_dtype(torch.float64)`` so the reference's internal ``torch.zeros``
accumulators (epk_model.py:142,162,304) are float64 too. ``dtype=torch.float32`` runs the
reference completely unmodified. The result says which (``reference_patched``).

Two workarounds for reference defects are applied in the *calls* (not the code):
``ModelPath(..., output_dim=p + 2)`` (the default 115 crashes for p != 113) and
``AdamWOptimizerPath(..., checkpoints=[])`` (the default is a shared mutable list, so a
second run in the same process silently reuses the first run's optimizer history).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import time
from typing import Any

import numpy as np
import torch

from explaind.data_paths import DataPath
from explaind.epk_model import ExactPathKernelModel
from explaind.model_paths import ModelPath
from explaind.modulo_model.data import ClassificationDataset, ModulusDataGenerator
from explaind.modulo_model.loss import RegularizedCrossEntropyLoss
from explaind.modulo_model.model import SingleLayerTransformerClassifier
from explaind.optimizer_paths import AdamWOptimizerPath

__all__ = ["run_reference", "build_model"]


def build_model(p: int, d_model: int, n_heads: int, d_mlp: int, dtype: torch.dtype) -> torch.nn.Module:
    """The reference's modular-addition model, untrained (uses the global torch RNG).

    NB: the reference class always builds FOUR heads (head1..head4); ``nhead`` only sets the
    head width ``d_model // nhead``. It also owns an unused parameter
    ``positional_encoding.pe`` (the call is commented out in ``forward``): it never gets a
    gradient, so AdamW never touches it (no step, no decay).
    """
    m = SingleLayerTransformerClassifier(p + 2, d_model=d_model, nhead=n_heads, dim_mlp=d_mlp, dropout=0.0)
    return m.to(dtype)


class _ModelPathAnyFloat(ModelPath):
    """float64 support ONLY. Verbatim copy of ``ModelPath._grad_feature_map``
    (explaind/model_paths.py:255-315, commented-out code dropped) with the single change
    ``v.dtype == torch.float`` -> ``v.is_floating_point()``."""

    def _grad_feature_map(self, X, target_mask):
        self.model.zero_grad()
        params = {}
        for k, v in self.model.state_dict().items():
            if v.is_floating_point() and not k.endswith(r"running_mean") and not k.endswith(r"running_var"):
                params[k] = v
        if len(target_mask.shape) == 2:
            grads = torch.func.vmap(self._grads_out, in_dims=(None, None, 0, 0), out_dims=0)(
                self.model, params, X.to(self.device), target_mask)
            grads = {name: g.unsqueeze(0) for name, g in grads.items()}
        elif len(target_mask.shape) == 3:
            if X.shape[0] == target_mask.shape[0] and len(X.shape) > 1:
                X = torch.stack([X for _ in range(target_mask.shape[1])], dim=1)
                grads = torch.vmap(torch.func.vmap(self._grads_out, in_dims=(None, None, 0, 0), out_dims=0),
                                   in_dims=(None, None, 0, 0), out_dims=0)(
                    self.model, params, X.to(self.device), target_mask)
        else:
            raise ValueError("target_mask must be 2D or 3D tensor.")
        grads = {name: g.detach() for name, g in grads.items()}
        if self.features_to_cpu:
            grads = {name: g.cpu() for name, g in grads.items()}
        return grads


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: writing 5 resets VmHWM (peak RSS) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def run_reference(
    p: int = 13,
    n_train: int = 40,
    n_test: int = 10,
    steps: int = 20,
    seed: int = 0,
    d_model: int = 16,
    n_heads: int = 4,
    d_mlp: int = 32,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-8,
    weight_decay: float = 1.0,
    dtype: torch.dtype = torch.float64,
    integral_nodes: int = 100,
    shuffle: bool = True,
    sort_full_batches: bool = False,
    keep_kernel_matrix: bool = True,
    num_threads: int | None = 1,  # tiny ops: 1 thread is as fast, and robust on shared cores
    quiet: bool = True,
) -> dict[str, Any]:
    """Train the reference modular-addition model with the reference tooling and decompose it.

    Parameters mirror the paper's script (full batch, AdamW, constant lr, dropout 0,
    scale_weights 1). ``steps`` = number of optimizer steps (= epochs, full batch).
    ``integral_nodes`` = midpoint-rule nodes per step (the reference's ``integral_eps`` is
    set to ``1/(integral_nodes+0.5)`` so ``int(1/eps) == integral_nodes`` exactly and the
    ``range(..., float)`` crash for eps == 1.0 cannot happen; ``early_steps=0`` so every step
    gets the same rule). ``sort_full_batches=True`` hands the decomposition each full batch
    re-ordered by dataset index (same trajectory, same maths) which works around the
    permuted-columns defect of the per-example kernel matrix; the default keeps the stock
    behaviour. ``dtype=torch.float64`` enables the one documented patch (module docstring).

    Returns a dict, see NOTES.md ("adapter outputs") for every key; the main ones:

    - ``theta``: list of N+1 state dicts, ``theta[s]`` = parameters before step s
      (``theta[0]`` initial, ``theta[N]`` final); keys are the inner model's names.
    - ``batches``: list of N LongTensors, indices into the training split
      (``X_train``/``y_train`` order) in the order the loader delivered them.
    - ``ref_pred`` (n_test, C): the reference's prediction of the final log-probs
      ``f(theta_N)``; ``ref_change`` = ``ref_pred - ref_initial`` (C = p + 2 classes).
    - ``ref_kernel_term`` / ``ref_wd_term`` (n_test, C): the kernel and weight-decay parts
      of ``ref_change`` (``ref_change == ref_kernel_term + ref_wd_term`` up to rounding).
    - ``ref_param_kernel`` {name: (n_test, C)}: kernel part summed per parameter tensor;
      ``ref_param_kernel_elementwise`` {name: (n_test, C, numel)}.
    - ``ref_param_wd_classsum`` {name: (n_test,)}: weight-decay part per tensor, SUMMED
      OVER CLASSES (the reference keeps nothing finer).
    - ``ref_kernel_matrix`` (n_test, C, n_train) or None: per-training-example kernel part;
      columns are scrambled when ``ref_kernel_matrix_columns_valid`` is False.
    - ``decomp_wall_s``, ``decomp_peak_rss_delta_bytes``: cost of ``predict`` alone.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    n_pairs = p * (p + 1) // 2
    if n_train + n_test > n_pairs:
        raise ValueError(f"n_train + n_test must be <= {n_pairs} pairs for p={p}")
    if d_model % n_heads:
        raise ValueError("d_model must be divisible by n_heads")
    if integral_nodes < 1:
        raise ValueError("integral_nodes must be >= 1")
    device = "cpu"  # the reference's module-level default would pick CUDA when present

    # ---- data (reference generator; its 'val' split is our test split, as in the paper script)
    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)
    gen = ModulusDataGenerator(num_samples=n_train, val_num_samples=n_test, test_num_samples=0, P=p)
    (tr_x, tr_y), (va_x, va_y), _ = gen.generate_data()
    train_ds = ClassificationDataset(tr_x, tr_y)
    test_ds = ClassificationDataset(va_x, va_y)
    X_train = train_ds.data.clone().long()
    y_train = torch.as_tensor(np.asarray(tr_y), dtype=torch.long).clone()
    X_test = test_ds.data.clone().long()
    y_test = torch.as_tensor(np.asarray(va_y), dtype=torch.long).clone()
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=n_train, shuffle=shuffle)

    # ---- model / optimizer / data wrappers (reference tooling)
    model_factory = functools.partial(build_model, p, d_model, n_heads, d_mlp, dtype)
    config = dict(p=p, n_token=p + 2, d_model=d_model, nhead=n_heads, n_heads_actual=4,
                  head_dim=d_model // n_heads, dim_mlp=d_mlp, dropout=0.0, dtype=str(dtype),
                  cls="explaind.modulo_model.model.SingleLayerTransformerClassifier")
    torch.manual_seed(seed)
    inner = model_factory()
    mp_cls = _ModelPathAnyFloat if dtype != torch.float32 else ModelPath
    model = mp_cls(inner, device=device, checkpoint_path=None, overwrite=True, output_dim=p + 2)
    optimizer = AdamWOptimizerPath(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                   checkpoints=[], checkpoint_path=None, overwrite=True, device=device)
    data_path = DataPath(train_loader, checkpoint_path=None, full_batch=False, overwrite=True)
    sink = open(os.devnull, "w")  # noqa: SIM115 - closed at the end
    loss_fct = _quiet_call(RegularizedCrossEntropyLoss, sink, alpha=0.0, p=2, device=device)  # it prints
    mute = (lambda: contextlib.ExitStack()) if not quiet else (lambda: _Redirect(sink))

    t0 = time.perf_counter()
    with mute():
        for _ in range(steps):  # one full batch per epoch
            for batch in train_loader:
                x, y = data_path.get_batch(batch)
                optimizer.zero_grad()
                out = model.forward(x)
                # as the paper script: with output_reg=True and alpha=0 the loss is the plain mean
                # NLL; without it the loss is `nll + 0*sum(norms)`, which gives the unused
                # positional_encoding.pe a zero gradient and so lets AdamW decay it.
                loss, _reg = loss_fct(out, y, params=model.parameters(), output_reg=True)
                loss.backward()
                optimizer.step()
                model.log_checkpoint()
                optimizer.log_checkpoint()
    train_wall_s = time.perf_counter() - t0

    theta = [{k: v.clone() for k, v in sd.items()} for sd in model.checkpoints]
    # optimizer history: opt_state[s] = AdamW state AFTER s steps (opt_state[0] = zeros); the
    # reference keys it "model.<name>" and has no entry for the never-updated positional_encoding.pe
    opt_state = [{key: {k[len("model."):]: v.clone() for k, v in c[key].items()} for key in ("exp_avg", "exp_avg_sq")}
                 for c in optimizer.checkpoints]
    batches = [c["indices"].clone().long() for c in data_path.checkpoints]
    assert len(theta) == steps + 1 and len(batches) == steps
    for c, idx in zip(data_path.checkpoints, batches):  # the logged batch is X_train[idx]
        assert torch.equal(c["X"].long(), X_train[idx]) and torch.equal(c["y"], y_train[idx])

    # ---- decomposition (reference)
    full_batch = all(len(b) == n_train for b in batches)
    if sort_full_batches and full_batch:
        for c in data_path.checkpoints:
            o = torch.argsort(c["indices"])
            c["X"], c["y"], c["indices"] = c["X"][o], c["y"][o], c["indices"][o]
    integral_eps = 1.0 / (integral_nodes + 0.5)
    epk = ExactPathKernelModel(
        model=model, optimizer=optimizer, loss_fn=RegularizedCrossEntropyLoss(alpha=0.0) if not quiet
        else _quiet_call(RegularizedCrossEntropyLoss, sink, alpha=0.0),
        data_path=data_path, integral_eps=integral_eps, early_integral_eps=integral_eps, early_steps=0,
        train_set_size=n_train, features_to_cpu=False, device=device, evaluate_predictions=True,
        keep_param_wise_kernel=True, param_wise_kernel_keep_out_dims=True,
        kernel_store_interval=10**12,  # only step 0 is ever "stored"; nothing is reset
        grad_scaling=1.0)
    plan = epk.get_integral_steps(integral_eps, early_eps=integral_eps, early_steps=0)
    assert [s for s, _ in plan] == list(range(steps)), plan
    assert all(len(nodes) == integral_nodes for _, nodes in plan)

    prev_default = torch.get_default_dtype()
    rss0 = _vm_kib("VmRSS")
    peak_ok = _reset_peak_rss()
    t0 = time.perf_counter()
    try:
        if dtype == torch.float64:
            torch.set_default_dtype(torch.float64)
        with mute():
            # y_test=None: otherwise the param kernel is summed over classes and reset at step 0
            cur, init, K, R, ev = epk.predict(X_test, y_test=None, is_train=False,
                                              keep_kernel_matrices=keep_kernel_matrix)
    finally:
        torch.set_default_dtype(prev_default)
    decomp_wall_s = time.perf_counter() - t0
    peak_rss_delta = (_vm_kib("VmHWM") - rss0) * 1024 if peak_ok else None

    # ---- collect outputs
    model.model.load_state_dict(model.checkpoints[-1])  # predict() leaves theta_N loaded, be explicit
    ref_pred = cur.detach().clone()
    ref_initial = init.detach().clone()
    ref_wd_term = torch.stack([r for r in ev["regularization_term"]]).sum(0)
    ref_kernel_term = torch.stack([ps - r for ps, r in zip(ev["predicted_step"], ev["regularization_term"])]).sum(0)
    names = list(ev["param_kernel"].keys())
    ref_param_kernel = {k: ev["param_kernel"][k].sum(-1)[:, :, 0].detach().clone() for k in names}
    ref_param_kernel_el = {k: ev["param_kernel"][k][:, :, 0, :].detach().clone() for k in names}
    # param_reg_term: (n_test, numel), classes summed, NOT scaled by -lr; step 0 is stored and reset
    wd_acc = {k: ev["param_reg_kernel_step_0"][k].clone() for k in names}
    if ev.get("param_reg_term") is not None:
        for k in names:
            wd_acc[k] = wd_acc[k] + ev["param_reg_term"][k]
    lr_ref = optimizer.get_learning_rate(1)
    ref_param_wd_classsum = {k: (-lr_ref * v.sum(-1)).detach().clone() for k, v in wd_acc.items()}
    ref_kernel_matrix = None
    if keep_kernel_matrix and K is not None:
        # K[name]: (n_test, 1, C, n_train), sum_s lr * step_kernel, the 1/B is missing (epk_model.py:147)
        ref_kernel_matrix = sum(v[:, 0] for v in K.values()) / n_train if full_batch else None
    ref_kernel_matrix_columns_valid = bool(full_batch and (not shuffle or sort_full_batches))

    sink.close()
    traj_bytes = dict(model_checkpoints=_nbytes(model.checkpoints),
                      optimizer_checkpoints=_nbytes(optimizer.checkpoints),
                      data_checkpoints=_nbytes(data_path.checkpoints))
    P = sum(v.numel() for v in theta[0].values())
    el = torch.empty((), dtype=dtype).element_size()
    return dict(
        model=model.model, model_factory=model_factory, config=config,
        X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test,
        theta=theta, param_names=list(theta[0].keys()),
        opt_state=opt_state, batches=batches, shuffle=shuffle, full_batch=full_batch,
        optimizer="torch.optim.AdamW",
        optimizer_hparams={k: v for k, v in optimizer.optimizer.param_groups[0].items() if k != "params"},
        loss="mean NLL of log_softmax output (RegularizedCrossEntropyLoss(alpha=0)), batch weight 1/B",
        target="log_softmax outputs of all C=p+2 classes at the last position",
        integral_nodes=integral_nodes, integral_rule="midpoint, nodes (j+0.5)/Q, j=0..Q-1",
        ref_initial=ref_initial, ref_pred=ref_pred, ref_change=ref_pred - ref_initial,
        ref_kernel_term=ref_kernel_term, ref_wd_term=ref_wd_term,
        ref_overall_reg_term_raw=R.detach().clone() if R is not None else None,
        ref_param_kernel=ref_param_kernel, ref_param_kernel_elementwise=ref_param_kernel_el,
        ref_param_wd_classsum=ref_param_wd_classsum,
        ref_kernel_matrix=ref_kernel_matrix, ref_kernel_matrix_columns_valid=ref_kernel_matrix_columns_valid,
        ref_step_ground_truth=torch.stack(ev["ground_truth_step"]),
        ref_step_predicted=torch.stack(ev["predicted_step"]),
        reference_patched=(dtype != torch.float32), dtype=dtype,
        train_wall_s=train_wall_s, decomp_wall_s=decomp_wall_s,
        decomp_peak_rss_delta_bytes=peak_rss_delta,
        memory_method="peak RSS of the process during predict() (/proc/self/status VmHWM after "
                      "resetting it via /proc/self/clear_refs) minus VmRSS just before; "
                      "tracemalloc would not see torch's CPU allocator",
        trajectory_bytes=traj_bytes,
        momentum_buffer_bytes=n_train * P * el,  # reference 'previous' buffer (1, N, P) per tensor
        n_params=P,
    )


class _Redirect:
    """Silence the reference's prints (it prints whole tensors every step) and tqdm."""

    def __init__(self, sink):
        self.sink = sink
        self.stack = contextlib.ExitStack()

    def __enter__(self):
        self.stack.enter_context(contextlib.redirect_stdout(self.sink))
        self.stack.enter_context(contextlib.redirect_stderr(self.sink))
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def _quiet_call(fn, sink, *a, **k):
    with contextlib.redirect_stdout(sink):
        return fn(*a, **k)
