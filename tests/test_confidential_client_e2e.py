"""A confidential client (a facility's service account): client credentials, no login.

The secret comes from `client_secret_file`, `$SYNCER_CLIENT_SECRET` or systemd's
`$CREDENTIALS_DIRECTORY/client_secret`; a rejected one is exit 78 naming its source,
and the secret itself never appears in any output, the database or the token store.
"""

from __future__ import annotations

import json
import typing as t
from pathlib import Path

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
        write_secret(env.tmp / "client.secret", secret)
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


def write_secret(path: Path, secret: str, mode: int = 0o600) -> None:
    """Put a secret in a file readable by its owner only (or with ``mode``)."""
    path.write_text(secret + "\n")
    path.chmod(mode)


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


def rotate(env: Env, client: Client, secret: str) -> None:
    """Globus Auth now knows the client by ``secret`` only (a rotation in the web app)."""
    with env.world.lock:
        env.world.clients[client.id] = secret


def test_a_cached_token_serves_only_the_secret_it_was_issued_for(env: Env, client: Client) -> None:
    secret_file = env.tmp / "client.secret"
    named = configure(env, client, "client_secret_file", client.secret)
    assert env.run("sync").returncode == 0
    assert env.sim.stats["client_credentials_grants"] == 1

    # a wrong secret put in place: refused now, although the cached token is still valid
    wrong = "not-the-secret-" + client.secret[::-1]
    write_secret(secret_file, wrong)
    results = [env.run("sync"), env.run("login")]
    for result in results:
        assert result.returncode == 78, result.output
        assert result.stderr.startswith(f"syncer: error: Globus Auth rejected the client secret from {named} (key")
    assert env.sim.stats["client_credentials_grants_failed"] == 2

    # a rotation: the new secret gets a new token, and it is cached for that secret
    rotated = client.secret + "-rotated"
    rotate(env, client, rotated)
    write_secret(secret_file, rotated)
    assert env.run("sync").returncode == 0
    assert env.sim.stats["client_credentials_grants"] == 2
    assert env.run("sync").returncode == 0
    assert env.sim.stats["client_credentials_grants"] == 2  # cached, same secret

    # the old secret, put back, is refused at once rather than served by the new token
    write_secret(secret_file, client.secret)
    old = env.run("sync")
    assert old.returncode == 78 and named in old.stderr, old.output
    assert env.sim.stats["client_credentials_grants_failed"] == 3

    # the token store keeps a keyed digest, never the secret
    stored = env.tokens.read_bytes()
    for secret in (client.secret, wrong, rotated):
        assert secret.encode() not in stored
    assert_secret_nowhere(env, rotated, *results, old)


def test_login_checks_the_secret_with_globus_every_time(env: Env, client: Client) -> None:
    configure(env, client, "SYNCER_CLIENT_SECRET", client.secret)
    for attempt in (1, 2, 3):
        login = env.run("login")
        assert login.returncode == 0 and "Client credentials work" in login.stdout, login.output
        assert env.sim.stats["client_credentials_grants"] == attempt
    # revoked at Globus meanwhile (the client's secret deleted there): the next login says so
    rotate(env, client, client.secret + "-elsewhere")
    login = env.run("login")
    assert login.returncode == 78 and "SYNCER_CLIENT_SECRET" in login.stderr, login.output


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644], ids=lambda mode: f"{mode:04o}")
def test_a_secret_file_others_may_read_is_a_configuration_error(env: Env, client: Client, mode: int) -> None:
    secret_file = env.tmp / "client.secret"
    named = configure(env, client, "client_secret_file", client.secret)
    write_secret(secret_file, client.secret, mode)
    for command in ("sync", "login", "logout"):
        result = env.run(command)
        assert result.returncode == 78, (command, result.output)
        assert result.stderr.splitlines() == [
            f"syncer: error: {named} (key 'client_secret_file' in {env.config}): the client secret file may be"
            f" read or written by group or others (mode {mode:04o}); run: chmod 600 {secret_file}"
        ], command
    assert env.sim.stats["client_credentials_grants"] == 0  # never sent anywhere
    secret_file.chmod(0o600)
    assert env.run("sync").returncode == 0
