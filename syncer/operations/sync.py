"""One snapshot run: lock, load tokens, list and read Globus groups, record.

The order matters for the promises users rely on. The run's row is committed
before anything is recorded (so a crash leaves a ``running`` row the next run marks
``aborted``); reads are then staged and applied in batches inside one transaction
that commits only once every group has been read. Any failure before that commit
rolls it back and leaves the database as it was, plus the run's row saying why.

Globus comes first: group reads are bound by network latency, so they start as soon
as the groups are listed, and the database is opened while the first answers are on
their way. A run that fails before it opened the database still gets its row.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
import time
import typing as t

import globus_sdk

from syncer.config import Config
from syncer.errors import EXIT_FAILED, StorageError, SyncerError
from syncer.globus.auth import client_options, describe_api_error, describe_network_error, groups_authorizer
from syncer.globus.globus_groups import (
    AdaptiveLimit,
    GroupListing,
    GroupRead,
    GroupReader,
    GroupReadError,
    MyGroups,
    NeedsLogin,
    Unchanged,
    list_my_groups,
    pin_environment_proxies,
    return_large_blocks,
)
from syncer.logs import module_logger
from syncer.operations.lock import LockFile
from syncer.storage.ownership import Credentials, check_owner, from_listing, record_owner, with_username

if t.TYPE_CHECKING:
    import sqlite_utils

    from syncer.storage.history import SyncRun

log = module_logger(__name__)

Progress = t.Callable[[int, int], None]


class Cancelled(SyncerError):
    """The run was asked to stop (SIGTERM/SIGINT) before it finished."""


class _RunDatabase:
    """The output database and this run's row, once the run has something to record.

    The database is open until ``opened`` (the run's stack of open things) closes: then
    an SQLite error raised meanwhile becomes the run's one-line StorageError.
    """

    def __init__(self, opened: contextlib.ExitStack, config: Config, started_at: dt.datetime) -> None:
        # Imported here rather than at the top: importing sqlite-utils is then done
        # while the first group reads are in flight.
        from syncer.storage.database import open_for_writing
        from syncer.storage.history import start_run
        from syncer.storage.schema import format_time

        self.db: sqlite_utils.Database = opened.enter_context(open_for_writing(config.database, config.busy_timeout))
        self.run: SyncRun = start_run(self.db, format_time(started_at))

    @classmethod
    def opened_for_failure(
        cls, opened: contextlib.ExitStack, config: Config, started_at: dt.datetime
    ) -> _RunDatabase | None:
        """Open the database to record a run that failed before it got that far;
        None if the database cannot be opened (that is then the error to report)."""
        try:
            return cls(opened, config, started_at)
        except (StorageError, sqlite3.Error) as err:
            log.debug("could not open the database to record the failed run: %s", err)
            return None

    def fail(self, err: BaseException) -> None:
        """Write the run's final row for a failure; what it had applied is rolled back."""
        from syncer.storage.history import finish_without_changes

        status = "aborted" if isinstance(err, (Cancelled, KeyboardInterrupt)) else "failed"
        message = str(err) if isinstance(err, SyncerError) else f"{type(err).__name__}: {err}"
        exit_code = err.exit_code if isinstance(err, SyncerError) else EXIT_FAILED
        try:
            finish_without_changes(self.db, self.run, status, message, exit_code)
        except sqlite3.Error as db_err:
            # the row stays 'running' and the next run marks it aborted
            log.error("could not record the failed run: %s", db_err)


def run_sync(
    config: Config,
    cancelled: threading.Event | None = None,
    progress: Progress | None = None,
    started: t.Callable[[], None] | None = None,
) -> SyncRun:
    """Take one snapshot; raise LockBusy, LoginRequired, Cancelled or SyncerError.

    ``progress(done, total)`` is called as group reads complete, ``started()`` once
    the run holds the lock (a run that finds it busy does not start).
    """
    cancelled = cancelled or threading.Event()
    began = time.monotonic()
    with LockFile(config.lock_path), contextlib.ExitStack() as opened:
        if started:
            started()
        # the run's time: before any read, although its row is written after the first
        started_at = dt.datetime.now(dt.UTC)
        run_db: _RunDatabase | None = None
        opening = False  # whether the database open was reached (then its error is final)
        try:
            # tokens are read fresh each run, so a new `syncer login` applies without restarts
            with groups_authorizer(config) as authorizer:
                client, limit = _groups_client(config, authorizer)
                listing, to_read = _unless_cancelled(lambda: _list_groups(config, client), cancelled)
                who = _credentials(authorizer, listing)
                return_large_blocks()  # bodies received and freed must not stay with the process
                with GroupReader(client, to_read, limit, cancelled) as reads:
                    opening = True
                    run_db = _RunDatabase(opened, config, started_at)
                    # another identity's tokens: a 78 before anything of theirs is staged
                    check_owner(run_db.db, who, config.database)
                    _record(run_db, listing, to_read, reads, config.concurrency, cancelled, progress, who)
        except BaseException as err:
            if not opening:
                run_db = _RunDatabase.opened_for_failure(opened, config, started_at)
            if run_db is not None:
                run_db.fail(err)
            raise
    assert run_db is not None  # the block above completed, so the run was recorded
    run = run_db.run
    log.info(
        "run %d %s: %d groups read, %d failed, %d memberships, %d changes, %.1fs",
        run.run_id, run.status, run.groups_synced, run.groups_failed,
        run.memberships, run.changes, time.monotonic() - began,
    )
    return run


_T = t.TypeVar("_T")


def _unless_cancelled(work: t.Callable[[], _T], cancelled: threading.Event) -> _T:
    """``work()``, in a thread, unless the run is cancelled first.

    Listing the groups is one request whose retries and timeouts can take minutes
    when Globus stalls; a stop asked for meanwhile (SIGTERM, whose grace under
    systemd is shorter) must not wait for it. The abandoned request ends with its
    timeout in a daemon thread that nothing waits for.
    """
    done = threading.Event()
    outcome: list[t.Any] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
            outcome.append(err)
        finally:
            done.set()

    threading.Thread(target=run, name="syncer-listing", daemon=True).start()
    while not done.wait(0.1):
        if cancelled.is_set():
            raise Cancelled("stopped while listing the groups; nothing was recorded")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return t.cast(_T, outcome[0])


def _credentials(authorizer: globus_sdk.authorizers.GlobusAuthorizer, listing: MyGroups) -> Credentials | None:
    """Who the run's credentials act as: as stored with them, else (tokens of a login
    made before owners were recorded) as the listing shows."""
    who: Credentials | None = getattr(authorizer, "credentials", None)
    return with_username(who, listing) if who is not None else from_listing(listing)


def _groups_client(
    config: Config, authorizer: globus_sdk.authorizers.GlobusAuthorizer
) -> tuple[globus_sdk.GroupsClient, AdaptiveLimit]:
    limit = AdaptiveLimit(config.concurrency)
    client = globus_sdk.GroupsClient(
        authorizer=authorizer, **client_options(config, checks=[limit.retry_check])
    )
    pin_environment_proxies(client)
    return client, limit


def _list_groups(config: Config, client: globus_sdk.GroupsClient) -> tuple[MyGroups, list[GroupListing]]:
    """What ``my_groups`` lists, and those of the identity's groups to read (``groups``
    in the config, or all), in group id order.

    A group is gone only when it is no longer among the identity's groups: one left
    out of ``groups`` is not read and stays as it was, never recorded as removed. In
    id order, each batch lands after the previous one in the ``(group_id, ...)``
    indexes, which SQLite appends to far faster than it inserts.
    """
    try:
        listing = list_my_groups(client, config.my_statuses)
    except globus_sdk.GlobusAPIError as err:
        raise SyncerError(f"could not list your groups: {describe_api_error(err)}") from None
    except globus_sdk.NetworkError as err:
        raise SyncerError(f"could not list your groups: {describe_network_error(err)}") from None
    except GroupReadError as err:
        raise SyncerError(f"could not list your groups: {err}") from None
    listing.mine.sort(key=lambda group: group.id)
    # excluded groups are not read and stay as they were (like those left out of `groups`)
    excluded = set(config.exclude_groups)
    readable = [group for group in listing.mine if group.id not in excluded]
    if not config.groups:
        return listing, readable
    wanted = set(config.groups)
    to_read = [group for group in readable if group.id in wanted]
    missing = wanted - excluded - {group.id for group in to_read}
    if missing:
        log.warning("%d configured group(s) are not among your groups: %s", len(missing), ", ".join(sorted(missing)))
    return listing, to_read


def _record(
    run_db: _RunDatabase,
    listing: MyGroups,
    to_read: list[GroupListing],
    reads: GroupReader,
    in_flight: int,
    cancelled: threading.Event,
    progress: Progress | None,
    who: Credentials | None,
) -> None:
    from syncer.storage.history import Recorder

    began = time.monotonic()
    run = run_db.run
    recorder = Recorder(run_db.db, run, in_flight=in_flight)
    recorder.listed(listing, to_read=len(to_read))
    # an answer the same as the one a group's rows were made from is not parsed or diffed
    if recorder.has_digests():
        reads.skip_unchanged(recorder.recorded_digest)
    for group, outcome in reads:
        if isinstance(outcome, GroupRead):
            problem = recorder.read(outcome)  # a streamed document may turn out unusable late
            if problem is not None:
                log.warning("group %s (%s) not read: %s", group.id, group.name, problem)
        elif isinstance(outcome, NeedsLogin):
            recorder.needs_login(group, outcome.asked)
            log.warning("group %s (%s) not read: %s", group.id, group.name, outcome)
        elif isinstance(outcome, Unchanged):
            recorder.unchanged(group.id)
        else:
            recorder.failed(group.id, str(outcome))
            log.warning("group %s (%s) not read: %s", group.id, group.name, outcome)
        if progress:
            progress(run.groups_synced + run.groups_failed, len(to_read))
        # staged: the read (a large group's rows) must not live on while the next is parsed
        del outcome
    if cancelled.is_set():
        raise Cancelled("stopped before the run finished; nothing from it was recorded")
    if run.groups_failed > run.needs_login and not run.groups_synced:
        # not "partial": nothing could be recorded, and a listing whose every group
        # fails to read is no ground for run_db groups as gone either (groups Globus
        # refused for a session requirement prove the listing sound: those are partial)
        group_id, reason = next(iter(run.failed_groups.items()))
        raise SyncerError(f"none of the {run.groups_failed} groups could be read (e.g. {group_id}: {reason})")
    fetched = time.monotonic()
    if who is not None:
        record_owner(run_db.db, who, run.run_id, run.started_at)  # in the run's transaction
    recorder.finish()
    log.debug(
        "read and staged %d groups in %.2fs, finished run_db in %.2fs",
        len(to_read), fetched - began, time.monotonic() - fetched,
    )
    log.debug("%d of the groups read were unchanged since their last read: not diffed", recorder.unchanged_groups)
