"""End to end: why each change happened, and the group as it was at each run.

Each test drives real `syncer sync` runs against the simulator, changes the world
between them, and checks ``membership_changes`` (change, reason, group name at the
run), ``sync_runs.changes`` (events only) and ``group_history`` against what happened.
"""

from __future__ import annotations

import random
import re
import sqlite3
from pathlib import Path

import pytest
from conftest import Env
from helpers import admin_groups, expected_state, my_active_groups, others, state_as_of

from syncer.globus.globus_groups import GroupListing, MyGroups, parse_group
from syncer.storage import database
from syncer.storage.history import ANALYZE_GROWTH, Recorder, start_run

EVENTS = ("joined", "left", "changed")


def changes_of(env: Env, run_id: int) -> dict[tuple[str, str], tuple[str, str]]:
    """(group_id, identity_id) -> (change, reason) of one run."""
    rows = env.query("SELECT group_id, identity_id, change, reason FROM membership_changes WHERE run_id = ?", [run_id])
    return {(r["group_id"], r["identity_id"]): (r["change"], r["reason"]) for r in rows}


def events_count(env: Env, run_id: int) -> int:
    return env.query("SELECT changes FROM sync_runs WHERE id = ?", [run_id])[0][0]


def sync(env: Env, expected_code: int = 0) -> None:
    result = env.run("sync")
    assert result.returncode == expected_code, result.output


def test_a_failed_first_run_leaves_no_events(env: Env) -> None:
    """A timer firing before `syncer login`: the first successful read observes, it reports no one as joined."""
    sync(env, 77)
    assert env.login().returncode == 0
    sync(env)
    runs = env.query("SELECT id, status, changes FROM sync_runs ORDER BY id")
    assert [tuple(r) for r in runs] == [(1, "failed", 0), (2, "ok", 0)]
    reasons = {reason for _, reason in changes_of(env, 2).values()}
    assert reasons == {"first_seen"}
    events = env.query("SELECT count(*) FROM membership_changes WHERE reason IN ('joined', 'left', 'changed')")
    assert events[0][0] == 0


