"""``syncer report``: one self-contained HTML file for auditors, PIs and facility managers.

"How did access to this group change over the year?" answered with pictures a person
can read offline: active members over time, events per week by kind, the biggest
movers, runs and their failures, the period's events and the groups as of the
period's end, under a header naming whose data it is, which database, which period
and when it was made.

The numbers come from the query layer (``syncer.storage.queries``), the functions behind
``syncer members/changes/groups``, so the report says what those commands say for
the same period; only what no query command answers (the runs, the groups'
policies) is read here, from the documented views. Charts are drawn by pygal (the
optional ``report`` extra) as static SVG inlined into the page, its JavaScript off;
every mark carries an SVG ``<title>`` with its number, and a table beside each chart
holds the same numbers as text. The page loads nothing: no script, and a
Content-Security-Policy that forbids fetching anything at all.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import html
import json
import os
import re
import tempfile
import typing as t
import xml.etree.ElementTree as ET
from pathlib import Path

import sqlite_utils

from syncer import __version__
from syncer.errors import EXIT_FAILED, EXIT_USAGE, SyncerError
from syncer.storage import queries
from syncer.storage.ownership import DatabaseOwner, database_owner, describe_owner
from syncer.storage.schema import format_time
from syncer.storage.when import When, parse_when

if t.TYPE_CHECKING:
    import pygal

INSTALL_HINT = "pip install 'globus-group-syncer[report]'"
DEFAULT_SINCE = "90d"
TOP_GROUPS = 5  # the largest groups drawn when no --group is given
TOP_MOVERS = 10
# A group's active-member count is drawn at every run that changed it; past this many
# runs, at the last such run of each day (a 15-minute timer makes 96 runs a day).
MAX_POINTS = 200
# Beyond this many events the table shows the first ones and says how to get them all:
# the file stays a few MiB (about 250 bytes an event).
MAX_EVENT_ROWS = 10_000
RUNS_BY_DAY_UP_TO_DAYS = 120  # longer periods count runs per week
EVENT_KINDS = ("joined", "left", "changed", "unknown")
RUN_STATUSES = ("ok", "partial", "failed", "aborted", "running")
# group_history columns shown as the groups' policies, where this database has them
POLICY_COLUMNS = (
    "group_type", "group_visibility", "group_members_visibility", "is_high_assurance",
    "authentication_assurance_timeout", "enforce_session", "session_limit",
)
KIND_COLORS = {"joined": "#2e7d32", "left": "#c62828", "changed": "#1565c0", "unknown": "#757575"}
STATUS_COLORS = {"ok": "#2e7d32", "partial": "#ef6c00", "failed": "#c62828", "aborted": "#6d4c41", "running": "#757575"}
SERIES_COLORS = ("#1565c0", "#c62828", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f", "#5d4037", "#ad1457")


class ReportExtraMissing(SyncerError):
    """The optional ``report`` extra (pygal) is not installed (exit 1)."""

    exit_code = EXIT_FAILED


class ReportUsageError(SyncerError):
    """A report asked for wrongly: ``--until`` before ``--since``, no ``--output``, or one
    that cannot be written (exit 2, as a usage error)."""

    exit_code = EXIT_USAGE


# ------------------------------------------------------------------ the data


class Period(t.NamedTuple):
    """The period asked for, as moments, and the runs it covers."""

    since_text: str
    until_text: str  # "now" without --until
    since: str  # database time text
    until: str
    runs: tuple[int, int] | None  # first and last run id in the period (None: no run in it)
    end: queries.Run  # the run whose recorded state answers "as of the period's end"


class Point(t.NamedTuple):
    run_id: int
    at: str
    active: int


class MemberSeries(t.NamedTuple):
    """One group's active-member count at the runs that changed it."""

    group_id: str
    name: str | None
    points: list[Point]
    daily: bool  # True when thinned to the last changing run of each day


class KindCounts(t.NamedTuple):
    """Events of each kind in one bucket (a week, a person, a group)."""

    label: str
    key: str
    joined: int
    left: int
    changed: int
    unknown: int

    @property
    def total(self) -> int:
        return self.joined + self.left + self.changed + self.unknown


class RunCounts(t.NamedTuple):
    """Runs of each status that started in one day (or week)."""

    start: str  # YYYY-MM-DD
    ok: int
    partial: int
    failed: int
    aborted: int
    running: int


