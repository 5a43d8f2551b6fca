"""Unit tests: the verdict and exit code of `syncer status`, from the runs recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncer.config import Config
from syncer.operations import status
from syncer.operations.lock import LockFile
from syncer.storage.database import open_for_writing
from syncer.storage.schema import utc_now

LOGGED_IN = status.TokenState("tokens.db", logged_in=True)


def config_with_runs(tmp_path: Path, *statuses: str) -> Config:
    """A database whose runs have these statuses, oldest first, all started just now."""
    config = Config(database=tmp_path / "groups.db", token_storage=tmp_path / "tokens.db")
    db = open_for_writing(config.database)
    try:
        with db.atomic():
            for run_status in statuses:
                db.execute(
                    "INSERT INTO sync_runs (started_at, status, error, pid) VALUES (?, ?, ?, 4321)",
                    [utc_now(), run_status, "boom" if run_status == "failed" else None],
                )
    finally:
        db.close()
    return config


@pytest.mark.parametrize(
    "previous, exit_code, verdict",
    [("failed", 1, "failed: run 6: boom"), ("partial", 3, "partial: run 6"), ("ok", 0, "ok: run 6")],
)
def test_a_sync_in_progress_does_not_hide_the_last_finished_run(
    tmp_path: Path, previous: str, exit_code: int, verdict: str
) -> None:
    config = config_with_runs(tmp_path, "ok", "ok", "ok", "ok", "partial", previous, "running")
    with LockFile(config.lock_path):  # the run in progress holds the lock, as a live sync does
        database, _ = status.database_state(config)
        health = status.assess(config, LOGGED_IN, database)
    assert health.exit_code == exit_code and health.verdict.startswith(verdict)
    assert health.verdict.endswith("; run 7 is in progress")
    assert database.recorded is not None and database.recorded.sync_in_progress is True


def test_the_first_run_in_progress_is_no_finished_run(tmp_path: Path) -> None:
    config = config_with_runs(tmp_path, "running")
    with LockFile(config.lock_path):
        health = status.assess(config, LOGGED_IN, status.database_state(config)[0])
    assert (health.exit_code, health.verdict) == (1, "no finished run yet; run 1 is in progress")


@pytest.mark.parametrize("lock_file", [True, False], ids=["lock-file-left", "no-lock-file"])
def test_a_running_row_without_a_live_sync_counts_as_aborted(tmp_path: Path, lock_file: bool) -> None:
    config = config_with_runs(tmp_path, "ok", "running")
    if lock_file:
        with LockFile(config.lock_path):  # the crashed run's lock, released by the kernel
            pass
    database, _ = status.database_state(config)
    health = status.assess(config, LOGGED_IN, database)
    assert health.exit_code == 1 and health.verdict.startswith("aborted: run 2 ")
    assert database.recorded is not None and database.recorded.sync_in_progress is False
    assert config.lock_path.exists() == lock_file  # status creates nothing
    with LockFile(config.lock_path):  # and holds nothing: the next sync can start
        pass


def test_status_keeps_its_keys_and_adds_the_sync_in_progress(tmp_path: Path) -> None:
    config = config_with_runs(tmp_path, "ok")
    report = status.status_report(config)
    data = report.to_json()
    assert {"health", "exit_code", "tokens", "database"} <= data.keys()
    assert {"path", "exists", "size_bytes", "counts", "recent_runs", "last_success_at"} <= data["database"].keys()
    assert data["database"]["sync_in_progress"] is False
    assert data["database"]["recent_runs"][0]["status"] == "ok"
    assert "status: " in status.render_text(report)
