"""Memory bounded by the bytes in flight, not by the largest group: group documents are
received as streams within a byte budget, one document at a time may overdraw it, and
every group still arrives whole. (The figures, peak RSS of eight 100,000-member groups
beside the 10,000x100 world, are benchmarks/bench.py --memory's.)"""

from __future__ import annotations

import json
import threading
import typing as t
from pathlib import Path

import pytest
from conftest import ISSUED_TOKENS, make_env
from helpers import admin_groups, current_state, expected_state, my_active_groups
from test_faults import group_rows
from test_simulator import groups_client, raw_get

from syncer.globus.globus_groups import (
    MAX_BODY_BYTES,
    STREAM_BYTES,
    AdaptiveLimit,
    GroupListing,
    GroupRead,
    GroupReader,
    GroupReadError,
    GroupRow,
    MembershipPieces,
    MembershipRow,
    list_my_groups,
    parse_group,
    parse_group_stream,
)
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


# ------------------------------------------- large documents parsed as streams

LISTING = GroupListing(id="g-1", name="G", my_role="admin", my_status="active", members_visibility="managers")
OWN_ONLY = GroupListing(
    id="g-1", name="G", my_role="member", my_status="active", members_visibility="managers",
    own=(MembershipRow("g-1", "me", "me@x", "member", "active", None, "{}", None, None, None, None),),
)


def member(n: int, **changes: t.Any) -> dict[str, t.Any]:
    doc = {"identity_id": f"id-{n:04d}", "username": f"user{n}@example.org", "role": "member", "status": "active",
           "status_reason": None, "updated": "2026-01-01T00:00:00+00:00",
           "membership_fields": {"name": f"Näme {n} 😀", "email": f"u{n}@example.org", "institution": "Inst",
                                 "score": 1.5, "count": n}}
    doc.update(changes)
    return doc


def group_body(members: t.Any = None, **changes: t.Any) -> dict[str, t.Any]:
    doc = {"id": "g-1", "name": "G", "description": "d", "parent_id": None, "group_type": "regular",
           "enforce_session": True, "session_limit": 28800,
           "policies": {"group_visibility": "private", "group_members_visibility": "managers",
                        "is_high_assurance": True, "authentication_assurance_timeout": 3600},
           "memberships": [member(n) for n in range(7)] if members is None else members}
    doc.update(changes)
    return doc


def as_loaded(listing: GroupListing, body: bytes) -> tuple[GroupRow, list[MembershipRow]] | str:
    """What the whole-body path makes of a body: the group and its rows, or the error."""
    try:
        read = parse_group(listing, json.loads(body))
    except GroupReadError as err:
        return str(err)
    except ValueError:
        return "the answer is not JSON"
    assert isinstance(read.memberships, list)
    return read.group, sorted(read.memberships)


def as_streamed(listing: GroupListing, body: bytes) -> tuple[GroupRow, list[MembershipRow]] | str:
    """What the streamed path makes of the same body, its pieces (of 2 rows) gathered."""
    try:
        read = parse_group_stream(listing, bytearray(body), piece_rows=2)
        pieces = [list(read.memberships)] if isinstance(read.memberships, list) else list(read.memberships)
    except GroupReadError as err:
        return str(err)
    rows = [row for piece in pieces for row in piece]
    if not isinstance(read.memberships, list):
        assert all(1 <= len(piece) <= 2 for piece in pieces[:-1])
    # one row per identity (a repeated identity's counting entry replaces its first when staged)
    return read.group, sorted({row.identity_id: row for row in rows}.values())


DUPLICATES_FAR_APART = [
    member(0), *[member(n) for n in range(1, 6)],
    member(0, role="admin", source_group_id="sub-1"),  # implicit admin beside explicit member: explicit counts
    member(9, role="member", source_group_id="sub-1"),
    *[member(n) for n in range(10, 14)],
    member(9, role="manager", source_group_id="sub-2"),  # the highest role among implicit ones
    member(9, role="manager", status="invited", source_group_id="sub-3"),  # then the best status
]


