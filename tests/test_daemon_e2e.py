"""End to end: `syncer run`, the scheduler daemon, as systemd or a user runs it."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import globus_sdk
import pytest
from conftest import Env, record
from helpers import NotifyListener, current_state, expected_state, stored_tokens, wait_for


def runs(env: Env) -> list[sqlite3.Row]:
    """The runs recorded so far (none while the first run is still creating the database)."""
    if not env.database.exists() or not env.query("SELECT 1 FROM sqlite_master WHERE name = 'sync_runs'"):
        return []
    return env.query("SELECT * FROM sync_runs ORDER BY id")


def finished_runs(env: Env) -> int:
    return sum(1 for r in runs(env) if r["status"] in ("ok", "partial"))


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, str, str, float]:
    began = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    record(out, err)
    return proc.returncode, out, err, time.monotonic() - began


def assert_no_half_run(env: Env) -> None:
    conn = env.db()
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        for run in conn.execute("SELECT id, status FROM sync_runs"):
            touched = conn.execute(
                "SELECT count(*) FROM membership_history WHERE from_run = ? OR to_run = ?", [run["id"], run["id"]]
            ).fetchone()[0]
            if run["status"] not in ("ok", "partial"):
                assert touched == 0, f"run {run['id']} ({run['status']}) left history rows"
        assert not conn.execute("SELECT 1 FROM sync_runs WHERE status = 'running'").fetchall()
    finally:
        conn.close()


def test_run_snapshots_repeatedly_and_picks_up_changes(logged_in: Env) -> None:
    env = logged_in
    daemon = env.popen("run", "--interval", "2s")
    try:
        wait_for(lambda: finished_runs(env) >= 1, what="first run")
        newcomer = env.world.add_member(next(iter(env.world.groups)))
        wait_for(lambda: finished_runs(env) >= 3, timeout=30, what="three runs")
        code, _out, err, elapsed = stop(daemon)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert code == 0, err
    assert elapsed < 10
    assert current_state(env) == expected_state(env.world)
    added = env.query("SELECT run_id FROM membership_changes WHERE identity_id = ? AND change = 'added'", [newcomer])
    assert len(added) == 1 and added[0][0] >= 2
    starts = [r["started_at"] for r in runs(env)]
    assert starts == sorted(starts)
    assert_no_half_run(env)
    # one summary line per run, and APScheduler's per-run chatter kept out
    assert err.count("INFO syncer.sync: run ") == finished_runs(env)
    assert "apscheduler" not in err


def test_sigterm_while_idle_exits_0_quickly(logged_in: Env) -> None:
    env = logged_in
    daemon = env.popen("run", "--interval", "1h")
    wait_for(lambda: finished_runs(env) >= 1, what="first run")
    time.sleep(0.3)
    code, _out, err, elapsed = stop(daemon)
    assert code == 0, err
    assert elapsed < 10
    assert [r["status"] for r in runs(env)] == ["ok"]
    assert_no_half_run(env)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_during_a_slow_run_leaves_no_half_run(logged_in: Env, sig: int) -> None:
    env = logged_in
    assert env.run("sync").returncode == 0
    before = current_state(env)
    env.world.add_member(next(iter(env.world.groups)))  # a change the cancelled run must not record
    env.write_config(concurrency=1)
    env.sim.latency_ms = 1500
    daemon = env.popen("run", "--interval", "1h")
    wait_for(lambda: any(r["status"] == "running" for r in runs(env)), what="the slow run to start")
    time.sleep(1.0)
    code, _out, err, elapsed = stop(daemon, sig)
    assert code == 0, err
    assert elapsed < 10
    assert [r["status"] for r in runs(env)] == ["ok", "aborted"]
    assert current_state(env) == before
    assert_no_half_run(env)


@pytest.mark.parametrize("command", [("run", "--interval", "1h"), ("sync",)])
def test_stop_while_listing_the_groups_does_not_wait_for_globus(logged_in: Env, command: tuple[str, ...]) -> None:
    """A stalled my_groups request must not hold a stop past systemd's grace."""
    env = logged_in
    env.write_config(http_timeout="60s")
    env.sim.latency_ms = 20_000  # every request, my_groups included, answers after 20 s
    proc = env.popen(*command)
    wait_for(lambda: env.sim.stats["in_flight_requests"] >= 1, what="the my_groups request")
    code, _out, err, elapsed = stop(proc)
    assert elapsed < 5, err
    assert "Traceback" not in err
    assert code == (0 if command[0] == "run" else 1), err
    assert [(r["status"], r["error"]) for r in runs(env)] == [
        ("aborted", "stopped while listing the groups; nothing was recorded")
    ]


def test_manual_sync_beside_the_daemon_gets_75(logged_in: Env) -> None:
    env = logged_in
    env.sim.faults.hold_reads()  # the daemon's run holds the lock until released
    daemon = env.popen("run", "--interval", "1h")
    try:
        wait_for(lambda: env.sim.stats["faults"].get("held"), what="the daemon's run")
        wait_for(lambda: runs(env), what="the daemon's run row")
        manual = env.run("sync")
        assert manual.returncode == 75, manual.output
        assert env.sim.faults.reads_held and not finished_runs(env)  # it did not wait for the daemon's run
        env.sim.faults.release_reads()
        wait_for(lambda: finished_runs(env) >= 1, what="the daemon's run to finish")
    finally:
        code, _out, err, _ = stop(daemon)
    assert code == 0, err
    assert len(runs(env)) == 1


