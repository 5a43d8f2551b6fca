"""Opening the output database: the one place that does, for every command.

Two ways in, each giving an ``OutputDatabase`` to use as a ``with`` block, which
closes the connection at the block's end (a long-lived process, or one interpreter
running many commands, leaks no connection and no file handle) and turns an SQLite
error raised inside it into one line naming the file (``StorageError``, exit 1):

- ``open_for_reading``: read-only (read permission on the file is enough, and so is a
  copy of it; nothing is created), one snapshot for the whole block, and one line for
  anything that is not a usable syncer database: none yet, a file where a folder is
  expected, a folder where the file is expected, not SQLite, SQLite but not syncer's,
  syncer's before this release's tables, damaged;
- ``open_for_writing``: the database and its folder created if need be, in WAL mode,
  its schema brought up to date (``syncer.storage.schema``).

The database is in WAL mode, so that readers never wait for a run and never hold one
up: a run writes in one transaction, open while it reads its groups and committed at
its end; readers meanwhile see the previous run, and a run killed at any moment leaves
nothing a reader has to roll back (its uncommitted frames in ``-wal`` are ignored).
Syncer's readers are often users who may read the files but not write the folder (see
docs/readers.md), and such a reader can open a WAL database only while its ``-wal``
and ``-shm`` files exist: so a writer leaves them in place when it closes (emptied by
a checkpoint, with the database file's group and mode) instead of deleting them, as
SQLite would (``WriterConnection``).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from types import TracebackType

import sqlite_utils

from syncer.errors import StorageError, file_in_the_way, os_problem
from syncer.logs import module_logger

# How long a writer waits for readers (or another writer) before giving up.
BUSY_TIMEOUT_S = 30.0

# How long a writer's closing checkpoint waits for readers still using the WAL before
# it leaves the WAL for the next checkpoint (it never delays a commit, only the close).
CHECKPOINT_WAIT_MS = 250

# SQLite's companions of a WAL database: the log and its shared-memory index.
WAL_FILES = ("-wal", "-shm")

# How much of the file a reader maps: a command reads much of a large file once, and
# mapped pages are not copied into SQLite's cache one read() at a time (`groups` at 1M
# memberships: half the CPU)
READ_MMAP_BYTES = 1 << 30

log = module_logger(__name__)


class OutputDatabase(sqlite_utils.Database):
    """The output database, open for reading or for writing.

    Used as a ``with`` block, it is closed at the block's end, and an SQLite error
    raised inside the block (a damaged page, a full disk, a lock held too long)
    becomes a ``StorageError`` naming the file; syncer's own errors pass unchanged.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, *, readonly: bool) -> None:
        super().__init__(conn, execute_plugins=False)
        self.path = path
        self.readonly = readonly

    def __enter__(self) -> OutputDatabase:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        if isinstance(err, sqlite3.Error):
            raise StorageError(self.problem(err)) from None

    def problem(self, err: sqlite3.Error) -> str:
        """An SQLite error met while using the database, as one line naming the file."""
        if not self.readonly:
            return f"{self.path}: database error: {err}"
        return _read_problem(self.path, err)


def _read_problem(path: Path, err: sqlite3.Error) -> str:
    """An SQLite error met while reading, as one line: an older release's database
    is told apart from a damaged one."""
    if isinstance(err, sqlite3.OperationalError) and _missing_interface(err):
        return f"{path}: no snapshot in this release's format yet ({err}); run `syncer sync` to create or upgrade it"
    # damaged: "database disk image is malformed", "file is not a database"
    return f"{path}: cannot read database: {err}"


def _missing_interface(err: sqlite3.OperationalError) -> bool:
    """Whether a query failed because the database predates the tables or views it asks for."""
    return "no such table" in str(err) or "no such column" in str(err)


def require_existing(path: Path) -> None:
    """Raise the one-line error for a database that is not there yet (exit 1): none
    yet (``NotFound``), or a file standing where one of its folders should be."""
    from syncer.storage.queries import NotFound

    if not path.exists():
        if blocker := file_in_the_way(path):
            raise StorageError(f"{path}: cannot open database: {blocker} is a file, not a folder")
        raise NotFound(f"no database at {path} yet; run `syncer sync` first")


