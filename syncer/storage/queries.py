"""Answers to the questions users ask the database, for ``syncer members/changes/groups/identity``.

Plain functions: an open (read-only) database in, named rows out. The SQL reads only
the documented tables and views (``sync_runs``, ``groups``, ``group_history``,
``identities``, ``memberships``, ``membership_history``, ``membership_changes``,
``membership_events``, ``active_members``), never syncer's internal tables, so it keeps working however
they are stored underneath.

"As of WHEN" is the state recorded by the last ``ok`` or ``partial`` run that started
at or before WHEN; a group that failed in a partial run carries its previous
versions, so history as of that run is its state then.
"""

from __future__ import annotations

import difflib
import re
import typing as t

import sqlite_utils

from syncer.errors import EXIT_FAILED, SyncerError
from syncer.storage.when import BadWhen, When


class NotFound(SyncerError):
    """An unknown or ambiguous group or user, or no snapshot to answer from (exit 1)."""

    exit_code = EXIT_FAILED


class Run(t.NamedTuple):
    id: int
    started_at: str
    status: str


class Group(t.NamedTuple):
    """A group as a GROUP argument resolved: its id and its latest known name."""

    id: str
    name: str | None


class GroupVersion(t.NamedTuple):
    """What the identity could see of a group as of a run."""

    name: str | None
    members_visible: bool
    members_view: str  # all, active (only the active memberships) or own


class MemberRow(t.NamedTuple):
    group_id: str
    group_name: str | None
    identity_id: str
    username: str | None
    role: str | None
    status: str | None


class ChangeRow(t.NamedTuple):
    at: str
    run_id: int
    group_id: str
    group_name: str | None
    identity_id: str
    username: str | None
    change: str
    reason: str | None
    old_role: str | None
    new_role: str | None
    old_status: str | None
    new_status: str | None


class MyGroupRow(t.NamedTuple):
    """One of the identity's groups as ``syncer groups`` lists it."""

    id: str
    name: str | None
    my_role: str | None
    my_status: str | None
    members_visible: int
    active_members: int | None  # None where the members are not visible: the count is not known
    needs_login: str | None = None  # what Globus asked for when it last refused the group (now only)


class IdentityRow(t.NamedTuple):
    group_id: str
    group_name: str | None
    role: str | None
    status: str | None
    valid_from: str
    valid_to: str | None
    began: str  # why the version began, as `reason` in membership_changes (joined, first_seen, changed)
    ended: str | None  # why it ended (left, hidden, group_gone, changed); None while current


# Output field names (SPEC); IdentityRow's valid_from/valid_to are "from"/"to", Python keywords.
MEMBER_FIELDS = MemberRow._fields
CHANGE_FIELDS = ChangeRow._fields
GROUP_FIELDS = MyGroupRow._fields
IDENTITY_FIELDS = ("group_id", "group_name", "role", "status", "from", "to", "began", "ended")

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_AS_OF = "h.from_run <= :run AND (h.to_run IS NULL OR h.to_run > :run)"


def _rows(db: sqlite_utils.Database, sql: str, params: dict[str, t.Any] | t.Sequence[t.Any] = ()) -> list[tuple]:
    return db.execute(sql, params).fetchall()


# ------------------------------------------------------------------------ runs


def as_of(db: sqlite_utils.Database, when: When | None) -> Run:
    """The run whose recorded state answers "as of WHEN" (None: the latest).

    Raises NotFound when no ok/partial run is that old (or there is none yet), and
    BadWhen for a ``run:N`` that does not exist.
    """
    committed = "status IN ('ok', 'partial')"
    if when is not None and when.run_id is not None:
        check_period(db, when, None)
        found = _rows(db, f"SELECT id, started_at, status FROM sync_runs WHERE {committed} AND id <= ?"
                          " ORDER BY id DESC LIMIT 1", [when.run_id])
    elif when is not None:
        found = _rows(db, f"SELECT id, started_at, status FROM sync_runs WHERE {committed} AND started_at <= ?"
                          " ORDER BY started_at DESC, id DESC LIMIT 1", [when.moment])
    else:
        found = _rows(db, f"SELECT id, started_at, status FROM sync_runs WHERE {committed} ORDER BY id DESC LIMIT 1")
    if found:
        return Run(*found[0])
    first = _rows(db, f"SELECT id, started_at FROM sync_runs WHERE {committed} ORDER BY id LIMIT 1")
    if not first:
        raise NotFound("no successful run recorded yet; run `syncer sync` first")
    run_id, started = first[0]
    assert when is not None  # without a WHEN, the latest committed run exists
    raise NotFound(f"nothing recorded as of {when.text}: the first successful run (run {run_id}) started {started}")


def _check_run(db: sqlite_utils.Database, when: When) -> str:
    """The start time of the run a ``run:N`` names; BadWhen (exit 2) when there is none."""
    found = _rows(db, "SELECT started_at FROM sync_runs WHERE id = ?", [when.run_id])
    if not found:
        low, high = _rows(db, "SELECT min(id), max(id) FROM sync_runs")[0]
        known = f"runs {low}-{high}" if low is not None else "no runs yet"
        raise BadWhen(when.text, f"there is no run {when.run_id} ({known})")
    return found[0][0]


