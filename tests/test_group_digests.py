"""Unchanged groups are not diffed, and that never hides a change.

A group whose answer has the digest stored with its rows is skipped (neither parsed
nor diffed). These tests change every recorded field of a membership and of a group
in turn between two ``syncer sync`` runs against the simulator and check that each
is recorded, that exactly the groups whose answers changed were diffed, and that a
run that failed after it had applied a changed group, a digest made by other parsing
rules (an upgrade), and a schema upgrade leave no digest that could hide a change.
"""

from __future__ import annotations

import json
import re
import sys
import typing as t
from pathlib import Path

import pytest
from conftest import Env, Result, make_env, record
from helpers import admin_groups, my_active_groups, others

from syncer.globus.globus_groups import GroupListing, digest_rules, group_digest
from syncer.simulator import World
from syncer.storage.database import connect
from syncer.storage.schema import ensure_schema

# The recorded fields, as the views show them.
GROUP_FIELDS = (
    "name", "description", "parent_id", "group_type", "group_visibility",
    "group_members_visibility", "members_view", "my_role", "my_status",
)
MEMBERSHIP_FIELDS = ("username", "role", "status", "status_reason", "membership_fields", "updated")
IDENTITY_FIELDS = ("username", "name", "email", "institution")


def sync(env: Env, *extra: str) -> Result:
    """``syncer -v sync``: the debug log says how many groups were not diffed."""
    result = env.run("-v", "sync", *extra)
    assert result.returncode == 0, result.output
    return result


def not_diffed(result: Result) -> int:
    found = re.findall(r"(\d+) of the groups read were unchanged since their last read", result.stderr)
    assert len(found) == 1, result.stderr
    return int(found[0])


def members_view(world: World, gid: str) -> str:
    mine = world.my_membership(gid)
    assert mine is not None
    if mine.status != "active":
        return "own"
    if mine.role in ("admin", "manager"):
        return "all"
    return "active" if world.groups[gid]["policies"]["group_members_visibility"] == "members" else "own"


def mine_username(world: World) -> str:
    return world.identities[world.me]["username"]


def expected(world: World) -> tuple[dict[str, tuple[t.Any, ...]], dict[tuple[str, str], tuple[t.Any, ...]],
                                    dict[str, tuple[t.Any, ...]]]:
    """Every recorded field of the identity's groups, their memberships and the identities
    in them, as the documents the simulator serves say."""
    groups, memberships, identities = {}, {}, {}
    with world.lock:
        for gid in my_active_groups(world):
            doc = world.group_doc(gid)
            assert doc is not None
            mine = world.my_membership(gid)
            groups[gid] = (
                doc["name"], doc["description"], doc["parent_id"], doc["group_type"],
                doc["policies"]["group_visibility"], doc["policies"]["group_members_visibility"],
                members_view(world, gid), mine.role, mine.status,
            )
            if members_view(world, gid) == "own":
                # only the identity's own membership, taken from the listing's slim entry
                memberships[(gid, world.me)] = (mine_username(world), mine.role, mine.status, None, {}, None)
                continue
            for m in doc.get("memberships", []):
                memberships[(gid, m["identity_id"])] = (
                    m["username"], m["role"], m["status"], m["status_reason"], m["membership_fields"], m["updated"],
                )
                fields = m["membership_fields"]
                if fields:
                    identities[m["identity_id"]] = (
                        m["username"], fields["name"], fields["email"], fields["institution"],
                    )
    return groups, memberships, identities


