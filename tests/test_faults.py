"""End to end under faults: `syncer` against the simulator with its fault knobs turned.

Each test runs the real command in a subprocess and checks concrete outcomes: exit
codes, the exact database rows before and after, and what the simulator counted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import threading
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import conftest
import globus_sdk
import pytest
from conftest import Env, Result
from globus_sdk.transport import RetryCheckResult
from helpers import (
    admin_groups,
    current_state,
    expected_state,
    my_active_groups,
    others,
    state_as_of,
    stored_token_data,
    wait_for,
)

import syncer.globus.auth
from syncer.config import load_config
from syncer.errors import LoginRequired
from syncer.globus.auth import MAX_RETRIES, MAX_RETRY_SLEEP, authorizer_from_store, client_options
from syncer.globus.globus_groups import AdaptiveLimit
from syncer.globus.token_store import TokenStore
from syncer.simulator import World
from syncer.simulator.server import _HUGE_TEXT, _SQL_TEXT

# the SDK's exponential backoff sleeps at most 0.75 * 2**attempt before retry `attempt + 1`
_BACKOFF_MAX = sum(min(0.75 * 2**attempt, MAX_RETRY_SLEEP) for attempt in range(MAX_RETRIES))
# starting Python, importing globus_sdk, opening the database: generous, slow CI included
_STARTUP = 6.0


def worst_case_request(timeout: float, retry_after: bool = False) -> float:
    """Longest one Groups request can take: every attempt times out, every sleep is maximal."""
    sleeps = MAX_RETRIES * MAX_RETRY_SLEEP if retry_after else _BACKOFF_MAX
    return (MAX_RETRIES + 1) * timeout + sleeps


@pytest.fixture
def world(request: pytest.FixtureRequest) -> World:
    """The conftest world (6 groups x 8 members) unless a test asks for (groups, members)."""
    groups, members = getattr(request, "param", (6, 8))
    return World.generate(groups=groups, members=members, seed=11)


# ------------------------------------------------------------------ helpers


def dump(env: Env, exclude: t.Container[str] = ()) -> dict[str, list[tuple[t.Any, ...]]]:
    """Every row of every table, in a stable order, for before/after comparisons."""
    conn = sqlite3.connect(f"file:{env.database}?mode=ro", uri=True)
    try:
        tables = [
            r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        return {
            table: sorted((tuple(r) for r in conn.execute(f"SELECT * FROM [{table}]")), key=repr)
            for table in tables if table not in exclude
        }
    finally:
        conn.close()


def group_rows(env: Env, gid: str) -> dict[str, list[tuple[t.Any, ...]]]:
    """A group's own rows: its groups row, memberships and history, byte for byte."""
    return {
        "groups": [tuple(r) for r in env.query("SELECT * FROM groups WHERE id = ?", [gid])],
        "memberships": [
            tuple(r) for r in env.query("SELECT * FROM memberships WHERE group_id = ? ORDER BY identity_id", [gid])
        ],
        "membership_history": [
            tuple(r) for r in env.query(
                "SELECT * FROM membership_history WHERE group_id = ? ORDER BY identity_id, from_run", [gid])
        ],
    }


def last_run(env: Env) -> sqlite3.Row:
    return env.query("SELECT * FROM sync_runs ORDER BY id DESC LIMIT 1")[0]


def without(state: dict[tuple[str, str], t.Any], gid: str) -> dict[tuple[str, str], t.Any]:
    return {k: v for k, v in state.items() if k[0] != gid}


def listing_order(world: World) -> list[str]:
    """Group ids in the order my_groups lists them (the order syncer reads them in)."""
    return [g["id"] for g in json.loads(world.render_my_groups(("active",)))]


def timed(env: Env, *args: str) -> tuple[Result, float]:
    began = time.monotonic()
    result = env.run(*args)
    return result, time.monotonic() - began


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_clean_failure(result: Result, code: int, *fragments: str) -> None:
    """Exit ``code``, exactly one line on stderr containing every fragment, no traceback."""
    assert result.returncode == code, result.output
    assert "Traceback" not in result.output
    lines = error_lines(result)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("syncer: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def open_history_duplicates(env: Env) -> list[tuple[t.Any, ...]]:
    return [
        tuple(r) for r in env.query(
            "SELECT group_id, identity_id, count(*) FROM membership_history WHERE to_run IS NULL"
            " GROUP BY 1, 2 HAVING count(*) > 1"
        )
    ]


class Sampler(threading.Thread):
    """Samples the simulator's counters every few milliseconds while a run goes on."""

    def __init__(self, env: Env) -> None:
        super().__init__(daemon=True)
        self.env = env
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, in flight, 429s so far)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            stats = self.env.sim.stats
            self.samples.append((time.monotonic(), stats["in_flight_group_reads"], stats["responses_429"]))
            time.sleep(0.005)

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.halt.set()
        self.join()


# ------------------------------------------------- 1. a group fails persistently