def test_leaving_a_group_is_an_observation_and_keeps_what_globus_says(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    sync(env)
    group = admin_groups(world)[0]
    members = {(group, i) for i in world.groups[group]["memberships"]}
    world.set_status(group, world.me, "left")
    sync(env)
    assert changes_of(env, 2) == {key: ("removed", "group_gone") for key in members}
    assert events_count(env, 2) == 0
    row = env.query("SELECT my_role, my_status, removed_at FROM groups WHERE id = ?", [group])[0]
    assert row["my_status"] == "left" and row["removed_at"] is not None
    # the group's last version ends with the run that found it gone
    history = env.query("SELECT from_run, to_run FROM group_history WHERE group_id = ?", [group])
    assert [tuple(r) for r in history] == [(1, 2)]
    # and coming back is seeing its members again, not their joining
    world.set_status(group, world.me, "active")
    sync(env)
    assert {reason for _, reason in changes_of(env, 3).values()} == {"first_seen"}
    assert state_as_of(env, 3) == expected_state(world)


def test_a_narrowed_view_hides_members_and_a_widened_one_shows_them(logged_in: Env) -> None:
    """Demoted from admin in a group whose members only managers see: the others are
    out of view, not gone; promoted again, they come back into view, not joined."""
    env, world = logged_in, logged_in.world
    group = admin_groups(world)[0]
    world.set_policy(group, members_visibility="managers")
    sync(env)
    hidden = {(group, i) for i in others(world, group)}
    assert hidden
    world.set_role(group, world.me, "member")
    sync(env)
    assert changes_of(env, 2) == {**{key: ("removed", "hidden") for key in hidden}, (group, world.me): ("changed", "changed")}
    assert events_count(env, 2) == 1  # only the identity's own role changed
    assert env.query("SELECT members_visible FROM groups WHERE id = ?", [group])[0][0] == 0
    world.set_role(group, world.me, "admin")
    sync(env)
    assert changes_of(env, 3) == {**{key: ("added", "first_seen") for key in hidden}, (group, world.me): ("changed", "changed")}
    assert events_count(env, 3) == 1
    visible = env.query("SELECT from_run, members_visible FROM group_history WHERE group_id = ? ORDER BY from_run", [group])
    assert [tuple(r) for r in visible] == [(1, 1), (2, 0), (3, 1)]


def test_a_member_view_sees_active_members_leave_and_others_hidden(logged_in: Env) -> None:
    """Where members see the active members only: an admin demoted to member loses
    sight of the invited and pending ones (hidden); an active member who goes is 'left'."""
    env, world = logged_in, logged_in.world
    group = admin_groups(world)[0]
    world.set_policy(group, members_visibility="members")
    invited = world.add_member(group, status="invited")
    sync(env)
    world.set_role(group, world.me, "member")
    active = next(i for i in others(world, group) if world.groups[group]["memberships"][i].status == "active")
    world.remove_member(group, active)
    sync(env)
    changes = changes_of(env, 2)
    assert changes[(group, active)] == ("removed", "left")
    assert changes[(group, invited)] == ("removed", "hidden")
    out_of_view = {i for (_, i), (_, reason) in changes.items() if reason == "hidden"}
    assert out_of_view == {i for i in others(world, group) if world.groups[group]["memberships"][i].status != "active"}
    assert state_as_of(env, 2) == expected_state(world)


def test_a_renamed_group_keeps_its_name_at_each_run(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    group = admin_groups(world)[0]
    old_name = world.groups[group]["name"]
    sync(env)
    world.rename_group(group, "Renamed Lab")
    newcomer = world.add_member(group)
    sync(env)
    names = {r["run_id"]: r["group_name"] for r in env.query(
        "SELECT DISTINCT run_id, group_name FROM membership_changes WHERE group_id = ?", [group])}
    assert names == {1: old_name, 2: "Renamed Lab"}
    assert changes_of(env, 2) == {(group, newcomer): ("added", "joined")}
    history = env.query("SELECT name, from_run, to_run FROM group_history WHERE group_id = ? ORDER BY from_run", [group])
    assert [tuple(r) for r in history] == [(old_name, 1, 2), ("Renamed Lab", 2, None)]
    # the old name still finds the group, as of the run when it had it
    by_old_name = env.query(
        "SELECT h.identity_id FROM membership_history h WHERE h.group_id IN"
        " (SELECT group_id FROM group_history WHERE name = ?) AND h.from_run <= 1 AND (h.to_run IS NULL OR h.to_run > 1)",
        [old_name],
    )
    assert {r[0] for r in by_old_name} == {i for (g, i) in state_as_of(env, 1) if g == group}


def test_a_group_left_out_of_the_config_stays_as_it_was(logged_in: Env) -> None:
    """Not read while left out; read again, only what really changed meanwhile is recorded."""
    env, world = logged_in, logged_in.world
    sync(env)
    dropped = admin_groups(world)[0]
    kept = [gid for gid in my_active_groups(world) if gid != dropped]
    env.write_config(groups=kept)
    leaver = others(world, dropped)[0]
    world.remove_member(dropped, leaver)
    sync(env)
    assert changes_of(env, 2) == {}
    assert env.query("SELECT removed_at FROM groups WHERE id = ?", [dropped])[0][0] is None
    env.write_config()
    sync(env)
    assert changes_of(env, 3) == {(dropped, leaver): ("removed", "left")}
    assert events_count(env, 3) == 1


def test_the_latest_runs_changes_are_found_after_a_failed_run(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    sync(env)
    group = admin_groups(world)[0]
    newcomer = world.add_member(group)
    sync(env)
    for gid in my_active_groups(world):
        env.sim.faults.set_group_error(gid, 502)
    sync(env, 1)
    latest = env.query(
        "SELECT group_id, identity_id, change, reason FROM membership_changes"
        " WHERE run_id = (SELECT max(id) FROM sync_runs WHERE status IN ('ok', 'partial'))"
    )
    assert [tuple(r) for r in latest] == [(group, newcomer, "added", "joined")]


def readme_queries() -> dict[str, str]:
    """The example SQL of docs/database.md, by the paragraph that introduces each."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "database.md").read_text()
    section = text[text.index("### Example queries"):]
    found = re.findall(r"\n\n((?:[^\n]+\n)+?)\n```sql\n(.*?)```", section, flags=re.S)
    return {" ".join(title.split()): sql for title, sql in found}


@pytest.fixture(scope="module")
def history_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 groups x 30 members over 8 runs of churn, recorded as syncer records them."""
    path = tmp_path_factory.mktemp("plans") / "groups.db"
    rng = random.Random(5)
    groups = {f"g{n:02d}": {f"u{rng.randrange(400):03d}": "member" for _ in range(30)} for n in range(40)}
    db = database.open_for_writing(path)
    for _ in range(8):
        run = start_run(db)
        recorder = Recorder(db, run)
        listings = [GroupListing(gid, f"Group {gid}", "admin", "active", "managers") for gid in groups]
        recorder.listed(MyGroups(listings, []))
        for listing in listings:
            members = groups[listing.id]
            doc = {"id": listing.id, "name": listing.name, "memberships": [
                {"identity_id": i, "username": f"{i}@example.org", "role": role, "status": "active"}
                for i, role in members.items()]}
            recorder.read(parse_group(listing, doc))
        recorder.finish()
        for members in groups.values():  # churn: one leaves, one joins, one promoted
            members.pop(rng.choice(list(members)))
            members[f"u{rng.randrange(400):03d}"] = "member"
            members[rng.choice(list(members))] = "manager"
    db.close()
    return path


def test_the_readme_has_its_queries() -> None:
    assert len(readme_queries()) >= 7


@pytest.mark.parametrize("title", list(readme_queries()))
def test_readme_queries_run_and_use_indexes(history_db: Path, title: str) -> None:
    sql = readme_queries()[title]
    conn = sqlite3.connect(f"file:{history_db}?mode=ro", uri=True)
    try:
        conn.execute(sql).fetchall()
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
    finally:
        conn.close()
    # history is read through its indexes, never all of it; run ids come from sync_runs
    scans = [step for step in plan if step.startswith("SCAN") and "idx_sync_runs_started" not in step
             and not re.match(r"SCAN (asof|CONSTANT ROW)\b", step)]
    assert not scans, plan


def test_statistics_are_taken_after_the_first_run_and_when_history_grows(history_db: Path) -> None:
    conn = sqlite3.connect(history_db)
    counted = conn.execute(
        "SELECT max(CAST(stat AS INTEGER)) FROM sqlite_stat1 WHERE tbl = 'membership_versions'").fetchone()[0]
    versions = conn.execute("SELECT count(*) FROM membership_versions").fetchone()[0]
    runs = conn.execute("SELECT stat FROM sqlite_stat1 WHERE idx = 'idx_sync_runs_started'").fetchone()[0]
    per_run = conn.execute("SELECT stat FROM sqlite_stat1 WHERE idx = 'idx_versions_from_run'").fetchone()[0]
    conn.close()
    # taken after run 1, then each time the runs or history grew by half: runs 2, 3, 5 and 8
    assert runs == "8 1"
    # sampled (analysis_limit): the order of magnitude is what the planner needs
    assert versions / ANALYZE_GROWTH / 2 <= counted <= versions * 2
    # a run's versions as the typical run has them (about 120 here), not the first run's 1,200
    assert 50 < int(per_run.split()[1]) < 200, per_run
