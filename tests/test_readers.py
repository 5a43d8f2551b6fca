"""Other local users read the database: group read access is enough, at any time.

Between runs, during one, and after one was killed with kill -9 at points held by the
simulator (issue 21): every reader (`syncer members/groups/changes/status`, the
`sqlite3` command line read-only, Datasette as `syncer serve` makes it) answers at once
as the owner and as a member of the database's group who may not write its folder,
and they agree, `status` verdict included.

Runs the reader as another uid with `setpriv` (no user accounts needed), so it needs
root; skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import typing as t
from pathlib import Path

import pytest
from conftest import Env
from helpers import db_state, expected_state, python_for, wait_for
from test_daemon_e2e import stop

from syncer.simulator import World

READER_UID = 65534  # nobody
SYNCER_GID = 4242

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to act as another user"
)

READ = (
    "import sqlite3, sys\n"
    "conn = sqlite3.connect(sys.argv[1], timeout=30)\n"
    "print(conn.execute('SELECT count(*) FROM memberships').fetchone()[0])\n"
)


def read_as(path: str, gid: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={READER_UID}", f"--regid={gid}", "--clear-groups", sys.executable, "-I", "-c", READ, path],
        capture_output=True, text=True, timeout=60,
    )


@pytest.fixture
def tmp_path() -> t.Iterator[Path]:
    """A folder the reader can reach: pytest's own are under a 0700 folder, which every
    pytest session of the same user makes 0700 again."""
    folder = Path(tempfile.mkdtemp(prefix="syncer-readers-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def shared_state(logged_in: Env) -> Env:
    """The service's layout: a 0750 state folder of group syncer, files made under umask 0027."""
    env = logged_in
    state = env.tmp / "state"
    state.mkdir()
    os.chown(state, 0, SYNCER_GID)
    os.chmod(state, 0o2750)  # setgid: files get the folder's group, as the service user's would
    env.write_config(database="state/groups.db")
    return env


