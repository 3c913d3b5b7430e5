"""Walking a recorded trajectory step by step, replaying what a checkpointed store skipped.

Each :class:`StepRecord` holds θ_s, θ_{s+1}, the optimizer state before the step and the
step's linear form. States between checkpoints are recreated by :mod:`.replay` with the
arithmetic training used; at the next stored checkpoint the replay is compared with the
stored state (the *drift*), and the walk continues from the stored state.
Replayed segments are cached per open run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..optim import LinearStep, OptState, linear_step
from ..run import Run, StepMeta
from .replay import TorchReplay

# stored states read per store call (at least one): 60 of tiny GPT-2's took 0.64 s 3 a read, 0.37 s 12 or 48 a read
READ_BYTES = 8 << 20


@dataclass
class StepRecord:
    s: int
    theta: torch.Tensor
    theta_next: torch.Tensor
    state_before: OptState
    linear: LinearStep
    meta: StepMeta

    @property
    def delta(self) -> torch.Tensor:
        return self.theta_next - self.theta


@dataclass
class Drift:
    """Replay against the stored checkpoint at ``state``: max abs error, and relative to the segment's motion."""

    state: int
    abs_error: float
    rel_error: float


class Trajectory:
    """Step records of one run on one device and dtype."""

    def __init__(self, run: Run, device: torch.device, dtype: torch.dtype):
        self.run, self.device, self.dtype = run, device, dtype
        self.gidx = run.space.group_index.to(device)
        self._replayer: TorchReplay | None = None
        self.drift: dict[int, Drift] = run.cache.drift
        self.replayed_steps = 0
        self._block: tuple[int, list] = (0, [])  # stored states read ahead: (first position, states)

    def _stored(self, pos: int) -> tuple[torch.Tensor, OptState]:
        """A stored state, read with the next few in one go: a row read decodes its whole chunk anyway."""
        lo, block = self._block
        if not lo <= pos < lo + len(block):
            rows = max(1, READ_BYTES // max(1, self.run.state_bytes()))
            lo, block = pos, self.run.stored_states(pos, min(len(self.run.ckpt_states), pos + rows))
            self._block = (lo, block)
        theta, state = block[pos - lo]
        return theta.to(self.device, self.run.dtype), state.to(self.run.dtype, self.device)

    def _replay(self, s: int, theta: torch.Tensor, state: OptState, meta: StepMeta):
        if self._replayer is None:
            self._replayer = TorchReplay(self.run, self.device)
        self.replayed_steps += 1
        return self._replayer.step(theta, state, meta)

    def walk(self, a: int, b: int) -> Iterator[StepRecord]:
        """Records for update steps a..b-1, in order."""
        run = self.run
        pos = run.ckpt_at_or_before(a)
        s = int(run.ckpt_states[pos])
        theta, state = self._stored(pos)
        seg_start = theta
        cache = run.cache.replay
        while s < b:
            meta = run.step_meta(s)
            nxt = pos + 1
            if nxt < len(run.ckpt_states) and int(run.ckpt_states[nxt]) == s + 1:
                theta_next, state_next = self._stored(nxt)
                if not run.dense and (s + 1) not in self.drift:
                    replayed, _ = self._replay(s, theta, state, meta)
                    self._note_drift(s + 1, replayed, theta_next, seg_start)
                pos, seg_start = nxt, theta_next
            elif (s + 1, self.device) in cache:
                theta_next, state_next = cache[(s + 1, self.device)]
            else:
                theta_next, state_next = self._replay(s, theta, state, meta)
                cache[(s + 1, self.device)] = (theta_next, state_next)
            if s >= a:
                ls = linear_step(run.spec, self.gidx, meta.lr, meta.weight_decay, state,
                                 state_next.besides_momentum(), self.dtype)
                yield StepRecord(s, theta.to(self.dtype), theta_next.to(self.dtype),
                                 state.to(self.dtype), ls, meta)
            theta, state, s = theta_next, state_next, s + 1

    def _note_drift(self, state: int, replayed: torch.Tensor, stored: torch.Tensor, seg_start: torch.Tensor):
        err = float((replayed - stored).abs().max())
        motion = float((stored - seg_start).abs().max())
        self.drift[state] = Drift(state, err, err / motion if motion > 0 else 0.0)