class FailureReason(t.NamedTuple):
    """Runs that did not end ok for one reason: a failed or aborted run's error, or one
    group's read failure in a partial run (``sync_runs.failed_groups``)."""

    status: str
    reason: str
    runs: int
    first_run: int
    first_at: str
    last_run: int
    last_at: str


class GroupAtEnd(t.NamedTuple):
    """A group as of the period's end: what ``syncer groups`` says, and its policies."""

    row: queries.MyGroupRow
    policies: dict[str, t.Any]


@dataclasses.dataclass
class ReportData:
    database: Path
    owner: DatabaseOwner | None
    generated_at: str
    period: Period
    group: queries.Group | None
    series: list[MemberSeries]
    weeks: list[KindCounts]
    people: list[KindCounts]  # biggest movers: identities with the most events
    movers: list[KindCounts]  # groups with the most events
    run_unit: str  # "day" or "week"
    runs: list[RunCounts]
    failures: list[FailureReason]
    events: list[queries.ChangeRow]  # at most MAX_EVENT_ROWS
    events_total: int
    groups: list[GroupAtEnd]
    policy_columns: tuple[str, ...]


def _rows(db: sqlite_utils.Database, sql: str, params: t.Sequence[t.Any] | dict[str, t.Any] = ()) -> list[tuple]:
    return db.execute(sql, params).fetchall()


def _moment(db: sqlite_utils.Database, when: When) -> str:
    """A WHEN as database time text: a ``run:N`` is when that run started (checked to
    exist by ``queries.check_period`` first)."""
    if when.moment is not None:
        return when.moment
    return str(_rows(db, "SELECT started_at FROM sync_runs WHERE id = ?", [when.run_id])[0][0])


def period_of(db: sqlite_utils.Database, since: When | None, until: When | None, now: dt.datetime) -> Period:
    """The period (default: the last 90 days up to now) and its runs; exit 2 for a period
    the query commands refuse (``queries.check_period``), exit 1 when no successful run
    answers its end."""
    since = since or parse_when(DEFAULT_SINCE, now=now)
    queries.check_period(db, since, until)
    start = _moment(db, since)
    stop = _moment(db, until) if until is not None else format_time(now)
    runs = queries.run_span(db, since, until)
    # as `syncer changes` does: the period's end is its last run (or WHEN itself when it
    # has none), and no committed run by then means there is nothing to report on
    end = queries.as_of(db, When(until.text, run_id=runs[1]) if until is not None and runs else until)
    return Period(since.text, until.text if until else "now", start, stop, runs, end)


def gather(
    db: sqlite_utils.Database, database: Path, since: When | None, until: When | None, group: str | None,
    now: dt.datetime | None = None,
) -> ReportData:
    """Everything the report shows, from the query layer and the documented views."""
    now = now or dt.datetime.now(dt.UTC)
    period = period_of(db, since, until, now)
    found = queries.resolve_group(db, group) if group is not None else None
    events = queries.changes(db, period.runs, group_id=found and found.id) if period.runs else []
    at_end = _groups_at_end(db, period, until is None)
    names = {g.row.id: g.row.name for g in at_end}  # every group's, for the failures of partial runs
    if found is not None:
        at_end = [g for g in at_end if g.row.id == found.id]
        drawn = [(found.id, found.name)]
    else:
        largest = sorted((g.row for g in at_end if g.row.active_members is not None),
                         key=lambda r: (-(r.active_members or 0), r.name or "", r.id))[:TOP_GROUPS]
        drawn = [(r.id, r.name) for r in largest]
    return ReportData(
        database=database,
        owner=database_owner(db),
        generated_at=format_time(now),
        period=period,
        group=found,
        series=[_series(db, period, gid, name) for gid, name in drawn],
        weeks=_weeks(events, period),
        people=_top(events, lambda e: e.identity_id, lambda e: e.username or e.identity_id),
        movers=_top(events, lambda e: e.group_id, lambda e: names.get(e.group_id) or e.group_name or e.group_id),
        run_unit="day" if _days(period) <= RUNS_BY_DAY_UP_TO_DAYS else "week",
        runs=_runs(db, period),
        failures=_failures(db, period, names),
        events=events[:MAX_EVENT_ROWS],
        events_total=len(events),
        groups=at_end,
        policy_columns=_policy_columns(db),
    )


