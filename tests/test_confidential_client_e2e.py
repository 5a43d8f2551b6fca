"""A confidential client (a facility's service account): client credentials, no login.

The secret comes from `client_secret_file`, `$SYNCER_CLIENT_SECRET` or systemd's
`$CREDENTIALS_DIRECTORY/client_secret`; a rejected one is exit 78 naming its source,
and the secret itself never appears in any output, the database or the token store.
"""

from __future__ import annotations

import json
import typing as t

import pytest
from conftest import Env, Result
from helpers import current_state

SOURCES = ("client_secret_file", "SYNCER_CLIENT_SECRET", "CREDENTIALS_DIRECTORY")


class Client(t.NamedTuple):
    id: str
    secret: str
    groups: list[str]


@pytest.fixture
def client(env: Env) -> Client:
    """A service client of its own in the simulated world: admin of three groups."""
    groups = list(env.world.groups)[:3]
    client_id, secret = env.world.add_client(groups, role="admin")
    return Client(client_id, secret, groups)


def configure(env: Env, client: Client, source: str, secret: str) -> str:
    """Point syncer at the client with the secret from ``source``; return what messages name."""
    if source == "client_secret_file":
        (env.tmp / "client.secret").write_text(secret + "\n")
        env.write_config(client_id=client.id, client_secret_file="client.secret")
        return str(env.tmp / "client.secret")
    env.write_config(client_id=client.id)
    if source == "SYNCER_CLIENT_SECRET":
        env.vars["SYNCER_CLIENT_SECRET"] = secret
        return "SYNCER_CLIENT_SECRET"
    credentials = env.tmp / "credentials"
    credentials.mkdir()
    (credentials / "client_secret").write_text(secret)
    env.vars["CREDENTIALS_DIRECTORY"] = str(credentials)
    return str(credentials / "client_secret")


def assert_secret_nowhere(env: Env, secret: str, *results: Result) -> None:
    for result in results:
        assert secret not in result.output
    for path in (env.database, env.tokens):
        if path.exists():
            assert secret.encode() not in path.read_bytes()


@pytest.mark.parametrize("source", SOURCES)
def test_a_confidential_client_syncs_without_a_login(env: Env, client: Client, source: str) -> None:
    named = configure(env, client, source, client.secret)
    login = env.run("login")
    assert login.returncode == 0, login.output
    assert "No login needed" in login.stdout and named in login.stdout
    assert f"Client credentials work as {client.id}@clients.auth.globus.org: 3 group(s)" in login.stdout
    assert env.sim.stats["code_exchanges"] == 0

    sync = env.run("sync")
    assert sync.returncode == 0, sync.output
    # what the client itself sees (an admin: every membership of its three groups)
    assert current_state(env) == {
        (gid, m["identity_id"]): (m["role"], m["status"])
        for gid in client.groups
        for m in env.world.visible_memberships(gid, client.id)
    }
    assert {(gid, client.id) for gid in client.groups} <= set(current_state(env))
    # the token from the login's check is cached in the token store and reused
    assert env.sim.stats["client_credentials_grants"] == 1
    again = env.run("-vv", "sync")  # debug output of the SDK and requests included
    assert again.returncode == 0 and env.sim.stats["client_credentials_grants"] == 1
    assert "DEBUG" in again.stderr

    status = env.run("status", "--json")
    data = json.loads(status.stdout)
    assert status.returncode == 0, data["health"]
    assert data["tokens"]["client_credentials"] is True and named in data["tokens"]["client_secret_source"]
    assert data["tokens"]["login_required"] is False
    assert_secret_nowhere(env, client.secret, login, sync, again, status)


def test_logout_revokes_a_confidential_clients_cached_token(env: Env, client: Client) -> None:
    configure(env, client, "SYNCER_CLIENT_SECRET", client.secret)
    assert env.run("sync").returncode == 0
    logout = env.run("logout")
    assert logout.returncode == 0 and "Logged out" in logout.stdout, logout.output
    assert env.sim.stats["revocations"] == 1
    assert env.run("logout").stdout.startswith("Not logged in")
    # the next run asks for a new token: the revoked one is neither kept nor used
    assert env.run("sync").returncode == 0
    assert env.sim.stats["client_credentials_grants"] == 2
    assert_secret_nowhere(env, client.secret, logout)


@pytest.mark.parametrize("source", SOURCES)
def test_a_rejected_secret_is_a_configuration_error_naming_its_source(env: Env, client: Client, source: str) -> None:
    wrong = "not-the-secret-" + client.secret[::-1]
    named = configure(env, client, source, wrong)
    results = []
    for command in ("login", "sync", "run"):
        result = env.run("-vv", command) if command == "run" else env.run(command)
        results.append(result)
        assert result.returncode == 78, result.output
        [line] = [line for line in result.stderr.splitlines() if "rejected the client secret" in line]
        assert named in line and "invalid_client" in line
        if command == "run":  # the daemon logs it, and stops: retrying cannot help
            assert "ERROR syncer.scheduler: Globus Auth rejected the client secret from " in line
        else:
            assert result.stderr == line + "\n"
            assert line.startswith("syncer: error: Globus Auth rejected the client secret from ")
    assert env.sim.stats["client_credentials_grants_failed"] == 3  # the daemon stopped: no retries
    runs = env.query("SELECT status, exit_code, error FROM sync_runs")
    assert [(r["status"], r["exit_code"]) for r in runs] == [("failed", 78)] * 2
    assert all(named in r["error"] for r in runs)
    assert_secret_nowhere(env, wrong, *results)
    assert_secret_nowhere(env, client.secret, *results)


def test_an_unreadable_secret_file_is_a_configuration_error(env: Env, client: Client) -> None:
    env.write_config(client_id=client.id, client_secret_file="missing.secret")
    result = env.run("sync")
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        f"syncer: error: {env.tmp / 'missing.secret'} (key 'client_secret_file' in {env.config}):"
        " cannot read the client secret: No such file or directory"
    ]
