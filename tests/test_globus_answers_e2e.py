"""Answers checked before they are believed (SPEC, "Reading Globus"), end to end.

Each test turns the simulator to one of the shapes real Globus answers take, or to a
broken one, runs the real ``syncer sync`` and checks what was (not) recorded.
"""

from __future__ import annotations

import json

import pytest
from conftest import Env
from helpers import admin_groups, current_state, expected_state
from test_faults import dump, group_rows, last_run

from syncer.simulator import LISTING_KINDS

# the conftest world: group 1 is managers-only with the identity a plain member
MANAGERS_ONLY_MEMBER = 1


def nth_group(env: Env, n: int) -> str:
    return list(env.world.groups)[n]


def synced(env: Env, expect: int = 0) -> None:
    result = env.run("sync")
    assert result.returncode == expect, result.output
    assert "Traceback" not in result.output


def events_of_last_run(env: Env) -> list[tuple[str, str, str]]:
    run = last_run(env)["id"]
    return [tuple(r) for r in env.query(
        "SELECT group_id, identity_id, reason FROM membership_changes WHERE run_id = ?", [run])]


# ------------------------------------------------------------------ 1. the listing


@pytest.mark.parametrize("kind", LISTING_KINDS)
def test_a_broken_listing_fails_the_run_and_records_nothing(logged_in: Env, kind: str) -> None:
    env = logged_in
    synced(env)
    before = dump(env, exclude={"sync_runs"})
    env.sim.faults.listing_malformed = kind
    result = env.run("sync")
    assert result.returncode == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("syncer: error:")]
    assert len(errors) == 1 and "my_groups" in errors[0], result.stderr
    assert "Traceback" not in result.output and "temporarily degraded" not in result.output  # never the body
    assert dump(env, exclude={"sync_runs"}) == before  # no group gone, nobody removed
    assert (last_run(env)["status"], last_run(env)["exit_code"]) == ("failed", 1)

    env.sim.faults.listing_malformed = None
    synced(env)
    assert events_of_last_run(env) == []  # nothing re-added as first_seen either


# -------------------------------------------------------------- 1. a group's document


@pytest.mark.parametrize(("kind", "field"), [
    ("nulls", "name"), ("unknown_values", "role"), ("no_id", "id"), ("missing_identity_id", "identity_id"),
])
def test_a_broken_group_document_fails_that_group_only(logged_in: Env, kind: str, field: str) -> None:
    env, world = logged_in, logged_in.world
    synced(env)
    bad, fine = admin_groups(world)[:2]
    before = group_rows(env, bad)
    newcomer = world.add_member(fine)
    env.sim.faults.malformed[bad] = kind
    result = env.run("sync")
    assert result.returncode == 3, result.output
    warned = [line for line in result.stderr.splitlines() if bad in line]
    assert len(warned) == 1 and field in warned[0], result.stderr  # which group, which field
    assert "{" not in warned[0]  # not the body
    assert group_rows(env, bad) == before
    assert (fine, newcomer) in current_state(env)

    env.sim.faults.clear()
    synced(env)
    # no role or name went to NULL and back: the group's history has no event at all
    assert [e for e in events_of_last_run(env) if e[0] == bad] == []
    assert current_state(env) == expected_state(world)


# ------------------------------------------------- 2. one membership per identity