@pytest.mark.parametrize(("listing", "body"), [
    pytest.param(LISTING, json.dumps(group_body()).encode(), id="plain"),
    pytest.param(LISTING, json.dumps(group_body(), ensure_ascii=False, indent=2).encode(), id="utf8-indented"),
    pytest.param(LISTING, json.dumps(group_body(DUPLICATES_FAR_APART), ensure_ascii=False).encode(),
                 id="duplicates-far-apart-utf8"),
    pytest.param(LISTING, json.dumps(group_body(DUPLICATES_FAR_APART)).encode(), id="duplicates-far-apart"),
    pytest.param(LISTING, json.dumps(group_body([member(n, membership_fields=None, updated=None, username=None)
                                                for n in range(5)])).encode(), id="slim-and-nulls"),
    pytest.param(LISTING, json.dumps({"memberships": [member(1)], **group_body(), "name": "last wins"}).encode(),
                 id="memberships-first-repeated-key"),
    pytest.param(LISTING, json.dumps(group_body([])).encode(), id="empty-list"),
    pytest.param(LISTING, json.dumps(group_body([*[member(n) for n in range(6)], member(6, role="owner")])).encode(),
                 id="bad-entry-last"),
    pytest.param(LISTING, json.dumps(group_body([*[member(n) for n in range(6)], 42])).encode(), id="junk-entry-last"),
    pytest.param(LISTING, json.dumps(group_body([*[member(n) for n in range(6)], member(6, status=None)])).encode(),
                 id="null-status-last"),
    pytest.param(LISTING, json.dumps(group_body({"a": member(1)})).encode(), id="memberships-object"),
    pytest.param(LISTING, json.dumps(group_body(None, memberships=None)).encode(), id="memberships-null"),
    pytest.param(LISTING, json.dumps({k: v for k, v in group_body().items() if k != "memberships"}).encode(),
                 id="memberships-missing"),
    pytest.param(LISTING, json.dumps(group_body(name=None)).encode(), id="name-null"),
    pytest.param(LISTING, json.dumps(group_body(id="g-2")).encode(), id="another-group"),
    pytest.param(LISTING, json.dumps([group_body()]).encode(), id="a-list"),
    pytest.param(LISTING, json.dumps(group_body()).encode()[:-40], id="truncated"),
    pytest.param(LISTING, json.dumps(group_body()).encode() + b" {}", id="trailing-garbage"),
    pytest.param(LISTING, b"<html>busy</html>", id="not-json"),
    pytest.param(LISTING, b"", id="empty-body"),
    pytest.param(LISTING, json.dumps(group_body([member(1, membership_fields={"x": float("nan")})])).encode(),
                 id="nan-which-json-loads-accepts"),
    pytest.param(LISTING, b"\xef\xbb\xbf" + json.dumps(group_body()).encode(), id="utf8-bom"),
    pytest.param(LISTING, json.dumps(group_body()).encode("utf-16"), id="utf-16"),
    pytest.param(LISTING, json.dumps(group_body([member(1, username="a\ud800b")])).encode(), id="lone-surrogate"),
    pytest.param(LISTING, json.dumps(group_body([member(1, membership_fields={"n": 10**30})])).encode(), id="big-int"),
    pytest.param(LISTING, b'{"id": "g-1", "name": "G", "memberships": [' + b'{"identity_id": "x\xff", "role": "member",'
                 b' "status": "active"}]}', id="invalid-utf8"),
    pytest.param(LISTING, json.dumps({**group_body(), "memberships.item": member(99)}).encode(), id="dotted-key"),
    pytest.param(LISTING, b'{"id": "g-1", "name": "G", "memberships": [], "memberships": [' + json.dumps(member(1)).encode()
                 + b"]}", id="memberships-twice"),
    pytest.param(OWN_ONLY, json.dumps(group_body()).encode(), id="own-view-ignores-the-list"),
    pytest.param(OWN_ONLY, json.dumps(group_body({"junk": 1})).encode(), id="own-view-whatever-the-list"),
])
def test_a_streamed_parse_records_what_a_whole_parse_does(listing: GroupListing, body: bytes) -> None:
    """Every rule parse_group enforces holds on the streamed path, with the same message."""
    assert as_streamed(listing, body) == as_loaded(listing, body)


