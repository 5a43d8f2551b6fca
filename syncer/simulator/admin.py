"""The simulator's admin interface: change the world while it serves.

``POST /admin/ACTION`` with a JSON object (``GET /admin/world`` shows the world), so
a person can change memberships while ``syncer sync`` or ``syncer run`` watches:

    curl -s localhost:8765/admin/world
    curl -s -X POST localhost:8765/admin/add-member -d '{"group": "Physics Lab 0003"}'

Groups are named by id or current name, identities by id or username ("me": the
identity a browser login logs in as). Every action goes through a ``World`` mutator,
so it is logged and invalidates cached renderings like any other change.
"""

from __future__ import annotations

import json
import typing as t

from .world import World


class AdminError(Exception):
    """A request the admin interface refuses: HTTP ``status`` and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _text(payload: dict[str, t.Any], key: str, default: str | None = None) -> str:
    value = payload.get(key, default)
    if not isinstance(value, str) or not value:
        raise AdminError(400, f"{key!r} must be a non-empty string")
    return value


def _group(world: World, payload: dict[str, t.Any]) -> str:
    ref = _text(payload, "group")
    if ref in world.groups:
        return ref
    named = [gid for gid, g in world.groups.items() if g["name"] == ref]
    if len(named) == 1:
        return named[0]
    if named:
        raise AdminError(400, f"group name {ref!r} is ambiguous: {', '.join(named)}")
    raise AdminError(404, f"no group {ref!r}")


def _identity(world: World, payload: dict[str, t.Any], default: str | None = None) -> str:
    ref = _text(payload, "identity", default)
    if ref == "me":
        return world.me
    if ref in world.identities:
        return ref
    for iid, ident in world.identities.items():
        if ident.get("username") == ref:
            return iid
    raise AdminError(404, f"no identity {ref!r}")


def _member(world: World, group_id: str, identity_id: str) -> None:
    if identity_id not in world.groups[group_id]["memberships"]:
        raise AdminError(404, f"{identity_id} is not in group {group_id}")


def _summary(world: World) -> dict[str, t.Any]:
    return {
        "me": {"id": world.me, "username": world.identities[world.me]["username"]},
        "version": world.version,
        "groups": [
            {
                "id": gid,
                "name": g["name"],
                "my_role": (mine.role if (mine := g["memberships"].get(world.me)) else None),
                "my_status": mine.status if mine else None,
                "members": len(g["memberships"]),
            }
            for gid, g in world.groups.items()
        ],
        "clients": sorted(world.clients),
    }


def apply(world: World, method: str, action: str, body: bytes) -> dict[str, t.Any]:
    """Carry out one admin request; return the JSON answer or raise ``AdminError``."""
    if action == "world":
        if method != "GET":
            raise AdminError(405, "use GET")
        with world.lock:
            return _summary(world)
    handler = _ACTIONS.get(action)
    if handler is None:
        raise AdminError(404, f"no admin action {action!r} (one of: world, {', '.join(_ACTIONS)})")
    if method != "POST":
        raise AdminError(405, "use POST with a JSON object")
    try:
        payload = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise AdminError(400, "the body must be a JSON object") from None
    if not isinstance(payload, dict):
        raise AdminError(400, "the body must be a JSON object")
    with world.lock:
        try:
            return handler(world, payload)
        except ValueError as err:  # the World's own checks (a role, a status, a duplicate)
            raise AdminError(400, str(err)) from None


def _add_member(world: World, payload: dict[str, t.Any]) -> dict[str, t.Any]:
    gid = _group(world, payload)
    identity = _identity(world, payload) if "identity" in payload else None  # none: a new identity
    iid = world.add_member(gid, identity, role=payload.get("role", "member"), status=payload.get("status", "active"))
    return {"group_id": gid, "identity_id": iid, "username": world.identities[iid]["username"]}


def _remove_member(world: World, payload: dict[str, t.Any]) -> dict[str, t.Any]:
    gid, iid = _group(world, payload), _identity(world, payload)
    _member(world, gid, iid)
    world.remove_member(gid, iid)
    return {"group_id": gid, "identity_id": iid}


def _set_role(world: World, payload: dict[str, t.Any]) -> dict[str, t.Any]:
    gid, iid = _group(world, payload), _identity(world, payload)
    _member(world, gid, iid)
    world.set_role(gid, iid, _text(payload, "role"))
    return {"group_id": gid, "identity_id": iid, "role": payload["role"]}


def _set_status(world: World, payload: dict[str, t.Any]) -> dict[str, t.Any]:
    gid, iid = _group(world, payload), _identity(world, payload)
    _member(world, gid, iid)
    world.set_status(gid, iid, _text(payload, "status"))
    return {"group_id": gid, "identity_id": iid, "status": payload["status"]}


def _leave(world: World, payload: dict[str, t.Any]) -> dict[str, t.Any]:
    """An identity (default: me) leaves a group: Globus keeps the membership as ``left``."""
    gid, iid = _group(world, payload), _identity(world, payload, default="me")
    _member(world, gid, iid)
    world.set_status(gid, iid, "left")
    return {"group_id": gid, "identity_id": iid, "status": "left"}


def _rename_group(world: World, payload: dict[str, t.Any]) -> dict[str, t.Any]:
    gid = _group(world, payload)
    world.rename_group(gid, _text(payload, "name"))
    return {"group_id": gid, "name": payload["name"]}


def _add_client(world: World, payload: dict[str, t.Any]) -> dict[str, t.Any]:
    """Register a confidential client that is a member (``role``, default admin) of ``groups``."""
    refs = payload.get("groups", [])
    if not isinstance(refs, list):
        raise AdminError(400, "'groups' must be a list of group ids or names")
    groups = [_group(world, {"group": ref}) for ref in refs]
    client_id, secret = world.add_client(
        groups, role=payload.get("role", "admin"), client_id=payload.get("client_id"), secret=payload.get("secret")
    )
    return {"client_id": client_id, "client_secret": secret, "groups": groups}


def _high_assurance(world: World, payload: dict[str, t.Any]) -> dict[str, t.Any]:
    """Designate a group high assurance (``timeout``: seconds a login stays good enough;
    null: no longer high assurance)."""
    gid = _group(world, payload)
    timeout = payload.get("timeout", 28800)
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0):
        raise AdminError(400, "'timeout' must be a number of seconds or null")
    world.set_high_assurance(gid, timeout)
    return {"group_id": gid, "is_high_assurance": timeout is not None, "authentication_assurance_timeout": timeout}


def _add_implicit(world: World, payload: dict[str, t.Any]) -> dict[str, t.Any]:
    """An identity becomes an implicit member of a group through a subgroup (``source_group``)."""
    gid, iid = _group(world, payload), _identity(world, payload)
    source = _group(world, {"group": payload.get("source_group")})
    world.add_implicit_membership(
        gid, iid, source, role=payload.get("role", "member"), status=payload.get("status", "active"))
    return {"group_id": gid, "identity_id": iid, "source_group_id": source}


_ACTIONS: dict[str, t.Callable[[World, dict[str, t.Any]], dict[str, t.Any]]] = {
    "add-member": _add_member,
    "remove-member": _remove_member,
    "set-role": _set_role,
    "set-status": _set_status,
    "leave": _leave,
    "rename-group": _rename_group,
    "add-client": _add_client,
    "high-assurance": _high_assurance,
    "add-implicit": _add_implicit,
}
