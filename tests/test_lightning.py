"""Lightning runs recorded by explaind_ql.lightning.Callback: its loop, schedule, clipping and accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import explaind_ql as eq
from explaind_ql.errors import RecordingError

pl = pytest.importorskip("lightning.pytorch")


class Classifier(pl.LightningModule):
    """A small MLP with dropout, trained by AdamW under a step LR schedule."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.5),
                                                   "interval": "step"}}


def _fit(tmp_path, dtype=torch.float64, **trainer_kw):
    from explaind_ql.lightning import Callback
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, generator=g, dtype=dtype), torch.randint(0, 3, (40,), generator=g)
    data = torch.utils.data.TensorDataset(x[:32], y[:32])
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2))
    model = Classifier().to(dtype)
    callback = Callback(tmp_path / "l.zarr", test=(x[32:], y[32:]), dropout_seed=3)
    settings = dict(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=0.5)
    pl.Trainer(callbacks=[callback], **{**settings, **trainer_kw}).fit(model, loader)
    return eq.open(tmp_path / "l.zarr", model=Classifier()), model


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_run_recorded_by_the_callback_passes_check(tmp_path, accumulate):
    run, _ = _fit(tmp_path, precision="64-true", accumulate_grad_batches=accumulate)
    assert run.n_steps == 12 // accumulate and run.dropout_seed is not None
    assert (run.step_var("batch_size") == 8 * accumulate).all()
    lrs = run.step_var("lr")[:, 0]
    assert lrs[0] == 1e-2 and lrs[-1] < lrs[0]  # the StepLR schedule, as it ran
    assert (run.step_var("clip") < 1).any()  # gradient_clip_val=0.5 clipped
    check = run.query("check on test[*]")
    assert float(check["relative_residual"].abs().max()) < 1e-6
    assert float(check["max_update_error"].max()) < 1e-9  # per-example terms (dropout replayed) rebuild the update
    by_ex = run.query("influence on test[*] by example")
    assert abs(float(by_ex["influence"].sum()) - float(check["actual"].sum())) < 1e-6


def test_lightning_settings_that_cannot_be_exact_are_refused(tmp_path):
    with pytest.raises(RecordingError, match="gradient_clip_algorithm='value'"):
        _fit(tmp_path, precision="64-true", gradient_clip_algorithm="value")


@pytest.mark.parametrize("module,extra", [("explaind_ql.lightning", "lightning"), ("explaind_ql.hf.callback", "hf")])
def test_a_missing_framework_names_the_extra_to_install(monkeypatch, module, extra):
    import importlib
    import sys
    monkeypatch.setitem(sys.modules, "lightning.pytorch" if extra == "lightning" else "transformers", None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf'pip install "explaind_ql\[{extra}\]"'):
        importlib.import_module(module)
