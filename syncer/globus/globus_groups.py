"""Reading groups and memberships from the Globus Groups API.

``list_my_groups`` asks which groups the identity belongs to; ``GroupReader`` then
fetches each group with ``include=memberships,policies`` from a few worker threads at once
(each read is one latency-bound HTTP request; Globus does not paginate memberships)
and yields results as they arrive, so a caller can store them without holding them
all. An ``AdaptiveLimit`` halves the reads in flight when Globus answers 429 and
lets them grow back slowly.

Answers are checked before they are believed (SPEC, "Reading Globus"): the plain
functions ``parse_listing`` and ``parse_group`` turn a body into what is recorded, or
raise an error naming the entry and the field (never quoting the body); a 401 is
a session requirement only when ``globus_sdk.gare`` finds one in it. A large group
document is parsed as a stream (``parse_group_stream``, same rules, same record), so
that memory does not grow with the size of a group.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime as dt
import enum
import hashlib
import json
import queue
import re
import threading
import time
import typing as t
import urllib.parse
from email.utils import parsedate_to_datetime

import globus_sdk
import ijson
import requests
from globus_sdk.transport import RequestCallerInfo, RetryCheckResult, RetryContext

from syncer import __version__
from syncer.errors import LoginRequired
from syncer.globus.auth import MAX_RETRY_SLEEP, describe_api_error, describe_network_error, session_requirement
from syncer.logs import module_logger

log = module_logger(__name__)

MANAGER_ROLES = ("admin", "manager")


class MembersView(enum.StrEnum):
    """Which of a group's memberships Globus shows the identity: every membership (to
    its active admins and managers), the active ones (to its active members, where the
    group's members are visible to members), or only its own. Whether a membership
    missing from a read has ended or is merely out of view depends on it."""

    ALL = "all"
    ACTIVE = "active"
    OWN = "own"


class MembershipRow(t.NamedTuple):
    """One membership as read from Globus, ready to stage: the staging table's columns
    are these fields, in this order (see ``syncer.storage.history``)."""

    group_id: str
    identity_id: str
    username: str | None
    role: str | None
    status: str | None
    status_reason: str | None
    membership_fields: str  # JSON text
    updated: str | None
    # the identity's details, from membership_fields
    name: str | None
    email: str | None
    institution: str | None


class GroupRow(t.NamedTuple):
    """One group's document as read from Globus, with the identity's standing in it."""

    id: str
    name: str | None
    description: str | None
    parent_id: str | None
    group_type: str | None
    group_visibility: str | None
    group_members_visibility: str | None
    members_view: str  # which memberships the identity may see: see MembersView
    my_role: str | None
    my_status: str | None
    # the group's session policies (None: the document did not say; the stored value stands)
    is_high_assurance: bool | None = None
    authentication_assurance_timeout: int | None = None
    enforce_session: bool | None = None
    session_limit: int | None = None


@dataclasses.dataclass(frozen=True)
class GroupListing:
    """A group as ``my_groups`` lists it, with the identity's own standing in it."""

    id: str
    name: str | None
    my_role: str | None
    my_status: str | None
    members_visibility: str | None
    # the identity's own memberships
    own: tuple[MembershipRow, ...] = ()
    group_visibility: str | None = None

    @property
    def members_view(self) -> str:
        """Which of the group's memberships Globus shows the identity (``MembersView``)."""
        if self.my_status != "active":
            return MembersView.OWN
        if self.my_role in MANAGER_ROLES:
            return MembersView.ALL
        return MembersView.ACTIVE if self.members_visibility == "members" else MembersView.OWN


class MyGroups(t.NamedTuple):
    """What ``my_groups`` says: the identity's groups, and the groups where it has a
    membership in another status (left, removed, ...), which say why a group is no
    longer among its groups."""

    mine: list[GroupListing]
    others: list[GroupListing]


@dataclasses.dataclass
class GroupRead:
    """One group's document and its memberships, checked and ready to store; ``digest``
    (see ``group_digest``) is stored with them, so that the next run can tell an
    unchanged answer (None: nothing to compare with, the group is always diffed)."""

    group: GroupRow
    # a large document's memberships are decoded while they are staged (``parse_group_stream``)
    memberships: list[MembershipRow] | MembershipPieces
    digest: bytes | None = None


@dataclasses.dataclass(frozen=True)
class Unchanged:
    """A group whose answer has the digest stored with its recorded rows: what it would
    record is what is stored, so it is neither parsed nor diffed."""

    digest: bytes


class FetchedBody(t.NamedTuple):
    """A group's response body as received (JSON decodes it from bytes), and its ``group_digest``."""

    content: bytearray
    digest: bytes


# The rules that turn Globus's answers into what syncer records: ``list_my_groups``,
# ``parse_group`` and what the recorder stores of their rows. A group's digest covers
# them (and the release), so changing them invalidates every stored digest and each
# group is diffed in full once more. Raise this whenever they change.
PARSE_RULES = "1"


def digest_rules(version: str = __version__, rules: str = PARSE_RULES) -> bytes:
    """What every digest starts with: the release and the parsing rules it was made by."""
    return f"syncer {version} parse rules {rules}\0".encode()


_DIGEST_RULES = digest_rules()


def group_digest(listing: GroupListing, body: bytes, content_type: str | None, rules: bytes | None = None) -> bytes:
    """A SHA-256 of everything a group's record is made from: the rules, every field of
    its listing entry (its name, the identity's role, status and own memberships, the
    members' visibility: what ``members_view`` and the own membership come from), and
    the response body with the content type that says how it decodes to text.

    Two answers with equal digests make the same record, so a group whose digest is the
    one stored with its rows needs no parsing or diffing. A cryptographic hash, because
    a collision would hide a change that group managers (other people) can shape.
    """
    listed = repr(tuple(getattr(listing, field.name) for field in dataclasses.fields(listing)))
    digest = hashlib.sha256(_DIGEST_RULES if rules is None else rules)
    # repr never holds a raw NUL, so the parts cannot run into each other
    digest.update(listed.encode("utf-8", "surrogatepass"))
    digest.update(b"\0" + (content_type or "").encode("utf-8", "surrogatepass") + b"\0")
    digest.update(body)
    return digest.digest()


class GroupReadError(Exception):
    """A group could not be read (HTTP error, timeout or unusable body)."""


class NeedsLogin(GroupReadError):
    """Globus refused a group's read for a session requirement (a high-assurance
    group, a required identity or domain, MFA): only a new login can satisfy it.
    ``asked`` says what Globus asked for, as one line."""

    def __init__(self, asked: str) -> None:
        super().__init__(f"Globus asks for a new login session for this group ({asked})")
        self.asked = asked


class ListingError(GroupReadError):
    """The ``my_groups`` answer breaks SPEC's rules: the run cannot trust it."""


# json.dumps(value, ensure_ascii=False, sort_keys=True) without building an encoder per call
_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode


def _text(value: t.Any) -> str | None:
    """Strings stay verbatim; other scalars become text; absent stays NULL."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return _JSON(value)
    return str(value)


def pin_environment_proxies(client: globus_sdk.BaseClient) -> None:
    """Read the proxy environment variables once for this client, not per request.

    ``requests`` looks up ``*_PROXY``/``NO_PROXY`` in the environment on every request
    it sends, a measurable share of the CPU a small group read costs. Every request
    of a client goes to one host, so the answer is the same each time.
    """
    session = client.transport.session
    session.proxies = requests.utils.get_environ_proxies(client.base_url)
    session.trust_env = False


# Every membership status Globus has: listing them all tells why a group is no longer
# among the identity's groups (it left, was removed, ...), not only that it is not.
# Their order is "best first": where one identity is listed more than once, the
# better status counts.
GLOBUS_STATUSES = ("active", "invited", "pending", "rejected", "removed", "left", "declined")
ROLES = ("member", "manager", "admin")  # lowest first
_ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
_STATUS_RANK = {status: -rank for rank, status in enumerate(GLOBUS_STATUSES)}


def list_my_groups(client: globus_sdk.GroupsClient, statuses: t.Sequence[str]) -> MyGroups:
    """The groups in which the identity has a membership in one of ``statuses`` (mine),
    and those where its memberships are all in other statuses (others).

    Raises ListingError when the answer breaks the rules (see ``parse_listing``).
    """
    response = renewing(lambda: client.get_my_groups(statuses=list(GLOBUS_STATUSES)))
    return parse_listing(_json_body(response.text), statuses)


def _json_body(text: str | bytes | bytearray) -> t.Any:
    """A body parsed as JSON; ``_NOT_JSON`` when it is not JSON at all."""
    try:
        return json.loads(text)
    except ValueError:
        return _NOT_JSON


_NOT_JSON = object()


def parse_listing(data: t.Any, statuses: t.Sequence[str]) -> MyGroups:
    """Check a ``my_groups`` body and split it into mine and others.

    Usable only as a JSON list of objects, each with a group ``id`` and a non-empty
    ``my_memberships`` whose entries each name an ``identity_id`` with a known
    ``role`` and ``status`` (the identity's own memberships are recorded from
    them). Anything else raises ListingError naming the entry and the field, never
    the body: a listing that cannot be trusted must not make groups look gone.
    """
    if data is _NOT_JSON:
        raise ListingError("my_groups: the answer is not JSON")
    if not isinstance(data, list):
        raise ListingError(f"my_groups: the answer is a JSON {_json_kind(data)}, not a list")
    seen: set[str] = set()
    found = MyGroups([], [])
    for n, doc in enumerate(data):
        where = f"my_groups[{n}]"
        if not isinstance(doc, dict):
            raise ListingError(f"{where}: not an object")
        group_id = doc.get("id")
        if not isinstance(group_id, str) or not group_id:
            raise ListingError(f"{where}: no group id")
        where = f"my_groups[{n}] (group {group_id})"
        own = doc.get("my_memberships")
        if not isinstance(own, list) or not own:
            raise ListingError(f"{where}: no my_memberships")
        for m, item in enumerate(own):
            problem = membership_problem(item)
            if problem:
                raise ListingError(f"{where}: my_memberships[{m}]: {problem}")
        if group_id in seen:
            continue
        seen.add(group_id)
        counting = [m for m in own if m["status"] in statuses]
        # the best standing counts when the identity holds several memberships
        standing = min(counting or own, key=lambda m: (m["status"] != "active", m["role"] not in MANAGER_ROLES))
        policies = doc.get("policies") if isinstance(doc.get("policies"), dict) else {}
        listing = GroupListing(
            id=group_id,
            name=_text(doc.get("name")),
            my_role=standing["role"],
            my_status=standing["status"],
            members_visibility=_text(policies.get("group_members_visibility")),
            own=tuple(_membership_row(group_id, m) for m in _one_per_identity(counting)),
            group_visibility=_text(policies.get("group_visibility")),
        )
        (found.mine if counting else found.others).append(listing)
    return found


def _json_kind(value: t.Any) -> str:
    """What a JSON value is, for a message that must not quote it."""
    if isinstance(value, dict):
        return "object"
    if value is None:
        return "null"
    return {str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), type(value).__name__)


def membership_problem(item: t.Any) -> str | None:
    """What makes a membership document unusable (which field), or None if usable:
    it names an ``identity_id``, a ``role`` among Globus's three and a ``status``
    among Globus's seven. Other fields (username, membership_fields, updated, ...)
    are optional: recorded bodies often leave them out."""
    if not isinstance(item, dict):
        return "not an object"
    if _identity_id(item) is None:
        return "no identity_id"
    if item.get("role") not in _ROLE_RANK:
        return f"role is not one of {', '.join(ROLES)}"
    if item.get("status") not in _STATUS_RANK:
        return f"status is not one of Globus's ({', '.join(GLOBUS_STATUSES)})"
    return None


def _one_per_identity(items: t.Iterable[dict[str, t.Any]]) -> list[dict[str, t.Any]]:
    """One membership document per identity (SPEC: one membership per identity and group).

    An explicit membership (no ``source_group_id``) beats implicit ones, which Globus
    lists for members of subgroups; among several of a kind, the highest role, then
    the best status. The remaining tie is broken by the document's own text, so the
    same answer always gives the same record, whatever order Globus lists it in.
    """
    first: dict[str, dict[str, t.Any]] = {}
    repeated: dict[str, list[dict[str, t.Any]]] = {}
    for item in items:
        identity = item["identity_id"]
        if identity not in first:
            first[identity] = item
        else:
            repeated.setdefault(identity, [first[identity]]).append(item)
    for identity, listed in repeated.items():  # rare: the ranking is paid for only here
        first[identity] = max(listed, key=_precedence)
    return list(first.values())


def _precedence(item: dict[str, t.Any]) -> tuple[t.Any, ...]:
    """How a membership document ranks against others of the same identity."""
    return (not item.get("source_group_id"), _ROLE_RANK[item["role"]], _STATUS_RANK[item["status"]], _JSON(item))


def _identity_id(item: t.Any) -> str | None:
    identity_id = item.get("identity_id") if isinstance(item, dict) else None
    return identity_id if isinstance(identity_id, str) and identity_id else None


def _membership_row(group_id: str, item: dict[str, t.Any]) -> MembershipRow:
    """A membership document as a row; the caller has checked it (``membership_problem``)."""
    fields = item.get("membership_fields")
    if not isinstance(fields, dict):
        fields = {}
    text = _text
    return MembershipRow(
        group_id, item["identity_id"], text(item.get("username")), item["role"],
        item["status"], text(item.get("status_reason")), _JSON(fields),
        text(item.get("updated")), text(fields.get("name")), text(fields.get("email")),
        text(fields.get("institution")),
    )


def _flag(value: t.Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _seconds(value: t.Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_group(listing: GroupListing, data: t.Any) -> GroupRead:
    """Check a ``get_group`` body against SPEC's rules; raise GroupReadError naming
    the field when it cannot be used (nothing of it is then recorded).

    Usable only with the group's ``id``, a string ``name`` and, where the identity
    sees the group's members, a ``memberships`` list of usable membership documents
    (``membership_problem``), one kept per identity (``_one_per_identity``). Where
    the identity may see only its own membership (``MembersView.OWN``: a plain member
    of a group whose members are visible to managers, or an invited or pending
    member), its own memberships come from the listing, whatever the document holds:
    Globus may send none, an empty list, or more.
    """
    group = _group_row(listing, data)
    if listing.members_view == MembersView.OWN:
        return GroupRead(group=group, memberships=list(listing.own))
    memberships = data.get("memberships")
    _check_memberships_kind(memberships is None, isinstance(memberships, list))
    for n, item in enumerate(memberships):
        problem = membership_problem(item)
        if problem:
            raise GroupReadError(f"memberships[{n}]: {problem}")
    kept = [_membership_row(listing.id, item) for item in _one_per_identity(memberships)]
    return GroupRead(group=group, memberships=kept)


def _group_row(listing: GroupListing, data: t.Any) -> GroupRow:
    """The group's own fields from a parsed body (its ``memberships`` aside), checked."""
    if data is _NOT_JSON:
        raise GroupReadError("the answer is not JSON")
    if not isinstance(data, dict):
        raise GroupReadError(f"the answer is a JSON {_json_kind(data)}, not an object")
    if data.get("id") != listing.id:
        raise GroupReadError("id: missing" if data.get("id") is None else "id: not the group asked for")
    if not isinstance(data.get("name"), str):
        raise GroupReadError("name: not a string")
    policies = data.get("policies") if isinstance(data.get("policies"), dict) else {}
    return GroupRow(
        id=listing.id,
        name=data["name"],
        description=_text(data.get("description")),
        parent_id=_text(data.get("parent_id")),
        group_type=_text(data.get("group_type")),
        group_visibility=_text(policies.get("group_visibility")),
        group_members_visibility=_text(policies.get("group_members_visibility")),
        members_view=listing.members_view,
        my_role=listing.my_role,
        my_status=listing.my_status,
        is_high_assurance=_flag(policies.get("is_high_assurance")),
        authentication_assurance_timeout=_seconds(policies.get("authentication_assurance_timeout")),
        enforce_session=_flag(data.get("enforce_session")),
        session_limit=_seconds(data.get("session_limit")),
    )


def _check_memberships_kind(missing: bool, is_list: bool) -> None:
    if not is_list:
        raise GroupReadError("memberships: " + ("missing" if missing else "not a list"))


# ---------------------------------------------------------------- streamed parsing

#: Group documents at least this large are parsed as a stream (``parse_group_stream``):
#: below it ``json.loads`` of the whole body is cheaper in CPU, and its parsed form small.
STREAM_BYTES = 1024 * 1024
#: Membership rows handed to the recorder at a time from a streamed document.
PIECE_ROWS = 2000

_OPENS = frozenset(("start_map", "start_array"))
_CLOSES = frozenset(("end_map", "end_array"))
# UTF-16 surrogate escapes: yajl turns a lone one into "?" where json.loads keeps it,
# so documents with one take the json.loads path and record what they always did.
# Pairs (an emoji in a body sent with ensure_ascii) decode alike and stay streamed.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # cheap to search for: the candidates
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F]"
)


