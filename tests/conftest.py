"""Shared fixtures: toy runs recorded once per session (recording is the slow part)."""

from __future__ import annotations

import os

import pytest
import torch

from explaind_ql import threads
from explaind_ql.toy import record_toy

# queries keep the one thread below (no load sampling per query); tests of the default unset it
os.environ.setdefault(threads.ENV, "1")


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """``toy_run(model, optimizer, dtype=..., **kw)`` → path of a recorded toy run (cached)."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("runs")

    def make(model="mlp", optimizer="adamw", dtype=torch.float64, **kw):
        key = (model, optimizer, dtype, tuple(sorted(kw.items())))
        if key not in cache:
            name = f"{model}-{optimizer}-{str(dtype)[6:]}-{len(cache)}.zarr"
            cache[key] = record_toy(root / name, model, optimizer, dtype, **kw)
        return cache[key]

    return make


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Toy-sized ops run fastest, and with the least variance, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_path(toy_run) -> str:
    """A 12-step toy transformer run (layers emb, attn, linear1, linear2, unembed)."""
    return str(toy_run("transformer", "adamw", steps=12))
