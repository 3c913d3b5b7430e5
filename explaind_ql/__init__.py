"""explaind_ql: exact, declarative attribution of a trained network to its components, data and steps.

Record a run with :class:`Recorder`, open it with :func:`open`, ask it questions with
``run.query(text)``; :func:`query` and :func:`compare` do the same from paths.
"""

from .errors import ExplaindError

# The public names below pull in torch; they are imported on first use so that
# `import explaind_ql` (and `explaind-ql --help`) stays fast.
_LAZY = {"Recorder": ".recorder", "Run": ".run", "compare": ".api", "explain": ".api", "query": ".api"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def open(path, trust=None, model=None):  # noqa: A001 - the public name is part of the contract
    """Open a recorded run for querying (one-line StoreError if it cannot be read).

    ``model``: the architecture (a ``torch.nn.Module``, any weights): the store holds only the
    weights and the param names and shapes they must fit. Without it the model is rebuilt from
    the store's Hugging Face config or model factory.
    ``trust``: module names (``["mypkg.models"]``) the store may import its model factory
    from, besides explaind_ql's own models and those configured (docs/store.md).
    """
    from .api import QueryableRun
    return QueryableRun(path, trust=trust, model=model)


def load_ipython_extension(ipython) -> None:
    """`%load_ext explaind_ql`: registers the `%eql` / `%%eql` magics."""
    from .shells.ipython import load_ipython_extension as load
    load(ipython)


__all__ = ["ExplaindError", "Recorder", "Run", "compare", "explain", "open", "query"]
