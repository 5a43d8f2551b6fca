"""The Datasette plugin behind ``syncer serve`` (registered in-process by
``syncer.web.make_datasette``; see that module for what it guarantees).

The permission and connection hooks first ask whether syncer made the Datasette
instance they are called for, and leave any other alone. The magic parameters also
serve a plain ``datasette groups.db -m config/datasette-metadata.json`` run where
syncer is installed (the plugin's ``datasette`` entry point), so the shipped canned
queries work there too.

Magic parameters of the canned queries (``:_<prefix>_<argument>``), each computed
from the request's argument with the CLI's own code, on a read-only connection of
its own:

- ``_asof_<arg>``: the id of the run that answers "as of <arg>" (a WHEN; empty: the
  latest run);
- ``_group_<arg>``: the id of the group <arg> names (an id, or a name it has or had);
  NULL when empty;
- ``_user_<arg>``: a JSON list of the identity ids <arg> names (a username or an
  id); NULL when empty;
- ``_runs_first`` and ``_runs_last``: the runs that started from ``since`` (default
  ``7d``, as ``syncer changes``) through ``until`` (default: now); 1 and 0 (no run)
  when there are none.

A bad value raises ``sqlite3.OperationalError`` with the CLI's message: SQLite's
parameter binding lets it through and Datasette shows it as the query's error.
"""

from __future__ import annotations

import json
import sqlite3
import typing as t
from pathlib import Path

from datasette import hookimpl

from syncer.errors import SyncerError
from syncer.storage import queries
from syncer.storage.database import open_for_reading
from syncer.storage.when import parse_when
from syncer.web import USER_FACING, served

# what Datasette itself must read to describe the database (never a visitor's data)
_SCHEMA_TABLES = frozenset(("sqlite_master", "sqlite_schema", "sqlite_temp_master"))


@hookimpl
def permission_allowed(datasette: t.Any, actor: t.Any, action: str, resource: t.Any) -> bool | None:
    """Only the documented tables and views can be viewed; the file cannot be downloaded."""
    if served(datasette) is None:
        return None
    if action == "view-table":
        _database, table = resource
        return None if table in USER_FACING else False
    if action == "view-database-download":
        return False
    return None


@hookimpl
def prepare_connection(conn: sqlite3.Connection, database: str, datasette: t.Any) -> None:
    """With ``--allow-sql``: a visitor's SQL reads values of the documented tables and
    views only (the storage tables behind the views are read through them)."""
    where = served(datasette)
    if where is not None and where.allow_sql and database == where.database.stem:  # not Datasette's _internal
        conn.set_authorizer(_documented_only)


def _documented_only(action: int, table: str | None, column: str | None, schema: str | None, view: str | None) -> int:
    """SQLite's authorizer: refuse reading a column of an undocumented table from the
    top-level SQL. SQLite names the view a read comes from, except where a table is
    only counted or joined without reading a column (column ``""``): that is allowed,
    so the views work; no value of an undocumented table can be read."""
    if not column:
        return sqlite3.SQLITE_OK
    hidden = table is not None and table not in USER_FACING and table not in _SCHEMA_TABLES
    if action == sqlite3.SQLITE_READ and view is None and hidden:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _database_file(datasette: t.Any) -> Path | None:
    """The file the canned queries ask: syncer's, or in a plain ``datasette`` (which
    loads this plugin through its entry point) the first database on a file."""
    where = served(datasette)
    if where is not None:
        return where.database
    for db in datasette.databases.values():
        if db.path and not db.is_memory:
            return Path(db.path)
    return None


@hookimpl
def register_magic_parameters(datasette: t.Any) -> list[tuple[str, t.Callable[[str, t.Any], t.Any]]]:
    database = _database_file(datasette)
    if database is None:
        return []

    def checked(answer: t.Callable[[t.Any], t.Any]) -> t.Any:
        try:
            with open_for_reading(database) as db:
                return answer(db)
        except SyncerError as err:
            raise sqlite3.OperationalError(str(err)) from None

    def argument(request: t.Any, name: str) -> str:
        return str(request.args.get(name) or "").strip()

    def as_of(name: str, request: t.Any) -> int:
        text = argument(request, name)
        return checked(lambda db: queries.as_of(db, parse_when(text) if text else None).id)

    def group(name: str, request: t.Any) -> str | None:
        text = argument(request, name)
        return checked(lambda db: queries.resolve_group(db, text).id) if text else None

    def user(name: str, request: t.Any) -> str | None:
        text = argument(request, name)
        return checked(lambda db: json.dumps(queries.resolve_user(db, text))) if text else None

    def runs(end: str, request: t.Any) -> int:
        since, until = argument(request, "since") or "7d", argument(request, "until")

        def span(db: t.Any) -> tuple[int, int]:
            found = queries.run_span(db, parse_when(since), parse_when(until) if until else None)
            return found or (1, 0)

        first, last = checked(span)
        return {"first": first, "last": last}[end]

    return [("asof", as_of), ("group", group), ("user", user), ("runs", runs)]
