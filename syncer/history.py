"""Recording runs: staging what a run read, then applying it as one diff.

A run's reads stream into TEMP staging tables (private to this connection, on disk,
so memory does not grow with the number of memberships). ``apply_run`` then turns
the staged state into current-state upserts and history versions with a handful of
set-based SQL statements inside one transaction: readers see all of a run or none
of it, and an unchanged run changes nothing but ``last_seen`` and its own
``sync_runs`` row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing as t

import sqlite_utils

from syncer.errors import EXIT_OK, EXIT_PARTIAL
from syncer.globus_groups import GroupListing, GroupRead
from syncer.schema import utc_now

_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS stage_listed (group_id TEXT PRIMARY KEY);
CREATE TEMP TABLE IF NOT EXISTS stage_groups (
    id TEXT PRIMARY KEY, name TEXT, description TEXT, parent_id TEXT, group_type TEXT,
    group_visibility TEXT, group_members_visibility TEXT, members_visible INTEGER,
    my_role TEXT, my_status TEXT);
CREATE TEMP TABLE IF NOT EXISTS stage_memberships (
    group_id TEXT NOT NULL, identity_id TEXT NOT NULL, username TEXT, role TEXT,
    status TEXT, status_reason TEXT, membership_fields TEXT, updated TEXT,
    name TEXT, email TEXT, institution TEXT,
    PRIMARY KEY (group_id, identity_id)) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS stage_gone (group_id TEXT PRIMARY KEY);
"""
_STAGING_TABLES = ("stage_listed", "stage_groups", "stage_memberships", "stage_gone")

# The diff, in order. :now is the run's time, :run its id. Groups that were listed
# but failed to read are in neither stage_groups nor stage_gone: untouched.
_APPLY = (
    # groups no longer among the identity's groups
    """INSERT INTO stage_gone SELECT id FROM groups
       WHERE removed_at IS NULL AND id NOT IN (SELECT group_id FROM stage_listed)""",
    "UPDATE groups SET removed_at = :now WHERE id IN (SELECT group_id FROM stage_gone)",
    """INSERT INTO groups (id, name, description, parent_id, group_type, group_visibility,
           group_members_visibility, members_visible, my_role, my_status, first_seen, last_seen)
       SELECT id, name, description, parent_id, group_type, group_visibility,
           group_members_visibility, members_visible, my_role, my_status, :now, :now
       FROM stage_groups WHERE true
       ON CONFLICT (id) DO UPDATE SET name = excluded.name, description = excluded.description,
           parent_id = excluded.parent_id, group_type = excluded.group_type,
           group_visibility = excluded.group_visibility,
           group_members_visibility = excluded.group_members_visibility,
           members_visible = excluded.members_visible, my_role = excluded.my_role,
           my_status = excluded.my_status, last_seen = excluded.last_seen, removed_at = NULL""",
    # close versions that changed or vanished in a group read now, or whose group is gone
    """UPDATE membership_history SET valid_to = :now, to_run = :run
       WHERE to_run IS NULL AND (
         group_id IN (SELECT group_id FROM stage_gone)
         OR (group_id IN (SELECT id FROM stage_groups) AND NOT EXISTS (
               SELECT 1 FROM stage_memberships s
               WHERE s.group_id = membership_history.group_id
                 AND s.identity_id = membership_history.identity_id
                 AND s.role IS membership_history.role
                 AND s.status IS membership_history.status)))""",
    # open a version for every staged membership without a current one
    """INSERT INTO membership_history (group_id, identity_id, role, status, valid_from, from_run)
       SELECT s.group_id, s.identity_id, s.role, s.status, :now, :run
       FROM stage_memberships s
       WHERE NOT EXISTS (
         SELECT 1 FROM membership_history h
         WHERE h.group_id = s.group_id AND h.identity_id = s.identity_id AND h.to_run IS NULL)""",
    """DELETE FROM memberships
       WHERE group_id IN (SELECT group_id FROM stage_gone)
          OR (group_id IN (SELECT id FROM stage_groups) AND NOT EXISTS (
                SELECT 1 FROM stage_memberships s
                WHERE s.group_id = memberships.group_id AND s.identity_id = memberships.identity_id))""",
    """INSERT INTO memberships (group_id, identity_id, username, role, status, status_reason,
           membership_fields, updated, first_seen, last_seen)
       SELECT group_id, identity_id, username, role, status, status_reason,
           membership_fields, updated, :now, :now
       FROM stage_memberships WHERE true
       ON CONFLICT (group_id, identity_id) DO UPDATE SET username = excluded.username,
           role = excluded.role, status = excluded.status, status_reason = excluded.status_reason,
           membership_fields = excluded.membership_fields, updated = excluded.updated,
           last_seen = excluded.last_seen""",
    # an identity met in several groups takes all its details from one membership,
    # the most complete one (SQLite takes bare columns from the row holding the max)
    """INSERT INTO identities (id, username, name, email, institution, first_seen, last_seen)
       SELECT identity_id, username, name, email, institution, :now, :now FROM (
         SELECT identity_id, username, name, email, institution,
                max((name IS NOT NULL) + (email IS NOT NULL) + (institution IS NOT NULL))
         FROM stage_memberships GROUP BY identity_id) WHERE true
       ON CONFLICT (id) DO UPDATE SET username = excluded.username,
           name = coalesce(excluded.name, identities.name),
           email = coalesce(excluded.email, identities.email),
           institution = coalesce(excluded.institution, identities.institution),
           last_seen = excluded.last_seen""",
)

