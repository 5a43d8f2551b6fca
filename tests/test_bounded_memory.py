"""Memory bounded by the bytes in flight, not by the largest group: group documents are
received as streams within a byte budget, one document at a time may overdraw it, and
every group still arrives whole. (The figures, peak RSS of eight 100,000-member groups
beside the 10,000x100 world, are benchmarks/bench.py --memory's.)"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import ISSUED_TOKENS, make_env
from helpers import current_state, expected_state, my_active_groups
from test_simulator import groups_client, raw_get

from syncer.globus_groups import MAX_BODY_BYTES, AdaptiveLimit, GroupRead, GroupReader, list_my_groups
from syncer.simulator import Simulator, World


@pytest.fixture
def world() -> World:
    return World.generate(groups=6, members=300, seed=3)


def test_bodies_held_at_once_stay_within_the_budget_plus_one_document(
    sim: Simulator, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in sim.env.items():  # the SDK in this process talks to the simulator
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    client, data = groups_client(sim, retries=2)
    listings = list_my_groups(client, ("active",)).mine
    sizes = {g.id: len(raw_get(sim, data["access_token"], g.id).content) for g in listings}
    budget = 4096  # smaller than most documents here: each of those must overdraw, one at a time
    assert sum(size > budget for size in sizes.values()) >= 3

    read: dict[str, GroupRead] = {}
    with GroupReader(client, listings, AdaptiveLimit(4), threading.Event(), max_bytes=budget) as reader:
        for listing, outcome in reader:
            assert isinstance(outcome, GroupRead), outcome
            read[listing.id] = outcome
            # whatever is being received or waits: the budget and one document beyond it
            assert reader.budget.held <= budget + max(sizes.values())
        assert reader.budget.held == 0  # every body given back once recorded
        assert reader.budget.peak <= budget + max(sizes.values())
        assert reader.budget.peak < sum(sizes.values())
    assert sorted(read) == sorted(my_active_groups(world))
    got = {(gid, m.identity_id): (m.role, m.status) for gid, r in read.items() for m in r.memberships}
    assert got == expected_state(world)


@pytest.mark.slow
def test_a_sync_of_groups_larger_than_the_budget_records_them_whole(tmp_path: Path) -> None:
    """Through `syncer sync`: two groups whose documents each exceed the default budget."""
    big = World.generate(groups=2, members=45_000, seed=9)
    with big.lock:
        body, _ = big.render_group(my_active_groups(big)[0], big.me, include_memberships=True)
    assert len(body) > MAX_BODY_BYTES
    sim = Simulator(big, port=0, record_reads=False).start()
    try:
        env = make_env(tmp_path, sim, big)
        assert env.login().returncode == 0
        result = env.run("sync", timeout=900)
        assert result.returncode == 0, result.output
        assert current_state(env) == expected_state(big)
    finally:
        ISSUED_TOKENS.update(sim.issued_tokens)
        sim.stop()
