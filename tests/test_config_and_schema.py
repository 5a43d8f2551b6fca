"""Unit tests: configuration rules and schema upgrades in place."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlite_utils
from conftest import Env
from inprocess import invoke

from syncer.config import GROUPS_SCOPE, TUTORIAL_CLIENT_ID, load_config, parse_duration
from syncer.errors import ConfigError
from syncer.storage import database, schema

# databases written by 0.1.0, and by the last release before 0004 (the demo's two runs)
FIXTURES = [Path(__file__).parent / "fixtures" / name for name in ("groups-0.1.0.db", "groups-0003.db")]
MEMBERSHIP_COLUMNS = ("group_id, identity_id, username, role, status, status_reason, membership_fields, updated,"
                      " first_seen, last_seen")
IDENTITY_COLUMNS = "id, username, name, email, institution, first_seen, last_seen"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("SYNCER_CONFIG", "CONFIGURATION_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.mark.parametrize(
    "text, seconds",
    [("15m", 900), ("90s", 90), ("1h30m", 5400), ("2d", 172800), ("0.5s", 0.5), (" 1M ", 60)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "m", "15x", "1h 30m", "-5s", "15m3", "inf", "nan", "1e400", "1_000", "366d", "9" * 400 + "s",
             "45", "1.5", "0", "-3"]  # a bare number has no unit: seconds or minutes?
)
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_defaults_without_any_file(tmp_path: Path) -> None:
    config = load_config()
    assert config.source is None
    assert config.client_id == TUTORIAL_CLIENT_ID and config.uses_tutorial_client
    assert config.scopes == (GROUPS_SCOPE,)
    assert config.interval == 900 and config.concurrency == 8 and config.my_statuses == ("active",)
    assert config.database == tmp_path / "xdg-data" / "syncer" / "groups.db"
    assert config.token_storage.parent == config.database.parent


def test_systemd_directories(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "syncer.toml").write_text('interval = "5m"\n')
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", str(tmp_path / "etc"))
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path / 'state'}:{tmp_path / 'other'}")
    config = load_config()
    assert config.source == tmp_path / "etc" / "syncer.toml"
    assert config.interval == 300
    assert config.database == tmp_path / "state" / "groups.db"
    assert config.token_storage == tmp_path / "state" / "tokens.db"


def test_search_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    user = tmp_path / "xdg-config" / "syncer" / "syncer.toml"
    user.parent.mkdir(parents=True)
    user.write_text("concurrency = 2\n")
    assert load_config().concurrency == 2
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", str(tmp_path))
    (tmp_path / "syncer.toml").write_text("concurrency = 3\n")
    assert load_config().concurrency == 3
    (tmp_path / "env.toml").write_text("concurrency = 4\n")
    monkeypatch.setenv("SYNCER_CONFIG", str(tmp_path / "env.toml"))
    assert load_config().concurrency == 4
    (tmp_path / "explicit.toml").write_text("concurrency = 5\n")
    assert load_config(tmp_path / "explicit.toml").concurrency == 5


def test_relative_paths_resolve_against_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf" / "syncer.toml"
    conf.parent.mkdir()
    conf.write_text('database = "data/groups.db"\ntoken_storage = "/abs/tokens.db"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(conf)
    assert config.database == tmp_path / "conf" / "data" / "groups.db"
    assert config.token_storage == Path("/abs/tokens.db")


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "syncer.toml"
    conf.write_text('interval = "1h"\nmy_statuses = ["active"]\n')
    monkeypatch.setenv("SYNCER_INTERVAL", "2m")
    monkeypatch.setenv("SYNCER_MY_STATUSES", "active, invited")
    monkeypatch.setenv("SYNCER_CONCURRENCY", "3")
    monkeypatch.setenv("SYNCER_GROUPS", "D3974728-6458-11E4-B72D-123139141556")
    config = load_config(conf)
    assert config.interval == 120
    assert config.my_statuses == ("active", "invited")
    assert config.concurrency == 3
    assert config.groups == ("d3974728-6458-11e4-b72d-123139141556",)


@pytest.mark.parametrize(
    "body, key",
    [
        ('concurrency = "eight"', "concurrency"),
        ("concurrency = 0", "concurrency"),
        ("concurrency = true", "concurrency"),
        ('interval = "soon"', "interval"),
        ("interval = 0", "interval"),
        ('client_id = "not-a-uuid"', "client_id"),
        ('scopes = "one"', "scopes"),
        ("scopes = []", "scopes"),
        ('scopes = ["openid"]', "scopes"),
        ("client_secret_file = 3", "client_secret_file"),
        ('my_statuses = ["asleep"]', "my_statuses"),
        ('groups = ["nope"]', "groups"),
        ("database = 3", "database"),
        ("jitter = -1", "jitter"),
        ('surprise = "key"', "surprise"),
        # text an environment variable would be read from is not a number or a list in a file
        ('concurrency = "8"', "concurrency"),
        ('groups = "d3974728-6458-11e4-b72d-123139141556"', "groups"),
        ('my_statuses = "active"', "my_statuses"),
        # no infinite or absurdly long durations: they overflowed the scheduler's arithmetic
        ('interval = "inf"', "interval"),
        ('interval = "1e400"', "interval"),
        ('interval = "nan"', "interval"),
        ("interval = inf", "interval"),
        ("interval = nan", "interval"),
        ("interval = 1e400", "interval"),
        ('interval = "1000000d"', "interval"),
        ('jitter = "inf"', "jitter"),
        ("jitter = inf", "jitter"),
        ('busy_timeout = "30d"', "busy_timeout"),  # SQLite would silently wait not at all
    ],
)
def test_invalid_values_name_file_and_key(tmp_path: Path, body: str, key: str) -> None:
    conf = tmp_path / "syncer.toml"
    conf.write_text(body + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config(conf)
    assert str(conf) in str(caught.value) and f"'{key}'" in str(caught.value)
    assert caught.value.exit_code == 78


def test_file_values_keep_their_toml_types(tmp_path: Path) -> None:
    conf = tmp_path / "syncer.toml"
    conf.write_text(
        'interval = "90s"\njitter = "1.5s"\nhttp_timeout = "10s"\nconcurrency = 8\n'
        'scopes = ["openid", "urn:globus:auth:scope:groups.api.globus.org:all"]\n'
        'groups = ["d3974728-6458-11e4-b72d-123139141556"]\nmy_statuses = ["active", "invited"]\n'
    )
    config = load_config(conf)
    assert (config.interval, config.jitter, config.http_timeout, config.concurrency) == (90, 1.5, 10, 8)
    assert config.scopes == ("openid", "urn:globus:auth:scope:groups.api.globus.org:all")
    assert config.my_statuses == ("active", "invited")
    assert config.groups == ("d3974728-6458-11e4-b72d-123139141556",)


@pytest.mark.parametrize(
    "name, value", [("SYNCER_CONCURRENCY", "lots"), ("SYNCER_INTERVAL", "inf"), ("SYNCER_JITTER", "nan")]
)
def test_invalid_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_config()


@pytest.mark.parametrize("interval", ["inf", "nan", "1e400", "366d"])
def test_run_interval_option_is_a_usage_error(tmp_path: Path, interval: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCER_")}
    env["SYNCER_CONFIG"] = str(tmp_path / "absent.toml")  # never read: the option is checked first
    result = invoke(["run", "--interval", interval], env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("syncer: error: ")
    assert "'--interval'" in result.stderr and repr(interval) in result.stderr


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_schema_is_idempotent(tmp_path: Path) -> None:
    db = database.open_for_writing(tmp_path / "g.db")
    first = sorted(db.execute("SELECT type, name, sql FROM sqlite_master").fetchall())
    db.close()
    db = database.open_for_writing(tmp_path / "g.db")
    assert sorted(db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()) == first
    assert [m.name for m in schema.migrations.applied(db)] == [m.name for m in schema.migrations._migrations]
    db.close()


def test_membership_changes_finds_the_previous_version_by_membership(tmp_path: Path) -> None:
    """Not through every version the run closed (47 s against 0.6 s over 31 runs)."""
    db = database.open_for_writing(tmp_path / "g.db")
    plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN SELECT * FROM membership_changes WHERE run_id = 2")]
    db.close()
    lookups = [step for step in plan if step.startswith("SEARCH o ")]
    assert lookups and all("group_key=?" in step and "identity_key=?" in step for step in lookups), plan


def test_changed_view_definition_is_replaced(tmp_path: Path) -> None:
    db = database.open_for_writing(tmp_path / "g.db")
    db.execute("DROP VIEW active_members")
    db.execute("CREATE VIEW active_members AS SELECT 1 AS stale")
    db.execute("DROP INDEX idx_membership_state_identity")
    db.close()
    db = database.open_for_writing(tmp_path / "g.db")
    assert "group_name" in db["active_members"].columns_dict
    assert "idx_membership_state_identity" in {i.name for i in db["membership_state"].indexes}
    db.close()


def _snapshot(conn: sqlite3.Connection) -> dict[str, list[tuple[object, ...]]]:
    """What users see, in the columns every schema version has had."""
    queries = {
        "runs": "SELECT * FROM sync_runs ORDER BY id",
        "groups": "SELECT id, name, description, parent_id, group_type, group_visibility, group_members_visibility,"
        " members_visible, my_role, my_status, first_seen, last_seen, removed_at FROM groups ORDER BY id",
        "history": "SELECT group_id, identity_id, role, status, valid_from, valid_to, from_run, to_run"
        " FROM membership_history ORDER BY group_id, identity_id, from_run",
        "memberships": f"SELECT {MEMBERSHIP_COLUMNS} FROM memberships ORDER BY 1, 2",
        "identities": f"SELECT {IDENTITY_COLUMNS} FROM identities ORDER BY 1",
        "changes": "SELECT at, run_id, group_id, identity_id, username, change, old_role, new_role, old_status,"
        " new_status FROM membership_changes ORDER BY run_id, group_id, identity_id, change",
    }
    return {name: conn.execute(sql).fetchall() for name, sql in queries.items()}


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda path: path.name)
def test_an_older_database_is_upgraded_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture: Path) -> None:
    """Databases written by 0.1.0 and by the release before the history rework (kept as
    fixtures) open, migrate, and keep everything users saw; reasons are inferred."""
    path = tmp_path / "groups.db"
    shutil.copy(fixture, path)
    old = sqlite3.connect(path)
    before = _snapshot(old)
    gone_runs = dict(old.execute(
        "SELECT g.id, r.id FROM groups g JOIN sync_runs r ON r.started_at = g.removed_at").fetchall())
    old.close()
    assert all(before.values())

    # a later release's migration, as the next version would add it
    later = sqlite_utils.Migrations("syncer")
    for migration in schema.migrations._migrations:
        later(name=migration.name)(migration.fn)

    @later(name="9999_test_note")
    def note(db: sqlite_utils.Database) -> None:
        db.execute("ALTER TABLE group_state ADD COLUMN note TEXT")

    monkeypatch.setattr(schema, "migrations", later)
    db = database.open_for_writing(path)
    try:
        assert "note" in db["group_state"].columns_dict
        assert _snapshot(db.conn) == before
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert not {"old_groups", "old_membership_history"} & set(db.table_names())
        first_run = db.execute("SELECT min(id) FROM sync_runs").fetchone()[0]
        for row in db.query("SELECT run_id, group_id, change, reason FROM membership_changes"):
            if row["change"] == "changed":
                expected = {"changed"}
            elif row["run_id"] == first_run:
                expected = {"first_seen"}
            elif row["change"] == "removed" and gone_runs.get(row["group_id"]) == row["run_id"]:
                expected = {"group_gone"}
            else:  # joined or widened view, left or narrowed: the old tables cannot tell
                expected = {"unknown"}
            assert row["reason"] in expected, row
        # each group has one version, as last read
        versions = db.execute("SELECT group_id, name, from_run, to_run FROM group_history ORDER BY 1").fetchall()
        assert [(g, n) for g, n, *_ in versions] == [(g[0], g[1]) for g in before["groups"]]
    finally:
        db.close()


_KILLED_MIDWAY = """
import dataclasses, os, signal, sys
from pathlib import Path
from syncer.storage import database, schema
migration = next(m for m in schema.migrations._migrations if m.name == "0004_compact_history")
convert = migration.fn
def convert_then_die(db):
    convert(db)
    os.kill(os.getpid(), signal.SIGKILL)  # converted, not yet committed