def test_daemon_skips_a_tick_while_a_manual_sync_runs(logged_in: Env) -> None:
    env = logged_in
    env.sim.faults.hold_reads()  # the manual run holds the lock until released
    manual = env.popen("sync")
    wait_for(lambda: env.sim.stats["faults"].get("held"), what="the manual run")
    daemon = env.popen("run", "--interval", "1h")
    assert daemon.stderr is not None
    watchdog = threading.Timer(60, daemon.kill)  # should the message never come
    watchdog.start()
    skipped = next((line for line in daemon.stderr if "another sync holds the lock" in line), None)
    watchdog.cancel()
    env.sim.faults.release_reads()
    _out, err = manual.communicate(timeout=60)
    assert manual.returncode == 0, err
    code, _dout, derr, _ = stop(daemon)
    assert code == 0
    assert skipped, derr
    assert len(runs(env)) == 1


@pytest.mark.parametrize("status", [400, 401])
def test_revoked_refresh_token_stops_the_daemon_with_77(logged_in: Env, status: int, tmp_path: Path) -> None:
    env = logged_in
    listener = NotifyListener(tmp_path / "notify.sock")
    env.vars["NOTIFY_SOCKET"] = listener.address
    daemon = env.popen("run", "--interval", "1s")
    wait_for(lambda: finished_runs(env) >= 1, what="first run")
    env.sim.revoke_all_refresh_tokens(status=status)
    env.sim.expire_access_tokens()
    out, err = daemon.communicate(timeout=30)
    record(out, err)
    listener.collect_until(lambda: bool(listener.received("STOPPING=1")), timeout=5)
    listener.close()
    assert daemon.returncode == 77, err
    # `systemctl status` keeps the last STATUS=: the reason, not "stopping"
    statuses = [line for m in listener.messages for line in m.splitlines() if line.startswith("STATUS=")]
    assert statuses[-1].startswith("STATUS=login required") and "syncer login" in statuses[-1], statuses
    assert "syncer login" in err
    assert env.sim.stats["refresh_grants"] <= 1 + 1  # at most one refused attempt: no hammering
    assert env.run("status").returncode == 77


def test_relogin_while_running_is_picked_up(logged_in: Env) -> None:
    env = logged_in
    old_refresh = stored_tokens(env.tokens)["refresh"]
    daemon = env.popen("run", "--interval", "1s")
    try:
        wait_for(lambda: finished_runs(env) >= 1, what="first run")
        assert env.login("--force").returncode == 0
        new_refresh = stored_tokens(env.tokens)["refresh"]
        assert new_refresh != old_refresh
        # the old grant is gone: only tokens re-read from the store keep the daemon working
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.sim.env.items():
                mp.setenv(key, value)
            auth = globus_sdk.NativeAppAuthClient("61338d24-54d5-408f-a10d-66c06b59f6d2")
            auth.oauth2_revoke_token(old_refresh)
        env.sim.expire_access_tokens()
        done = finished_runs(env)
        wait_for(lambda: finished_runs(env) >= done + 2, what="runs after re-login")
        assert daemon.poll() is None
    finally:
        code, _out, err, _ = stop(daemon)
    assert code == 0, err
    assert stored_tokens(env.tokens)["refresh"] == new_refresh


def test_systemd_notify_messages(logged_in: Env, tmp_path: Path) -> None:
    env = logged_in
    listener = NotifyListener(tmp_path / "notify.sock")
    env.vars.update(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="2000000")
    daemon = env.popen("run", "--interval", "1h")
    try:
        listener.collect_until(lambda: len(listener.received("WATCHDOG=1")) >= 2 and bool(listener.received("STATUS=last run")))
    finally:
        code, _out, err, _ = stop(daemon)
        listener.collect_until(lambda: bool(listener.received("STOPPING=1")), timeout=2)
        listener.close()
    messages = listener.messages
    assert code == 0, err
    assert listener.received("READY=1")
    assert len(listener.received("WATCHDOG=1")) >= 2
    status = listener.received("STATUS=last run")[0]
    assert " ok " in status and "groups" in status
    assert listener.received("STOPPING=1")
    ready_at = next(i for i, m in enumerate(messages) if "READY=1" in m)
    assert ready_at < next(i for i, m in enumerate(messages) if "STATUS=last run" in m)


def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    from syncer.operations import notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify(ready="1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/socket")
    assert notify.notify(ready="1") is False


def test_status_reports_stale_when_last_success_is_old(logged_in: Env) -> None:
    env = logged_in
    assert env.run("sync").returncode == 0
    assert env.run("status").returncode == 0
    conn = sqlite3.connect(env.database)
    conn.execute("UPDATE sync_runs SET started_at = '2020-01-01T00:00:00.000000Z'")
    conn.commit()
    conn.close()
    result = env.run("status")
    assert result.returncode == 1
    assert "stale" in result.stdout