def open_for_reading(path: Path, busy_timeout: float = BUSY_TIMEOUT_S, *, syncer_tables: bool = True) -> OutputDatabase:
    """The output database, open read-only, in one snapshot: every part of an answer
    (a report's sections, status's figures and hooks) is of the same runs.

    In WAL mode the snapshot is a read transaction, which holds up no run (a database
    not in WAL mode, as an older release left it, is read statement by statement,
    waiting up to ``busy_timeout`` for a run's commit). ``syncer_tables``: a file
    without syncer's tables is an error ("not a syncer database"); False lets the
    caller read one as it is (``syncer status`` while the first run creates them).
    """
    require_existing(path)
    db = connect(path, readonly=True, busy_timeout=busy_timeout)
    try:
        db.execute(f"PRAGMA mmap_size = {READ_MMAP_BYTES}")
        if db.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            db.execute("BEGIN")
        if syncer_tables and not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'sync_runs'").fetchall():
            raise StorageError(
                f"{path}: not a syncer database (an SQLite file without syncer's tables); check `database` in the configuration"
            )
    except sqlite3.Error as err:
        db.close()
        raise StorageError(_read_problem(path, err)) from None
    except BaseException:
        db.close()
        raise
    return db


def open_for_writing(path: Path, busy_timeout: float = BUSY_TIMEOUT_S) -> OutputDatabase:
    """The output database, open read-write, its schema up to date (created, with its
    folder, if need be; a database of an older release upgraded in place)."""
    from syncer.storage.schema import ensure_schema

    db = connect(path, busy_timeout=busy_timeout)
    try:
        ensure_schema(db)
    except BaseException:
        db.close()
        raise
    return db


def connect(path: Path, *, readonly: bool = False, busy_timeout: float = BUSY_TIMEOUT_S) -> OutputDatabase:
    """One connection to the output database, as it is: no schema applied, no snapshot
    taken. What ``open_for_reading`` and ``open_for_writing`` build on (and tests that
    need a database as an older release left it); commands use those.

    Raises StorageError with a one-line reason for anything that is not a usable
    SQLite file: a missing folder that cannot be made, a file of another kind, no
    permission.
    """
    conn = _open_connection(path, readonly, busy_timeout)
    try:
        return OutputDatabase(conn, path, readonly=readonly)
    except BaseException:
        conn.close()
        raise


class WriterConnection(sqlite3.Connection):
    """A read-write connection that leaves the WAL's files in place when it closes.

    SQLite's last connection to close checkpoints the WAL and deletes ``-wal`` and
    ``-shm``; a reader who may not create files in the folder can then no longer open
    the database at all. On close this connection checkpoints the WAL into the
    database (truncating ``-wal`` to 0 bytes, so an unchanged run adds nothing to any
    file), then closes while a read-only connection of its own holds the database
    open. SQLite deletes the WAL's files only with an exclusive lock, which neither
    connection then gets: the read-only one cannot take it, having opened the file
    read-only.
    """

    def close(self) -> None:
        keeper: sqlite3.Connection | None = None
        try:
            name = self.execute("PRAGMA database_list").fetchone()[2]
            if not name:  # an in-memory database: no files to keep
                return
            path = Path(name)
            if self.in_transaction:
                self.rollback()
            if self.total_changes:  # nothing written (say, the database was locked): nothing to move
                self.execute(f"PRAGMA busy_timeout = {CHECKPOINT_WAIT_MS}")
                busy = self.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                if busy:
                    log.debug("%s: the WAL is still in use by a reader; the next run checkpoints it", path)
            keeper = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
            keeper.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except (sqlite3.Error, OSError) as err:
            # closing must not fail: at worst a reader sees the files gone until the next run
            log.debug("could not keep the WAL files while closing: %s", err)
        finally:
            super().close()
            if keeper is not None:
                keeper.close()


