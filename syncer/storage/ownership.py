"""Whose data a database holds: the identity (or confidential client) it belongs to.

A database records one identity's view of Globus. Its first successful run records
whose credentials it used (table ``database_owner``, one row); every later run, and
every ``syncer login``, checks that its credentials act as the same identity before
anything is written. Tokens of another Globus account would otherwise read another
set of groups, record every old group as ``group_gone`` and mix two people's
histories in one file: that is a configuration error (exit 78) naming both.

Which identity a login's tokens act as comes from the ``id_token`` Globus Auth
issues for the ``openid`` scope (its ``sub``), kept with the stored tokens; a
confidential client acts as itself (its identity id is its client id).
"""

from __future__ import annotations

import sqlite3
import typing as t

import jwt
import sqlite_utils

from syncer.errors import ConfigError
from syncer.logs import module_logger

if t.TYPE_CHECKING:
    import globus_sdk

    from syncer.globus.globus_groups import MyGroups

log = module_logger(__name__)

IDENTITY = "identity"
CLIENT = "client"


class DatabaseOwner(t.NamedTuple):
    """The identity or client a database belongs to, as its first successful run recorded it."""

    kind: str  # "identity" or "client"
    id: str  # the Globus identity id, or the confidential client's id
    username: str | None
    recorded_at: str  # the recording run's started_at
    recorded_by_run: int


class Credentials(t.NamedTuple):
    """Who a run's (or a login's) credentials act as."""

    kind: str  # "identity" or "client"
    id: str
    username: str | None
    #: the identity's linked identities (from the id_token), which act for the same person
    linked: tuple[str, ...] = ()

    def describe(self) -> str:
        return _describe(self.kind, self.id, self.username)


def _describe(kind: str, id_: str, username: str | None) -> str:
    if kind == CLIENT:
        return f"confidential client {id_}"
    return f"{username} ({id_})" if username else f"identity {id_}"


def describe_owner(owner: DatabaseOwner) -> str:
    """The owner in words: ``user@example.org (uuid)`` or ``confidential client uuid``."""
    return _describe(owner.kind, owner.id, owner.username)


def database_owner(db: sqlite_utils.Database) -> DatabaseOwner | None:
    """The database's recorded owner; None when no successful run has recorded one yet
    (or the database predates the ``0007_database_owner`` migration)."""
    try:
        row = db.execute(
            "SELECT kind, id, username, recorded_at, recorded_by_run FROM database_owner"
        ).fetchone()
    except sqlite3.OperationalError:  # no such table: a database from before the migration
        return None
    return DatabaseOwner(*row) if row else None


def is_owner(owner: DatabaseOwner, who: Credentials) -> bool:
    """Whether ``who`` acts as the database's owner (a linked identity of it counts)."""
    return owner.kind == who.kind and (owner.id == who.id or owner.id in who.linked)


def mismatch(owner: DatabaseOwner, who: Credentials, database: object) -> ConfigError:
    """The 78 for credentials of another identity than the database's: names both."""
    return ConfigError(
        f"{database} holds the data of {describe_owner(owner)}, but the credentials act as"
        f" {who.describe()}; nothing was recorded (use another `database` for another account,"
        " or log in again as its owner)"
    )


def check_owner(db: sqlite_utils.Database, who: Credentials | None, database: object) -> None:
    """Raise the 78 (``mismatch``) when ``who`` is not the database's recorded owner.

    Unknown credentials (``who`` None: tokens from a login made before owners were
    recorded, with nothing to tell their identity by) are let through: refusing them
    would stop syncs that have always worked until someone logs in again.
    """
    owner = database_owner(db)
    if owner is not None and who is not None and not is_owner(owner, who):
        raise mismatch(owner, who, database)


def record_owner(db: sqlite_utils.Database, who: Credentials, run_id: int, started_at: str) -> None:
    """Record ``who`` as the owner unless one is recorded already.

    Called inside the run's transaction, so the owner is recorded exactly when the
    run's data is: by the first run that commits.
    """
    db.execute(
        "INSERT OR IGNORE INTO database_owner (only_row, kind, id, username, recorded_at, recorded_by_run)"
        " VALUES (1, ?, ?, ?, ?, ?)",
        [who.kind, who.id, who.username, started_at, run_id],
    )


def from_id_token(response: globus_sdk.OAuthTokenResponse) -> Credentials | None:
    """Whose tokens a login's token response holds, from its OpenID Connect ``id_token``
    (issued for the ``openid`` scope); None when there is none or it cannot be read.

    The token came straight from Globus Auth's token endpoint over TLS, which OpenID
    Connect (Core 3.1.3.7) lets a client rely on instead of checking the signature:
    fetching Globus Auth's keys would cost a request and prove nothing more here.
    """
    token = response.get("id_token")
    if not isinstance(token, str):
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as err:
        log.warning("Globus Auth's id_token could not be read (%s); whose tokens these are is unknown", err)
        return None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        return None
    username = claims.get("preferred_username")
    linked = tuple(
        str(entry["sub"]) for entry in claims.get("identity_set") or []
        if isinstance(entry, dict) and entry.get("sub") and entry.get("sub") != sub
    )
    return Credentials(IDENTITY, sub, username if isinstance(username, str) else None, linked)


def from_listing(listing: MyGroups) -> Credentials | None:
    """Whose tokens a run holds, told from its ``my_groups`` listing: the identity whose
    own memberships it lists, when exactly one is (None otherwise).

    For tokens stored by a login made before owners were recorded: such tokens carry
    no identity, and an identity with linked identities may be listed under several.
    """
    found = {(row.identity_id, row.username) for group in listing.mine for row in group.own}
    ids = {identity_id for identity_id, _ in found}
    if len(ids) != 1:
        return None
    identity_id = ids.pop()
    usernames = sorted(username for _, username in found if username)
    return Credentials(IDENTITY, identity_id, usernames[0] if usernames else None)


def with_username(who: Credentials, listing: MyGroups) -> Credentials:
    """``who`` with its username filled in from its own memberships in the listing."""
    if who.username is not None or who.kind != IDENTITY:
        return who
    for group in listing.mine:
        for row in group.own:
            if row.identity_id == who.id and row.username:
                return who._replace(username=row.username)
    return who