@pytest.mark.parametrize("status", [500, 403, 404])
def test_group_failing_persistently_is_left_as_it_was(logged_in: Env, status: int) -> None:
    env, world = logged_in, logged_in.world
    assert env.run("sync").returncode == 0
    broken, fine = admin_groups(world)[:2]
    before = group_rows(env, broken)
    assert before["memberships"] and before["membership_history"]

    # changes in the broken group must not be seen; changes elsewhere must be
    world.remove_member(broken, others(world, broken)[0])
    world.set_role(broken, others(world, broken)[0], "manager")
    newcomer = world.add_member(fine)
    world.remove_member(fine, others(world, fine)[0])
    env.sim.faults.set_group_error(broken, status)
    env.sim.reset_stats()

    result = env.run("sync")
    assert result.returncode == 3, result.output
    assert "Traceback" not in result.output
    assert group_rows(env, broken) == before
    assert without(current_state(env), broken) == without(expected_state(world), broken)
    assert without(state_as_of(env, 2), broken) == without(expected_state(world), broken)
    assert (fine, newcomer) in current_state(env)
    run = last_run(env)
    assert (run["id"], run["status"], run["exit_code"]) == (2, "partial", 3)
    assert run["groups_failed"] == 1 and run["groups_synced"] == len(my_active_groups(world)) - 1
    failed = json.loads(run["failed_groups"])
    assert list(failed) == [broken] and f"HTTP {status}" in failed[broken]
    # 5xx is retried (bounded), 403/404 are final at once
    reads = env.sim.stats["faults"]["group_error"]
    assert reads == (MAX_RETRIES + 1 if status >= 500 else 1)
    # nothing about the broken group appears as a change of run 2
    assert not env.query("SELECT * FROM membership_changes WHERE run_id = 2 AND group_id = ?", [broken])

    env.sim.faults.clear()
    result = env.run("sync")
    assert result.returncode == 0, result.output
    assert current_state(env) == expected_state(world)
    assert state_as_of(env, 3) == expected_state(world)
    assert last_run(env)["status"] == "ok"
    old = {(r[0], r[1]): (r[3], r[4]) for r in before["memberships"]}
    new = {k: v for k, v in expected_state(world).items() if k[0] == broken}
    differences = len(set(old) ^ set(new)) + sum(1 for k in set(old) & set(new) if old[k] != new[k])
    assert differences >= 2
    assert env.query("SELECT count(*) FROM membership_changes WHERE run_id = 3 AND group_id = ?", [broken])[0][0] == differences


# ------------------------------------------------- 2. transient errors are retried


