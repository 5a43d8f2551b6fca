"""Crash safety and long-running correctness, against the simulator over HTTP.

* kill -9 trials: ``syncer sync`` is SIGKILLed at moments spread over a whole run
  (start-up, the token refresh and its write to tokens.db, the group list, the
  fetch, the final apply transaction, the exit), and after every kill the databases must be intact
  (read at once, read-only, as any reader would), no run may be half visible, the token
  store must still hold a refresh token, and the next ``syncer sync`` must recover exactly
  to the world.
* soak: ``benchmarks/soak.py`` for ~20 s: ``syncer run --interval 1s`` while the
  world changes and ~10% of group reads fail; the recorded history must equal what
  the simulator served, read by read, and memory must stay flat.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest
from conftest import Env, record
from helpers import current_state, expected_state, state_as_of, stored_tokens

from syncer.simulator import World

ROOT = Path(__file__).resolve().parent.parent

# Big enough (10,000 memberships) that the final apply transaction takes a measurable
# time (~60 ms), small enough that a run takes ~1 s and 29 trials fit in under a minute.
GROUPS, MEMBERS = 200, 50
CHANGES_PER_TRIAL = 150
LATENCY_MS = 20  # lengthens the fetch (8 reads in flight: ~0.5 s more)
UNIFORM_TRIALS = 20  # kills at stratified random fractions of an uninterrupted run
APPLY_WATCHED_TRIALS = 3  # kills 0-30 ms after the apply transaction's journal appears
WATCHED_CHANGES_FACTOR = 20  # those runs change far more: a commit long enough to be killed mid-way
TOKEN_LOCKED_TRIALS = 3  # kills while the token write waits for its commit lock
APPLY_HELD_TRIALS = 3  # kills while the run's transaction is open, half its groups applied, the rest held
# groups.db is a WAL database: between runs its -wal is empty; a run's commit writes its
# pages there (MiBs here), far more than its row's own transaction
WAL_APPLY_BYTES = 64 * 1024


@pytest.fixture
def world(request: pytest.FixtureRequest) -> World:
    """conftest's small world, or (groups, members) given by indirect parametrization."""
    groups, members = getattr(request, "param", (6, 8))
    return World.generate(groups=groups, members=members, seed=20240 if groups > 6 else 11)


# ----------------------------------------------------------------- kill -9 trials


def _journal(path: Path) -> Path:
    return path.with_name(path.name + "-journal")


