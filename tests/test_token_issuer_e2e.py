"""The token store remembers which Globus Auth issued its tokens: the simulator's
tokens never go to another Auth (the real one), and a real login is not "already
logged in" because the simulator's tokens are in the store."""

from __future__ import annotations

import sqlite3
import typing as t

import pytest
from conftest import ISSUED_TOKENS, Env, make_env
from helpers import stored_tokens

from syncer.simulator import Simulator, World


@pytest.fixture
def other_auth(env: Env) -> t.Iterator[Simulator]:
    """A second Globus (another simulator, another address), as the real one would be."""
    other = Simulator(World.generate(groups=2, members=3, seed=5), port=0).start()
    yield other
    ISSUED_TOKENS.update(other.issued_tokens)
    other.stop()


def auth_of(sim: Simulator) -> str:
    return sim.env["GLOBUS_SDK_SERVICE_URL_AUTH"]


def requests_to(sim: Simulator) -> int:
    return sum(sim.stats["requests"].values())


def test_tokens_of_one_auth_are_never_sent_to_another(logged_in: Env, other_auth: Simulator) -> None:
    env = logged_in
    first = stored_tokens(env.tokens)
    env.vars.update(other_auth.env)  # the same store, now pointed at another Globus Auth
    other_auth.reset_stats()
    for command in (("sync",), ("run", "--interval", "1h")):
        result = env.run(*command)
        assert result.returncode == 77, result.output
        [line] = [line for line in result.stderr.splitlines() if auth_of(env.sim) in line]
        assert auth_of(other_auth) in line and "syncer login" in line, result.stderr
        assert line.startswith("syncer: error: ") or command[0] == "run"  # run logs it, then stops
    status = env.run("status")
    assert status.returncode == 77 and auth_of(env.sim) in status.stdout, status.output
    logout = env.run("logout")
    assert logout.returncode == 77 and auth_of(other_auth) in logout.stderr, logout.output
    assert requests_to(other_auth) == 0  # not one request: no token reached it
    assert stored_tokens(env.tokens) == first  # nothing lost either

    # a login there is a real login, not "already logged in"; it replaces the other Auth's tokens
    again = make_env(env.tmp, other_auth, other_auth.world)
    login = again.login()
    assert login.returncode == 0, login.output
    assert "Already logged in" not in login.output and "Logged in" in login.stdout
    assert stored_tokens(env.tokens) != first
    with sqlite3.connect(env.tokens) as conn:
        assert conn.execute("SELECT issuer FROM syncer_token_issuer").fetchall() == [(auth_of(other_auth),)]
    assert "tokens: refresh token present" in again.run("status").stdout
    # and back at the first Auth, those tokens are refused before a request is made
    env.vars.update(env.sim.env)
    env.sim.reset_stats()
    back = env.run("sync")
    assert back.returncode == 77 and auth_of(other_auth) in back.stderr
    assert requests_to(env.sim) == 0


def test_a_store_from_before_issuers_is_adopted_by_the_auth_that_uses_it(logged_in: Env) -> None:
    env = logged_in
    with sqlite3.connect(env.tokens) as conn:
        conn.execute("DROP TABLE syncer_token_issuer")  # as an older syncer left it
    status = env.run("status")
    assert "tokens: refresh token present" in status.stdout, status.output
    result = env.run("sync")
    assert result.returncode == 0, result.output
    with sqlite3.connect(env.tokens) as conn:
        assert conn.execute("SELECT issuer FROM syncer_token_issuer").fetchall() == [(auth_of(env.sim),)]
    login = env.login()
    assert login.returncode == 0 and "Already logged in" in login.stdout
