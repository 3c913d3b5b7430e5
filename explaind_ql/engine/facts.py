"""What planning reads of a run: sizes from its metadata, so that no model is built to plan a query.

The recorder measures one item's forward pass when recording starts (outputs per item and the
ReLU-family inputs of each call: where the integrand can have kinks) and stores it as the
``model_facts`` attribute. For stores recorded before that, the model is rebuilt once per open
run to measure the same (:func:`facts_for`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import model_io
from ..run import Run
from . import targets
from .model_fn import ModelFn, forward_facts
from .targets import TargetSpec

MODEL_FACTS = "model_facts"  # the store attribute: {"outputs": int, "kink_segments": [int, ...]}


@dataclass(frozen=True)
class Facts:
    """One run on one device, as the planner sees it: sizes, the ReLU sites, the largest batch."""

    run: Run
    device: torch.device
    dtype: torch.dtype
    n_out: int
    kink_segments: tuple[int, ...]
    max_batch: int

    def target_labels(self, spec: TargetSpec) -> list[tuple[int | None, int | None]]:
        return targets.labels(spec, self.n_out)


def measured(forward: Callable[[], torch.Tensor]) -> dict:
    """The ``model_facts`` of one item's forward pass (the live model's, or a rebuilt one's at a state)."""
    n_out, segments = forward_facts(forward)
    return {"outputs": n_out, "kink_segments": list(segments)}


def _rebuilt(run: Run) -> dict:
    """``model_facts`` of a store recorded without them: its model rebuilt, at its first state."""
    fn = ModelFn.for_run(run, torch.device("cpu"), torch.float64)
    x = model_io.to(model_io.apply(run.split(run.splits[0])[0], lambda t: t[:1]), "cpu", torch.float64)
    return measured(lambda: fn._call(run.stored_state(0)[0].to(torch.float64), None, None, x))


def facts_for(run: Run, device: torch.device | str, dtype: torch.dtype,
              measure: Callable[[], dict] | None = None) -> Facts:
    """The planner's view of ``run`` on ``device``: from the store's metadata, else measured once (by
    ``measure``, where a model is at hand already; else the model is rebuilt for it)."""
    if run.cache.model_facts is None:
        run.cache.model_facts = run.attrs.get(MODEL_FACTS) or (measure or (lambda: _rebuilt(run)))()
    f = run.cache.model_facts
    return Facts(run, torch.device(device), dtype, int(f["outputs"]), tuple(int(s) for s in f["kink_segments"]),
                 int(run.step_var("batch_size").max()) if run.n_steps else 1)
