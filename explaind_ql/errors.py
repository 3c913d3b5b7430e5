"""The project's error types.

Every failure a user can cause (bad query, bad store, unsupported optimizer, a run
that would not fit in memory, an unreachable cluster) is one of these, with a one-line
message that names the problem and the fix. The CLI maps the classes to exit codes
(2 syntax/usage, 3 semantic, 4 runtime), so the hierarchy is part of the contract.
"""

from __future__ import annotations


class ExplaindError(Exception):
    """Base class: a problem the user can fix, reported in one line."""

    exit_code = 4


class QueryError(ExplaindError):
    """An error located in query text; renders a caret line under the position."""

    exit_code = 2

    def __init__(self, message: str, text: str = "", pos: int = 0, hint: str | None = None):
        self.message = message
        self.text = text
        self.pos = max(0, min(pos, len(text)))
        self.hint = hint
        super().__init__(self.render())

    @property
    def line_col(self) -> tuple[int, int]:
        before = self.text[: self.pos]
        line = before.count("\n") + 1  # lines split on "\n" only, here and in render()
        col = self.pos - (before.rfind("\n") + 1) + 1
        return line, col

    def render(self) -> str:
        line, col = self.line_col
        head = f"{self.kind} at line {line}, column {col}: {self.message}"
        if self.hint:
            head += f"; {self.hint}"
        if not self.text:
            return head
        src_line = self.text.split("\n")[line - 1]
        return f"{head}\n  {src_line}\n  {' ' * (col - 1)}^"

    kind = "syntax error"


class QuerySyntaxError(QueryError):
    """The text does not follow the grammar."""

    kind = "syntax error"
    exit_code = 2


class SemanticError(QueryError):
    """The query parses but does not fit the run (unknown layer, out of range, conflict)."""

    kind = "error"
    exit_code = 3


class StoreError(ExplaindError):
    """A store is missing, truncated, corrupted or from a newer format version."""

    exit_code = 4


class DamagedStoreError(StoreError):
    """A chunk of one array failed to decode (checksum mismatch, truncated) or is missing."""

    def __init__(self, path, array: str, reason: str):
        self.array, self.reason = array, reason
        super().__init__(f"{path} is damaged: {reason} in '{array}'; run `explaind-ql verify {path}`, "
                         "then re-record the run or restore it from a copy")


class RecordingError(ExplaindError):
    """The training loop cannot be recorded as set up (unsupported optimizer, model, loss)."""

    exit_code = 4


class VerificationError(RecordingError):
    """The optimizer model did not reproduce the real update at some step."""


class BudgetError(ExplaindError):
    """The plan cannot be chunked under the memory budget."""

    exit_code = 4


class ClusterError(ExplaindError):
    """A Dask scheduler cannot be reached, or a chunk of a distributed query failed for good."""

    exit_code = 4

