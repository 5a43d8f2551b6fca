"""``syncer serve``: Datasette on the output database, read-only, with syncer's metadata.

The metadata (``datasette_metadata.json``, shipped in the package; a copy is in
``config/``) gives the title, descriptions of every table, view and column users
query, and the canned queries. It names the database ``groups`` (the default file
name); here it is renamed to whatever the configured file is called, and every
table that is not part of the documented interface is hidden, so syncer's
internal tables stay out of sight even when a later release adds some.

Datasette is an optional extra (``pip install 'globus-group-syncer[datasette]'``), pinned below
1.0, where canned queries moved out of the metadata.
"""

from __future__ import annotations

import asyncio
import copy
import json
import typing as t
from pathlib import Path

from syncer.errors import EXIT_FAILED, SyncerError
from syncer.schema import connect

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
SETTINGS = {"sql_time_limit_ms": 10_000, "facet_time_limit_ms": 500}


class DatasetteMissing(SyncerError):
    """The optional ``datasette`` extra is not installed (exit 1)."""

    exit_code = EXIT_FAILED


def metadata(database: Path) -> dict[str, t.Any]:
    """The shipped metadata for ``database``: keyed by its Datasette name (the file's
    stem), with every table outside the documented interface hidden."""
    shipped = json.loads(METADATA_FILE.read_text())
    meta = copy.deepcopy(shipped)
    described = meta["databases"].pop(METADATA_DATABASE)
    db = connect(database, readonly=True)
    try:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()]
    finally:
        db.close()
    for name in tables:
        if name not in USER_FACING:
            described["tables"].setdefault(name, {})["hidden"] = True
    meta["databases"][database.stem] = described
    return meta


def make_datasette(database: Path) -> Datasette:
    """A Datasette instance serving ``database`` read-only with syncer's metadata.

    Mutable (not ``immutable``): the file changes at every run, and Datasette opens
    mutable files with ``mode=ro``, so it needs only read access and sees each run
    as it commits.
    """
    try:
        from datasette.app import Datasette
    except ImportError:
        raise DatasetteMissing(f"Datasette is not installed; install it with: {INSTALL_HINT}") from None
    return Datasette(files=[str(database)], metadata=metadata(database), settings=SETTINGS)


def serve(database: Path, host: str, port: int) -> None:
    """Serve until interrupted (uvicorn handles SIGINT and SIGTERM)."""
    ds = make_datasette(database)
    import uvicorn  # comes with Datasette

    asyncio.run(ds.invoke_startup())
    uvicorn.run(ds.app(), host=host, port=port, log_level="info", lifespan="on")
