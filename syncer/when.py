"""WHEN, as commands take it: a day, a moment, a span ago, or a run.

``YYYY-MM-DD`` is 00:00 UTC that day; an ISO 8601 date-time must carry ``Z`` or an
offset (a local time would mean something else on every machine); a span (``90m``,
``12h``, ``7d``) is that long before ``now``; ``run:N`` names run N itself.
"""

from __future__ import annotations

import datetime as dt
import re

from syncer.config import parse_duration

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_RUN = re.compile(r"run:(\d+)")
_SPAN = re.compile(r"(\d+(?:\.\d+)?[smhd])+")


def parse_when(text: str, now: dt.datetime) -> dt.datetime | int:
    """A UTC datetime, or a run id (an int) for ``run:N``; raise ValueError saying what is accepted."""
    value = text.strip()
    run = _RUN.fullmatch(value)
    if run:
        run_id = int(run.group(1))
        if run_id < 1:
            raise ValueError(f"no such run: {text!r} (run ids start at 1)")
        return run_id
    if _SPAN.fullmatch(value.lower()):
        return now - dt.timedelta(seconds=parse_duration(value))
    try:
        if _DAY.fullmatch(value):
            return dt.datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=dt.UTC)
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        moment = None
    if moment is None:
        raise ValueError(f"not a WHEN: {text!r} (use YYYY-MM-DD, an ISO date-time with Z or an offset, 7d, or run:N)")
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone: add Z (UTC) or an offset such as +02:00")
    return moment.astimezone(dt.UTC)