def _lone_surrogate(body: bytes | bytearray) -> bool:
    """Whether the body holds a surrogate escape that is not half of a pair (or might be
    one: an escaped backslash before "u" also counts, which only costs a whole parse)."""
    # match() from a candidate still looks behind it: the escape before decides for a low half
    return any(_LONE_SURROGATE.match(body, found.start()) for found in _SURROGATE_ESCAPE.finditer(body))


class _BytesReader:
    """A file-like view of a received body for ijson, without copying it whole."""

    def __init__(self, body: bytes | bytearray) -> None:
        self._view = memoryview(body)
        self._at = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else self._at + size
        chunk = bytes(self._view[self._at:end])
        self._at += len(chunk)
        return chunk


class _Whole(Exception):
    """The document needs the whole-body path (``json.loads``) to be read as it always was."""


def _head(body: bytes | bytearray) -> tuple[dict[str, t.Any], str | None]:
    """One pass over a whole body: its top-level fields but ``memberships`` (built),
    and the first event of the ``memberships`` value (None: no such key).

    Raises _Whole where the stream cannot say what ``json.loads`` would: a body that
    is not JSON to yajl (``json.loads`` also accepts NaN, a BOM, UTF-16 and large
    numbers), not an object, or keys that ijson's prefixes would confuse with the
    memberships (a repeated ``memberships``, a top-level key starting with ``memberships.``).
    """
    head: dict[str, t.Any] = {}
    members: str | None = None
    depth = 0  # 0: at the top-level object's keys
    key = ""
    builder: ijson.ObjectBuilder | None = None
    try:
        events = ijson.basic_parse(_BytesReader(body), use_float=True)
        if next(events, None) != ("start_map", None):
            raise _Whole
        for event, value in events:
            if depth:
                if event in _OPENS:
                    depth += 1
                elif event in _CLOSES:
                    depth -= 1
            elif event == "map_key":
                key = value
                if key == "memberships":
                    if members is not None:
                        raise _Whole
                    builder = None
                    continue
                if key.startswith("memberships."):
                    raise _Whole
                builder = ijson.ObjectBuilder()
                continue
            elif event == "end_map":  # the document's end; yajl still checks what follows
                continue
            else:  # the first event of a top-level value
                if key == "memberships":
                    members = event
                if event in _OPENS:
                    depth = 1
            if builder is not None:
                builder.event(event, value)
                if not depth:
                    head[key] = builder.value
                    builder = None
    except (ijson.JSONError, ValueError) as err:
        raise _Whole from err
    return head, members