_COUNT_CHANGES = """
SELECT (SELECT count(*) FROM membership_history WHERE from_run = :run)
     + (SELECT count(*) FROM membership_history o WHERE o.to_run = :run AND NOT EXISTS (
          SELECT 1 FROM membership_history n
          WHERE n.group_id = o.group_id AND n.identity_id = o.identity_id AND n.from_run = :run))
"""


@dataclasses.dataclass
class RunResult:
    """What a run did, as stored in its ``sync_runs`` row."""

    run_id: int
    started_at: str
    status: str = "running"
    groups_synced: int = 0
    groups_failed: int = 0
    memberships: int = 0
    changes: int = 0
    error: str | None = None
    exit_code: int | None = None
    failed_groups: dict[str, str] = dataclasses.field(default_factory=dict)


def start_run(db: sqlite_utils.Database) -> RunResult:
    """Mark runs left ``running`` by a crash as ``aborted`` and record a new run.

    Only called while holding the sync lock, so any ``running`` row is a dead run.
    """
    now = utc_now()
    with db.atomic():
        db.execute(
            "UPDATE sync_runs SET status = 'aborted', finished_at = coalesce(finished_at, ?),"
            " error = coalesce(error, 'the process ended before the run finished')"
            " WHERE status = 'running'",
            [now],
        )
        cursor = db.execute(
            "INSERT INTO sync_runs (started_at, status, pid) VALUES (?, 'running', ?)", [now, os.getpid()]
        )
    run_id = cursor.lastrowid
    assert run_id is not None
    db.executescript(_STAGING)
    for table in _STAGING_TABLES:
        db.execute(f"DELETE FROM temp.{table}")
    return RunResult(run_id=run_id, started_at=now)


def stage_listing(db: sqlite_utils.Database, listings: t.Iterable[GroupListing]) -> None:
    """Remember which groups the identity belongs to now (gone ones get removed)."""
    with db.atomic():
        db.conn.executemany("INSERT OR IGNORE INTO temp.stage_listed VALUES (?)", ((g.id,) for g in listings))


def stage_group(db: sqlite_utils.Database, read: GroupRead) -> None:
    """Stage one group's document and memberships (TEMP tables only).

    All of a run's staging is one transaction on the private TEMP tables, committed
    by ``apply_run`` (or rolled back with a failed run): a commit per group wrote the
    staging pages out each time and cost more than the inserts themselves.
    """
    conn = db.conn
    if not conn.in_transaction:
        conn.execute("BEGIN")
    conn.execute(
        "INSERT OR REPLACE INTO temp.stage_groups VALUES"
        " (:id, :name, :description, :parent_id, :group_type, :group_visibility,"
        " :group_members_visibility, :members_visible, :my_role, :my_status)",
        read.group,
    )
    # a membership listed twice keeps its last occurrence
    conn.executemany(
        "INSERT OR REPLACE INTO temp.stage_memberships VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        read.memberships,
    )


def apply_run(db: sqlite_utils.Database, run: RunResult) -> RunResult:
    """Apply the staged reads and finish the run row, all in one transaction."""
    params = {"now": run.started_at, "run": run.run_id}
    run.status = "partial" if run.groups_failed else "ok"
    run.exit_code = EXIT_PARTIAL if run.groups_failed else EXIT_OK
    if db.conn.in_transaction:
        db.conn.commit()  # the staging transaction (TEMP tables only, see stage_group)
    with db.atomic():
        for statement in _APPLY:
            db.execute(statement, params)
        run.memberships = db.execute("SELECT count(*) FROM temp.stage_memberships").fetchone()[0]
        run.changes = db.execute(_COUNT_CHANGES, params).fetchone()[0]
        _write_run_row(db, run)
    return run


def finish_without_changes(
    db: sqlite_utils.Database, run: RunResult, status: str, error: str, exit_code: int
) -> None:
    """End a run that records nothing but its own row (failed or aborted)."""
    run.status, run.error, run.exit_code = status, error, exit_code
    with db.atomic():
        _write_run_row(db, run)


def _write_run_row(db: sqlite_utils.Database, run: RunResult) -> None:
    db.execute(
        "UPDATE sync_runs SET finished_at = ?, status = ?, groups_synced = ?, groups_failed = ?,"
        " memberships = ?, changes = ?, error = ?, failed_groups = ?, exit_code = ? WHERE id = ?",
        [
            utc_now(),
            run.status,
            run.groups_synced,
            run.groups_failed,
            run.memberships,
            run.changes,
            run.error,
            json.dumps(run.failed_groups, sort_keys=True) if run.failed_groups else None,
            run.exit_code,
            run.run_id,
        ],
    )
