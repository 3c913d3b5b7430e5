"""The one-writer rule: ``<store>.lock`` beside the store, whatever the backend.

A second writer is refused whatever ``overwrite`` says; a lock whose process is gone (or,
in this process, whose recorder was dropped without ``close()``) is stale and is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
import weakref
from pathlib import Path

import psutil

from ..errors import StoreError

_live_locks: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # token -> writer


def lock_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".lock")


def _lock_is_stale(info: dict) -> bool:
    """A lock is stale when its writer is gone: its process ended, or (in this process) its
    recorder was dropped without ``close()``. A lock from another host is never judged stale."""
    if info.get("host") != socket.gethostname():
        return False
    pid = info.get("pid")
    if pid == os.getpid():
        return info.get("token") not in _live_locks
    return not (isinstance(pid, int) and psutil.pid_exists(pid))


class WriterLock:
    """``<store>.lock``, created exclusively; released on close or when its writer is collected."""

    def __init__(self, path: Path, owner: object):
        self.path = lock_path(path)
        self.token = uuid.uuid4().hex
        info = {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = self._holder()
                if held is not None and not _lock_is_stale(held):
                    if held.get("pid") == os.getpid():
                        raise StoreError(f"{path} is locked: a Recorder in this process still records there; "
                                         "call its close() (or use it in a with block) before recording "
                                         "again") from None
                    raise StoreError(
                        f"{path} is being recorded by another writer (pid {held.get('pid')} on "
                        f"{held.get('host')}); wait for it to close, or delete {self.path} if no "
                        "writer is running") from None
                self._break()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            break
        else:
            raise StoreError(f"cannot take the writer lock {self.path}; delete it if no writer is running")
        _live_locks[self.token] = owner
        self._finalizer = weakref.finalize(owner, _unlink_if_ours, self.path, self.token)

    def _holder(self) -> dict | None:
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable: a writer died while creating it
        return info if isinstance(info, dict) else None

    def _break(self) -> None:
        try:  # rename first, so two processes breaking one stale lock don't delete a fresh one
            aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
            os.replace(self.path, aside)
            aside.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        self._finalizer()


def _unlink_if_ours(path: Path, token: str) -> None:
    try:
        if json.loads(path.read_text()).get("token") == token:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass

