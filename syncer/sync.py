"""One snapshot run: lock, open, load tokens, read Globus, record.

The order matters for the promises users rely on: the run row is committed first
(so a crash leaves a ``running`` row the next run marks ``aborted``), then reads are
staged and applied in batches inside one transaction that commits only once every
group has been read. Any failure before that commit rolls it back and leaves the
database as it was, plus the run row saying why.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import typing as t

import globus_sdk

from syncer.auth import authorizer_from_store, client_options, describe_api_error
from syncer.config import Config
from syncer.errors import EXIT_FAILED, StorageError, SyncerError
from syncer.globus_groups import (
    AdaptiveLimit,
    GroupRead,
    GroupReadError,
    list_my_groups,
    pin_environment_proxies,
    read_groups,
)
from syncer.history import Recorder, RunResult, finish_without_changes, start_run
from syncer.lock import SyncLock
from syncer.schema import open_database
from syncer.token_store import TokenStore

log = logging.getLogger(__name__)

Progress = t.Callable[[int, int], None]


class Cancelled(SyncerError):
    """The run was asked to stop (SIGTERM/SIGINT) before it finished."""


def run_sync(
    config: Config,
    cancelled: threading.Event | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Take one snapshot; raise LockBusy, LoginRequired, Cancelled or SyncerError.

    ``progress(done, total)`` is called as group reads complete.
    """
    cancelled = cancelled or threading.Event()
    began = time.monotonic()
    with SyncLock(config.lock_path):
        db = open_database(config.database, config.busy_timeout)
        try:
            run = start_run(db)
            try:
                _read_and_record(config, db, run, cancelled, progress)
            except BaseException as err:
                _record_failure(db, run, err)
                raise
        except sqlite3.Error as err:
            raise StorageError(f"{config.database}: database error: {err}") from None
        finally:
            db.close()
    log.info(
        "run %d %s: %d groups read, %d failed, %d memberships, %d changes, %.1fs",
        run.run_id, run.status, run.groups_synced, run.groups_failed,
        run.memberships, run.changes, time.monotonic() - began,
    )
    return run


def _read_and_record(
    config: Config,
    db: t.Any,
    run: RunResult,
    cancelled: threading.Event,
    progress: Progress | None,
) -> None:
    began = time.monotonic()
    # tokens are read fresh each run, so a new `syncer login` applies without restarts
    with TokenStore(config.token_storage) as store:
        authorizer = authorizer_from_store(config, store)
        limit = AdaptiveLimit(config.concurrency)
        client = globus_sdk.GroupsClient(
            authorizer=authorizer, **client_options(config, checks=[limit.retry_check])
        )
        pin_environment_proxies(client)
        try:
            listings = list_my_groups(client, config.my_statuses, config.groups)
        except globus_sdk.GlobusAPIError as err:
            raise SyncerError(f"could not list your groups: {describe_api_error(err)}") from None
        except (globus_sdk.NetworkError, GroupReadError) as err:
            raise SyncerError(f"could not list your groups: {err}") from None
        missing = set(config.groups) - {g.id for g in listings}
        if missing:
            log.warning("%d configured group(s) are not among your groups: %s", len(missing), ", ".join(sorted(missing)))
        recorder = Recorder(db, run, in_flight=config.concurrency)
        recorder.listed(listings)
        # read in group id order: each batch then lands after the previous one in the
        # (group_id, ...) indexes, which SQLite appends to far faster than it inserts
        listings.sort(key=lambda listing: listing.id)
        for listing, outcome in read_groups(client, listings, limit, cancelled):
            if isinstance(outcome, GroupRead):
                recorder.read(outcome)
            else:
                recorder.failed(listing.id, str(outcome))
                log.warning("group %s (%s) not read: %s", listing.id, listing.name, outcome)
            if progress:
                progress(run.groups_synced + run.groups_failed, len(listings))
        if cancelled.is_set():
            raise Cancelled("stopped before the run finished; nothing from it was recorded")
        fetched = time.monotonic()
        recorder.finish()
        log.debug("read and staged %d groups in %.2fs, finished recording in %.2fs", len(listings), fetched - began, time.monotonic() - fetched)


def _record_failure(db: t.Any, run: RunResult, err: BaseException) -> None:
    """Write the run's final row for a failure; what it had applied is rolled back."""
    status = "aborted" if isinstance(err, (Cancelled, KeyboardInterrupt)) else "failed"
    message = str(err) if isinstance(err, SyncerError) else f"{type(err).__name__}: {err}"
    exit_code = err.exit_code if isinstance(err, SyncerError) else EXIT_FAILED
    try:
        finish_without_changes(db, run, status, message, exit_code)
    except sqlite3.Error as db_err:
        # the run row stays 'running' and the next run marks it aborted
        log.error("could not record the failed run: %s", db_err)
