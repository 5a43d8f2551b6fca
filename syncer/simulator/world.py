"""In-memory model of the Globus Groups data the simulator serves.

A :class:`World` holds identities, groups and memberships, knows the
visibility rules Globus Groups applies to the member list, renders the JSON
documents the Groups API returns, and records every mutation in a change log.

It is built to be cheap at benchmark scale (10,000 groups x 100 members):
memberships are small ``__slots__`` objects keyed by identity id, timestamps
for generated data come from a shared pool of strings, and rendered group
bodies are kept in a byte-bounded LRU cache that is invalidated per group
whenever that group changes.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import re
import secrets
import threading
import time
import unicodedata
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = [
    "FORMAT_NAME",
    "GROUPS_RESOURCE_SERVER",
    "ROLES",
    "STATUSES",
    "Membership",
    "World",
    "validate_world_doc",
]

ROLES: tuple[str, ...] = ("member", "manager", "admin")
STATUSES: tuple[str, ...] = (
    "active",
    "invited",
    "pending",
    "rejected",
    "removed",
    "left",
    "declined",
)
# an own membership in one of these lets an identity view a private group
VIEWER_STATUSES: tuple[str, ...] = ("active", "invited", "pending")
VISIBILITIES: tuple[str, ...] = ("members", "managers")
GROUP_VISIBILITIES: tuple[str, ...] = ("private", "authenticated")
GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
FORMAT_NAME = "syncer-simulator-world"
FORMAT_VERSION = 1

# Generated timestamps are anchored here (not at "now") so that the same seed
# always produces byte-identical worlds.
_GEN_EPOCH = 1_704_067_200.0  # 2024-01-01T00:00:00Z
_GEN_SPAN = 2 * 365 * 86_400.0
_TS_POOL_SIZE = 4096

# Identity / group vocabulary for realistic-looking generated data. A few
# non-ASCII names are included on purpose: clients must cope with them.
_FIRST = (
    "Ada Alan Grace Katherine Dorothy Edsger Barbara Donald Margaret John "
    "Frances Radia Linus Guido Ken Dennis Bjarne Anita Shafi Leslie "
    "Tim Vint Hedy Sophie Marie Niels Lise Emmy Srinivasa Chien-Shiung "
    "José Zoë Łukasz Søren Chloé Anaïs Björn Çağla Mária Jürgen "
    "Priya Wei Yuki Amara Kwame Olga Mateo Fatima Aiko Rahul"
).split()
_LAST = (
    "Lovelace Turing Hopper Johnson Vaughan Dijkstra Liskov Knuth Hamilton "
    "McCarthy Allen Perlman Torvalds Rossum Thompson Ritchie Stroustrup Borg "
    "Goldwasser Lamport Berners-Lee Cerf Lamarr Wilson Curie Bohr Meitner "
    "Noether Ramanujan Wu García Müller Nowak Kierkegaard Dubois Lefèvre "
    "Andersson Yılmaz Novák Schäfer Patel Zhang Tanaka Okafor Mensah Ivanova "
    "Fernández Haddad Sato Gupta"
).split()
_INSTITUTIONS: tuple[tuple[str, str], ...] = (
    ("University of Chicago", "uchicago.edu"),
    ("Argonne National Laboratory", "anl.gov"),
    ("Lawrence Berkeley National Laboratory", "lbl.gov"),
    ("University of Michigan", "umich.edu"),
    ("Université de Montréal", "umontreal.ca"),
    ("ETH Zürich", "ethz.ch"),
    ("University of Tokyo", "u-tokyo.ac.jp"),
    ("Universidade de São Paulo", "usp.br"),
    ("University of Cape Town", "uct.ac.za"),
    ("Max-Planck-Institut für Physik", "mpp.mpg.de"),
    ("Indian Institute of Science", "iisc.ac.in"),
    ("Oak Ridge National Laboratory", "ornl.gov"),
    ("University of Edinburgh", "ed.ac.uk"),
    ("Example Research Institute", "example.org"),
)
_TOPICS = (
    "Cryo-EM", "Climate Modeling", "Genomics", "Materials Science",
    "Astrophysics", "Neuroimaging", "Fusion Energy", "Lattice QCD",
    "Bioinformatics", "Ocean Sensors", "Light Source", "Exascale Apps",
    "Data Commons", "Microscopy", "Seismology", "Particle Physics",
)
_KINDS = (
    "Users", "Collaboration", "Data Access", "Beamtime", "Working Group",
    "Admins", "Allocation", "Consortium", "Lab", "Reviewers",
)
_REASONS = {
    "rejected": "Not part of the collaboration.",
    "removed": "Left the project.",
}
# Weighted distributions for generated memberships of non-"me" identities.
_STATUS_WEIGHTS = (
    ("active", 80), ("invited", 6), ("pending", 4), ("rejected", 3),
    ("left", 3), ("removed", 2), ("declined", 2),
)
_ROLE_WEIGHTS = (("member", 85), ("manager", 10), ("admin", 5))
_NULL_EXTRA = '"status_reason":null,"invite_email_address":null,"invite_time":null'
_ISO_RE = re.compile(r"[0-9][0-9T:.+\-Z]*")
_FOLD = str.maketrans({"Ł": "L", "ł": "l", "ø": "o", "Ø": "O", "ß": "ss", "ı": "i"})


def iso_z(ts: float) -> str:
    """Format an epoch timestamp as ISO 8601 UTC with microseconds and ``Z``."""
    return (
        _dt.datetime.fromtimestamp(ts, tz=_dt.UTC)
        .strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    )


def _ascii_slug(text: str) -> str:
    """Fold a display name into an ASCII username fragment (``José`` -> ``jose``)."""
    folded = unicodedata.normalize("NFKD", text.translate(_FOLD))
    ascii_only = folded.encode("ascii", "ignore").decode("ascii").lower()
    return "".join(c for c in ascii_only if c.isalnum() or c in "-.")


def _uuid_from(rng: random.Random) -> str:
    """A version-4 UUID string drawn from ``rng`` so ids are seed-deterministic."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