def check_period(db: sqlite_utils.Database, since: When | None, until: When | None) -> None:
    """Raise BadWhen (exit 2) for a period a command cannot mean: a ``run:N`` that does
    not exist, or ``until`` before ``since``. Every command that takes a WHEN calls it
    (``--at`` as ``since``), so they agree on what is a usage error."""
    starts = [None if w is None else _check_run(db, w) if w.run_id is not None else w.moment for w in (since, until)]
    if since is None or until is None:
        return
    if since.run_id is not None and until.run_id is not None:
        backwards = until.run_id < since.run_id
    else:
        backwards = t.cast(str, starts[1]) < t.cast(str, starts[0])
    if backwards:
        raise BadWhen(until.text, f"--until is before --since {since.text!r}")


def latest_run(db: sqlite_utils.Database) -> Run:
    """The latest ``ok`` or ``partial`` run; NotFound (exit 1) when there is none yet."""
    return as_of(db, None)


def run_span(db: sqlite_utils.Database, since: When, until: When | None) -> tuple[int, int] | None:
    """The ids of the runs that started from ``since`` through ``until`` (both included),
    or None when there are none. A ``run:N`` bound is that run; a bad period is BadWhen."""
    check_period(db, since, until)
    low = high = None
    if since.run_id is not None:
        low = since.run_id
    else:
        low = _rows(db, "SELECT min(id) FROM sync_runs WHERE started_at >= ?", [since.moment])[0][0]
    if until is None:
        high = _rows(db, "SELECT max(id) FROM sync_runs")[0][0]
    elif until.run_id is not None:
        high = until.run_id
    else:
        high = _rows(db, "SELECT max(id) FROM sync_runs WHERE started_at <= ?", [until.moment])[0][0]
    if low is None or high is None or low > high:
        return None
    return low, high


# ------------------------------------------------------------ names and people


def resolve_group(db: sqlite_utils.Database, text: str) -> Group:
    """GROUP: an id (in any case), or a name the group has or had (exactly, else
    ignoring case). An unknown one is NotFound with the close matches."""
    by_id = _rows(db, "SELECT id, name FROM groups WHERE id = ?", [_id_case(text)])
    if by_id:
        return Group(*by_id[0])
    named = "SELECT group_id FROM group_history WHERE {0} UNION SELECT id FROM groups WHERE {1}"
    ids = [r[0] for r in _rows(db, named.format("name = :n", "name = :n"), {"n": text})]
    if not ids:
        ids = [r[0] for r in _rows(db, named.format("lower(name) = lower(:n)", "lower(name) = lower(:n)"), {"n": text})]
    if len(ids) == 1:
        return Group(ids[0], _latest_name(db, ids[0]))
    if ids:
        listed = ", ".join(f"{gid} (now {_latest_name(db, gid)!r})" for gid in sorted(ids))
        raise NotFound(f"group name {text!r} is ambiguous: {len(ids)} groups have or had it: {listed}; give the id")
    names = [r[0] for r in _rows(db, "SELECT name FROM group_history UNION SELECT name FROM groups") if r[0]]
    raise NotFound(f"unknown group {text!r}{_did_you_mean(text, names)}")


def _id_case(text: str) -> str:
    """An id as Globus writes it: UUIDs in lower case (one copied from elsewhere may
    be in upper case); anything else as it is."""
    return text.lower() if _UUID.fullmatch(text) else text


def _latest_name(db: sqlite_utils.Database, group_id: str) -> str | None:
    found = _rows(db, "SELECT name FROM groups WHERE id = ?", [group_id])
    return found[0][0] if found else None


def resolve_user(db: sqlite_utils.Database, text: str) -> list[str]:
    """USER: a username or an identity id; the identity ids it names (usually one)."""
    ids = [r[0] for r in _rows(db, "SELECT id FROM identities WHERE id = :i OR username = :u",
                               {"u": text, "i": _id_case(text)})]
    if not ids:
        ids = [r[0] for r in _rows(db, "SELECT id FROM identities WHERE lower(username) = lower(?)", [text])]
    if ids:
        return sorted(ids)
    names = [r[0] for r in _rows(db, "SELECT username FROM identities") if r[0]]
    raise NotFound(f"unknown user {text!r}{_did_you_mean(text, names)}")


def close_matches(text: str, candidates: t.Iterable[str], n: int = 5) -> list[str]:
    """Up to ``n`` candidates a person may have meant by ``text``: those containing it
    (ignoring case; "Bioinf" for "Bioinformatics Core"), shortest first, then those
    difflib finds alike (ignoring case: a typo, a letter's case)."""
    unique = sorted(set(candidates))
    needle = text.casefold().strip()
    containing = sorted((c for c in unique if needle and needle in c.casefold()), key=lambda c: (len(c), c))
    folded = {c.casefold(): c for c in unique}
    alike = [folded[c] for c in difflib.get_close_matches(needle, list(folded), n=n, cutoff=0.6)]
    return list(dict.fromkeys([*containing, *alike]))[:n]


