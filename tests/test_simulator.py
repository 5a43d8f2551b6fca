"""Tests for syncer.simulator: the real globus_sdk against the local simulator.

Every SDK client is built *after* the simulator's env vars are set, because
the SDK resolves service URLs when a client is constructed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import globus_sdk
import jwt
import pytest
import requests
from globus_sdk.transport import RequestsTransport, RetryConfig

from syncer.simulator import MALFORMED_KINDS, Faults, Simulator, World

CLIENT_ID = "7a1b2c3d-0000-4000-8000-00000000c11e"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:all"
SCOPES = f"openid profile email {GROUPS_SCOPE}"


# ----------------------------------------------------------------- fixtures


@pytest.fixture
def world() -> World:
    return World.generate(groups=8, members=12, seed=7)


@pytest.fixture
def sim(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    s = Simulator(world).start()
    for k, v in s.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("GLOBUS_SDK_ENVIRONMENT", raising=False)
    # Make sure nothing routes loopback traffic through a proxy.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    yield s
    s.stop()


def login(sim: Simulator, *, refresh: bool = True, scopes: str = SCOPES) -> tuple[globus_sdk.NativeAppAuthClient, dict[str, Any]]:
    """The full native-app flow: authorize URL -> browser step -> code exchange."""
    ac = globus_sdk.NativeAppAuthClient(CLIENT_ID)
    flow = ac.oauth2_start_flow(scopes, refresh_tokens=refresh)
    code = sim.authorize(flow.get_authorize_url())
    tokens = flow.exchange_code_for_tokens(code)
    return ac, tokens.data


def groups_client(
    sim: Simulator, *, refresh: bool = True, timeout: float | None = None, retries: int = 0
) -> tuple[globus_sdk.GroupsClient, dict[str, Any]]:
    """A GroupsClient with a RefreshTokenAuthorizer and (by default) SDK
    retries off, so every injected fault surfaces to the test. The SDK's
    refresh-on-401 is itself a retry, so it needs ``retries >= 1``."""
    ac, data = login(sim, refresh=refresh)
    if refresh:
        authorizer: globus_sdk.authorizers.GlobusAuthorizer = globus_sdk.RefreshTokenAuthorizer(
            data["refresh_token"], ac, access_token=data["access_token"],
            expires_at=int(time.time()) + data["expires_in"],
        )
    else:
        authorizer = globus_sdk.AccessTokenAuthorizer(data["access_token"])
    transport = RequestsTransport(http_timeout=timeout) if timeout else None
    gc = globus_sdk.GroupsClient(
        authorizer=authorizer, retry_config=RetryConfig(max_retries=retries), transport=transport
    )
    return gc, data


def raw_get(sim: Simulator, token: str, gid: str, include: str = "memberships") -> requests.Response:
    """Plain HTTP GET of a group, for bodies the SDK would not parse."""
    return requests.get(
        f"{sim.url}/groups/v2/groups/{gid}",
        params={"include": include},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def gid_where(world: World, *, role: str, visibility: str) -> str:
    """A group in which me is an active ``role`` under ``visibility``."""
    for gid, g in world.groups.items():
        m = g["memberships"][world.me]
        if m.role == role and m.status == "active" and g["policies"]["group_members_visibility"] == visibility:
            return gid
    raise LookupError((role, visibility))


def state_of(memberships: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return sorted((m["identity_id"], m["role"], m["status"]) for m in memberships)


# ------------------------------------------------------------------- auth


def test_full_flow_with_real_sdk(sim: Simulator, world: World) -> None:
    gc, data = groups_client(sim)
    assert data["resource_server"] == "groups.api.globus.org"
    assert data["token_type"] == "Bearer"
    assert data["state"] == "_default"
    # openid, as Globus answers it: Globus Auth's own token beside, and an id_token naming the identity
    [auth_token] = data["other_tokens"]
    assert auth_token["resource_server"] == "auth.globus.org" and auth_token["scope"] == "openid profile email"
    claims = jwt.decode(data["id_token"], options={"verify_signature": False})
    assert claims["sub"] == world.me and claims["preferred_username"] == world.identities[world.me]["username"]
    assert data["scope"] == GROUPS_SCOPE
    assert data["expires_in"] == 3600
    assert {data["access_token"], data["refresh_token"]} <= sim.issued_tokens

    my = gc.get_my_groups()
    assert sorted(g["id"] for g in my) == sorted(world.groups)
    for g in my:
        assert g["my_memberships"][0]["identity_id"] == world.me
        assert {"id", "name", "description", "parent_id", "group_type", "enforce_session",
                "session_limit", "session_timeouts", "policies"} <= set(g)

    gid = gid_where(world, role="admin", visibility="managers")
    doc = gc.get_group(gid, include="memberships")
    assert doc["id"] == gid and doc["name"] == world.groups[gid]["name"]
    assert len(doc["memberships"]) == len(world.groups[gid]["memberships"])
    m = doc["memberships"][0]
    assert set(m) == {"group_id", "identity_id", "username", "role", "status", "status_reason",
                      "invite_email_address", "invite_time", "updated", "membership_fields"}
    assert m["updated"].endswith("Z")
    stats = sim.stats
    assert stats["code_exchanges"] == 1
    assert stats["requests"]["group"] == 1 and stats["requests"]["my_groups"] == 1
    assert stats["in_flight_group_reads"] == 0


def test_auth_code_page_shows_code(sim: Simulator) -> None:
    ac = globus_sdk.NativeAppAuthClient(CLIENT_ID)
    flow = ac.oauth2_start_flow(SCOPES)
    assert flow.redirect_uri == f"{sim.url}/auth/v2/web/auth-code"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(flow.get_authorize_url(), timeout=10) as resp:  # follows the 302
        page = resp.read().decode()
    assert '<code id="auth-code">' in page
    code = page.split('<code id="auth-code">')[1].split("</code>")[0]
    assert code in sim.issued_tokens
    assert flow.exchange_code_for_tokens(code)["access_token"]


def test_authorize_redirects_to_app_callback(sim: Simulator) -> None:
    received: list[str] = []

    class Callback(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            received.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    cb = ThreadingHTTPServer(("127.0.0.1", 0), Callback)
    threading.Thread(target=cb.serve_forever, daemon=True).start()
    try:
        ac = globus_sdk.NativeAppAuthClient(CLIENT_ID)
        flow = ac.oauth2_start_flow(
            SCOPES, redirect_uri=f"http://127.0.0.1:{cb.server_address[1]}/callback", state="xyz"
        )
        code = sim.authorize(flow.get_authorize_url())
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(received[0]).query)
        assert q == {"code": [code], "state": ["xyz"]}
        assert flow.exchange_code_for_tokens(code)["state"] == "xyz"
    finally:
        cb.shutdown()
        cb.server_close()


@pytest.mark.parametrize(
    "drop, change",
    [
        ("code_challenge", {}),
        ("client_id", {}),
        ("redirect_uri", {}),
        (None, {"response_type": "token"}),
        (None, {"code_challenge_method": "plain"}),
        (None, {"access_type": "forever"}),
        # a native app's redirect goes to a loopback address, never elsewhere
        (None, {"redirect_uri": "https://attacker.example/callback"}),
    ],
)
def test_authorize_rejects_bad_requests(sim: Simulator, drop: str | None, change: dict[str, str]) -> None:
    flow = globus_sdk.NativeAppAuthClient(CLIENT_ID).oauth2_start_flow(SCOPES)
    url = flow.get_authorize_url()
    parts = urllib.parse.urlsplit(url)
    q = dict(urllib.parse.parse_qsl(parts.query))
    if drop:
        q.pop(drop)
    q.update(change)
    bad = parts._replace(query=urllib.parse.urlencode(q)).geturl()
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(bad, timeout=10)
    assert ei.value.code == 400
    with pytest.raises(RuntimeError, match="HTTP 400"):
        sim.authorize(bad)


def test_pkce_wrong_verifier_then_right_one_then_reuse(sim: Simulator) -> None:
    ac = globus_sdk.NativeAppAuthClient(CLIENT_ID)
    flow = ac.oauth2_start_flow(SCOPES, refresh_tokens=True)
    code = sim.authorize(flow.get_authorize_url())
    body = {
        "client_id": CLIENT_ID, "grant_type": "authorization_code", "code": code,
        "redirect_uri": flow.redirect_uri, "code_verifier": "x" * 50,
    }
    with pytest.raises(globus_sdk.AuthAPIError) as ei:
        ac.oauth2_token(body)
    assert ei.value.http_status == 400
    assert ei.value.raw_json == {"error": "invalid_grant"}
    # Wrong redirect_uri and wrong client are refused too.
    for bad in ({"redirect_uri": "http://127.0.0.1:1/elsewhere"}, {"client_id": "someone-else"}):
        with pytest.raises(globus_sdk.AuthAPIError) as ei:
            ac.oauth2_token({**body, "code_verifier": flow.verifier, **bad})
        assert ei.value.raw_json["error"] == "invalid_grant"
    assert flow.exchange_code_for_tokens(code)["refresh_token"]
    with pytest.raises(globus_sdk.AuthAPIError) as ei:  # codes are single-use
        flow.exchange_code_for_tokens(code)
    assert ei.value.raw_json["error"] == "invalid_grant"
    assert sim.stats["code_exchanges"] == 1
    assert sim.stats["code_exchanges_failed"] == 4


def test_online_access_gives_no_refresh_token(sim: Simulator) -> None:
    _, data = login(sim, refresh=False)
    assert "refresh_token" not in data
    assert data["access_token"]


def test_refresh_grant_echoes_refresh_token(sim: Simulator) -> None:
    ac, data = login(sim)
    r = ac.oauth2_refresh_token(data["refresh_token"])
    assert r["refresh_token"] == data["refresh_token"]
    assert r["access_token"] != data["access_token"]
    assert r["resource_server"] == "groups.api.globus.org"
    assert r["scope"] == GROUPS_SCOPE and r["other_tokens"] == []  # a refresh renews the Groups token alone
    assert "id_token" not in r
    assert sim.stats["refresh_grants"] == 1


def test_unknown_grant_type(sim: Simulator) -> None:
    ac = globus_sdk.NativeAppAuthClient(CLIENT_ID)
    with pytest.raises(globus_sdk.AuthAPIError) as ei:
        ac.oauth2_token({"grant_type": "password", "client_id": CLIENT_ID})
    assert ei.value.http_status == 400
    assert ei.value.raw_json == {"error": "unsupported_grant_type"}


@pytest.mark.parametrize("status", [400, 401])
def test_revoke_all_refresh_tokens(sim: Simulator, world: World, status: int) -> None:
    gc, data = groups_client(sim, retries=1)
    ac = globus_sdk.NativeAppAuthClient(CLIENT_ID)
    sim.revoke_all_refresh_tokens(status=status)
    with pytest.raises(globus_sdk.AuthAPIError) as ei:
        ac.oauth2_refresh_token(data["refresh_token"])
    assert ei.value.http_status == status
    assert ei.value.raw_json["error"] == "invalid_grant"
    # The current access token keeps working until it expires...
    assert gc.get_my_groups().http_status == 200
    # ...then the authorizer's refresh attempt fails the same way.
    sim.expire_access_tokens()
    with pytest.raises(globus_sdk.AuthAPIError) as ei:
        gc.get_my_groups()
    assert ei.value.raw_json["error"] == "invalid_grant"
    # A fresh login is unaffected.
    _, again = login(sim)
    assert ac.oauth2_refresh_token(again["refresh_token"])["access_token"]


def test_revoke_endpoint(sim: Simulator) -> None:
    ac, data = login(sim)
    other = ac.oauth2_refresh_token(data["refresh_token"])["access_token"]
    assert ac.oauth2_revoke_token(data["refresh_token"]).data == {"active": False}
    with pytest.raises(globus_sdk.AuthAPIError) as ei:
        ac.oauth2_refresh_token(data["refresh_token"])
    assert ei.value.raw_json["error"] == "invalid_grant"
    # Access tokens minted from the revoked refresh token die with it.
    for tok in (data["access_token"], other):
        gc = globus_sdk.GroupsClient(authorizer=globus_sdk.AccessTokenAuthorizer(tok))
        with pytest.raises(globus_sdk.GroupsAPIError) as gi:
            gc.get_my_groups()
        assert gi.value.http_status == 401
    assert ac.oauth2_revoke_token("never-issued").data == {"active": False}


def test_invalid_token_is_401(sim: Simulator) -> None:
    for token in ("not-a-token", None):
        authz = globus_sdk.AccessTokenAuthorizer(token) if token else globus_sdk.NullAuthorizer()
        gc = globus_sdk.GroupsClient(authorizer=authz, retry_config=RetryConfig(max_retries=0))
        with pytest.raises(globus_sdk.GroupsAPIError) as ei:
            gc.get_my_groups()
        assert ei.value.http_status == 401
        assert ei.value.code == "INVALID_TOKEN"
    # A token without the groups scope is no good for Groups either.
    _, data = login(sim, refresh=False, scopes="openid email")
    gc = globus_sdk.GroupsClient(authorizer=globus_sdk.AccessTokenAuthorizer(data["access_token"]))
    with pytest.raises(globus_sdk.GroupsAPIError) as ei:
        gc.get_my_groups()
    assert ei.value.code == "INVALID_TOKEN"


def test_expired_access_token_is_refreshed_by_sdk(sim: Simulator, world: World) -> None:
    gc, data = groups_client(sim, retries=1)
    plain = globus_sdk.GroupsClient(
        authorizer=globus_sdk.AccessTokenAuthorizer(data["access_token"]),
        retry_config=RetryConfig(max_retries=0),
    )
    sim.expire_access_tokens()
    with pytest.raises(globus_sdk.GroupsAPIError) as ei:
        plain.get_my_groups()
    assert ei.value.code == "INVALID_TOKEN"
    # RefreshTokenAuthorizer sees the 401, refreshes and retries.
    assert len(gc.get_my_groups().data) == len(world.groups)
    assert sim.stats["refresh_grants"] == 1


def test_access_token_lifetime(sim: Simulator) -> None:
    sim.faults.access_token_lifetime = 0
    _, data = login(sim, refresh=False)
    assert data["expires_in"] == 0
    gc = globus_sdk.GroupsClient(authorizer=globus_sdk.AccessTokenAuthorizer(data["access_token"]))
    with pytest.raises(globus_sdk.GroupsAPIError) as ei:
        gc.get_my_groups()
    assert ei.value.http_status == 401


def test_tokens_never_logged(world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG)
    with Simulator(world, verbose=True) as s:
        for k, v in s.env.items():
            monkeypatch.setenv(k, v)
        gc, _ = groups_client(s)
        gc.get_group(next(iter(world.groups)), include="memberships")
        assert "/groups/v2/groups/" in caplog.text
        assert s.issued_tokens
        ours = [r.getMessage() for r in caplog.records if r.name.startswith("syncer")]
        assert not any(t in line for t in s.issued_tokens for line in ours)


# ----------------------------------------------------------------- groups


def test_visibility_rules(sim: Simulator, world: World) -> None:
    gc, _ = groups_client(sim)
    me = world.me

    admin_gid = gid_where(world, role="admin", visibility="managers")
    got = gc.get_group(admin_gid, include="memberships")["memberships"]
    assert state_of(got) == sorted(
        (i, m.role, m.status) for i, m in world.groups[admin_gid]["memberships"].items()
    )
    assert {m["status"] for m in got} - {"active"}, "admins see non-active memberships too"
    assert got == world.visible_memberships(admin_gid)

    only_me = gid_where(world, role="member", visibility="managers")
    got = gc.get_group(only_me, include="memberships")["memberships"]
    assert [m["identity_id"] for m in got] == [me]

    members_vis = gid_where(world, role="member", visibility="members")
    got = gc.get_group(members_vis, include="memberships")["memberships"]
    expect = [i for i, m in world.groups[members_vis]["memberships"].items() if m.status == "active"]
    assert [m["identity_id"] for m in got] == expect
    assert me in expect and len(expect) > 1

    # The include list may name several things; my_memberships alone omits memberships.
    doc = gc.get_group(members_vis, include=["my_memberships", "memberships"])
    assert doc["my_memberships"][0]["identity_id"] == me and "memberships" in doc
    assert "memberships" not in gc.get_group(members_vis, include="my_memberships")

    # Invited or pending: the group, but no memberships (only active members see them),
    # as Globus documents for GET /v2/groups/{id}.
    for status in ("invited", "pending"):
        world.set_status(only_me, me, status)
        doc = gc.get_group(only_me, include="memberships")
        assert "memberships" not in doc
        assert [(m["identity_id"], m["status"]) for m in doc["my_memberships"]] == [(me, status)]
        assert world.visible_memberships(only_me) == []
    # Another status in a private group -> 403; in an `authenticated` group anyone may look.
    world.set_status(only_me, me, "left")
    world.set_policy(only_me, group_visibility="private")
    with pytest.raises(globus_sdk.GroupsAPIError) as ei:
        gc.get_group(only_me, include="memberships")
    assert (ei.value.http_status, ei.value.code) == (403, "FORBIDDEN")
    world.set_policy(only_me, group_visibility="authenticated")
    assert "memberships" not in gc.get_group(only_me, include="memberships")
    # unknown group -> 404
    with pytest.raises(globus_sdk.GroupsAPIError) as ei:
        gc.get_group("00000000-0000-4000-8000-000000000000")
    assert (ei.value.http_status, ei.value.code) == (404, "NOT_FOUND")
    with pytest.raises(globus_sdk.GroupsAPIError) as ei:
        gc.get_group(admin_gid, include="bogus")
    assert ei.value.http_status == 422


def test_visible_memberships_for_other_viewer(world: World) -> None:
    gid = gid_where(world, role="admin", visibility="managers")
    other = next(i for i, m in world.groups[gid]["memberships"].items()
                 if m.role == "member" and m.status == "active" and i != world.me)
    assert [m["identity_id"] for m in world.visible_memberships(gid, other)] == [other]


def test_my_groups_statuses_filter(sim: Simulator, world: World) -> None:
    gc, _ = groups_client(sim)
    gid = next(iter(world.groups))
    world.set_status(gid, world.me, "invited")
    default = {g["id"] for g in gc.get_my_groups()}
    assert gid not in default and len(default) == len(world.groups) - 1
    both = {g["id"]: g for g in gc.get_my_groups(statuses=["active", "invited"])}
    assert set(both) == set(world.groups)
    assert both[gid]["my_memberships"][0]["status"] == "invited"
    only_invited = gc.get_my_groups(statuses="invited")
    assert [g["id"] for g in only_invited] == [gid]
    with pytest.raises(globus_sdk.GroupsAPIError) as ei:
        gc.get_my_groups(statuses="sleeping")
    assert ei.value.http_status == 422


# ----------------------------------------------------------------- faults


@pytest.mark.parametrize("status", [500, 503, 403, 404])
def test_group_error_persistent(sim: Simulator, world: World, status: int) -> None:
    gc, _ = groups_client(sim)
    gid = next(iter(world.groups))
    sim.faults.group_errors[gid] = status
    for _ in range(3):
        with pytest.raises(globus_sdk.GroupsAPIError) as ei:
            gc.get_group(gid, include="memberships")
        assert ei.value.http_status == status
    del sim.faults.group_errors[gid]
    assert gc.get_group(gid, include="memberships").http_status == 200
    assert sim.stats["faults"]["group_error"] == 3
    assert len(sim.read_log) == 1


def test_group_error_transient_and_gateway_html(sim: Simulator, world: World) -> None:
    gc, _ = groups_client(sim)
    gid = next(iter(world.groups))
    sim.faults.group_errors[gid] = 502
    sim.faults.group_errors_times[gid] = 2
    for _ in range(2):
        with pytest.raises(globus_sdk.GroupsAPIError) as ei:
            gc.get_group(gid, include="memberships")
        assert ei.value.http_status == 502
        assert "Bad Gateway" in ei.value.text  # gateways answer in HTML
    assert gc.get_group(gid, include="memberships").http_status == 200
    assert gid not in sim.faults.group_errors


def test_rate_limit(sim: Simulator, world: World) -> None:
    gc, _ = groups_client(sim)
    sim.faults.rate_limit(2, retry_after=3)
    for call in (gc.get_my_groups, lambda: gc.get_group(next(iter(world.groups)))):
        with pytest.raises(globus_sdk.GroupsAPIError) as ei:
            call()
        assert ei.value.http_status == 429
        assert ei.value.headers["Retry-After"] == "3"
    assert gc.get_my_groups().http_status == 200
    assert sim.stats["responses_429"] == 2
    assert sim.stats["faults"]["rate_limit"] == 2


def test_stall(sim: Simulator, world: World) -> None:
    gc, _ = groups_client(sim, timeout=0.4)
    gid = next(iter(world.groups))
    sim.faults.stall[gid] = 5.0
    t0 = time.monotonic()
    with pytest.raises(globus_sdk.GlobusTimeoutError):
        gc.get_group(gid, include="memberships")
    assert time.monotonic() - t0 < 3
    sim.faults.stall[gid] = 0.1  # short: answered within the timeout
    assert gc.get_group(gid, include="memberships").http_status == 200
    assert sim.read_log[-1]["fault"] == "stall"
    del sim.faults.stall[gid]
    gc.get_group(gid, include="memberships")
    assert sim.read_log[-1]["fault"] is None
    assert sim.stats["faults"]["stall"] == 2


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
def test_malformed(sim: Simulator, world: World, kind: str) -> None:
    _, data = login(sim, refresh=False)
    gid = gid_where(world, role="admin", visibility="managers")
    sim.faults.malformed[gid] = kind
    r = raw_get(sim, data["access_token"], gid)
    assert r.status_code == 200
    if kind == "truncated":
        with pytest.raises(ValueError):
            json.loads(r.content)
        assert len(r.content) == int(r.headers["Content-Length"])
    else:
        doc = r.json()
        mem = doc["memberships"]
        if kind == "memberships_not_list":
            assert isinstance(mem, dict)
        elif kind == "missing_identity_id":
            assert sum("identity_id" not in m for m in mem) == 1
        elif kind == "nulls":
            assert doc["name"] is None
            assert any(m["username"] is None and m["role"] is None
                       and m["membership_fields"]["name"] is None for m in mem)
        elif kind == "last_entry_bad":
            assert mem[-1]["role"] == "owner" and all(m["role"] != "owner" for m in mem[:-1])
        elif kind == "huge_names":
            assert len(doc["name"]) == 10_000 and not doc["name"].isascii()
            assert "DROP TABLE memberships" in doc["description"]
            assert any("DROP TABLE" in m["username"] for m in mem)
    assert sim.stats["faults"][f"malformed:{kind}"] == 1
    if kind == "huge_names":
        assert len(sim.read_log) == 1 and sim.read_log[0]["fault"] == "huge_names"
        assert sim.read_log[0]["state"] == state_of(world.visible_memberships(gid))
    else:
        assert sim.read_log == []
    # The world itself is untouched.
    del sim.faults.malformed[gid]
    assert raw_get(sim, data["access_token"], gid).json()["memberships"] == world.visible_memberships(gid)


def test_random_faults(sim: Simulator, world: World) -> None:
    _, data = login(sim, refresh=False)
    sim.faults.random_stall_s = 0.01
    sim.faults.set_random(1.0, kinds=[500], seed=3)
    gids = list(world.groups)
    assert raw_get(sim, data["access_token"], gids[0]).status_code == 500
    sim.faults.set_random(0.5, kinds=["500", "502", "503", "429", "stall", "truncated"], seed=11)
    seen: dict[str, int] = {}
    clean = 0
    with requests.Session() as s:
        s.headers["Authorization"] = f"Bearer {data['access_token']}"
        for i in range(60):
            r = s.get(f"{sim.url}/groups/v2/groups/{gids[i % len(gids)]}",
                      params={"include": "memberships"}, timeout=10)
            seen[str(r.status_code)] = seen.get(str(r.status_code), 0) + 1
            if r.status_code == 200:
                try:
                    r.json()
                    clean += 1
                except ValueError:
                    seen["truncated"] = seen.get("truncated", 0) + 1
    faults = sim.stats["faults"]
    injected = sum(v for k, v in faults.items() if k.startswith("random:"))
    assert 15 < injected < 45
    assert seen.get("502", 0) == faults.get("random:502", 0)
    assert seen.get("429", 0) == faults.get("random:429", 0) == sim.stats["responses_429"]
    assert seen.get("truncated", 0) == faults.get("random:truncated", 0)
    # Clean reads (including the ones that were merely stalled) are logged.
    assert len(sim.read_log) == clean
    assert sum(e["fault"] == "random:stall" for e in sim.read_log) == faults.get("random:stall", 0)
    sim.faults.clear()
    assert raw_get(sim, data["access_token"], gids[0]).status_code == 200


def test_faults_object_can_be_shared(world: World) -> None:
    f = Faults(latency_ms=5, access_token_lifetime=60)
    s = Simulator(world, faults=f)
    assert s.faults is f and s.latency_ms == 5 and s.access_token_lifetime == 60
    f.set_group_error("g", 500, times=1)
    assert f._take_group_error("g") == 500 and f._take_group_error("g") is None


# ------------------------------------------------------------ read/change log


def test_read_log_tracks_what_was_served(sim: Simulator, world: World) -> None:
    gc, _ = groups_client(sim)
    gid = gid_where(world, role="admin", visibility="managers")
    before = gc.get_group(gid, include="memberships")["memberships"]
    gc.get_group(gid)  # no memberships requested -> not logged
    new_id = world.add_member(gid, role="manager", status="pending")
    after = gc.get_group(gid, include="memberships")["memberships"]
    assert [e["group_id"] for e in sim.read_log] == [gid, gid]
    assert sim.read_log[0]["state"] == state_of(before)
    assert sim.read_log[1]["state"] == state_of(after)
    assert (new_id, "manager", "pending") in sim.read_log[1]["state"]
    assert sim.read_log[0]["at"] <= world.change_log[-1]["at"] <= sim.read_log[1]["at"]
    assert sim.stats["group_reads_ok"] == 3


def test_concurrent_reads_are_counted(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    with Simulator(world, latency_ms=80) as s:
        for k, v in s.env.items():
            monkeypatch.setenv(k, v)
        _, data = login(s, refresh=False)
        with ThreadPoolExecutor(max_workers=6) as pool:
            codes = list(pool.map(lambda g: raw_get(s, data["access_token"], g).status_code, world.groups))
        assert set(codes) == {200}
        assert s.stats["max_concurrent_group_reads"] >= 2
        assert s.stats["in_flight_group_reads"] == 0


def test_mutators_and_change_log(world: World) -> None:
    me = world.me
    gid = gid_where(world, role="admin", visibility="managers")
    v0 = world.version
    iid = world.add_member(gid)  # brand-new identity
    assert iid in world.identities and world.identities[iid]["username"].endswith("@example.org")
    old_updated = world.groups[gid]["memberships"][iid]["updated"]
    world.set_role(gid, iid, "manager")
    assert world.groups[gid]["memberships"][iid].updated > old_updated
    world.set_role(gid, iid, "manager")  # no-op: nothing logged
    world.set_status(gid, iid, "invited")
    m = world.groups[gid]["memberships"][iid]
    assert m.invite_time == m.updated and m.invite_email_address == world.identities[iid]["email"]
    world.remove_member(gid, iid)
    assert iid not in world.groups[gid]["memberships"]
    assert iid not in [x["identity_id"] for x in world.visible_memberships(gid)]
    world.rename_group(gid, "Renamed")
    new_gid = world.add_group(name="Fresh", me_role="member", members=3, visibility="members")
    assert len(world.groups[new_gid]["memberships"]) == 4
    assert world.groups[new_gid]["memberships"][me].role == "member"
    world.delete_group(new_gid)
    assert new_gid not in world.groups

    log = world.change_log
    assert [e["kind"] for e in log] == [
        "add_member", "set_role", "set_status", "remove_member", "rename_group", "add_group", "delete_group",
    ]
    assert world.version == v0 + 7
    assert [e["seq"] for e in log] == sorted(e["seq"] for e in log)
    assert log[1]["old"] == "member" and log[1]["new"] == "manager" and log[1]["identity_id"] == iid
    assert log[2] == {**log[2], "old": "active", "new": "invited"}
    assert log[3]["old"] == {"role": "manager", "status": "invited"} and log[3]["new"] is None
    assert log[4]["old"] != "Renamed" and log[4]["new"] == "Renamed" and log[4]["identity_id"] is None
    assert all(set(e) == {"seq", "at", "kind", "group_id", "identity_id", "old", "new"} for e in log)
    with pytest.raises(ValueError):
        world.set_role(gid, me, "owner")
    with pytest.raises(ValueError):
        world.set_status(gid, me, "sleeping")
    with pytest.raises(KeyError):
        world.remove_member(gid, "nobody")


def test_random_changes(world: World) -> None:
    mine = {g: (m.role, m.status) for g in world.groups for m in [world.groups[g]["memberships"][world.me]]}
    entries = world.random_changes(300, random.Random(5))
    assert len(entries) == 300 == len(world.change_log)
    assert {e["kind"] for e in entries} == {"add_member", "remove_member", "set_role", "set_status", "rename_group"}
    assert all(e["identity_id"] != world.me for e in entries)
    assert mine == {g: (m.role, m.status) for g in world.groups for m in [world.groups[g]["memberships"][world.me]]}
    # Same seed, same world -> same changes.
    twin = World.generate(groups=8, members=12, seed=7)
    strip = lambda es: [(e["kind"], e["group_id"], e["identity_id"], e["old"], e["new"]) for e in es]  # noqa: E731
    assert strip(twin.random_changes(300, random.Random(5))) == strip(entries)
    with_groups = world.random_changes(200, random.Random(1), kinds=["add_group", "delete_group", "set_role"])
    assert {"add_group", "delete_group"} <= {e["kind"] for e in with_groups}


def test_served_state_follows_mutations(sim: Simulator, world: World) -> None:
    gc, _ = groups_client(sim)
    world.random_changes(50, random.Random(2))
    for gid in world.groups:
        got = gc.get_group(gid, include="memberships")["memberships"]
        assert got == world.visible_memberships(gid)
    names = {g["id"]: g["name"] for g in gc.get_my_groups()}
    assert names == {gid: g["name"] for gid, g in world.groups.items()}


# ------------------------------------------------------------------ world


def test_generate_shape_and_determinism(world: World) -> None:
    assert World.generate(groups=8, members=12, seed=7).to_dict() == world.to_dict()
    assert World.generate(groups=8, members=12, seed=8).to_dict() != world.to_dict()
    assert len(world.groups) == 8
    me = world.me
    statuses, roles = set(), set()
    seen_in: dict[str, int] = {}
    for g in world.groups.values():
        assert len(g["memberships"]) == 12
        assert g["memberships"][me].status == "active"
        for i, m in g["memberships"].items():
            statuses.add(m.status)
            roles.add(m.role)
            seen_in[i] = seen_in.get(i, 0) + 1
    assert {"active", "invited"} <= statuses and len(statuses) >= 4
    assert roles == {"member", "manager", "admin"}
    assert any(n > 1 for i, n in seen_in.items() if i != me), "identities are shared"
    me_roles = [g["memberships"][me].role for g in world.groups.values()]
    assert me_roles.count("admin") > len(me_roles) / 2 and "member" in me_roles
    gid_where(world, role="member", visibility="managers")
    for ident in world.identities.values():
        assert set(ident) == {"id", "username", "name", "email", "institution"}
        assert ident["username"].endswith("@example.org")


def test_json_round_trip(world: World, tmp_path: Path) -> None:
    world.random_changes(20, random.Random(3))
    p = tmp_path / "world.json"
    world.to_json(p)
    back = World.from_json(p)
    assert back.to_dict() == world.to_dict()
    assert back.me == world.me
    for gid in world.groups:
        assert back.render_group(gid) == world.render_group(gid)
    p2 = tmp_path / "again.json"
    back.to_json(p2)
    assert p2.read_bytes() == p.read_bytes()


def test_prerender_fills_the_render_cache_when_the_world_fits(world: World) -> None:
    mine = [gid for gid, g in world.groups.items() if world.me in g["memberships"]]
    key = (world.me, True)
    assert all(world._render.get(gid, key) is None for gid in mine)
    assert world.prerender() is True
    assert all(world._render.get(gid, key) is not None for gid in mine)
    # a cache too small for the world: nothing is rendered beyond the first group
    body, _ = world.render_group(mine[0]) or (b"", [])
    world.invalidate_caches()
    world._render.max_bytes = len(body) * 2
    assert world.prerender() is False
    assert all(world._render.get(gid, key) is None for gid in mine[1:])


@pytest.mark.slow  # the benchmarks' largest world: a million memberships
def test_generate_10k_x_100() -> None:
    t0 = time.perf_counter()
    big = World.generate(groups=10_000, members=100, seed=1)
    took = time.perf_counter() - t0
    print(f"\nWorld.generate(10_000 x 100): {took:.2f}s, "
          f"{sum(len(g['memberships']) for g in big.groups.values())} memberships, "
          f"{len(big.identities)} identities")
    assert len(big.groups) == 10_000
    gid = next(iter(big.groups))
    body, state = big.render_group(gid)
    assert len(json.loads(body)["memberships"]) == len(state) == 100


# --------------------------------------------------------------- lifecycle


def test_restart_keeps_port_and_tokens(sim: Simulator, world: World) -> None:
    gc, _ = groups_client(sim)
    url = sim.url
    sim.stop()
    assert not sim.running
    with pytest.raises(globus_sdk.NetworkError):
        gc.get_my_groups()
    sim.start()
    assert sim.url == url
    assert gc.get_my_groups().http_status == 200


def test_serve_blocks_until_sigterm(tmp_path: Path) -> None:
    code = (
        "from syncer.simulator import World, serve\n"
        "serve(World.generate(groups=2, members=3, seed=1), port=0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("export GLOBUS_SDK_SERVICE_URL_AUTH=http://127.0.0.1:")
        groups_url = lines[1].strip().split("=", 1)[1]
        assert groups_url.endswith("/groups/")
        health = requests.get(groups_url.replace("/groups/", "/health"), timeout=5)
        assert health.json()["ok"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
