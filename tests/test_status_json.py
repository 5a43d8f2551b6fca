"""Unit tests: ``syncer status --json`` keeps its keys, in their order, from the typed
``StatusReport`` (users and monitors parse it); the text and the metrics are made from
the same report. In-process: no simulator, no subprocess."""

from __future__ import annotations

from pathlib import Path

from syncer.config import Config, HookConfig
from syncer.operations import status
from syncer.operations.metrics import RunOutcome, render_metrics
from syncer.storage.database import open_for_writing

EXCLUDED = "11111111-1111-1111-1111-111111111111"
STARTED = "2026-12-01T00:00:00.000000Z"


def recorded_config(tmp_path: Path) -> Config:
    """A database with two runs, an owner, an excluded group it knows the name of, a
    group needing a login, and a hook that has a position."""
    config = Config(
        database=tmp_path / "groups.db", token_storage=tmp_path / "tokens.db", exclude_groups=(EXCLUDED,),
        hooks=(HookConfig(name="web", url="http://127.0.0.1:9/"), HookConfig(name="new", command=("true",))),
    )
    with open_for_writing(config.database) as db, db.atomic():
        for run_status in ("ok", "failed"):
            db.execute(
                "INSERT INTO sync_runs (started_at, finished_at, status, error, exit_code, pid) VALUES (?, ?, ?, ?, 0, 7)",
                [STARTED, STARTED, run_status, "boom" if run_status == "failed" else None],
            )
        db.execute("INSERT INTO database_owner VALUES (1, 'identity', 'me-id', 'me@example.org', ?, 1)", [STARTED])
        db.execute("INSERT INTO group_state (id, name, members_view, first_run, last_run) VALUES (?, 'Old', 'all', 1, 1)",
                   [EXCLUDED])
        db.execute("INSERT INTO group_state (id, name, members_view, first_run, last_run, needs_login)"
                   " VALUES ('g2', 'Vault', 'all', 1, 1, 'mfa')")
        db.execute("INSERT INTO hook_deliveries (hook, delivered_run, failing_run, error, failures)"
                   " VALUES ('web', 1, 2, 'HTTP 500', 2)")
    return config


def test_the_json_keeps_every_key_in_its_place(tmp_path: Path) -> None:
    config = recorded_config(tmp_path)
    data = status.status_report(config).to_json()
    assert list(data) == ["health", "exit_code", "tokens", "database", "hooks"]
    assert data["tokens"] == {"path": str(config.token_storage), "logged_in": False, "login_required": True}
    database = data["database"]
    assert list(database) == [
        "path", "exists", "excluded_groups", "size_bytes", "counts", "recent_runs", "needs_login",
        "last_success_at", "owner", "sync_in_progress",
    ]
    assert database["excluded_groups"] == [{"id": EXCLUDED, "name": "Old"}]
    assert database["counts"] == {
        "groups": 2, "groups_removed": 0, "memberships": 0, "identities": 0, "history_rows": 0, "runs": 2,
    }
    assert database["recent_runs"][0] == {
        "id": 2, "started_at": STARTED, "finished_at": STARTED, "status": "failed", "groups_synced": 0,
        "groups_failed": 0, "memberships": 0, "changes": 0, "error": "boom", "exit_code": 0, "pid": 7,
    }
    assert database["needs_login"] == [{"id": "g2", "name": "Vault", "asked": "mfa"}]
    assert database["owner"] == {
        "kind": "identity", "id": "me-id", "username": "me@example.org", "recorded_at": STARTED, "recorded_by_run": 1,
    }
    assert (database["last_success_at"], database["sync_in_progress"]) == (STARTED, False)
    assert data["hooks"] == [
        {"hook": "web", "delivered_run": 1, "runs": 0, "oldest_run": None, "oldest_at": None,
         "failing_run": 2, "error": "HTTP 500", "failures": 2},
        {"hook": "new", "delivered_run": None, "runs": 0, "oldest_run": None, "oldest_at": None,
         "failing_run": None, "error": None, "failures": 0},
    ]


def test_no_database_yet_has_only_what_is_known(tmp_path: Path) -> None:
    config = Config(database=tmp_path / "groups.db", token_storage=tmp_path / "tokens.db", exclude_groups=(EXCLUDED,))
    report = status.status_report(config)
    assert report.to_json()["database"] == {
        "path": str(config.database), "exists": False, "excluded_groups": [{"id": EXCLUDED, "name": None}],
    }
    assert f"database: not created yet ({config.database})" in status.render_text(report)
    assert not config.database.exists()  # status creates nothing


def test_text_and_metrics_are_made_from_the_same_report(tmp_path: Path) -> None:
    report = status.status_report(recorded_config(tmp_path))
    text = status.render_text(report)
    assert text.startswith(f"status: {report.health.verdict}\n")
    assert "  belongs to me@example.org (me-id) (recorded by run 1 at 2026-12-01T00:00:00.000000Z)" in text
    assert "needs login: group 'Vault' (g2)" in text and "  #2 2026-12-01T00:00:00.000000Z failed " in text
    assert "  web: up to date; run 2 failed 2 time(s) in a row: HTTP 500" in text
    metrics = render_metrics(report)
    assert f"syncer_status_exit_code {float(report.health.exit_code)}" in metrics
    assert "syncer_groups 2.0" in metrics and 'syncer_hook_backlog_runs{hook="web"} 0.0' in metrics
    unreadable = render_metrics(None, RunOutcome(1, 5.0))  # the metrics file of a run whose database cannot be read
    assert "syncer_database_readable 0.0" in unreadable and "syncer_last_run_exit_code 1.0" in unreadable
    assert "syncer_groups" not in unreadable
