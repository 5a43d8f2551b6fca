"""The sync lock: one sync at a time per database, released by the kernel on any exit.

An advisory ``flock`` on a file beside the database: a crashed or killed process
cannot leave it held, so no stale-lock clean-up is ever needed.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from syncer.errors import LockBusy, StorageError


class SyncLock:
    """Hold the lock for the duration of a ``with`` block, or raise LockBusy at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> SyncLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as err:
            raise StorageError(f"{self.path}: cannot create lock file: {err.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(f"another sync is running on this database (lock {self.path} is held)") from None
        self._fd = fd
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
