"""The store as untrusted, fallible data: trust, crash safety, one writer, integrity, verify."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr.storage._local as zarr_local

import explaind_ql as eq
from explaind_ql.errors import StoreError
from explaind_ql.models import MLP
from explaind_ql.store import lock_path
from explaind_ql.verify import verify

FACTORY = dict(factory="explaind_ql.models:MLP", factory_kwargs={"sizes": [4, 6, 3]})
STEPS = 7


def record(path, steps=STEPS, every=3, on_step=None, **kw):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    model = MLP([4, 6, 3]).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with eq.Recorder(path, model, opt, train=(x, y), test=(x[:3], y[:3]), checkpoint_every=every,
                     chunk_steps=2, **{**FACTORY, **kw}) as rec:
        for s in range(steps):
            idx = torch.arange(4) + (s % 3) * 4
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(idx, loss=loss)
            if on_step:
                on_step(s)
    return path


def _set_attr(path, **attrs):
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"].update(attrs)
    meta.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return record(tmp_path_factory.mktemp("store") / "r.zarr")


def _copy(src, tmp_path, name="c.zarr"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# -- trust -----------------------------------------------------------------------------------------

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
def make(**kw):
    pathlib.Path({marker!r}).write_text("called")
    from explaind_ql.models import MLP
    return MLP(**kw)
"""


