"""What the database should hold, computed from the simulator's world (the ground truth)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

import pytest

from syncer.globus.token_store import TokenStore
from syncer.simulator import Simulator, World

State = dict[tuple[str, str], tuple[str, str]]


def my_active_groups(world: World) -> list[str]:
    with world.lock:
        return [gid for gid in world.groups if (m := world.my_membership(gid)) is not None and m.status == "active"]


def admin_groups(world: World) -> list[str]:
    """Groups where the logged-in identity is an active admin (sees every membership)."""
    return [gid for gid in my_active_groups(world) if world.my_membership(gid).role == "admin"]


def others(world: World, gid: str) -> list[str]:
    """The members of a group other than the logged-in identity."""
    return [i for i in world.groups[gid]["memberships"] if i != world.me]


def expected_state(world: World, groups: t.Iterable[str] | None = None) -> State:
    """(group_id, identity_id) -> (role, status) as the logged-in identity sees it."""
    state: State = {}
    with world.lock:
        for gid in groups if groups is not None else my_active_groups(world):
            for m in world.visible_memberships(gid):
                state[(gid, m["identity_id"])] = (m["role"], m["status"])
    return state


def db_state(rows: t.Iterable[t.Any]) -> State:
    return {(r["group_id"], r["identity_id"]): (r["role"], r["status"]) for r in rows}


def state_as_of(env: t.Any, run_id: int) -> State:
    return db_state(
        env.query(
            "SELECT group_id, identity_id, role, status FROM membership_history"
            " WHERE from_run <= ? AND (to_run IS NULL OR to_run > ?)",
            [run_id, run_id],
        )
    )


def current_state(env: t.Any) -> State:
    return db_state(env.query("SELECT group_id, identity_id, role, status FROM memberships"))


def stored_tokens(path: Path) -> dict[str, t.Any]:
    """The stored Groups tokens (access and refresh token), via the product's store."""
    with TokenStore(path) as store:
        data = store.groups_tokens()
    assert data is not None, "token store lost the Groups tokens"
    return {"access": data.access_token, "refresh": data.refresh_token}


def stored_token_data(path: Path) -> dict[str, dict[str, t.Any]]:
    """Every stored token record, by resource server, as the file holds it (expiry included)."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT token_data_json FROM token_storage").fetchall()
    finally:
        conn.close()
    return {record["resource_server"]: record for record in (json.loads(row[0]) for row in rows)}


def wait_for(predicate: t.Callable[[], t.Any], timeout: float = 30, what: str = "condition") -> t.Any:
    """Poll ``predicate`` until it is truthy; a database not ready yet counts as false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except sqlite3.OperationalError:
            value = None  # not created yet, schema not there yet, or busy
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def has_running_run(env: t.Any) -> bool:
    return bool(env.database.exists() and env.query("SELECT 1 FROM sync_runs WHERE status = 'running'"))


class NotifyListener:
    """Stands in for systemd's notify socket (``$NOTIFY_SOCKET``): keeps every message a daemon sends."""

    def __init__(self, path: Path) -> None:
        self.address = str(path)
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._sock.settimeout(0.2)

    def collect_until(self, predicate: t.Callable[[], bool], timeout: float = 20) -> None:
        """Receive until ``predicate()`` holds or ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not predicate():
            with contextlib.suppress(TimeoutError):
                self.messages.append(self._sock.recv(4096).decode())

    def received(self, fragment: str) -> list[str]:
        return [m for m in self.messages if fragment in m]

    def close(self) -> None:
        self._sock.close()


def answer_login_prompt(proc: subprocess.Popen[str], base_url: str) -> tuple[str, str]:
    """Be the user of ``syncer login --no-browser`` against a simulator that another process
    serves (``syncer simulate``, a unit): a Simulator that is not started knows the address,
    which is all its browser step needs."""
    port = int(base_url.rsplit(":", 1)[1])
    return Simulator(World.generate(groups=1, members=1), port=port).answer_cli_login(proc)


CHECKOUT = Path(__file__).resolve().parent.parent


class OtherUsersPython(t.NamedTuple):
    """The Python another user runs syncer with, and what its environment needs."""

    executable: str
    env: dict[str, str]


@functools.cache
def _python_for(as_user: tuple[str, ...]) -> OtherUsersPython:
    probe = [sys.executable, "-c", "import datasette, sqlite_utils, syncer.cli"]
    if subprocess.run([*as_user, *probe], capture_output=True, timeout=120).returncode == 0:
        return OtherUsersPython(sys.executable, {})
    folder = Path(tempfile.mkdtemp(prefix="syncer-reader-python-"))
    atexit.register(shutil.rmtree, folder, True)
    shutil.copytree(sys.prefix, folder / "venv", symlinks=True)
    shutil.copytree(CHECKOUT / "syncer", folder / "src" / "syncer")
    for editable in (folder / "venv").glob("lib/python*/site-packages/__editable__*"):
        editable.unlink()  # it points at the checkout, before PYTHONPATH: the copy's is the source
    subprocess.run(["chmod", "-R", "a+rX", str(folder)], check=True)  # whatever this process's umask
    copy = OtherUsersPython(str(folder / "venv" / "bin" / Path(sys.executable).name), {"PYTHONPATH": str(folder / "src")})
    probe[0] = copy.executable
    tried = subprocess.run([*as_user, *probe], env={**os.environ, **copy.env}, capture_output=True, text=True, timeout=120)
    if tried.returncode != 0:
        pytest.skip(f"no Python another user may run syncer with here: {tried.stderr.strip()[-200:]}")
    return copy


def python_for(as_user: t.Sequence[str]) -> OtherUsersPython:
    """The Python that ``as_user`` (a ``setpriv`` prefix) can run syncer with: this one
    where that user can reach it and syncer; else a readable copy of its environment, as
    a site installs syncer for its users. A checkout made in a folder only its owner may
    enter (a clone in `mktemp -d`, say) hides the editable install and the venv from
    every other user."""
    return _python_for(tuple(as_user))
