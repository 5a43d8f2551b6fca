"""Recording runs: staging what a run reads and applying it in batches, committed once.

A run's reads stream into TEMP staging tables (private to this connection, on disk,
so memory does not grow with the number of memberships). Every few thousand staged
memberships, and after each of the last reads (those still in flight when the rest
are done), a batch of set-based SQL statements applies the staged groups' diff to
current state and history, and the batch's staging rows are dropped. Groups no longer
among the identity's groups are removed as soon as the listing is known. All of it is
one transaction, opened when the run starts staging and committed by
``Recorder.finish`` once every group has been read, so readers see all of a run or
none of it.

Applying while the reads are in flight keeps the database work off the run's
critical path: SQLite runs each statement without holding the GIL while the reader
threads wait on the network. Batches write only what changed: current state lives in
``membership_state`` and ``identity_state``, and the ``memberships`` and ``identities``
views derive ``last_seen`` from each group's last read (``groups.last_seen``). So an
unchanged run writes its run row and the ``groups`` rows, and readers (who must wait
while a writer flushes pages to the file) are kept out only briefly at its end; a run
that changes many rows, like the first, may keep them out longer.
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

# Staged memberships per applied batch: large enough that a batch's fixed cost is
# small, small enough that the last batch (the one left once all reads are done) is
# quick and the staging tables stay small.
BATCH_ROWS = 2000

# stage_groups and stage_memberships hold the batch being staged; stage_ended the
# memberships of current state that end (gone from their group's list, or their group
# gone), about to be removed.
_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS stage_listed (group_id TEXT PRIMARY KEY);
CREATE TEMP TABLE IF NOT EXISTS stage_gone (group_id TEXT PRIMARY KEY);
CREATE TEMP TABLE IF NOT EXISTS stage_groups (
    id TEXT PRIMARY KEY, name TEXT, description TEXT, parent_id TEXT, group_type TEXT,
    group_visibility TEXT, group_members_visibility TEXT, members_visible INTEGER,
    my_role TEXT, my_status TEXT);
CREATE TEMP TABLE IF NOT EXISTS stage_memberships (
    group_id TEXT NOT NULL, identity_id TEXT NOT NULL, username TEXT, role TEXT,
    status TEXT, status_reason TEXT, membership_fields TEXT, updated TEXT,
    name TEXT, email TEXT, institution TEXT,
    PRIMARY KEY (group_id, identity_id)) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS stage_ended (
    group_id TEXT NOT NULL, identity_id TEXT NOT NULL,
    PRIMARY KEY (group_id, identity_id)) WITHOUT ROWID;
"""
_STAGING_TABLES = ("stage_listed", "stage_gone", "stage_groups", "stage_memberships", "stage_ended")

# Statements named because the run's changes are counted from what they do: each new
# history version is one change ('added' or 'changed'), and each membership removed
# from current state is one 'removed' (its version closed with no successor), exactly
# as membership_changes shows them. :now is the run's time, :run its id.
_OPEN_VERSIONS = """
INSERT INTO membership_history (group_id, identity_id, role, status, valid_from, from_run)
SELECT s.group_id, s.identity_id, s.role, s.status, :now, :run
FROM stage_memberships s
WHERE NOT EXISTS (
  SELECT 1 FROM membership_history h
  WHERE h.group_id = s.group_id AND h.identity_id = s.identity_id AND h.to_run IS NULL)"""
_REMOVE_ENDED = """
DELETE FROM membership_state
WHERE (group_id, identity_id) IN (SELECT group_id, identity_id FROM stage_ended)"""
_CHANGES = frozenset((_OPEN_VERSIONS, _REMOVE_ENDED))

# Ending the memberships in stage_ended. Each identity keeps when it was last seen in
# a membership that ended: its group's last read, taken before this run's reads move
# it (the identities view adds the groups it is still in).
_END_MEMBERSHIPS = (
    """UPDATE identity_state SET last_seen_ended = max(last_seen_ended, (
         SELECT max(g.last_seen) FROM stage_ended e JOIN groups g ON g.id = e.group_id
         WHERE e.identity_id = identity_state.id))
       WHERE id IN (SELECT identity_id FROM stage_ended)""",
    _REMOVE_ENDED,
    "DELETE FROM stage_ended",
)

