"""What syncer writes to stderr when all is well: a healthy daemon logs its summary
lines and nothing else, the terminal's progress line is cleared before the summary,
and the tutorial-client warning comes where the client matters, once."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading

from conftest import Env, record
from helpers import wait_for

# "2026-12-06T21:00:00Z LEVEL logger: message"
_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (?P<level>[A-Z]+) (?P<logger>[\w.]+): (?P<message>.*)")
SUMMARY = re.compile(r"syncer\.sync: run \d+ (ok|partial)|syncer\.hooks: hook \S+: run \d+ delivered")


def finished_runs(env: Env) -> int:
    if not env.database.exists():
        return 0
    return env.query("SELECT count(*) FROM sync_runs WHERE status IN ('ok', 'partial')")[0][0]


def test_a_daemon_whose_snapshots_outlast_the_interval_logs_only_its_summaries(logged_in: Env) -> None:
    """Snapshots held past several ticks: APScheduler's "maximum number of running
    instances reached" becomes a debug line of syncer's; at the default level only
    the summary lines remain."""
    env = logged_in
    env.sim.faults.hold_reads()
    daemon = env.popen("-v", "run", "--interval", "1s")
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []

    def collect() -> None:
        assert daemon.stderr is not None
        for line in daemon.stderr:
            lines.put(line.rstrip("\n"))

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        # wait (an event, not a clock) for the scheduler to find the first snapshot still running
        while not any("came due while the previous one" in line for line in seen):
            seen.append(lines.get(timeout=60))
        env.sim.faults.release_reads()
        wait_for(lambda: finished_runs(env) >= 2, timeout=60, what="two runs")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        env.sim.faults.release_reads()
        if daemon.poll() is None:
            daemon.kill()
        reader.join(timeout=30)
    while not lines.empty():
        seen.append(lines.get())
    daemon.stdout and record(daemon.stdout.read())
    record("\n".join(seen))
    assert not [line for line in seen if "apscheduler" in line.lower()], seen
    parsed = [m for m in map(_LINE.fullmatch, seen) if m]
    assert len(parsed) == len(seen), seen  # every line is one record: nothing unprefixed
    # what the default level shows, but for the daemon's one tutorial-client warning (tested below)
    shown = [m.group(0) for m in parsed if m["level"] != "DEBUG" and "tutorial client" not in m["message"]]
    assert shown and all(SUMMARY.search(line) for line in shown), shown
    mapped = [m for m in parsed if "came due while the previous one" in m["message"]]
    assert {(m["level"], m["logger"]) for m in mapped} == {("DEBUG", "syncer.scheduler")}


def test_the_progress_line_is_cleared_before_the_summary(logged_in: Env) -> None:
    """On a terminal `syncer sync` shows "reading groups: N/M"; the summary line then
    starts on a clean line, with nothing of the progress left on it."""
    env = logged_in
    main, child = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "syncer", "sync"], env=env.vars, cwd=env.tmp,
            stdin=subprocess.DEVNULL, stdout=child, stderr=child,
        )
        os.close(child)
        chunks = []
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(main)
    raw = b"".join(chunks).decode()
    record(raw)
    assert "reading groups: " in raw
    # what the terminal shows: each line as it stands after its carriage returns and erases
    screen = [line.split("\r")[-1].replace("\x1b[K", "") for line in raw.replace("\r\n", "\n").split("\n")]
    screen = [line for line in screen if line]
    assert len(screen) == 1 and _LINE.fullmatch(screen[0]) and SUMMARY.search(screen[0]), (raw, screen)
    summary_line = next(line for line in raw.replace("\r\n", "\n").split("\n") if "syncer.sync: run" in line)
    assert summary_line.startswith("\r\x1b[K") or _LINE.match(summary_line), repr(summary_line)


def tutorial_warnings(output: str) -> int:
    return output.count("using the Globus tutorial client ID")


def test_the_tutorial_client_warning_comes_once_where_the_client_matters(env: Env) -> None:
    """`login` (where you consent to a client) and `run` (once per daemon) warn; a sync,
    status or query every few minutes does not repeat it."""
    login = env.login()
    assert login.returncode == 0 and tutorial_warnings(login.output) == 1, login.output
    for command in (("sync",), ("status",), ("groups",), ("changes",)):
        result = env.run(*command)
        assert result.returncode == 0 and tutorial_warnings(result.output) == 0, (command, result.output)
    daemon = env.popen("run", "--interval", "1s")
    try:
        wait_for(lambda: finished_runs(env) >= 3, timeout=60, what="two more runs")
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=30)
        record(out, err)
    assert daemon.returncode == 0 and tutorial_warnings(err) == 1, err
    env.write_config(client_id="0a3e81d6-8b8e-4b8e-9d9e-0a0b0c0d0e0f")  # a client of your own: no warning
    assert tutorial_warnings(env.run("login", "--no-browser").output) == 0
