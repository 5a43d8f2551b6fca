"""The output database's versioned tables, and its indexes and views.

Opening the database (WAL, read-only readers, the errors) is ``syncer.storage.database``'s.

Tables are created by numbered migrations (sqlite-utils ``Migrations``), so a later
release upgrades an existing database in place. Indexes and views are declared as
data below and applied idempotently on every open for writing: a changed view
definition is replaced, a missing index is created.

Users query the views (``groups``, ``group_history``, ``identities``, ``memberships``,
``membership_history``, ``membership_changes``, ``membership_events``,
``active_members``) and ``sync_runs``. Underneath, every group and identity UUID is
stored once, in ``group_state`` and ``identity_state``, and referred to by an integer
key; times are run ids, shown as their run's ``started_at``.
"""

from __future__ import annotations

import datetime as dt
import sqlite3

import sqlite_utils
from sqlite_utils import Migrations

from syncer.errors import StorageError

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


# The reasons that are observations, not events (see SPEC): syncer starting or
# stopping to see a membership. The others, 'joined', 'left' and 'changed', are events,
# and so may be 'unknown', in versions recorded before 0004 whose reason could not be
# inferred.
OBSERVATIONS = ("first_seen", "hidden", "group_gone")


@migrations(name="0004_compact_history")
def _compact_history(db: sqlite_utils.Database) -> None:
    """Integer keys for groups and identities, run ids for times, reasons, group history.

    Every UUID is stored once (in ``group_state``/``identity_state``); history and
    current state refer to it by key, and to times by run id, so its rows and indexes
    hold small integers. The reasons of versions recorded before are inferred where the
    old tables tell them (a group's first read, a change of role or status, a group
    gone) and 'unknown' otherwise. Groups get one version each, as last read: earlier
    names were not kept.
    """
    run_at = "(SELECT coalesce(max(r.id), (SELECT min(id) FROM sync_runs)) FROM sync_runs r WHERE r.started_at <= {})"
    for view in ("memberships", "identities", "membership_changes", "active_members"):
        db.execute(f"DROP VIEW IF EXISTS {view}")
    db.executescript(
        f"""
        ALTER TABLE groups RENAME TO old_groups;
        ALTER TABLE identity_state RENAME TO old_identity_state;
        ALTER TABLE membership_state RENAME TO old_membership_state;
        ALTER TABLE membership_history RENAME TO old_membership_history;
        {_TABLES_0004}
        INSERT INTO group_state (id, name, description, parent_id, group_type, group_visibility,
            group_members_visibility, members_view, my_role, my_status, first_run, last_run, removed_run)
        SELECT id, name, description, parent_id, group_type, group_visibility, group_members_visibility,
            CASE WHEN members_visible = 0 THEN 'own'
                 WHEN my_role IN ('admin', 'manager') AND my_status = 'active' THEN 'all'
                 ELSE 'active' END,
            my_role, my_status, {run_at.format("first_seen")}, {run_at.format("last_seen")},
            CASE WHEN removed_at IS NOT NULL THEN {run_at.format("removed_at")} END
        FROM old_groups ORDER BY id;
        INSERT INTO group_versions (group_key, from_run, to_run, name, description, parent_id, group_type,
            group_visibility, group_members_visibility, members_view, my_role, my_status)
        SELECT key, first_run, removed_run, name, description, parent_id, group_type, group_visibility,
            group_members_visibility, members_view, my_role, my_status
        FROM group_state ORDER BY key;
        INSERT INTO identity_state (id, username, name, email, institution, first_run, last_run_ended)
        SELECT id, username, name, email, institution, {run_at.format("first_seen")},
            {run_at.format("last_seen_ended")}
        FROM old_identity_state ORDER BY id;
        INSERT INTO membership_state (group_key, identity_key, role, status, status_reason,
            membership_fields, updated, first_run)
        SELECT g.key, i.key, m.role, m.status, m.status_reason, m.membership_fields, m.updated,
            {run_at.format("m.first_seen")}
        FROM old_membership_state m
        JOIN group_state g ON g.id = m.group_id JOIN identity_state i ON i.id = m.identity_id
        ORDER BY g.key, i.key;
        CREATE INDEX IF NOT EXISTS migrate_history ON old_membership_history(group_id, identity_id, from_run);
        INSERT INTO membership_versions (group_key, identity_key, from_run, to_run, role, status, began, ended)
        SELECT g.key, i.key, h.from_run, h.to_run, h.role, h.status,
            CASE
              WHEN EXISTS (SELECT 1 FROM old_membership_history p WHERE p.group_id = h.group_id
                           AND p.identity_id = h.identity_id AND p.to_run = h.from_run) THEN 'changed'
              WHEN h.from_run = g.first_run THEN 'first_seen'
              ELSE 'unknown' END,
            CASE
              WHEN h.to_run IS NULL THEN NULL
              WHEN EXISTS (SELECT 1 FROM old_membership_history n WHERE n.group_id = h.group_id
                           AND n.identity_id = h.identity_id AND n.from_run = h.to_run) THEN 'changed'
              WHEN h.to_run = g.removed_run THEN 'group_gone'
              ELSE 'unknown' END
        FROM old_membership_history h
        JOIN group_state g ON g.id = h.group_id JOIN identity_state i ON i.id = h.identity_id
        ORDER BY g.key, i.key, h.from_run;
        DROP TABLE old_membership_history;
        DROP TABLE old_membership_state;
        DROP TABLE old_identity_state;
        DROP TABLE old_groups;
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


@migrations(name="0006_group_policies")
def _group_policies(db: sqlite_utils.Database) -> None:
    # A group's session policies, kept with its history (a change starts a new group
    # version), and, in its current state only, what Globus asked for when it last
    # refused the group's read for a session requirement (NULL: no such refusal since
    # the last successful read).
    policies = (
        "is_high_assurance INTEGER", "authentication_assurance_timeout INTEGER",
        "enforce_session INTEGER", "session_limit INTEGER",
    )
    for table in ("group_state", "group_versions"):
        for column in policies:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    db.execute("ALTER TABLE group_state ADD COLUMN needs_login TEXT")


@migrations(name="0007_database_owner")
def _database_owner(db: sqlite_utils.Database) -> None:
    # Whose data this is: the identity (or confidential client) of the first
    # successful run, one row at most (see syncer.storage.ownership). An upgraded database
    # gets its row at its next successful run.
    db.executescript(
        """
        CREATE TABLE database_owner (
            only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
            kind TEXT NOT NULL CHECK (kind IN ('identity', 'client')),
            id TEXT NOT NULL,
            username TEXT,
            recorded_at TEXT NOT NULL,
            recorded_by_run INTEGER NOT NULL REFERENCES sync_runs(id)
        );
        """
    )


@migrations(name="0008_group_digests")
def _group_digests(db: sqlite_utils.Database) -> None:
    # One row per group whose rows were made from a known answer: the digest of that
    # answer (syncer.globus.globus_groups.group_digest) and how many memberships it recorded.
    # A run that gets the same answer again skips the group's diff. Written in the same
    # transaction as the group's rows; created empty, so the first run after the
    # upgrade diffs every group.
    db.executescript(
        """
        CREATE TABLE group_digests (
            group_key INTEGER PRIMARY KEY REFERENCES group_state(key),
            digest BLOB NOT NULL,
            memberships INTEGER NOT NULL
        );
        """
    )


# The tables as 0004 made them. Frozen: a later change is a new migration. A group's
# attributes, as read: in its current state and in each of its versions.
_GROUP_ATTRIBUTES_0004 = """name TEXT,
            description TEXT,
            parent_id TEXT,
            group_type TEXT,
            group_visibility TEXT,
            group_members_visibility TEXT,
            members_view TEXT NOT NULL,
            my_role TEXT,
            my_status TEXT,"""
_TABLES_0004 = f"""
        CREATE TABLE group_state (
            key INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            {_GROUP_ATTRIBUTES_0004}
            first_run INTEGER NOT NULL REFERENCES sync_runs(id),
            last_run INTEGER NOT NULL REFERENCES sync_runs(id),
            removed_run INTEGER REFERENCES sync_runs(id)
        );
        CREATE TABLE group_versions (
            group_key INTEGER NOT NULL REFERENCES group_state(key),
            from_run INTEGER NOT NULL REFERENCES sync_runs(id),
            to_run INTEGER REFERENCES sync_runs(id),
            {_GROUP_ATTRIBUTES_0004}
            PRIMARY KEY (group_key, from_run)
        ) WITHOUT ROWID;
        CREATE TABLE identity_state (
            key INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            username TEXT,
            name TEXT,
            email TEXT,
            institution TEXT,
            first_run INTEGER NOT NULL REFERENCES sync_runs(id),
            last_run_ended INTEGER NOT NULL REFERENCES sync_runs(id)
        );
        CREATE TABLE membership_state (
            group_key INTEGER NOT NULL REFERENCES group_state(key),
            identity_key INTEGER NOT NULL REFERENCES identity_state(key),
            role TEXT,
            status TEXT,
            status_reason TEXT,
            membership_fields TEXT,
            updated TEXT,
            first_run INTEGER NOT NULL REFERENCES sync_runs(id),
            PRIMARY KEY (group_key, identity_key)
        ) WITHOUT ROWID;
        CREATE TABLE membership_versions (
            group_key INTEGER NOT NULL REFERENCES group_state(key),
            identity_key INTEGER NOT NULL REFERENCES identity_state(key),
            from_run INTEGER NOT NULL REFERENCES sync_runs(id),
            to_run INTEGER REFERENCES sync_runs(id),
            role TEXT,
            status TEXT,
            began TEXT NOT NULL,
            ended TEXT,
            PRIMARY KEY (group_key, identity_key, from_run)
        ) WITHOUT ROWID;
"""


# name -> CREATE statement. ensure_schema creates and replaces these; an index taken
# out of this list needs a migration that drops it (as 0002 does). Each serves a
# documented query or the run's diff; the primary keys serve the rest (a group's
# versions, a membership's versions in order).
INDEXES: dict[str, str] = {
    # an identity's history (syncer identity, membership_changes by user)
    "idx_versions_identity": "CREATE INDEX idx_versions_identity ON membership_versions(identity_key)",
    # a run's changes: the versions it opened and those it closed, with why, so that
    # events are found without reading the observations beside them
    "idx_versions_from_run": "CREATE INDEX idx_versions_from_run ON membership_versions(from_run, began)",
    "idx_versions_to_run": "CREATE INDEX idx_versions_to_run"
    " ON membership_versions(to_run, ended) WHERE to_run IS NOT NULL",
    "idx_membership_state_identity": "CREATE INDEX idx_membership_state_identity ON membership_state(identity_key)",
    # groups are looked up by any name they have had
    "idx_group_versions_name": "CREATE INDEX idx_group_versions_name ON group_versions(name)",
    # people are looked up by username
    "idx_identity_state_username": "CREATE INDEX idx_identity_state_username ON identity_state(username)",
    "idx_sync_runs_started": "CREATE INDEX idx_sync_runs_started ON sync_runs(started_at)",
}

# Times are run ids underneath; the views show each as its run's started_at, looked up
# by a scalar subquery rather than a join, so that sync_runs never enters the
# planner's choice of join order: each lookup is one primary-key read per row shown.
def _at(run: str) -> str:
    return f"(SELECT started_at FROM sync_runs WHERE id = {run})"


# An identity's last run: the latest read of a group it is still in, or its last run in
# a membership that has since ended, whichever is later.
_IDENTITY_LAST_RUN = """max(i.last_run_ended, coalesce((
          SELECT max(g.last_run) FROM membership_state m JOIN group_state g ON g.key = m.group_key
          WHERE m.identity_key = i.key), 0))"""

def _changes_view(name: str, versions_of_run: str) -> str:
    """A view of runs' changes, one row per version a run began (``added`` or
    ``changed``) or ended without a successor (``removed``), ``versions_of_run``
    choosing which versions of run ``r`` count. The reason is stored with the version;
    the group's name is the one it had at the run (its latest version begun by then)."""
    return f"""
CREATE VIEW {name} AS
SELECT r.started_at AS at, r.id AS run_id, g.id AS group_id,
       (SELECT gv.name FROM group_versions gv WHERE gv.group_key = v.group_key AND gv.from_run <= r.id
        ORDER BY gv.from_run DESC LIMIT 1) AS group_name,
       i.id AS identity_id, i.username,
       CASE WHEN v.from_run <> r.id THEN 'removed' WHEN v.began = 'changed' THEN 'changed' ELSE 'added' END AS change,
       CASE WHEN v.from_run <> r.id THEN v.ended ELSE v.began END AS reason,
       CASE WHEN v.from_run = r.id THEN o.role ELSE v.role END AS old_role,
       CASE WHEN v.from_run = r.id THEN v.role END AS new_role,
       CASE WHEN v.from_run = r.id THEN o.status ELSE v.status END AS old_status,
       CASE WHEN v.from_run = r.id THEN v.status END AS new_status
FROM sync_runs r
JOIN membership_versions v ON {versions_of_run}
LEFT JOIN membership_versions o
  ON v.from_run = r.id AND v.began = 'changed'
  AND o.group_key = v.group_key AND o.identity_key = v.identity_key AND o.to_run = r.id
JOIN group_state g ON g.key = v.group_key
JOIN identity_state i ON i.key = v.identity_key"""


