"""Recording: store round-trip, refusals, record-time verification, crash safety, replay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
import zarr

import explaind_ql as eq
from explaind_ql.engine.kernels import Engine, Request
from explaind_ql.engine.targets import TargetSpec
from explaind_ql.errors import RecordingError, StoreError, VerificationError
from explaind_ql.models import MLP
from explaind_ql.recorder import default_checkpoint_every

FACTORY = dict(factory="explaind_ql.models:MLP", factory_kwargs={"sizes": [4, 6, 3]})


def data(n=12, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return MLP([4, 6, 3]).to(dtype)


def train_steps(rec, model, opt, x, y, steps, batch=4, clip=None, sched=None):
    for s in range(steps):
        idx = torch.arange(s * batch, s * batch + batch) % len(x)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        if clip:
            rec.clip_grad_norm_(clip)
        opt.step()
        if sched:
            sched.step()
        rec.step(idx, loss=loss)


def test_round_trip(tmp_path):
    x, y = data()
    xv, yv = data(5, seed=1)
    model = mlp()
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    with eq.Recorder(tmp_path / "r.zarr", model, opt, train=(x, y), test=(xv, yv), val=(xv[:3], yv[:3]),
                     checkpoint_every=None, chunk_steps=4, **FACTORY) as rec:
        train_steps(rec, model, opt, x, y, 7, clip=0.3, sched=sched)
    run = eq.open(tmp_path / "r.zarr")
    assert run.n_steps == 7 and run.dense and run.closed
    assert run.splits == ["train", "test", "val"] and run.split_size("val") == 3
    assert torch.equal(run.split("train")[0], x) and torch.equal(run.split("val")[1], yv[:3])
    assert torch.equal(run.stored_state(0)[0], theta0)
    final = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(run.stored_state(len(run.ckpt_states) - 1)[0], final)
    assert list(run.ckpt_states) == list(range(8))
    lrs = [run.step_meta(s).lr[0] for s in range(7)]
    assert lrs == [1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3, 1.25e-3]  # read before the scheduler stepped
    assert torch.equal(run.step_meta(3).batch, torch.arange(12, 16) % 12)
    assert all(0 < run.step_meta(s).clip <= 1 for s in range(7))
    assert run.step_meta(0).weight == pytest.approx(0.25)
    info = run.info()
    assert info["layers"] == {"net": 51, "net.0": 30, "net.2": 21}
    assert info["optimizer"]["class"] == "AdamW" and info["bytes_on_disk"] > 0
    attrs = run.attrs
    assert attrs["explaind_format"] == 2 and attrs["torch_version"] == torch.__version__
    assert attrs["loss"] == {"name": "cross_entropy", "reduction": "mean"}
    assert attrs["factory"] == "explaind_ql.models:MLP"
    assert "7 steps" in repr(run)


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_either_scheduler_order_records_the_lr_each_update_used(tmp_path, scheduler_first):
    """scheduler.step() before or after rec.step(): the stored lr is the one optimizer.step() used."""
    x, y = data()
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    used = []
    with eq.Recorder(tmp_path / "r.zarr", model, opt, train=(x, y), test=(x[:3], y[:3]), checkpoint_every=None,
                     **FACTORY) as rec:
        for s in range(7):
            idx = torch.arange(s * 4, s * 4 + 4) % len(x)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            if scheduler_first:
                sched.step()
                rec.step(idx, loss=loss)
            else:
                rec.step(idx, loss=loss)
                sched.step()
    run = eq.open(tmp_path / "r.zarr")
    assert [run.step_meta(s).lr[0] for s in range(7)] == used == [1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3, 2.5e-3, 1.25e-3]
    assert run.query("check on test[*]")["relative_residual"].max() < 1e-6  # the default tolerance


def test_a_run_without_decay_has_no_weight_decay_rows(tmp_path):
    """Terms that are exactly zero throughout (no decay, no carried momentum) are left out of frames."""
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with eq.Recorder(tmp_path / "r.zarr", model, opt, train=(x, y), test=(x[:3], y[:3]), checkpoint_every=None,
                     **FACTORY) as rec:
        train_steps(rec, model, opt, x, y, 4)
    run = eq.open(tmp_path / "r.zarr")
    whole = run.query("influence on test[*] by test, layer")
    assert set(whole["term"]) == {"gradient"}
    later = run.query("influence on test[*] over steps 2:4 by test, layer")
    assert set(later["term"]) == {"gradient", "momentum"}  # momentum carried in from steps 0:2
    check = run.query("check on test[*] over steps 2:4").sort("test")
    total = later.group_by("test").agg(pl.col("influence").sum()).sort("test")
    assert np.allclose(total["influence"].to_numpy(), check["explained"].to_numpy(), rtol=1e-9, atol=1e-12)


def test_dense_states_are_chunked_small_and_read_back_exactly(tmp_path, monkeypatch):
    """A chunk holds at most STATE_CHUNK_BYTES of states (reading θ_0 decodes little); rows still flush whole."""
    from explaind_ql.store import zarr_store as store
    x, y = data()
    model = mlp()
    n = sum(p.numel() for p in model.parameters())
    itemsize = next(model.parameters()).element_size()
    monkeypatch.setattr(store, "STATE_CHUNK_BYTES", 3 * n * itemsize)  # 3 states per chunk
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    states = []
    with eq.Recorder(tmp_path / "r.zarr", model, opt, train=(x, y), checkpoint_every=None, chunk_steps=8,
                     **FACTORY) as rec:
        states.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
        for _ in range(10):
            train_steps(rec, model, opt, x, y, 1)
            states.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
    theta = zarr.open_group(str(tmp_path / "r.zarr"), mode="r")["theta"]
    assert theta.chunks[0] == 3 and theta.shape == (11, n)
    run = eq.open(tmp_path / "r.zarr")
    block = run.stored_states(2, 9)  # across chunk boundaries
    for k, (th, _) in enumerate(block):
        assert torch.equal(th, states[2 + k]) and torch.equal(run.stored_state(2 + k)[0], states[2 + k])


def test_checkpointed_store_and_replay_equal_dense(tmp_path):
    """Replay from checkpoints recreates the dense recording of the same run."""
    paths = {}
    for mode, every in (("dense", None), ("ckpt", 3), ("every", 1)):
        x, y = data()
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
        with eq.Recorder(tmp_path / f"{mode}.zarr", model, opt, train=(x, y), test=(x[:3], y[:3]),
                         checkpoint_every=every, **FACTORY) as rec:
            train_steps(rec, model, opt, x, y, 10, clip=0.5)
        paths[mode] = tmp_path / f"{mode}.zarr"
    dense, ckpt = eq.open(paths["dense"]), eq.open(paths["ckpt"])
    assert list(ckpt.ckpt_states) == [0, 3, 6, 9, 10]
    assert ckpt.bytes_on_disk < dense.bytes_on_disk
    e_d, e_c = Engine(dense), Engine(ckpt)
    for rd, rc in zip(e_d.traj.walk(0, 10), e_c.traj.walk(0, 10)):
        assert torch.allclose(rc.theta, rd.theta, rtol=0, atol=1e-14)
        assert torch.allclose(rc.state_before.momentum, rd.state_before.momentum, rtol=0, atol=1e-14)
    assert e_c.traj.replayed_steps > 0
    drift = ckpt.cache.drift
    assert set(drift) == {3, 6, 9, 10} and max(d.rel_error for d in drift.values()) < 1e-12
    # a checkpoint at every step stores every state: nothing to replay, so no replay to check either
    every = eq.open(paths["every"])
    e_e = Engine(every)
    assert every.dense and sum(1 for _ in e_e.traj.walk(0, 10)) == 10 and e_e.traj.replayed_steps == 0


def test_default_checkpointing_depends_on_size():
    assert default_checkpoint_every(1000, 4, 2) is None
    assert default_checkpoint_every(100_000, 4, 2) == 100


# -- refusals: one line naming the setting ---------------------------------------------------------

def _rec(tmp_path, model=None, opt=None, **kw):
    model = model or mlp()
    opt = opt or torch.optim.AdamW(model.parameters())
    x, y = data()
    return eq.Recorder(tmp_path / "r.zarr", model, opt, train=(x, y), **{**FACTORY, **kw})


@pytest.mark.parametrize("make_opt,needle", [
    (lambda ps: torch.optim.AdamW(ps, amsgrad=True), "amsgrad=True"),
    (lambda ps: torch.optim.Adam(ps, maximize=True), "maximize=True"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, maximize=True), "maximize=True"),
    (lambda ps: torch.optim.RMSprop(ps), "optimizer class RMSprop"),
    (lambda ps: torch.optim.Adagrad(ps), "optimizer class Adagrad"),
])
def test_refuses_unsupported_optimizers(tmp_path, make_opt, needle):
    model = mlp()
    with pytest.raises(RecordingError, match=needle) as exc:
        _rec(tmp_path, model, make_opt(model.parameters()))
    assert "\n" not in str(exc.value) and "unsupported optimizer setting" in str(exc.value)


@pytest.mark.parametrize("kw,needle", [
    ({"factory": "__main__:build"}, "__main__"),
    ({"factory": "no_such_module_xyz:build"}, "cannot import factory"),
    ({"factory": "explaind_ql.models:MLP", "factory_kwargs": {"sizes": [4, 7, 3]}}, "parameters differ"),
    ({"factory_kwargs": {"sizes": [4, 6, 3], "bad": object()}}, "JSON"),
    ({"loss": "hinge"}, "unknown loss 'hinge'"),
    ({"reduction": "none"}, "unsupported loss reduction"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
])
def test_refuses_bad_setup(tmp_path, kw, needle):
    with pytest.raises(RecordingError, match=needle):
        _rec(tmp_path, **kw)


def test_refuses_batchnorm(tmp_path):
    x, y = data()
    bn = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).double()
    with pytest.raises(RecordingError, match="BatchNorm1d"):
        eq.Recorder(tmp_path / "a.zarr", bn, torch.optim.SGD(bn.parameters(), lr=0.1), train=(x, y))



def test_a_model_without_an_importable_class_is_given_at_analysis_time(tmp_path):
    """A class defined in a function (or __main__) cannot be rebuilt from the store: the store keeps only the
    weights, the query names the architecture, and one whose params do not fit is refused by name."""
    x, y = data()

    class Local(torch.nn.Module):
        def __init__(self, width=3):
            super().__init__()
            self.lin = torch.nn.Linear(4, width)

        def forward(self, x):
            return self.lin(x)
    m = Local().double()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with eq.Recorder(tmp_path / "c.zarr", m, opt, train=(x, y), test=(x, y)) as rec:
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
            rec.step(torch.arange(len(x)))
    with pytest.raises(StoreError, match=r"without a model factory.*open\(path, model="):
        eq.open(tmp_path / "c.zarr").query("check on test[0..3]")
    with pytest.raises(StoreError, match=r"param 'lin.weight' of shape \(5, 4\).*recorded \(3, 4\).*recorded with"):
        eq.open(tmp_path / "c.zarr", model=Local(width=5)).query("check on test[0..3]")
    given = Local()
    before = given.lin.weight.clone()
    df = eq.open(tmp_path / "c.zarr", model=given).query("check on test[0..3]")
    assert float(df["relative_residual"].abs().max()) < 1e-9
    assert torch.equal(given.lin.weight, before) and given.lin.weight.dtype == torch.float32  # the user's model untouched


def test_refuses_sparse_gradients(tmp_path):
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    rec = eq.Recorder(tmp_path / "s.zarr", emb, opt, train=(torch.arange(5), torch.randn(5, 3)), loss="mse",
                      factory="torch.nn:Embedding", factory_kwargs={"num_embeddings": 5, "embedding_dim": 3, "sparse": True})
    F.mse_loss(emb(torch.arange(5)), torch.zeros(5, 3)).backward()
    opt.step()
    with pytest.raises(RecordingError, match="sparse gradient"):
        rec.step(torch.arange(5))


def test_existing_path_and_bad_batches(tmp_path):
    rec = _rec(tmp_path)
    with pytest.raises(RecordingError, match=r"0\.\.11"):
        rec.step([3, 40])
    with pytest.raises(StoreError, match="a Recorder in this process still records there"):
        _rec(tmp_path, overwrite=True)
    rec.close()
    with pytest.raises(StoreError, match="already exists"):
        _rec(tmp_path)


# -- record-time verification ----------------------------------------------------------------------

def test_verification_catches_unrecorded_clip(tmp_path):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = _rec(tmp_path, model, opt)
    x, y = data()
    F.cross_entropy(model(x[:4]), y[:4]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # not through the recorder
    opt.step()
    with pytest.raises(VerificationError, match=r"step 0: gradients of 'net.0.weight' were rescaled by .* "
                                                r"rec.clip_grad_norm_"):
        rec.step(torch.arange(4))


def test_verification_catches_changed_hyperparameter(tmp_path):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = _rec(tmp_path, model, opt)
    x, y = data()
    train_steps(rec, model, opt, x, y, 2)
    opt.param_groups[0]["betas"] = (0.5, 0.999)
    with pytest.raises(VerificationError, match="step 2: beta1 of param group 0 changed from 0.9 to 0.5"):
        train_steps(rec, model, opt, x, y, 1)


def test_verification_catches_wrong_update(tmp_path):
    """An update the model cannot produce (a manual nudge) names step, param and error size."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = _rec(tmp_path, model, opt)
    x, y = data()
    F.cross_entropy(model(x[:4]), y[:4]).backward()
    opt.step()
    with torch.no_grad():
        model.net[2].bias.add_(0.01)
    with pytest.raises(VerificationError, match=r"step 0: the SGD model does not reproduce the update of "
                                                r"'net.2.bias' \(max error 0.01"):
        rec.step(torch.arange(4))


