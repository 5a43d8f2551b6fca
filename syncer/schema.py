"""The output database: opening it, its versioned tables, and its indexes and views.

Tables are created by numbered migrations (sqlite-utils ``Migrations``), so a later
release upgrades an existing database in place. Indexes and views are declared as
data below and applied idempotently on every open: a changed view definition is
replaced, a missing index is created.

The database uses SQLite's rollback journal, not WAL: a WAL database cannot be read
by a user who may not write its folder unless the ``-wal`` and ``-shm`` files happen
to exist, and syncer's readers are often exactly such users (see README, "Reading
the database as another user"). syncer writes once per run in one short transaction,
so WAL's concurrency gain is small here.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path

import sqlite_utils
from sqlite_utils import Migrations

from syncer.errors import StorageError

# How long a writer waits for readers (or another writer) before giving up.
BUSY_TIMEOUT_S = 30.0

migrations = Migrations("syncer")


@migrations(name="0001_initial")
def _initial(db: sqlite_utils.Database) -> None:
    db.executescript(
        """
        CREATE TABLE sync_runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            status TEXT NOT NULL
                CHECK (status IN ('running', 'ok', 'partial', 'failed', 'aborted')),
            groups_synced INTEGER NOT NULL DEFAULT 0,
            groups_failed INTEGER NOT NULL DEFAULT 0,
            memberships INTEGER NOT NULL DEFAULT 0,
            changes INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            failed_groups TEXT,
            exit_code INTEGER,
            pid INTEGER
        );
        CREATE TABLE groups (
            id TEXT PRIMARY KEY,
            name TEXT,
            description TEXT,
            parent_id TEXT,
            group_type TEXT,
            group_visibility TEXT,
            group_members_visibility TEXT,
            members_visible INTEGER NOT NULL,
            my_role TEXT,
            my_status TEXT,
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL,
            removed_at TEXT
        );
        CREATE TABLE identities (
            id TEXT PRIMARY KEY,
            username TEXT,
            name TEXT,
            email TEXT,
            institution TEXT,
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL
        );
        CREATE TABLE memberships (
            group_id TEXT NOT NULL,
            identity_id TEXT NOT NULL,
            username TEXT,
            role TEXT,
            status TEXT,
            status_reason TEXT,
            membership_fields TEXT,
            updated TEXT,
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL,
            PRIMARY KEY (group_id, identity_id)
        ) WITHOUT ROWID;
        CREATE TABLE membership_history (
            id INTEGER PRIMARY KEY,
            group_id TEXT NOT NULL,
            identity_id TEXT NOT NULL,
            role TEXT,
            status TEXT,
            valid_from TEXT NOT NULL,
            valid_to TEXT,
            from_run INTEGER NOT NULL REFERENCES sync_runs(id),
            to_run INTEGER REFERENCES sync_runs(id)
        );
        """
    )


@migrations(name="0002_drop_valid_from_index")
def _drop_valid_from_index(db: sqlite_utils.Database) -> None:
    # valid_from is the started_at of from_run, so idx_history_from_run (with
    # sync_runs.started_at) answers the same questions; this index cost every new
    # history version a B-tree insert and 4% of the file
    db.execute("DROP INDEX IF EXISTS idx_history_valid_from")


@migrations(name="0003_current_state_tables")
def _current_state_tables(db: sqlite_utils.Database) -> None:
    # memberships and identities become views over these tables. Their last_seen is
    # derived from the group's last read, so an unchanged run no longer rewrites every
    # row (and, with the rollback journal, every page twice) just to move it.
    db.executescript(
        """
        DROP VIEW IF EXISTS active_members;
        DROP VIEW IF EXISTS membership_changes;
        CREATE TABLE membership_state (
            group_id TEXT NOT NULL,
            identity_id TEXT NOT NULL,
            username TEXT,
            role TEXT,
            status TEXT,
            status_reason TEXT,
            membership_fields TEXT,
            updated TEXT,
            first_seen TEXT NOT NULL,
            PRIMARY KEY (group_id, identity_id)
        ) WITHOUT ROWID;
        INSERT INTO membership_state
        SELECT group_id, identity_id, username, role, status, status_reason, membership_fields, updated, first_seen
        FROM memberships ORDER BY group_id, identity_id;
        DROP TABLE memberships;
        CREATE TABLE identity_state (
            id TEXT PRIMARY KEY,
            username TEXT,
            name TEXT,
            email TEXT,
            institution TEXT,
            first_seen TEXT NOT NULL,
            last_seen_ended TEXT NOT NULL
        );
        INSERT INTO identity_state
        SELECT id, username, name, email, institution, first_seen, last_seen FROM identities ORDER BY id;
        DROP TABLE identities;
        """
    )


@migrations(name="0005_hook_deliveries")
def _hook_deliveries(db: sqlite_utils.Database) -> None:
    # One row per hook: its queue's position. Hooks get runs in order and skip none,
    # so "every run up to delivered_run has been delivered" says all there is to say.
    db.executescript(
        """
        CREATE TABLE hook_deliveries (
            hook TEXT PRIMARY KEY,
            delivered_run INTEGER NOT NULL,
            delivered_at TEXT,
            attempted_at TEXT,
            failing_run INTEGER,
            error TEXT,
            failures INTEGER NOT NULL DEFAULT 0
        );
        """
    )


# name -> CREATE statement. ensure_schema creates and replaces these; an index taken
# out of this list needs a migration that drops it (as 0002 does). One open history
# row per membership is enforced by the unique partial index, which is also what the
# diff looks current versions up by.
INDEXES: dict[str, str] = {
    "idx_history_current": "CREATE UNIQUE INDEX idx_history_current"
    " ON membership_history(group_id, identity_id) WHERE to_run IS NULL",
    "idx_history_membership": "CREATE INDEX idx_history_membership"
    " ON membership_history(group_id, identity_id, from_run)",
    "idx_history_identity": "CREATE INDEX idx_history_identity"
    " ON membership_history(identity_id, from_run)",
    "idx_history_from_run": "CREATE INDEX idx_history_from_run ON membership_history(from_run)",
    "idx_history_to_run": "CREATE INDEX idx_history_to_run"
    " ON membership_history(to_run) WHERE to_run IS NOT NULL",
    "idx_membership_state_identity": "CREATE INDEX idx_membership_state_identity ON membership_state(identity_id)",
    # people are looked up by username (README's examples): without it, a scan of all history
    "idx_identity_state_username": "CREATE INDEX idx_identity_state_username ON identity_state(username)",
    "idx_sync_runs_started": "CREATE INDEX idx_sync_runs_started ON sync_runs(started_at)",
}

VIEWS: dict[str, str] = {
    # The current state. A membership was last seen when its group was last read
    # (groups.last_seen), so that is not stored per row.
    "memberships": """
