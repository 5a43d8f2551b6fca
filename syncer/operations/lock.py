"""Lock files: one process at a time does a thing to a database (a sync, ``groups.db.lock``;
delivering its hooks, ``groups.db.hooks.lock``), released by the kernel on any exit.

An advisory ``flock`` on a file beside the database: a crashed or killed process
cannot leave it held, so no stale-lock clean-up is ever needed. The file is 0600,
whatever the umask: ``flock`` works on a read-only descriptor, so anyone who can open
the file can take the lock and hold off every sync (under the service's UMask=0027, a
0640 file let any member of the readers' group do so).

Readers still need to know whether a sync is running (``syncer status`` calls a run
killed mid-way ``aborted``, a live one "in progress"), so a sync that holds the lock
also holds a ``flock`` on a run marker (``groups.db.running``) that they may read. A
reader's lock cannot hold a sync off: each sync makes a new marker file, locks it
while only it knows the file, and only then renames it into place.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from syncer.errors import LockBusy, StorageError, os_problem
from syncer.logs import module_logger

log = module_logger(__name__)


#: what LockBusy says when the sync lock is held
SYNC_BUSY = "another sync is running on this database"


class LockFile:
    """Hold the lock file ``path`` for the duration of a ``with`` block, or raise
    LockBusy at once, saying ``busy`` (who holds it) and the file."""

    def __init__(self, path: Path, busy: str = SYNC_BUSY) -> None:
        self.path = path
        self.busy = busy
        self._fd: int | None = None
        self._marker: int | None = None

    def __enter__(self) -> LockFile:
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
            raise LockBusy(f"{self.busy} (lock {self.path} is held)") from None
        self._fd = fd
        self._marker = _mark_running(marker_path(self.path))
        return self

    def fileno(self) -> int:
        """The locked descriptor: a process it is handed to holds the lock too, until
        every holder has closed it."""
        assert self._fd is not None, "the lock is not held"
        return self._fd

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._marker is not None:
            os.close(self._marker)  # the marker stays, unlocked: no sync is running
            self._marker = None
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def marker_path(lock_path: Path) -> Path:
    """The run marker beside the lock file: ``groups.db.lock`` -> ``groups.db.running``."""
    return lock_path.with_suffix(".running")


def _mark_running(path: Path) -> int | None:
    """Publish a new run marker, locked by this process until it exits; its descriptor.

    Made under the umask like the database (group-readable under the service's), and
    empty, so that a full disk does not stop it. A marker that cannot be made is a
    warning: the sync goes on, and readers may meanwhile call its run aborted.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        temporary.unlink(missing_ok=True)
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as err:
        log.warning("%s: cannot create the run marker (%s): readers may not see this sync", path, err.strerror)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else can know this file yet
        os.replace(temporary, path)
    except OSError as err:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        log.warning("%s: cannot publish the run marker (%s): readers may not see this sync", path, err.strerror)
        return None
    return fd


def sync_running(lock_path: Path) -> bool | None:
    """Whether a sync holds the lock now, as any user who may read the database's folder
    can tell; None when this user cannot tell.

    Reads the run marker: locked means a live sync (the kernel drops the lock when its
    process ends, however it ends). Without a marker (no sync of this release yet) it
    asks the lock file itself, which only its owner may open.
    """
    try:
        fd = os.open(marker_path(lock_path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            return is_held(lock_path)
        except OSError:
            return None
    except OSError:
        return None
    try:
        # a marker is locked before it is published, so this never holds a sync off
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


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