def recorded(env: Env) -> tuple[dict[str, tuple[t.Any, ...]], dict[tuple[str, str], tuple[t.Any, ...]],
                                dict[str, tuple[t.Any, ...]]]:
    groups = {r["id"]: tuple(r[f] for f in GROUP_FIELDS)
              for r in env.query(f"SELECT id, {', '.join(GROUP_FIELDS)} FROM groups WHERE removed_at IS NULL")}
    memberships = {
        (r["group_id"], r["identity_id"]): (
            r["username"], r["role"], r["status"], r["status_reason"], json.loads(r["membership_fields"]), r["updated"],
        )
        for r in env.query(f"SELECT group_id, identity_id, {', '.join(MEMBERSHIP_FIELDS)} FROM memberships")
    }
    identities = {r["id"]: tuple(r[f] for f in IDENTITY_FIELDS)
                  for r in env.query(f"SELECT id, {', '.join(IDENTITY_FIELDS)} FROM identities")}
    return groups, memberships, identities


def assert_recorded_as_served(env: Env) -> None:
    groups, memberships, identities = expected(env.world)
    got_groups, got_memberships, got_identities = recorded(env)
    assert got_groups == groups
    assert got_memberships == memberships
    # identities no longer in any group keep their last details: compare those in one
    assert {i: got_identities[i] for i in identities} == identities


def rendered(world: World) -> dict[str, bytes]:
    """Each of the identity's groups as the simulator serves it now, with its listing entry."""
    with world.lock:
        return {gid: world.render_group(gid)[0] + repr(world.my_membership(gid)).encode()  # type: ignore[index]
                for gid in my_active_groups(world)}


def edit_identity(world: World, identity_id: str, **fields: str) -> None:
    """Change an identity's details as Globus would show them in every group (the
    World has no mutator for these; its caches are dropped by hand)."""
    with world.lock:
        world.identities[identity_id].update(fields)
        world.invalidate_caches()


def edit_group(world: World, gid: str, **fields: t.Any) -> None:
    with world.lock:
        world.groups[gid].update(fields)
        world.invalidate_caches()


def edit_membership(world: World, gid: str, identity_id: str, **fields: t.Any) -> None:
    with world.lock:
        membership = world.groups[gid]["memberships"][identity_id]
        for key, value in fields.items():
            setattr(membership, key, value)
        world.invalidate_caches()


