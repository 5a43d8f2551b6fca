"""``syncer run``: the long-running daemon, on APScheduler 3's BlockingScheduler.

A snapshot at start, then one every ``interval`` (plus up to ``jitter``). APScheduler
defaults are unsafe for this job, so they are set explicitly: ``misfire_grace_time``
is the interval (the 1 s default silently drops a run that starts late), ``coalesce``
folds missed runs into one, ``max_instances=1`` never overlaps runs. Job exceptions
are caught here (APScheduler would only log them) and turned into the daemon's
decision: keep going, or stop with 77 when Globus wants a new login.

SIGTERM/SIGINT stop scheduling and cancel the run in flight: it stops reading, rolls
back and is recorded as ``aborted``; the process exits 0 within a bound.

A healthy daemon logs its runs' summary lines and nothing else (they are what
``journalctl -u syncer`` is read for): its own start and stop are debug lines, and
APScheduler's warnings about what this job is set up to do (a tick skipped while the
previous snapshot, with its hooks, still runs; a late start folded into one) are
turned into debug lines of syncer's (``SchedulerNoise``), kept out of
``journalctl -p warning``. Any other APScheduler message passes as it is.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import signal
import threading
import time
import types

from apscheduler.events import EVENT_SCHEDULER_STARTED, JobExecutionEvent
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger

from syncer.config import Config
from syncer.errors import EXIT_OK, ConfigError, LockBusy, LoginRequired, SyncerError
from syncer.logs import module_logger
from syncer.operations import notify
from syncer.operations.run_effects import sync_with_effects
from syncer.operations.sync import Cancelled

log = module_logger(__name__)

#: the loggers of APScheduler's scheduler and of the executor the daemon uses
_APSCHEDULER_LOGGERS = ("apscheduler.scheduler", "apscheduler.executors.default")


class SchedulerNoise(logging.Filter):
    """APScheduler's warnings about what ``max_instances=1`` and ``coalesce`` are there
    to do, as debug lines of ``syncer.operations.scheduler`` (shown with ``-v``); others pass."""

    #: a fragment of APScheduler's message, and what it means for this daemon
    MEANINGS = (
        ("maximum number of running instances reached",
         "a snapshot came due while the previous one (or its hooks) was still running: skipped"),
        ("was missed by", "a snapshot started late (the previous one ran long): the missed ones are folded into it"),
    )

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        for fragment, meaning in self.MEANINGS:
            if fragment in text:
                record.name, record.msg, record.args = log.name, meaning, ()
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return log.isEnabledFor(logging.DEBUG)
        return True


def quiet_scheduler_noise() -> None:
    """Install ``SchedulerNoise`` on APScheduler's loggers (once)."""
    for name in _APSCHEDULER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, SchedulerNoise) for f in logger.filters):
            logger.addFilter(SchedulerNoise())

# How long a stop waits for the run in flight to wind down before exiting anyway
# (an unfinished transaction is rolled back by SQLite; the run is marked aborted later).
STOP_GRACE_S = 8.0


@dataclasses.dataclass
class DaemonState:
    exit_code: int = EXIT_OK
    runs: int = 0
    consecutive_failures: int = 0
    run_started: float | None = None