def parse_group_stream(listing: GroupListing, body: bytes | bytearray, piece_rows: int = PIECE_ROWS) -> GroupRead:
    """``parse_group(listing, json.loads(body))``, without holding the parsed document:
    what is recorded, and every rule checked, are the same.

    The whole body is first parsed once for the group's own fields (so it is known to
    be JSON, and the group usable, before anything of it is staged). Its memberships
    are then decoded one by one as the recorder stages them, in pieces of
    ``piece_rows``: ``GroupRead.memberships`` is a ``MembershipPieces``, which raises
    GroupReadError at the first unusable entry (the recorder then discards what it
    staged of the group). Documents the stream cannot read as ``json.loads`` would
    (see ``_head``) are parsed whole.
    """
    if _lone_surrogate(body):
        return parse_group(listing, _json_body(body))
    try:
        head, members = _head(body)
    except _Whole:
        return parse_group(listing, _json_body(body))
    group = _group_row(listing, head)
    if listing.members_view == MembersView.OWN:
        return GroupRead(group=group, memberships=list(listing.own))
    _check_memberships_kind(members in (None, "null"), members == "start_array")
    return GroupRead(group=group, memberships=MembershipPieces(listing.id, body, piece_rows))


class MembershipPieces:
    """A streamed document's memberships, decoded as they are iterated: lists of at
    most ``piece_rows`` rows, one per identity (SPEC), checked entry by entry.

    Each identity's first entry is yielded as it comes; only the hash of its id is
    kept (an int: half the size of the id). An entry whose id's hash was met before is
    held back, and once the list ends, a second pass gathers every entry with such a
    hash, by identity, and yields the one that counts for each (``_one_per_identity``'s
    rule), which replaces the first where staged. Two identities whose ids' hashes
    collide are thus still told apart. Raises GroupReadError naming the first
    unusable entry: rows already yielded must then be discarded.
    """

    def __init__(self, group_id: str, body: bytes | bytearray, piece_rows: int) -> None:
        self.group_id = group_id
        self._body = body
        self._piece_rows = piece_rows

    def _items(self) -> t.Iterator[t.Any]:
        return t.cast(t.Iterator[t.Any], ijson.items(_BytesReader(self._body), "memberships.item", use_float=True))

    def __iter__(self) -> t.Iterator[list[MembershipRow]]:
        seen: set[int] = set()
        repeated: set[int] = set()
        piece: list[MembershipRow] = []
        for n, item in enumerate(self._items()):
            problem = membership_problem(item)
            if problem:
                raise GroupReadError(f"memberships[{n}]: {problem}")
            identity = hash(item["identity_id"])
            if identity in seen:
                repeated.add(identity)
                continue
            seen.add(identity)
            piece.append(_membership_row(self.group_id, item))
            if len(piece) >= self._piece_rows:
                yield piece
                piece = []
        del seen
        if piece:
            yield piece
        if repeated:  # rare: paid for only here
            listed: dict[str, list[dict[str, t.Any]]] = {}
            for item in self._items():
                if hash(item["identity_id"]) in repeated:
                    listed.setdefault(item["identity_id"], []).append(item)
            yield [_membership_row(self.group_id, max(items, key=_precedence)) for items in listed.values()]


