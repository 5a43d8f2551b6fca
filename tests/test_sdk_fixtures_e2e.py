"""Real shapes, not only our own: globus-sdk's recorded answers through a real `syncer sync`.

The bodies come from ``globus_sdk.testing`` (the SDK's recorded fixtures for
``get_my_groups``, ``get_group``, the token endpoint and error responses). The
simulator serves them over HTTP on 127.0.0.1 in place of its own answers, once the
token is accepted, so the code under test is the code that talks to Globus.
"""

from __future__ import annotations

import copy
import json
import typing as t

import globus_sdk
import pytest
from conftest import Env
from globus_sdk.testing import get_response_set
from test_faults import dump, last_run

from syncer.globus.globus_groups import MANAGER_ROLES


def recorded(set_id: t.Any, case: str = "default") -> t.Any:
    """A recorded fixture's JSON body (a copy: the fixtures are shared)."""
    response = get_response_set(set_id).lookup(case)
    assert not isinstance(response, list)
    return copy.deepcopy(response.json)


def serve(env: Env, path: str, body: t.Any, status: int = 200) -> None:
    env.sim.faults.record_answer(path, status, json.dumps(body).encode())


def sees_members(entry: dict[str, t.Any]) -> bool:
    """Whether the listing entry's identity sees the group's members (SPEC members_view)."""
    own = entry["my_memberships"][0]
    visible_to_members = entry["policies"]["group_members_visibility"] == "members"
    return own["status"] == "active" and (own["role"] in MANAGER_ROLES or visible_to_members)


def test_recorded_my_groups_listing(logged_in: Env) -> None:
    """The recorded listing of seven groups; each group's document is its recorded entry,
    with the recorded (slim) own membership documents as its member list where the
    identity sees the members, and no member list where it sees only its own."""
    env = logged_in
    listing = recorded(globus_sdk.GroupsClient.get_my_groups)
    serve(env, "/groups/v2/groups/my_groups", listing)
    for entry in listing:
        doc = dict(entry)
        if sees_members(entry):
            doc["memberships"] = entry["my_memberships"]
        serve(env, f"/groups/v2/groups/{entry['id']}", doc)
    result = env.run("sync")
    assert result.returncode == 0, result.output
    groups = {r["id"]: r for r in env.query("SELECT * FROM groups")}
    assert set(groups) == {e["id"] for e in listing}
    for entry in listing:
        own = entry["my_memberships"][0]
        row = groups[entry["id"]]
        assert (row["name"], row["my_role"], row["my_status"]) == (entry["name"], own["role"], own["status"])
        assert (row["enforce_session"], row["session_limit"]) == (0, 28800)
        assert row["members_visible"] == int(sees_members(entry))
    state = {(r["group_id"], r["identity_id"]): (r["role"], r["status"]) for r in env.query("SELECT * FROM memberships")}
    assert state == {
        (e["id"], m["identity_id"]): (m["role"], m["status"]) for e in listing for m in e["my_memberships"]
    }
    assert {r[0] for r in env.query("SELECT membership_fields FROM memberships")} == {"{}"}
    assert env.run("sync").returncode == 0
    assert last_run(env)["changes"] == 0


def test_recorded_get_group_documents(logged_in: Env) -> None:
    """The recorded get_group bodies (a plain group and a subscription group with a
    session policy), verbatim: no member list for a plain member of a managers-only
    group, whose own membership comes from the listing."""
    env = logged_in
    docs = [recorded(globus_sdk.GroupsClient.get_group, case) for case in ("default", "subscription")]
    serve(env, "/groups/v2/groups/my_groups", docs)
    for doc in docs:
        serve(env, f"/groups/v2/groups/{doc['id']}", doc)
    result = env.run("sync")
    assert result.returncode == 0, result.output
    for doc in docs:
        row = env.query("SELECT * FROM groups WHERE id = ?", [doc["id"]])[0]
        assert (row["name"], row["description"], row["group_type"]) == (doc["name"], doc["description"], doc["group_type"])
        assert (row["enforce_session"], row["session_limit"]) == (int(doc["enforce_session"]), doc["session_limit"])
        assert row["members_view"] == "own"
        own = doc["my_memberships"][0]
        members = env.query("SELECT identity_id, username, role, status FROM memberships WHERE group_id = ?", [doc["id"]])
        assert [tuple(m) for m in members] == [(own["identity_id"], own["username"], own["role"], own["status"])]


def test_recorded_invalid_grant_is_login_required(logged_in: Env) -> None:
    env = logged_in
    assert env.run("sync").returncode == 0
    before = dump(env, exclude={"sync_runs"})
    env.sim.expire_access_tokens()
    rejected = get_response_set(globus_sdk.NativeAppAuthClient.oauth2_exchange_code_for_tokens).lookup("invalid_grant")
    assert not isinstance(rejected, list) and rejected.status == 401  # the SDK's recorded status
    serve(env, "/auth/v2/oauth2/token", rejected.json, status=rejected.status)
    result = env.run("sync")
    assert result.returncode == 77, result.output
    assert "syncer login" in result.stderr
    assert dump(env, exclude={"sync_runs"}) == before


def test_recorded_unauthorized_body_renews_then_fails_the_run(logged_in: Env) -> None:
    """Globus Auth's recorded 401 body (an ``errors`` list, no session requirement) on a
    group read: a token problem, renewed once, then the run fails."""
    env = logged_in
    assert env.run("sync").returncode == 0
    before = dump(env, exclude={"sync_runs"})
    gid = env.query("SELECT id FROM groups LIMIT 1")[0][0]
    unauthorized = get_response_set(globus_sdk.AuthClient.userinfo).lookup("unauthorized")
    assert not isinstance(unauthorized, list)
    serve(env, f"/groups/v2/groups/{gid}", unauthorized.json, status=401)
    grants = env.sim.stats["refresh_grants"]
    result = env.run("sync")
    assert result.returncode == 77, result.output
    assert env.sim.stats["refresh_grants"] > grants
    assert dump(env, exclude={"sync_runs"}) == before


@pytest.mark.parametrize("case", ["auth_policy_required"])
def test_recorded_session_requirement_marks_the_group(logged_in: Env, case: str) -> None:
    """A recorded Globus Auth requirements error (a session policy) on one group read:
    that group needs a login, the run is partial, no token renewal."""
    env = logged_in
    assert env.run("sync").returncode == 0
    gid = env.query("SELECT id FROM groups LIMIT 1")[0][0]
    before = [tuple(r) for r in env.query("SELECT * FROM memberships WHERE group_id = ?", [gid])]
    required = get_response_set("flows.get_web_input").lookup(case)
    assert not isinstance(required, list)
    policy = required.json["authorization_parameters"]["session_required_policies"][0]
    serve(env, f"/groups/v2/groups/{gid}", required.json, status=401)
    grants = env.sim.stats["refresh_grants"]
    result = env.run("sync")
    assert result.returncode == 3, result.output
    assert env.sim.stats["refresh_grants"] == grants
    assert [tuple(r) for r in env.query("SELECT * FROM memberships WHERE group_id = ?", [gid])] == before
    asked = env.query("SELECT needs_login FROM groups WHERE id = ?", [gid])[0][0]
    assert asked == f"session_required_policies={policy}"
