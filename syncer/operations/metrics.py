"""Prometheus metrics: ``syncer status --format prometheus`` and the ``metrics_file``.

The figures are those of ``syncer status``, exposed through prometheus-client's own
exposition code (a collector yielding gauges into a private registry, rendered by
``generate_latest``), so the text format is the library's, not hand-written. The
metrics file is rewritten after every run that took the lock (not one that found it
busy), failed runs included, for node_exporter's textfile collector: written to a
temporary file in the same folder and renamed over the old one, so a reader never sees
half of it. Its ``syncer_last_run_exit_code`` is the run's own exit code, known to the
process that ran it, so it is right even when the database cannot be read (then
``syncer_database_readable`` is 0 and the database's figures are left out).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import typing as t
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from syncer.config import Config
from syncer.errors import EXIT_FAILED
from syncer.logs import module_logger
from syncer.storage.schema import parse_time

if t.TYPE_CHECKING:
    from syncer.operations.status import Recorded, StatusReport

log = module_logger(__name__)


class RunOutcome(t.NamedTuple):
    """How the run that writes the metrics file ended, as its own process knows it."""

    exit_code: int
    finished_at: float  # Unix time


class StatusCollector(Collector):
    """Gauges from one ``syncer status`` report (None: the database could not be read),
    and from the outcome of the run that just ended, if any (it then says the run's
    exit code)."""

    def __init__(self, report: StatusReport | None, outcome: RunOutcome | None = None) -> None:
        self.report = report
        self.outcome = outcome

    def collect(self) -> t.Iterator[GaugeMetricFamily]:
        report = self.report
        yield GaugeMetricFamily(
            "syncer_status_exit_code",
            "Exit code of `syncer status`: 0 ok, 3 partial or hooks behind, 77 login required, 1 otherwise",
            value=report.health.exit_code if report else EXIT_FAILED,
        )
        yield GaugeMetricFamily(
            "syncer_database_readable", "1 if the database could be read for these figures, 0 if not",
            value=1 if report else 0,
        )
        if self.outcome is not None:
            yield GaugeMetricFamily(
                "syncer_last_run_exit_code",
                "Exit code of the latest finished run (0 ok, 3 partial, 1 failed, 77 login required, 78 configuration)",
                value=self.outcome.exit_code,
            )
            yield GaugeMetricFamily(
                "syncer_last_run_end_timestamp_seconds", "When the latest finished run ended (Unix time)",
                value=self.outcome.finished_at,
            )
        database = report.database if report else None
        if database is not None and database.size_bytes is not None:
            yield GaugeMetricFamily("syncer_database_size_bytes", "Size of the database file", value=database.size_bytes)
        recorded = database.recorded if database else None
        if recorded is not None:
            counts = recorded.counts
            yield GaugeMetricFamily("syncer_groups", "Groups currently among the identity's groups", value=counts.groups)
            yield GaugeMetricFamily("syncer_memberships", "Memberships in the current state", value=counts.memberships)
            yield from _last_run(recorded, with_exit_code=self.outcome is None)
        hooks = GaugeMetricFamily(
            "syncer_hook_backlog_runs", "Runs with changes for the hook that it has not received yet", labels=["hook"]
        )
        for hook in report.hooks if report else ():
            hooks.add_metric([hook.hook], hook.runs)
        yield hooks


def _last_run(recorded: Recorded, with_exit_code: bool) -> t.Iterator[GaugeMetricFamily]:
    """Gauges of the latest finished run, and of the latest successful one; its exit
    code too if ``with_exit_code`` (unless the run's own process gives it)."""
    if recorded.last_success_at:
        yield GaugeMetricFamily(
            "syncer_last_success_timestamp_seconds",
            "Start of the latest ok or partial run (Unix time)",
            value=parse_time(recorded.last_success_at).timestamp(),
        )
    finished = [run for run in recorded.recent_runs if run.status != "running"]
    if not finished:
        return
    run = finished[0]
    started = parse_time(run.started_at).timestamp()
    yield GaugeMetricFamily("syncer_last_run_timestamp_seconds", "Start of the latest finished run (Unix time)", value=started)
    if run.finished_at:
        duration = parse_time(run.finished_at).timestamp() - started
        yield GaugeMetricFamily("syncer_last_run_duration_seconds", "How long the latest finished run took", value=duration)
    if with_exit_code and run.exit_code is not None:
        yield GaugeMetricFamily(
            "syncer_last_run_exit_code", "Exit code of the latest finished run (0 ok, 3 partial, 1 failed, 77 login required)",
            value=run.exit_code,
        )
    yield GaugeMetricFamily("syncer_last_run_changes", "Membership events the latest finished run recorded", value=run.changes)
    yield GaugeMetricFamily(
        "syncer_last_run_groups_failed", "Groups the latest finished run could not read", value=run.groups_failed
    )


def render_metrics(report: StatusReport | None, outcome: RunOutcome | None = None) -> str:
    """The Prometheus text format of a ``syncer status`` report (None: the database
    could not be read), and of a run's outcome."""
    registry = CollectorRegistry()
    registry.register(StatusCollector(report, outcome))
    return generate_latest(registry).decode()


def write_metrics_file(config: Config, outcome: RunOutcome) -> None:
    """Rewrite ``metrics_file`` atomically from the database's state and the run's
    outcome; a database that cannot be read leaves its figures out, and a failure to
    write is a warning."""
    if config.metrics_file is None:
        return
    from syncer.operations.status import status_report

    try:
        report: StatusReport | None
        try:
            report = status_report(config)
        except Exception as err:  # noqa: BLE001 - the run's exit code is written all the same
            log.warning("the metrics file %s lacks the database's figures: %s", config.metrics_file, err)
            report = None
        text = render_metrics(report, outcome)
        _write_atomically(config.metrics_file, text.encode(), config.metrics_file_mode)
    except Exception as err:  # noqa: BLE001 - metrics never change a run's outcome
        log.warning("could not write the metrics file %s: %s", config.metrics_file, err)


def _write_atomically(path: Path, content: bytes, mode: int) -> None:
    """Write a temporary file beside ``path`` (not ending in .prom: the textfile collector
    skips it), give it ``mode``, and rename it over ``path``."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
