"""Reading groups and memberships from the Globus Groups API.

``list_my_groups`` asks which groups the identity belongs to; ``GroupReader`` then
fetches each group with ``include=memberships`` from a few worker threads at once
(each read is one latency-bound HTTP request; Globus does not paginate memberships)
and yields results as they arrive, so a caller can store them without holding them
all. An ``AdaptiveLimit`` halves the reads in flight when Globus answers 429 and
lets them grow back slowly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import logging
import queue
import threading
import time
import typing as t
from email.utils import parsedate_to_datetime

import globus_sdk
import requests
from globus_sdk.transport import RetryCheckResult, RetryContext

from syncer.auth import MAX_RETRY_SLEEP, describe_api_error, describe_network_error
from syncer.errors import LoginRequired

log = logging.getLogger(__name__)

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
    are these fields, in this order (see ``syncer.history``)."""

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
    """One group's document and its memberships, checked and ready to store."""

    group: GroupRow
    memberships: list[MembershipRow]


class GroupReadError(Exception):
    """A group could not be read (HTTP error, timeout or unusable body)."""


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
GLOBUS_STATUSES = ("active", "invited", "pending", "rejected", "removed", "left", "declined")


def list_my_groups(client: globus_sdk.GroupsClient, statuses: t.Sequence[str]) -> MyGroups:
    """The groups in which the identity has a membership in one of ``statuses`` (mine),
    and those where its memberships are all in other statuses (others)."""
    response = renewing(lambda: client.get_my_groups(statuses=list(GLOBUS_STATUSES)))
    data = response.data
    if not isinstance(data, list):
        raise GroupReadError("my_groups did not return a list")
    seen: set[str] = set()
    found = MyGroups([], [])
    for doc in data:
        if not isinstance(doc, dict) or not isinstance(doc.get("id"), str):
            log.warning("skipping a my_groups entry without an id")
            continue
        if doc["id"] in seen:
            continue
        seen.add(doc["id"])
        own = [m for m in doc.get("my_memberships") or [] if isinstance(m, dict)]
        counting = [m for m in own if m.get("status") in statuses]
        standing = counting or own
        # the best standing counts when the identity holds several memberships
        standing.sort(key=lambda m: (m.get("status") != "active", m.get("role") not in MANAGER_ROLES))
        policies = doc.get("policies") if isinstance(doc.get("policies"), dict) else {}
        listing = GroupListing(
            id=doc["id"],
            name=_text(doc.get("name")),
            my_role=_text(standing[0].get("role")) if standing else None,
            my_status=_text(standing[0].get("status")) if standing else None,
            members_visibility=_text(policies.get("group_members_visibility")),
            own=tuple(_membership_row(doc["id"], m) for m in counting if _identity_id(m)),
        )
        (found.mine if counting else found.others).append(listing)
    return found


def _identity_id(item: t.Any) -> str | None:
    identity_id = item.get("identity_id") if isinstance(item, dict) else None
    return identity_id if isinstance(identity_id, str) and identity_id else None


def _membership_row(group_id: str, item: dict[str, t.Any]) -> MembershipRow:
    """A membership document as a row; the caller has checked its identity_id."""
    fields = item.get("membership_fields")
    if not isinstance(fields, dict):
        fields = {}
    text = _text
    return MembershipRow(
        group_id, item["identity_id"], text(item.get("username")), text(item.get("role")),
        text(item.get("status")), text(item.get("status_reason")), _JSON(fields),
        text(item.get("updated")), text(fields.get("name")), text(fields.get("email")),
        text(fields.get("institution")),
    )


def parse_group(listing: GroupListing, data: t.Any) -> GroupRead:
    """Check a ``get_group`` body; raise GroupReadError when it cannot be used.

    A membership without an ``identity_id`` makes the whole read unusable.
    Everything else is kept verbatim, whatever its text. Globus shows a group's
    memberships to its active members only: for an identity that is invited or
    pending (``my_statuses``), its own membership from the listing stands in.
    """
    if not isinstance(data, dict):
        raise GroupReadError("response body is not a JSON object")
    memberships = data.get("memberships")
    # left out (or empty) for an identity that is not an active member
    withheld = listing.my_status != "active" and (memberships is None or memberships == [])
    if not withheld and not isinstance(memberships, list):
        raise GroupReadError("response has no memberships list")
    policies = data.get("policies") if isinstance(data.get("policies"), dict) else {}
    group = GroupRow(
        id=listing.id,
        name=_text(data.get("name")),
        description=_text(data.get("description")),
        parent_id=_text(data.get("parent_id")),
        group_type=_text(data.get("group_type")),
        group_visibility=_text(policies.get("group_visibility")),
        group_members_visibility=_text(policies.get("group_members_visibility")),
        members_view=listing.members_view,
        my_role=listing.my_role,
        my_status=listing.my_status,
    )
    if withheld:
        return GroupRead(group=group, memberships=list(listing.own))
    kept: list[MembershipRow] = []
    for item in memberships:
        if _identity_id(item) is None:
            # whose membership it is cannot be told, and storing the rest would
            # record that member as removed: the whole read is unusable
            raise GroupReadError("a membership without an identity_id; the group is left as it was")
        kept.append(_membership_row(listing.id, item))
    return GroupRead(group=group, memberships=kept)


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


Outcome = tuple[GroupListing, GroupRead | GroupReadError]
_Fetched = tuple[GroupListing, str | GroupReadError]


class GroupReader:
    """Reads every listed group concurrently, from the moment it is made.

    Iterating yields each outcome as it completes. At most ``limit.limit`` requests
    are in flight and at most ``8 * limit.maximum`` finished results wait for the
    caller, so memory does not grow with the number of groups. Workers only fetch;
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
    ) -> None:
        self._client = client
        self._limit = limit
        self._cancelled = cancelled
        self._todo: queue.SimpleQueue[GroupListing] = queue.SimpleQueue()
        for listing in listings:
            self._todo.put(listing)
        # room for the answers that arrive while the caller applies a batch to the database
        self._results: queue.Queue[_Fetched | BaseException | None] = queue.Queue(maxsize=limit.maximum * 8)
        self._done = threading.Event()  # the caller left early: workers stop too
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
                yield listing, _parse_body(listing, body) if isinstance(body, str) else body

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
                    fetched: _Fetched = (listing, _fetch_one(self._client, listing))
                    ok = isinstance(fetched[1], str)
                finally:
                    self._limit.release(ok)
                self._offer(fetched)
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
    return err.http_status == 401 and not err.info.authorization_parameters


def _parse_body(listing: GroupListing, body: str) -> GroupRead | GroupReadError:
    try:
        return parse_group(listing, json.loads(body))
    except ValueError:
        return GroupReadError("response body is not valid JSON")
    except GroupReadError as err:
        return err


def _fetch_one(client: globus_sdk.GroupsClient, listing: GroupListing) -> str | GroupReadError:
    """One group's response body, or why it could not be had."""
    try:
        return renewing(lambda: client.get_group(listing.id, include="memberships")).text
    except globus_sdk.GlobusAPIError as err:
        if err.http_status == 401:
            # a group with a session policy (e.g. high assurance) wants a recent login:
            # that group cannot be read unattended, the others still can
            return GroupReadError(f"the group's session policy requires a recent login ({describe_api_error(err)})")
        return GroupReadError(describe_api_error(err))
    except globus_sdk.NetworkError as err:
        return GroupReadError(describe_network_error(err))
