"""WHEN: the moments query commands take (``--at``, ``--since``, ``--until``).

A WHEN is a date (``2026-06-01``: 00:00 UTC that day), an ISO 8601 date-time with
``Z`` or an offset (``2026-06-01T09:30:00+02:00``), a span ago (``90m``, ``12h``,
``7d``) or a run (``run:42``). Moments become the database's fixed-width UTC text,
so they compare with ``sync_runs.started_at`` as text; a run stays a run id, because
"as of run 42" must mean that run whatever the clocks did.
"""

from __future__ import annotations

import datetime as dt
import re
import typing as t

from syncer.config import parse_duration
from syncer.errors import EXIT_USAGE, SyncerError
from syncer.storage.schema import format_time

EXAMPLES = "2026-06-01, 2026-06-01T09:30:00Z, 2026-06-01T09:30+02:00, 90m, 12h, 7d, run:42"

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_SPAN = re.compile(r"(\d+(\.\d+)?[smhd])+")
_RUN = re.compile(r"run:(\d+)")
# run ids are SQLite integers: a larger one cannot exist (and cannot even be asked for)
MAX_RUN_ID = 2**63 - 1


class BadWhen(SyncerError):
    """A WHEN that is not one of the accepted forms; the message shows examples."""

    exit_code = EXIT_USAGE

    def __init__(self, text: str, reason: str = "not a date, date-time, span or run") -> None:
        super().__init__(f"bad WHEN {text!r}: {reason} (examples: {EXAMPLES})")


class When(t.NamedTuple):
    """A parsed WHEN: exactly one of ``moment`` (database time text) or ``run_id`` is set."""

    text: str
    moment: str | None = None
    run_id: int | None = None


def parse_when(text: str, now: dt.datetime | None = None) -> When:
    """Parse a WHEN; raise BadWhen (exit 2) for anything else.

    A date-time must say its offset (``Z`` or ``+02:00``): a bare local time would
    mean different moments on the server and on a laptop.
    """
    raw = text.strip()
    if match := _RUN.fullmatch(raw):
        run_id = int(match.group(1))
        if not 1 <= run_id <= MAX_RUN_ID:
            raise BadWhen(text, f"out of range: run ids go from 1 to {MAX_RUN_ID}")
        return When(text, run_id=run_id)
    try:
        return When(text, moment=format_time(_moment(text, raw, now)))
    except (OverflowError, ValueError) as err:  # a time before year 1 or after 9999 in UTC
        raise BadWhen(text, f"out of range ({err})") from None


def _moment(text: str, raw: str, now: dt.datetime | None) -> dt.datetime:
    if _SPAN.fullmatch(raw.lower()):
        try:
            seconds = parse_duration(raw)
        except ValueError as err:
            raise BadWhen(text, str(err)) from None
        return (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=seconds)
    if _DATE.fullmatch(raw):
        try:
            day = dt.date.fromisoformat(raw)
        except ValueError as err:
            raise BadWhen(text, str(err)) from None
        return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    try:
        moment = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise BadWhen(text) from None
    if moment.tzinfo is None:
        raise BadWhen(text, "a date-time needs Z or an offset such as +02:00")
    return moment.astimezone(dt.UTC)
