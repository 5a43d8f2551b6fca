"""End to end: while `syncer sync` applies a run in batches, readers see whole runs only.

A run writes its batches into the database while it is still reading groups, inside
one transaction. A reader polling the file the whole time must only ever see the
previous run's state or the new run's state, never a mix, and must see the previous
state while batches have already been applied.
"""

from __future__ import annotations

import random
import sqlite3
import time

import pytest
from conftest import Env
from helpers import current_state, expected_state

from syncer.simulator import World
from syncer.storage.history import BATCH_ROWS


@pytest.fixture
def world() -> World:
    # about 5,700 visible memberships: two batches are applied before the reads end
    return World.generate(groups=60, members=100, seed=23)


def snapshot(env: Env) -> tuple[object, ...]:
    """What a reader sees: current memberships, the history's shape, the finished runs."""
    conn = sqlite3.connect(f"file:{env.database}?mode=ro", uri=True, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN")  # one read transaction: the three queries see the same commit
        memberships = tuple(conn.execute(
            "SELECT group_id, identity_id, role, status, last_seen FROM memberships ORDER BY 1, 2"
        ))
        history = conn.execute("SELECT count(*), count(to_run) FROM membership_history").fetchone()
        finished = conn.execute("SELECT count(*) FROM sync_runs WHERE status != 'running'").fetchone()
        return memberships, history, finished
    finally:
        conn.close()


def test_readers_see_the_last_whole_run_while_batches_are_applied(logged_in: Env) -> None:
    env = logged_in
    assert env.run("sync").returncode == 0
    assert len(expected_state(env.world)) > 2 * BATCH_ROWS
    before = snapshot(env)

    env.world.random_changes(300, random.Random(7))
    groups = len(env.query("SELECT id FROM groups WHERE removed_at IS NULL"))
    env.write_config(concurrency=2)
    env.sim.latency_ms = 60  # 60 groups, 2 at a time: about 2 s of reading
    env.sim.reset_stats()
    proc = env.popen("sync")
    seen: list[tuple[int, tuple[object, ...]]] = []
    while proc.poll() is None:
        reads = env.sim.stats["group_reads_ok"]
        seen.append((reads, snapshot(env)))
        time.sleep(0.02)
    out, err = proc.communicate()
    assert proc.returncode == 0, out + err
    after = snapshot(env)

    assert after != before
    assert current_state(env) == expected_state(env.world)
    mixed = [
        [("before" if part == b else "after" if part == a else "neither") for part, b, a in zip(view, before, after, strict=True)]
        for _, view in seen if view not in (before, after)
    ]
    assert not mixed, f"a reader saw part of a run (memberships, history, runs): {mixed}"
    # late in the run, with batches already applied, readers still saw the last run
    late = [view for reads, view in seen if reads >= groups * 3 // 4]
    assert late and late[0] == before
