"""A database with a story, built by real syncs over the simulator, and what it must hold.

Runs, in order:
1. failed: every group read refused (a failed first run records nothing);
2. ok: the first snapshot;
3. ok: group A renamed (to a long name), someone joins A, someone leaves it, person P
   is promoted in it;
4. partial: group B cannot be read (a change made in it waits), someone leaves A;
5. ok: the view narrows (the identity is demoted to plain member of group C, whose
   members only managers may see), group D takes A's old name (now ambiguous), and
   B's change is read.

After each successful run the simulator's world (as the identity sees it) is kept as
that run's truth; for the partial run, B keeps the previous run's truth.
"""

from __future__ import annotations

import dataclasses
import typing as t

from helpers import admin_groups, my_active_groups, others

from syncer.simulator import World

LONG_NAME = "Alpha Laboratory for Cryo-Electron Microscopy and Extremely Long Group Names"


@dataclasses.dataclass(frozen=True)
class GroupTruth:
    name: str
    my_role: str
    my_status: str
    members_visible: int
    active_members: int | None


@dataclasses.dataclass
class Truth:
    """What run ``run_id`` must have recorded."""

    run_id: int
    status: str
    started_at: str
    groups: dict[str, GroupTruth]
    state: dict[tuple[str, str], tuple[str, str]]  # (group_id, identity_id) -> (role, status)

    def members(self, gid: str, every_status: bool = False) -> dict[str, tuple[str, str]]:
        return {iid: rs for (g, iid), rs in self.state.items() if g == gid and (every_status or rs[1] == "active")}


@dataclasses.dataclass
class Scenario:
    env: t.Any
    world: World
    truths: dict[int, Truth]  # successful runs only
    a: str  # renamed, joins, leaves, a promotion
    a_old_name: str
    b: str  # failed in the partial run
    c: str  # members hidden from run 5
    d: str  # takes A's old name in run 5
    p: str  # identity promoted in A in run 3
    joiner: str  # identity that joined A in run 3
    b_joiner: str  # identity added to B while it failed (recorded in run 5)

    def username(self, iid: str) -> str:
        return self.world.identities[iid]["username"]


def world_truth(world: World) -> tuple[dict[str, GroupTruth], dict[tuple[str, str], tuple[str, str]]]:
    """The identity's groups and the memberships it may see, now."""
    groups: dict[str, GroupTruth] = {}
    state: dict[tuple[str, str], tuple[str, str]] = {}
    with world.lock:
        for gid in my_active_groups(world):
            g = world.groups[gid]
            mine = world.my_membership(gid)
            visible = mine.role in ("admin", "manager") or g["policies"]["group_members_visibility"] == "members"
            seen = world.visible_memberships(gid)
            for m in seen:
                state[(gid, m["identity_id"])] = (m["role"], m["status"])
            groups[gid] = GroupTruth(
                g["name"], mine.role, mine.status, int(visible),
                sum(1 for m in seen if m["status"] == "active") if visible else None,
            )
    return groups, state


def build(env: t.Any) -> Scenario:
    world: World = env.world
    result = env.login()
    assert result.returncode == 0, result.output
    truths: dict[int, Truth] = {}

    def sync(expect_rc: int, run_id: int, keep: str | None = None) -> None:
        result = env.run("sync")
        assert result.returncode == expect_rc, result.output
        if expect_rc == 1:
            return
        row = env.query("SELECT status, started_at FROM sync_runs WHERE id = ?", [run_id])[0]
        groups, state = world_truth(world)
        if keep is not None:  # the group that failed keeps what the run before recorded
            before = truths[max(truths)]
            groups[keep] = before.groups[keep]
            state = {k: v for k, v in state.items() if k[0] != keep}
            state.update({k: v for k, v in before.state.items() if k[0] == keep})
        truths[run_id] = Truth(run_id, row["status"], row["started_at"], groups, state)

    mine = my_active_groups(world)
    for gid in mine:
        env.sim.faults.set_group_error(gid, 403)
    sync(1, 1)
    env.sim.faults.clear()
    sync(0, 2)

    a, b, c = admin_groups(world)[:3]
    d = next(gid for gid in mine if gid not in (a, b, c))
    a_old_name = world.groups[a]["name"]
    world.rename_group(a, LONG_NAME)
    joiner = world.add_member(a)
    actives = [i for i in others(world, a) if world.groups[a]["memberships"][i].status == "active" and i != joiner]
    leaver, p = actives[0], actives[1]
    world.remove_member(a, leaver)
    world.set_role(a, p, "manager" if world.groups[a]["memberships"][p].role != "manager" else "admin")
    sync(0, 3)

    env.sim.faults.set_group_error(b, 403)
    b_joiner = world.add_member(b)
    world.remove_member(a, actives[2])
    sync(3, 4, keep=b)
    env.sim.faults.clear()

    world.set_role(c, world.me, "member")
    world.set_policy(c, members_visibility="managers")
    world.rename_group(d, a_old_name)
    sync(0, 5)
    return Scenario(env, world, truths, a, a_old_name, b, c, d, p, joiner, b_joiner)


def expected_changes(before: Truth | None, after: Truth) -> set[tuple[str, str, str, str]]:
    """(group_id, identity_id, change, reason) of every row run ``after`` must add."""
    out: set[tuple[str, str, str, str]] = set()
    old = before.state if before else {}
    for key, value in after.state.items():
        if key not in old:
            first = before is None or key[0] not in before.groups or not before.groups[key[0]].members_visible
            out.add((*key, "added", "first_seen" if first else "joined"))
        elif old[key] != value:
            out.add((*key, "changed", "changed"))
    for key in old.keys() - after.state.keys():
        group = after.groups.get(key[0])
        reason = "group_gone" if group is None else "left" if group.members_visible else "hidden"
        out.add((*key, "removed", reason))
    return out


def versions(truths: dict[int, Truth], iid: str) -> set[tuple[str, str, str, str, str | None]]:
    """(group_id, role, status, from, to) of every version of ``iid``'s memberships."""
    out: set[tuple[str, str, str, str, str | None]] = set()
    open_: dict[str, tuple[str, str, str]] = {}  # group -> (role, status, from)
    for run_id in sorted(truths):
        truth = truths[run_id]
        now = {g: rs for (g, i), rs in truth.state.items() if i == iid}
        for gid, (role, status, began) in list(open_.items()):
            if now.get(gid) != (role, status):
                out.add((gid, role, status, began, truth.started_at))
                del open_[gid]
        for gid, (role, status) in now.items():
            if gid not in open_:
                open_[gid] = (role, status, truth.started_at)
    out.update((gid, role, status, began, None) for gid, (role, status, began) in open_.items())
    return out
