"""Recording runs: staging what a run reads and applying it in batches, committed once.

A run's reads stream into TEMP staging tables (private to this connection, on disk,
so memory does not grow with the number of memberships). Every few thousand staged
memberships, and after each of the last reads (those still in flight when the rest
are done), a batch of set-based SQL statements applies the staged groups' diff to
current state and history, and the batch's staging rows are dropped. Groups no longer
among the identity's groups are recorded as gone as soon as the listing is known. All
of it is one transaction, opened when the run starts staging and committed by
``Recorder.finish`` once every group has been read, so readers see all of a run or
none of it.

Each version of a membership records why it began and ended (SPEC's reasons): a
member new in a group whose members were visible at its previous read 'joined' (an
invitation too: it joins with status 'invited'), any other new member was
'first_seen'; a member no longer listed 'left' where the identity would still see it,
which where it sees only the active members (members_view 'active') includes an
active member who stops being active (an admin's removal, say); it is 'hidden' when
the identity can no longer see it (its view narrowed); a role or status that differs
'changed'; a group no longer among the identity's groups is 'group_gone'.

Batches write only what changed: current state lives in ``membership_state`` and
``identity_state``, and the views derive times from run ids, so an unchanged run
writes its run row and the groups' ``last_run``.

Each group's recorded rows carry the digest of the answer they were made from
(``group_digests``, written by the same batch, so in the same transaction). A group
whose answer has that digest again (``Recorder.recorded_digest``) is not staged at
all: ``Recorder.unchanged`` moves its ``last_run``, which is all a diff of the same
answer would write. A group gone from the listing loses its digest with its
memberships, so a group that comes back is diffed in full.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import typing as t

import sqlite_utils

from syncer.errors import EXIT_OK, EXIT_PARTIAL
from syncer.globus.globus_groups import GroupListing, GroupRead, GroupReadError, GroupRow, MembershipRow, MyGroups
from syncer.storage.schema import utc_now

# Staged memberships per applied batch: large enough that a batch's fixed cost is
# small, small enough that the last batch (the one left once all reads are done) is
# quick and the staging tables stay small.
BATCH_ROWS = 2000

# Re-analyze once history or the runs have grown by this factor since the planner's
# statistics were taken.
ANALYZE_GROWTH = 1.5


def _columns(row_type: type[t.NamedTuple]) -> str:
    # no declared type: values keep theirs (a TEXT column would turn a group's
    # session_limit 28800 into '28800', which then differs from the stored 28800)
    return ", ".join(row_type._fields)


# stage_listed and stage_others hold the listing: the identity's groups, and the groups
# where its memberships are in other statuses. stage_groups and stage_memberships hold
# the batch being staged (their columns are GroupRow's and MembershipRow's fields);
# stage_context what each of its groups was before this run, and stage_keyed its
# memberships with the groups' and identities' keys. stage_ended: memberships of
# current state that end (gone from their group's list, or their group gone), with
# their group's last read before this run. stage_digests: the digest of each staged
# group's answer (NULL: none known, the group keeps none).
_STAGING = f"""
CREATE TEMP TABLE IF NOT EXISTS stage_listed (group_id TEXT PRIMARY KEY);
CREATE TEMP TABLE IF NOT EXISTS stage_others (group_id TEXT PRIMARY KEY, my_role TEXT, my_status TEXT);
CREATE TEMP TABLE IF NOT EXISTS stage_gone (group_key INTEGER PRIMARY KEY);
CREATE TEMP TABLE IF NOT EXISTS stage_groups ({_columns(GroupRow)}, PRIMARY KEY (id));
CREATE TEMP TABLE IF NOT EXISTS stage_memberships (
    {_columns(MembershipRow)}, PRIMARY KEY (group_id, identity_id)) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS stage_context (
    id TEXT PRIMARY KEY, group_key INTEGER UNIQUE, was_view TEXT, now_view TEXT,
    new_version INTEGER, last_run INTEGER);