migrations = schema.migrations._migrations
migrations[migrations.index(migration)] = dataclasses.replace(migration, fn=convert_then_die)
database.open_for_writing(Path(sys.argv[1]))
"""


def test_an_upgrade_killed_midway_leaves_the_old_database(tmp_path: Path) -> None:
    path = tmp_path / "groups.db"
    shutil.copy(FIXTURES[-1], path)
    before = _snapshot(sqlite3.connect(path))
    killed = subprocess.run([sys.executable, "-c", _KILLED_MIDWAY, str(path)], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    # the open made the database WAL before the migration began: what the killed upgrade
    # wrote is uncommitted frames in -wal, which every reader ignores (read-only ones too)
    assert Path(f"{path}-wal").exists() and not Path(f"{path}-journal").exists()
    old = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    assert _snapshot(old) == before
    assert "membership_versions" not in {r[0] for r in old.execute("SELECT name FROM sqlite_master")}
    old.close()
    db = database.open_for_writing(path)  # and the next open upgrades it
    assert _snapshot(db.conn) == before
    db.close()


def test_first_release_database_keeps_working(env: Env) -> None:
    """Syncing into the 0.1.0 fixture continues its run ids and history."""
    shutil.copy(FIXTURES[0], env.database)
    columns = "group_id, identity_id, role, status, from_run, to_run"
    before = env.query(f"SELECT {columns} FROM membership_history")
    assert env.login().returncode == 0
    result = env.run("sync")
    assert result.returncode == 0, result.output
    runs = env.query("SELECT id, status FROM sync_runs ORDER BY id")
    assert [r["id"] for r in runs] == [1, 2, 3] and runs[-1]["status"] == "ok"
    kept = {tuple(r) for r in env.query(f"SELECT {columns} FROM membership_history WHERE from_run < 3")}
    assert {tuple(r) for r in before if r["to_run"] is not None} <= kept


@pytest.mark.parametrize(
    "where, value",
    [("file", "interval = 15"), ("file", "jitter = 30"), ("file", "http_timeout = 1.5"),
     ("environment", "SYNCER_INTERVAL=15"), ("environment", "SYNCER_BUSY_TIMEOUT=2.5")],
)
def test_a_bare_number_as_a_duration_is_a_config_error(tmp_path: Path, where: str, value: str) -> None:
    """`interval = 15` meant minutes and polled every 15 s: now `syncer sync` refuses it, naming file and key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCER_", "GLOBUS_"))}
    conf = tmp_path / "syncer.toml"
    conf.write_text('database = "groups.db"\ntoken_storage = "tokens.db"\n' + (value + "\n" if where == "file" else ""))
    env["SYNCER_CONFIG"] = str(conf)
    if where == "environment":
        name, number = value.split("=")
        env[name] = number
    result = invoke(["sync"], env, tmp_path)
    assert result.returncode == 78, result.stderr
    [line] = result.stderr.splitlines()
    named = str(conf) + ": key '" + value.split(" =")[0] + "'" if where == "file" else f"environment variable {name}"
    assert line.startswith(f"syncer: error: {named}: ") and "no unit" in line, line
    assert not (tmp_path / "groups.db").exists()  # nothing was started


def test_run_interval_without_a_unit_is_a_usage_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCER_")}
    env["SYNCER_CONFIG"] = str(tmp_path / "absent.toml")
    result = invoke(["run", "--interval", "15"], env, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "'--interval'" in result.stderr and "'15' has no unit" in result.stderr