def _did_you_mean(text: str, candidates: list[str]) -> str:
    close = close_matches(text, candidates)
    return f"; did you mean: {', '.join(repr(c) for c in close)}?" if close else ""


# ----------------------------------------------------------------- the answers


def group_version(db: sqlite_utils.Database, group_id: str, run_id: int) -> GroupVersion | None:
    """The group as of a run, or None when it was not among the identity's groups then."""
    found = _rows(db, f"SELECT name, members_visible, members_view FROM group_history h WHERE group_id = :g AND {_AS_OF}",
                  {"g": group_id, "run": run_id})
    return GroupVersion(found[0][0], bool(found[0][1]), found[0][2]) if found else None


def members(db: sqlite_utils.Database, group_id: str, run_id: int, *, every_status: bool = False) -> list[MemberRow]:
    """A group's members as of a run (active ones unless ``every_status``), by username."""
    status = "" if every_status else "AND h.status = 'active'"
    sql = f"""
        SELECT h.group_id, gh.name, h.identity_id, h.username, h.role, h.status
        FROM membership_history h
        LEFT JOIN group_history gh
          ON gh.group_id = h.group_id AND gh.from_run <= :run AND (gh.to_run IS NULL OR gh.to_run > :run)
        WHERE h.group_id = :g AND {_AS_OF} {status}
        ORDER BY h.username, h.identity_id"""
    return [MemberRow(*r) for r in _rows(db, sql, {"g": group_id, "run": run_id})]


def changes(
    db: sqlite_utils.Database,
    runs: tuple[int, int],
    *,
    group_id: str | None = None,
    identity_ids: t.Sequence[str] = (),
    observations: bool = False,
) -> list[ChangeRow]:
    """Rows of ``membership_changes`` in a span of runs, oldest first; only events
    (``membership_events``: joined, left, changed, and 'unknown' from before reasons
    were kept) unless ``observations``."""
    where = ["run_id BETWEEN :low AND :high"]
    params: dict[str, t.Any] = {"low": runs[0], "high": runs[1]}
    if group_id is not None:
        where.append("group_id = :g")
        params["g"] = group_id
    if identity_ids:
        where.append(f"identity_id IN ({', '.join(f':i{n}' for n in range(len(identity_ids)))})")
        params.update({f"i{n}": iid for n, iid in enumerate(identity_ids)})
    if not observations:
        # sync_runs.changes counts a run's events: runs without any (a first snapshot's
        # million first_seen versions) need not be read at all
        where.append("run_id IN (SELECT id FROM sync_runs WHERE id BETWEEN :low AND :high AND changes > 0)")
    sql = f"""
        SELECT {', '.join(CHANGE_FIELDS)} FROM {'membership_changes' if observations else 'membership_events'}
        WHERE {' AND '.join(where)}
        ORDER BY run_id, group_name, group_id, username, identity_id"""
    return [ChangeRow(*r) for r in _rows(db, sql, params)]


def current_groups(db: sqlite_utils.Database) -> list[MyGroupRow]:
    """The identity's groups as last read, with their active member counts."""
    sql = """
        SELECT g.id, g.name, g.my_role, g.my_status, g.members_visible,
               CASE WHEN g.members_visible THEN g.active_member_count END, g.needs_login
        FROM groups g
        WHERE g.removed_at IS NULL
        ORDER BY g.name, g.id"""
    return [MyGroupRow(*r) for r in _rows(db, sql)]


def groups_as_of(db: sqlite_utils.Database, run_id: int) -> list[MyGroupRow]:
    """The identity's groups as of a run, with their active member counts then."""
    sql = f"""
        SELECT gh.group_id, gh.name, gh.my_role, gh.my_status, gh.members_visible,
               CASE WHEN gh.members_visible THEN (
                 SELECT count(*) FROM membership_history h
                 WHERE h.group_id = gh.group_id AND h.status = 'active' AND {_AS_OF}) END
        FROM group_history gh
        WHERE gh.from_run <= :run AND (gh.to_run IS NULL OR gh.to_run > :run)
        ORDER BY gh.name, gh.group_id"""
    return [MyGroupRow(*r) for r in _rows(db, sql, {"run": run_id})]


def identity_history(db: sqlite_utils.Database, identity_ids: t.Sequence[str]) -> list[IdentityRow]:
    """Every version of the identities' memberships, oldest first, with each group's
    latest known name (so one group reads as one name across a rename)."""
    marks = ", ".join("?" for _ in identity_ids)
    sql = f"""
        SELECT h.group_id, g.name, h.role, h.status, h.valid_from, h.valid_to, h.began, h.ended
        FROM membership_history h
        LEFT JOIN groups g ON g.id = h.group_id
        WHERE h.identity_id IN ({marks})
        ORDER BY h.valid_from, g.name, h.group_id"""
    return [IdentityRow(*r) for r in _rows(db, sql, list(identity_ids))]


def hidden_groups(db: sqlite_utils.Database) -> int:
    """How many of the identity's current groups do not show it their members."""
    return int(_rows(db, "SELECT count(*) FROM groups WHERE removed_at IS NULL AND NOT members_visible")[0][0])