class AdaptiveLimit:
    """How many reads may be in flight: halves on 429, grows back by one per streak.

    After a 429 every worker also waits until the ``Retry-After`` moment before
    sending again, so the service sees the whole client back off, not one thread.
    The limit halves once per such pause, as TCP halves its window once per round
    trip: the 429s answered to reads already in flight report the same congestion.
    """

    RECOVER_AFTER = 20  # successful reads per step back up

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.in_flight = 0
        self.rate_limited = 0  # 429s seen this run
        self._resume_at = 0.0
        self._streak = 0
        self._cond = threading.Condition()

    def acquire(self, stopping: t.Callable[[], bool]) -> bool:
        """Wait for a slot; False if ``stopping()`` turns true while waiting."""
        with self._cond:
            while not stopping():
                pause = self._resume_at - time.monotonic()
                if pause <= 0 and self.in_flight < self.limit:
                    self.in_flight += 1
                    return True
                self._cond.wait(timeout=min(max(pause, 0.05), 0.5))
            return False

    def release(self, ok: bool) -> None:
        with self._cond:
            self.in_flight -= 1
            if ok:
                self._streak += 1
                if self._streak >= self.RECOVER_AFTER and self.limit < self.maximum:
                    self.limit += 1
                    self._streak = 0
            self._cond.notify_all()

    def throttled(self, retry_after: float) -> None:
        """A 429: pause every worker ``retry_after`` seconds and halve the limit, unless
        still paused for an earlier 429, which only a longer ``retry_after`` extends."""
        with self._cond:
            self.rate_limited += 1
            self._streak = 0
            now = time.monotonic()
            if now >= self._resume_at:
                self.limit = max(1, self.limit // 2)
                log.info("Globus asked to slow down (429); %d read(s) in flight now", self.limit)
            self._resume_at = max(self._resume_at, now + retry_after)

    def retry_check(self, ctx: RetryContext) -> RetryCheckResult:
        """An SDK retry check that only observes: it tells the limit about 429s."""
        if ctx.response is not None and ctx.response.status_code == 429:
            self.throttled(self._retry_after(ctx.response.headers.get("Retry-After", "")))
        return RetryCheckResult.no_decision

    @staticmethod
    def _retry_after(header: str) -> float:
        """Seconds to pause for a ``Retry-After`` value, delay-seconds or an HTTP-date
        (RFC 9110); 1 if absent or unreadable. At most MAX_RETRY_SLEEP: the SDK sleeps
        no longer than that before its retry, so a longer pause would only idle the others."""
        header = header.strip()
        if header.isascii() and header.isdigit():  # isdigit alone accepts "²", which float() refuses
            seconds = float(header)
        else:
            try:
                when = parsedate_to_datetime(header)
            except (ValueError, OverflowError):
                return 1.0
            if when.tzinfo is None:  # the obsolete asctime form names no zone; HTTP dates are GMT
                when = when.replace(tzinfo=dt.UTC)
            seconds = when.timestamp() - time.time()
        return min(max(seconds, 0.0), MAX_RETRY_SLEEP)


Outcome = tuple[GroupListing, GroupRead | Unchanged | GroupReadError]
_Fetched = tuple[GroupListing, FetchedBody | GroupReadError]
# a group's digest as stored with its rows, by group id (None: none stored)
RecordedDigest = t.Callable[[str], bytes | None]

#: Bytes of group documents a run holds at once (being received, waiting, or being
#: parsed), beyond the one document that may always exceed it. Globus does not page
#: memberships: a 100,000-member group is one 40 MB body, and eight of them arriving
#: together would otherwise be held at once, whatever the queue's length.
MAX_BODY_BYTES = 16 * 1024 * 1024
_CHUNK = 256 * 1024


# glibc's mallopt parameter: the size from which an allocation gets its own mapping
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 128 * 1024  # glibc's default


def return_large_blocks() -> None:
    """Have the C allocator give large freed blocks (group bodies) back to the system.

    glibc maps each allocation above its mmap threshold (128 KiB) on its own and
    unmaps it when freed, but every such block freed raises the threshold to its size
    (up to 32 MiB). After the first large group, the 256 KiB chunks a body arrives in
    and the growing body itself then come from the receiving thread's heap, where the
    memory stays with the process once freed: eight 100,000-member groups peaked at
    280 MiB, 173 MiB with the threshold fixed (benchmarks/README.md). Setting it
    (M_MMAP_THRESHOLD) turns the adjustment off. Elsewhere than glibc: nothing to do.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt (macOS)
        return
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


class ByteBudget:
    """Bounds the bytes of response bodies held at once across the reading threads.

    A worker takes room for each chunk it receives and waits while the budget is spent,
    which stops it reading (TCP then holds Globus back). One body at a time may
    overdraw the budget, so a document larger than the whole budget still gets
    through and workers never wait on each other forever: the overdrawn body is read
    to its end, parsed and recorded, and only then may another overdraw. The caller
    gives a body's bytes back once it is done with it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0  # the most held at once, for the benchmark's figures
        self._overdraft: object | None = None  # whose body may exceed the budget
        self._cond = threading.Condition()

    def take(self, size: int, owner: object, stopping: t.Callable[[], bool]) -> bool:
        """Wait for room for ``size`` more bytes of ``owner``'s body; False if stopping first."""
        with self._cond:
            while not stopping():
                fits = self.held + size <= self.limit
                if fits or self._overdraft in (None, owner):
                    if not fits:
                        self._overdraft = owner
                    self.held += size
                    self.peak = max(self.peak, self.held)
                    return True
                self._cond.wait(timeout=0.2)
            return False

    def give_back(self, size: int, owner: object) -> None:
        """``owner``'s body of ``size`` bytes is no longer held."""
        with self._cond:
            self.held -= size
            if self._overdraft is owner:
                self._overdraft = None
            self._cond.notify_all()


class GroupReader:
    """Reads every listed group concurrently, from the moment it is made.

    Iterating yields each outcome as it completes. At most ``limit.limit`` requests
    are in flight and at most ``8 * limit.maximum`` finished results wait for the
    caller, so memory does not grow with the number of groups; bodies are received
    as streams within a ``ByteBudget`` of ``max_bytes``, so it does not grow with
    the size of groups either (a body's bytes count until the caller asks for the
    next outcome, its parsed form included). Workers only fetch;
    bodies are parsed by the iterating thread, so a worker sends its next request as
    soon as an answer arrives and the requests in flight stay full. Because the reads
    start at once, the caller can prepare to store them meanwhile. Stops early when
    ``cancelled`` is set or the reader is closed. ``LoginRequired`` (refresh token
    refused) ends all reads and is raised by the iteration.
    """

    def __init__(
        self,
        client: globus_sdk.GroupsClient,
        listings: t.Sequence[GroupListing],
        limit: AdaptiveLimit,
        cancelled: threading.Event,
        max_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._client = client
        self._limit = limit
        self.budget = ByteBudget(max_bytes)
        self._cancelled = cancelled
        self._todo: queue.SimpleQueue[GroupListing] = queue.SimpleQueue()
        for listing in listings:
            self._todo.put(listing)
        # room for the answers that arrive while the caller applies a batch to the database
        self._results: queue.Queue[_Fetched | BaseException | None] = queue.Queue(maxsize=limit.maximum * 8)
        self._done = threading.Event()  # the caller left early: workers stop too
        self._recorded: RecordedDigest | None = None
        self._workers = [
            threading.Thread(target=self._work, name=f"groups-reader-{i}", daemon=True)
            for i in range(min(limit.maximum, len(listings)))
        ]
        for worker in self._workers:
            worker.start()

    def __enter__(self) -> t.Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def skip_unchanged(self, recorded: RecordedDigest) -> None:
        """From now on, yield ``Unchanged`` instead of a parsed read for a group whose
        answer's digest is ``recorded(group_id)``. Called by the iterating thread (the
        lookup reads the database), once that is open."""
        self._recorded = recorded

    def close(self) -> None:
        """Stop sending requests. Workers still waiting on a slow request finish it
        (bounded by the HTTP timeout) and exit on their own; nothing waits for them."""
        self._done.set()

    def __iter__(self) -> t.Iterator[Outcome]:
        finished = 0
        while finished < len(self._workers) and not self._cancelled.is_set():
            try:
                item = self._results.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is None:
                finished += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                listing, body = item
                del item
                if isinstance(body, GroupReadError):
                    yield listing, body
                    continue
                size = len(body.content)
                outcome: GroupRead | Unchanged | GroupReadError | None = None
                try:
                    if self._recorded is not None and self._recorded(listing.id) == body.digest:
                        outcome = Unchanged(body.digest)
                    else:
                        outcome = _parse_body(listing, body)
                    del body  # the caller records the parsed form; the bytes need not wait for that
                    yield listing, outcome
                finally:
                    # the caller is done with it (recorded, or left the loop)
                    del outcome
                    self.budget.give_back(size, listing)

    def _stopping(self) -> bool:
        return self._done.is_set() or self._cancelled.is_set()

    def _offer(self, item: _Fetched | BaseException | None) -> None:
        # never block forever: once the caller has gone, results are dropped
        while not self._done.is_set():
            try:
                self._results.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _fetch_one(self, listing: GroupListing) -> FetchedBody | GroupReadError:
        """One group's response body, received within the byte budget, and its digest,
        or why it could not be had.

        The digest is taken here, in the worker thread (SHA-256 releases the GIL), so that
        an unchanged group costs the iterating thread one lookup.
        """
        try:
            response = renewing(lambda: _get_group_streamed(self._client, listing.id))
        except globus_sdk.GlobusAPIError as err:
            asked = session_requirement(err)
            if asked is not None:
                # a group with a session policy (e.g. high assurance) wants a new login:
                # that group cannot be read unattended, the others still can
                return NeedsLogin(asked)
            return GroupReadError(describe_api_error(err))
        except globus_sdk.NetworkError as err:
            return GroupReadError(describe_network_error(err))
        body = bytearray()
        try:
            for chunk in response.iter_content(_CHUNK):
                if not self.budget.take(len(chunk), listing, self._stopping):
                    self.budget.give_back(len(body), listing)
                    return GroupReadError("stopped before the group was read")
                body += chunk
        except requests.RequestException as err:
            self.budget.give_back(len(body), listing)
            return GroupReadError(f"network error while receiving the group: {type(err).__name__}")
        finally:
            response.close()
        return FetchedBody(body, group_digest(listing, body, response.headers.get("Content-Type")))

    def _work(self) -> None:
        try:
            while not self._stopping():
                try:
                    listing = self._todo.get_nowait()
                except queue.Empty:
                    return
                if not self._limit.acquire(self._stopping):
                    return
                ok = False
                try:
                    fetched: _Fetched = (listing, self._fetch_one(listing))
                    ok = not isinstance(fetched[1], GroupReadError)
                finally:
                    self._limit.release(ok)
                self._offer(fetched)
                del fetched  # the caller holds it now; this thread must not keep it while it reads the next
        except BaseException as err:  # noqa: BLE001 - handed to the caller to raise
            self._offer(err)
        finally:
            self._offer(None)


_R = t.TypeVar("_R")


def renewing(request: t.Callable[[], _R]) -> _R:
    """Make one Globus request; after a plain 401, once more, from scratch.

    The SDK renews a refused access token only when the *first* answer to a request
    is a 401. When the first answer was a 5xx or 429 and Globus stopped accepting the
    token while the request waited to retry (revoked, or expired early), the retry's
    401 is final and the run would end as "login required" although the refresh
    token is fine. A fresh request meets the 401 first and renews; its 401 is final.
    A 401 asking for a new session is not retried (a renewed token has the same
    session) and is raised as it is; a plain 401 on the fresh request means the token
    is refused even after renewal: ``LoginRequired``.
    """
    try:
        return request()
    except globus_sdk.GlobusAPIError as err:
        if not _plain_401(err):
            raise
    log.debug("Globus refused the access token; trying the request once more, afresh")
    try:
        return request()
    except globus_sdk.GlobusAPIError as err:
        if _plain_401(err):
            raise LoginRequired("Globus Groups rejected the access token even after renewing it") from None
        raise


def _plain_401(err: globus_sdk.GlobusAPIError) -> bool:
    """A 401 that is a token problem: not a session requirement (``session_requirement``)."""
    return err.http_status == 401 and session_requirement(err) is None


def _parse_body(listing: GroupListing, body: FetchedBody) -> GroupRead | GroupReadError:
    try:
        if len(body.content) >= STREAM_BYTES:
            read = parse_group_stream(listing, body.content)
        else:
            read = parse_group(listing, _json_body(body.content))
    except GroupReadError as err:
        return err
    read.digest = body.digest
    return read


def _get_group_streamed(client: globus_sdk.GroupsClient, group_id: str) -> requests.Response:
    """``client.get_group(group_id, include=("memberships", "policies"))``, its body not yet received.

    ``GroupsClient.get_group`` receives the whole body before it returns, and the SDK
    offers the raw response only through a private attribute; its transport's public
    ``request(..., stream=True)`` does the same request (authorizer, renewal on 401,
    retries) and hands over the stream. An error answer raises the client's error
    class, as ``get_group`` would.
    """
    url = f"{client.base_url.rstrip('/')}/v2/groups/{urllib.parse.quote(group_id)}"
    caller = RequestCallerInfo(retry_config=client.retry_config, authorizer=client.authorizer)
    # policies: the group's session policies are kept with its history
    response = client.transport.request(
        "GET", url, caller_info=caller, query_params={"include": "memberships,policies"}, stream=True
    )
    if not 200 <= response.status_code < 300:
        try:
            raise client.error_class(response)
        finally:
            response.close()
    return response