def test_implicit_memberships_one_per_identity_explicit_first(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    gid = admin_groups(world)[0]
    explicit = next(i for i, m in world.groups[gid]["memberships"].items()
                    if i != world.me and m.role == "member" and m.status == "active")
    sub1, sub2 = admin_groups(world)[1:3]
    # the explicit member is also an implicit admin through a subgroup: explicit counts
    world.add_implicit_membership(gid, explicit, sub1, role="admin")
    # someone only implicit, through two subgroups: the highest role counts
    implicit_only = "0b0e1c4a-2f33-4b5e-9f0a-5d7c1e2a3b4c"
    world.add_implicit_membership(gid, implicit_only, sub1, role="member")
    world.add_implicit_membership(gid, implicit_only, sub2, role="manager")
    synced(env)
    state = current_state(env)
    assert state[(gid, explicit)] == ("member", "active")
    assert state[(gid, implicit_only)] == ("manager", "active")
    synced(env)
    assert events_of_last_run(env) == []  # the same answer, the same record


# ---------------------------------------------------------- 3. own membership


@pytest.mark.parametrize("shape", ["no_memberships", "empty_memberships", "all_memberships"])
def test_own_membership_comes_from_the_listing_whatever_the_document_holds(logged_in: Env, shape: str) -> None:
    env, world = logged_in, logged_in.world
    gid = nth_group(env, MANAGERS_ONLY_MEMBER)
    mine = world.my_membership(gid)
    assert (mine.role, world.groups[gid]["policies"]["group_members_visibility"]) == ("member", "managers")
    env.sim.faults.shape[gid] = shape
    synced(env)
    recorded = {k: v for k, v in current_state(env).items() if k[0] == gid}
    assert recorded == {(gid, world.me): ("member", "active")}
    synced(env)
    assert events_of_last_run(env) == []  # never ended as hidden or left
    members = env.run("members", gid, "--format", "json")
    assert [r["identity_id"] for r in json.loads(members.stdout)] == [world.me]
    assert "only your own membership is recorded" in members.stderr


def test_invited_identity_keeps_its_own_membership(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    env.write_config(my_statuses=["active", "invited"])
    gid = admin_groups(world)[0]
    world.set_status(gid, world.me, "invited")
    env.sim.faults.shape[gid] = "empty_memberships"
    synced(env)
    assert {k: v for k, v in current_state(env).items() if k[0] == gid} == {(gid, world.me): ("admin", "invited")}
    synced(env)
    assert events_of_last_run(env) == []


# ------------------------------------------------------------- slim documents


def test_slim_membership_documents_are_recorded_and_then_unchanged(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    gid = admin_groups(world)[0]
    env.sim.faults.shape[gid] = "slim"  # no membership_fields, no updated
    synced(env)
    assert current_state(env) == expected_state(world)
    assert {r[0] for r in env.query("SELECT membership_fields FROM memberships WHERE group_id = ?", [gid])} == {"{}"}
    env.sim.faults.shape.clear()
    synced(env)
    assert events_of_last_run(env) == []


# ------------------------------------------------- 4. session policies and 401s


def groups_json(env: Env) -> dict[str, dict[str, object]]:
    result = env.run("groups", "--format", "json")
    assert result.returncode == 0, result.output
    return {row["id"]: row for row in json.loads(result.stdout)}


def test_high_assurance_group_needs_login_and_keeps_its_policies(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    synced(env)
    guarded, fine = admin_groups(world)[:2]
    before = group_rows(env, guarded)
    world.set_high_assurance(guarded, timeout=0)  # the login is always older than that
    brand_new = world.add_group("Vault", members=2)
    world.set_high_assurance(brand_new, timeout=0)
    newcomer = world.add_member(fine)
    grants = env.sim.stats["refresh_grants"]
    result = env.run("sync")
    assert result.returncode == 3, result.output
    assert env.sim.stats["refresh_grants"] == grants  # a session problem is not a token problem
    assert (fine, newcomer) in current_state(env)
    after = group_rows(env, guarded)
    assert after["memberships"] == before["memberships"]
    assert after["membership_history"] == before["membership_history"]
    shown = groups_json(env)
    assert f"session_required_identities={world.me}" in str(shown[guarded]["needs_login"])
    assert shown[brand_new]["needs_login"] and shown[brand_new]["name"] == "Vault"
    assert shown[fine]["needs_login"] is None
    status = env.run("status")
    assert status.returncode == 3 and f"needs login: group 'Vault' ({brand_new})" in status.stdout

    world.set_high_assurance(guarded, timeout=10**6)  # a recent enough login
    world.set_high_assurance(brand_new, timeout=10**6)
    synced(env)
    row = env.query("SELECT * FROM groups WHERE id = ?", [guarded])[0]
    assert (row["is_high_assurance"], row["authentication_assurance_timeout"], row["needs_login"]) == (1, 10**6, None)
    assert (row["enforce_session"], row["session_limit"]) == (0, 28800)
    history = env.query("SELECT is_high_assurance FROM group_history WHERE group_id = ? ORDER BY from_run", [guarded])
    assert [r[0] for r in history] == [0, 1]  # the policy's change is kept with the group's history
    assert (brand_new, world.me) in current_state(env)


def test_a_401_with_empty_authorization_parameters_is_a_token_problem(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    synced(env)
    gid = admin_groups(world)[0]
    body = {"code": "UNAUTHORIZED", "detail": "token", "status": 401, "authorization_parameters": {}}
    env.sim.faults.record_answer(f"/groups/v2/groups/{gid}", 401, json.dumps(body).encode())
    before = dump(env, exclude={"sync_runs"})
    grants = env.sim.stats["refresh_grants"]
    result = env.run("sync")
    assert result.returncode == 77, result.output  # renewed, refused again: the run fails
    assert env.sim.stats["refresh_grants"] > grants
    assert dump(env, exclude={"sync_runs"}) == before
    assert "needs_login" not in result.stderr and "session" not in result.stderr


def test_a_run_whose_only_group_needs_login_is_partial(logged_in: Env) -> None:
    """Groups refused for a session requirement prove the listing sound: the run is
    partial with the group marked, not failed with its mark rolled back."""
    env, world = logged_in, logged_in.world
    gid = admin_groups(world)[0]
    env.write_config(groups=[gid])
    world.set_high_assurance(gid, timeout=0)
    result = env.run("sync")
    assert result.returncode == 3, result.output
    assert (last_run(env)["status"], last_run(env)["groups_failed"]) == ("partial", 1)
    assert groups_json(env)[gid]["needs_login"]


def test_groups_note_counts_with_the_verb_agreeing(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    synced(env)
    hidden = [gid for gid in world.groups if world.my_membership(gid).role == "member"
              and world.groups[gid]["policies"]["group_members_visibility"] == "managers"]
    assert len(hidden) == 1  # the conftest world: only group 1
    result = env.run("groups")
    assert "1 of these groups does not show your identity their members" in result.stderr


def test_admin_interface_designates_high_assurance_and_subgroup_members(logged_in: Env) -> None:
    """What `syncer simulate` users can do over HTTP: the same shapes as the tests'."""
    import urllib.request

    env, world = logged_in, logged_in.world
    guarded, parent, sub = admin_groups(world)[:3]

    def post(action: str, payload: dict[str, object]) -> None:
        request = urllib.request.Request(f"{env.sim.url}/admin/{action}", json.dumps(payload).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200

    post("high-assurance", {"group": guarded, "timeout": 0})
    post("add-implicit", {"group": parent, "identity": "me", "source_group": sub, "role": "member"})
    synced(env, expect=3)
    assert groups_json(env)[guarded]["needs_login"]
    assert current_state(env)[(parent, world.me)] == (world.my_membership(parent).role, "active")  # explicit counts
