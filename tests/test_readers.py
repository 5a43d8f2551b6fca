"""Other local users read the database: group read access is enough, at any time.

Runs the reader as another uid with `setpriv` (no user accounts needed), so it needs
root; skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
from conftest import Env
from helpers import wait_for
from test_daemon_e2e import stop

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
def shared_state(logged_in: Env) -> Env:
    """The service's layout: a 0750 state folder of group syncer, files made under umask 0027."""
    env = logged_in
    state = env.tmp / "state"
    state.mkdir()
    os.chown(state, 0, SYNCER_GID)
    os.chmod(state, 0o2750)  # setgid: files get the folder's group, as the service user's would
    for parent in (env.tmp, *env.tmp.parents):
        if parent == parent.parent:
            break
        # the reader must be able to reach the folder (pytest's tmp folders are 0700)
        os.chmod(parent, os.stat(parent).st_mode | 0o005)
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