CREATE TEMP TABLE IF NOT EXISTS stage_keyed (
    group_key INTEGER NOT NULL, identity_key INTEGER NOT NULL, role TEXT, status TEXT,
    status_reason TEXT, membership_fields TEXT, updated TEXT,
    PRIMARY KEY (group_key, identity_key)) WITHOUT ROWID;
CREATE TEMP TABLE IF NOT EXISTS stage_digests (group_id TEXT PRIMARY KEY, digest BLOB);
CREATE TEMP TABLE IF NOT EXISTS stage_ended (
    group_key INTEGER NOT NULL, identity_key INTEGER NOT NULL, last_run INTEGER NOT NULL,
    PRIMARY KEY (group_key, identity_key)) WITHOUT ROWID;
"""
_STAGING_TABLES = (
    "stage_listed", "stage_others", "stage_gone", "stage_groups", "stage_memberships",
    "stage_context", "stage_keyed", "stage_ended", "stage_digests",
)
_INSERT_GROUP = f"INSERT OR REPLACE INTO temp.stage_groups VALUES ({', '.join('?' * len(GroupRow._fields))})"
# a membership listed twice keeps its last occurrence
_INSERT_MEMBERSHIP = (
    f"INSERT OR REPLACE INTO temp.stage_memberships VALUES ({', '.join('?' * len(MembershipRow._fields))})"
)

# Ending the memberships in stage_ended. Each identity keeps when it was last seen in
# a membership that ended: its group's last read before this run (the identities view
# adds the groups it is still in).
_END_MEMBERSHIPS = (
    """UPDATE identity_state SET last_run_ended = max(last_run_ended, (
         SELECT max(e.last_run) FROM stage_ended e WHERE e.identity_key = identity_state.key))
       WHERE key IN (SELECT identity_key FROM stage_ended)""",
    """DELETE FROM membership_state
       WHERE (group_key, identity_key) IN (SELECT group_key, identity_key FROM stage_ended)""",
    "DELETE FROM stage_ended",
)

# Once the identity's groups are listed: groups no longer among them are gone, with
# their memberships (an observation: 'group_gone'), and keep what Globus last said of
# the identity's standing in them. :run is the run's id.
_APPLY_LISTING = (
    """INSERT INTO stage_gone SELECT key FROM group_state
       WHERE removed_run IS NULL AND id NOT IN (SELECT group_id FROM stage_listed)""",
    """UPDATE group_state SET removed_run = :run,
           my_role = coalesce((SELECT o.my_role FROM stage_others o WHERE o.group_id = group_state.id), my_role),
           my_status = coalesce((SELECT o.my_status FROM stage_others o WHERE o.group_id = group_state.id), my_status)
       WHERE key IN (SELECT group_key FROM stage_gone)""",
    """UPDATE group_versions SET to_run = :run
       WHERE to_run IS NULL AND group_key IN (SELECT group_key FROM stage_gone)""",
    """UPDATE membership_versions SET to_run = :run, ended = 'group_gone'
       WHERE to_run IS NULL AND group_key IN (SELECT group_key FROM stage_gone)""",
    """INSERT INTO stage_ended SELECT m.group_key, m.identity_key, g.last_run
       FROM membership_state m JOIN group_state g ON g.key = m.group_key
       WHERE m.group_key IN (SELECT group_key FROM stage_gone)""",
    # its rows are no longer what its answer would make: a group that comes back is diffed
    "DELETE FROM group_digests WHERE group_key IN (SELECT group_key FROM stage_gone)",
    *_END_MEMBERSHIPS,
)

# The group attributes kept in history: a change of any starts a new group version.
_GROUP_ATTRIBUTES = (
    "name", "description", "parent_id", "group_type", "group_visibility",
    "group_members_visibility", "members_view", "my_role", "my_status",
    "is_high_assurance", "authentication_assurance_timeout", "enforce_session", "session_limit",
)
# What the listing tells of a group: all that is recorded of one Globus refused to show.
_LISTED_ATTRIBUTES = ("name", "group_visibility", "group_members_visibility", "members_view", "my_role", "my_status")
# Attributes a document may leave out (null, or absent as in recorded bodies): what is
# stored stands, so a missing value is never recorded as a change.
_KEPT_WHEN_MISSING = (
    "description", "group_type", "group_visibility", "group_members_visibility",
    "is_high_assurance", "authentication_assurance_timeout", "enforce_session", "session_limit",
)
_ANY_ATTRIBUTE_CHANGED = " OR ".join(f"g.{c} IS NOT s.{c}" for c in _GROUP_ATTRIBUTES)
_ATTRIBUTES = ", ".join(_GROUP_ATTRIBUTES)

# One batch: the groups in stage_groups were read in full and their memberships are
# in stage_memberships. Groups that were listed but failed to read are never staged:
# untouched. Each statement is driven by the batch's rows through an index, so a
# batch costs what it holds, not what the database holds. Only what changed is
# written: an unchanged group costs its group_state row (last_run) and nothing else.
_APPLY_BATCH = (
    f"""UPDATE stage_groups SET {", ".join(
           f"{c} = coalesce({c}, (SELECT g.{c} FROM group_state g WHERE g.id = stage_groups.id))"
           for c in _KEPT_WHEN_MISSING)}
       WHERE {" OR ".join(f"{c} IS NULL" for c in _KEPT_WHEN_MISSING)}""",
    # what each group was before this run: which of its members the identity saw at
    # its last read (none: the group is new or back)
    f"""INSERT INTO stage_context (id, group_key, was_view, now_view, new_version, last_run)
       SELECT s.id, g.key, CASE WHEN g.removed_run IS NULL THEN g.members_view END, s.members_view,
           g.key IS NULL OR g.removed_run IS NOT NULL OR {_ANY_ATTRIBUTE_CHANGED}, g.last_run
       FROM stage_groups s LEFT JOIN group_state g ON g.id = s.id""",
    f"""INSERT INTO group_state (id, {_ATTRIBUTES}, first_run, last_run)
       SELECT id, {_ATTRIBUTES}, :run, :run FROM stage_groups WHERE true
       ON CONFLICT (id) DO UPDATE SET {", ".join(f"{c} = excluded.{c}" for c in _GROUP_ATTRIBUTES)},
           last_run = excluded.last_run, removed_run = NULL, needs_login = NULL""",
    """UPDATE stage_context SET group_key = (SELECT key FROM group_state g WHERE g.id = stage_context.id)
       WHERE group_key IS NULL""",
    """UPDATE group_versions SET to_run = :run
       WHERE to_run IS NULL AND group_key IN (SELECT group_key FROM stage_context WHERE new_version)""",
    f"""INSERT INTO group_versions (group_key, from_run, {_ATTRIBUTES})
       SELECT c.group_key, :run, {", ".join(f"s.{c}" for c in _GROUP_ATTRIBUTES)}
       FROM stage_groups s JOIN stage_context c ON c.id = s.id WHERE c.new_version""",
    # identities: new ones, and known ones whose details changed; a detail missing now
    # (a null in one group's copy) keeps its earlier value
    """INSERT INTO identity_state (id, username, name, email, institution, first_run, last_run_ended)
       SELECT identity_id, username, name, email, institution, :run, :run
       FROM stage_memberships WHERE true ORDER BY identity_id
       ON CONFLICT (id) DO UPDATE SET username = coalesce(excluded.username, identity_state.username),
           name = coalesce(excluded.name, identity_state.name),
           email = coalesce(excluded.email, identity_state.email),
           institution = coalesce(excluded.institution, identity_state.institution)
       WHERE (excluded.username IS NOT NULL AND excluded.username IS NOT identity_state.username)
          OR (excluded.name IS NOT NULL AND excluded.name IS NOT identity_state.name)
          OR (excluded.email IS NOT NULL AND excluded.email IS NOT identity_state.email)
          OR (excluded.institution IS NOT NULL AND excluded.institution IS NOT identity_state.institution)""",
    """INSERT INTO stage_keyed
       SELECT c.group_key, i.key, s.role, s.status, s.status_reason, s.membership_fields, s.updated
       FROM stage_memberships s
       JOIN stage_context c ON c.id = s.group_id
       JOIN identity_state i ON i.id = s.identity_id""",
    # close the versions that changed or vanished: a member no longer listed 'left' if
    # the identity would still see it, else it is out of view ('hidden')
    """UPDATE membership_versions SET to_run = :run, ended = CASE
           WHEN EXISTS (SELECT 1 FROM stage_keyed s WHERE s.group_key = membership_versions.group_key
                        AND s.identity_key = membership_versions.identity_key) THEN 'changed'
           WHEN (SELECT c.now_view = 'all' OR (c.now_view = 'active' AND membership_versions.status = 'active')
                 FROM stage_context c WHERE c.group_key = membership_versions.group_key) THEN 'left'
           ELSE 'hidden' END
       WHERE to_run IS NULL AND group_key IN (SELECT group_key FROM stage_context) AND NOT EXISTS (
         SELECT 1 FROM stage_keyed s
         WHERE s.group_key = membership_versions.group_key
           AND s.identity_key = membership_versions.identity_key
           AND s.role IS membership_versions.role
           AND s.status IS membership_versions.status)""",
    # open a version for every staged membership without a current one: a member the
    # identity would have seen at the group's last read 'joined', else it came into view
    """INSERT INTO membership_versions (group_key, identity_key, from_run, role, status, began)
       SELECT s.group_key, s.identity_key, :run, s.role, s.status, CASE
           WHEN EXISTS (SELECT 1 FROM membership_versions p
                        WHERE p.group_key = s.group_key AND p.identity_key = s.identity_key
                          AND p.to_run = :run AND p.ended = 'changed') THEN 'changed'
           WHEN c.was_view = 'all' OR (c.was_view = 'active' AND s.status = 'active') THEN 'joined'
           ELSE 'first_seen' END
       FROM stage_keyed s JOIN stage_context c ON c.group_key = s.group_key
       WHERE NOT EXISTS (
         SELECT 1 FROM membership_versions h
         WHERE h.group_key = s.group_key AND h.identity_key = s.identity_key AND h.to_run IS NULL)""",
    # memberships the read no longer lists end (the batch's groups' memberships, looked
    # up by group: a join here lets SQLite scan all of current state for a Bloom filter)
    """INSERT INTO stage_ended
       SELECT m.group_key, m.identity_key, (SELECT c.last_run FROM stage_context c WHERE c.group_key = m.group_key)
       FROM membership_state m
       WHERE m.group_key IN (SELECT group_key FROM stage_context) AND NOT EXISTS (
         SELECT 1 FROM stage_keyed s WHERE s.group_key = m.group_key AND s.identity_key = m.identity_key)""",
    *_END_MEMBERSHIPS,
    # new memberships, and changed ones rewritten; unchanged rows are left alone
    """INSERT INTO membership_state (group_key, identity_key, role, status, status_reason,
           membership_fields, updated, first_run)
       SELECT group_key, identity_key, role, status, status_reason, membership_fields, updated, :run
       FROM stage_keyed WHERE true
       ON CONFLICT (group_key, identity_key) DO UPDATE SET
           role = excluded.role, status = excluded.status, status_reason = excluded.status_reason,
           membership_fields = excluded.membership_fields, updated = excluded.updated
       WHERE membership_state.role IS NOT excluded.role
          OR membership_state.status IS NOT excluded.status
          OR membership_state.status_reason IS NOT excluded.status_reason
          OR membership_state.membership_fields IS NOT excluded.membership_fields
          OR membership_state.updated IS NOT excluded.updated""",
    # the digests of the answers these rows now come from, with their memberships'
    # count (what an unchanged group adds to the run's count)
    """DELETE FROM group_digests WHERE group_key IN (
         SELECT c.group_key FROM stage_digests JOIN stage_context c ON c.id = stage_digests.group_id
         WHERE stage_digests.digest IS NULL)""",
    """INSERT OR REPLACE INTO group_digests (group_key, digest, memberships)
       SELECT c.group_key, stage_digests.digest,
           (SELECT count(*) FROM stage_memberships s WHERE s.group_id = stage_digests.group_id)
       FROM stage_digests JOIN stage_context c ON c.id = stage_digests.group_id
       WHERE stage_digests.digest IS NOT NULL""",
    "DELETE FROM stage_digests",
    "DELETE FROM stage_groups",
    "DELETE FROM stage_memberships",
    "DELETE FROM stage_context",
    "DELETE FROM stage_keyed",
)

_VERSIONS_TOUCHED = """
SELECT EXISTS (SELECT 1 FROM membership_versions WHERE from_run = :run)
    OR EXISTS (SELECT 1 FROM membership_versions WHERE to_run = :run)"""

# The run's events (SPEC: joined, left, changed), counted once its batches are applied.
_COUNT_EVENTS = """
SELECT (SELECT count(*) FROM membership_versions WHERE from_run = :run AND began IN ('joined', 'changed'))
     + (SELECT count(*) FROM membership_versions WHERE to_run = :run AND ended = 'left')"""


@dataclasses.dataclass
class SyncRun:
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
    needs_login: int = 0  # of the failed groups, those refused for a session requirement


def start_run(db: sqlite_utils.Database, started_at: str | None = None) -> SyncRun:
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
    return SyncRun(run_id=run_id, started_at=now)


class Recorder:
    """Records one run's reads: staged as they arrive, applied in batches, committed once.

    Everything between ``listed`` and ``finish`` is one transaction on the run's
    connection, open while the groups are read. If the run fails before ``finish``,
    rolling that transaction back (``finish_without_changes`` does) leaves the
    database exactly as it was.
    """

    def __init__(
        self, db: sqlite_utils.Database, run: SyncRun, batch_rows: int = BATCH_ROWS, in_flight: int = 0
    ) -> None:
        """``in_flight``: how many reads may be outstanding at once. Once no more groups
        than that are left unread, each read is applied as it arrives, so what is left
        to do after the last read is that one group, not a whole batch."""
        self.db = db
        self.run = run
        self.batch_rows = batch_rows
        self.in_flight = in_flight
        self._params = {"run": run.run_id}
        self._staged = 0  # membership rows staged since the last batch was applied
        self._to_read = 0
        # the last recorded_digest lookup: (group id, its group_state key, stored memberships)
        self._looked_up: tuple[str, int, int] | None = None
        self.unchanged_groups = 0  # groups read with the digest of their rows: not diffed

    def listed(self, listing: MyGroups, to_read: int | None = None) -> None:
        """Open the run's transaction; record the groups the identity no longer belongs to
        as gone.

        ``listing``: the identity's groups and its other memberships' groups; ``to_read``:
        how many of its groups this run reads (default: all).
        """
        self._to_read = len(listing.mine) if to_read is None else to_read
        conn = self.db.conn
        conn.execute("BEGIN")
        conn.executemany("INSERT OR IGNORE INTO temp.stage_listed VALUES (?)", ((g.id,) for g in listing.mine))
        conn.executemany(
            "INSERT OR IGNORE INTO temp.stage_others VALUES (?, ?, ?)",
            ((g.id, g.my_role, g.my_status) for g in listing.others),
        )
        self._execute(_APPLY_LISTING)

    def read(self, read: GroupRead) -> GroupReadError | None:
        """Stage one group's document and memberships; apply a batch once enough wait.

        A large document's memberships arrive in pieces (``MembershipPieces``), each
        staged as it is decoded. Batches are applied only between groups, so the
        pieces of one group are staged rows until it is whole: an unusable entry late
        in the list discards them, the group counts as failed (returned: why), and
        nothing of it is recorded.
        """
        conn = self.db.conn
        if isinstance(read.memberships, list):
            conn.executemany(_INSERT_MEMBERSHIP, read.memberships)
            staged = len(read.memberships)
        else:
            staged = 0
            try:
                for piece in read.memberships:
                    conn.executemany(_INSERT_MEMBERSHIP, piece)
                    staged += len(piece)
            except GroupReadError as err:
                conn.execute("DELETE FROM temp.stage_memberships WHERE group_id = ?", [read.group.id])
                self.failed(read.group.id, str(err))
                return err
        conn.execute(_INSERT_GROUP, read.group)
        conn.execute("INSERT OR REPLACE INTO temp.stage_digests VALUES (?, ?)", [read.group.id, read.digest])
        self.run.groups_synced += 1
        self._staged += staged
        unread = self._to_read - self.run.groups_synced - self.run.groups_failed
        if self._staged >= self.batch_rows or unread <= self.in_flight:
            self._apply_batch()
        return None

    def has_digests(self) -> bool:
        """Whether any group has a digest: none on a first run, or the first after an
        upgrade, whose groups then need no lookups."""
        return bool(self.db.conn.execute("SELECT EXISTS (SELECT 1 FROM group_digests)").fetchone()[0])

    def recorded_digest(self, group_id: str) -> bytes | None:
        """The digest stored with a group's rows (None: none, or the group is gone).

        Read inside the run's transaction, after ``listed``: a group this run found
        gone has lost its digest already.
        """
        row = self.db.conn.execute(
            "SELECT g.key, d.digest, d.memberships FROM group_state g JOIN group_digests d ON d.group_key = g.key"
            " WHERE g.id = ? AND g.removed_run IS NULL",
            [group_id],
        ).fetchone()
        if row is None:
            self._looked_up = None
            return None
        self._looked_up = (group_id, row[0], row[2])
        return t.cast(bytes, row[1])

    def unchanged(self, group_id: str) -> None:
        """Record a group read whose answer has the digest stored with its rows (checked
        with ``recorded_digest`` just before): a diff of it would change nothing but
        the group's last read (and that it no longer needs a login), so that is all that
        is written."""
        looked_up = self._looked_up
        if looked_up is None or looked_up[0] != group_id:
            if self.recorded_digest(group_id) is None:
                raise ValueError(f"group {group_id} has no recorded digest")
            looked_up = self._looked_up
            assert looked_up is not None
        _, key, memberships = looked_up
        self.db.conn.execute(
            "UPDATE group_state SET last_run = ?, needs_login = NULL WHERE key = ?", [self.run.run_id, key]
        )
        self.run.groups_synced += 1
        self.run.memberships += memberships
        self.unchanged_groups += 1
        unread = self._to_read - self.run.groups_synced - self.run.groups_failed
        if self._staged and unread <= self.in_flight:
            self._apply_batch()

    def failed(self, group_id: str, reason: str) -> None:
        """Note a listed group that could not be read: it is left as it was, but for its
        digest. Its next good read is then diffed in full, so whatever a run records
        about a group that failed (or wanted a new login) is renewed by a diff, never
        kept by a skip."""
        self.db.conn.execute(
            "DELETE FROM group_digests WHERE group_key = (SELECT key FROM group_state WHERE id = ?)", [group_id]
        )
        self.run.groups_failed += 1
        self.run.failed_groups[group_id] = reason

    def needs_login(self, listing: GroupListing, asked: str) -> None:
        """Note a group Globus refused to show for a session requirement: it is left as
        it was, and marked ``needs_login`` with what Globus ``asked`` for until a read
        succeeds. A group never read before is recorded as the listing shows it (name,
        the identity's standing), so that ``syncer groups`` can say it needs a login."""
        self.failed(listing.id, f"needs a new login session: {asked}")
        self.run.needs_login += 1
        known = self.db.conn.execute(
            "UPDATE group_state SET needs_login = :asked WHERE id = :id AND removed_run IS NULL",
            {"asked": asked, "id": listing.id},
        ).rowcount
        if known:
            return
        values = {
            "id": listing.id, "name": listing.name, "group_visibility": listing.group_visibility,
            "group_members_visibility": listing.members_visibility, "members_view": str(listing.members_view),
            "my_role": listing.my_role, "my_status": listing.my_status, "asked": asked, **self._params,
        }
        listed = ", ".join(_LISTED_ATTRIBUTES)
        self.db.conn.execute(
            f"""INSERT INTO group_state (id, {listed}, first_run, last_run, needs_login)
                VALUES (:id, {", ".join(f":{c}" for c in _LISTED_ATTRIBUTES)}, :run, :run, :asked)
                ON CONFLICT (id) DO UPDATE SET {", ".join(f"{c} = excluded.{c}" for c in _LISTED_ATTRIBUTES)},
                    last_run = :run, removed_run = NULL, needs_login = :asked""",
            values,
        )
        self.db.conn.execute(
            f"INSERT INTO group_versions (group_key, from_run, {listed}) SELECT key, :run, {listed} FROM group_state"
            " WHERE id = :id",
            values,
        )

    def _apply_batch(self) -> None:
        conn = self.db.conn
        self.run.memberships += conn.execute("SELECT count(*) FROM temp.stage_memberships").fetchone()[0]
        self._execute(_APPLY_BATCH)
        self._staged = 0

    def _execute(self, statements: t.Iterable[str]) -> None:
        """Run statements with the run's parameters."""
        for statement in statements:
            self.db.conn.execute(statement, self._params)

    def finish(self) -> SyncRun:
        """Apply what is left, write the run's row and commit: the run becomes visible.

        Then, if the run recorded changes, refresh the query planner's statistics
        when history has grown much since they were taken.
        """
        run = self.run
        run.status = "partial" if run.groups_failed else "ok"
        run.exit_code = EXIT_PARTIAL if run.groups_failed else EXIT_OK
        self._apply_batch()
        run.changes = self.db.conn.execute(_COUNT_EVENTS, self._params).fetchone()[0]
        _write_run_row(self.db, run)
        self.db.conn.commit()
        if self.db.conn.execute(_VERSIONS_TOUCHED, self._params).fetchone()[0]:
            refresh_statistics(self.db)
        return run


def refresh_statistics(db: sqlite_utils.Database) -> bool:
    """Take the query planner's statistics anew if history or the runs have grown
    ANALYZE_GROWTH-fold since they were taken (or there are none); True if it did.

    Without statistics SQLite's planner guesses, and for "as of" queries it guesses a
    scan of all history. They need not be fresh, only of the right order of
    magnitude, so this runs rarely and samples (``analysis_limit``). Called after a
    run that recorded changes, so an unchanged run never rewrites them.
    """
    counted_versions, counted_runs = _counted(db, "membership_versions"), _counted(db, "sync_runs")
    versions = db.execute("SELECT count(*) FROM membership_versions").fetchone()[0]
    runs = db.execute("SELECT count(*) FROM sync_runs").fetchone()[0]
    if counted_versions and versions < counted_versions * ANALYZE_GROWTH and runs < counted_runs * ANALYZE_GROWTH:
        return False
    db.execute("PRAGMA analysis_limit = 1000")
    db.execute("ANALYZE")
    # A run's versions are few, but the mean per run says otherwise: the first run's
    # snapshot alone outweighs months of changes, and a planner that believes it reads
    # a week of changes group by group. State the typical run's count instead.
    for index, column in (("idx_versions_from_run", "from_run"), ("idx_versions_to_run", "to_run")):
        per_run = [n for (n,) in db.execute(
            f"SELECT count(*) FROM membership_versions WHERE {column} IS NOT NULL GROUP BY {column}")]
        stat = db.execute("SELECT stat FROM sqlite_stat1 WHERE idx = ?", [index]).fetchone()
        if per_run and stat:
            # "rows, rows per run, rows per run and reason"
            rows, _, per_reason, *rest = stat[0].split()
            typical = statistics.median_low(per_run)
            stat = " ".join([rows, str(typical), str(min(int(per_reason), typical)), *rest])
            db.execute("UPDATE sqlite_stat1 SET stat = ? WHERE idx = ?", [stat, index])
    db.conn.commit()
    return True


def _counted(db: sqlite_utils.Database, table: str) -> int:
    """How many rows ``table`` had when the statistics were taken (0: none taken)."""
    if not db["sqlite_stat1"].exists():
        return 0
    # each index's statistics line starts with the number of rows it covers
    stat = "SELECT max(CAST(stat AS INTEGER)) FROM sqlite_stat1 WHERE tbl = ?"
    return db.execute(stat, [table]).fetchone()[0] or 0


def finish_without_changes(
    db: sqlite_utils.Database, run: SyncRun, status: str, error: str, exit_code: int
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


def _write_run_row(db: sqlite_utils.Database, run: SyncRun) -> None:
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
