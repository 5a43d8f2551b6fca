"""What the database should hold, computed from the simulator's world (the ground truth)."""

from __future__ import annotations

import typing as t

from syncer.simulator import World

State = dict[tuple[str, str], tuple[str, str]]


def my_active_groups(world: World) -> list[str]:
    with world.lock:
        return [gid for gid in world.groups if (m := world.my_membership(gid)) is not None and m.status == "active"]


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
