"""Progress bars for long queries, drawn on stderr only when a person is watching.

The engine wraps its loops in ``with progress.task("contract", total=n_steps) as t:`` and
calls ``t.advance()`` per step. A rich bar (done/total, ETA) appears only when stderr is a
terminal, so pipes, logs and notebooks stay clean; ``set_enabled(False)`` or the
environment variable ``EXPLAIND_QL_PROGRESS=0`` silences it everywhere. Nested tasks
share one display (rich allows a single live display at a time).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

_enabled = os.environ.get("EXPLAIND_QL_PROGRESS", "1").lower() not in ("0", "false", "no", "off")
_display = None  # the active rich Progress, shared by nested tasks
_depth = 0


def set_enabled(enabled: bool) -> None:
    """Turn progress bars on or off for this process."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    """Whether a task started now would draw a bar."""
    return _enabled and sys.stderr.isatty()


class Task:
    """Handle of one running task; a no-op when nothing is drawn."""

    def __init__(self, display=None, task_id=None):
        self._display = display
        self._id = task_id

    def advance(self, n: float = 1) -> None:
        if self._display is not None:
            self._display.advance(self._id, n)


@contextmanager
def task(description: str, total: float | None) -> Iterator[Task]:
    """Show a bar for `total` units of work (None: unknown total) while the block runs."""
    global _display, _depth
    if not enabled():
        yield Task()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if _display is None:
        _display = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), console=Console(file=sys.stderr),
                            transient=True)
        _display.start()
    display = _display
    task_id = display.add_task(description, total=total)
    _depth += 1
    try:
        yield Task(display, task_id)
    finally:
        _depth -= 1
        display.remove_task(task_id)
        if _depth == 0:
            display.stop()
            _display = None
