"""Rebuilding the model in a query process from an importable ``module:callable`` + JSON kwargs.

The run must be queryable on another machine without the training script, so the
factory is resolved (and the model built once) when recording starts: an unimportable
factory is a record-time error, not a surprise at query time. At query time the factory
is the store's word, so :func:`build` imports it only through :class:`~.trust.Trust`.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Callable

import torch

from .errors import RecordingError, StoreError
from .hf import architecture
from .trust import Trust


def import_callable(ref: str, what: str) -> Callable:
    module, _, attr = ref.partition(":")
    if module == "__main__":
        raise RecordingError(f"{what} {ref!r} lives in __main__ and cannot be imported by a query "
                             "process; move it into an importable module")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise RecordingError(f"cannot import {what} {ref!r} ({exc}); give an importable "
                             "'module:callable'") from None
    if not callable(obj):
        raise RecordingError(f"{what} {ref!r} is not callable")
    return obj


def derive_factory(model: torch.nn.Module, kwargs: dict[str, Any]) -> str | None:
    """``module:ClassName`` of the model's class when that class imports and rebuilds the model from
    ``kwargs``; else None, and a query passes the architecture itself (``open(path, model=...)``)."""
    cls = type(model)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return None
    ref = f"{cls.__module__}:{cls.__qualname__}"
    try:
        check_factory(ref, kwargs, model)
    except RecordingError:
        return None
    return ref


def param_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def check_factory(ref: str, kwargs: dict[str, Any], model: torch.nn.Module) -> None:
    """Build the model once from the factory and check it has the same parameters."""
    try:
        json.dumps(kwargs)
    except TypeError as exc:
        raise RecordingError(f"factory_kwargs must be JSON-serialisable ({exc})") from None
    try:
        built = import_callable(ref, "factory")(**kwargs)
    except RecordingError:
        raise
    except Exception as exc:  # the user's factory may raise anything; report it in one line
        raise RecordingError(f"factory {ref!r} failed with {type(exc).__name__}: {exc}; "
                             "pass factory_kwargs that rebuild the model") from None
    want = param_shapes(model)
    got = param_shapes(built) if isinstance(built, torch.nn.Module) else None
    if got != want:
        raise RecordingError(f"factory {ref!r} builds a model whose parameters differ from the "
                             "recorded model's; pass the factory_kwargs that rebuild it")


def build(attrs: dict, trust: Trust, path) -> torch.nn.Module:
    """Query side: the model a store's metadata names (an HF architecture, or a trusted factory), or a
    one-line store error saying what to pass instead."""
    if architecture.KEY in attrs:
        return architecture.rebuild(attrs[architecture.KEY])
    ref, kwargs = attrs.get("factory"), attrs.get("factory_kwargs") or {}
    if ref is None:
        raise StoreError(f"{path} was recorded without a model factory (its class is not importable); "
                         "pass the architecture: explaind_ql.open(path, model=MyModel(...))")
    factory = trust.load(str(ref))
    if not isinstance(kwargs, dict):
        raise StoreError(f"the store's factory_kwargs are {type(kwargs).__name__}, not a mapping; "
                         "re-record the run")
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise StoreError(f"cannot rebuild the recorded model: factory {ref!r} raised "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise StoreError(f"the store's factory {ref!r} returned {type(model).__name__}, not a "
                         "torch.nn.Module; re-record the run")
    return model