class Daemon:
    """Owns the scheduler, the stop signal and the exit code of ``syncer run``."""

    def __init__(self, config: Config, interval: float) -> None:
        self.config = config
        self.interval = interval
        self.state = DaemonState()
        self.stopping = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self.scheduler = BlockingScheduler(timezone=dt.UTC)
        quiet_scheduler_noise()

    def run(self) -> int:
        """Schedule, block until stopped, return the exit code."""
        signals_read, self._signals = os.pipe()
        threading.Thread(target=self._stop_on_signal, args=(signals_read,), name="signals", daemon=True).start()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.scheduler.add_job(
                self._snapshot,
                IntervalTrigger(seconds=self.interval, jitter=self.config.jitter or None, timezone=dt.UTC),
                id="snapshot",
                next_run_time=dt.datetime.now(dt.UTC),
                coalesce=True,
                max_instances=1,
                misfire_grace_time=max(1, int(self.interval)),
            )
            ping = notify.watchdog_interval()
            if ping:
                # run by the scheduler itself: pings stop if the scheduler stops working
                self.scheduler.add_job(
                    self._watchdog, IntervalTrigger(seconds=ping, timezone=dt.UTC),
                    id="watchdog", coalesce=True, max_instances=1, misfire_grace_time=max(1, int(ping)),
                )
            self.scheduler.add_listener(self._on_started, EVENT_SCHEDULER_STARTED)
            log.debug("scheduler starting: a snapshot every %ss", _seconds(self.interval))
            self.scheduler.start()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self._signals)  # the signals thread reads the end of the pipe and ends
        # a stop for a reason (login required) keeps that STATUS= line in `systemctl status`
        notify.notify(stopping="1", **({"status": "stopping"} if self.state.exit_code == EXIT_OK else {}))
        if not self.idle.wait(STOP_GRACE_S):
            log.warning("the run in flight did not stop within %.0fs; it will be marked aborted", STOP_GRACE_S)
        log.debug("scheduler stopped after %d run(s)", self.state.runs)
        return self.state.exit_code

    def stop(self, exit_code: int = EXIT_OK) -> None:
        if exit_code != EXIT_OK:
            self.state.exit_code = exit_code
        self.stopping.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        # Python runs the handler in the main thread, between any two of its bytecodes:
        # inside the scheduler's loop it may hold the very locks stop() takes (the
        # wake-up event's, the executor's), and would wait on itself for ever. So the
        # handler only writes the signal's number to a pipe; a thread of its own stops.
        os.write(self._signals, bytes([signum]))

    def _stop_on_signal(self, signals: int) -> None:
        with os.fdopen(signals, "rb", buffering=0) as pipe:
            while received := pipe.read(1):
                log.debug("received %s: stopping", signal.Signals(received[0]).name)
                self.stop()

    def _on_started(self, event: JobExecutionEvent) -> None:
        notify.notify(ready="1", status="scheduling; first snapshot starting")

    def _watchdog(self) -> None:
        # a run stuck far beyond any bound means the daemon is not healthy
        started = self.state.run_started
        if started is None or time.monotonic() - started < max(3 * self.interval, 3600):
            notify.notify(watchdog="1")

    def _snapshot(self) -> None:
        if self.stopping.is_set():
            return
        self.idle.clear()
        self.state.run_started = time.monotonic()
        try:
            run = sync_with_effects(self.config, cancelled=self.stopping)
        except LockBusy:
            log.info("skipped this snapshot: another sync holds the lock")
        except Cancelled:
            log.info("run cancelled by stop request; nothing from it was recorded")
        except LoginRequired as err:
            log.error("%s", err)
            notify.notify(status=f"login required: {err}")
            self.stop(err.exit_code)
        except ConfigError as err:  # a rejected client secret: retrying cannot help
            log.error("%s", err)
            notify.notify(status=f"configuration error: {err}")
            self.stop(err.exit_code)
        except SyncerError as err:
            self._failed(str(err))
        except Exception as err:  # the daemon must outlive any one run
            log.exception("snapshot failed unexpectedly")
            self._failed(f"{type(err).__name__}: {err}")
        else:
            self.state.runs += 1
            self.state.consecutive_failures = 0
            notify.notify(
                status=f"last run #{run.run_id} {run.status} at {run.started_at}: {run.groups_synced} groups,"
                f" {run.memberships} memberships, {run.changes} changes"
            )
        finally:
            self.state.run_started = None
            self.idle.set()

    def _failed(self, message: str) -> None:
        self.state.runs += 1
        self.state.consecutive_failures += 1
        count = self.state.consecutive_failures
        log.error("snapshot failed (%d in a row): %s", count, message)
        notify.notify(status=f"last run failed ({count} in a row): {message}")


def _seconds(value: float) -> str:
    return f"{value:g}"


def run_daemon(config: Config, interval: float | None = None) -> int:
    return Daemon(config, interval or config.interval).run()