CREATE VIEW memberships AS
SELECT m.group_id, m.identity_id, m.username, m.role, m.status, m.status_reason,
       m.membership_fields, m.updated, m.first_seen, g.last_seen
FROM membership_state m
JOIN groups g ON g.id = m.group_id""",
    # An identity was last seen at the latest read of a group it is still in, or when
    # it was last seen in a membership that has since ended, whichever is later.
    "identities": """
CREATE VIEW identities AS
SELECT i.id, i.username, i.name, i.email, i.institution, i.first_seen,
       max(i.last_seen_ended, coalesce((
         SELECT max(g.last_seen) FROM membership_state m JOIN groups g ON g.id = m.group_id
         WHERE m.identity_id = i.id), i.last_seen_ended)) AS last_seen
FROM identity_state i""",
    # A version that began in run R is 'added' unless an older version ended in R
    # ('changed'); a version that ended in R with no successor is 'removed'. One join
    # over both ends of a version rather than a UNION ALL of two selects: SQLite never
    # pushes a filter that holds a subquery (run_id = (SELECT max(id) ...)) into a
    # compound view, so every such query read all history (0.63 s over 31 runs, and
    # growing); this view is flattened into the query and answers it from the run's
    # versions (16 ms). The unary + keeps SQLite from finding a version's predecessor
    # through idx_history_to_run (every version the run closed, thousands) rather than
    # idx_history_membership (the membership's few): without table statistics it
    # guesses the former, and a query over a month of runs took 47 s instead of 0.6 s.
    "membership_changes": """
