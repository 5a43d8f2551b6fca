"""End to end: `syncer login` -> `syncer sync` -> SQLite, against the simulator over HTTP."""

from __future__ import annotations

import json
import sqlite3
import stat

import globus_sdk
import pytest
from conftest import Env
from helpers import (
    admin_groups,
    current_state,
    expected_state,
    has_running_run,
    my_active_groups,
    others,
    state_as_of,
    stored_token_data,
    stored_tokens,
    wait_for,
)

from syncer.config import TUTORIAL_CLIENT_ID
from syncer.globus.token_store import TokenStore


def test_login_stores_tokens_privately_and_names_the_identity(env: Env) -> None:
    result = env.login()
    assert result.returncode == 0, result.output
    username = env.world.identities[env.world.me]["username"]
    assert f"Logged in as {username}" in result.stdout
    assert str(env.tokens) in result.stdout
    assert stat.S_IMODE(env.tokens.stat().st_mode) == 0o600
    assert env.sim.stats["code_exchanges"] == 1

    again = env.login()
    assert again.returncode == 0
    assert "Already logged in" in again.stdout
    assert env.sim.stats["code_exchanges"] == 1  # no second flow without --force

    forced = env.login("--force")
    assert forced.returncode == 0, forced.output
    assert env.sim.stats["code_exchanges"] == 2


def test_login_with_a_wrong_code_fails_cleanly(env: Env) -> None:
    result = env.run("login", "--no-browser", input="not-a-real-code\n")
    assert result.returncode == 1
    assert "Globus Auth refused the code" in result.stderr
    assert "Traceback" not in result.output


def test_first_sync_equals_the_world(logged_in: Env) -> None:
    env = logged_in
    result = env.run("sync")
    assert result.returncode == 0, result.output
    assert current_state(env) == expected_state(env.world)
    assert state_as_of(env, 1) == expected_state(env.world)
    groups = {r["id"]: r for r in env.query("SELECT * FROM groups")}
    assert set(groups) == set(my_active_groups(env.world))
    for gid, row in groups.items():
        assert row["name"] == env.world.groups[gid]["name"]
        assert row["removed_at"] is None
    run = env.query("SELECT * FROM sync_runs")[0]
    assert run["status"] == "ok" and run["groups_failed"] == 0
    assert run["memberships"] == len(expected_state(env.world))
    assert run["changes"] == 0  # everything is first_seen in the first run: observations, not events
    reasons = env.query("SELECT change, reason, count(*) AS n FROM membership_changes GROUP BY 1, 2")
    assert [tuple(r) for r in reasons] == [("added", "first_seen", run["memberships"])]
    # identities carry what membership_fields tell
    me = env.query("SELECT * FROM identities WHERE id = ?", [env.world.me])[0]
    assert me["username"] == env.world.identities[env.world.me]["username"]
    fields = json.loads(env.query("SELECT membership_fields FROM memberships LIMIT 1")[0][0])
    assert isinstance(fields, dict)


def test_self_only_group_records_only_own_membership(logged_in: Env) -> None:
    env = logged_in
    world = env.world
    self_only = [
        gid for gid in my_active_groups(world)
        if world.my_membership(gid).role == "member"
        and world.groups[gid]["policies"]["group_members_visibility"] == "managers"
    ]
    assert self_only, "the generated world should include a managers-only group where me is a plain member"
    assert env.run("sync").returncode == 0
    for gid in self_only:
        assert env.query("SELECT members_visible FROM groups WHERE id = ?", [gid])[0][0] == 0
        rows = env.query("SELECT identity_id FROM memberships WHERE group_id = ?", [gid])
        assert [r[0] for r in rows] == [world.me]


def test_groups_i_am_invited_to_or_pending_in_record_my_own_membership(logged_in: Env) -> None:
    """Globus shows such a group, but its memberships only to active members (exit 0, not 3)."""
    env, world = logged_in, logged_in.world
    invited, pending = admin_groups(world)[:2]
    assert env.run("sync").returncode == 0  # run 1: an active admin sees every member
    world.set_status(invited, world.me, "invited")
    world.set_status(pending, world.me, "pending")
    env.write_config(my_statuses=["active", "invited", "pending"])
    result = env.run("sync")
    assert result.returncode == 0, result.output
    rows = env.query("SELECT id, members_visible, my_status, removed_at FROM groups WHERE id IN (?, ?)", [invited, pending])
    assert sorted(tuple(r) for r in rows) == sorted([(invited, 0, "invited", None), (pending, 0, "pending", None)])
    role = {gid: world.my_membership(gid).role for gid in (invited, pending)}
    assert current_state(env) == {
        **expected_state(world, my_active_groups(world)),
        (invited, world.me): (role[invited], "invited"),
        (pending, world.me): (role[pending], "pending"),
    }
    # the others' memberships are no longer visible: recorded as removed, as when a
    # group's visibility narrows; mine is a change of status
    changes = env.query("SELECT change, count(*) FROM membership_changes WHERE run_id = 2 GROUP BY change")
    assert dict(tuple(r) for r in changes) == {
        "changed": 2,
        "removed": len(others(world, invited)) + len(others(world, pending)),
    }


