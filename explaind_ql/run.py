"""A recorded run opened for querying: metadata, the layer tree, and the per-step records.

Everything is read lazily from the store and sliced to the last committed step, so a
run whose recording was killed can still be queried up to that step. Opening imports
no code: the model is rebuilt, on first need, only from a trusted factory
(:mod:`explaind_ql.trust`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable
from pathlib import Path

import numpy as np
import torch

from .cache import RunCache
from .dropout import DROPOUT_SEED, STOCHASTIC
from .errors import RecordingError, StoreError
from .factory import build, param_shapes
from .hf import architecture
from .losses import LossSpec
from .optim import OptimizerSpec, OptState
from .params import ParamSpace
from .model_io import Adapter, Inputs, join
from .store import input_array, open_reader
from .trust import Trust

FLOAT_DTYPES = {"float32": torch.float32, "float64": torch.float64}
INPUT_KINDS = ("tensor", "dict", "tuple")


@dataclass(frozen=True)
class StepMeta:
    """What the store holds for one update step besides states."""

    lr: np.ndarray
    weight_decay: np.ndarray
    clip: float
    weight: float
    batch: torch.Tensor
    step: int


class Run:
    """An opened trajectory store. ``explaind_ql.open(path)`` returns one."""

    def __init__(self, path: str | os.PathLike, trust: Iterable[str] | str | None = None,
                 model: torch.nn.Module | None = None):
        self.path = Path(path)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise StoreError(f"model= must be a torch.nn.Module (the recorded architecture), not {type(model).__name__}")
        self.model = model
        self.store = open_reader(self.path)
        self.attrs = a = self.store.attrs
        self.trust = Trust.current(trust)
        try:
            self.space = ParamSpace.from_json(a["params"])
            self.spec = OptimizerSpec.from_json(a["optimizer"])
            self.loss = LossSpec(a["loss"]["name"], a["loss"]["reduction"])
            self.dtype = FLOAT_DTYPES[a["dtype"]]
            splits = list(a["splits"])
            if a.get("inputs", "tensor") not in INPUT_KINDS or not all(isinstance(k, str) for k in self.input_keys):
                raise ValueError(f"inputs {a.get('inputs')!r} with keys {self.input_keys!r}")
            if a.get(STOCHASTIC) and type(a.get(DROPOUT_SEED)) is not int:
                raise ValueError(f"dropout seed {a.get(DROPOUT_SEED)!r}")
            if not (a.get("output") is None or isinstance(a.get("output"), (str, int))):
                raise ValueError(f"output adapter {a.get('output')!r}")
        except (KeyError, ValueError, TypeError, AttributeError, RecordingError) as exc:
            raise StoreError(f"{self.path} has damaged metadata ({type(exc).__name__}: {exc}); "
                             "re-record the run") from None
        self.n_steps = self.store.n_steps
        states = self.store.read("ckpt_state", slice(0, self.store.n_ckpts))
        self._check_layout(splits)
        keep = states <= self.n_steps
        self.ckpt_rows = np.nonzero(keep)[0]
        self.ckpt_states = states[keep]
        self.checkpoint_every = a.get("checkpoint_every")
        # every state stored (checkpoint_every 1 too): nothing is ever replayed, so nothing is replayed to check
        self.dense = self.checkpoint_every in (None, 1)
        self.closed = bool(a.get("closed"))
        self._steps_cache: dict[str, np.ndarray] = {}
        self.cache = RunCache()

    def _check_layout(self, splits: list[str]) -> None:
        """The arrays the metadata promises exist with the shapes and dtype it implies."""
        st = self.store
        need = ["theta", "ckpt_state", "opt_step", "opt_has_buf", *(f"opt_{b}" for b in self.spec.buffers),
                *(v for n in splits for v in (*(input_array(n, k) for k in self.input_keys), f"y_{n}"))]
        if self.n_steps > 0:
            need += ["lr", "weight_decay", "clip", "weight", "batch_start", "batch_size", "batch_index", "loss"]
        for var in need:
            if var not in st:
                raise StoreError(f"{self.path} is truncated or damaged: array '{var}' is missing; "
                                 "re-record the run")
        if "train" not in splits:
            raise StoreError(f"{self.path} has no train split in its metadata; re-record the run")
        for var in ["theta", *(f"opt_{b}" for b in self.spec.buffers)]:
            shape, dtype = st.shape(var), st.dtype(var)
            if len(shape) != 2 or shape[1] != self.space.size or dtype != np.dtype(self.attrs["dtype"]):
                raise StoreError(f"{self.path} is damaged: '{var}' is {dtype}{list(shape)} but the metadata "
                                 f"describes {self.space.size} {self.attrs['dtype']} elements per state; "
                                 "re-record the run")
        for n in splits:
            for k in self.input_keys:
                if st.shape(input_array(n, k))[:1] != st.shape(f"y_{n}")[:1]:
                    raise StoreError(f"{self.path} is damaged: split '{n}' has {st.shape(input_array(n, k))[0]} "
                                     f"inputs but {st.shape(f'y_{n}')[0]} labels; re-record the run")

    # -- metadata ----------------------------------------------------------------------------
    @property
    def splits(self) -> list[str]:
        return list(self.attrs["splits"])

    @property
    def dropout_seed(self) -> int | None:
        """The seed of the run's dropout masks (:mod:`explaind_ql.dropout`), when a training forward drew any."""
        return int(self.attrs[DROPOUT_SEED]) if self.attrs.get(STOCHASTIC) else None

    @property
    def output(self) -> Adapter:
        """How the model's output tensor is reached in what it returns (``"logits"``; None: it returns it)."""
        return self.attrs.get("output")

    def split_size(self, name: str) -> int:
        return int(self.store.shape(f"y_{name}")[0])

    @property
    def input_keys(self) -> list[str]:
        """The names of the input tensors (``[""]`` for a model that takes one tensor)."""
        return list(self.attrs.get("input_keys", [""]))

    @cached_property
    def _split_tensors(self) -> dict[str, tuple[Inputs, torch.Tensor]]:
        kind = self.attrs.get("inputs", "tensor")
        return {n: (join(kind, {k: torch.from_numpy(self.store.read(input_array(n, k))) for k in self.input_keys}),
                    torch.from_numpy(self.store.read(f"y_{n}")))
                for n in self.splits}

    def split(self, name: str) -> tuple[Inputs, torch.Tensor]:
        return self._split_tensors[name]

    @property
    def optimizer(self) -> dict:
        return {"class": self.spec.cls, "groups": self.attrs["hyperparameters"]}

    def layers(self) -> dict[str, int]:
        """Layer tree: every module path with the number of trained elements under it."""
        return {lay: sum(self.space.by_name[n].numel for n in self.space.params_of_layer(lay))
                for lay in self.space.layers()}

    @property
    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def info(self) -> dict:
        return {
            "path": str(self.path), "steps": self.n_steps, "complete": self.closed,
            "mode": "dense" if self.dense else f"checkpoint every {self.checkpoint_every}",
            "params": self.space.size, "param_tensors": len(self.space.params),
            "layers": self.layers(), "splits": {n: self.split_size(n) for n in self.splits},
            "optimizer": self.optimizer, "loss": self.attrs["loss"], "dtype": self.attrs["dtype"],
            "factory": self.attrs["factory"], "torch_version": self.attrs["torch_version"],
            "bytes_on_disk": self.bytes_on_disk,
        }

    def __repr__(self) -> str:
        splits = ", ".join(f"{n}={self.split_size(n)}" for n in self.splits)
        mode = "dense" if self.dense else f"ckpt/{self.checkpoint_every}"
        return (f"<Run {self.path.name}: {self.n_steps} steps ({mode}), {self.space.size:,} params in "
                f"{len(self.space.params)} tensors, {self.spec.cls}, splits {splits}>")

    # -- per-step data -----------------------------------------------------------------------
    def step_var(self, name: str) -> np.ndarray:
        if name not in self._steps_cache:
            self._steps_cache[name] = self.store.read(name) if self.n_steps else np.zeros(0)
        return self._steps_cache[name]

    @cached_property
    def _batch_index(self) -> np.ndarray:
        if not self.n_steps:
            return np.zeros(0, np.int64)
        index = self.store.read("batch_index")
        if len(index) and (index.min() < 0 or index.max() >= self.split_size("train")):
            raise StoreError(f"{self.path} is damaged: 'batch_index' names examples outside the train "
                             f"split (0..{self.split_size('train') - 1}); re-record the run")
        return index

    def step_meta(self, s: int) -> StepMeta:
        start, size = int(self.step_var("batch_start")[s]), int(self.step_var("batch_size")[s])
        return StepMeta(self.step_var("lr")[s], self.step_var("weight_decay")[s],
                        float(self.step_var("clip")[s]), float(self.step_var("weight")[s]),
                        torch.from_numpy(self._batch_index[start: start + size].copy()), s)

    def losses(self) -> np.ndarray:
        return self.step_var("loss")

    # -- states ------------------------------------------------------------------------------
    def ckpt_at_or_before(self, state: int) -> int:
        """Position (in ``ckpt_states``) of the last stored state <= ``state``."""
        return int(np.searchsorted(self.ckpt_states, state, side="right") - 1)

    def stored_state(self, pos: int) -> tuple[torch.Tensor, OptState]:
        return self.stored_states(pos, pos + 1)[0]

    def stored_states(self, lo: int, hi: int) -> list[tuple[torch.Tensor, OptState]]:
        """Stored states at positions lo..hi-1, one read per array (each chunk decoded once)."""
        rows = self.ckpt_rows[lo:hi]
        theta = torch.from_numpy(self.store.read("theta", rows))
        bufs = {b: torch.from_numpy(self.store.read(f"opt_{b}", rows)) for b in self.spec.buffers}
        steps, has = self.store.read("opt_step", rows), self.store.read("opt_has_buf", rows)
        return [(theta[i], OptState({b: v[i] for b, v in bufs.items()}, int(steps[i]), bool(has[i])))
                for i in range(len(rows))]

    def state_bytes(self) -> int:
        """Bytes of one stored state (params and optimizer buffers)."""
        return self.space.size * self.store.dtype("theta").itemsize * (1 + len(self.spec.buffers))

    def is_stored(self, state: int) -> bool:
        pos = self.ckpt_at_or_before(state)
        return pos >= 0 and int(self.ckpt_states[pos]) == state

    @cached_property
    def constants(self) -> dict[str, torch.Tensor]:
        names = self.attrs.get("constants", [])
        return {n: torch.from_numpy(self.store.read(f"const_{i}")) for i, n in enumerate(names)}

    def build_model(self) -> torch.nn.Module:
        """A copy of the model given to ``open(path, model=...)``, else the model rebuilt from the recorded
        Hugging Face config or factory, if trusted (its weights are replaced per call either way)."""
        if self.model is not None:
            model, how = copy.deepcopy(self.model), ("the model given to open()", "give the architecture the run "
                                                     "was recorded with")
        else:
            model, how = build(self.attrs, self.trust, self.path), ("the rebuilt model", "the model's code changed "
                                                                    "since recording, or the store is damaged")
        model = architecture.for_transforms(model)
        got = param_shapes(model)
        for info in self.space.params:
            if got.get(info.name) != tuple(info.shape):
                has = f"param '{info.name}' of shape {got[info.name]}" if info.name in got else f"no param '{info.name}'"
                raise StoreError(f"{self.path}: {how[0]} has {has}, but the store recorded {tuple(info.shape)}; "
                                 f"{how[1]}")
        return model