@pytest.mark.parametrize(("body", "streamed"), [
    (json.dumps(group_body()).encode(), True),  # emoji as escaped pairs
    (json.dumps(group_body(), ensure_ascii=False).encode(), True),
    (json.dumps(group_body(DUPLICATES_FAR_APART)).encode(), True),
    (json.dumps(group_body([member(1, username="a\ud800b")])).encode(), False),  # yajl would make it "?"
    (json.dumps(group_body([member(1, username="\udc00")])).encode(), False),
    (json.dumps(group_body([member(1, membership_fields={"x": float("nan")})])).encode(), False),
    (b"\xef\xbb\xbf" + json.dumps(group_body()).encode(), False),
])
def test_the_stream_takes_every_document_it_reads_as_json_loads_does(body: bytes, streamed: bool) -> None:
    read = parse_group_stream(LISTING, bytearray(body))
    assert isinstance(read.memberships, MembershipPieces) == streamed


def test_identities_whose_hashes_collide_are_still_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream keeps only a hash per identity: with every hash the same, each entry
    after the first is held back and sorted out by identity at the end, as whole."""
    import syncer.globus.globus_groups as groups_module

    monkeypatch.setattr(groups_module, "hash", lambda value: 7, raising=False)
    body = json.dumps(group_body(DUPLICATES_FAR_APART)).encode()
    assert as_streamed(LISTING, body) == as_loaded(LISTING, body)


def test_a_streamed_document_is_decoded_piece_by_piece() -> None:
    """The pieces come while the list is read: the first before a bad last entry fails it."""
    body = json.dumps(group_body([*[member(n) for n in range(10)], member(10, role="owner")])).encode()
    read = parse_group_stream(LISTING, bytearray(body), piece_rows=3)
    pieces = iter(t.cast(t.Iterable[list[MembershipRow]], read.memberships))
    assert [row.identity_id for row in next(pieces)] == ["id-0000", "id-0001", "id-0002"]
    with pytest.raises(GroupReadError, match=r"memberships\[10\]: role"):
        list(pieces)


def test_large_groups_stream_through_sync_and_a_late_bad_entry_records_nothing_of_its_group(tmp_path: Path) -> None:
    """Through `syncer sync`: groups whose documents are over STREAM_BYTES are recorded as
    the world says, duplicates far apart count by SPEC's rule, and a group whose last
    entry (or second half) is broken is left exactly as it was while the others record."""
    big = World.generate(groups=4, members=3_000, seed=5)
    groups = admin_groups(big)
    with big.lock:
        sizes = [len(big.render_group(gid, big.me, include_memberships=True)[0]) for gid in groups[:2]]
    assert min(sizes) >= STREAM_BYTES
    sim = Simulator(big, port=0, record_reads=False).start()
    try:
        env = make_env(tmp_path, sim, big)
        assert env.login().returncode == 0
        gid, other = groups[:2]
        explicit = next(i for i, m in big.groups[gid]["memberships"].items()
                        if i != big.me and m.role == "member" and m.status == "active")
        # listed first among the explicit ones, again at the list's end as an implicit admin
        big.add_implicit_membership(gid, explicit, other, role="admin")
        implicit_only = "0b0e1c4a-2f33-4b5e-9f0a-5d7c1e2a3b4c"
        big.add_implicit_membership(gid, implicit_only, other, role="manager")
        big.add_implicit_membership(gid, implicit_only, groups[-1], role="member")
        result = env.run("sync", timeout=600)
        assert result.returncode == 0, result.output
        state = current_state(env)
        assert state[(gid, explicit)] == ("member", "active")
        assert state[(gid, implicit_only)] == ("manager", "active")
        assert {k: v for k, v in state.items() if k[1] != implicit_only} == expected_state(big)

        for kind in ("last_entry_bad", "truncated"):
            before = group_rows(env, gid)
            newcomer = big.add_member(other)
            big.add_member(gid)  # a change the broken read must not record
            sim.faults.malformed[gid] = kind
            result = env.run("sync", timeout=600)
            assert result.returncode == 3, result.output
            warned = [line for line in result.stderr.splitlines() if gid in line]
            assert len(warned) == 1, result.stderr
            assert ("memberships[" in warned[0]) == (kind == "last_entry_bad"), warned
            assert group_rows(env, gid) == before
            assert current_state(env)[(other, newcomer)] == ("member", "active")
            sim.faults.clear()

        result = env.run("sync", timeout=600)
        assert result.returncode == 0, result.output
        assert {k: v for k, v in current_state(env).items() if k[1] != implicit_only} == expected_state(big)
    finally:
        ISSUED_TOKENS.update(sim.issued_tokens)
        sim.stop()