def test_second_sync_records_exactly_the_changes(logged_in: Env) -> None:
    env = logged_in
    world = env.world
    assert env.run("sync").returncode == 0
    before = expected_state(world)

    managed = admin_groups(world)
    g1, g2, g3 = managed[:3]
    g1_others = others(world, g1)
    g2_member = others(world, g2)[0]
    added = world.add_member(g1, role="member", status="active")
    world.remove_member(g1, g1_others[0])
    world.set_role(g1, g1_others[1], "manager")
    world.set_status(g2, g2_member, "removed")
    world.rename_group(g3, "Renamed group")
    left = next(gid for gid in my_active_groups(world) if gid not in managed)
    left_members = {k for k in before if k[0] == left}
    world.set_status(left, world.me, "left")

    result = env.run("sync")
    assert result.returncode == 0, result.output
    after = expected_state(world)
    assert current_state(env) == after
    assert state_as_of(env, 1) == before
    assert state_as_of(env, 2) == after

    changes = {
        (r["change"], r["reason"], r["group_id"], r["identity_id"], r["old_role"], r["new_role"], r["old_status"],
         r["new_status"])
        for r in env.query("SELECT * FROM membership_changes WHERE run_id = 2")
    }
    events = {
        ("added", "joined", g1, added, None, "member", None, "active"),
        ("removed", "left", g1, g1_others[0], *_removed(before[(g1, g1_others[0])])),
        ("changed", "changed", g1, g1_others[1], before[(g1, g1_others[1])][0], "manager",
         before[(g1, g1_others[1])][1], before[(g1, g1_others[1])][1]),
        ("changed", "changed", g2, g2_member, before[(g2, g2_member)][0], before[(g2, g2_member)][0],
         before[(g2, g2_member)][1], "removed"),
    }
    # leaving a group is not its members leaving: an observation
    observations = {("removed", "group_gone", left, i, *_removed(before[(left, i)])) for (_, i) in left_members}
    assert changes == events | observations
    run = env.query("SELECT * FROM sync_runs WHERE id = 2")[0]
    assert run["changes"] == len(events)
    assert f", {len(events)} changes" in result.stderr  # the run's summary line
    assert env.query("SELECT name FROM groups WHERE id = ?", [g3])[0][0] == "Renamed group"
    assert env.query("SELECT group_name FROM membership_changes WHERE group_id = ? LIMIT 1", [g1])
    gone = env.query("SELECT removed_at, my_status FROM groups WHERE id = ?", [left])[0]
    assert gone["removed_at"] is not None and gone["my_status"] == "left"  # what Globus says now
    assert not env.query("SELECT 1 FROM memberships WHERE group_id = ?", [left])


def _removed(old: tuple[str, str]) -> tuple[str, None, str, None]:
    return (old[0], None, old[1], None)


def test_unchanged_sync_adds_only_its_run_row(logged_in: Env) -> None:
    env = logged_in
    assert env.run("sync").returncode == 0
    tables = ("membership_history", "memberships", "identities", "groups")
    counts = lambda: [env.query(f"SELECT count(*) FROM {t}")[0][0] for t in tables]  # noqa: E731
    before = counts()
    assert env.run("sync").returncode == 0
    assert counts() == before
    assert env.query("SELECT count(*) FROM sync_runs")[0][0] == 2
    assert env.query("SELECT changes FROM sync_runs WHERE id = 2")[0][0] == 0