def _open_connection(path: Path, readonly: bool, busy_timeout: float) -> sqlite3.Connection:
    """One connection to the output database (creating it and its folder unless ``readonly``).

    A writer's connection puts the database in WAL mode (converting a database of an
    older release in place) and gives the WAL's files the database file's group and
    mode, so the users who may read the one may read the others.
    """
    if path.is_dir():  # SQLite would say only "disk I/O error"
        raise StorageError(f"{path}: cannot open database: it is a folder, not a file")
    try:
        if readonly:
            # a WAL database without its log holds everything in the file: read it as it
            # is, creating nothing (a copy on read-only media, or after another tool's close)
            whole = _whole_without_wal(path)
            options = "mode=ro&immutable=1" if whole else "mode=ro"
            conn = sqlite3.connect(f"{path.absolute().as_uri()}?{options}", uri=True, timeout=busy_timeout)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=busy_timeout, factory=WriterConnection)
        try:
            _prepare(conn, path, readonly)
        except BaseException:
            conn.close()  # a connection that is not handed out is not left open
            raise
    except OSError as err:
        raise StorageError(f"{path}: cannot open database: {os_problem(path, err)}") from None
    except sqlite3.Error as err:
        raise StorageError(f"{path}: cannot open database: {err}") from None
    return conn


def _prepare(conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
    """Check that the file is SQLite; a writer's connection is then put in WAL mode."""
    try:
        conn.execute("PRAGMA schema_version").fetchone()  # fails fast on a non-SQLite file
    except sqlite3.Error as err:
        if readonly and _is_wal(path) and not path.with_name(path.name + "-shm").exists():
            raise StorageError(
                f"{path}: cannot read the database: its {path.name}-shm file is missing and this user may"
                f" not create it; the next sync puts it back ({err})"
            ) from None
        raise
    if not readonly:
        # WAL: readers and the run's transaction never wait for each other; FULL:
        # a committed run survives a power loss, as it did with the rollback journal
        if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
            raise StorageError(f"{path}: cannot put the database in WAL mode (is it on a network file system?)")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA cache_size=-32768")
        conn.execute("PRAGMA foreign_keys=ON")
        share_wal_files(path)


def _is_wal(path: Path) -> bool:
    """Whether ``path`` is a WAL-mode SQLite database (its header says so)."""
    try:
        with path.open("rb") as file:
            header = file.read(20)
    except OSError:
        return False
    return len(header) == 20 and header[18:20] == b"\x02\x02"


def _whole_without_wal(path: Path) -> bool:
    """Whether ``path`` is a WAL database with no log beside it and no sync writing it.

    Then the file alone holds the whole database (SQLite checkpoints the log into it
    before it deletes the log), and a reader may read it as immutable: without the
    ``-wal``/``-shm`` files, which a reader who may not write the folder cannot create.
    """
    from syncer.operations.lock import sync_running

    log_file = path.with_name(path.name + "-wal")
    if not _is_wal(path) or log_file.exists():
        return False
    return sync_running(path.with_name(path.name + ".lock")) is False


def share_wal_files(path: Path) -> None:
    """Give ``-wal`` and ``-shm`` the database file's group and read bits.

    SQLite creates them with the database file's mode, but with the group of the user
    who creates them: in a folder without the setgid bit (or after the database's group
    was changed by hand) the database's group readers could read the database and not
    its WAL. Only the files' owner can change this; for anyone else it is a warning.
    """
    target = path.stat()
    for suffix in WAL_FILES:
        companion = path.with_name(path.name + suffix)
        try:
            current = companion.stat()
            if current.st_gid != target.st_gid:
                os.chown(companion, -1, target.st_gid)
            mode = target.st_mode & 0o666
            if current.st_mode & 0o777 != mode:
                os.chmod(companion, mode)
        except FileNotFoundError:
            continue
        except OSError as err:
            log.warning("%s: cannot give it the database's group and mode (%s): group readers may fail", companion, err.strerror)
