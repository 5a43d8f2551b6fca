"""Rows to text for the query commands: a table for people, CSV/TSV/JSON/JSON lines for scripts.

Machine formats are lossless and stable: every field, in the documented order, under
its documented name, every character of every value as stored (NULL is JSON null and
an empty CSV/TSV cell). They are written to stdout as UTF-8 bytes, untouched
(``click.echo`` would strip what looks like an ANSI sequence when stdout is not a
terminal). TSV has no quoting: tab, newline, carriage return and backslash inside a
value are written ``\\t``, ``\\n``, ``\\r``, ``\\\\``.

A table is for people: control characters in values (ESC, BEL, C1 controls, bidi
overrides, line breaks...) are shown escaped, never sent raw to the terminal. On a
terminal it fits the width (see ``fit_table``); to a pipe or a file it cuts nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import re
import sys
import typing as t

FORMATS = ("table", "csv", "tsv", "json", "jsonl")

ELLIPSIS = "…"
GAP = "  "
ARROW = "→"

# What a table may shorten, in the order it does (SPEC: ids before names, times,
# usernames and reasons); a column of no kind is only cut once all else is at its floor.
ID, NAME, TIME, USER, REASON = "id", "name", "time", "user", "reason"
SHRINK_ORDER = (ID, NAME, TIME, USER, REASON)
KINDS: dict[str, str] = {
    "id": ID, "group_id": ID, "identity_id": ID, "run_id": ID,
    "name": NAME, "group_name": NAME,
    "at": TIME, "from": TIME, "to": TIME,
    "username": USER,
    "reason": REASON, "began": REASON, "ended": REASON, "change": REASON,
}  # a merged "what" (changes) says what happened and why: never shortened but as a last resort
# the narrowest a column of a kind is cut to before the next kind is touched: first
# roomy (a name still reads), then tight
ROOMY_FLOORS = {ID: 8, NAME: 24, TIME: 16, USER: 20, REASON: 10}
FLOORS = {ID: 8, NAME: 14, TIME: 16, USER: 12, REASON: 10}
NARROW_FLOORS = {ID: 4, NAME: 8, TIME: 10, USER: 8, REASON: 6}
NARROW_ORDER = (TIME, ID, NAME, USER, REASON)
_LAST_RESORT_WIDTH = 3
_TIME_LENGTHS = (19, 16, 10)  # a time to the second, to the minute, the date

# Bidirectional-text controls (Unicode category Cf): they reorder what follows them on
# the screen, so "evil\u202etxt.exe" would read as something else.
_BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape_map() -> dict[int, str]:
    table: dict[int, str] = {}
    for code in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029, *_BIDI]:
        char = chr(code)
        table[code] = _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return table


_ESCAPES = _escape_map()
_CONTROLS = re.compile("[" + "".join(re.escape(chr(code)) for code in _ESCAPES) + "]")


def escape_controls(text: str, keep: str = "") -> str:
    """``text`` with every control character (C0 but those in ``keep``, DEL, C1, line
    and paragraph separators, bidi controls) written visibly as ``\\xNN``, ``\\uNNNN``,
    ``\\t``, ``\\n`` or ``\\r``: safe to show on a terminal."""
    if not _CONTROLS.search(text):  # the usual case, and much cheaper than translate()
        return text
    if keep:
        return text.translate({code: esc for code, esc in _ESCAPES.items() if chr(code) not in keep})
    return text.translate(_ESCAPES)


# ------------------------------------------------------------------ table layout


@dataclasses.dataclass(frozen=True)
class Merge:
    """Columns a narrow table shows as one: ``fields`` (original field names) become
    the column ``name``, each cell ``combine(values)`` of the row's (escaped) values."""

    name: str
    fields: tuple[str, ...]
    combine: t.Callable[[t.Sequence[str]], str]


class Layout(t.NamedTuple):
    """How one command's table may narrow: merges tried in order once the ids are left out."""

    merges: tuple[Merge, ...] = ()


class Table(t.NamedTuple):
    """A rendered table and what a person should be told about it (on stderr)."""

    text: str
    notes: tuple[str, ...]


@dataclasses.dataclass
class _Column:
    name: str
    kind: str | None
    cells: list[str]
    sources: tuple[str, ...]
    # the cells of every field the column is made of: a later merge that takes in a
    # merged column combines the original values, not the merged text
    originals: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    width: int = 0

    def __post_init__(self) -> None:
        if not self.originals:
            self.originals = {self.sources[0]: self.cells}

    @functools.cached_property
    def natural(self) -> int:
        """The width that shows every cell and the header in full (asked for often: kept)."""
        return max([len(self.name), *(len(c) for c in self.cells)])