def test_groups_setting_leaves_the_groups_it_omits_as_they_were(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    assert env.run("sync").returncode == 0
    first = current_state(env)
    kept, omitted = admin_groups(world)[:2]
    joined_kept, joined_omitted = world.add_member(kept), world.add_member(omitted)
    env.write_config(groups=[kept])
    result = env.run("sync")
    assert result.returncode == 0, result.output
    changes = [tuple(r) for r in env.query("SELECT change, group_id, identity_id FROM membership_changes WHERE run_id = 2")]
    assert changes == [("added", kept, joined_kept)]  # nothing recorded as removed
    assert env.query("SELECT count(*) FROM groups WHERE removed_at IS NOT NULL")[0][0] == 0
    assert current_state(env) == {**first, (kept, joined_kept): ("member", "active")}
    assert env.query("SELECT groups_synced FROM sync_runs WHERE id = 2")[0][0] == 1
    # all groups again: only what changed meanwhile in the omitted group is new
    env.write_config()
    assert env.run("sync").returncode == 0
    changes = [tuple(r) for r in env.query("SELECT change, group_id, identity_id FROM membership_changes WHERE run_id = 3")]
    assert changes == [("added", omitted, joined_omitted)]
    assert current_state(env) == expected_state(world)


def test_expired_access_token_is_renewed_and_stored(logged_in: Env) -> None:
    env = logged_in
    original = stored_token_data(env.tokens)
    env.sim.expire_access_tokens()
    result = env.run("sync")
    assert result.returncode == 0, result.output
    renewed = stored_token_data(env.tokens)
    groups_old, groups_new = original["groups.api.globus.org"], renewed["groups.api.globus.org"]
    assert groups_new["access_token"] != groups_old["access_token"]
    assert groups_new["refresh_token"] == groups_old["refresh_token"]
    assert env.sim.stats["refresh_grants"] == 1


def test_a_login_during_a_sync_is_not_undone_by_its_renewal(logged_in: Env) -> None:
    """A sync renews the grant it started with; `login --force` meanwhile has the last word."""
    env = logged_in
    env.write_config(concurrency=1, http_timeout="60s")  # one read at a time, none timing out
    before = stored_tokens(env.tokens)
    # the login proves its tokens by reading a group it manages: that read answers
    proof = next(g for g in my_active_groups(env.world) if env.world.my_membership(g).role in ("admin", "manager"))
    env.sim.faults.hold_reads(except_groups=[proof])
    sync = env.popen("sync")
    wait_for(lambda: env.sim.stats["faults"].get("held"), what="the sync's first group read")
    assert env.login("--force").returncode == 0
    after_login = stored_tokens(env.tokens)
    assert after_login["refresh"] != before["refresh"]
    env.sim.expire_access_tokens()  # the sync's next read needs a renewal of its old grant
    env.sim.faults.release_reads()
    _, err = sync.communicate(timeout=60)
    assert sync.returncode == 0, err
    assert env.sim.stats["refresh_grants"] == 1
    assert stored_tokens(env.tokens) == after_login
    assert "the stored tokens changed during this run" in err
    assert current_state(env) == expected_state(env.world)


def test_a_renewal_after_logout_stores_nothing(logged_in: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write-back stores a renewal only over the grant it renewed; a cleared store stays clear."""
    env = logged_in
    for key, value in env.sim.env.items():
        monkeypatch.setenv(key, value)
    with TokenStore(env.tokens) as store:
        data = store.groups_tokens()
        assert data is not None and data.refresh_token
        renewal = globus_sdk.NativeAppAuthClient(TUTORIAL_CLIENT_ID).oauth2_refresh_token(data.refresh_token)
        assert store.save_renewal(renewal, renewed_from="another grant") is False
        stored = store.groups_tokens()
        assert stored is not None and stored.to_dict() == data.to_dict()
        store.clear()  # `syncer logout` in another process, while the renewal was on its way
        assert store.save_renewal(renewal, renewed_from=data.refresh_token) is False
        assert store.all_tokens() == {}
    with TokenStore(env.tokens) as store:
        assert store.all_tokens() == {}


def test_token_near_expiry_is_refreshed_before_use(env: Env) -> None:
    env.sim.access_token_lifetime = 30  # inside the SDK's 60 s renewal margin
    assert env.login().returncode == 0
    assert env.run("sync").returncode == 0
    assert env.sim.stats["refresh_grants"] >= 1


def test_invalid_grant_exits_77_and_removes_nothing(logged_in: Env) -> None:
    env = logged_in
    assert env.run("sync").returncode == 0
    before = current_state(env)
    env.sim.expire_access_tokens()
    env.sim.revoke_all_refresh_tokens(status=400)
    result = env.run("sync")
    assert result.returncode == 77, result.output
    assert "syncer login" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert current_state(env) == before
    run = env.query("SELECT * FROM sync_runs ORDER BY id DESC LIMIT 1")[0]
    assert run["status"] == "failed" and run["exit_code"] == 77
    assert env.run("status").returncode == 77


def test_failing_group_exits_3_and_keeps_its_rows(logged_in: Env) -> None:
    env = logged_in
    assert env.run("sync").returncode == 0
    before = current_state(env)
    broken, fine = admin_groups(env.world)[:2]
    env.sim.faults.set_group_error(broken, 500)
    victim = others(env.world, broken)[0]
    env.world.remove_member(broken, victim)  # not seen: the group cannot be read
    newcomer = env.world.add_member(fine)
    result = env.run("sync")
    assert result.returncode == 3, result.output
    state = current_state(env)
    assert {k: v for k, v in state.items() if k[0] == broken} == {k: v for k, v in before.items() if k[0] == broken}
    assert (fine, newcomer) in state
    run = env.query("SELECT * FROM sync_runs WHERE id = 2")[0]
    assert run["status"] == "partial" and run["groups_failed"] == 1
    assert broken in json.loads(run["failed_groups"])
    assert env.run("status").returncode == 3
    # the next run, with the group readable again, recovers
    env.sim.faults.clear()
    assert env.run("sync").returncode == 0
    assert current_state(env) == expected_state(env.world)


def test_no_group_readable_is_a_failed_run_not_a_partial_one(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    assert env.run("sync").returncode == 0
    before = current_state(env)
    gone = my_active_groups(world)[-1]
    world.set_status(gone, world.me, "left")  # would be recorded as gone by a partial run
    for gid in my_active_groups(world):
        env.sim.faults.set_group_error(gid, 502)
    result = env.run("sync")
    assert result.returncode == 1, result.output
    assert "none of the" in result.stderr and "groups could be read" in result.stderr
    assert current_state(env) == before
    run = env.query("SELECT * FROM sync_runs WHERE id = 2")[0]
    assert (run["status"], run["groups_synced"], run["changes"]) == ("failed", 0, 0)
    assert run["groups_failed"] == len(my_active_groups(world))
    assert env.run("status").returncode == 1


def test_overlapping_sync_exits_75(logged_in: Env) -> None:
    env = logged_in
    env.sim.faults.hold_reads()  # the first sync holds the lock until released
    first = env.popen("sync")
    wait_for(lambda: env.sim.stats["faults"].get("held"), what="the first sync's group reads")
    second = env.run("sync")
    assert first.poll() is None  # the second did not wait for the first
    env.sim.faults.release_reads()
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, out + err
    assert second.returncode == 75, second.output
    assert "another sync is running" in second.stderr
    assert env.query("SELECT count(*) FROM sync_runs")[0][0] == 1


def test_crashed_run_is_marked_aborted_by_the_next(logged_in: Env) -> None:
    env = logged_in
    env.sim.faults.hold_reads()  # the run cannot finish before it is killed
    proc = env.popen("sync")
    wait_for(lambda: has_running_run(env), what="the sync to start")
    proc.kill()
    proc.wait()
    env.sim.faults.release_reads()
    assert env.run("sync").returncode == 0
    statuses = [r[0] for r in env.query("SELECT status FROM sync_runs ORDER BY id")]
    assert statuses == ["aborted", "ok"]


def test_bad_config_exits_78_naming_file_and_key(env: Env) -> None:
    env.config.write_text('concurrency = "many"\n')
    result = env.run("sync")
    assert result.returncode == 78
    assert str(env.config) in result.stderr and "'concurrency'" in result.stderr
    env.config.write_text('colour = "blue"\n')
    result = env.run("status")
    assert result.returncode == 78 and "unknown key 'colour'" in result.stderr
    env.config.write_text("interval = [\n")
    result = env.run("sync")
    assert result.returncode == 78 and "invalid TOML" in result.stderr
    assert not env.database.exists()
    # an error quoting text with a line break is still one line
    odd = env.tmp / "two\nlines.toml"
    result = env.run("--config", str(odd), "sync")
    assert result.returncode == 78 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("syncer: error: ") and "two lines.toml" in result.stderr


def test_sync_without_login_exits_77(env: Env) -> None:
    result = env.run("sync")
    assert result.returncode == 77
    assert "syncer login" in result.stderr


def test_status_json_reports_runs_and_tokens(logged_in: Env) -> None:
    env = logged_in
    assert env.run("status").returncode == 1  # logged in, but no run yet
    assert env.run("sync").returncode == 0
    result = env.run("status", "--json")
    assert result.returncode == 0, result.output
    data = json.loads(result.stdout)
    assert data["tokens"]["refresh_token"] is True
    assert data["database"]["counts"]["memberships"] == len(expected_state(env.world))
    assert data["database"]["recent_runs"][0]["status"] == "ok"


def test_logout_revokes_and_deletes(logged_in: Env) -> None:
    env = logged_in
    result = env.run("logout")
    assert result.returncode == 0, result.output
    assert "revoked" in result.stdout
    assert env.sim.stats["revocations"] >= 1
    assert not sqlite3.connect(env.tokens).execute("SELECT * FROM token_storage").fetchall()
    assert env.run("sync").returncode == 77