class Membership:
    """One identity's membership in one group.

    Kept deliberately tiny (four slots) because benchmark worlds hold a
    million of these. Rarely-set invite/reason data lives in ``extra``.
    Supports both attribute access (``m.role``) and read-only mapping access
    (``m["role"]``) so callers can treat it like the JSON record. Do not
    assign attributes directly on a world's memberships: use the ``World``
    mutators, which also invalidate caches and write the change log.
    """

    __slots__ = ("extra", "role", "status", "updated")

    _KEYS = (
        "role", "status", "updated", "status_reason",
        "invite_email_address", "invite_time",
    )

    def __init__(
        self,
        role: str,
        status: str,
        updated: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.role = role
        self.status = status
        self.updated = updated
        self.extra = extra

    @property
    def status_reason(self) -> str | None:
        """Free-text reason for the status (e.g. why a request was rejected)."""
        return self.extra.get("status_reason") if self.extra else None

    @property
    def invite_email_address(self) -> str | None:
        """Address an invitation was sent to, for invited memberships."""
        return self.extra.get("invite_email_address") if self.extra else None

    @property
    def invite_time(self) -> str | None:
        """ISO time the invitation was sent, for invited memberships."""
        return self.extra.get("invite_time") if self.extra else None

    def __getitem__(self, key: str) -> Any:
        if key not in self._KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """Mapping-style ``get`` over :attr:`_KEYS`."""
        return getattr(self, key) if key in self._KEYS else default

    def keys(self) -> tuple[str, ...]:
        """The mapping keys this record exposes."""
        return self._KEYS

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict copy (used for the world file and change log)."""
        return {k: getattr(self, k) for k in self._KEYS}

    def __repr__(self) -> str:
        return f"Membership(role={self.role!r}, status={self.status!r}, updated={self.updated!r})"


class _RenderCache:
    """Byte-bounded LRU of rendered group bodies, invalidated per group.

    Entries are grouped by group id so one mutation drops every rendering of
    that group (different viewers / include flags) in O(1).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._groups: OrderedDict[str, dict[tuple[Any, ...], tuple[bytes, list[tuple[str, str, str]]]]] = OrderedDict()
        self._group_sizes: dict[str, int] = {}

    def get(self, gid: str, key: tuple[Any, ...]) -> tuple[bytes, list[tuple[str, str, str]]] | None:
        entries = self._groups.get(gid)
        if entries is None:
            return None
        hit = entries.get(key)
        if hit is not None:
            self._groups.move_to_end(gid)
        return hit

    def put(self, gid: str, key: tuple[Any, ...], value: tuple[bytes, list[tuple[str, str, str]]]) -> None:
        n = len(value[0])
        if n > self.max_bytes:
            return  # never cache something that would evict everything
        self._groups.setdefault(gid, {})[key] = value
        self._groups.move_to_end(gid)
        self._group_sizes[gid] = self._group_sizes.get(gid, 0) + n
        self.size += n
        while self.size > self.max_bytes and self._groups:
            old, _ = self._groups.popitem(last=False)
            self.size -= self._group_sizes.pop(old, 0)

    def invalidate(self, gid: str) -> None:
        if self._groups.pop(gid, None) is not None:
            self.size -= self._group_sizes.pop(gid, 0)

    def clear(self) -> None:
        self._groups.clear()
        self._group_sizes.clear()
        self.size = 0


class World:
    """Identities, groups and memberships, plus the Groups visibility rules.

    All mutators are thread-safe (one re-entrant lock, also held while the
    server renders a response so every response is a consistent snapshot),
    append a record to :attr:`change_log`, and bump :attr:`version`.
    Mutators that would not change anything are no-ops and log nothing.
    """

    def __init__(
        self,
        me: str,
        identities: dict[str, dict[str, str]],
        groups: dict[str, dict[str, Any]],
        *,
        seed: Any = 0,
        cache_bytes: int = 192 * 1024 * 1024,
        clients: dict[str, str] | None = None,
    ) -> None:
        if me not in identities:
            raise ValueError("world.me must be one of the identities")
        self.me: str = me
        #: confidential clients: client id -> secret; a client's identity id is its client id
        self.clients: dict[str, str] = dict(clients or {})
        self.identities: dict[str, dict[str, str]] = identities
        self.groups: dict[str, dict[str, Any]] = groups
        self.version: int = 0
        self.change_log: list[dict[str, Any]] = []
        self.lock = threading.RLock()
        # Separate RNG for ids/names created by mutators, so mutations are
        # reproducible for a given seed without disturbing generation.
        self._rng = random.Random(f"syncer-world-mutations:{seed}")
        self._last_stamp = 0.0
        self._usernames: set[str] = {i["username"] for i in identities.values()}
        self._fields_cache: dict[str, dict[str, Any]] = {}
        self._ident_json: dict[str, tuple[str, str]] = {}
        self._ident_list: list[str] = []
        self._render = _RenderCache(cache_bytes)
        self._my_groups_cache: dict[tuple[str, tuple[str, ...]], tuple[int, bytes]] = {}

    # ------------------------------------------------------------------ build

    @classmethod
    def generate(
        cls,
        groups: int = 20,
        members: int = 10,
        seed: int = 1,
        *,
        identities: int | None = None,
    ) -> World:
        """Build a deterministic random world.

        ``groups`` groups each get ``members`` memberships (at least one: me
        is in every group, always ``active``). Me is admin in most groups
        (~80%), manager in ~10% and a plain member in the rest. Group 1 (when
        there are at least two groups) is always a ``managers``-visibility
        group where me is a plain member, so only me's own membership is
        visible there; group 2 is a ``members``-visibility group where me is
        a plain member (sees all active memberships). Other identities are
        mostly active plain members, with some invited/pending/rejected/left/
        removed/declined memberships and some managers/admins.
        ``identities`` sets the size of the shared identity pool (default
        scales with the world, capped at 20,000).
        """
        rng = random.Random(seed)
        members = max(1, members)
        pool_size = identities or max(members + 10, min(groups * members // 4, 20_000))
        pool_size = max(pool_size, members)  # a group needs distinct identities

        world_ids: dict[str, dict[str, str]] = {}
        usernames: set[str] = set()
        for _ in range(pool_size):
            ident = _make_identity(rng, usernames)
            world_ids[ident["id"]] = ident
        ids = list(world_ids)
        me = ids[0]
        others = ids[1:]

        stamps = [iso_z(_GEN_EPOCH - rng.random() * _GEN_SPAN) for _ in range(_TS_POOL_SIZE)]
        statuses, status_w = zip(*_STATUS_WEIGHTS, strict=True)
        roles, role_w = zip(*_ROLE_WEIGHTS, strict=True)
        # Cumulative weights let rng.choices skip re-summing for each group.
        status_cw = _cumulative(status_w)
        role_cw = _cumulative(role_w)

        out: dict[str, dict[str, Any]] = {}
        gids: list[str] = []
        for gi in range(groups):
            gid = _uuid_from(rng)
            if gi == 0:
                me_role, members_vis = "admin", "managers"
            elif gi == 1:
                me_role, members_vis = "member", "managers"
            elif gi == 2:
                me_role, members_vis = "member", "members"
            else:
                # A fixed pattern (not random) keeps me admin in most groups
                # even in tiny worlds: ~80% admin, 10% manager, 10% member.
                me_role = {4: "manager", 9: "member"}.get(gi % 10, "admin")
                members_vis = "members" if rng.random() < 0.5 else "managers"
            parent = gids[rng.randrange(len(gids))] if gids and rng.random() < 0.1 else None
            mships: dict[str, Membership] = {
                me: Membership(me_role, "active", stamps[rng.randrange(_TS_POOL_SIZE)])
            }
            k = members - 1
            if k:
                picked = rng.sample(others, k)
                st = rng.choices(statuses, cum_weights=status_cw, k=k)
                ro = rng.choices(roles, cum_weights=role_cw, k=k)
                ts = rng.choices(stamps, k=k)
                for iid, s, r_, t in zip(picked, st, ro, ts, strict=True):
                    extra = None
                    if s == "invited":
                        extra = {
                            "invite_email_address": world_ids[iid]["email"],
                            "invite_time": t,
                        }
                    elif s in _REASONS:
                        extra = {"status_reason": _REASONS[s]}
                    mships[iid] = Membership(r_, s, t, extra)
            topic = _TOPICS[rng.randrange(len(_TOPICS))]
            kind = _KINDS[rng.randrange(len(_KINDS))]
            out[gid] = _group_record(
                gid,
                name=f"{topic} {kind} {gi:04d}",
                description=f"Members of the {topic} {kind.lower()} group.",
                parent_id=parent,
                group_visibility="authenticated" if rng.random() < 0.3 else "private",
                members_visibility=members_vis,
                memberships=mships,
            )
            gids.append(gid)
        return cls(me, world_ids, out, seed=seed)

    # -------------------------------------------------------------- file I/O

    def to_dict(self) -> dict[str, Any]:
        """The world as a JSON-able dict (the world-file format)."""
        with self.lock:
            return {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "me": self.me,
                "identities": [dict(i) for i in self.identities.values()],
                "groups": [
                    {
                        **{k: v for k, v in g.items() if k != "memberships"},
                        "policies": dict(g["policies"]),
                        "memberships": [
                            {"identity_id": iid, **m.as_dict()}
                            for iid, m in g["memberships"].items()
                        ],
                    }
                    for g in self.groups.values()
                ],
                "clients": [{"id": cid, "secret": secret} for cid, secret in self.clients.items()],
            }

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the world file; ``from_json`` reads the same format back."""
        data = self.to_dict()
        tmp = f"{os.fspath(path)}.tmp"
        # Write-then-rename so a crash never leaves a half-written world file.
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> World:
        """Rebuild a world from a world-file document (:meth:`to_dict` output, or one
        written by hand: optional fields get defaults). Raises ``ValueError`` naming
        the first problem's place, e.g. ``groups[2].memberships[0].role: ...``."""
        validate_world_doc(data)
        identities = {i["id"]: dict(i) for i in data["identities"]}
        groups: dict[str, dict[str, Any]] = {}
        for g in data["groups"]:
            mships: dict[str, Membership] = {}
            for m in g.get("memberships", []):
                extra = {
                    k: m[k]
                    for k in ("status_reason", "invite_email_address", "invite_time")
                    if m.get(k) is not None
                } or None
                updated = m.get("updated") or iso_z(_GEN_EPOCH)
                mships[m["identity_id"]] = Membership(m["role"], m["status"], updated, extra)
            policies = g.get("policies") or {}
            rec = _group_record(
                g["id"],
                name=g["name"],
                description=g.get("description", ""),
                parent_id=g.get("parent_id"),
                group_visibility=policies.get("group_visibility", "private"),
                members_visibility=policies.get("group_members_visibility", "managers"),
                memberships=mships,
            )
            rec.update({k: v for k, v in g.items() if k not in ("memberships", "policies")})
            rec["policies"].update(policies)
            groups[g["id"]] = rec
        clients = {c["id"]: c["secret"] for c in data.get("clients") or []}
        for cid in clients:
            identities.setdefault(cid, _client_identity(cid))
        return cls(data["me"], identities, groups, clients=clients)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> World:
        """Load a world file (see :meth:`from_dict`); ``ValueError`` says what is wrong."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"not JSON: {err}") from None
        return cls.from_dict(data)

    # -------------------------------------------------------------- mutators

    def add_member(
        self,
        group_id: str,
        identity_id: str | None = None,
        role: str = "member",
        status: str = "active",
    ) -> str:
        """Add a membership; ``identity_id=None`` creates a brand-new identity.

        An unknown ``identity_id`` is registered as a new identity too, so
        tests can use ids of their own choosing. Adding an identity that is
        already in the group raises ``ValueError``.
        """
        _check_role(role)
        _check_status(status)
        with self.lock:
            g = self.groups[group_id]
            if identity_id is None:
                identity_id = self._new_identity()["id"]
            elif identity_id not in self.identities:
                self._new_identity(identity_id)
            if identity_id in g["memberships"]:
                raise ValueError(f"{identity_id} is already in group {group_id}")
            stamp = self._stamp()
            g["memberships"][identity_id] = Membership(
                role, status, stamp, self._extra_for(identity_id, status, stamp, None)
            )
            self._changed("add_member", group_id, identity_id, None, {"role": role, "status": status})
            return identity_id

    def remove_member(self, group_id: str, identity_id: str) -> None:
        """Delete a membership outright (it disappears from the member list)."""
        with self.lock:
            m = self.groups[group_id]["memberships"].pop(identity_id)
            self._changed(
                "remove_member", group_id, identity_id, {"role": m.role, "status": m.status}, None
            )

    def set_role(self, group_id: str, identity_id: str, role: str) -> None:
        """Change a member's role (member|manager|admin)."""
        _check_role(role)
        with self.lock:
            m = self.groups[group_id]["memberships"][identity_id]
            if m.role == role:
                return
            old, m.role = m.role, role
            m.updated = self._stamp()
            self._changed("set_role", group_id, identity_id, old, role)

    def set_status(self, group_id: str, identity_id: str, status: str) -> None:
        """Change a membership's status (active|invited|pending|rejected|removed|left|declined)."""
        _check_status(status)
        with self.lock:
            m = self.groups[group_id]["memberships"][identity_id]
            if m.status == status:
                return
            old, m.status = m.status, status
            m.updated = self._stamp()
            m.extra = self._extra_for(identity_id, status, m.updated, m.extra)
            self._changed("set_status", group_id, identity_id, old, status)

    def rename_group(self, group_id: str, name: str) -> None:
        """Change a group's display name."""
        with self.lock:
            g = self.groups[group_id]
            if g["name"] == name:
                return
            old, g["name"] = g["name"], name
            self._changed("rename_group", group_id, None, old, name)

    def add_client(
        self,
        groups: list[str] | tuple[str, ...] = (),
        role: str = "admin",
        *,
        client_id: str | None = None,
        secret: str | None = None,
    ) -> tuple[str, str]:
        """Register a confidential client, a member with ``role`` of ``groups``;
        return its (client id, secret). Its identity id is its client id and its
        username ``<client id>@clients.auth.globus.org``, as in Globus."""
        _check_role(role)
        with self.lock:
            for gid in groups:
                if gid not in self.groups:
                    raise KeyError(gid)
            client_id = client_id or _uuid_from(self._rng)
            if client_id in self.clients:
                raise ValueError(f"client {client_id} is already registered")
            secret = secret or secrets.token_urlsafe(24)
            self.clients[client_id] = secret
            if client_id not in self.identities:
                ident = _client_identity(client_id)
                self.identities[client_id] = ident
                self._usernames.add(ident["username"])
            self._changed("add_client", None, client_id, None, {"groups": list(groups), "role": role})
            for gid in groups:
                if client_id not in self.groups[gid]["memberships"]:
                    self.add_member(gid, client_id, role=role)
            return client_id, secret

    def add_group(
        self,
        name: str = "New Group",
        me_role: str = "admin",
        members: int = 0,
        visibility: str = "managers",
        *,
        description: str = "",
        parent_id: str | None = None,
        group_visibility: str = "private",
    ) -> str:
        """Create a group with me as an active ``me_role`` plus ``members``
        other active plain members drawn from the identity pool (new
        identities are created if the pool is too small). ``visibility`` is
        the ``group_members_visibility`` policy (members|managers)."""
        _check_role(me_role)
        if visibility not in VISIBILITIES:
            raise ValueError(f"visibility must be one of {VISIBILITIES}")
        if group_visibility not in GROUP_VISIBILITIES:
            raise ValueError(f"group_visibility must be one of {GROUP_VISIBILITIES}")
        with self.lock:
            gid = _uuid_from(self._rng)
            stamp = self._stamp()
            mships = {self.me: Membership(me_role, "active", stamp)}
            ids = self._identity_ids()
            # Sample one extra so dropping me (if drawn) still leaves enough.
            picked = [i for i in self._rng.sample(ids, min(members + 1, len(ids))) if i != self.me]
            del picked[members:]
            while len(picked) < members:
                picked.append(self._new_identity()["id"])
            for iid in picked:
                mships[iid] = Membership("member", "active", stamp)
            self.groups[gid] = _group_record(
                gid,
                name=name,
                description=description,
                parent_id=parent_id,
                group_visibility=group_visibility,
                members_visibility=visibility,
                memberships=mships,
            )
            self._changed(
                "add_group", gid, None, None,
                {"name": name, "me_role": me_role, "members": members, "visibility": visibility},
            )
            return gid

    def delete_group(self, group_id: str) -> None:
        """Remove a group entirely (subsequent reads get 404)."""
        with self.lock:
            g = self.groups.pop(group_id)
            self._changed("delete_group", group_id, None, g["name"], None)

    def set_policy(
        self,
        group_id: str,
        *,
        members_visibility: str | None = None,
        group_visibility: str | None = None,
    ) -> None:
        """Change a group's visibility policies (logged as ``set_policy``)."""
        with self.lock:
            pol = self.groups[group_id]["policies"]
            if members_visibility is not None:
                if members_visibility not in VISIBILITIES:
                    raise ValueError(f"members_visibility must be one of {VISIBILITIES}")
                if pol["group_members_visibility"] != members_visibility:
                    old = pol["group_members_visibility"]
                    pol["group_members_visibility"] = members_visibility
                    self._changed(
                        "set_policy", group_id, None,
                        {"group_members_visibility": old},
                        {"group_members_visibility": members_visibility},
                    )
            if group_visibility is not None:
                if group_visibility not in GROUP_VISIBILITIES:
                    raise ValueError(f"group_visibility must be one of {GROUP_VISIBILITIES}")
                if pol["group_visibility"] != group_visibility:
                    old = pol["group_visibility"]
                    pol["group_visibility"] = group_visibility
                    self._changed(
                        "set_policy", group_id, None,
                        {"group_visibility": old}, {"group_visibility": group_visibility},
                    )

    def random_changes(
        self,
        n: int,
        rng: random.Random,
        *,
        kinds: tuple[str, ...] | list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Apply ``n`` random mutations to random groups; return their change-log entries.

        The default mix is membership-level changes plus renames:
        add_member, remove_member, set_role, set_status, rename_group.
        ``add_group``/``delete_group`` only happen when listed in ``kinds``
        because deleting a group implicitly removes me's membership, which
        this method otherwise never touches.
        """
        weights = {
            "add_member": 25, "remove_member": 15, "set_role": 20,
            "set_status": 30, "rename_group": 10, "add_group": 3, "delete_group": 2,
        }
        chosen = list(kinds) if kinds else [
            "add_member", "remove_member", "set_role", "set_status", "rename_group"
        ]
        for k in chosen:
            if k not in weights:
                raise ValueError(f"unknown change kind {k!r}")
        w = [weights[k] for k in chosen]
        with self.lock:
            start = len(self.change_log)
            gids = list(self.groups)
            done = 0
            attempts = 0
            # Bounded retries: some picks are impossible (e.g. removing from
            # a group that only contains me); we just try another pick.
            while done < n and attempts < n * 20 + 100:
                attempts += 1
                kind = rng.choices(chosen, weights=w)[0]
                if kind == "add_group":
                    gid = self.add_group(
                        name=f"{rng.choice(_TOPICS)} {rng.choice(_KINDS)} {rng.randrange(10**6):06d}",
                        me_role=rng.choice(("admin", "admin", "manager", "member")),
                        members=rng.randrange(0, 6),
                        visibility=rng.choice(VISIBILITIES),
                    )
                    gids.append(gid)
                    done += 1
                    continue
                if not gids:
                    break
                gid = gids[rng.randrange(len(gids))]
                g = self.groups.get(gid)
                if g is None:
                    continue
                if kind == "delete_group":
                    self.delete_group(gid)
                    gids.remove(gid)
                    done += 1
                    continue
                if kind == "rename_group":
                    self.rename_group(gid, f"{g['name'].split(' (')[0]} ({rng.randrange(10**6)})")
                    done += 1
                    continue
                if kind == "add_member":
                    if rng.random() < 0.3:
                        iid = None
                    else:
                        iid = self._random_identity(rng)
                        if iid == self.me or iid in g["memberships"]:
                            continue
                    self.add_member(
                        gid, iid,
                        role=rng.choices(("member", "manager", "admin"), (85, 10, 5))[0],
                        status=rng.choices(("active", "invited", "pending"), (70, 20, 10))[0],
                    )
                    done += 1
                    continue
                others = [i for i in g["memberships"] if i != self.me]
                if not others:
                    continue
                iid = others[rng.randrange(len(others))]
                m = g["memberships"][iid]
                if kind == "remove_member":
                    self.remove_member(gid, iid)
                elif kind == "set_role":
                    self.set_role(gid, iid, rng.choice([r for r in ROLES if r != m.role]))
                else:
                    self.set_status(gid, iid, rng.choice([s for s in STATUSES if s != m.status]))
                done += 1
            return self.change_log[start:]

    def set_high_assurance(self, group_id: str, timeout: int | None = 28800) -> None:
        """Designate a group high assurance (``timeout``: its
        ``authentication_assurance_timeout`` in seconds), or not (None). Its reads then
        need a login no older than that; a refresh does not renew a login's age."""
        with self.lock:
            pol = self.groups[group_id]["policies"]
            old = (pol.get("is_high_assurance"), pol.get("authentication_assurance_timeout"))
            pol["is_high_assurance"] = timeout is not None
            if timeout is not None:
                pol["authentication_assurance_timeout"] = int(timeout)
            new = (pol["is_high_assurance"], pol.get("authentication_assurance_timeout"))
            if new != old:
                self._changed("set_policy", group_id, None, {"high_assurance": old}, {"high_assurance": new})

    def assurance_timeout(self, group_id: str) -> int | None:
        """A high-assurance group's ``authentication_assurance_timeout``; None if it is not one."""
        g = self.groups.get(group_id)
        if g is None or not g["policies"].get("is_high_assurance"):
            return None
        return int(g["policies"].get("authentication_assurance_timeout", 28800))

    def add_implicit_membership(
        self, group_id: str, identity_id: str, source_group_id: str, role: str = "member", status: str = "active"
    ) -> None:
        """Make ``identity_id`` an implicit member of ``group_id`` through its subgroup
        ``source_group_id``: Globus lists such memberships beside the explicit ones,
        marked with ``source_group_id`` (an identity may then be listed twice)."""
        _check_role(role)
        _check_status(status)
        with self.lock:
            if identity_id not in self.identities:
                self._new_identity(identity_id)
            implicit = self.groups[group_id].setdefault("implicit", [])
            implicit.append({"identity_id": identity_id, "role": role, "status": status,
                             "source_group_id": source_group_id})
            self._changed("add_implicit", group_id, identity_id, None, {"source_group_id": source_group_id})

    def has_implicit(self, group_id: str) -> bool:
        """Whether the group has implicit memberships (its documents are then built afresh)."""
        g = self.groups.get(group_id)
        return bool(g and g.get("implicit"))

    def _implicit_docs(self, group_id: str, viewer: str) -> list[dict[str, Any]]:
        """The implicit membership documents ``viewer`` sees (by the same rules as explicit ones)."""
        g = self.groups[group_id]
        own = g["memberships"].get(viewer)
        if own is None or own.status != "active":
            return []
        sees_all = own.role in ("admin", "manager")
        if not sees_all and g["policies"].get("group_members_visibility") != "members":
            return []
        docs = []
        for item in g.get("implicit", []):
            if not sees_all and item["status"] != "active":
                continue
            doc = self._membership_doc(group_id, item["identity_id"], Membership(item["role"], item["status"], iso_z(_GEN_EPOCH)))
            doc["source_group_id"] = item["source_group_id"]
            docs.append(doc)
        return docs

    def all_membership_docs(self, group_id: str) -> list[dict[str, Any]]:
        """Every membership of a group, whoever asks (a shape some answers take)."""
        g = self.groups[group_id]
        return [self._membership_doc(group_id, i, m) for i, m in g["memberships"].items()]

    # ------------------------------------------------------------ visibility

    def my_membership(self, group_id: str, identity_id: str | None = None) -> Membership | None:
        """The viewer's own membership in a group, or None."""
        return self.groups[group_id]["memberships"].get(identity_id or self.me)

    def can_view(self, group_id: str, identity_id: str | None = None) -> bool:
        """True when the viewer may GET the group (see :meth:`_viewable`)."""
        with self.lock:
            return self._viewable(self.groups[group_id], identity_id or self.me)

    @staticmethod
    def _viewable(g: dict[str, Any], viewer: str) -> bool:
        """Globus Groups' rule: any authenticated user may view an ``authenticated``
        group; a private one needs an active, invited or pending membership."""
        own = g["memberships"].get(viewer)
        if own is not None and own.status in VIEWER_STATUSES:
            return True
        return g["policies"].get("group_visibility") == "authenticated"

    def _visible_items(self, g: dict[str, Any], viewer: str) -> list[tuple[str, Membership]] | None:
        """Memberships ``viewer`` may see, or None when it may see none.

        Rules: only active members see memberships (Globus leaves the list out of
        the document for anyone else); an active admin/manager sees everything in
        every status; an active member of a ``members``-visibility group every
        active membership; otherwise only the viewer's own membership.
        """
        mships: dict[str, Membership] = g["memberships"]
        own = mships.get(viewer)
        if own is None or own.status != "active":
            return None
        if own.role in ("admin", "manager"):
            return list(mships.items())
        if g["policies"].get("group_members_visibility") == "members":
            return [(i, m) for i, m in mships.items() if m.status == "active"]
        return [(viewer, own)]

    def visible_memberships(self, group_id: str, identity_id: str | None = None) -> list[dict[str, Any]]:
        """Membership documents ``identity_id`` (default me) would be served.

        Returns ``[]`` when the viewer has no active membership (the API then
        serves no memberships, or answers 403). Raises ``KeyError`` for unknown groups.
        """
        with self.lock:
            g = self.groups[group_id]
            items = self._visible_items(g, identity_id or self.me)
            if items is None:
                return []
            # Fresh membership_fields dicts: the cached ones are shared.
            return [
                {**d, "membership_fields": dict(d["membership_fields"])}
                for d in (self._membership_doc(group_id, i, m) for i, m in items)
            ]

    # ------------------------------------------------------------- rendering

    def membership_fields(self, identity_id: str) -> dict[str, Any]:
        """The ``membership_fields`` object for an identity (cached, shared)."""
        f = self._fields_cache.get(identity_id)
        if f is None:
            ident = self.identities.get(identity_id, {})
            f = {
                "name": ident.get("name"),
                "email": ident.get("email"),
                "institution": ident.get("institution"),
            }
            self._fields_cache[identity_id] = f
        return f

    def _membership_doc(self, group_id: str, identity_id: str, m: Membership) -> dict[str, Any]:
        """One entry of a group's ``memberships`` array as the API shapes it."""
        ident = self.identities.get(identity_id)
        extra = m.extra
        return {
            "group_id": group_id,
            "identity_id": identity_id,
            "username": ident["username"] if ident else None,
            "role": m.role,
            "status": m.status,
            "status_reason": extra.get("status_reason") if extra else None,
            "invite_email_address": extra.get("invite_email_address") if extra else None,
            "invite_time": extra.get("invite_time") if extra else None,
            "updated": m.updated,
            # Invitees have not filled in any fields yet; everyone else has.
            "membership_fields": {} if m.status == "invited" else self.membership_fields(identity_id),
        }

    def _identity_json(self, identity_id: str) -> tuple[str, str]:
        """Cached JSON fragments for an identity: the identity_id/username
        pair and its membership_fields object."""
        hit = self._ident_json.get(identity_id)
        if hit is None:
            ident = self.identities.get(identity_id)
            head = (
                f'"identity_id":{json.dumps(identity_id)},'
                f'"username":{json.dumps(ident["username"] if ident else None, ensure_ascii=False)}'
            )
            fields = json.dumps(
                self.membership_fields(identity_id), ensure_ascii=False, separators=(",", ":")
            )
            hit = (head, fields)
            self._ident_json[identity_id] = hit
        return hit

    def _membership_json(self, gid_json: str, identity_id: str, m: Membership) -> str:
        """Serialized membership, byte-for-byte what json.dumps would give
        for :meth:`_membership_doc` (compact separators)."""
        head, fields = self._identity_json(identity_id)
        extra = m.extra
        if extra is None:
            extra_json = _NULL_EXTRA
        else:
            extra_json = (
                f'"status_reason":{json.dumps(extra.get("status_reason"), ensure_ascii=False)},'
                f'"invite_email_address":{json.dumps(extra.get("invite_email_address"), ensure_ascii=False)},'
                f'"invite_time":{json.dumps(extra.get("invite_time"))}'
            )
        if m.status == "invited":
            fields = "{}"
        # role/status are validated enums and `updated` is validated ISO
        # text, so they need no escaping.
        return (
            f'{{"group_id":{gid_json},{head},"role":"{m.role}","status":"{m.status}",'
            f'{extra_json},"updated":"{m.updated}","membership_fields":{fields}}}'
        )

    def _my_membership_doc(self, group_id: str, identity_id: str, m: Membership) -> dict[str, Any]:
        ident = self.identities.get(identity_id)
        return {
            "group_id": group_id,
            "identity_id": identity_id,
            "username": ident["username"] if ident else None,
            "role": m.role,
            "status": m.status,
        }

    def _my_group_doc(self, group_id: str, g: dict[str, Any], viewer: str) -> dict[str, Any]:
        """A ``GET /v2/groups/{id}`` document as ``viewer`` sees it, without memberships."""
        doc = self._group_base_doc(g)
        own = g["memberships"].get(viewer)
        doc["my_memberships"] = [self._my_membership_doc(group_id, viewer, own)] if own is not None else []
        doc["subscription_id"] = None
        doc["subscription_info"] = None
        return doc

    def _group_base_doc(self, g: dict[str, Any]) -> dict[str, Any]:
        """Group fields common to my_groups and get_group (fixture shape)."""
        return {
            "id": g["id"],
            "name": g["name"],
            "description": g.get("description", ""),
            "parent_id": g.get("parent_id"),
            "group_type": g.get("group_type", "regular"),
            "enforce_session": g.get("enforce_session", False),
            "session_limit": g.get("session_limit", 28800),
            "session_timeouts": dict(g.get("session_timeouts") or {}),
            "policies": dict(g["policies"]),
        }

    def invalidate_caches(self) -> None:
        """Drop every cached rendering (only needed after editing
        ``identities``/``groups`` directly instead of via the mutators)."""
        with self.lock:
            self._render.clear()
            self._my_groups_cache.clear()
            self._fields_cache.clear()
            self._ident_json.clear()

    def group_doc(
        self,
        group_id: str,
        viewer: str | None = None,
        *,
        include_memberships: bool = True,
    ) -> dict[str, Any] | None:
        """A fresh, freely-modifiable ``GET /v2/groups/{id}`` document.

        Returns None when the viewer may not view the group (-> 403);
        raises ``KeyError`` for an unknown group (-> 404). Used when a fault
        needs to tamper with the document; normal reads use
        :meth:`render_group`, which is cached.
        """
        viewer = viewer or self.me
        with self.lock:
            g = self.groups[group_id]
            if not self._viewable(g, viewer):
                return None
            items = self._visible_items(g, viewer)
            doc = self._my_group_doc(group_id, g, viewer)
            if include_memberships and items is not None:
                # Copy membership_fields: a caller may mutate this document.
                doc["memberships"] = [
                    {**d, "membership_fields": dict(d["membership_fields"])}
                    for d in (self._membership_doc(group_id, i, m) for i, m in items)
                ] + self._implicit_docs(group_id, viewer)
            return doc

    def render_group(
        self,
        group_id: str,
        viewer: str | None = None,
        *,
        include_memberships: bool = True,
    ) -> tuple[bytes, list[tuple[str, str, str]]] | None:
        """Serialized group body plus its state (sorted (identity, role, status)).

        Cached until the group changes. The returned state list is shared
        between calls for the same group version: treat it as read-only.
        Returns None for forbidden, raises ``KeyError`` for unknown groups.
        """
        viewer = viewer or self.me
        key = (viewer, include_memberships)
        with self.lock:
            hit = self._render.get(group_id, key)
            if hit is not None:
                return hit
            g = self.groups[group_id]
            if not self._viewable(g, viewer):
                return None
            items = self._visible_items(g, viewer)
            doc = self._my_group_doc(group_id, g, viewer)
            state: list[tuple[str, str, str]] = []
            head = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
            if include_memberships and items is not None:
                # Splice pre-serialized membership fragments into the group
                # JSON: ~10x cheaper than json.dumps over fresh dicts.
                gid_json = json.dumps(group_id)
                frags = [self._membership_json(gid_json, i, m) for i, m in items]
                body = f'{head[:-1]},"memberships":[{",".join(frags)}]}}'.encode()
                state = sorted((i, m.role, m.status) for i, m in items)
            else:
                body = head.encode("utf-8")
            value = (body, state)
            self._render.put(group_id, key, value)
            return value

    def prerender(self, viewer: str | None = None) -> bool:
        """Put every group the viewer belongs to, with its memberships, in the render cache.

        A benchmark calls this before each measured client, so that no client pays
        for rendering that the next one gets for free. Returns False at once, rendering
        nothing more, when the renderings would not all fit in the cache: the cache
        then evicts in read order and every client meets a cold server alike.
        """
        viewer = viewer or self.me
        with self.lock:
            mine = [gid for gid, g in self.groups.items() if viewer in g["memberships"]]
            if not mine:
                return True
            rendered = self.render_group(mine[0], viewer)
            if rendered is not None:
                per_membership = len(rendered[0]) / max(1, len(self.groups[mine[0]]["memberships"]))
                total = sum(len(self.groups[gid]["memberships"]) for gid in mine)
                if per_membership * total > self._render.max_bytes:
                    return False
            for gid in mine:
                self.render_group(gid, viewer)
            return True

    def render_my_groups(self, statuses: tuple[str, ...], viewer: str | None = None) -> bytes:
        """Serialized ``GET /v2/groups/my_groups`` array for the given statuses.

        Cached per (viewer, statuses) until the world version changes.
        """
        viewer = viewer or self.me
        key = (viewer, tuple(sorted(set(statuses))))
        with self.lock:
            hit = self._my_groups_cache.get(key)
            if hit is not None and hit[0] == self.version:
                return hit[1]
            wanted = set(statuses)
            out = []
            for gid, g in self.groups.items():
                m = g["memberships"].get(viewer)
                if m is None or m.status not in wanted:
                    continue
                doc = self._group_base_doc(g)
                doc["my_memberships"] = [self._my_membership_doc(gid, viewer, m)]
                out.append(doc)
            body = json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            if len(self._my_groups_cache) > 16:
                self._my_groups_cache.clear()
            self._my_groups_cache[key] = (self.version, body)
            return body

    # ------------------------------------------------------------- internals

    def _stamp(self) -> str:
        """A strictly increasing 'now' so ``updated`` always changes on change."""
        now = max(time.time(), self._last_stamp + 1e-6)
        self._last_stamp = now
        return iso_z(now)

    def _extra_for(
        self, identity_id: str, status: str, stamp: str, prev: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """Invite/reason bookkeeping that follows a status change."""
        if status == "invited":
            return {
                "invite_email_address": self.identities.get(identity_id, {}).get("email"),
                "invite_time": stamp,
            }
        if status in _REASONS:
            return {"status_reason": _REASONS[status]}
        # Accepting an invitation keeps a record of when it was sent.
        if prev and "invite_time" in prev and status == "active":
            return {k: prev[k] for k in ("invite_email_address", "invite_time") if k in prev}
        return None

    def _changed(
        self, kind: str, group_id: str | None, identity_id: str | None, old: Any, new: Any
    ) -> None:
        """Record a change, bump the version and drop stale renderings."""
        self.version += 1
        self.change_log.append(
            {
                "seq": self.version,
                "at": time.time(),
                "kind": kind,
                "group_id": group_id,
                "identity_id": identity_id,
                "old": old,
                "new": new,
            }
        )
        if group_id is not None:
            self._render.invalidate(group_id)

    def _new_identity(self, identity_id: str | None = None) -> dict[str, str]:
        ident = _make_identity(self._rng, self._usernames, identity_id)
        self.identities[ident["id"]] = ident
        return ident

    def _identity_ids(self) -> list[str]:
        """Identity ids as a list, for O(1) random picks; rebuilt only when
        the identity count changed (new identities are only ever added)."""
        if len(self._ident_list) != len(self.identities):
            self._ident_list = list(self.identities)
        return self._ident_list

    def _random_identity(self, rng: random.Random) -> str:
        ids = self._identity_ids()
        return ids[rng.randrange(len(ids))]

    def __repr__(self) -> str:
        return (
            f"World(groups={len(self.groups)}, identities={len(self.identities)}, "
            f"version={self.version})"
        )


# ---------------------------------------------------------------- helpers


def _cumulative(weights: tuple[int, ...]) -> list[int]:
    out, acc = [], 0
    for w in weights:
        acc += w
        out.append(acc)
    return out


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, not {status!r}")


def _make_identity(
    rng: random.Random, usernames: set[str], identity_id: str | None = None
) -> dict[str, str]:
    """A realistic identity with a unique ``first.last[N]@example.org`` username."""
    first = _FIRST[rng.randrange(len(_FIRST))]
    last = _LAST[rng.randrange(len(_LAST))]
    inst, domain = _INSTITUTIONS[rng.randrange(len(_INSTITUTIONS))]
    base = f"{_ascii_slug(first)}.{_ascii_slug(last)}"
    local = base
    n = 1
    while f"{local}@example.org" in usernames:
        n += 1
        local = f"{base}{n}"
    username = f"{local}@example.org"
    usernames.add(username)
    return {
        "id": identity_id or _uuid_from(rng),
        "username": username,
        "name": f"{first} {last}",
        "email": f"{local}@{domain}",
        "institution": inst,
    }


def _client_identity(client_id: str) -> dict[str, str]:
    """The identity Globus gives a confidential client."""
    return {
        "id": client_id,
        "username": f"{client_id}@clients.auth.globus.org",
        "name": "syncer simulated service client",
        "email": "",
        "institution": "",
    }


def _where(path: str, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}" if path else problem)


def _need(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], path: str, optional: bool = False) -> Any:
    """``doc[key]`` checked to be of ``kind`` (None allowed when ``optional``)."""
    here = f"{path}.{key}" if path else key
    if key not in doc:
        if optional:
            return None
        raise _where(here, "missing")
    value = doc[key]
    if optional and value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        shown = {"str": "a string", "list": "a list", "dict": "an object", "int": "a number"}.get(names, names)
        raise _where(here, f"must be {shown}")
    return value


def _objects(doc: dict[str, Any], key: str, path: str, optional: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """(place, object) for each item of the list ``doc[key]``, each checked to be an object."""
    here = f"{path}.{key}" if path else key
    for n, item in enumerate(_need(doc, key, list, path, optional=optional) or []):
        if not isinstance(item, dict):
            raise _where(f"{here}[{n}]", "must be an object")
        yield f"{here}[{n}]", item


_IDENTITY_KEYS = ("id", "username", "name", "email", "institution")


def _group_doc_keys() -> tuple[frozenset[str], frozenset[str]]:
    """The keys a world file's group and its policies may have: those a stored group has
    (so a world the simulator wrote reads back), nothing a typo could add."""
    record = _group_record(
        "", name="", description="", parent_id=None, group_visibility="private", members_visibility="managers",
        memberships={},
    )
    return frozenset(record), frozenset(record["policies"])


def _known_keys(doc: dict[str, Any], known: Iterable[str], path: str) -> None:
    """Reject a key the format does not have: a misspelt one would silently be ignored."""
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise _where(f"{path}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(known))})")


def validate_world_doc(data: Any) -> None:
    """Check a world-file document against the format docs/simulator.md documents;
    raise ``ValueError`` naming the first problem's place."""
    if not isinstance(data, dict):
        raise ValueError("must be a JSON object")
    if data.get("format") != FORMAT_NAME:
        raise _where("format", f'must be "{FORMAT_NAME}"')
    if data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise _where("format_version", f"must be {FORMAT_VERSION}")
    known = {"format", "format_version", "me", "identities", "groups", "clients"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise _where(unknown[0], f"unknown key (known: {', '.join(sorted(known))})")
    ids: set[str] = set()
    usernames: set[str] = set()
    group_keys, policy_keys = _group_doc_keys()
    for path, ident in _objects(data, "identities", ""):
        _known_keys(ident, _IDENTITY_KEYS, path)
        iid = _need(ident, "id", str, path)
        username = _need(ident, "username", str, path)
        for key in ("name", "email", "institution"):
            _need(ident, key, str, path, optional=True)
        if iid in ids:
            raise _where(f"{path}.id", f"duplicate identity {iid!r}")
        if username in usernames:
            raise _where(f"{path}.username", f"duplicate username {username!r}")
        ids.add(iid)
        usernames.add(username)
    for path, client in _objects(data, "clients", "", optional=True):
        _known_keys(client, ("id", "secret"), path)
        ids.add(_need(client, "id", str, path))
        if not _need(client, "secret", str, path):
            raise _where(f"{path}.secret", "must not be empty")
    me = _need(data, "me", str, "")
    if me not in ids:
        raise _where("me", f"{me!r} is not one of the identities")
    gids: set[str] = set()
    for path, group in _objects(data, "groups", ""):
        _known_keys(group, group_keys, path)
        gid = _need(group, "id", str, path)
        if gid in gids:
            raise _where(f"{path}.id", f"duplicate group {gid!r}")
        gids.add(gid)
        _need(group, "name", str, path)
        _need(group, "description", str, path, optional=True)
        _need(group, "parent_id", str, path, optional=True)
        policies = _need(group, "policies", dict, path, optional=True) or {}
        _known_keys(policies, policy_keys, f"{path}.policies")
        for key, allowed in (("group_visibility", GROUP_VISIBILITIES), ("group_members_visibility", VISIBILITIES)):
            if key in policies and policies[key] not in allowed:
                raise _where(f"{path}.policies.{key}", f"must be one of {', '.join(allowed)}")
        members: set[str] = set()
        for where, m in _objects(group, "memberships", path):
            _known_keys(m, ("identity_id", *Membership._KEYS), where)
            iid = _need(m, "identity_id", str, where)
            if iid not in ids:
                raise _where(f"{where}.identity_id", f"{iid!r} is not one of the identities")
            if iid in members:
                raise _where(f"{where}.identity_id", f"{iid!r} is in the group twice")
            members.add(iid)
            if _need(m, "role", str, where) not in ROLES:
                raise _where(f"{where}.role", f"must be one of {', '.join(ROLES)}")
            if _need(m, "status", str, where) not in STATUSES:
                raise _where(f"{where}.status", f"must be one of {', '.join(STATUSES)}")
            updated = _need(m, "updated", str, where, optional=True)
            # `updated` is spliced into JSON unescaped when serving
            if updated is not None and not _ISO_RE.fullmatch(updated):
                raise _where(f"{where}.updated", f"must be an ISO 8601 time, not {updated!r}")


def _group_record(
    gid: str,
    *,
    name: str,
    description: str,
    parent_id: str | None,
    group_visibility: str,
    members_visibility: str,
    memberships: dict[str, Membership],
) -> dict[str, Any]:
    """The stored shape of one group."""
    return {
        "id": gid,
        "name": name,
        "description": description,
        "parent_id": parent_id,
        "group_type": "regular",
        "enforce_session": False,
        "session_limit": 28800,
        "session_timeouts": {},
        "policies": {
            "group_visibility": group_visibility,
            "group_members_visibility": members_visibility,
            "join_requests": False,
            "signup_fields": [],
            "is_high_assurance": False,
            "authentication_assurance_timeout": 28800,
        },
        "memberships": memberships,
    }
