"""Unit tests: a run records the same thing however its reads are cut into batches.

``Recorder`` applies staged reads in batches while the run is still reading. The
end-to-end tests use small worlds, which fit in one batch; here the same runs are
recorded with one membership per batch and with everything in one batch, and the
two databases must hold the same rows.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from syncer.globus.globus_groups import GroupListing, GroupReadError, MembershipRow, MyGroups, parse_group
from syncer.storage import database, history
from syncer.storage.history import Recorder, finish_without_changes, start_run

Member = tuple[str, str, str]  # identity id, role, status


def group_doc(name: str, members: list[Member], gid: str | None = None) -> dict[str, object]:
    return {
        "id": gid or name.lower(),
        "name": name,
        "policies": {"group_visibility": "private", "group_members_visibility": "managers"},
        "memberships": [
            {
                "identity_id": identity,
                "username": f"{identity}@example.org",
                "role": role,
                "status": status,
                "membership_fields": {"name": identity.title(), "email": f"{identity}@example.org"},
            }
            for identity, role, status in members
        ],
    }


# Each run: the groups listed, and for each group read its members (None: the read failed).
RUNS: list[dict[str, list[Member] | None]] = [
    {
        "g1": [("alice", "admin", "active"), ("bob", "member", "active"), ("carol", "member", "invited")],
        "g2": [("alice", "member", "active"), ("dave", "member", "pending")],
        "g3": [("erin", "member", "active")],
    },
    {
        # bob promoted, carol joined, frank added; g2 fails to read; g3 is gone
        "g1": [("alice", "admin", "active"), ("bob", "manager", "active"), ("carol", "member", "active"),
               ("frank", "member", "active")],
        "g2": None,
    },
    {
        # alice left g1, g2 read again with dave gone, g3 back
        "g1": [("bob", "manager", "active"), ("carol", "member", "active"), ("frank", "member", "active")],
        "g2": [("alice", "member", "active")],
        "g3": [("erin", "member", "active")],
    },
    {
        # unchanged
        "g1": [("bob", "manager", "active"), ("carol", "member", "active"), ("frank", "member", "active")],
        "g2": [("alice", "member", "active")],
        "g3": [("erin", "member", "active")],
    },
]


def record(
    path: Path, runs: list[dict[str, list[Member] | None]], batch_rows: int, in_flight: int = 0
) -> sqlite3.Connection:
    db = database.open_for_writing(path)
    for groups in runs:
        run = start_run(db)
        recorder = Recorder(db, run, batch_rows=batch_rows, in_flight=in_flight)
        listings = [GroupListing(gid, gid.upper(), "admin", "active", "managers") for gid in groups]
        recorder.listed(MyGroups(listings, []))
        for listing in listings:
            members = groups[listing.id]
            if members is None:
                recorder.failed(listing.id, "HTTP 500")
            else:
                recorder.read(parse_group(listing, group_doc(listing.name or "", members)))
        recorder.finish()
    db.close()
    return sqlite3.connect(path)


def normalized(conn: sqlite3.Connection) -> dict[str, list[tuple[object, ...]]]:
    """Every table's rows, with each timestamp replaced by the id of the run that started then."""
    run_of = {started: f"run {run_id}" for run_id, started in conn.execute("SELECT id, started_at FROM sync_runs")}
    tables = {}
    for table, order in [
        ("sync_runs", "id"),
        ("groups", "id"),
        ("identities", "id"),
        ("memberships", "group_id, identity_id"),
        ("membership_history", "group_id, identity_id, from_run"),
        ("membership_changes", "run_id, group_id, identity_id, change"),
    ]:
        cursor = conn.execute(f"SELECT * FROM {table} ORDER BY {order}")
        columns = [d[0] for d in cursor.description]
        rows = []
        for row in cursor:
            rows.append(tuple(
                run_of.get(value, value) if column not in ("finished_at", "pid") else None
                for column, value in zip(columns, row, strict=True)
            ))
        tables[table] = rows
    return tables


def test_batches_of_one_record_what_one_batch_records(tmp_path: Path) -> None:
    one = normalized(record(tmp_path / "one.db", RUNS, batch_rows=1))
    whole = normalized(record(tmp_path / "whole.db", RUNS, batch_rows=10**9))
    assert one == whole
    # with every group in the tail of reads still in flight, each group is its own batch
    per_group = normalized(record(tmp_path / "per_group.db", RUNS, batch_rows=10**9, in_flight=3))
    assert per_group == whole