def test_group_member_reads_between_and_during_runs(shared_state: Env) -> None:
    env = shared_state
    db = str(env.tmp / "state" / "groups.db")
    result = subprocess.run(
        ["sh", "-c", f"umask 0027 && exec {sys.executable} -m syncer sync"],
        env=env.vars, cwd=env.tmp, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert oct(os.stat(db).st_mode & 0o777) == "0o640"
    # the WAL's files stay, emptied, with the database's group and mode; the lock is the owner's alone
    files = {name: os.stat(env.tmp / "state" / name) for name in os.listdir(env.tmp / "state")}
    assert set(files) == {"groups.db", "groups.db-wal", "groups.db-shm", "groups.db.lock", "groups.db.running"}
    modes = {name: (oct(st.st_mode & 0o777), st.st_gid) for name, st in files.items()}
    assert modes["groups.db-wal"] == modes["groups.db-shm"] == modes["groups.db.running"] == ("0o640", SYNCER_GID)
    assert modes["groups.db.lock"][0] == "0o600"
    assert files["groups.db-wal"].st_size == 0

    between = read_as(db, SYNCER_GID)
    assert between.returncode == 0, between.stderr
    conn = sqlite3.connect(db)
    expected = conn.execute("SELECT count(*) FROM memberships").fetchone()[0]
    conn.close()
    assert expected > 0
    assert int(between.stdout) == expected

    # during a (slow) daemon run, readers still see the last complete snapshot
    env.write_config(database="state/groups.db", concurrency=1)
    env.sim.latency_ms = 300
    daemon = subprocess.Popen(
        ["sh", "-c", f"umask 0027 && exec {sys.executable} -m syncer run --interval 1h"],
        env=env.vars, cwd=env.tmp, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: len(runs_in(env, db)) >= 2, what="the daemon's run to start")
        during = read_as(db, SYNCER_GID)
        assert during.returncode == 0, during.stderr
        assert int(during.stdout) == expected
    finally:
        code, _, err, _ = stop(daemon)
    assert code == 0, err

    outsider = read_as(db, SYNCER_GID + 1)
    assert outsider.returncode != 0
    assert "unable to open database file" in outsider.stderr


def runs_in(env: Env, db: str) -> list[object]:
    if not os.path.exists(db):
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT id FROM sync_runs").fetchall()
    finally:
        conn.close()


# ------------------------------------------------- readers after kill -9, as owner and group member


AS_MEMBER = ["setpriv", f"--reuid={READER_UID}", f"--regid={SYNCER_GID}", "--clear-groups"]
def as_member(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    """``syncer ARGS`` run by a member of the database's group who may not write its folder."""
    python = python_for(AS_MEMBER)
    return subprocess.run(
        [*AS_MEMBER, python.executable, "-m", "syncer", *args],
        env={**env.vars, **python.env}, cwd=env.tmp, capture_output=True, text=True, timeout=120,
    )


def as_owner(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncer", *args], env=env.vars, cwd=env.tmp, capture_output=True, text=True, timeout=120,
    )


def sqlite3_cli_as_member(db: str, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AS_MEMBER, "sqlite3", "-bail", f"file:{db}?mode=ro", sql],
        capture_output=True, text=True, timeout=60,
    )


# Datasette as `syncer serve` makes it, asked through its own client (no port needed)
DATASETTE = """
import asyncio, json, sys
from pathlib import Path
from syncer.web import make_datasette
async def main():
    ds = make_datasette(Path(sys.argv[1]))
    await ds.invoke_startup()
    answer = await ds.client.get("/groups/sync_runs.json?_shape=array&_col=status&_sort=id")
    print(answer.status_code, json.dumps([(r["id"], r["status"]) for r in answer.json()]))
asyncio.run(main())
"""


def datasette_as_member(env: Env, db: str) -> str:
    python = python_for(AS_MEMBER)
    done = subprocess.run(
        [*AS_MEMBER, python.executable, "-c", DATASETTE, db],
        env={**env.vars, **python.env}, cwd=env.tmp, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


class Seen(t.NamedTuple):
    """What the readers say about the database: the same for every reader."""

    members: list[dict[str, t.Any]]
    groups: list[str]
    changes: int
    runs: str


def every_reader(env: Env, db: str, group: str) -> tuple[Seen, dict[str, t.Any], dict[str, t.Any]]:
    """Ask every reader, as the owner and as a group member; all must answer and agree.
    Returns what they saw and the two `syncer status --json` reports (owner, member)."""
    seen: dict[str, Seen] = {}
    statuses: dict[str, t.Any] = {}
    for who, run in (("owner", as_owner), ("member", as_member)):
        answers = {cmd: run(env, cmd, *extra, "--format", "json") for cmd, *extra in (
            ("members", group), ("groups",), ("changes", "--all"),
        )}
        for cmd, answer in answers.items():
            assert answer.returncode == 0, (who, cmd, answer.stderr)
        status = run(env, "status", "--json")
        assert status.returncode in (0, 1, 3), (who, status.stderr)
        statuses[who] = json.loads(status.stdout)
        cli = sqlite3_cli_as_member(db, "SELECT group_concat(id || ':' || status, ' ') FROM sync_runs")
        assert cli.returncode == 0, (who, cli.stderr)
        seen[who] = Seen(
            members=json.loads(answers["members"].stdout),
            groups=[g["id"] for g in json.loads(answers["groups"].stdout)],
            changes=len(json.loads(answers["changes"].stdout)),
            runs=cli.stdout.strip(),
        )
    assert seen["owner"] == seen["member"]
    if importlib.util.find_spec("datasette") is not None:
        served = datasette_as_member(env, db)
        runs = " ".join(f"{run_id}:{status}" for run_id, status in json.loads(served.split(" ", 1)[1]))
        assert served.startswith("200 ") and runs == seen["owner"].runs, served
    for field in ("health", "exit_code"):
        assert statuses["owner"][field] == statuses["member"][field], statuses
    return seen["owner"], statuses["owner"], statuses["member"]


@pytest.fixture
def world() -> World:
    # about 9,000 visible memberships in 150 groups: several batches are applied,
    # uncommitted, before the held reads
    return World.generate(groups=150, members=60, seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("applied", [0.0, 0.5, 0.9, "commit"])
def test_every_reader_answers_after_kill_9_as_owner_and_group_member(shared_state: Env, applied: float | str) -> None:
    """Issue 21, point 1: a run killed at any point (before its reads, with part or most
    of its groups applied in its open transaction, or while it commits) leaves a
    database that every reader, the owner and a read-only group member alike, reads at
    once, seeing the last whole run, with the same `status` verdict (`aborted`), before
    any later run. While the run is held, the member's `status` sees it in progress."""
    env = shared_state
    db = str(env.tmp / "state" / "groups.db")
    old_umask = os.umask(0o027)
    try:
        first = env.run("sync")
        assert first.returncode == 0, first.output
        group = sorted(env.world.groups)[0]
        before, _, _ = every_reader(env, db, group)
        assert before.members and before.runs == "1:ok"

        env.world.random_changes(400, random.Random(3))
        groups = sorted(env.world.groups)
        exempt = groups[: int(len(groups) * applied)] if isinstance(applied, float) else groups
        env.sim.reset_stats()
        env.sim.faults.hold_reads(except_groups=exempt)
        env.write_config(database="state/groups.db", concurrency=4)
        wal = env.tmp / "state" / "groups.db-wal"
        proc = env.popen("sync")
        try:
            if applied == "commit":
                # every read answers: kill as soon as the run writes more than its row (batches or commit)
                wait_for(lambda: runs_in(env, db) == [(1,), (2,)], what="the run's row")
                size = wal.stat().st_size
                wait_for(lambda: wal.stat().st_size > size or proc.poll() is not None, timeout=120, what="the run's writes")
            else:
                wait_for(lambda: env.sim.stats["faults"].get("held", 0) >= 4, timeout=120, what="the held reads")
                wait_for(lambda: runs_in(env, db) == [(1,), (2,)], what="the run's row")
                # the run is held: a member sees it in progress, and cannot hold it off
                held = as_member(env, "status", "--json")
                assert "run 2 is in progress" in json.loads(held.stdout)["health"], held.stdout
            alive = proc.poll() is None
            proc.kill()
            proc.communicate(timeout=60)
        finally:
            env.sim.faults.release_reads()

        after, owner_status, _ = every_reader(env, db, group)
        if alive and after.runs == "1:ok 2:running":
            assert after == before._replace(runs=after.runs)  # the killed run shows nothing
            assert owner_status["exit_code"] == 1
            assert owner_status["health"].startswith("aborted: run 2 ended without finishing"), owner_status
        else:  # the kill came after the commit: the run is whole
            assert after.runs == "1:ok 2:ok" and after.changes > before.changes

        recovery = env.run("sync")
        assert recovery.returncode == 0, recovery.output
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        try:
            assert db_state(conn.execute("SELECT * FROM memberships")) == expected_state(env.world)
        finally:
            conn.close()
        final, _, member_status = every_reader(env, db, group)
        assert final.runs.startswith("1:ok 2:aborted 3:ok" if "2:running" in after.runs else "1:ok 2:ok 3:ok")
        assert member_status["exit_code"] == 0
    finally:
        os.umask(old_umask)
