"""Dropout, exactly: per-example terms replay the masks the real update drew (docs/store.md, "Dropout")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vmap

import explaind_ql as eq
from explaind_ql.dropout import STOCHASTIC, Masks, step_seed
from explaind_ql.errors import RecordingError

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


class DropMLP(torch.nn.Module):
    def __init__(self, p: float = 0.3, channel: bool = False):
        super().__init__()
        self.lin1, self.lin2 = torch.nn.Linear(4, 16), torch.nn.Linear(16, 3)
        self.drop = torch.nn.Dropout1d(p) if channel else torch.nn.Dropout(p)

    def forward(self, x):
        h = torch.tanh(self.lin1(x))
        h = self.drop(h[:, :, None])[:, :, 0] if isinstance(self.drop, torch.nn.Dropout1d) else self.drop(h)
        return self.lin2(h)


def _record(path, dtype, optimizer="adamw", steps=6, micro=1, channel=False, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 4, generator=g, dtype=dtype), torch.randint(0, 3, (24,), generator=g)
    model = DropMLP(channel=channel).to(dtype)
    opt = OPTIMIZERS[optimizer](model.parameters())
    with eq.Recorder(path, model, opt, train=(x, y), test=(x[:6], y[:6]), grad_check_every=1,
                     dropout_seed=3) as rec:
        for s in range(steps):
            batch = torch.randperm(24, generator=g)[:8]
            opt.zero_grad()
            for part in batch.chunk(micro):  # gradient accumulation: micro-batches summed into one update
                (F.cross_entropy(model(x[part]), y[part], reduction="sum") / len(batch)).backward()
            opt.step()
            rec.step(batch)
    return path


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_example_terms_with_dropout_sum_to_the_recorded_update(tmp_path, optimizer, dtype):
    """Invariant 3 with dropout on: the per-example gradients, rebuilt with the masks each example drew,
    rebuild the recorded update, and the by-example frame sums to the real change."""
    run = eq.open(_record(tmp_path / "d.zarr", dtype, optimizer), model=DropMLP())
    assert run.dropout_seed is not None
    check = run.query("check on test[0..5]")
    # float32: the float64 rebuild of a float32 update differs by its rounding, which Adam's 1/√v magnifies where v
    # is tiny (6e-5 measured; SGD 1e-6): the float32 regime the docs give (docs/store.md), not dropout's
    assert float(check["max_update_error"].max()) < (1e-9 if dtype == torch.float64 else 1e-3)
    assert float(check["relative_residual"].abs().max()) < (1e-6 if dtype == torch.float64 else 1e-4)
    by_ex = run.query("influence on test[0..5] by example")
    total = float(by_ex["influence"].sum())
    actual = float(check["actual"].sum())
    assert abs(total - actual) <= (1e-6 if dtype == torch.float64 else 1e-3) * max(1.0, abs(actual))


def test_the_masks_are_what_makes_it_exact(tmp_path):
    """The same store with its masks forgotten (read as a run without dropout) no longer rebuilds its updates:
    the test above would fail if the masks were not replayed."""
    path = _record(tmp_path / "d.zarr", torch.float64)
    zarr.open_group(str(path), mode="r+").attrs[STOCHASTIC] = False
    err = float(eq.open(path, model=DropMLP()).query("check on test[0..5]")["max_update_error"].max())
    assert err > 1e-3


def test_micro_batches_and_channel_dropout_replay_exactly(tmp_path):
    """Gradient accumulation runs several training forwards per step: each item's masks follow its place in
    the step's batch. Channel dropout (Dropout1d) masks whole channels."""
    run = eq.open(_record(tmp_path / "m.zarr", torch.float64, micro=2, channel=True), model=DropMLP(channel=True))
    assert float(run.query("check on test[0..5]")["max_update_error"].max()) < 1e-9


def test_a_checkpointed_run_with_dropout_replays_its_steps(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    model = DropMLP().double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with eq.Recorder(tmp_path / "c.zarr", model, opt, train=(x, y), test=(x[:4], y[:4]), checkpoint_every=3) as rec:
        for _ in range(7):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            rec.step(torch.arange(16))
    check = eq.open(tmp_path / "c.zarr", model=DropMLP()).query("check on test[0..3]")
    assert float(check["max_replay_drift"].max()) < 1e-12
    assert float(check["max_update_error"].max()) < 1e-9


def test_other_random_draws_and_unmatched_forwards_are_refused(tmp_path):
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))

    class Noisy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x + 0.01 * torch.randn_like(x))
    noisy = Noisy().double()
    rec = eq.Recorder(tmp_path / "n.zarr", noisy, torch.optim.SGD(noisy.parameters(), lr=0.1), train=(x, y))
    with pytest.raises(RecordingError, match="random numbers with torch.randn_like"):
        noisy(x)
    rec.close()

    model = DropMLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = eq.Recorder(tmp_path / "u.zarr", model, opt, train=(x, y))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    model(x[:2])  # a second training-mode forward that the update did not use
    with pytest.raises(RecordingError, match="ran 10 items in training mode.*batch has 8.*model.eval"):
        rec.step(torch.arange(8))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 6), width=st.integers(1, 9), pad=st.integers(0, 4), p=st.sampled_from([0.1, 0.5, 0.9]),
       seed=st.integers(0, 2**40), step=st.integers(0, 10**6))
def test_an_items_mask_depends_on_its_place_not_on_its_company(rows, width, pad, p, seed, step):
    """The mask of an item is the same alone (vmapped, as per-example gradients take it), in any dtype, and
    at a longer padding of its trailing axis: so a query can rebuild any example's mask by itself."""
    s = step_seed(seed, step)
    x = torch.ones(rows, 3, width + pad, dtype=torch.float64)
    with Masks(s, torch.arange(rows)):
        whole = F.dropout(x, p) != 0

    def one(xi, ri):
        with Masks(s, ri[None]):
            return F.dropout(xi[None], p)[0]
    alone = vmap(one)(x[:, :, :width].float(), torch.arange(rows)) != 0
    assert torch.equal(whole[:, :, :width], alone)


def test_masks_keep_one_minus_p_and_differ_by_step():
    x = torch.ones(256, 512)
    with Masks(step_seed(7, 0), torch.arange(256)):
        a = F.dropout(x, 0.25) != 0
    with Masks(step_seed(7, 1), torch.arange(256)):
        b = F.dropout(x, 0.25) != 0
    assert abs(float(a.float().mean()) - 0.75) < 0.005
    assert abs(float((a == b).float().mean()) - (0.75 ** 2 + 0.25 ** 2)) < 0.005  # independent across steps