def test_what_the_runs_recorded(tmp_path: Path) -> None:
    conn = record(tmp_path / "groups.db", RUNS, batch_rows=1)
    runs = conn.execute("SELECT id, status, groups_synced, groups_failed, memberships, changes FROM sync_runs").fetchall()
    assert runs == [
        (1, "ok", 3, 0, 6, 0),  # everyone first_seen: observations, not events
        (2, "partial", 1, 1, 4, 3),  # bob changed, carol changed, frank joined; g3 gone (erin: an observation)
        (3, "ok", 3, 0, 5, 2),  # alice left g1, dave left g2; g3 back (erin first_seen again)
        (4, "ok", 3, 0, 5, 0),
    ]
    changes = conn.execute(
        "SELECT run_id, group_id, group_name, identity_id, change, reason FROM membership_changes WHERE run_id > 1"
        " ORDER BY run_id, group_id, identity_id"
    ).fetchall()
    assert changes == [
        (2, "g1", "G1", "bob", "changed", "changed"),
        (2, "g1", "G1", "carol", "changed", "changed"),
        (2, "g1", "G1", "frank", "added", "joined"),
        (2, "g3", "G3", "erin", "removed", "group_gone"),
        (3, "g1", "G1", "alice", "removed", "left"),
        (3, "g2", "G2", "dave", "removed", "left"),
        (3, "g3", "G3", "erin", "added", "first_seen"),
    ]
    # a run's count of changes is its events as the view shows them
    shown = dict(conn.execute(
        "SELECT run_id, count(*) FROM membership_changes WHERE reason IN ('joined', 'left', 'changed') GROUP BY run_id"
    ).fetchall())
    assert {run_id: changes for run_id, *_, changes in runs if changes} == shown
    # g2 was not read in run 2: its rows kept run 1's last_seen, then run 3's
    last_seen = dict(conn.execute(
        "SELECT m.group_id || '/' || m.identity_id, r.id FROM memberships m JOIN sync_runs r ON r.started_at = m.last_seen"
    ).fetchall())
    assert last_seen == {"g1/bob": 4, "g1/carol": 4, "g1/frank": 4, "g2/alice": 4, "g3/erin": 4}
    # dave was last seen in g2 in run 1: run 2 could not read it, run 3 no longer listed him
    assert last_seen_runs(conn) == {"alice": 4, "bob": 4, "carol": 4, "dave": 1, "erin": 4, "frank": 4}
    removed = conn.execute("SELECT id FROM groups WHERE removed_at IS NOT NULL").fetchall()
    assert removed == []  # g3 came back
    identity = conn.execute("SELECT name, email FROM identities WHERE id = 'alice'").fetchone()
    assert identity == ("Alice", "alice@example.org")


def last_seen_runs(conn: sqlite3.Connection) -> dict[str, int]:
    """Each identity's last_seen, as the id of the run that started then."""
    return dict(conn.execute(
        "SELECT i.id, r.id FROM identities i JOIN sync_runs r ON r.started_at = i.last_seen"
    ).fetchall())


def test_identities_last_seen_keeps_when_memberships_ended(tmp_path: Path) -> None:
    conn = record(tmp_path / "groups.db", RUNS[:2], batch_rows=1)
    # run 2: g3 gone (erin was only there), g2 not read (dave only there; alice also in g1)
    assert last_seen_runs(conn) == {"alice": 2, "bob": 2, "carol": 2, "dave": 1, "erin": 1, "frank": 2}


def test_an_unchanged_run_writes_only_its_row_and_the_groups(tmp_path: Path) -> None:
    """Page by page: the run's row, the groups' last_seen, and the file's header."""
    path = tmp_path / "groups.db"
    record(path, RUNS[2:], batch_rows=1).close()
    before = path.read_bytes()
    conn = record(path, RUNS[3:], batch_rows=1)
    after = path.read_bytes()
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    try:
        owners = dict(conn.execute("SELECT pageno, name FROM dbstat").fetchall())
    except sqlite3.OperationalError:
        pytest.skip("this SQLite has no dbstat table")
    assert len(after) == len(before)
    changed = {
        owners[number + 1]
        for number in range(len(after) // page_size)
        if before[number * page_size:(number + 1) * page_size] != after[number * page_size:(number + 1) * page_size]
    }
    assert changed <= {"sqlite_schema", "sync_runs", "sqlite_sequence", "idx_sync_runs_started", "group_state"}
    assert "group_state" in changed and "sync_runs" in changed


def test_a_failed_run_leaves_no_trace_but_its_row(tmp_path: Path) -> None:
    db = database.open_for_writing(tmp_path / "groups.db")
    run = start_run(db)
    recorder = Recorder(db, run, batch_rows=1)
    listings = [GroupListing(gid, gid, "admin", "active", "managers") for gid in RUNS[0]]
    recorder.listed(MyGroups(listings, []))
    for listing in listings[:2]:  # batches already applied inside the open transaction
        recorder.read(parse_group(listing, group_doc(listing.id, RUNS[0][listing.id] or [])))
    finish_without_changes(db, run, "aborted", "stopped", 1)
    assert db.execute("SELECT count(*) FROM memberships").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM membership_history").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM identities").fetchone()[0] == 0
    assert db.execute("SELECT status, error, groups_synced, memberships, changes FROM sync_runs").fetchall() == [
        ("aborted", "stopped", 0, 0, 0)]