VIEWS: dict[str, str] = {
    "groups": f"""
CREATE VIEW groups AS
SELECT g.id, g.name, g.description, g.parent_id, g.group_type, g.group_visibility,
       g.group_members_visibility, g.members_view <> 'own' AS members_visible, g.my_role, g.my_status,
       {_at("g.first_run")} AS first_seen, {_at("g.last_run")} AS last_seen,
       {_at("g.removed_run")} AS removed_at, g.members_view,
       (SELECT count(*) FROM membership_state m WHERE m.group_key = g.key AND m.status = 'active')
         AS active_member_count,
       g.is_high_assurance, g.authentication_assurance_timeout, g.enforce_session, g.session_limit,
       g.needs_login
FROM group_state g""",
    # One version per change of a group's attributes while it is among the identity's
    # groups; a group that is gone has no version covering the runs after it went.
    "group_history": f"""
CREATE VIEW group_history AS
SELECT g.id AS group_id, v.name, v.description, v.parent_id, v.group_type, v.group_visibility,
       v.group_members_visibility, v.members_view <> 'own' AS members_visible, v.my_role, v.my_status,
       {_at("v.from_run")} AS valid_from, {_at("v.to_run")} AS valid_to, v.from_run, v.to_run, v.members_view,
       v.is_high_assurance, v.authentication_assurance_timeout, v.enforce_session, v.session_limit
FROM group_versions v
JOIN group_state g ON g.key = v.group_key""",
    "identities": f"""
CREATE VIEW identities AS
SELECT i.id, i.username, i.name, i.email, i.institution, {_at("i.first_run")} AS first_seen,
       {_at(_IDENTITY_LAST_RUN)} AS last_seen
FROM identity_state i""",
    # The current state; a membership was last seen when its group was last read.
    "memberships": f"""
CREATE VIEW memberships AS
SELECT g.id AS group_id, i.id AS identity_id, i.username, m.role, m.status, m.status_reason,
       m.membership_fields, m.updated, {_at("m.first_run")} AS first_seen, {_at("g.last_run")} AS last_seen
FROM membership_state m
JOIN group_state g ON g.key = m.group_key
JOIN identity_state i ON i.key = m.identity_key""",
    "membership_history": f"""
CREATE VIEW membership_history AS
SELECT g.id AS group_id, i.id AS identity_id, i.username, v.role, v.status,
       {_at("v.from_run")} AS valid_from, {_at("v.to_run")} AS valid_to, v.from_run, v.to_run, v.began, v.ended
FROM membership_versions v
JOIN group_state g ON g.key = v.group_key
JOIN identity_state i ON i.key = v.identity_key""",
    "membership_changes": _changes_view("membership_changes", "v.from_run = r.id OR (v.to_run = r.id AND v.ended <> 'changed')"),
    # The same rows, events only: the reasons are in the join, where the run indexes
    # (which hold them) answer it, so a week of events does not read the first run's
    # snapshot of first_seen versions. Versions from before 0004 whose reason is
    # unknown may be events: they are kept.
    "membership_events": _changes_view(
        "membership_events",
        "(v.from_run = r.id AND v.began IN ('joined', 'changed', 'unknown'))"
        " OR (v.to_run = r.id AND v.ended IN ('left', 'unknown'))",
    ),
    "active_members": """
CREATE VIEW active_members AS
SELECT g.id AS group_id, g.name AS group_name, i.id AS identity_id, i.username, m.role
FROM membership_state m
JOIN group_state g ON g.key = m.group_key
JOIN identity_state i ON i.key = m.identity_key
WHERE m.status = 'active'""",
}


def utc_now() -> str:
    """Now as fixed-width UTC ISO 8601 text, so that text order is time order."""
    return format_time(dt.datetime.now(dt.UTC))


def format_time(moment: dt.datetime) -> str:
    # isoformat, not strftime: %Y does not pad years before 1000 (a WHEN may be one)
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


def ensure_schema(db: sqlite_utils.Database) -> None:
    """Apply pending migrations, then make indexes and views match the declarations.

    A database that any migration changed forgets every group's digest: its rows may
    now be recorded differently from how the digests' answers were, so each group is
    diffed in full at its next read.
    """
    try:
        upgraded = bool(migrations.pending(db))
        migrations.apply(db)
        if upgraded:
            with db.atomic():
                db.execute("DELETE FROM group_digests")
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