def render(rows: t.Sequence[t.Sequence[t.Any]], fields: t.Sequence[str], fmt: str) -> str:
    """``rows`` (tuples in ``fields`` order) in a machine format of FORMATS (not table),
    ending with a newline unless empty."""
    if fmt == "json":
        return json.dumps([dict(zip(fields, row, strict=True)) for row in rows], indent=2, ensure_ascii=False) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(dict(zip(fields, row, strict=True)), ensure_ascii=False) + "\n" for row in rows)
    if fmt == "csv":
        out = io.StringIO(newline="")
        writer = csv.writer(out, dialect="excel", lineterminator="\n")
        writer.writerow(fields)
        writer.writerows(["" if v is None else v for v in row] for row in rows)
        return out.getvalue()
    if fmt == "tsv":
        lines = ["\t".join(fields), *("\t".join(tsv_escape(v) for v in row) for row in rows)]
        return "".join(line + "\n" for line in lines)
    raise ValueError(f"unknown machine format {fmt!r}")


def tsv_escape(value: t.Any) -> str:
    """A TSV cell: NULL empty; backslash, tab, newline and carriage return escaped."""
    if value is None:
        return ""
    text = str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def write_stdout(text: str) -> None:
    """Write ``text`` to stdout as UTF-8 bytes, exactly (no ANSI stripping, no newline
    translation), whatever stdout is."""
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a replaced stdout without bytes underneath
        sys.stdout.write(text)
    else:
        buffer.write(text.encode("utf-8", "surrogateescape"))
        buffer.flush()


def table(
    rows: t.Sequence[t.Sequence[t.Any]], fields: t.Sequence[str], width: int | None, layout: Layout | None = None,
) -> Table:
    """Aligned columns with a header, control characters escaped.

    ``width`` None (a pipe or a file): every column, every value in full. A terminal's
    ``width``: see ``fit_table``.
    """
    columns = [
        _Column(name, KINDS.get(name), [_cell(row[i]) for row in rows], (name,)) for i, name in enumerate(fields)
    ]
    if width is None:
        for column in columns:
            column.width = column.natural
        return Table(_lines(columns), ())
    return fit_table(columns, width, layout or Layout())


def fit_table(columns: list[_Column], width: int, layout: Layout) -> Table:
    """Fit the terminal's ``width``, saying on stderr what was left out or merged.

    Columns whose value is the same on every row are said once above the table. Then
    the first of these that fits: ids, names, times, usernames and reasons shortened in
    that order (a time loses its seconds, then its minutes), each to a floor; also ids
    left out; also the layout's merges one by one. That is tried with roomy floors (a
    name keeps 24 characters), then with tight ones; as a last resort every column is
    cut alike, and each line at the width.
    """
    fields = [c.name for c in columns]
    constants: dict[str, str] = {}
    if len(columns[0].cells) >= 2:
        constant = [c for c in columns if len(set(c.cells)) == 1]
        if len(constant) < len(columns):
            constants = {c.name: c.cells[0] for c in constant}
            columns = [c for c in columns if c not in constant]
    start = columns
    for floors in (ROOMY_FLOORS, FLOORS):
        columns = start
        if _shrink(columns, width, floors):
            break
        kept = [c for c in columns if c.kind != ID]
        columns = kept or columns
        if _shrink(columns, width, floors):
            break
        fitted = False
        for merge in layout.merges:
            columns = _merge(columns, merge, constants)
            if fitted := _shrink(columns, width, floors):
                break
        if fitted:
            break
    else:
        # narrow: times down to their date first (the date still reads), then the rest
        # below their headers' width, and only then everything alike
        if not _shrink(columns, width, NARROW_FLOORS, NARROW_ORDER, headers=False):
            _cut_alike(columns, width)
    shown = {source for c in columns for source in c.sources} | set(constants)
    notes = [f"left out to fit {width} columns: {', '.join(f for f in fields if f not in shown)}"] if shown < set(fields) else []
    notes += [f"column {c.name!r} shows {', '.join(c.sources)}" for c in columns if len(c.sources) > 1]
    if notes:
        notes.append("every column in full: a wider terminal, or --format tsv (or csv, json)")
    return Table(_heading(constants, width) + _lines(columns, width), tuple(notes))


def _shrink(
    columns: list[_Column], width: int, floors: dict[str, int], order: tuple[str, ...] = SHRINK_ORDER, headers: bool = True,
) -> bool:
    """Set the columns' widths to fit ``width``, shortening kind after kind, each to its
    floor (and not below its header's width if ``headers``); False (widths at their
    floors) when they cannot."""
    room = width - len(GAP) * (len(columns) - 1)
    for column in columns:
        column.width = column.natural
    for kind in order:
        if sum(c.width for c in columns) <= room:
            return True
        of_kind = [c for c in columns if c.kind == kind]
        floor = {id(c): max(len(c.name) if headers else 0, floors[kind]) for c in of_kind}
        while of_kind and sum(c.width for c in columns) > room:
            widest = max(of_kind, key=lambda c: c.width - floor[id(c)])
            if widest.width <= floor[id(widest)]:
                break
            widest.width -= 1
    for column in columns:  # a shortened time shows to the second, the minute or the day
        if column.kind == TIME and column.width < column.natural:
            column.width = max((n for n in _TIME_LENGTHS if n <= column.width), default=column.width)
    return sum(c.width for c in columns) <= room