def _wal(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def _wal_size(path: Path) -> int:
    try:
        return _wal(path).stat().st_size
    except FileNotFoundError:
        return 0


def _uncommitted_frames(path: Path) -> int:
    """Frames in the WAL after its last commit (a killed transaction's pages): every
    reader ignores them. Frames of this WAL generation carry its header's salts."""
    data = _wal(path).read_bytes() if _wal(path).exists() else b""
    if len(data) < 32:
        return 0
    page_size = int.from_bytes(data[8:12], "big")
    salts = data[16:24]
    after_commit = 0
    for offset in range(32, len(data) - 24 - page_size + 1, 24 + page_size):
        header = data[offset:offset + 24]
        if header[8:16] != salts:
            break
        after_commit = 0 if int.from_bytes(header[4:8], "big") else after_commit + 1
    return after_commit


def _expire_access_token(env: Env) -> None:
    """Make the stored access token expired, as Globus's would be after 48 hours.

    The next run then renews it before its first request (no 401, no retry backoff),
    and writes the renewed tokens to tokens.db.
    """
    conn = sqlite3.connect(env.tokens)
    try:
        with conn:
            for rowid, text in conn.execute("SELECT rowid, token_data_json FROM token_storage").fetchall():
                data = json.loads(text)
                data["expires_at_seconds"] = int(time.time()) - 1
                conn.execute("UPDATE token_storage SET token_data_json = ? WHERE rowid = ?", [json.dumps(data), rowid])
    finally:
        conn.close()
    env.sim.expire_access_tokens()  # and Globus agrees


def _max_run(env: Env) -> int:
    return env.query("SELECT coalesce(max(id), 0) FROM sync_runs")[0][0]


def _timeline(env: Env) -> dict[str, float]:
    """Run one uninterrupted sync and note when each phase happened (seconds from spawn).

    Watches files only (no database reads that could slow the writer): the token
    store's mtime changes when the refresh is written; the WAL of groups.db grows by
    MiBs when the apply transaction commits, and is emptied by the closing checkpoint.
    """
    token_mtime = env.tokens.stat().st_mtime_ns
    marks: dict[str, float] = {}
    began = time.monotonic()
    proc = env.popen("sync")
    while proc.poll() is None:
        now = time.monotonic() - began
        if "token" not in marks and env.tokens.stat().st_mtime_ns != token_mtime:
            marks["token"] = now
        size = _wal_size(env.database)
        if "apply_start" not in marks and size > WAL_APPLY_BYTES and "token" in marks:
            marks["apply_start"] = now
        if "apply_start" in marks and "apply_end" not in marks and size == 0:
            marks["apply_end"] = now  # committed and checkpointed
        time.sleep(0.005)
    marks["exit"] = time.monotonic() - began
    out, err = proc.communicate()
    record(out, err)
    assert proc.returncode == 0, out + err
    return marks


def _hold_read_lock(path: Path) -> sqlite3.Connection:
    """Open a read transaction: in rollback-journal mode a writer's COMMIT now waits."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    return conn


def _wait_for(predicate: t.Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.001)
    return False


def _run_row_running(env: Env, after: int) -> bool:
    try:
        return bool(env.query("SELECT 1 FROM sync_runs WHERE id > ? AND status = 'running'", [after]))
    except sqlite3.OperationalError:  # database not created yet, or locked
        return False


def _kill(env: Env, how: str, delay: float, last_run: int) -> tuple[subprocess.Popen[str], bool]:
    """Start `syncer sync` and SIGKILL it as ``how`` says; True if the kill came before exit."""
    lock = None
    if how == "token-locked":
        lock = _hold_read_lock(env.tokens)
    began = time.monotonic()
    proc = env.popen("sync")
    try:
        if how == "token-locked":
            # the refresh has written its rollback journal and waits to commit
            assert _wait_for(lambda: _journal(env.tokens).exists(), proc), "token write never started"
        elif how == "apply-held":
            # every read in flight waits: the run's transaction is open, the groups before applied
            assert _wait_for(lambda: env.sim.stats["faults"].get("held", 0) >= 8, proc), "reads never held"
            assert _wait_for(lambda: _run_row_running(env, last_run), proc), "run never started"
        elif how == "apply-watched":
            # the run row's own commit is a few pages in the WAL: wait for the row
            # first, then for the apply's commit to fill the WAL, and kill it in its stride
            assert _wait_for(lambda: _run_row_running(env, last_run), proc), "run never started"
            assert _wait_for(lambda: _wal_size(env.database) > WAL_APPLY_BYTES, proc), "apply never started"
            time.sleep(delay)
        else:
            remaining = began + delay - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        env.sim.faults.release_reads()
        if lock is not None:
            lock.rollback()
            lock.close()
    return proc, alive


def _check_after_kill(env: Env, before_tokens: dict[str, t.Any], last_run: int) -> str:
    """Every invariant that must hold right after a SIGKILL; returns the phase it hit."""
    hot_groups = _uncommitted_frames(env.database) > 0
    hot_tokens = _journal(env.tokens).exists()

    # read-only, at once, as any reader: nothing to roll back, the killed run's frames ignored
    conn = sqlite3.connect(f"file:{env.database}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        runs = conn.execute("SELECT id, status, changes, memberships FROM sync_runs ORDER BY id").fetchall()
        first_recorded = next((run["id"] for run in runs if run["status"] in ("ok", "partial")), None)
        for run in runs:
            touched = conn.execute(
                "SELECT count(*) FROM membership_history WHERE from_run = :k OR to_run = :k", {"k": run["id"]}
            ).fetchone()[0]
            if run["status"] in ("ok", "partial"):
                # its rows are all there: the events it counted at commit time, and
                # for the first run that recorded anything, a version of every membership it read
                counted = conn.execute(
                    "SELECT count(*) FROM membership_changes WHERE run_id = :k AND reason IN ('joined', 'left', 'changed')",
                    {"k": run["id"]},
                ).fetchone()[0]
                assert counted == run["changes"], f"run {run['id']} is half visible"
                if run["id"] == first_recorded:
                    assert touched == run["memberships"], f"run {run['id']} is half visible"
            else:
                assert touched == 0, f"run {run['id']} ({run['status']}) left history rows"
        # current state and open history versions describe the same thing
        current = {
            (r[0], r[1]): (r[2], r[3])
            for r in conn.execute("SELECT group_id, identity_id, role, status FROM memberships")
        }
        open_versions = {
            (r[0], r[1]): (r[2], r[3])
            for r in conn.execute("SELECT group_id, identity_id, role, status FROM membership_history"
                                  " WHERE to_run IS NULL")
        }
        assert current == open_versions
        killed = conn.execute("SELECT status FROM sync_runs WHERE id > ?", [last_run]).fetchall()
    finally:
        conn.close()

    tconn = sqlite3.connect(env.tokens)
    try:
        assert tconn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        tconn.close()
    tokens = stored_tokens(env.tokens)
    assert tokens["refresh"] == before_tokens["refresh"]
    renewed = tokens["access"] != before_tokens["access"]

    # A run talks to Globus first (token renewal, the group list, the first reads) and
    # writes its `running` row once its reads are under way.
    if not killed:
        if hot_tokens:
            return "token-write"
        return "listing" if renewed else "startup"
    status = killed[0]["status"]
    if status in ("ok", "partial"):
        return "after-commit"
    assert status == "running", status
    assert renewed and not hot_tokens  # the token was renewed and stored before the row
    if hot_groups:
        return "db-write"
    return "fetch"


@pytest.mark.slow
@pytest.mark.parametrize("world", [(GROUPS, MEMBERS)], indirect=True, ids=[f"{GROUPS}x{MEMBERS}"])
def test_kill_9_at_any_moment_leaves_consistent_databases(logged_in: Env) -> None:
    env, sim, world = logged_in, logged_in.sim, logged_in.world
    rng = random.Random(7)
    sim.latency_ms = LATENCY_MS
    first = env.run("sync")
    assert first.returncode == 0, first.output

    # every run below starts with an expired access token: it renews it (refresh
    # grant, tokens.db write) before it lists and fetches the groups
    for _ in range(3):  # a busy machine may hide a phase from the 5 ms polling: again
        world.random_changes(CHANGES_PER_TRIAL, rng)
        _expire_access_token(env)
        marks = _timeline(env)
        if {"token", "apply_start", "apply_end"} <= set(marks):
            break
    assert {"token", "apply_start", "apply_end"} <= set(marks), marks
    duration = marks["exit"]
    apply_window = (marks["apply_start"], marks["apply_end"])

    plan: list[tuple[str, float]] = [
        ("timed", (i + rng.random()) / UNIFORM_TRIALS * duration) for i in range(UNIFORM_TRIALS)
    ]
    plan += [("apply-watched", (i + 0.5) / APPLY_WATCHED_TRIALS * 0.03) for i in range(APPLY_WATCHED_TRIALS)]
    plan += [("token-locked", 0.0)] * TOKEN_LOCKED_TRIALS + [("apply-held", 0.0)] * APPLY_HELD_TRIALS
    groups = sorted(world.groups)

    phases: collections.Counter[str] = collections.Counter()
    landed: list[tuple[str, float, str]] = []
    for how, delay in plan:
        # a commit of unchanged groups is short (their digests skip the diff): the
        # trials that kill it in its stride give it many changes to write
        world.random_changes(CHANGES_PER_TRIAL * (WATCHED_CHANGES_FACTOR if how == "apply-watched" else 1), rng)
        _expire_access_token(env)
        before_tokens = stored_tokens(env.tokens)
        last_run = _max_run(env)
        if how == "apply-held":
            sim.reset_stats()
            sim.faults.hold_reads(except_groups=groups[: len(groups) // 2])

        proc, alive = _kill(env, how, delay, last_run)
        out, err = proc.communicate()
        record(out, err)
        phase = _check_after_kill(env, before_tokens, last_run)
        if not alive:
            phase = "exited"  # the run finished before the kill came
        phases[phase] += 1
        landed.append((how, round(delay, 3), phase))
        if how == "token-locked":
            assert phase == "token-write", landed[-1]
        if how == "apply-held":
            assert phase in ("fetch", "db-write"), landed[-1]

        sim.latency_ms = 0  # the recovery need not be slow
        recovery = env.run("sync")
        sim.latency_ms = LATENCY_MS
        assert recovery.returncode == 0, recovery.output
        killed = env.query("SELECT id, status FROM sync_runs WHERE id > ? ORDER BY id", [last_run])
        recovered_id = killed[-1]["id"]
        if phase in ("fetch", "db-write"):
            assert [r["status"] for r in killed] == ["aborted", "ok"], (landed[-1], [tuple(r) for r in killed])
            assert env.query(
                "SELECT count(*) FROM membership_history WHERE from_run = ? OR to_run = ?",
                [killed[0]["id"], killed[0]["id"]],
            )[0][0] == 0
        else:
            assert all(r["status"] == "ok" for r in killed), (landed[-1], [tuple(r) for r in killed])
        expected = expected_state(world)
        assert current_state(env) == expected
        assert state_as_of(env, recovered_id) == expected
        # the closing checkpoint emptied the WAL: the files stay for readers, 0 bytes
        assert _wal_size(env.database) == 0 and _wal(env.database).exists() and not _journal(env.tokens).exists()

    print(
        f"\nkill -9 trials: {len(plan)} (uninterrupted run {duration:.2f}s; token written at"
        f" {marks['token']:.2f}s; apply {apply_window[0]:.2f}-{apply_window[1]:.2f}s)"
        f"\n  landed: {dict(sorted(phases.items()))}"
        f"\n  trials: {landed}"
    )
    # the kills really spread over the run
    # (the watched trials aim at the commit's stride, but whether a kill lands inside
    # that window is the machine's timing: it is not asserted; each kill that did is
    # checked like every other)
    assert phases["listing"] + phases["fetch"] >= 3  # reading Globus, before and after the row
    assert phases["fetch"] >= APPLY_HELD_TRIALS
    assert phases["token-write"] >= TOKEN_LOCKED_TRIALS
    assert len(plan) >= 20


# ------------------------------------------------------------- token renewal


@pytest.mark.parametrize(
    "rate_limited, retry_after, revoke_at",
    [(1, 2, 1.0), (3, 1, 2.8)],
    ids=["401-on-a-retry", "401-on-the-last-attempt"],
)
def test_token_rejected_while_a_request_waits_to_retry_is_renewed(
    logged_in: Env, rate_limited: int, retry_after: int, revoke_at: float
) -> None:
    """A 401 on a retry (first answers 429, token revoked meanwhile) renews the token.

    The SDK renews only when a request's first answer is a 401; without syncer's own
    fresh request this run ended as "login required" (77) with a valid refresh token,
    and a daemon stopped for good. Found by the soak; the second case has the 401 come
    on the request's last attempt.
    """
    env, sim = logged_in, logged_in.sim
    sim.faults.rate_limit(rate_limited, retry_after=retry_after)  # my_groups answers 429 first
    timer = threading.Timer(revoke_at, sim.expire_access_tokens)  # Globus drops the token meanwhile
    timer.start()
    try:
        result = env.run("sync")
    finally:
        timer.cancel()
    assert result.returncode == 0, result.output
    assert sim.stats["refresh_grants"] == 1
    assert current_state(env) == expected_state(env.world)


def test_refused_refresh_token_is_still_login_required(logged_in: Env) -> None:
    """The extra renewals never hide a refresh token Globus Auth refuses: 77, one try."""
    env, sim = logged_in, logged_in.sim
    assert env.run("sync").returncode == 0
    sim.expire_access_tokens()
    sim.revoke_all_refresh_tokens()
    result = env.run("sync")
    assert result.returncode == 77, result.output
    assert sim.stats["refresh_grants_failed"] == 1


# ------------------------------------------------------------------------ soak


def _load_soak() -> t.Any:
    spec = importlib.util.spec_from_file_location("syncer_soak", ROOT / "benchmarks" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_soak_history_equals_what_was_served(tmp_path: Path) -> None:
    soak = _load_soak()
    # revoking every 6 s (besides the 70 s tokens' own renewals) makes >= 2 renewals sure
    report = soak.run_soak(20, revoke_every=6, workdir=tmp_path / "soak", say=lambda s: None)
    record(report.stdout, report.stderr)
    print("\n" + report.summary())
    assert report.daemon_exit == 0 and report.stop_seconds is not None and report.stop_seconds < 10
    assert report.left_running == 0
    assert report.mismatches == 0, report.mismatch_examples
    assert report.half_runs == 0 and report.unaccounted_runs == 0
    counted = report.statuses.get("ok", 0) + report.statuses.get("partial", 0)
    assert counted >= 5, report.statuses
    assert set(report.statuses) <= {"ok", "partial", "aborted", "failed"}
    assert report.statuses.get("aborted", 0) <= 1  # only the run SIGTERM cut short
    assert report.reads_matched >= 100
    assert sum(report.faults.values()) > 0 and report.world_changes > 0
    assert report.token_refreshes >= 2
    assert report.secrets_leaked == 0 and report.tracebacks == 0
    assert report.memory_ok, (report.rss_first_mib, report.rss_last_mib)
    assert report.ok
