"""explaind_ql: exact, declarative attribution of a trained network to its components, data and steps."""

from .errors import ExplaindError
from .recorder import Recorder
from .run import Run


def open(path) -> Run:  # noqa: A001 - the public name is part of the contract
    """Open a recorded run for querying."""
    return Run(path)


__all__ = ["ExplaindError", "Recorder", "Run", "open"]