def _heading(constants: dict[str, str], width: int) -> str:
    """The values every row shares, said once: ``name: value`` pairs, as many a line as
    fit, then a blank line."""
    lines: list[str] = []
    for name, value in constants.items():
        pair = f"{name}: {value or '(none)'}"
        if lines and len(lines[-1]) + len(GAP) + len(pair) <= width:
            lines[-1] += GAP + pair
        else:
            lines.append(pair)
    return "".join(_clip(line, width) + "\n" for line in lines) + ("\n" if lines else "")


def _cut_alike(columns: list[_Column], width: int) -> None:
    room = width - len(GAP) * (len(columns) - 1)
    while sum(c.width for c in columns) > room:
        widest = max(columns, key=lambda c: c.width)
        if widest.width <= _LAST_RESORT_WIDTH:
            break
        widest.width -= 1


def _merge(columns: list[_Column], merge: Merge, constants: dict[str, str]) -> list[_Column]:
    """``columns`` with those made only of ``merge.fields`` replaced by one merged column
    (a field said once in the heading takes part with its one value)."""
    parts = [c for c in columns if set(c.sources) <= set(merge.fields)]
    shown = {source for c in parts for source in c.sources}
    if not parts or shown | set(constants) < set(merge.fields) or [c.sources for c in parts] == [merge.fields]:
        return columns
    rows = len(parts[0].cells)
    originals = {field: [constants[field]] * rows for field in merge.fields if field not in shown}
    originals.update({field: cells for c in parts for field, cells in c.originals.items()})
    values = zip(*(originals[f] for f in merge.fields), strict=True)
    merged = _Column(merge.name, KINDS.get(merge.name), [merge.combine(v) for v in values], merge.fields, originals)
    at = columns.index(parts[0])
    out = [c for c in columns if c not in parts]
    out.insert(at, merged)
    return out


def _cell(value: t.Any) -> str:
    return "" if value is None else escape_controls(str(value))


def _lines(columns: list[_Column], width: int | None = None) -> str:
    # column by column: most columns fit whole, and padding a list is cheap
    padded = [
        [(v.ljust(c.width) if c.natural <= c.width else _fit_cell(v, c)) for v in (c.name, *c.cells)] for c in columns
    ]
    lines = (GAP.join(cells).rstrip() for cells in zip(*padded, strict=True))
    if width is not None:
        lines = (_clip(line, width) for line in lines)
    return "".join(line + "\n" for line in lines)


def _fit_cell(text: str, column: _Column) -> str:
    if column.kind == TIME and len(text) > column.width:
        text = short_time(text, column.width)
    return _clip(text, column.width).ljust(column.width)


def short_time(stamp: str, width: int) -> str:
    """A stored time (``2026-06-01T09:30:00.123456Z``) in at most ``width`` characters:
    to the second, to the minute, or the date."""
    for length in _TIME_LENGTHS:
        if length <= width and len(stamp) > length:
            return stamp[:length].replace("T", " ")
    return stamp


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + ELLIPSIS


# ------------------------------------------------------------ the commands' layouts


def arrow(values: t.Sequence[str]) -> str:
    """An old and a new value as one: ``old→new``, or the one that is set."""
    old, new = values
    if old and new and old != new:
        return f"{old}{ARROW}{new}"
    return new or old


def describe_change(values: t.Sequence[str]) -> str:
    """A ``membership_changes`` row's change, reason, old/new role and status as one
    phrase: what happened and why ("joined as member", "left, was admin",
    "role member→manager")."""
    change, reason, old_role, new_role, old_status, new_status = values
    what = reason if reason and reason != "unknown" else f"{change} ({reason or 'unknown'})"
    if change == "added":
        return f"{what} as {new_role}" + (f", {new_status}" if new_status and new_status != "active" else "")
    if change == "removed":
        return f"{what}, was {old_role}" + (f", {old_status}" if old_status and old_status != "active" else "")
    moved = [f"{label} {arrow(pair)}" for label, pair in (("role", (old_role, new_role)), ("status", (old_status, new_status)))
             if pair[0] != pair[1]]
    return ", ".join(moved) or what


CHANGES_LAYOUT = Layout((
    Merge("role", ("old_role", "new_role"), arrow),
    Merge("status", ("old_status", "new_status"), arrow),
    Merge("what", ("change", "reason", "old_role", "new_role", "old_status", "new_status"), describe_change),
))


def role_status(values: t.Sequence[str]) -> str:
    """A role and a status as one: ``member``, or ``member, invited`` when not active."""
    role, status = values
    return role if status in ("active", "") else f"{role}, {status}"


def visible_count(values: t.Sequence[str]) -> str:
    """``members_visible`` and ``active_members`` as one: the count, or ``hidden``."""
    visible, count = values
    return count if visible == "1" else "hidden"


MEMBERS_LAYOUT = Layout((Merge("role", ("role", "status"), role_status),))
GROUPS_LAYOUT = Layout((
    Merge("members", ("members_visible", "active_members"), visible_count),
    Merge("my_role", ("my_role", "my_status"), role_status),
))
IDENTITY_LAYOUT = Layout((Merge("role", ("role", "status"), role_status),))