# Once the identity's groups are listed: groups no longer among them are removed, with
# their memberships, and their history closed.
_APPLY_LISTING = (
    """INSERT INTO stage_gone SELECT id FROM groups
       WHERE removed_at IS NULL AND id NOT IN (SELECT group_id FROM stage_listed)""",
    "UPDATE groups SET removed_at = :now WHERE id IN (SELECT group_id FROM stage_gone)",
    """UPDATE membership_history SET valid_to = :now, to_run = :run
       WHERE to_run IS NULL AND group_id IN (SELECT group_id FROM stage_gone)""",
    """INSERT INTO stage_ended SELECT group_id, identity_id FROM membership_state
       WHERE group_id IN (SELECT group_id FROM stage_gone)""",
    *_END_MEMBERSHIPS,
)

# One batch: the groups in stage_groups were read in full and their memberships are
# in stage_memberships. Groups that were listed but failed to read are never staged:
# untouched. Each statement is driven by the batch's rows through an index, so a
# batch costs what it holds, not what the database holds. Only what changed is
# written: an unchanged group costs its groups row (last_seen) and nothing else.
_APPLY_BATCH = (
    # close the versions that changed or vanished
    """UPDATE membership_history SET valid_to = :now, to_run = :run
       WHERE to_run IS NULL AND group_id IN (SELECT id FROM stage_groups) AND NOT EXISTS (
         SELECT 1 FROM stage_memberships s
         WHERE s.group_id = membership_history.group_id
           AND s.identity_id = membership_history.identity_id
           AND s.role IS membership_history.role
           AND s.status IS membership_history.status)""",
    # open a version for every staged membership without a current one
    _OPEN_VERSIONS,
    # memberships the read no longer lists end, before the groups' last_seen moves
    """INSERT INTO stage_ended SELECT m.group_id, m.identity_id FROM membership_state m
       WHERE m.group_id IN (SELECT id FROM stage_groups) AND NOT EXISTS (
         SELECT 1 FROM stage_memberships s
         WHERE s.group_id = m.group_id AND s.identity_id = m.identity_id)""",
    *_END_MEMBERSHIPS,
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
    # new memberships, and changed ones rewritten; unchanged rows are left alone
    """INSERT INTO membership_state (group_id, identity_id, username, role, status, status_reason,
           membership_fields, updated, first_seen)
       SELECT group_id, identity_id, username, role, status, status_reason,
           membership_fields, updated, :now
       FROM stage_memberships WHERE true
       ON CONFLICT (group_id, identity_id) DO UPDATE SET username = excluded.username,
           role = excluded.role, status = excluded.status, status_reason = excluded.status_reason,
           membership_fields = excluded.membership_fields, updated = excluded.updated
       WHERE membership_state.username IS NOT excluded.username
          OR membership_state.role IS NOT excluded.role
          OR membership_state.status IS NOT excluded.status
          OR membership_state.status_reason IS NOT excluded.status_reason
          OR membership_state.membership_fields IS NOT excluded.membership_fields
          OR membership_state.updated IS NOT excluded.updated""",
    # identities: new ones, and known ones whose details changed; a detail missing now
    # keeps its earlier value
    """INSERT INTO identity_state (id, username, name, email, institution, first_seen, last_seen_ended)
       SELECT identity_id, username, name, email, institution, :now, :now
       FROM stage_memberships WHERE true ORDER BY identity_id
       ON CONFLICT (id) DO UPDATE SET username = excluded.username,
           name = coalesce(excluded.name, identity_state.name),
           email = coalesce(excluded.email, identity_state.email),
           institution = coalesce(excluded.institution, identity_state.institution)
       WHERE identity_state.username IS NOT excluded.username
          OR (excluded.name IS NOT NULL AND excluded.name IS NOT identity_state.name)
          OR (excluded.email IS NOT NULL AND excluded.email IS NOT identity_state.email)
          OR (excluded.institution IS NOT NULL AND excluded.institution IS NOT identity_state.institution)""",
    "DELETE FROM stage_groups",
    "DELETE FROM stage_memberships",
)


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


