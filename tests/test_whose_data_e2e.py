"""Whose data a database holds: the first successful run records the identity (or the
confidential client); tokens of another Globus account are a 78 before anything is
written, at `syncer sync` and at `syncer login`, and `syncer status` names the owner."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from conftest import Env, make_env
from helpers import current_state, my_active_groups, others, stored_token_data, stored_tokens

from syncer.globus.token_store import TokenStore
from syncer.simulator import World


def another_identity(world: World) -> tuple[str, str]:
    """An identity of the world other than the logged-in one: (id, username)."""
    with world.lock:
        gid = my_active_groups(world)[0]
        other = others(world, gid)[0]
        return other, world.identities[other]["username"]


def log_in_as(world: World, identity_id: str) -> str:
    """Make the simulator's next login be ``identity_id``'s; return the previous one's id."""
    with world.lock:
        previous, world.me = world.me, identity_id
    return previous


def beside(env: Env, tmp_path: Path) -> Env:
    """Another user's setup on the same simulator (own config, database and token store)."""
    (tmp_path / "theirs").mkdir()
    return make_env(tmp_path / "theirs", env.sim, env.world)


def owner_row(env: Env) -> dict[str, object]:
    rows = env.query("SELECT kind, id, username, recorded_by_run FROM database_owner")
    assert len(rows) == 1
    return dict(rows[0])


def test_the_first_successful_run_records_the_owner_and_status_names_it(logged_in: Env) -> None:
    env = logged_in
    me = env.world.me
    username = env.world.identities[me]["username"]
    assert env.run("sync").returncode == 0
    assert owner_row(env) == {"kind": "identity", "id": me, "username": username, "recorded_by_run": 1}
    # the login kept whose tokens they are, from Globus Auth's id_token
    assert stored_token_data(env.tokens)["groups.api.globus.org"]["identity_id"] == me
    status = env.run("status")
    assert f"belongs to {username} ({me}) (recorded by run 1 at " in status.stdout
    as_json = json.loads(env.run("status", "--json").stdout)
    assert as_json["database"]["owner"]["id"] == me
    # a second run keeps the first record
    assert env.run("sync").returncode == 0
    assert owner_row(env)["recorded_by_run"] == 1


def test_another_accounts_tokens_are_a_78_naming_both_and_nothing_is_recorded(
    logged_in: Env, tmp_path: Path
) -> None:
    env = logged_in
    me = env.world.me
    assert env.run("sync").returncode == 0
    before = current_state(env)
    runs_before = env.query("SELECT count(*) FROM sync_runs")[0][0]
    other, other_name = another_identity(env.world)

    # someone else's login, in a token store of its own, then pointed at this database
    log_in_as(env.world, other)
    theirs = beside(env, tmp_path)
    assert theirs.login().returncode == 0
    env.write_config(token_storage=str(theirs.tokens))

    result = env.run("sync")
    assert result.returncode == 78, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("syncer: error: ") and me in line and other in line and other_name in line
    assert "nothing was recorded" in line
    assert current_state(env) == before  # no group recorded gone, no member of theirs added
    assert owner_row(env)["id"] == me
    failed = env.query("SELECT status, exit_code, error FROM sync_runs ORDER BY id DESC LIMIT 1")[0]
    assert (failed["status"], failed["exit_code"]) == ("failed", 78) and other in failed["error"]
    assert env.query("SELECT count(*) FROM sync_runs")[0][0] == runs_before + 1
    assert "Traceback" not in result.output


def test_login_force_as_another_account_says_so_before_storing_anything(logged_in: Env) -> None:
    env = logged_in
    me = env.world.me
    assert env.run("sync").returncode == 0
    kept = stored_tokens(env.tokens)
    other, other_name = another_identity(env.world)
    log_in_as(env.world, other)

    result = env.login("--force")
    assert result.returncode == 78, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("syncer: error: ") and me in line and other_name in line
    assert "the new tokens were not stored" in line
    assert stored_tokens(env.tokens) == kept  # the owner's login still stands
    assert env.sim.stats["revocations"] >= 1  # the refused login's tokens were revoked

    # the owner logging in again is fine, and syncs go on
    log_in_as(env.world, me)
    assert env.login("--force").returncode == 0
    assert env.run("sync").returncode == 0


def strip_identity(tokens: Path) -> None:
    """Make a token store look as a login before owners were recorded left it: no identity."""
    conn = sqlite3.connect(tokens)
    try:
        for (raw,) in conn.execute("SELECT token_data_json FROM token_storage").fetchall():
            data = json.loads(raw)
            data.pop("identity_id", None)
            conn.execute("UPDATE token_storage SET token_data_json = ? WHERE token_data_json = ?", [json.dumps(data), raw])
        conn.commit()
    finally:
        conn.close()


def test_a_database_from_before_owners_records_its_owner_at_its_next_run(logged_in: Env, tmp_path: Path) -> None:
    env = logged_in
    me = env.world.me
    assert env.run("sync").returncode == 0
    # as an older release left it: no owner table, and tokens stored without an identity
    conn = sqlite3.connect(env.database)
    conn.executescript("DROP TABLE database_owner; DELETE FROM _sqlite_migrations WHERE name = '0007_database_owner';")
    conn.close()
    strip_identity(env.tokens)
    assert "not recorded yet" in env.run("status").stdout

    assert env.run("sync").returncode == 0
    assert owner_row(env) == {
        "kind": "identity", "id": me, "username": env.world.identities[me]["username"], "recorded_by_run": 2,
    }

    # identity-less tokens of another account are refused too: told from the listing
    other, _ = another_identity(env.world)
    log_in_as(env.world, other)
    theirs = beside(env, tmp_path)
    assert theirs.login().returncode == 0
    strip_identity(theirs.tokens)
    env.write_config(token_storage=str(theirs.tokens))
    result = env.run("sync")
    assert result.returncode == 78, result.output
    assert me in result.stderr and other in result.stderr


def test_a_confidential_clients_database_is_not_another_identitys(env: Env) -> None:
    with env.world.lock:
        groups = my_active_groups(env.world)[:2]
    client_id, secret = env.world.add_client(groups, role="admin")
    (env.tmp / "client.secret").write_text(secret + "\n")
    (env.tmp / "client.secret").chmod(0o600)
    env.write_config(client_id=client_id, client_secret_file="client.secret")
    assert env.run("sync").returncode == 0
    assert owner_row(env) == {"kind": "client", "id": client_id, "username": None, "recorded_by_run": 1}
    assert f"belongs to confidential client {client_id}" in env.run("status").stdout

    # a person's login pointed at the client's database: refused at login, before storing
    env.write_config()
    result = env.login()
    assert result.returncode == 78, result.output
    assert client_id in result.stderr and env.world.me in result.stderr
    with TokenStore(env.tokens) as store:  # the login's namespace (the client's cached token is apart)
        assert store.groups_tokens() is None
