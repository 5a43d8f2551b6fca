"""``syncer serve``: Datasette on the output database, read-only, with syncer's metadata.

The metadata (``datasette_metadata.json``, shipped in the package; a copy is in
``config/``) gives the title, descriptions of every table, view and column users
query, and the canned queries. It names the database ``groups`` (the default file
name); here it is renamed to whatever the configured file is called.

What the server lets a visitor do is decided by Datasette's own mechanisms, through
a plugin registered in this process (``SyncerPlugin``):

- arbitrary SQL is off (Datasette's ``default_allow_sql`` setting) unless
  ``--allow-sql``;
- the tables and views SPEC documents are the only ones that can be viewed: every
  other (storage tables behind the views, migrations, statistics, hook state) is
  refused by the ``permission_allowed`` hook, by URL, as JSON, and row by row, and is
  hidden from the index; the database file cannot be downloaded. With
  ``--allow-sql`` an SQLite authorizer (``prepare_connection``) still refuses reading
  them from a visitor's SQL, except through the documented views;
- canned queries take their parameters through magic parameters
  (``register_magic_parameters``) that check them exactly as the CLI does, with the
  CLI's own code (``syncer.storage.when``, ``syncer.storage.queries``): a WHEN in any of its forms
  becomes the run that answers it, a group name the group's id (an ambiguous name
  lists the ids). Anything else raises an SQLite error whose message Datasette shows
  on the page (and in JSON, with HTTP 400): never an answer to another question.

Datasette is an optional extra (``pip install 'globus-group-syncer[datasette]'``), pinned below
1.0, where canned queries moved out of the metadata.
"""

from __future__ import annotations

import asyncio
import copy
import json
import typing as t
import weakref
from pathlib import Path

from syncer.errors import EXIT_FAILED, SyncerError
from syncer.storage.database import open_for_reading

if t.TYPE_CHECKING:
    from datasette.app import Datasette

METADATA_FILE = Path(__file__).with_name("datasette_metadata.json")
METADATA_DATABASE = "groups"
INSTALL_HINT = (
    "pip install 'globus-group-syncer[datasette]'"
    " (a pipx install: pipx inject globus-group-syncer 'datasette>=0.65,<0.66')"
)
# what users query (SPEC, "Database"); every other table is syncer's own
USER_FACING = frozenset(
    ("sync_runs", "groups", "group_history", "identities", "memberships", "membership_history",
     "membership_changes", "membership_events", "active_members")
)
# canned queries over a large history (group sizes at every run) need more than Datasette's 1 s
SETTINGS = {"sql_time_limit_ms": 10_000, "facet_time_limit_ms": 500, "allow_download": False}


class DatasetteMissing(SyncerError):
    """The optional ``datasette`` extra is not installed (exit 1)."""

    exit_code = EXIT_FAILED


def metadata(database: Path) -> dict[str, t.Any]:
    """The shipped metadata for ``database``: keyed by its Datasette name (the file's
    stem), with every table outside the documented interface hidden."""
    shipped = json.loads(METADATA_FILE.read_text())
    meta = copy.deepcopy(shipped)
    described = meta["databases"].pop(METADATA_DATABASE)
    # any SQLite file is served as it is (nothing of it undocumented shown)
    with open_for_reading(database, syncer_tables=False) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()]
    for name in tables:
        if name not in USER_FACING:
            described["tables"].setdefault(name, {})["hidden"] = True
    meta["databases"][database.stem] = described
    return meta


class Served(t.NamedTuple):
    """What the plugin needs to know about one Datasette instance syncer made."""

    database: Path
    allow_sql: bool


# the Datasette instances syncer made; the plugin leaves any other alone
_SERVED: weakref.WeakKeyDictionary[t.Any, Served] = weakref.WeakKeyDictionary()


def make_datasette(database: Path, allow_sql: bool = False) -> Datasette:
    """A Datasette instance serving ``database`` read-only with syncer's metadata.

    Mutable (not ``immutable``): the file changes at every run, and Datasette opens
    mutable files with ``mode=ro``, so it needs only read access and sees each run
    as it commits.
    """
    try:
        from datasette.app import Datasette
        from datasette.plugins import pm
    except ImportError:
        raise DatasetteMissing(f"Datasette is not installed; install it with: {INSTALL_HINT}") from None
    from syncer import web_plugin

    if not pm.is_registered(web_plugin):
        pm.register(web_plugin, name="syncer")
    ds = Datasette(
        files=[str(database)], metadata=metadata(database),
        settings={**SETTINGS, "default_allow_sql": allow_sql},
    )
    _SERVED[ds] = Served(database, allow_sql)
    return ds


def served(datasette: t.Any) -> Served | None:
    """The instance's settings if syncer made it, else None."""
    return _SERVED.get(datasette)


def serve(database: Path, host: str, port: int, allow_sql: bool = False) -> None:
    """Serve until interrupted (uvicorn handles SIGINT and SIGTERM)."""
    ds = make_datasette(database, allow_sql)
    import uvicorn  # comes with Datasette

    asyncio.run(ds.invoke_startup())
    uvicorn.run(ds.app(), host=host, port=port, log_level="info", lifespan="on")
