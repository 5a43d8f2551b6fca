"""The sync lock: one sync at a time per database, released by the kernel on any exit.

An advisory ``flock`` on a file beside the database: a crashed or killed process
cannot leave it held, so no stale-lock clean-up is ever needed. The file is 0600,
whatever the umask: ``flock`` works on a read-only descriptor, so anyone who can open
the file can take the lock and hold off every sync (under the service's UMask=0027, a
0640 file let any member of the readers' group do so).
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

from syncer.errors import LockBusy, StorageError, os_problem

log = logging.getLogger(__name__)


class SyncLock:
    """Hold the lock for the duration of a ``with`` block, or raise LockBusy at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> SyncLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StorageError(f"{self.path}: cannot create lock file: {os_problem(self.path, err)}") from None
        _restrict(fd, self.path)
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


def _restrict(fd: int, path: Path) -> None:
    """Make a lock file left by an older release (created 0640) 0600, as new ones are."""
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except OSError as err:
        # not its owner: the lock still works, but others can take it and stall every sync
        log.warning("%s: cannot make the lock file 0600 (%s): others can block syncs", path, err.strerror)


def is_held(path: Path) -> bool:
    """Whether a sync holds the lock now. Creates nothing and needs only read access;
    raises OSError if the lock file exists but cannot be opened.

    It takes a shared lock for an instant when the lock is free, so a sync starting at
    that very instant finds it busy (exit 75, nothing done): call it only when needed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False  # no sync ever ran on this database
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the shared lock, if taken
    return False
