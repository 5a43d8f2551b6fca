"""One run with its effects around it: healthcheck pings, hooks and the metrics file.

Used by ``syncer sync`` and by each snapshot of ``syncer run``. Order: the start ping
once the run holds the lock; the run, committed; the end ping; the hooks (only after
a run that committed, ``ok`` or ``partial``); the metrics file last, so that it shows
the hooks' backlog after their delivery. None of these can change the run's outcome:
each failure is logged, and the run's result or exception is what the caller gets.
A run that finds another sync holding the lock (75) did nothing and does none of this.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import typing as t

from syncer.config import Config
from syncer.errors import EXIT_FAILED, LockBusy, SyncerError
from syncer.logs import module_logger
from syncer.operations.healthcheck import Healthcheck
from syncer.operations.sync import Progress, run_sync

if t.TYPE_CHECKING:
    from syncer.storage.history import SyncRun

log = module_logger(__name__)


def sync_with_effects(
    config: Config, cancelled: threading.Event | None = None, progress: Progress | None = None
) -> SyncRun:
    """``run_sync``, with pings, hooks and metrics around it; raises what ``run_sync`` raises."""
    pings = Healthcheck(config.healthcheck_url)
    try:
        run = run_sync(config, cancelled=cancelled, progress=progress, started=pings.started)
    except LockBusy:
        raise
    except Exception as err:
        exit_code = err.exit_code if isinstance(err, SyncerError) else EXIT_FAILED
        pings.finished(exit_code)
        _write_metrics(config, exit_code)
        raise
    pings.finished(run.exit_code or 0)
    if config.hooks:
        from syncer.operations.hooks import deliver_after_run

        try:
            deliver_after_run(config, run.run_id, cancelled)
        except (SyncerError, sqlite3.Error) as err:
            log.warning("hooks not delivered: %s; they are retried after the next run", err)
        except Exception:  # hooks never change a run's outcome; a failure here is a bug, logged in full
            log.exception("hooks could not be delivered; they are retried after the next run")
    _write_metrics(config, run.exit_code or 0)
    return run


def _write_metrics(config: Config, exit_code: int) -> None:
    """The metrics file, with this run's exit code (whatever the database says or not)."""
    # imported only when configured: prometheus-client is not needed otherwise
    if config.metrics_file is not None:
        from syncer.operations.metrics import RunOutcome, write_metrics_file

        write_metrics_file(config, RunOutcome(exit_code, time.time()))