def kind(row: queries.ChangeRow) -> str:
    """An event's kind: its reason; versions from before reasons were kept are 'unknown'."""
    return row.reason if row.reason in ("joined", "left", "changed") else "unknown"


def _count(label: str, key: str, kinds: collections.Counter[str]) -> KindCounts:
    return KindCounts(label, key, kinds["joined"], kinds["left"], kinds["changed"], kinds["unknown"])


def _week_start(stamp: str) -> dt.date:
    day = dt.date.fromisoformat(stamp[:10])
    return day - dt.timedelta(days=day.weekday())


def _weeks(events: list[queries.ChangeRow], period: Period) -> list[KindCounts]:
    """Events per week (Monday to Sunday, UTC) by kind, every week of the period listed."""
    counts: dict[dt.date, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for event in events:
        counts[_week_start(event.at)][kind(event)] += 1
    week, last = _week_start(period.since), _week_start(period.until)
    out = []
    while week <= last:
        out.append(_count(week.isoformat(), week.isoformat(), counts[week]))
        week += dt.timedelta(days=7)
    return out


def _top(
    events: list[queries.ChangeRow], key: t.Callable[[queries.ChangeRow], str], label: t.Callable[[queries.ChangeRow], str],
) -> list[KindCounts]:
    """The TOP_MOVERS keys with the most events, most first, with their counts by kind."""
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    labels: dict[str, str] = {}
    for event in events:
        counts[key(event)][kind(event)] += 1
        labels[key(event)] = label(event)
    ranked = sorted(counts, key=lambda k: (-sum(counts[k].values()), labels[k], k))[:TOP_MOVERS]
    return [_count(labels[k], k, counts[k]) for k in ranked]


def _series(db: sqlite_utils.Database, period: Period, group_id: str, name: str | None) -> MemberSeries:
    """The group's active members (``syncer members GROUP --at run:N``, counted) as of the
    period's start and at every run in it that recorded a change of the group."""
    start: queries.Run | None
    try:
        start = queries.as_of(db, When(period.since_text, moment=period.since))
    except queries.NotFound:  # the history begins inside the period
        start = None
    runs = {start.id} if start is not None else set()
    if period.runs:
        changed = queries.changes(db, period.runs, group_id=group_id, observations=True)
        runs.update(row.run_id for row in changed if row.run_id <= period.end.id)
    runs.add(period.end.id)
    when = dict(_rows(db, f"SELECT id, started_at FROM sync_runs WHERE id IN ({', '.join('?' * len(runs))})",
                      sorted(runs)))
    chosen = sorted(runs)
    daily = len(chosen) > MAX_POINTS
    if daily:  # the last changing run of each day, and the first and last runs
        by_day = {when[r][:10]: r for r in chosen}
        chosen = sorted({chosen[0], chosen[-1], *by_day.values()})
    points = []
    for run_id in chosen:
        version = queries.group_version(db, group_id, run_id)
        if version is None or not version.members_visible:
            continue  # not among the identity's groups then, or its members not visible: no count
        points.append(Point(run_id, when[run_id], len(queries.members(db, group_id, run_id))))
    return MemberSeries(group_id, name, points, daily)


def _days(period: Period) -> int:
    return (dt.date.fromisoformat(period.until[:10]) - dt.date.fromisoformat(period.since[:10])).days + 1


def _runs(db: sqlite_utils.Database, period: Period) -> list[RunCounts]:
    """Runs started in the period by status, per day (per week for long periods), every
    day or week listed."""
    if period.runs is None:
        found: list[tuple[str, str]] = []
    else:
        found = _rows(db, "SELECT started_at, status FROM sync_runs WHERE id BETWEEN ? AND ?", list(period.runs))
    weekly = _days(period) > RUNS_BY_DAY_UP_TO_DAYS
    step = dt.timedelta(days=7 if weekly else 1)

    def bucket(stamp: str) -> dt.date:
        return _week_start(stamp) if weekly else dt.date.fromisoformat(stamp[:10])

    counts: dict[dt.date, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for started_at, status in found:
        counts[bucket(started_at)][status] += 1
    day, last = bucket(period.since), bucket(period.until)
    out = []
    while day <= last:
        c = counts[day]
        out.append(RunCounts(day.isoformat(), *(c[s] for s in RUN_STATUSES)))
        day += step
    return out


def _failures(db: sqlite_utils.Database, period: Period, names: dict[str, str | None]) -> list[FailureReason]:
    """The period's runs that did not end ok, by status and reason, latest first; a
    partial run counts under each of its failed groups' reasons."""
    if period.runs is None:
        return []
    sql = """
        SELECT id, started_at, status, error, failed_groups FROM sync_runs
        WHERE id BETWEEN ? AND ? AND status IN ('partial', 'failed', 'aborted') ORDER BY id"""
    seen: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for run_id, started_at, status, error, failed_groups in _rows(db, sql, list(period.runs)):
        reasons = [error] if error else []
        # a failed run's error sums its groups up ("none of the 6 groups could be read ...")
        for gid, why in sorted(json.loads(failed_groups or "{}").items()) if status == "partial" else ():
            reasons.append(f"group {names.get(gid) or gid} ({gid}): {why}")
        for reason in reasons or ["(no reason recorded)"]:
            seen.setdefault((status, reason), []).append((run_id, started_at))
    found = [FailureReason(status, reason, len(runs), *runs[0], *runs[-1]) for (status, reason), runs in seen.items()]
    return sorted(found, key=lambda f: -f.last_run)


def _policy_columns(db: sqlite_utils.Database) -> tuple[str, ...]:
    present = {row[1] for row in _rows(db, "PRAGMA table_info(group_history)")}
    return tuple(c for c in POLICY_COLUMNS if c in present)


def _groups_at_end(db: sqlite_utils.Database, period: Period, latest: bool) -> list[GroupAtEnd]:
    """The groups as ``syncer groups`` lists them (now, or ``--at`` the period's end),
    with their policies as of the period's end run."""
    rows = queries.current_groups(db) if latest else queries.groups_as_of(db, period.end.id)
    columns = _policy_columns(db)
    policies: dict[str, dict[str, t.Any]] = {}
    if columns:
        sql = (f"SELECT group_id, {', '.join(columns)} FROM group_history"
               " WHERE from_run <= :run AND (to_run IS NULL OR to_run > :run)")
        for found in _rows(db, sql, {"run": period.end.id}):
            policies[found[0]] = dict(zip(columns, found[1:], strict=True))
    return [GroupAtEnd(row, policies.get(row.id, {})) for row in rows]


# ------------------------------------------------------------------ the page


def _load_pygal() -> t.Any:
    try:
        import pygal
    except ImportError:
        raise ReportExtraMissing(f"the report's charts need pygal, which is not installed; install it with: {INSTALL_HINT}"
                                 ) from None
    return pygal


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _clean(value: t.Any) -> str:
    """A value as text fit for HTML and SVG: control characters shown escaped (never sent
    raw: XML cannot hold most of them, and a name may contain anything)."""
    text = "" if value is None else str(value)
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _e(value: t.Any) -> str:
    """A value as HTML text (a report holds a hundred thousand cells: numbers skip the work)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return html.escape(_clean(value))


def _style(pygal: t.Any, colors: t.Sequence[str]) -> t.Any:
    from pygal.style import Style

    return Style(
        colors=tuple(colors), background="transparent", plot_background="#ffffff",
        font_family='system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", "Liberation Sans", sans-serif',
        # large enough to read on a phone, where a 720-unit-wide chart is drawn about 370 px wide
        label_font_size=15, major_label_font_size=15, legend_font_size=16, value_font_size=14,
        title_font_size=18, tooltip_font_size=15,
    )


def _config(
    pygal: t.Any, colors: t.Sequence[str], top: int | None = None, low: int = 0, **extra: t.Any,
) -> dict[str, t.Any]:
    """pygal settings shared by every chart; ``top`` and ``low``: the largest and smallest
    counts drawn, for whole-number ticks."""
    # js=[]: no external script (_titled drops the inline one). Titles per mark come from _titled.
    settings = dict(js=[], style=_style(pygal, colors), width=720, height=400, legend_at_bottom=True,
                    legend_at_bottom_columns=4, truncate_legend=34, truncate_label=-1, show_x_guides=False,
                    margin=16, margin_bottom=24, margin_right=64,  # margin_right: room for the last rotated x label
                    no_data_text="nothing in this period", print_values=False)
    if top is not None:
        ticks = _ticks(top, low)
        settings.update(y_labels=ticks, range=(ticks[0], ticks[-1]))
    settings.update(extra)
    return settings


def _ticks(top: int, low: int = 0) -> list[int]:
    """Whole-number axis ticks from ``low`` (rounded down) past ``top``, at most about ten:
    counts have no fractions."""
    step = next(m * 10**e for e in range(15) for m in (1, 2, 5) if (top - low) / (m * 10**e) <= 10)
    start = low - low % step
    return list(range(start, top + step, step)) if top > start else [start, start + 1]


def _titled(chart: pygal.graph.graph.Graph, series: t.Sequence[str], describe: t.Callable[[str, str, str], str]) -> str:
    """The chart as SVG with an SVG ``<title>`` on every mark: ``describe(series, x, value)``
    (browsers show it on hover; screen readers read it), and without pygal's script."""
    root = chart.render_tree()
    # pygal writes its config into a <script> even with js=[]: nothing here runs script
    for defs in root.iter("defs"):
        for script in defs.findall("script"):
            defs.remove(script)
    for group in root.iter("g"):
        found = re.match(r"series serie-(\d+)\b", group.get("class", ""))
        if not found or int(found.group(1)) >= len(series):
            continue
        name = series[int(found.group(1))]
        for mark in group.iter("g"):
            descs = {d.get("class", "").split()[0]: d.text or "" for d in mark.findall("desc")}
            if "value" not in descs:
                continue
            title = ET.Element("title")
            title.text = describe(name, descs.get("x_label", ""), descs["value"])
            mark.insert(0, title)
    return ET.tostring(root, encoding="unicode")


def _chart(svg: str, label: str) -> str:
    return f'<figure class="chart" role="group" aria-label="{_e(label)}">{svg}</figure>'


def _table(table_id: str, caption: str, head: t.Sequence[str], rows: t.Iterable[t.Sequence[t.Any]],
           numeric: t.Collection[int] = ()) -> str:
    cells = []
    for row in rows:
        tds = "".join(f'<td class="num">{_e(v)}</td>' if i in numeric else f"<td>{_e(v)}</td>" for i, v in enumerate(row))
        cells.append(f"<tr>{tds}</tr>")
    ths = "".join(f'<th scope="col" class="num">{_e(h)}</th>' if i in numeric else f'<th scope="col">{_e(h)}</th>'
                  for i, h in enumerate(head))
    return (f'<div class="scroll"><table id="{table_id}"><caption>{_e(caption)}</caption>'
            f"<thead><tr>{ths}</tr></thead><tbody>{''.join(cells)}</tbody></table></div>")


def _numbers(table_html: str, summary: str = "The numbers in this chart") -> str:
    return f"<details><summary>{_e(summary)}</summary>{table_html}</details>"


def _stamp(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _when_text(stamp: str) -> str:
    """Database time text as people read it: ``2026-06-01 09:30 UTC``."""
    return f"{stamp[:10]} {stamp[11:16]} UTC" if len(stamp) >= 16 else stamp


def _what(row: queries.ChangeRow) -> str:
    """What changed, in words."""
    if row.change == "added":
        return f"added as {row.new_role} ({row.new_status})"
    if row.change == "removed":
        return f"removed (was {row.old_role}, {row.old_status})"
    parts = []
    if row.old_role != row.new_role:
        parts.append(f"role {row.old_role} \u2192 {row.new_role}")
    if row.old_status != row.new_status:
        parts.append(f"status {row.old_status} \u2192 {row.new_status}")
    return "; ".join(parts) or "changed"


def _members_section(pygal: t.Any, data: ReportData) -> str:
    which = (f"group {data.group.name!r}" if data.group else
             f"the {len(data.series)} largest groups by active members at the period's end")
    intro = (f"<p>Active members of {_e(which)}: counted as of the period's start and at every run that recorded a"
             " change in the group (<code>syncer members GROUP --at run:N</code>).</p>")
    if not any(s.points for s in data.series):
        return f'<section id="members"><h2>Active members over time</h2>{intro}<p>No group with visible members.</p></section>'
    counts = [p.active for s in data.series for p in s.points]
    times = [p.at for s in data.series for p in s.points]
    # runs close together: their dates (or minutes) alone would all read the same
    spread = _stamp(max(times)) - _stamp(min(times))
    shown = ("%Y-%m-%d" if spread > dt.timedelta(days=3) else "%m-%d %H:%M" if spread > dt.timedelta(hours=1)
             else "%H:%M:%S")
    chart = pygal.DateTimeLine(**_config(
        pygal, SERIES_COLORS, top=max(counts), low=min(counts), x_label_rotation=20,
        x_value_formatter=lambda d: d.strftime(shown),
        dots_size=3, show_dots=True, allow_interruptions=True, title="Active members", legend_at_bottom_columns=2,
    ))
    names = []
    for series in data.series:
        label = _clean(series.name or series.group_id)
        names.append(label)
        chart.add(label, [(_stamp(p.at), p.active) for p in series.points])
    svg = _titled(chart, names, lambda name, x, value: f"{name}: {value} active members")
    # pygal's DateTimeLine puts no x label into the marks: the table gives the run and time
    notes = "".join(f"<p class=\"note\">{_e(s.name or s.group_id)}: more than {MAX_POINTS} runs changed it; drawn at"
                    " the last of each day.</p>" for s in data.series if s.daily)
    rows = [(s.group_id, s.name, p.run_id, _when_text(p.at), p.active) for s in data.series for p in s.points]
    table = _table("members-over-time", "Active members as of each run", ("group id", "group", "run", "at", "active members"),
                   rows, numeric={2, 4})
    return f'<section id="members"><h2>Active members over time</h2>{intro}{_chart(svg, "Active members over time")}' \
           f"{notes}{_numbers(table)}</section>"


def _kinds_present(rows: t.Sequence[KindCounts]) -> tuple[str, ...]:
    return tuple(k for k in EVENT_KINDS if k != "unknown" or any(r.unknown for r in rows))


def _events_section(pygal: t.Any, data: ReportData) -> str:
    kinds = _kinds_present(data.weeks)
    chart = pygal.StackedBar(**_config(pygal, [KIND_COLORS[k] for k in kinds], x_label_rotation=30,
                                       show_minor_x_labels=False, x_labels_major_every=max(1, len(data.weeks) // 16),
                                       top=max((w.total for w in data.weeks), default=0),
                                       title="Events per week (weeks start on Monday, UTC)"))
    chart.x_labels = [w.label for w in data.weeks]
    for k in kinds:
        chart.add(k, [getattr(w, k) for w in data.weeks])
    svg = _titled(chart, kinds, lambda name, x, value: f"week of {x}: {value} {name}")
    table = _table("events-per-week", "Events per week", ("week of", *kinds, "total"),
                   [(w.label, *(getattr(w, k) for k in kinds), w.total) for w in data.weeks],
                   numeric=set(range(1, len(kinds) + 2)))
    total = sum(w.total for w in data.weeks)
    intro = (f"<p>{total} events in the period (<code>syncer changes</code>): members who joined, left, or whose role"
             " or status changed. Observations (first seen, hidden, group gone) are not events.</p>")
    return f'<section id="events-by-week"><h2>Events per week</h2>{intro}{_chart(svg, "Events per week")}' \
           f"{_numbers(table)}</section>"


def _movers_chart(pygal: t.Any, rows: list[KindCounts], title: str, table_id: str, who: str) -> str:
    if not rows:
        return f"<h3>{_e(title)}</h3><p>No events in this period.</p>"
    kinds = _kinds_present(rows)
    ordered = list(reversed(rows))  # horizontal bars draw bottom-up: the biggest on top
    chart = pygal.HorizontalStackedBar(**_config(pygal, [KIND_COLORS[k] for k in kinds], title=title,
                                                 top=max(r.total for r in rows), height=max(280, 90 + 34 * len(rows))))
    chart.x_labels = [_clean(r.label)[:40] for r in ordered]
    for k in kinds:
        chart.add(k, [getattr(r, k) for r in ordered])
    svg = _titled(chart, kinds, lambda name, x, value: f"{x}: {value} {name}")
    table = _table(table_id, title, (who, *kinds, "total"), [(r.label, *(getattr(r, k) for k in kinds), r.total)
                                                             for r in rows], numeric=set(range(1, len(kinds) + 2)))
    return f"<h3>{_e(title)}</h3>{_chart(svg, title)}{table}"


def _movers_section(pygal: t.Any, data: ReportData) -> str:
    return ('<section id="movers"><h2>Biggest movers</h2><p>Who changed the most: the people and groups with the most'
            " events in the period.</p>"
            f"{_movers_chart(pygal, data.people, f'People with the most events (top {TOP_MOVERS})', 'movers-people', 'person')}"
            f"{_movers_chart(pygal, data.movers, f'Groups with the most events (top {TOP_MOVERS})', 'movers-groups', 'group')}"
            "</section>")


def _runs_section(pygal: t.Any, data: ReportData) -> str:
    statuses = tuple(s for s in RUN_STATUSES if s in ("ok", "partial", "failed") or any(getattr(r, s) for r in data.runs))
    unit = data.run_unit
    chart = pygal.StackedBar(**_config(pygal, [STATUS_COLORS[s] for s in statuses], x_label_rotation=30,
                                       show_minor_x_labels=False, x_labels_major_every=max(1, len(data.runs) // 12),
                                       top=max((sum(getattr(r, s) for s in RUN_STATUSES) for r in data.runs), default=0),
                                       title=f"Runs per {unit} by status"))
    chart.x_labels = [r.start for r in data.runs]
    for s in statuses:
        chart.add(s, [getattr(r, s) for r in data.runs])
    svg = _titled(chart, statuses, lambda name, x, value: f"{unit} of {x}: {value} {name}")
    table = _table("runs-per-day", f"Runs per {unit}", (unit, *statuses, "total"),
                   [(r.start, *(getattr(r, s) for s in statuses), sum(getattr(r, s) for s in statuses)) for r in data.runs],
                   numeric=set(range(1, len(statuses) + 2)))
    if data.failures:
        failures = _table("failures", "Runs that did not end ok, by reason", (
            "status", "reason", "runs", "first", "last"),
            [(f.status, f.reason, f.runs, f"run {f.first_run}, {_when_text(f.first_at)}",
              f"run {f.last_run}, {_when_text(f.last_at)}") for f in data.failures], numeric={2})
    else:
        failures = "<p>Every run in the period ended ok.</p>"
    total = sum(sum(getattr(r, s) for s in RUN_STATUSES) for r in data.runs)
    intro = (f"<p>{total} runs started in the period. <em>partial</em>: some groups could not be read (they kept"
             " what the run before recorded); <em>failed</em> and <em>aborted</em> runs recorded nothing.</p>")
    return (f'<section id="runs"><h2>Runs over time</h2>{intro}{_chart(svg, f"Runs per {unit}")}{_numbers(table)}'
            f"<h3>Failures and their reasons</h3>{failures}</section>")


def _event_table_section(data: ReportData) -> str:
    span = data.period.runs
    command = f"syncer changes --since {data.period.since_text}" + (
        f" --until {data.period.until_text}" if data.period.until_text != "now" else "")
    if data.group:
        command += f" --group {data.group.id}"
    shown = len(data.events)
    note = (f"<p class=\"note\">The first {shown} of {data.events_total} events; all of them: <code>{_e(command)}</code>"
            "</p>" if shown < data.events_total else "")
    rows = [(_when_text(e.at), e.run_id, e.group_name, e.username or e.identity_id, _what(e), e.reason or "unknown")
            for e in data.events]
    body = _table("events", "The period's events, oldest first",
                  ("at", "run", "group (name then)", "username", "what changed", "why"), rows, numeric={1}) \
        if rows else "<p>No events in this period.</p>"
    runs = f"runs {span[0]}\u2013{span[1]}" if span else "no runs"
    return (f'<section id="event-list"><h2>The period\'s events</h2><p>{data.events_total} events in {runs}, as'
            f" <code>{_e(command)}</code> lists them.</p>{note}{body}</section>")


def _groups_section(data: ReportData) -> str:
    end = data.period.end
    cols = data.policy_columns
    head = ("group id", "name", "my role", "my status", "members visible", "active members", *(c.replace("_", " ") for c in cols))
    rows = [(g.row.id, g.row.name, g.row.my_role, g.row.my_status, "yes" if g.row.members_visible else "no",
             "not visible" if g.row.active_members is None else g.row.active_members,
             *(g.policies.get(c) for c in cols)) for g in data.groups]
    table = _table("groups", f"Groups as of run {end.id}", head, rows, numeric={5}) if rows else "<p>No groups.</p>"
    return (f'<section id="groups-at-end"><h2>Groups at the period\'s end</h2><p>{len(rows)} groups and their policies as'
            f" of run {end.id} ({end.status}, started {_e(_when_text(end.started_at))}), as <code>syncer groups</code>"
            f" lists them.</p>{table}</section>")


def _header(data: ReportData) -> str:
    owner = (f"{_e(describe_owner(data.owner))}, recorded by run {data.owner.recorded_by_run}" if data.owner else
             "this database has no recorded owner yet (the next successful <code>syncer sync</code> records it)")
    p = data.period
    runs = f"runs {p.runs[0]}\u2013{p.runs[1]}" if p.runs else "no run started in this period"
    scope = f"group {_e(data.group.name)} ({_e(data.group.id)})" if data.group else "all groups"
    return (
        "<header><h1>Group membership report</h1><dl>"
        f"<dt>Identity</dt><dd>{owner}</dd>"
        f"<dt>Database</dt><dd><code>{_e(data.database)}</code></dd>"
        f"<dt>Period</dt><dd>{_e(_when_text(p.since))} to {_e(_when_text(p.until))} (--since {_e(p.since_text)}, "
        f"--until {_e(p.until_text)}); {runs}</dd>"
        f"<dt>Scope</dt><dd>{scope}</dd>"
        f"<dt>Generated</dt><dd>{_e(_when_text(data.generated_at))} by syncer {__version__}</dd>"
        "</dl></header>"
    )


CSS = """
:root{color-scheme:light;--ink:#1b1b1b;--muted:#555;--line:#d6d6d6;--bg:#fafafa}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans","Liberation Sans",sans-serif;
color:var(--ink);background:var(--bg)}
main{max-width:1100px;margin:0 auto;padding:16px}
header{border-bottom:2px solid var(--ink);margin-bottom:8px}
h1{font-size:1.6em;margin:.2em 0}
h2{font-size:1.3em;margin:1.6em 0 .4em;border-bottom:1px solid var(--line)}
h3{font-size:1.05em;margin:1.2em 0 .3em}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:.5em 0 1em}
dt{font-weight:600}dd{margin:0;overflow-wrap:anywhere}
code{font-family:ui-monospace,"DejaVu Sans Mono","Liberation Mono",monospace;font-size:.92em;overflow-wrap:anywhere}
figure.chart{margin:0;overflow-x:auto;background:#fff;border:1px solid var(--line)}
figure.chart svg{display:block;width:100%;max-width:900px;height:auto;margin:0 auto}
.scroll{overflow-x:auto;max-width:100%}
#event-list .scroll,#groups-at-end .scroll{max-height:80vh;overflow-y:auto}
table{border-collapse:collapse;margin:.5em 0;background:#fff;font-size:.92em}
caption{text-align:left;font-weight:600;padding:4px 0}
th,td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
thead th{background:#eee;position:sticky;top:0}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
details{margin:.4em 0}summary{cursor:pointer;color:var(--muted)}
.note{color:var(--muted)}
@media (max-width:600px){body{font-size:14px}main{padding:8px}dl{grid-template-columns:1fr}dt{margin-top:4px}}
"""


def render(data: ReportData) -> str:
    """The report as one HTML document that fetches nothing."""
    pygal = _load_pygal()
    title = f"Group membership report: {_when_text(data.period.since)} to {_when_text(data.period.until)}"
    body = "".join((
        _header(data), _members_section(pygal, data), _events_section(pygal, data), _movers_section(pygal, data),
        _runs_section(pygal, data), _event_table_section(data), _groups_section(data),
    ))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        # nothing may be fetched: no script, style, font, image or frame from anywhere
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def write_report(path: Path, text: str) -> int:
    """Write the file atomically (a failed report leaves any earlier one whole); its size."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ReportUsageError(f"--output {path} is a directory; give a file name such as report.html")
    if not folder.is_dir():
        raise ReportUsageError(f"--output {path}: the folder {folder} does not exist")
    data = text.encode("utf-8")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as err:
        raise ReportUsageError(f"--output {path}: cannot write there ({err.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def build_report(
    db: sqlite_utils.Database, database: Path, output: Path, since: When | None, until: When | None, group: str | None,
) -> tuple[ReportData, int]:
    """Gather, render and write the report; the data shown and the file's size."""
    _load_pygal()  # say how to install the extra before doing any work
    data = gather(db, database, since, until, group)
    return data, write_report(output, render(data))