@pytest.fixture
def evil_store(clean, tmp_path, monkeypatch):
    """A store whose factory names a module that leaves a marker file when imported or called."""
    marker = tmp_path / "ran"
    (tmp_path / "evilmod.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("evilmod", None)
    path = _copy(clean, tmp_path)
    _set_attr(path, factory="evilmod:make")
    return path, marker


def test_an_untrusted_factory_is_never_imported(evil_store):
    path, marker = evil_store
    run = eq.open(path)
    assert run.info()["factory"] == "evilmod:make" and run.n_steps == STEPS
    plan = run.explain("influence on test[*] by layer")  # planning reads metadata: nothing imported
    assert "Contract" in plan and "estimate: unavailable: " in plan and "which is not trusted" in plan
    for call in (lambda: run.query("influence on test[*] by layer"),
                 lambda: run.query("check on test[*]"),
                 lambda: eq.query(path, "evaluate on test[*]")):
        with pytest.raises(StoreError, match=r"would import module 'evilmod', which is not trusted; "
                                             r"if you trust it, pass trust=\['evilmod'\]") as exc:
            call()
        assert "\n" not in str(exc.value)
    assert not marker.exists() and "evilmod" not in sys.modules


def test_a_trusted_factory_is_imported(evil_store, monkeypatch):
    path, marker = evil_store
    df = eq.open(path, trust=["evilmod"]).query("influence on test[*] by layer")
    assert marker.read_text() == "called" and df.height > 0
    marker.unlink()
    monkeypatch.setenv("EXPLAIND_QL_TRUST", "other, evilmod")
    assert eq.query(path, "influence on test[*] by layer").equals(df)


def test_trust_from_the_config_file(evil_store, tmp_path, monkeypatch):
    path, marker = evil_store
    cfg = tmp_path / "config.toml"
    cfg.write_text('trust = ["evilmod"]\n')
    monkeypatch.setenv("EXPLAIND_QL_CONFIG", str(cfg))
    eq.open(path).query("influence on test[*] by layer")
    assert marker.exists()
    cfg.write_text('trust = "evilmod"\n')
    with pytest.raises(StoreError, match="must be a list of module names"):
        eq.open(path)


@pytest.mark.parametrize("factory,needle", [
    ("subprocess:run", "would import module 'subprocess'"),
    ("explaind_ql.models:torch.nn.Linear", "reaches into module torch"),  # a path through a module
    ("explaind_ql.models:nn.Linear", "reaches into module torch.nn"),
    ("explaind_ql.models:MLP.__init__.__globals__", "not a callable defined in a trusted module"),
    ("explaind_ql.models", "not a 'module:callable'"),
    ("explaind_ql.models:nope", "cannot import factory"),
])
def test_crafted_factories_are_refused(clean, tmp_path, factory, needle):
    path = _copy(clean, tmp_path)
    _set_attr(path, factory=factory)
    with pytest.raises(StoreError, match=needle):
        eq.open(path).query("influence on test[*] by layer")


def test_a_re_exported_callable_must_be_defined_in_a_trusted_module(clean, tmp_path):
    path = _copy(clean, tmp_path)
    _set_attr(path, factory="explaind_ql.models:modadd_data", factory_kwargs={})
    with pytest.raises(StoreError, match="not a torch.nn.Module"):
        eq.open(path).query("influence on test[*] by layer")
    # `torch.nn.modules.linear:Linear` is defined where it is named, but torch is not trusted
    _set_attr(path, factory="torch.nn.modules.linear:Linear")
    with pytest.raises(StoreError, match="not trusted"):
        eq.open(path).query("influence on test[*] by layer")


def test_loss_names_are_never_imported(clean, tmp_path):
    path = _copy(clean, tmp_path)
    _set_attr(path, loss={"name": "os:system", "reduction": "mean"})
    with pytest.raises(StoreError, match="unknown loss 'os:system'"):
        eq.open(path)
    with pytest.raises(eq.ExplaindError, match="fixed registry"):
        record(tmp_path / "l.zarr", loss="os:system")


# -- crash safety ----------------------------------------------------------------------------------

def _forked(fn) -> int:
    """Run ``fn`` in a forked child; its exit status (-signal if killed)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            torch.set_num_threads(1)
            fn()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _kill_at_write(path, k: int, torn: bool):
    """Record, SIGKILLing the process at its k-th store write (after a torn temp file if ``torn``)."""
    def child():
        real, n = zarr_local._put, [0]

        def put(p, value, exclusive=False):
            n[0] += 1
            if n[0] == k:
                if torn:  # half a temp file on disk, as a write interrupted mid-way leaves it
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.with_suffix(".torn.partial").write_bytes(bytes(value.to_bytes())[: len(value) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return real(p, value, exclusive=exclusive)
        zarr_local._put = put
        record(path)
    return _forked(child)


def _writes_per_recording(tmp_path) -> int:
    counter = tmp_path / "count"

    def child():
        real, n = zarr_local._put, [0]

        def put(p, value, exclusive=False):
            n[0] += 1
            counter.write_text(str(n[0]))
            return real(p, value, exclusive=exclusive)
        zarr_local._put = put
        record(tmp_path / "count.zarr")
    assert _forked(child) == 0
    return int(counter.read_text())


def test_sigkill_at_every_write_leaves_a_store_that_answers_its_committed_prefix(clean, tmp_path):
    full = eq.open(clean)
    total = _writes_per_recording(tmp_path)
    assert total > 40
    seen_steps, opened = set(), 0
    # every write of the creation, the first checkpoint and the first two step flushes, then every
    # third: each write is one file put atomically, so these are all the states a kill can leave
    points = [*range(1, 70), *range(70, total + 1, 3)]
    for k in points:
        path = tmp_path / f"k{k}.zarr"
        assert _kill_at_write(path, k, torn=k % 2 == 0) == -signal.SIGKILL
        try:
            run = eq.open(path)
        except StoreError as exc:  # only before the first state is committed
            assert any(why in str(exc) for why in ("no committed state", "not an explaind_ql run",
                                                   "not a readable zarr store", "does not exist")), str(exc)
            assert not opened, f"killed at write {k}/{total}, after a commit: {exc}"
            continue
        opened += 1
        n = run.n_steps
        seen_steps.add(n)
        assert not run.closed and n <= STEPS
        assert np.array_equal(run.step_var("loss"), full.step_var("loss")[:n])
        assert torch.equal(run.stored_state(0)[0], full.stored_state(0)[0])
        if n and opened % 4 == 1:
            q = f"influence on test[*] over steps 0:{n} by step"
            df, ref = run.query(q), full.query(q)
            assert df.drop("influence").equals(ref.drop("influence")), f"killed at write {k}/{total}"
            # the same answer to the query's tolerance (1e-6 of the change; both runs reach ~1e-10)
            atol = 1e-8 * float(ref["influence"].abs().sum())
            assert np.allclose(df["influence"], ref["influence"], rtol=0, atol=atol), f"killed at write {k}"
        shutil.rmtree(path, ignore_errors=True)
    assert opened and {0, STEPS - 1} <= seen_steps | {0} and len(seen_steps) >= 3, seen_steps


def test_a_reader_during_appends_sees_a_consistent_prefix(tmp_path):
    path = tmp_path / "live.zarr"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the writer
        try:
            torch.set_num_threads(1)
            record(path, steps=40, on_step=lambda s: time.sleep(0.01))
        finally:
            os._exit(0)
    reads, last, done = 0, -1, False
    try:
        while True:
            done = os.waitpid(pid, os.WNOHANG)[0] == pid
            try:
                run = eq.open(path)
            except StoreError as exc:
                assert last < 0 and ("no committed state" in str(exc) or "no run at" in str(exc)
                                     or "not an explaind_ql run" in str(exc)), str(exc)
                continue
            n = run.n_steps
            assert n >= last
            last = n
            assert len(run.step_var("lr")) == n and len(run.ckpt_states) >= 1
            if n:
                run.step_meta(n - 1)
                run.stored_state(len(run.ckpt_states) - 1)
            reads += 1
            if done:
                break
    finally:
        if not done:
            os.waitpid(pid, 0)
    assert reads > 3 and last == 40 and eq.open(path).closed


# -- one writer ------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_whatever_overwrite_says(tmp_path):
    path = tmp_path / "w.zarr"
    refused = []

    def refused_there():
        try:
            record(path, overwrite=True)
        except StoreError as exc:
            if f"being recorded by another writer (pid {os.getppid()}" in str(exc):
                os._exit(7)
        os._exit(1)

    def second_writer(s):  # while the first writer records, another process tries the same path
        if s == 1:
            refused.append(_forked(refused_there))
    record(path, on_step=second_writer)
    assert refused == [7] and not lock_path(path).exists()
    run = eq.open(path)
    assert run.closed and run.n_steps == STEPS  # the refused writer left the first one's store intact


def test_stale_locks_are_taken_over(tmp_path):
    path = tmp_path / "s.zarr"
    record(path, steps=2)
    # a writer that crashed leaves its lock behind, naming a process that no longer exists
    lock_path(path).write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": os.uname().nodename, "token": "x"}))
    record(path, overwrite=True)
    assert eq.open(path).closed and not lock_path(path).exists()
    lock_path(path).write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "x"}))
    with pytest.raises(StoreError, match="pid 1 on elsewhere"):
        record(path, overwrite=True)


# -- integrity -------------------------------------------------------------------------------------

QUERIES = ("influence on test[*] by layer, step", "influence on test[0] by example", "check on test[*]",
           "evaluate on test[*]", "influence on train[0..2] by step")


def _answers(path):
    out = {}
    for q in QUERIES:
        try:
            out[q] = eq.open(path).query(q)
        except StoreError as exc:
            assert "\n" not in str(exc)
            out[q] = exc
    return out


def _chunk_files(path, array):
    return sorted(p for p in (path / array).rglob("*") if p.is_file() and p.name != "zarr.json")


def _damage(chunk, how):
    data = chunk.read_bytes()
    if how == "delete":
        chunk.unlink()
    elif how == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    else:
        i = len(data) // 3
        chunk.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:])


def test_every_damaged_array_is_reported_and_never_read_as_data(clean, tmp_path):
    assert verify(clean).ok
    good = _answers(clean)
    assert not any(isinstance(v, Exception) for v in good.values())
    arrays = sorted(d.name for d in clean.iterdir() if (d / "zarr.json").is_file())
    assert {"theta", "opt_exp_avg", "lr", "batch_index", "x_train", "y_test", "const_0"} - set(arrays) <= {"const_0"}
    unread = set()
    for array in arrays:
        for how in ("delete", "truncate", "flip"):
            path = _copy(clean, tmp_path, f"{array}-{how}.zarr")
            _damage(_chunk_files(path, array)[0], how)
            report = verify(path)
            assert array in {d.array for d in report.damage}, (array, how, report.lines())
            got = _answers(path)
            for q, v in got.items():
                if isinstance(v, Exception):
                    continue
                assert v.equals(good[q]), f"{array} {how}: {q} returned a different frame"
            if not any(isinstance(v, Exception) for v in got.values()):
                unread.add(array)
            shutil.rmtree(path)
    assert unread <= {"loss"}, unread  # the recorded loss values are shown by `info`, not used


@pytest.mark.parametrize("edit,needle", [
    ({"explaind_format": "1"}, "format '1'"),
    ({"explaind_format": 1.5}, "format 1.5"),
    ({"explaind_format": 0}, "format 0"),
    ({"explaind_format": -1}, "format -1"),
    ({"explaind_format": 1}, "re-record"),
    ({"committed_steps": -1}, "damaged commit record"),
    ({"committed_steps": "7"}, "damaged commit record"),
    ({"committed_steps": 99}, "commit says 99"),
    ({"committed_ckpts": 99}, "commit says 99"),
    ({"dtype": "nn"}, "damaged metadata"),
    ({"dtype": "float16"}, "damaged metadata"),
    ({"splits": ["train", "test", "val"]}, "'x_val' is missing"),
    ({"splits": ["test"]}, "no train split"),
    ({"params": "x"}, "damaged metadata"),
])
def test_damaged_metadata_is_one_line_store_error(clean, tmp_path, edit, needle):
    path = _copy(clean, tmp_path)
    _set_attr(path, **edit)
    with pytest.raises(StoreError, match=needle) as exc:
        eq.open(path).query("influence on test[*] by layer")
    assert "\n" not in str(exc.value)


def test_changed_param_names_or_shapes_are_store_errors(clean, tmp_path):
    path = _copy(clean, tmp_path)
    params = json.loads((path / "zarr.json").read_text())["attributes"]["params"]
    renamed = [dict(p, name=p["name"].replace("net.0", "net.9")) for p in params]
    _set_attr(path, params=renamed)
    with pytest.raises(StoreError, match="has no param 'net.9.weight'"):
        eq.open(path).query("influence on test[*] by layer")
    reshaped = [dict(p, shape=[p["shape"][0] + 1, *p["shape"][1:]]) if i == 0 else p for i, p in enumerate(params)]
    _set_attr(path, params=reshaped)
    with pytest.raises(StoreError, match="describes"):
        eq.open(path)


def test_verify_cli(clean, tmp_path):
    from click.testing import CliRunner
    from explaind_ql.shells.cli import main
    ok = CliRunner().invoke(main, ["verify", str(clean)])
    assert ok.exit_code == 0 and "every checksum matches" in ok.output
    path = _copy(clean, tmp_path)
    _damage(_chunk_files(path, "theta")[0], "flip")
    _damage(_chunk_files(path, "y_test")[0], "delete")
    bad = CliRunner().invoke(main, ["verify", str(path)])
    assert bad.exit_code == 4
    assert "damaged: theta:" in bad.output and "damaged: y_test:" in bad.output and "missing" in bad.output


def test_a_nan_in_the_data_is_an_error_never_a_frame(clean, tmp_path):
    """NaN written with a valid checksum (a buggy writer): `verify` and every query refuse it."""
    import zarr
    path = _copy(clean, tmp_path)
    theta = zarr.open_array(str(path / "theta"), mode="r+")
    row = theta[1]
    row[0] = np.nan
    theta[1] = row
    assert "holds NaN" in " ".join(verify(path).lines())
    for q in ("influence on test[*] by layer", "check on test[*]", "evaluate on test[*]"):
        with pytest.raises(StoreError, match="holds NaN or infinite values.*is damaged"):
            eq.open(path).query(q)


def test_a_recorder_dropped_without_close_leaves_a_stale_lock(tmp_path):
    import gc
    path = tmp_path / "d.zarr"
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    model = MLP([4, 6, 3]).double()
    rec = eq.Recorder(path, model, torch.optim.SGD(model.parameters(), lr=0.1), train=(x, y), **FACTORY)
    assert lock_path(path).exists()
    with pytest.raises(StoreError, match=r"a Recorder in this process still records there; call its close\(\)"):
        record(path, overwrite=True)
    del rec, model  # the model's grad hooks hold the recorder
    gc.collect()
    record(path, overwrite=True)  # the dropped recorder's lock is not held against a new one
    assert eq.open(path).closed
