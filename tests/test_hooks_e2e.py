"""End to end: `[[hooks]]` get each run's changes, at least once, in run order (issue 15).

Real `syncer` processes against the simulator; the hooks are a real command (a Python
script recording what it got) and a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import typing as t
from pathlib import Path

import pytest
from conftest import Env
from helpers import admin_groups, expected_state, others, wait_for
from receivers import CommandHook, Receiver, configure, watch_everything

from syncer.operations.lock import LockFile
from syncer.simulator import World

Change = tuple[str, str, str]  # group_id, identity_id, change


def churn(world: World, step: int) -> set[Change]:
    """Someone joins, someone leaves, someone is promoted (in admin groups, where every
    membership is visible); the events the next run must record."""
    groups = admin_groups(world)
    g1, g2 = groups[step % len(groups)], groups[(step + 1) % len(groups)]
    promoted = next(i for i in others(world, g1) if world.groups[g1]["memberships"][i].role == "member")
    world.set_role(g1, promoted, "manager")
    newcomer = world.add_member(g1)
    gone = others(world, g2)[-1]
    world.remove_member(g2, gone)
    return {(g1, newcomer, "added"), (g1, promoted, "changed"), (g2, gone, "removed")}



def sync(env: Env, expected: int = 0) -> str:
    result = env.run("sync")
    assert result.returncode == expected, result.output
    assert "Traceback" not in result.output
    return result.stderr


def changes_of(rows: t.Iterable[dict[str, t.Any]]) -> set[Change]:
    return {(row["group_id"], row["identity_id"], row["change"]) for row in rows}


def run_started(env: Env, run_id: int) -> str:
    return str(env.query("SELECT started_at FROM sync_runs WHERE id = ?", [run_id])[0][0])


@pytest.fixture
def receiver() -> t.Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.release()
    server.stop()


def test_a_command_and_a_webhook_get_exactly_each_runs_events_in_order(logged_in: Env, receiver: Receiver) -> None:
    env, world = logged_in, logged_in.world
    command = CommandHook(env.tmp, "events")
    observer = CommandHook(env.tmp, "everything")
    one_group = CommandHook(env.tmp, "one-group")
    watched = admin_groups(world)[0]
    configure(
        env,
        {"name": "events", "command": command.command},
        {"name": "web", "url": f"{receiver.url}/hook?x=1", "timeout": "10s"},
        {"name": "everything", "command": observer.command, "observations": True},
        {"name": "one-group", "command": one_group.command, "groups": [watched]},
    )
    sync(env)  # run 1: everyone is first seen, an observation: no event for anyone
    assert command.calls() == [] and receiver.posts() == [] and one_group.calls() == []
    first = observer.calls()
    assert [c["run_id"] for c in first] == ["1"]
    assert {(r["group_id"], r["identity_id"]) for r in first[0]["lines"]} == set(expected_state(world))
    assert {(r["change"], r["reason"]) for r in first[0]["lines"]} == {("added", "first_seen")}

    expected: dict[int, set[Change]] = {}
    for run_id in (2, 3, 4):
        expected[run_id] = churn(world, run_id)
        sync(env)

    assert command.runs() == [2, 3, 4]
    for call in command.calls():
        run_id = int(call["run_id"])
        assert changes_of(call["lines"]) == expected[run_id]
        events = {("added", "joined"), ("removed", "left"), ("changed", "changed")}
        assert {(r["change"], r["reason"]) for r in call["lines"]} <= events
        assert all(r["run_id"] == run_id and r["at"] == run_started(env, run_id) for r in call["lines"])
        assert call["hook"] == "events" and Path(call["database"]) == env.database
    promoted = next(r for r in command.calls()[0]["lines"] if r["change"] == "changed")
    assert (promoted["old_role"], promoted["new_role"]) == ("member", "manager")

    posts = receiver.posts()
    assert [p.json()["run_id"] for p in posts] == [2, 3, 4]
    for post in posts:
        body = post.json()
        assert post.path == "/hook?x=1"
        assert post.headers["Idempotency-Key"] == f"web:{body['run_id']}"
        assert post.headers["Content-Type"] == "application/json"
        assert body["hook"] == "web" and body["at"] == run_started(env, body["run_id"])
        assert changes_of(body["changes"]) == expected[body["run_id"]]
        assert body["changes"] == next(c["lines"] for c in command.calls() if int(c["run_id"]) == body["run_id"])

    # observations only when asked: the observer got the same events (and run 1)
    assert observer.runs() == [1, 2, 3, 4]
    assert all(changes_of(c["lines"]) == expected[int(c["run_id"])] for c in observer.calls()[1:])
    # the group filter: only the watched group's events, and no call for a run without any
    assert [(int(c["run_id"]), changes_of(c["lines"])) for c in one_group.calls()] == [
        (run_id, {ch for ch in changes if ch[0] == watched}) for run_id, changes in expected.items()
        if any(ch[0] == watched for ch in changes)
    ]

    # an unchanged run calls nobody, and writes nothing for the hooks; status: every hook up to date
    positions = env.query("SELECT * FROM hook_deliveries ORDER BY hook")
    sync(env)
    assert command.runs() == [2, 3, 4] and len(receiver.posts()) == 3
    assert env.query("SELECT * FROM hook_deliveries ORDER BY hook") == positions
    status = env.run("status")
    assert status.returncode == 0, status.output
    assert "  events: up to date\n" in status.stdout and "  web: up to date\n" in status.stdout


def test_receiver_down_for_three_runs_then_back_gets_every_run_in_order(logged_in: Env, receiver: Receiver) -> None:
    env, world = logged_in, logged_in.world
    configure(env, {"name": "web", "url": receiver.url, "timeout": "5s"})
    sync(env)
    receiver.stop()
    expected = {}
    for run_id in (2, 3, 4):
        expected[run_id] = churn(world, run_id)
        stderr = sync(env)  # the run's outcome is its own
        assert "hook web: run 2 not delivered" in stderr and "connection failed" in stderr
        assert receiver.url not in stderr  # a webhook URL may hold a secret
    status = env.run("status", "--json")
    assert status.returncode == 3, status.output
    assert "hook web has 3 undelivered run(s) since run 2" in status.stdout
    text = env.run("status")
    assert "web: 3 run(s) undelivered, the oldest run 2 at " in text.stdout
    assert "run 2 failed 3 time(s) in a row" in text.stdout
    replayed = env.run("hooks", "replay", "web", "--since", "run:1")  # still down: stops at run 2, which stays queued
    assert replayed.returncode == 1, replayed.output
    assert "run 2: 3 change(s) NOT delivered: cannot reach the URL (connection failed)" in replayed.stdout
    assert "hook web: stopped at run 2; it is retried after the next run" in replayed.stderr

    receiver.start()  # back, on the same port
    expected[5] = churn(world, 5)
    sync(env)
    posts = receiver.posts()
    assert [p.json()["run_id"] for p in posts] == [2, 3, 4, 5]
    assert all(changes_of(p.json()["changes"]) == expected[p.json()["run_id"]] for p in posts)
    assert env.run("status").returncode == 0


def test_a_failing_command_is_retried_with_everything_it_missed(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    failing = CommandHook(env.tmp, "flaky", mode="fail")
    configure(env, {"name": "flaky", "command": failing.command})
    sync(env)
    churn(world, 1)
    assert "hook flaky: run 2 not delivered (3 changes): exit status 1" in sync(env)
    churn(world, 2)
    sync(env)
    assert failing.runs() == [2, 2]  # the queue stops at the failed run: run 3 waits behind it
    failing.mode = "ok"
    configure(env, {"name": "flaky", "command": failing.command})
    sync(env)
    assert failing.runs() == [2, 2, 2, 3]


def test_a_hung_hook_is_killed_at_its_timeout_and_the_run_is_unaffected(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    hung = CommandHook(env.tmp, "hung", mode="hang")
    configure(env, {"name": "hung", "command": hung.command, "timeout": "2s"})
    sync(env)
    churn(world, 1)
    began = time.monotonic()
    stderr = sync(env)
    took = time.monotonic() - began
    assert "hook hung: run 2 not delivered (3 changes): timed out after 2s: killed" in stderr
    assert 2 <= took < 2 + 10  # the timeout, and a sync's own few seconds at most
    # the run was recorded before the hook started, and as it was
    run = env.query("SELECT status, exit_code, finished_at FROM sync_runs WHERE id = 2")[0]
    assert (run["status"], run["exit_code"]) == ("ok", 0)
    started = hung.calls()[0]["started"]
    assert run["finished_at"] < time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)) + ".999999Z"
    # the hook and the process it started are gone: its whole process group was killed
    for pid in map(int, Path(f"{hung.out}.pids").read_text().split()):
        assert not alive(pid), f"hook process {pid} still running"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone, before the open or between it and the read
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


@pytest.mark.parametrize("kind", ["url", "command"])
def test_a_run_whose_bookkeeping_was_killed_is_sent_again_with_the_same_key(
    logged_in: Env, receiver: Receiver, kind: str
) -> None:
    env, world = logged_in, logged_in.world
    once = CommandHook(env.tmp, "once", mode="once")
    hook = {"name": "h", "url": receiver.url} if kind == "url" else {"name": "h", "command": once.command}
    configure(env, hook)
    sync(env)
    first = churn(world, 1)
    receiver.hold()
    proc = env.popen("sync")
    try:
        if kind == "url":
            assert receiver.arrived.wait(60), "the hook was not called"
        else:
            wait_for(lambda: Path(f"{once.out}.pid").exists(), timeout=60, what="the hook's call")
        proc.send_signal(signal.SIGKILL)  # after the call, before its bookkeeping
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        receiver.release()
    if kind == "command":  # the hook died with the syncer that started it
        wait_for(lambda: not alive(int(Path(f"{once.out}.pid").read_text())), timeout=60, what="the hook to end")
        wait_for(lambda: not hooks_lock_held(env), timeout=60, what="its keeper to let go of the hooks lock")
    assert env.query("SELECT status FROM sync_runs WHERE id = 2")[0][0] == "ok"  # the run itself was committed

    second = churn(world, 2)
    sync(env)
    if kind == "url":
        posts = receiver.posts()
        assert [(p.json()["run_id"], p.headers["Idempotency-Key"]) for p in posts] == [(2, "h:2"), (2, "h:2"), (3, "h:3")]
        bodies = [changes_of(p.json()["changes"]) for p in posts]
    else:
        assert once.runs() == [2, 2, 3]
        bodies = [changes_of(call["lines"]) for call in once.calls()]
    assert bodies == [first, first, second]


def test_a_hook_added_later_starts_with_the_next_run_and_replay_sends_older_ones(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    sync(env)
    expected = {}
    for run_id in (2, 3):
        expected[run_id] = churn(world, run_id)
        sync(env)
    late = CommandHook(env.tmp, "late")
    configure(env, {"name": "late", "command": late.command})
    status = env.run("status")
    assert "late: starts with the next run" in status.stdout and status.returncode == 0
    expected[4] = churn(world, 4)
    sync(env)
    assert late.runs() == [4]

    replayed = env.run("hooks", "replay", "late", "--since", "run:2")
    assert replayed.returncode == 0, replayed.output
    assert late.runs() == [4, 2, 3, 4]
    assert [changes_of(c["lines"]) for c in late.calls()] == [expected[4], expected[2], expected[3], expected[4]]
    assert "run 2: 3 change(s) delivered" in replayed.stdout

    since_day = env.run("hooks", "replay", "late", "--since", "2000-01-01")  # every run (run 1 has no events)
    assert since_day.returncode == 0, since_day.output
    assert late.runs() == [4, 2, 3, 4, 2, 3, 4]
    assert env.run("hooks", "replay", "late", "--since", "1h").returncode == 0
    assert late.runs()[-3:] == [2, 3, 4]

    with LockFile(env.database.with_name("groups.db.hooks.lock")):  # another process delivering hooks
        busy = env.run("hooks", "replay", "late", "--since", "run:2")
    assert busy.returncode == 75 and "another process is delivering hooks" in busy.stderr
    nothing = env.run("hooks", "replay", "late", "--since", "2999-01-01")  # a moment after every run
    assert (nothing.returncode, nothing.stdout.strip()) == (0, "no run since 2999-01-01: nothing to replay")
    for args, message in [
        (("hooks", "replay", "late", "--since", "run:99"), "there is no run 99 (runs 1-4)"),  # as the query commands
        (("hooks", "replay", "nope", "--since", "7d"), "no hook named 'nope' (hooks: late)"),
        (("hooks", "replay", "late", "--since", "last tuesday"), "bad WHEN 'last tuesday'"),
        (("hooks", "replay", "late", "--since", "2026-01-01T10:00"), "a date-time needs Z or an offset"),
    ]:
        bad = env.run(*args)
        assert bad.returncode == 2 and message in bad.stderr, bad.output
        assert "Traceback" not in bad.output


def test_the_scheduler_pings_delivers_hooks_and_writes_metrics_after_each_run(logged_in: Env, receiver: Receiver) -> None:
    env = logged_in
    observer = watch_everything(env, receiver)
    metrics = env.tmp / "syncer.prom"
    daemon = env.popen("run", "--interval", "1h")
    try:
        wait_for(metrics.exists, timeout=60, what="the first run's metrics file")  # written last
        assert observer.runs() == [1] and receiver.paths() == ["/ping/start", "/ping", "/hook"]
        assert "syncer_hook_backlog_runs{hook=\"web\"} 0.0" in metrics.read_text()
        daemon.send_signal(signal.SIGTERM)
        _out, err = daemon.communicate(timeout=30)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0, err
    assert receiver.posts()[0].headers["Idempotency-Key"] == "web:1"
    assert len(observer.calls()[0]["lines"]) == len(expected_state(env.world))


def test_a_webhook_that_never_answers_is_abandoned_at_its_timeout(logged_in: Env, receiver: Receiver) -> None:
    env, world = logged_in, logged_in.world
    configure(env, {"name": "web", "url": receiver.url, "timeout": "2s"})
    sync(env)
    churn(world, 1)
    receiver.hold()  # answers nothing until the test ends
    began = time.monotonic()
    stderr = sync(env)
    assert time.monotonic() - began < 2 + 10
    assert "hook web: run 2 not delivered (3 changes): timed out after 2s" in stderr
    assert receiver.arrived.is_set()
    assert env.run("status").returncode == 3


def test_stopping_the_scheduler_kills_a_hook_in_progress(logged_in: Env) -> None:
    env = logged_in
    hung = CommandHook(env.tmp, "hung", mode="hang")
    configure(env, {"name": "hung", "command": hung.command, "observations": True})  # the default timeout: 60 s
    daemon = env.popen("run", "--interval", "1h")
    try:
        pids = Path(f"{hung.out}.pids")
        wait_for(pids.exists, timeout=60, what="the hook to start")
        began = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        _out, err = daemon.communicate(timeout=30)
        took = time.monotonic() - began
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0, err
    assert took < 10
    assert "hook hung: run 1 not delivered" in err and "stopped: syncer is shutting down: killed" in err
    for pid in map(int, pids.read_text().split()):
        assert not alive(pid), f"hook process {pid} still running"
    status = env.run("status")
    assert status.returncode == 3 and "hung: 1 run(s) undelivered, the oldest run 1" in status.stdout


def test_changes_from_an_older_release_with_unknown_reasons_count_as_events(env: Env) -> None:
    """A database from before reasons were recorded: its 'unknown' changes go to
    events-only hooks, its observations only to those that ask for them."""
    shutil.copy(Path(__file__).parent / "fixtures" / "groups-0003.db", env.database)
    events, everything = CommandHook(env.tmp, "events"), CommandHook(env.tmp, "everything")
    configure(
        env, {"name": "events", "command": events.command},
        {"name": "everything", "command": everything.command, "observations": True},
    )
    for name in ("events", "everything"):
        result = env.run("hooks", "replay", name, "--since", "run:1")
        assert result.returncode == 0, result.output
    assert events.runs() == [2] and everything.runs() == [1, 2]
    assert sorted(r["reason"] for r in events.calls()[0]["lines"]) == ["changed", "unknown", "unknown", "unknown"]
    assert {r["reason"] for r in everything.calls()[0]["lines"]} == {"first_seen"}
    second = sorted(r["reason"] for r in everything.calls()[1]["lines"])
    assert second == ["changed", "group_gone", "unknown", "unknown", "unknown"]


def test_a_hook_that_cannot_start_or_answers_an_error_is_retried(logged_in: Env, receiver: Receiver) -> None:
    env, world = logged_in, logged_in.world
    receiver.status = 500
    configure(
        env, {"name": "missing", "command": ["./no-such-hook", "--flag"]}, {"name": "web", "url": receiver.url},
    )
    sync(env)
    churn(world, 1)
    stderr = sync(env)
    assert f"hook missing: run 2 not delivered (3 changes): cannot start {env.tmp / 'no-such-hook'}" in stderr
    assert "hook web: run 2 not delivered (3 changes): HTTP 500; output: ok" in stderr
    receiver.status = 202
    sync(env)
    assert [p.json()["run_id"] for p in receiver.posts()] == [2, 2]
    assert "missing: 1 run(s) undelivered" in env.run("status").stdout


def hooks_lock_held(env: Env) -> bool:
    """Whether some process (a hook's keeper, say) still holds the database's hooks lock."""
    from syncer.operations.lock import is_held

    return is_held(env.database.with_name("groups.db.hooks.lock"))


# A slow hook for the kill -9 test: logs "start N" and "end N" around each call. Its
# first call of run 2 leaves two processes behind it (one in a session of its own, one
# orphaned at once), notes every pid, and then blocks on a FIFO that nobody opens.
SLOW_HOOK = """#!/bin/sh
log=$1; fifo=$2
echo "start $SYNCER_RUN_ID" >> "$log"
cat > /dev/null
if [ "$SYNCER_RUN_ID" = 2 ] && [ ! -e "$fifo.taken" ]; then
    : > "$fifo.taken"
    setsid sleep 1000 &
    own_session=$!
    sh -c 'sleep 1001 & echo $! > "$0.orphan"' "$fifo"
    echo "$$ $PPID $own_session $(cat "$fifo.orphan")" > "$fifo.pids.tmp"
    mv "$fifo.pids.tmp" "$fifo.pids"
    cat "$fifo" > /dev/null
fi
echo "end $SYNCER_RUN_ID" >> "$log"
"""


@pytest.mark.parametrize("command", ["run", "sync"])
def test_a_hook_dies_with_a_killed_syncer_and_later_runs_arrive_in_order(logged_in: Env, command: str) -> None:
    env, world = logged_in, logged_in.world
    script, log, fifo = env.tmp / "slow-hook.sh", env.tmp / "slow-hook.log", env.tmp / "hold.fifo"
    script.write_text(SLOW_HOOK)
    script.chmod(0o755)
    os.mkfifo(fifo)
    configure(env, {"name": "slow", "command": [str(script), str(log), str(fifo)], "timeout": "10m"})
    sync(env)  # run 1: observations only, nothing for this hook
    churn(world, 2)
    pids_file = Path(f"{fifo}.pids")
    syncer = env.popen(*(["run", "--interval", "1h"] if command == "run" else ["sync"]))
    pids: list[int] = []
    try:
        wait_for(lambda: pids_file.exists() or syncer.poll() is not None, timeout=120, what="the hook to start")
        assert syncer.poll() is None, syncer.communicate()
        pids = [int(pid) for pid in pids_file.read_text().split()]  # hook, its keeper, session leader, orphan
        syncer.send_signal(signal.SIGKILL)
        syncer.communicate(timeout=30)
        # every process of the call ends with syncer, and the keeper lets go of the hooks lock
        wait_for(lambda: not any(alive(pid) for pid in pids), timeout=60, what="the hook's processes to end")
        wait_for(lambda: not hooks_lock_held(env), timeout=60, what="the hooks lock to be free")
    finally:
        if syncer.poll() is None:
            syncer.kill()
            syncer.communicate()
        for pid in pids:  # only if the test failed: leave nothing running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert log.read_text().splitlines() == ["start 2"]

    for run_id in (3, 4):
        churn(world, run_id)
        sync(env)
    # run 2 again first (it was never delivered), then 3 and 4: one call at a time, in run order
    assert log.read_text().splitlines() == [
        "start 2", "start 2", "end 2", "start 3", "end 3", "start 4", "end 4"
    ]
    assert env.run("status").returncode == 0
