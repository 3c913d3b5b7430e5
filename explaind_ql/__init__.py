"""explaind_ql: exact, declarative attribution of a trained network to its components, data and steps.

Record a run with :class:`Recorder`, open it with :func:`open`, ask it questions with
``run.query(text)``; :func:`query` and :func:`compare` do the same from paths.
"""

from .api import compare, explain, query
from .errors import ExplaindError
from .recorder import Recorder
from .run import Run


def open(path) -> Run:  # noqa: A001 - the public name is part of the contract
    """Open a recorded run for querying (one-line StoreError if it cannot be read)."""
    return Run(path)


__all__ = ["ExplaindError", "Recorder", "Run", "compare", "explain", "open", "query"]