def start_run(db: sqlite_utils.Database, started_at: str | None = None) -> RunResult:
    """Mark runs left ``running`` by a crash as ``aborted`` and record a new run.

    ``started_at`` (default: now) is when the run began: it is also the time its
    changes are recorded at. Only called while holding the sync lock, so any
    ``running`` row is a dead run.
    """
    now = started_at or utc_now()
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


class Recorder:
    """Records one run's reads: staged as they arrive, applied in batches, committed once.

    Everything between ``listed`` and ``finish`` is one transaction on the run's
    connection. If the run fails before ``finish``, rolling that transaction back
    (``finish_without_changes`` does) leaves the database exactly as it was.
    """

    def __init__(
        self, db: sqlite_utils.Database, run: RunResult, batch_rows: int = BATCH_ROWS, in_flight: int = 0
    ) -> None:
        """``in_flight``: how many reads may be outstanding at once. Once no more groups
        than that are left unread, each read is applied as it arrives, so what is left
        to do after the last read is that one group, not a whole batch."""
        self.db = db
        self.run = run
        self.batch_rows = batch_rows
        self.in_flight = in_flight
        self._params = {"now": run.started_at, "run": run.run_id}
        self._staged = 0  # membership rows staged since the last batch was applied
        self._to_read = 0

    def listed(self, listings: t.Collection[GroupListing], to_read: int | None = None) -> None:
        """Open the run's transaction; remove the groups the identity no longer belongs to.

        ``listings`` are all the identity's groups; ``to_read``: how many of them this
        run reads (default: all).
        """
        self._to_read = len(listings) if to_read is None else to_read
        conn = self.db.conn
        conn.execute("BEGIN")
        conn.executemany("INSERT OR IGNORE INTO temp.stage_listed VALUES (?)", ((g.id,) for g in listings))
        self._execute(_APPLY_LISTING)

    def read(self, read: GroupRead) -> None:
        """Stage one group's document and memberships; apply a batch once enough wait."""
        conn = self.db.conn
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
        self.run.groups_synced += 1
        self._staged += len(read.memberships)
        unread = self._to_read - self.run.groups_synced - self.run.groups_failed
        if self._staged >= self.batch_rows or unread <= self.in_flight:
            self._apply_batch()

    def failed(self, group_id: str, reason: str) -> None:
        """Note a listed group that could not be read: it is left as it was."""
        self.run.groups_failed += 1
        self.run.failed_groups[group_id] = reason

    def _apply_batch(self) -> None:
        conn = self.db.conn
        self.run.memberships += conn.execute("SELECT count(*) FROM temp.stage_memberships").fetchone()[0]
        self._execute(_APPLY_BATCH)
        self._staged = 0

    def _execute(self, statements: t.Iterable[str]) -> None:
        """Run statements with the run's parameters, adding the changes they make to its count."""
        conn = self.db.conn
        for statement in statements:
            cursor = conn.execute(statement, self._params)
            if statement in _CHANGES:
                self.run.changes += cursor.rowcount

    def finish(self) -> RunResult:
        """Apply what is left, write the run's row and commit: the run becomes visible."""
        run = self.run
        run.status = "partial" if run.groups_failed else "ok"
        run.exit_code = EXIT_PARTIAL if run.groups_failed else EXIT_OK
        self._apply_batch()
        _write_run_row(self.db, run)
        self.db.conn.commit()
        return run


def finish_without_changes(
    db: sqlite_utils.Database, run: RunResult, status: str, error: str, exit_code: int
) -> None:
    """End a run that records nothing but its own row (failed or aborted).

    Whatever the run had staged or applied is rolled back first.
    """
    if db.conn.in_transaction:
        db.conn.rollback()
    run.status, run.error, run.exit_code = status, error, exit_code
    # the rollback undid whatever the batches had recorded
    run.groups_synced = run.memberships = run.changes = 0
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