def test_transient_errors_and_timeouts_are_retried(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    g502, g503, g500, slow = my_active_groups(world)[:4]
    faults = env.sim.faults
    faults.set_group_error(g502, 502, times=1)  # an HTML gateway page, like nginx's
    faults.set_group_error(g503, 503, times=2)
    faults.set_group_error(g500, 500, times=1)
    faults.stall[slow] = 60  # the first read of `slow` never answers in time...

    def unstall() -> None:  # ...and the retry does: a timeout that passes
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not env.sim.stats["faults"].get("stall"):
            time.sleep(0.01)
        faults.stall.pop(slow, None)

    helper = threading.Thread(target=unstall, daemon=True)
    helper.start()
    result, elapsed = timed(env, "sync")
    helper.join()
    assert result.returncode == 0, result.output
    assert current_state(env) == expected_state(world)
    run = last_run(env)
    assert (run["status"], run["groups_failed"]) == ("ok", 0)

    stats = env.sim.stats
    assert stats["responses_by_status"].get("502") == 1
    assert stats["responses_by_status"].get("503") == 2
    assert stats["responses_by_status"].get("500") == 1
    assert stats["faults"] == {"group_error": 4, "stall": 1}
    retries = 1 + 2 + 1 + 1
    assert stats["requests"]["group"] == len(my_active_groups(world)) + retries
    # the stalled attempt cost one timeout (3 s in the test config); retries are bounded
    assert elapsed >= 3
    assert elapsed < 3 + _BACKOFF_MAX + _STARTUP


# --------------------------------------------------------- 3. 429 and Retry-After


@pytest.mark.parametrize("world", [(16, 4)], indirect=True)
def test_429_on_listing_is_honoured_and_halves_concurrency(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    assert len(my_active_groups(world)) == 16

    def sync_filling_the_limit(limit: int) -> Result:
        """A sync whose reads are held until ``limit`` of them are in flight at once."""
        env.sim.faults.hold_reads()
        proc = env.popen("sync")
        wait_for(lambda: env.sim.stats["in_flight_group_reads"] >= limit, what=f"{limit} reads in flight")
        env.sim.faults.release_reads()
        out, err = proc.communicate(timeout=60)
        conftest.record(out, err)
        return Result(proc.returncode, out, err)

    env.sim.reset_stats()
    assert sync_filling_the_limit(8).returncode == 0
    assert env.sim.stats["max_concurrent_group_reads"] == 8  # concurrency = 8 by default

    env.sim.reset_stats()
    env.sim.faults.rate_limit(1, retry_after=2)  # the next request: my_groups
    began = time.monotonic()
    result = sync_filling_the_limit(4)
    elapsed = time.monotonic() - began
    assert result.returncode == 0, result.output
    assert "Traceback" not in result.output
    stats = env.sim.stats
    assert stats["responses_429"] == 1 and stats["requests"]["my_groups"] == 2
    assert elapsed >= 2  # Retry-After honoured
    assert stats["max_concurrent_group_reads"] == 4  # halved after the 429
    assert stats["group_reads_ok"] == 16
    assert current_state(env) == expected_state(world)


@pytest.mark.parametrize("world", [(16, 4)], indirect=True)
def test_429_on_a_group_read_pauses_every_worker(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    env.sim.latency_ms = 400
    first = listing_order(world)[0]  # read in the first wave of 8
    env.sim.faults.set_group_error(first, 429, times=1)  # Retry-After: 1
    env.sim.reset_stats()
    with Sampler(env) as sampler:
        result = env.run("sync")
    assert result.returncode == 0, result.output
    assert env.sim.stats["responses_429"] == 1
    assert current_state(env) == expected_state(world)

    hit = next(at for at, _, n429 in sampler.samples if n429)
    # Reads that ended a moment before the 429 may start their next request before the
    # client has seen it; allowing 0.1 s for that, a read starting later than hit + 0.1
    # would still be in flight at hit + 0.5 (latency 0.4 s). None may start before the
    # Retry-After moment (hit + 1): every worker waits, not only the one that met the 429.
    quiet = [n for at, n, _ in sampler.samples if hit + 0.5 <= at <= hit + 0.9]
    assert quiet and max(quiet) == 0, quiet
    resumed = [n for at, n, _ in sampler.samples if at >= hit + 1]
    assert resumed and max(resumed) >= 1
    assert max(resumed) <= 4  # half of 8, and back up only after a streak of successes


def test_adaptive_limit_halves_pauses_and_recovers() -> None:
    limit = AdaptiveLimit(8)
    never = lambda: False  # noqa: E731
    assert all(limit.acquire(never) for _ in range(8)) and limit.in_flight == 8
    for _ in range(8):
        limit.release(ok=True)
    limit.throttled(0.3)
    assert (limit.limit, limit.rate_limited) == (4, 1)
    began = time.monotonic()
    assert limit.acquire(never)
    assert time.monotonic() - began >= 0.29  # everyone waits until the Retry-After moment
    for _ in range(3):
        assert limit.acquire(never)
    # the fifth slot waits while four are in flight
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(limit.acquire(never)))
    waiter.start()
    time.sleep(0.2)
    assert not got
    limit.release(ok=True)
    waiter.join(2)
    assert got == [True]
    for _ in range(4):
        limit.release(ok=True)
    # halving stops at one; a stop request ends a wait
    for _ in range(5):
        limit.throttled(0)
    assert limit.limit == 1
    assert limit.acquire(never)
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    assert limit.acquire(stop.is_set) is False
    limit.release(ok=True)
    # one step back up per RECOVER_AFTER successes, never above the maximum
    for _ in range(AdaptiveLimit.RECOVER_AFTER * 20):
        assert limit.acquire(never)
        limit.release(ok=True)
    assert limit.limit == 8
    # failures do not count towards the streak
    limit.throttled(0)
    for _ in range(AdaptiveLimit.RECOVER_AFTER * 2):
        assert limit.acquire(never)
        limit.release(ok=False)
    assert limit.limit == 4


def test_adaptive_limit_retry_check_only_observes() -> None:
    class Resp:
        def __init__(self, status: int, headers: dict[str, str]) -> None:
            self.status_code, self.headers = status, headers

    class Ctx:
        def __init__(self, response: Resp | None) -> None:
            self.response = response

    limit = AdaptiveLimit(8)
    assert limit.retry_check(Ctx(Resp(503, {"Retry-After": "5"}))) is RetryCheckResult.no_decision  # type: ignore[arg-type]
    assert limit.retry_check(Ctx(None)) is RetryCheckResult.no_decision  # type: ignore[arg-type]
    assert (limit.limit, limit.rate_limited) == (8, 0)
    began = time.monotonic()
    assert limit.retry_check(Ctx(Resp(429, {"Retry-After": "2"}))) is RetryCheckResult.no_decision  # type: ignore[arg-type]
    assert (limit.limit, limit.rate_limited) == (4, 1)
    assert limit._resume_at - began == pytest.approx(2, abs=0.1)
    # a second 429 during that pause is the same congestion: no second halving
    limit.retry_check(Ctx(Resp(429, {"Retry-After": "soon"})))  # type: ignore[arg-type]
    assert (limit.limit, limit.rate_limited) == (4, 2)
    # a huge Retry-After pauses the workers no longer than the SDK sleeps before its retry
    fresh = AdaptiveLimit(8)
    began = time.monotonic()
    fresh.retry_check(Ctx(Resp(429, {"Retry-After": "3600"})))  # type: ignore[arg-type]
    assert fresh._resume_at - began <= MAX_RETRY_SLEEP + 0.1


# -------------------------------------------------------------- 4. a read hangs


def test_hanging_read_ends_in_bounded_time_as_a_failed_group(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    assert env.run("sync").returncode == 0
    env.write_config(http_timeout="1s")
    hung = admin_groups(world)[0]
    before = group_rows(env, hung)
    world.remove_member(hung, others(world, hung)[0])  # not seen: the read never answers
    env.sim.faults.stall[hung] = 120
    env.sim.reset_stats()

    result, elapsed = timed(env, "sync")
    assert result.returncode == 3, result.output
    assert "Traceback" not in result.output
    assert elapsed >= (MAX_RETRIES + 1) * 1  # every attempt waited its timeout
    assert elapsed < worst_case_request(1) + _STARTUP  # and no more
    assert env.sim.stats["faults"]["stall"] == MAX_RETRIES + 1
    assert group_rows(env, hung) == before
    assert without(current_state(env), hung) == without(expected_state(world), hung)
    run = last_run(env)
    assert (run["status"], run["groups_failed"]) == ("partial", 1)
    assert "timeout" in json.loads(run["failed_groups"])[hung].lower()


# ------------------------------------------------- 5. access token rejected mid-run


@pytest.mark.parametrize("world", [(16, 4)], indirect=True)
def test_burst_of_401s_mid_run_costs_one_refresh(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    original = stored_token_data(env.tokens)["groups.api.globus.org"]
    env.sim.latency_ms = 400
    env.sim.reset_stats()
    proc = env.popen("sync")
    deadline = time.monotonic() + 30
    while env.sim.stats["in_flight_group_reads"] < 8 and time.monotonic() < deadline:
        time.sleep(0.005)
    env.sim.expire_access_tokens()  # all eight reads in flight now meet a 401
    out, err = proc.communicate(timeout=60)
    conftest.record(out, err)
    assert proc.returncode == 0, out + err
    stats = env.sim.stats
    assert stats["responses_by_status"].get("401", 0) >= 8
    assert stats["refresh_grants"] == 1
    assert current_state(env) == expected_state(world)

    renewed = stored_token_data(env.tokens)["groups.api.globus.org"]
    assert renewed["access_token"] != original["access_token"]
    assert renewed["access_token"] in env.sim.issued_tokens
    assert renewed["refresh_token"] == original["refresh_token"]
    assert renewed["expires_at_seconds"] >= original["expires_at_seconds"]
    # the stored token is the live one: the next run needs no refresh
    env.sim.latency_ms = 0
    env.sim.reset_stats()
    assert env.run("sync").returncode == 0
    assert env.sim.stats["refresh_grants"] == 0
    assert env.sim.stats["responses_by_status"].get("401", 0) == 0


class Worker:
    """One long-lived thread, as a group reader is: the authorizer remembers per thread."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)

    def __call__(self, fn: t.Callable[[], t.Any]) -> t.Any:
        return self._pool.submit(fn).result(timeout=30)


@pytest.fixture
def shared_authorizer(logged_in: Env, monkeypatch: pytest.MonkeyPatch) -> t.Iterator[t.Any]:
    """The authorizer `syncer sync` builds, in this process, against the simulator."""
    for key, value in logged_in.sim.env.items():
        monkeypatch.setenv(key, value)
    config = load_config(logged_in.config)
    with TokenStore(config.token_storage) as store:
        yield authorizer_from_store(config, store)


def test_retries_are_bounded_in_number_and_wait(
    logged_in: Env, shared_authorizer: t.Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Groups client built with syncer's settings: a Retry-After of a minute waits at
    most MAX_RETRY_SLEEP (shortened here), and the (MAX_RETRIES + 1)th 429 is final."""
    env = logged_in
    monkeypatch.setattr(syncer.globus.auth, "MAX_RETRY_SLEEP", 0.2)
    client = globus_sdk.GroupsClient(authorizer=shared_authorizer, **client_options(load_config(env.config)))
    env.sim.faults.rate_limit(MAX_RETRIES, retry_after=60)
    began = time.monotonic()
    assert client.get_my_groups().http_status == 200
    assert time.monotonic() - began < 20  # not 3 x 60 s, nor 3 x the SDK default of 10 s
    env.sim.faults.rate_limit(MAX_RETRIES + 1, retry_after=60)
    with pytest.raises(globus_sdk.GroupsAPIError) as refused:
        client.get_my_groups()
    assert refused.value.http_status == 429
    assert env.sim.stats["responses_429"] == 2 * MAX_RETRIES + 1


def test_401_for_an_already_renewed_token_does_not_renew_again(logged_in: Env, shared_authorizer: t.Any) -> None:
    env, authorizer = logged_in, shared_authorizer
    a, b = Worker(), Worker()
    env.sim.expire_access_tokens()
    env.sim.reset_stats()
    old = a(authorizer.get_authorization_header)
    assert b(authorizer.get_authorization_header) == old
    # A meets a 401 and renews
    assert a(authorizer.handle_missing_authorization) is True
    new = a(authorizer.get_authorization_header)
    assert new != old
    # B's 401 for the old token arrives after that: B just retries with the new token
    assert b(authorizer.handle_missing_authorization) is True
    assert b(authorizer.get_authorization_header) == new
    assert env.sim.stats["refresh_grants"] == 1
    assert stored_token_data(env.tokens)["groups.api.globus.org"]["access_token"] == new.split()[1]
    # a 401 for the current token renews again: the guard only skips stale 401s
    assert b(authorizer.handle_missing_authorization) is True
    assert a(authorizer.get_authorization_header) not in (old, new)
    assert env.sim.stats["refresh_grants"] == 2


def test_refused_refresh_token_is_asked_about_once(logged_in: Env, shared_authorizer: t.Any) -> None:
    env, authorizer = logged_in, shared_authorizer
    workers = [Worker() for _ in range(4)]
    for worker in workers:
        worker(authorizer.get_authorization_header)
    env.sim.expire_access_tokens()
    env.sim.revoke_all_refresh_tokens(status=400)
    env.sim.reset_stats()
    for worker in workers:
        worker(authorizer.handle_missing_authorization)
    for worker in workers:
        with pytest.raises(LoginRequired, match="syncer login"):
            worker(authorizer.get_authorization_header)
    assert env.sim.stats["refresh_grants_failed"] == 1


def sync_expiring_tokens(env: Env, when: str, in_flight: int) -> Result:
    """A sync whose access token Globus stops accepting "at start" or "mid-run" (once
    ``in_flight`` group reads are under way, each then meeting a 401)."""
    if when == "at start":
        env.sim.expire_access_tokens()
        return env.run("sync")
    env.sim.latency_ms = 300
    proc = env.popen("sync")
    deadline = time.monotonic() + 30
    while env.sim.stats["in_flight_group_reads"] < in_flight and time.monotonic() < deadline:
        time.sleep(0.005)
    env.sim.expire_access_tokens()
    out, err = proc.communicate(timeout=120)
    conftest.record(out, err)
    return Result(proc.returncode, out, err)


@pytest.mark.parametrize("world", [(16, 4)], indirect=True)
@pytest.mark.parametrize("when", ["at start", "mid-run"])
def test_globus_auth_down_when_the_token_needs_renewing_fails_the_run_once(logged_in: Env, when: str) -> None:
    """Auth answering 502 is one failure of the run (exit 1), not one per group read."""
    env, world = logged_in, logged_in.world
    assert env.run("sync").returncode == 0
    before = dump(env, exclude={"sync_runs"})
    world.add_member(admin_groups(world)[0])  # a change that must not be recorded
    env.sim.faults.token_error = 502
    env.sim.reset_stats()
    result = sync_expiring_tokens(env, when, in_flight=8)
    assert_clean_failure(result, 1, "could not renew the access token", "HTTP 502")
    # one refresh, with the SDK's own retries; not one per group
    assert 1 <= env.sim.stats["requests"]["token"] <= 5
    assert dump(env, exclude={"sync_runs"}) == before
    run = last_run(env)
    assert run["status"] == "failed" and "could not renew the access token" in run["error"]


# ------------------------------------------------------ 6. refresh token revoked


@pytest.mark.parametrize("when", ["at start", "mid-run"])
@pytest.mark.parametrize("status", [400, 401])
def test_revoked_refresh_token_exits_77_and_writes_only_the_run_row(logged_in: Env, status: int, when: str) -> None:
    env, world = logged_in, logged_in.world
    assert env.run("sync").returncode == 0
    before = dump(env, exclude={"sync_runs"})
    runs_before = dump(env)["sync_runs"]
    tokens_before = stored_token_data(env.tokens)
    for gid in admin_groups(world)[:2]:  # changes that must not be recorded
        world.add_member(gid)
        world.remove_member(gid, others(world, gid)[0])
    env.sim.revoke_all_refresh_tokens(status=status)
    env.sim.reset_stats()
    if when == "mid-run":
        env.write_config(concurrency=6)
    result = sync_expiring_tokens(env, when, in_flight=6)
    if when == "mid-run":
        assert env.sim.stats["responses_by_status"].get("401", 0) >= 6
    assert_clean_failure(result, 77, "syncer login")
    # a refused refresh token is asked about once, however many threads met a 401
    assert env.sim.stats["refresh_grants_failed"] == 1
    assert env.sim.stats["refresh_grants"] == 0
    assert dump(env, exclude={"sync_runs"}) == before
    runs = dump(env)["sync_runs"]
    assert runs[: len(runs_before)] == runs_before and len(runs) == len(runs_before) + 1
    run = last_run(env)
    assert (run["status"], run["exit_code"], run["changes"]) == ("failed", 77, 0)
    assert "syncer login" in run["error"]
    assert stored_token_data(env.tokens) == tokens_before  # kept: `syncer login` replaces them


# ---------------------------------------------------------- 7. malformed bodies


@pytest.mark.parametrize("kind", ["truncated", "memberships_not_list", "missing_identity_id"])
def test_unusable_group_body_fails_that_group_only(logged_in: Env, kind: str) -> None:
    env, world = logged_in, logged_in.world
    assert env.run("sync").returncode == 0
    bad, fine = admin_groups(world)[:2]
    before = group_rows(env, bad)
    world.add_member(bad)
    newcomer = world.add_member(fine)
    env.sim.faults.malformed[bad] = kind
    result = env.run("sync")
    assert result.returncode == 3, result.output
    assert "Traceback" not in result.output
    assert bad in result.stderr  # the warning names the group
    assert group_rows(env, bad) == before  # in particular: nobody recorded as removed
    assert without(current_state(env), bad) == without(expected_state(world), bad)
    assert (fine, newcomer) in current_state(env)
    run = last_run(env)
    assert (run["status"], run["groups_failed"]) == ("partial", 1)
    assert list(json.loads(run["failed_groups"])) == [bad]

    env.sim.faults.clear()
    assert env.run("sync").returncode == 0
    assert current_state(env) == expected_state(world)


def test_nulls_fail_the_group_and_are_never_recorded(logged_in: Env) -> None:
    """A null name or role breaks SPEC's rules for a group's document: the group is
    left as it was (no admin->NULL, no NULL->admin on the next clean run)."""
    env, world = logged_in, logged_in.world
    assert env.run("sync").returncode == 0
    gid = admin_groups(world)[0]
    before = group_rows(env, gid)
    env.sim.faults.malformed[gid] = "nulls"
    result = env.run("sync")
    assert result.returncode == 3, result.output
    assert "Traceback" not in result.output
    assert group_rows(env, gid) == before
    env.sim.faults.clear()
    assert env.run("sync").returncode == 0
    assert group_rows(env, gid)["membership_history"] == before["membership_history"]
    assert current_state(env) == expected_state(world)


def test_huge_non_ascii_and_sql_looking_text_is_stored_verbatim(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    gid = admin_groups(world)[0]
    victim = next(m for m in world.visible_memberships(gid) if m["identity_id"] != world.me)["identity_id"]
    env.sim.faults.malformed[gid] = "huge_names"
    result = env.run("sync")
    assert result.returncode == 0, result.output
    assert "Traceback" not in result.output
    assert len(_HUGE_TEXT) == 10_000 and not _HUGE_TEXT.isascii()
    name, description = env.query("SELECT name, description FROM groups WHERE id = ?", [gid])[0]
    assert name == _HUGE_TEXT
    assert description == f"{_SQL_TEXT} {_HUGE_TEXT[:200]}"
    row = env.query("SELECT * FROM memberships WHERE group_id = ? AND identity_id = ?", [gid, victim])[0]
    fields = json.loads(row["membership_fields"])
    assert fields["name"] == _HUGE_TEXT and fields["institution"] == _SQL_TEXT
    # identities (and so the memberships' usernames) keep one copy of what the groups
    # tell: here the huge one, or another group's
    ident = env.query("SELECT * FROM identities WHERE id = ?", [victim])[0]
    normal = world.identities[victim]
    assert (ident["name"], ident["institution"]) in {(_HUGE_TEXT, _SQL_TEXT), (normal["name"], normal["institution"])}
    assert row["username"] == ident["username"] in {f"{_SQL_TEXT}@example.org", normal["username"]}
    # the text was data, not SQL: every table is there and the state is the world's
    assert current_state(env) == expected_state(world)
    assert env.query("SELECT count(*) FROM memberships")[0][0] == len(expected_state(world))
    assert env.query("SELECT group_name FROM active_members WHERE group_id = ? LIMIT 1", [gid])[0][0] == _HUGE_TEXT
    status = env.run("status")
    assert status.returncode == 0 and "Traceback" not in status.output


# -------------------------------------------------------- 8. database problems


def test_database_folder_is_a_file(logged_in: Env) -> None:
    env = logged_in
    blocker = env.tmp / "afile"
    blocker.write_text("not a folder\n")
    env.write_config(database="afile/groups.db")
    result = env.run("sync")
    assert_clean_failure(result, 1, "afile")
    assert blocker.read_text() == "not a folder\n"
    status = env.run("status")
    assert status.returncode == 1 and "Traceback" not in status.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_database_folder_not_writable(logged_in: Env) -> None:
    env = logged_in
    folder = env.tmp / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        env.write_config(database="readonly/groups.db")
        result = env.run("sync")
        assert_clean_failure(result, 1, "readonly")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_database_is_not_sqlite(logged_in: Env) -> None:
    env = logged_in
    garbage = b"this is not a database\n" * 200
    env.database.write_bytes(garbage)
    result = env.run("sync")
    assert_clean_failure(result, 1, str(env.database), "not a database")
    assert env.database.read_bytes() == garbage
    status = env.run("status")
    assert status.returncode == 1 and "Traceback" not in status.output


@pytest.mark.parametrize("mode", ["EXCLUSIVE", "IMMEDIATE"])
def test_database_locked_beyond_busy_timeout(logged_in: Env, mode: str) -> None:
    env, world = logged_in, logged_in.world
    assert env.run("sync").returncode == 0
    before = dump(env)
    env.write_config(busy_timeout="1s")
    world.add_member(admin_groups(world)[0])
    holder = sqlite3.connect(env.database, isolation_level=None)
    try:
        holder.execute(f"BEGIN {mode}")
        result, elapsed = timed(env, "sync")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_clean_failure(result, 1, "database is locked")
    assert 1 <= elapsed < 1 + _STARTUP  # waited the busy timeout, then gave up
    assert dump(env) == before  # not even a run row: the database could not be written
    result = env.run("sync")
    assert result.returncode == 0, result.output
    assert current_state(env) == expected_state(world)


def test_busy_timeout_is_checked_like_any_key(env: Env) -> None:
    env.write_config(busy_timeout="soon")
    result = env.run("sync")
    assert_clean_failure(result, 78, str(env.config), "'busy_timeout'")
    assert not env.database.exists()


@pytest.fixture
def small_disk(env: Env) -> t.Iterator[Path]:
    # room for a first run (its migrations pass through the WAL), then filled by the test
    mount = env.tmp / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as fh:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                pass
    return filler


@pytest.mark.parametrize("free_kib", [0, 32])
def test_disk_full(logged_in: Env, small_disk: Path, free_kib: int) -> None:
    """Full at once (the run row cannot be written), or nearly (the run's changes cannot)."""
    env, world = logged_in, logged_in.world
    env.write_config(database="small/groups.db")
    database = small_disk / "groups.db"
    assert env.run("sync").returncode == 0
    env_db = on_database(env, database)
    before = dump(env_db, exclude={"sync_runs"})
    runs_before = dump(env_db)["sync_runs"]
    for gid in admin_groups(world):
        for _ in range(60):
            world.add_member(gid)
    filler = fill(small_disk)
    if free_kib:
        filler.unlink()
        filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - free_kib * 1024))

    result = env.run("sync")
    assert_clean_failure(result, 1, str(database), "database or disk is full")
    filler.unlink()
    assert dump(env_db, exclude={"sync_runs"}) == before
    assert env_db.query("PRAGMA integrity_check")[0][0] == "ok"
    runs = dump(env_db)["sync_runs"]
    assert runs[: len(runs_before)] == runs_before
    if free_kib:  # the run row made it, its changes did not: it says why
        assert len(runs) == len(runs_before) + 1
        run = last_run(env_db)
        assert (run["status"], run["exit_code"], run["changes"]) == ("failed", 1, 0)
        assert "full" in run["error"]
    else:
        assert runs == runs_before
    result = env.run("sync")
    assert result.returncode == 0, result.output
    assert current_state(env_db) == expected_state(world)


def on_database(env: Env, database: Path) -> Env:
    class Moved(Env):
        @property
        def database(self) -> Path:  # type: ignore[override]
            return database

    return Moved(tmp=env.tmp, sim=env.sim, world=env.world, vars=env.vars)


# ---------------------------------------------------------- 9. bad configuration


BAD_CONFIGS = {
    "invalid TOML": ("interval = [\n", ["invalid TOML"]),
    "unknown key": ('colour = "blue"\n', ["unknown key 'colour'"]),
    "wrong type": ('concurrency = "many"\n', ["'concurrency'", "whole number"]),
    "bad duration": ("http_timeout = true\n", ["'http_timeout'"]),
    "out of range": ("concurrency = 0\n", ["'concurrency'"]),
    "not a group id": ('groups = ["nope"]\n', ["'groups'"]),
    "not UTF-8": (b"interval = '\xff'\n", ["not UTF-8"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configuration_exits_78_and_writes_nothing(env: Env, case: str) -> None:
    text, fragments = BAD_CONFIGS[case]
    if isinstance(text, bytes):
        env.config.write_bytes(text)
    else:
        env.config.write_text(text)
    for command in ("sync", "status"):
        result = env.run(command)
        assert_clean_failure(result, 78, str(env.config), *fragments)
    assert not env.database.exists() and not env.tokens.exists()


def test_bad_configuration_leaves_an_existing_database_unchanged(logged_in: Env) -> None:
    env = logged_in
    assert env.run("sync").returncode == 0
    database, tokens = env.database.read_bytes(), env.tokens.read_bytes()
    env.world.add_member(admin_groups(env.world)[0])
    good = env.config.read_text()
    folder = env.tmp / "conf.d"
    folder.mkdir()
    cases: list[tuple[list[str], t.Callable[[], None], list[str]]] = [
        (["sync"], lambda: env.config.write_text(good + 'colour = "blue"\n'), [str(env.config), "'colour'"]),
        (["--config", str(folder), "sync"], lambda: None, [str(folder), "folder"]),
        (["--config", str(env.tmp / "missing.toml"), "sync"], lambda: None, [str(env.tmp / "missing.toml"), "not found"]),
    ]
    for args, prepare, fragments in cases:
        prepare()
        result = env.run(*args)
        assert_clean_failure(result, 78, *fragments)
    env.config.write_text(good)
    env.vars["SYNCER_CONCURRENCY"] = "lots"
    try:
        result = env.run("sync")
    finally:
        del env.vars["SYNCER_CONCURRENCY"]
    assert_clean_failure(result, 78, "SYNCER_CONCURRENCY")
    assert env.database.read_bytes() == database and env.tokens.read_bytes() == tokens


# ------------------------------------------------------ 10. concurrent syncs


def test_two_syncs_at_once_one_proceeds_other_exits_75(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    env.sim.faults.hold_reads()  # whichever takes the lock keeps it until released
    procs = [env.popen("sync") for _ in range(2)]
    ended = lambda: [i for i, proc in enumerate(procs) if proc.poll() is not None]  # noqa: E731
    [loser] = wait_for(ended, what="one of the two syncs to end")
    assert procs[1 - loser].poll() is None  # it did not wait for the other
    env.sim.faults.release_reads()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        conftest.record(out, err)
        results.append(Result(proc.returncode, out, err))
    assert results[1 - loser].returncode == 0, results[1 - loser].output
    assert_clean_failure(results[loser], 75, "another sync is running")
    assert [tuple(r) for r in env.query("SELECT id, status FROM sync_runs")] == [(1, "ok")]
    assert current_state(env) == expected_state(world)
    assert not open_history_duplicates(env)


def test_sync_beside_the_daemon(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    env.sim.faults.hold_reads()  # the daemon's first run holds the lock until released
    daemon = env.popen("run", "--interval", "1s")
    try:
        wait_for(lambda: env.sim.stats["faults"].get("held"), what="the daemon's first run")
        result = env.run("sync")
        assert_clean_failure(result, 75, "another sync is running")
        assert env.sim.faults.reads_held  # it did not wait for the daemon's run
        env.sim.faults.release_reads()
        # keep going beside the daemon, changing the world as we go: each sync either
        # runs or finds the daemon running
        env.sim.latency_ms = 100
        for i in range(4):
            gid = admin_groups(world)[i % 3]
            world.add_member(gid)
            world.set_role(gid, others(world, gid)[0], ["member", "manager"][i % 2])
            result = env.run("sync")
            assert result.returncode in (0, 75), result.output
            assert "Traceback" not in result.output
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=20)
        conftest.record(out, err)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    assert env.run("sync").returncode == 0  # the last changes, whoever read them before
    assert daemon.returncode == 0, err
    assert "Traceback" not in out + err
    assert current_state(env) == expected_state(world)
    assert not open_history_duplicates(env)
    assert env.query(
        "SELECT count(*) = count(DISTINCT group_id || '/' || identity_id) FROM memberships"
    )[0][0] == 1
    statuses = {r[0] for r in env.query("SELECT status FROM sync_runs")}
    assert statuses <= {"ok", "aborted"}, statuses
    assert env.query("PRAGMA integrity_check")[0][0] == "ok"
    # every recorded state of the history is a state the world was in: no run applied twice
    for (run_id,) in env.query("SELECT id FROM sync_runs WHERE status = 'ok'"):
        assert len(state_as_of(env, run_id)) == env.query(
            "SELECT memberships FROM sync_runs WHERE id = ?", [run_id]
        )[0][0]


# --------------------------------------------------------------- 11. secrets


def test_no_token_ever_appears_in_outputs_or_database(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    assert stat.S_IMODE(env.tokens.stat().st_mode) == 0o600
    outputs: list[str] = []

    def run(*args: str) -> Result:
        result = env.run(*args, process=True)  # all a process prints, warnings at exit included
        outputs.append(result.stdout + result.stderr)
        return result

    assert run("-vv", "sync").returncode == 0
    env.sim.expire_access_tokens()  # a refresh, with its new token, at full debug
    assert run("-vv", "--log-format", "json", "sync").returncode == 0
    assert env.sim.stats["refresh_grants"] == 1
    env.sim.faults.set_group_error(admin_groups(world)[0], 500)
    assert run("-vv", "sync").returncode == 3
    env.sim.faults.clear()
    for args in (("status",), ("status", "--json"), ("-vv", "status", "--json")):
        assert run(*args).returncode in (0, 3)
    env.sim.expire_access_tokens()
    env.sim.revoke_all_refresh_tokens(status=401)
    assert run("-vv", "--log-format", "json", "sync").returncode == 77
    assert run("-vv", "status").returncode == 77
    assert stat.S_IMODE(env.tokens.stat().st_mode) == 0o600

    tokens = set(env.sim.issued_tokens) | conftest.ISSUED_TOKENS
    assert len(env.sim.issued_tokens) >= 3  # code, refresh token, two access tokens
    stored = {v for d in stored_token_data(env.tokens).values() for k, v in d.items() if k.endswith("token") and v}
    assert stored and stored <= tokens
    debug = "\n".join(outputs)
    assert "DEBUG" in debug or '"level": "debug"' in debug  # the scan covers debug output
    for token in tokens:
        for i, text in enumerate(outputs):
            assert token not in text, f"a token appeared in output {i}"
    blobs = [p.read_bytes() for p in env.tmp.iterdir() if p.is_file() and p.name.startswith("groups.db")]
    assert blobs
    for token in tokens:
        for blob in blobs:
            assert token.encode() not in blob, "a token appeared in the database file"
        errors = [r[0] for r in env.query("SELECT error FROM sync_runs WHERE error IS NOT NULL")]
        assert errors and all(token not in e for e in errors)


def test_group_with_session_policy_fails_alone_without_refreshing(logged_in: Env) -> None:
    """A 401 asking for a fresh session (high-assurance group) fails that group, not the login."""
    env = logged_in
    assert env.run("sync").returncode == 0
    before = current_state(env)
    guarded, fine = admin_groups(env.world)[:2]
    env.sim.faults.session_required.add(guarded)
    newcomer = env.world.add_member(fine)
    grants = env.sim.stats["refresh_grants"]
    result = env.run("sync")
    assert result.returncode == 3, result.output
    assert "Globus asks for a new login session" in result.stderr
    assert env.sim.stats["refresh_grants"] == grants  # no token renewal for a session problem
    state = current_state(env)
    assert {k: v for k, v in state.items() if k[0] == guarded} == {k: v for k, v in before.items() if k[0] == guarded}
    assert (fine, newcomer) in state