def test_verification_catches_wrong_loss_or_batch(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = _rec(tmp_path, model, opt)  # recorder is told: cross_entropy, mean
    x, y = data()
    F.cross_entropy(model(x[:4]), y[:4], reduction="sum").backward()
    opt.step()
    with pytest.raises(VerificationError, match="gradient rebuilt from the recorded batch"):
        rec.step(torch.arange(4))


def test_missing_gradient_is_named(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = _rec(tmp_path, model, opt)
    x, y = data()
    F.cross_entropy(model(x[:4]), y[:4]).backward()
    model.net[2].bias.grad = None
    opt.step()
    with pytest.raises(RecordingError, match="'net.2.bias' got no gradient"):
        rec.step(torch.arange(4))


def test_frozen_params_are_constants(tmp_path):
    model = mlp()
    model.net[0].bias.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x, y = data()
    with _rec(tmp_path, model, opt) as rec:
        train_steps(rec, model, opt, x, y, 3)
    run = eq.open(tmp_path / "r.zarr")
    assert "net.0.bias" not in run.space.names and "net.0.bias" in run.constants
    r = Engine(run).run_request(Request(0, 3, TargetSpec("label", "train", (0, 1)), tuple(run.space.names),
                                        (0, 0, 0), 1, tolerance=1e-12, strategy="delta"))
    assert float((r.total() - r.actual).abs().max()) <= 1e-10 * float(r.actual.abs().max())


# -- damaged stores --------------------------------------------------------------------------------

def _small_run(tmp_path):
    x, y = data()
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with _rec(tmp_path, model, opt) as rec:
        train_steps(rec, model, opt, x, y, 3)
    return tmp_path / "r.zarr"


def test_store_errors_are_one_line(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        eq.open(tmp_path / "nope.zarr")
    path = _small_run(tmp_path)
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["explaind_format"] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="format 99;.*upgrade explaind_ql"):
        eq.open(path)
    meta.write_text("{ not json")
    with pytest.raises(StoreError, match="not a readable zarr store") as exc:
        eq.open(path)
    assert "\n" not in str(exc.value)
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w")
    with pytest.raises(StoreError, match="not an explaind_ql run"):
        eq.open(plain)


def test_truncated_store(tmp_path):
    path = _small_run(tmp_path)
    import shutil
    shutil.rmtree(path / "lr")
    with pytest.raises(StoreError, match="truncated"):
        eq.open(path)


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch, torch.nn.functional as F
    import explaind_ql as eq
    from explaind_ql.models import MLP
    torch.manual_seed(0)
    x = torch.randn(12, 4, dtype=torch.float64); y = torch.randint(0, 3, (12,))
    m = MLP([4, 6, 3]).double()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    rec = eq.Recorder(sys.argv[1], m, opt, train=(x, y), test=(x[:3], y[:3]), checkpoint_every=3,
                      chunk_steps=2, factory="explaind_ql.models:MLP", factory_kwargs={"sizes": [4, 6, 3]})
    s = 0
    while True:
        idx = torch.arange(4) + (s % 3) * 4
        loss = F.cross_entropy(m(x[idx]), y[idx]); opt.zero_grad(); loss.backward(); opt.step()
        rec.step(idx, loss=loss); s += 1
        print(s, flush=True)
""")


def test_sigkill_leaves_a_queryable_store(tmp_path):
    script = tmp_path / "rec.py"
    script.write_text(KILL_SCRIPT)
    path = tmp_path / "k.zarr"
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if int(line) >= 40:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run = eq.open(path)
    assert not run.closed and 30 <= run.n_steps
    assert run.ckpt_states[-1] <= run.n_steps
    n = run.n_steps
    r = Engine(run).run_request(Request(0, n, TargetSpec("label", "test", (0, 1, 2)), tuple(run.space.names),
                                        (0, 0, 0, 0), 1, tolerance=1e-12, strategy="delta"))
    assert float((r.total() - r.actual).abs().max()) <= 1e-10 * float(r.actual.abs().max())
    assert np.isfinite(run.losses()).all()


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_float32_replay_is_bit_exact(toy_run, optimizer):
    """Replay re-takes the steps with training's own arithmetic: zero drift at every checkpoint."""
    from explaind_ql.engine.trajectory import Trajectory
    run = eq.open(toy_run("transformer", optimizer, dtype=torch.float32, steps=23, checkpoint_every=5))
    traj = Trajectory(run, torch.device("cpu"), torch.float32)
    assert len(list(traj.walk(0, 23))) == 23 and traj.replayed_steps > 0
    drift = run.cache.drift
    assert set(drift) == {5, 10, 15, 20, 23}
    assert all(d.abs_error == 0.0 for d in drift.values())


# -- misuse: one-line errors, nothing recorded silently --------------------------------------------

def _one_step(model, opt, x, y, idx):
    loss = F.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def _fresh(path, make_opt=torch.optim.AdamW, params=slice(None)):
    """(x, y, model, opt, recorder) before the first step."""
    x, y = data()
    model = mlp()
    opt = make_opt(list(model.parameters())[params], lr=1e-2)
    return x, y, model, opt, eq.Recorder(path, model, opt, train=(x, y), **FACTORY)


@pytest.mark.parametrize("batch,needle", [
    ("0,1,2", "not str"),
    (["a", "b"], "not list"),
    (torch.tensor([0.0, 1.7], dtype=torch.float64), "float64"),
    ([0.5, 1.0], "float32"),
    (torch.tensor([True, False]), "torch.bool"),
])
def test_batch_indices_must_be_integers(tmp_path, batch, needle):
    x, y, model, opt, rec = _fresh(tmp_path / "r.zarr")
    _one_step(model, opt, x, y, torch.arange(4))
    with pytest.raises(RecordingError, match=f"step 0: batch indices must be integers.*{needle}"):
        rec.step(batch)


def test_a_param_group_added_mid_run_is_refused(tmp_path):
    x, y, model, opt, rec = _fresh(tmp_path / "r.zarr", params=slice(0, 2))
    train_steps(rec, model, opt, x, y, 1)
    opt.add_param_group({"params": list(model.parameters())[2:]})
    _one_step(model, opt, x, y, torch.arange(4))
    with pytest.raises(RecordingError, match="step 1: the optimizer's param groups changed"):
        rec.step(torch.arange(4))


def test_non_finite_values_are_refused_at_record_time(tmp_path):
    x, y, model, opt, rec = _fresh(tmp_path / "r.zarr", torch.optim.SGD)
    train_steps(rec, model, opt, x, y, 2)
    loss = _one_step(model, opt, x, y, torch.arange(4))
    with pytest.raises(RecordingError, match="step 2: the loss is nan"):
        rec.step(torch.arange(4), loss=loss * float("nan"))
    x, y, model, opt, rec = _fresh(tmp_path / "nan.zarr", torch.optim.SGD)
    x[0, 0] = float("nan")  # training sees a NaN input: its gradient is NaN
    _one_step(model, opt, x, y, torch.arange(4))
    with pytest.raises(RecordingError, match="step 0: the gradient of 'net.0.weight' hold NaN"):
        rec.step(torch.arange(4))


def test_step_called_twice_names_the_mistake(tmp_path):
    x, y, model, opt, rec = _fresh(tmp_path / "r.zarr")
    _one_step(model, opt, x, y, torch.arange(4))
    rec.step(torch.arange(4))
    with pytest.raises(VerificationError, match=r"did not change since the last rec.step\(\).*not twice") as exc:
        rec.step(torch.arange(4))
    assert "%" not in str(exc.value) and len(str(exc.value)) < 300