def test_each_recorded_field_changed_in_turn_is_recorded_with_the_skip_in_place(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    admin = admin_groups(world)[0]
    plain = next(gid for gid in my_active_groups(world) if world.my_membership(gid).role == "member")
    member = others(world, admin)[0]
    other = others(world, admin)[1]
    newcomer_box: list[str] = []

    sync(env)
    assert_recorded_as_served(env)
    groups = len(my_active_groups(world))
    assert env.query("SELECT count(*) FROM group_digests")[0][0] == groups
    # nothing changed: no group is diffed, and every group's last read moves on
    result = sync(env)
    assert not_diffed(result) == groups
    assert {r["last_seen"] for r in env.query("SELECT last_seen FROM groups")} == {
        env.query("SELECT started_at FROM sync_runs WHERE id = 2")[0][0]}
    assert env.query("SELECT memberships FROM sync_runs WHERE id = 2")[0][0] == \
        env.query("SELECT memberships FROM sync_runs WHERE id = 1")[0][0]

    changes: list[tuple[str, t.Callable[[], None]]] = [
        # a membership's fields
        ("role", lambda: world.set_role(admin, member, "manager")),
        ("status", lambda: world.set_status(admin, other, "removed")),
        ("status back", lambda: world.set_status(admin, other, "active")),
        ("updated alone", lambda: edit_membership(world, admin, member, updated="2031-01-02T03:04:05.000000+00:00")),
        ("status_reason alone", lambda: edit_membership(world, admin, member, extra={"status_reason": "why not"})),
        ("username", lambda: edit_identity(world, member, username="renamed@example.org")),
        ("name", lambda: edit_identity(world, member, name="A. New Name")),
        ("email", lambda: edit_identity(world, member, email="new@example.org")),
        ("institution", lambda: edit_identity(world, member, institution="Elsewhere University")),
        ("member removed", lambda: world.remove_member(admin, other)),
        ("member added", lambda: newcomer_box.append(world.add_member(admin))),
        # a group's fields
        ("group name", lambda: world.rename_group(admin, "A New Name")),
        ("description", lambda: edit_group(world, admin, description="Now described")),
        ("parent_id", lambda: edit_group(world, admin, parent_id=plain)),
        ("group_type", lambda: edit_group(world, admin, group_type="plus")),
        ("group_visibility", lambda: world.set_policy(admin, group_visibility="private"
                                                      if world.groups[admin]["policies"]["group_visibility"]
                                                      != "private" else "authenticated")),
        # members_view of a plain member's group moves between 'active' and 'own'
        ("group_members_visibility", lambda: world.set_policy(plain, members_visibility="managers"
                                                              if world.groups[plain]["policies"][
                                                                  "group_members_visibility"] == "members"
                                                              else "members")),
        # my role: members_view 'all' becomes 'active' or 'own', and my_role changes
        ("my role", lambda: world.set_role(admin, world.me, "member")),
    ]
    for what, change in changes:
        before = rendered(world)
        change()
        after = rendered(world)
        touched = {gid for gid in after if after[gid] != before.get(gid)}
        assert touched, f"{what}: the change changed no answer"
        result = sync(env)
        assert not_diffed(result) == groups - len(touched), what
        assert_recorded_as_served(env)
        if what == "member added":
            assert (admin, newcomer_box[0]) in recorded(env)[1]

    # and the database kept with skips holds what a fresh sync of the same world records
    (env.tmp / "fresh").mkdir()
    fresh = make_env(env.tmp / "fresh", env.sim, world)
    fresh.vars.update({k: env.vars[k] for k in ("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME")})
    fresh.write_config(database=str(env.tmp / "fresh" / "groups.db"), token_storage=str(env.tokens))
    result = fresh.run("sync")
    assert result.returncode == 0, result.output
    fresh_groups, fresh_memberships, fresh_identities = recorded(fresh)
    kept_groups, kept_memberships, kept_identities = recorded(env)
    assert (fresh_groups, fresh_memberships) == (kept_groups, kept_memberships)
    # identities in no group any more are kept, as they were last seen
    assert {i: kept_identities[i] for i in fresh_identities} == fresh_identities


def test_a_failed_run_leaves_no_digest_of_what_it_had_applied(logged_in: Env) -> None:
    """With one read in flight, the first group is read, diffed and its digest written
    (in the run's transaction) before the second read fails the whole run (a 401 that
    renewing does not cure: exit 77). Everything the run applied is rolled back, its
    digest too, so the next run records the change."""
    env, world = logged_in, logged_in.world
    first, second = sorted(my_active_groups(world))[:2]
    env.write_config(concurrency=1, groups=[first, second])
    sync(env)
    stored = env.query("SELECT d.digest FROM group_digests d JOIN group_state g ON g.key = d.group_key WHERE g.id = ?",
                       [first])[0][0]

    world.rename_group(first, "Renamed Before The Failure")
    env.sim.faults.set_group_error(second, 401)
    result = env.run("-v", "sync")
    assert result.returncode == 77, result.output
    assert env.query("SELECT status FROM sync_runs ORDER BY id DESC LIMIT 1")[0][0] == "failed"
    assert env.query("SELECT name FROM groups WHERE id = ?", [first])[0][0] != "Renamed Before The Failure"
    assert env.query("SELECT d.digest FROM group_digests d JOIN group_state g ON g.key = d.group_key WHERE g.id = ?",
                     [first])[0][0] == stored

    env.sim.faults.clear()
    result = sync(env)
    assert not_diffed(result) == 1  # the second group; the first is diffed
    assert env.query("SELECT name FROM groups WHERE id = ?", [first])[0][0] == "Renamed Before The Failure"
    assert env.query("SELECT count(*) FROM group_history WHERE group_id = ?", [first])[0][0] == 2


def test_a_group_that_failed_to_read_is_diffed_at_its_next_good_read(logged_in: Env) -> None:
    """A failed read (partial run) leaves the group's rows as they were and drops its
    digest: the next good read, even of the very answer its rows came from, is diffed,
    so nothing a run records about a failed group outlives it through a skip."""
    env, world = logged_in, logged_in.world
    broken = admin_groups(world)[0]
    groups = len(my_active_groups(world))
    sync(env)
    rows_before = env.query("SELECT * FROM memberships WHERE group_id = ? ORDER BY identity_id", [broken])
    env.sim.faults.set_group_error(broken, 500)
    result = env.run("-v", "sync")
    assert result.returncode == 3, result.output
    assert not_diffed(result) == groups - 1
    assert env.query("SELECT * FROM memberships WHERE group_id = ? ORDER BY identity_id", [broken]) == rows_before
    assert not env.query(
        "SELECT 1 FROM group_digests d JOIN group_state g ON g.key = d.group_key WHERE g.id = ?", [broken])

    env.sim.faults.clear()
    assert not_diffed(sync(env)) == groups - 1  # the broken group, unchanged, is diffed
    assert not_diffed(sync(env)) == groups
    assert_recorded_as_served(env)


# An older release: other parsing rules (it did not keep descriptions) and its digests.
OLDER_RELEASE = """
import sys
import syncer.globus.globus_groups as groups
groups._DIGEST_RULES = groups.digest_rules(version="0.1.0", rules="0")
parse = groups.parse_group
def older_parse(listing, data):
    read = parse(listing, data)
    read.group = read.group._replace(description=None)
    return read
groups.parse_group = older_parse
sys.argv[0] = "syncer"
from syncer.cli import main
main()
"""


def run_older_release(env: Env, *args: str) -> Result:
    import subprocess

    proc = subprocess.run([sys.executable, "-c", OLDER_RELEASE, *args], env=env.vars, cwd=env.tmp,
                          text=True, capture_output=True, timeout=120)
    record(proc.stdout, proc.stderr)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_digests_made_by_other_parsing_rules_never_skip_a_group(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    admin = admin_groups(world)[0]
    edit_group(world, admin, description="Kept only by the newer release")
    result = run_older_release(env, "-v", "sync")
    assert result.returncode == 0, result.output
    assert not_diffed(result) == 0
    result = run_older_release(env, "-v", "sync")
    assert not_diffed(result) == len(my_active_groups(world))  # the older release skips its own
    assert env.query("SELECT description FROM groups WHERE id = ?", [admin])[0][0] is None

    # the world did not change, but the rules did: every group is diffed once
    result = sync(env)
    assert not_diffed(result) == 0
    assert env.query("SELECT description FROM groups WHERE id = ?", [admin])[0][0] == "Kept only by the newer release"
    assert_recorded_as_served(env)
    assert not_diffed(sync(env)) == len(my_active_groups(world))


def test_group_gone_and_back_is_diffed_in_full(logged_in: Env) -> None:
    """A group the identity left loses its digest: when it is back, with the same
    answer as before it went, it is recorded as back, not skipped as unchanged."""
    env, world = logged_in, logged_in.world
    gid = admin_groups(world)[0]
    sync(env)
    world.set_status(gid, world.me, "left")
    sync(env)
    assert env.query("SELECT removed_at FROM groups WHERE id = ?", [gid])[0][0] is not None
    assert not env.query("SELECT 1 FROM group_digests d JOIN group_state g ON g.key = d.group_key WHERE g.id = ?", [gid])
    # back, with the same role, status and members as before it went
    world.set_status(gid, world.me, "active")
    sync(env)
    assert env.query("SELECT removed_at FROM groups WHERE id = ?", [gid])[0][0] is None
    assert_recorded_as_served(env)


def test_a_schema_upgrade_forgets_every_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any migration may change how rows are recorded, so a database any migration
    changed diffs every group at its next read."""
    import syncer.storage.schema as schema

    db = connect(tmp_path / "groups.db")
    ensure_schema(db)
    db.execute("INSERT INTO sync_runs (started_at, status) VALUES ('2026-01-01T00:00:00.000000Z', 'ok')")
    db.execute("INSERT INTO group_state (id, members_view, first_run, last_run) VALUES ('g', 'all', 1, 1)")
    db.execute("INSERT INTO group_digests VALUES (1, x'00', 3)")
    db.conn.commit()
    ensure_schema(db)  # nothing pending: kept
    assert db.execute("SELECT count(*) FROM group_digests").fetchone()[0] == 1

    later = schema.Migrations("syncer")
    later._migrations = list(schema.migrations._migrations)  # the release's migrations, plus one
    later(name="9999_a_later_release")(lambda db: db.execute("CREATE TABLE later (x)"))
    monkeypatch.setattr(schema, "migrations", later)
    ensure_schema(db)
    assert db.execute("SELECT count(*) FROM group_digests").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM group_state").fetchone()[0] == 1
    db.close()


def test_a_database_from_before_digests_is_upgraded_empty(tmp_path: Path) -> None:
    import syncer.storage.schema as schema

    path = tmp_path / "groups.db"
    db = connect(path)
    schema.migrations.apply(db, stop_before="0008_group_digests")
    assert not db["group_digests"].exists()
    ensure_schema(db)
    assert db["group_digests"].exists()
    assert db.execute("SELECT count(*) FROM group_digests").fetchone()[0] == 0
    db.close()


LISTING = GroupListing(id="g1", name="Group", my_role="admin", my_status="active", members_visibility="managers")


@pytest.mark.parametrize("change", [
    {"name": "Other"}, {"my_role": "member"}, {"my_status": "invited"}, {"members_visibility": "members"},
])
def test_the_digest_covers_every_field_of_the_listing_entry(change: dict[str, str]) -> None:
    import dataclasses

    body = b'{"id": "g1", "name": "Group", "memberships": []}'
    assert group_digest(LISTING, body, "application/json") == group_digest(LISTING, body, "application/json")
    assert group_digest(dataclasses.replace(LISTING, **change), body, "application/json") != \
        group_digest(LISTING, body, "application/json")


def test_the_digest_covers_the_body_the_content_type_and_the_rules() -> None:
    body = b'{"id": "g1", "name": "Group", "memberships": []}'
    digest = group_digest(LISTING, body, "application/json")
    assert group_digest(LISTING, body.replace(b"Group", b"Groun"), "application/json") != digest
    assert group_digest(LISTING, body, "application/json; charset=latin-1") != digest
    assert group_digest(LISTING, body, "application/json", rules=digest_rules(rules="2")) != digest
    assert group_digest(LISTING, body, "application/json", rules=digest_rules(version="9.9.9")) != digest
    assert group_digest(LISTING, body, "application/json", rules=digest_rules()) == digest


def test_unchanged_groups_are_not_parsed(logged_in: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The skip comes before the parse: of a run's answers, only the changed group's is
    parsed. (A sync in this process, its parse counted; the simulator over HTTP.)"""
    import syncer.globus.globus_groups as groups_module
    from syncer.config import load_config
    from syncer.operations.sync import run_sync

    env, world = logged_in, logged_in.world
    sync(env)
    changed = admin_groups(world)[0]
    world.rename_group(changed, "Parsed Again")
    for key, value in env.sim.env.items():
        monkeypatch.setenv(key, value)
    parsed: list[str] = []
    parse = groups_module.parse_group

    def counting_parse(listing: GroupListing, data: t.Any) -> t.Any:
        parsed.append(listing.id)
        return parse(listing, data)

    monkeypatch.setattr(groups_module, "parse_group", counting_parse)
    run = run_sync(load_config(env.config))
    assert run.status == "ok"
    assert parsed == [changed]
    assert run.groups_synced == len(my_active_groups(world))
    assert env.query("SELECT name FROM groups WHERE id = ?", [changed])[0][0] == "Parsed Again"
