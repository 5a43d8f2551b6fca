"""Unit tests of the seam every command opens the output database through
(``syncer.storage.database``): its one-line errors, connections always closed, and one
snapshot for a whole read. In-process: no simulator, no subprocess."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from syncer.errors import EXIT_FAILED, StorageError, SyncerError
from syncer.storage.database import OutputDatabase, open_for_reading, open_for_writing
from syncer.storage.queries import NotFound


def open_descriptors() -> int:
    """How many file descriptors this process has open (a leaked connection keeps one)."""
    return len(os.listdir("/proc/self/fd"))


def is_closed(db: OutputDatabase) -> bool:
    try:
        db.conn.execute("SELECT 1")
    except sqlite3.ProgrammingError:  # "Cannot operate on a closed database."
        return True
    return False


def with_runs(path: Path, runs: int) -> None:
    with open_for_writing(path) as db, db.atomic():
        for _ in range(runs):
            db.execute("INSERT INTO sync_runs (started_at, status) VALUES ('2026-01-01T00:00:00.000000Z', 'ok')")


def run_count(db: OutputDatabase) -> int:
    return int(db.execute("SELECT count(*) FROM sync_runs").fetchone()[0])


def foreign(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()


def test_no_database_yet_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state" / "groups.db"
    with pytest.raises(NotFound) as caught:
        open_for_reading(path)
    assert str(caught.value) == f"no database at {path} yet; run `syncer sync` first"
    assert caught.value.exit_code == EXIT_FAILED
    assert not (tmp_path / "state").exists()


def test_a_file_where_a_folder_is_expected_is_named(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file\n")
    path = tmp_path / "state" / "groups.db"
    for opening in (open_for_reading, open_for_writing):
        with pytest.raises(StorageError) as caught:
            opening(path)
        assert str(caught.value).endswith(f"{tmp_path / 'state'} is a file, not a folder"), opening


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.mkdir(), "cannot open database: it is a folder, not a file"),
        (lambda p: p.write_text("not a database at all\n" * 100), "cannot open database: file is not a database"),
        (foreign, "not a syncer database"),
    ],
    ids=["folder", "text", "foreign-sqlite"],
)
def test_what_is_not_a_syncer_database_is_one_line_and_leaves_nothing_open(
    tmp_path: Path, make: object, says: str
) -> None:
    path = tmp_path / "groups.db"
    make(path)  # type: ignore[operator]
    before = open_descriptors()
    for _ in range(20):  # a leak of one descriptor per failed open would show 20 times over
        with pytest.raises(StorageError) as caught:
            open_for_reading(path)
        assert str(caught.value).startswith(f"{path}: ") and says in str(caught.value)
        assert "\n" not in str(caught.value)
    assert open_descriptors() == before


def test_a_foreign_sqlite_file_can_be_read_as_it_is_where_asked(tmp_path: Path) -> None:
    path = tmp_path / "groups.db"
    foreign(path)
    with open_for_reading(path, syncer_tables=False) as db:
        assert not db["sync_runs"].exists()
    assert is_closed(db)


def test_connections_are_closed_at_the_end_of_the_block_whatever_happens(tmp_path: Path) -> None:
    path = tmp_path / "groups.db"
    with_runs(path, 1)
    before = open_descriptors()
    for _ in range(20):
        with open_for_writing(path) as writer:
            pass
        assert is_closed(writer)
        with open_for_reading(path) as reader:
            assert run_count(reader) == 1
        assert is_closed(reader)
        with pytest.raises(SyncerError) as caught, open_for_reading(path) as reader:
            raise SyncerError("a failure of syncer's own")
        assert type(caught.value) is SyncerError and str(caught.value) == "a failure of syncer's own"  # unchanged
        assert is_closed(reader)
    assert open_descriptors() == before


def test_an_sqlite_error_inside_a_block_becomes_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "groups.db"
    with_runs(path, 1)
    with pytest.raises(StorageError) as caught, open_for_reading(path) as reader:
        reader.execute("SELECT no_such_column FROM sync_runs")
    assert str(caught.value) == (
        f"{path}: no snapshot in this release's format yet (no such column: no_such_column);"
        " run `syncer sync` to create or upgrade it"
    )
    assert is_closed(reader)
    with pytest.raises(StorageError) as caught, open_for_reading(path) as reader:
        reader.execute("INSERT INTO sync_runs (started_at, status) VALUES ('x', 'ok')")
    assert str(caught.value) == f"{path}: cannot read database: attempt to write a readonly database"
    with pytest.raises(StorageError) as caught, open_for_writing(path) as writer:
        writer.execute("INSERT INTO sync_runs (started_at, status) VALUES ('x', 'no such status')")
    assert str(caught.value).startswith(f"{path}: database error: CHECK constraint failed: status IN (")
    assert is_closed(writer)
    with open_for_reading(path) as reader:
        assert run_count(reader) == 1  # the failed write was rolled back when the writer closed


def test_a_read_is_one_snapshot_and_holds_up_no_run(tmp_path: Path) -> None:
    """Under WAL a reader's block sees the runs committed when it began, all through,
    while a run commits meanwhile without waiting for it."""
    path = tmp_path / "groups.db"
    with_runs(path, 2)
    with open_for_reading(path, busy_timeout=0.1) as reader:  # a writer waiting for it would fail fast
        assert run_count(reader) == 2
        with_runs(path, 3)  # committed while the reader is open
        assert run_count(reader) == 2
        assert reader.execute("SELECT max(id) FROM sync_runs").fetchone()[0] == 2
    with open_for_reading(path) as later:
        assert run_count(later) == 5