CREATE VIEW membership_changes AS
SELECT r.started_at AS at, r.id AS run_id, v.group_id, g.name AS group_name,
       v.identity_id, i.username,
       CASE WHEN v.from_run <> r.id THEN 'removed' WHEN o.id IS NULL THEN 'added' ELSE 'changed' END AS change,
       CASE WHEN v.from_run = r.id THEN o.role ELSE v.role END AS old_role,
       CASE WHEN v.from_run = r.id THEN v.role END AS new_role,
       CASE WHEN v.from_run = r.id THEN o.status ELSE v.status END AS old_status,
       CASE WHEN v.from_run = r.id THEN v.status END AS new_status
FROM sync_runs r
JOIN membership_history v ON v.from_run = r.id OR v.to_run = r.id
LEFT JOIN membership_history o
  ON v.from_run = r.id AND o.group_id = v.group_id AND o.identity_id = v.identity_id AND +o.to_run = r.id
LEFT JOIN groups g ON g.id = v.group_id
LEFT JOIN identity_state i ON i.id = v.identity_id
WHERE v.from_run = r.id OR NOT EXISTS (
  SELECT 1 FROM membership_history n
  WHERE n.group_id = v.group_id AND n.identity_id = v.identity_id AND n.from_run = r.id
)""",
    "active_members": """
CREATE VIEW active_members AS
SELECT m.group_id, g.name AS group_name, m.identity_id, m.username, m.role
FROM membership_state m
JOIN groups g ON g.id = m.group_id
WHERE m.status = 'active'""",
}


def utc_now() -> str:
    """Now as fixed-width UTC ISO 8601 text, so that text order is time order."""
    return format_time(dt.datetime.now(dt.UTC))


def format_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


def connect(path: Path, *, readonly: bool = False, busy_timeout: float = BUSY_TIMEOUT_S) -> sqlite_utils.Database:
    """Open the output database (creating it and its folder unless ``readonly``).

    Raises StorageError with a one-line reason for anything that is not a usable
    SQLite file: a missing folder that cannot be made, a file of another kind, no
    permission.
    """
    try:
        if readonly:
            conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=busy_timeout)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=busy_timeout)
        conn.execute("PRAGMA schema_version").fetchone()  # fails fast on a non-SQLite file
        if not readonly:
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.execute("PRAGMA cache_size=-32768")
            conn.execute("PRAGMA foreign_keys=ON")
    except (sqlite3.Error, OSError) as err:
        raise StorageError(f"{path}: cannot open database: {err}") from None
    return sqlite_utils.Database(conn, execute_plugins=False)


def ensure_schema(db: sqlite_utils.Database) -> None:
    """Apply pending migrations, then make indexes and views match the declarations."""
    try:
        migrations.apply(db)
        existing = {
            row["name"]: row["sql"]
            for row in db.query("SELECT name, sql FROM sqlite_master WHERE type IN ('index', 'view')")
        }
        wanted = {**INDEXES, **VIEWS}
        stale = [name for name, sql in wanted.items() if existing.get(name) != sql.strip()]
        if stale:
            with db.atomic():
                for name in stale:
                    kind = "VIEW" if name in VIEWS else "INDEX"
                    db.execute(f"DROP {kind} IF EXISTS [{name}]")
                    db.execute(wanted[name].strip())
    except sqlite3.Error as err:
        raise StorageError(f"cannot prepare the database schema: {err}") from None


def open_database(path: Path, busy_timeout: float = BUSY_TIMEOUT_S) -> sqlite_utils.Database:
    """Open the output database for writing, with its schema up to date."""
    db = connect(path, busy_timeout=busy_timeout)
    ensure_schema(db)
    return db
