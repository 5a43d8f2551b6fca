"""Rows to text for the query commands: a table for people, CSV/TSV/JSON/JSON lines for scripts.

Machine formats are complete and stable: every field, in the documented order, under
its documented name, values as stored (NULL is JSON null and an empty CSV cell). A
table fits the terminal: the widest columns are shortened with an ellipsis rather
than wrapped.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import typing as t

FORMATS = ("table", "csv", "tsv", "json", "jsonl")

ELLIPSIS = "…"
GAP = "  "
_MIN_WIDTH = 8


def render(rows: t.Sequence[t.Sequence[t.Any]], fields: t.Sequence[str], fmt: str, width: int | None = None) -> str:
    """``rows`` (tuples in ``fields`` order) in a format of FORMATS, ending with a newline
    unless empty. ``width``: the table's width (default: the terminal's)."""
    if fmt == "json":
        return json.dumps([dict(zip(fields, row, strict=True)) for row in rows], indent=2, ensure_ascii=False) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(dict(zip(fields, row, strict=True)), ensure_ascii=False) + "\n" for row in rows)
    if fmt in ("csv", "tsv"):
        out = io.StringIO()
        writer = csv.writer(out, dialect="excel-tab" if fmt == "tsv" else "excel", lineterminator="\n")
        writer.writerow(fields)
        writer.writerows(["" if v is None else v for v in row] for row in rows)
        return out.getvalue()
    if fmt == "table":
        return table(rows, fields, width or shutil.get_terminal_size().columns)
    raise ValueError(f"unknown format {fmt!r}")


def table(rows: t.Sequence[t.Sequence[t.Any]], fields: t.Sequence[str], width: int) -> str:
    """Aligned columns with a header, every line at most ``width`` characters where the
    columns can be shortened that far."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(f)] + [len(row[i]) for row in cells]) for i, f in enumerate(fields)]
    _fit(widths, fields, width - len(GAP) * (len(fields) - 1))
    lines = [fields, *cells]
    return "".join(GAP.join(_clip(v, w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n" for line in lines)


def _cell(value: t.Any) -> str:
    # one line per row: a name with a line break would otherwise break the table
    return "" if value is None else " ".join(str(value).split())


def _fit(widths: list[int], fields: t.Sequence[str], room: int) -> None:
    """Narrow ``widths`` in place until they sum to ``room``, always the widest column
    (long names and ids alike end up equally shortened), none below its header."""
    floors = [max(_MIN_WIDTH, len(f)) for f in fields]
    while sum(widths) > room:
        shrinkable = [i for i, w in enumerate(widths) if w > floors[i]]
        if not shrinkable:
            break
        widths[max(shrinkable, key=lambda i: widths[i])] -= 1


def _clip(text: str, width: int) -> str:
    if len(text) > width:
        text = text[: width - 1] + ELLIPSIS
    return text.ljust(width)