@pytest.mark.parametrize("batch_rows", [1, 3, 10**9])
def test_identity_details_survive_a_membership_without_them(tmp_path: Path, batch_rows: int) -> None:
    runs: list[dict[str, list[Member] | None]] = [{"g1": [("alice", "member", "active")]}]
    conn = record(tmp_path / "groups.db", runs, batch_rows)
    # a later run meets alice only in a group that shares no fields with syncer's identity
    db = database.open_for_writing(tmp_path / "groups.db")
    run = start_run(db)
    recorder = Recorder(db, run, batch_rows=batch_rows)
    listing = GroupListing("g1", "g1", "admin", "active", "managers")
    recorder.listed(MyGroups([listing], []))
    doc = group_doc("g1", [("alice", "member", "active")])
    doc["memberships"][0]["membership_fields"] = {}  # type: ignore[index]
    recorder.read(parse_group(listing, doc))
    recorder.finish()
    db.close()
    assert conn.execute("SELECT name, email FROM identities WHERE id = 'alice'").fetchone() == (
        "Alice", "alice@example.org")


def test_reads_in_the_tail_are_applied_as_they_arrive(tmp_path: Path) -> None:
    db = database.open_for_writing(tmp_path / "groups.db")
    run = start_run(db)
    recorder = Recorder(db, run, batch_rows=10**9, in_flight=1)
    listings = [GroupListing(gid, gid, "admin", "active", "managers") for gid in RUNS[0]]
    recorder.listed(MyGroups(listings, []))

    def applied() -> int:
        return db.execute("SELECT count(*) FROM memberships").fetchone()[0]

    first, second, third = listings
    recorder.read(parse_group(first, group_doc(first.id, RUNS[0][first.id] or [])))
    assert applied() == 0  # two groups unread, one may be in flight: keep staging
    recorder.failed(second.id, "HTTP 500")
    assert applied() == 0
    recorder.read(parse_group(third, group_doc(third.id, RUNS[0][third.id] or [])))
    assert applied() == 4  # the last read: applied at once, with what was staged before it
    assert recorder.finish().groups_failed == 1


@pytest.mark.parametrize("memberships", ["absent", []])
def test_a_group_shown_without_its_memberships(memberships: object) -> None:
    """Where only the own membership is visible it comes from the listing; where the
    members are visible, a missing list is an unusable document."""
    doc = group_doc("g1", [])
    if memberships == "absent":
        del doc["memberships"]
    else:
        doc["memberships"] = memberships
    own = MembershipRow("g1", "me", "me@example.org", "member", "invited", None, "{}", None, None, None, None)
    invited = GroupListing("g1", "g1", "member", "invited", "managers", own=(own,))
    read = parse_group(invited, doc)
    assert read.memberships == [own] and read.group.members_view == "own"
    active = GroupListing("g1", "g1", "member", "active", "managers", own=(own._replace(status="active"),))
    assert parse_group(active, doc).memberships == [own._replace(status="active")]
    sees_members = GroupListing("g1", "g1", "member", "active", "members", own=(own._replace(status="active"),))
    if memberships == "absent":
        with pytest.raises(GroupReadError, match="memberships: missing"):
            parse_group(sees_members, doc)
    else:
        assert parse_group(sees_members, doc).memberships == []


@pytest.mark.parametrize("analyzed", [False, True], ids=["no statistics", "statistics"])
def test_each_batch_statement_reads_only_the_batchs_rows(tmp_path: Path, analyzed: bool) -> None:
    """Driven by the staging tables through indexes, with or without the planner's
    statistics: a statement that scanned a stored table would cost every batch the
    whole database (at 10,000 groups, minutes per run)."""
    path = tmp_path / "groups.db"
    conn = record(path, RUNS, batch_rows=1)
    conn.execute("DROP TABLE IF EXISTS sqlite_stat1")
    if analyzed:  # the statistics of a database a thousand times this one
        conn.execute("ANALYZE")
        for table, index, stat in conn.execute("SELECT tbl, idx, stat FROM sqlite_stat1").fetchall():
            rows, *per_key = stat.split()
            conn.execute("UPDATE sqlite_stat1 SET stat = ? WHERE tbl = ? AND idx IS ?",
                         [" ".join([str(int(rows) * 1000), *per_key]), table, index])
    conn.commit()
    conn.close()
    conn = sqlite3.connect(path)  # statistics are read when a connection opens
    conn.executescript(history._STAGING)
    for statement in history._APPLY_BATCH:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}", {"run": 5})]
        # a scan, or a Bloom filter (built by scanning the table it filters), of a stored table
        stored = [step for step in plan if step.startswith(("SCAN", "BLOOM FILTER ON")) and not _scans_staging(step)]
        assert not stored, (statement, plan)
    conn.close()


def _scans_staging(step: str) -> bool:
    """Whether a plan's SCAN step reads a staging table (by name, or by the aliases the statements give them)."""
    return bool(re.match(r"(SCAN|BLOOM FILTER ON) (stage_\w+|s|c)\b", step))
