"""The token store: Globus tokens in their own SQLite file, never the output database.

Built on the SDK's ``SQLiteTokenStorage``: SQLite transactions make every write atomic
and crash-safe, and the SDK creates a new file under a user-only umask (0600 from the
start, never chmod-ed afterwards). The SDK opens one connection with
``check_same_thread=True``; tokens here are renewed from whichever worker thread meets
an expired token, so the connection is opened shareable and every use goes through one
lock instead.

A sync writes renewed tokens back only over the grant it renewed: a ``syncer login``
or ``logout`` run meanwhile, in another process, has the last word (see
``TokenStore.save_renewal``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import sqlite3
import stat
import threading
import typing as t
from pathlib import Path

import globus_sdk
from globus_sdk.token_storage import SQLiteTokenStorage, TokenStorageData

from syncer.errors import StorageError
from syncer.logs import register_secret

log = logging.getLogger(__name__)

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"

_T = t.TypeVar("_T")


class _Keep:
    """The type of ``_KEEP``: "leave the stored value as it is" (None is a value)."""


_KEEP = _Keep()


class _Storage(SQLiteTokenStorage):
    """The SDK's SQLite storage, plus a way to read and write in one transaction."""

    @contextlib.contextmanager
    def write_locked(self) -> t.Iterator[None]:
        """Hold the file's write lock (``BEGIN IMMEDIATE``) for the block, then commit;
        roll back if it raises. The SDK's own statements inside join the transaction,
        and its commit ends it early, so the block must end with at most one write."""
        connection = self._connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            connection.rollback()
            raise
        connection.commit()


class TokenStore:
    """Thread-safe access to the tokens syncer keeps for Globus Groups.

    ``namespace`` separates token sets in one file: a login's tokens live in the
    SDK's default namespace, a confidential client's cached tokens in their own.
    """

    def __init__(self, path: Path, namespace: str = "DEFAULT") -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if path.exists():
                self._warn_if_exposed()
            self._storage = _Storage(
                path, connect_params={"check_same_thread": False, "timeout": 15}, namespace=namespace
            )
            # touch the table so a file that is not a token store fails here, clearly
            self._storage.get_token_data_by_resource_server()
        except (sqlite3.DatabaseError, OSError) as err:
            raise StorageError(f"{path}: cannot open token store: {err}") from None

    def _warn_if_exposed(self) -> None:
        mode = stat.S_IMODE(self.path.stat().st_mode)
        if mode & 0o077:
            log.warning(
                "token store %s is readable by others (mode %o); run: chmod 600 %s",
                self.path, mode, self.path,
            )

    def close(self) -> None:
        with self._lock:
            self._storage.close()

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def groups_tokens(self) -> TokenStorageData | None:
        """The stored token data for Globus Groups, if any."""
        return self.all_tokens().get(GROUPS_RESOURCE_SERVER)

    def all_tokens(self) -> dict[str, TokenStorageData]:
        """Every stored token, by resource server (token values become log-redacted)."""
        with self._lock:
            tokens = self._call(lambda s: s.get_token_data_by_resource_server())
        _keep_out_of_logs(tokens.values())
        return tokens

    def save(self, response: globus_sdk.OAuthTokenResponse, identity_id: str | _Keep | None = _KEEP) -> None:
        """Store every token in a login or refresh response, all in one transaction.

        A refresh response that omits the refresh token keeps the stored one.
        ``identity_id``: whose tokens these are (a login says, from its ``id_token``;
        see ``syncer.ownership``); a renewal leaves it out and keeps the stored one.
        """
        with self._lock:
            previous = self.all_tokens()
            data: dict[str, TokenStorageData] = {}
            for resource_server, token in response.by_resource_server.items():
                old = previous.get(resource_server)
                data[resource_server] = TokenStorageData(
                    resource_server=resource_server,
                    identity_id=(old.identity_id if old else None) if isinstance(identity_id, _Keep) else identity_id,
                    scope=token["scope"],
                    access_token=token["access_token"],
                    refresh_token=token.get("refresh_token") or (old.refresh_token if old else None),
                    expires_at_seconds=token["expires_at_seconds"],
                    token_type=token.get("token_type"),
                )
            _keep_out_of_logs(data.values())
            self._call(lambda s: s.store_token_data_by_resource_server(data))

    def save_renewal(self, response: globus_sdk.OAuthTokenResponse, renewed_from: str) -> bool:
        """Store a refresh's tokens, unless the stored grant is no longer the one renewed.

        ``renewed_from`` is the refresh token the refresh used. A ``syncer login
        --force`` or ``logout`` may have run while a sync was using the tokens it read
        at its start: writing the renewal back then would put the old grant (perhaps
        another identity's) over the new login, or tokens back after a logout. The
        compare and the write hold the file's write lock together, so no other process
        writes in between. Returns whether the tokens were stored.
        """
        with self._lock:
            try:
                with self._storage.write_locked():
                    stored = self.groups_tokens()
                    if stored is None or stored.refresh_token != renewed_from:
                        return False
                    self.save(response)
            except sqlite3.DatabaseError as err:
                raise StorageError(f"{self.path}: token store error: {err}") from None
            return True

    def mark_rejected(self, refresh_token: str) -> None:
        """Remember that Globus Auth refused this refresh token (``invalid_grant``).

        The tokens stay (a ``syncer login`` replaces them), but ``status`` can tell
        from the store as it is whether a login is needed now: a new login stores a
        new refresh token, which is not marked. Only a hash is kept.
        """
        with self._lock, contextlib.suppress(sqlite3.DatabaseError):
            connection = self._storage._connection
            connection.execute(
                "CREATE TABLE IF NOT EXISTS syncer_rejected_grants (grant_sha256 TEXT PRIMARY KEY)"
            )
            connection.execute("INSERT OR IGNORE INTO syncer_rejected_grants VALUES (?)", [_digest(refresh_token)])
            connection.commit()

    def is_rejected(self, refresh_token: str) -> bool:
        """Whether Globus Auth refused this refresh token (see ``mark_rejected``)."""
        with self._lock:
            try:
                row = self._storage._connection.execute(
                    "SELECT 1 FROM syncer_rejected_grants WHERE grant_sha256 = ?", [_digest(refresh_token)]
                ).fetchone()
            except sqlite3.OperationalError:  # no table: nothing was ever refused
                return False
            return row is not None

    def clear(self) -> None:
        """Delete every stored token (one transaction per resource server)."""
        with self._lock:
            for resource_server in self.all_tokens():
                self._call(functools.partial(SQLiteTokenStorage.remove_token_data, resource_server=resource_server))

    def _call(self, fn: t.Callable[[SQLiteTokenStorage], _T]) -> _T:
        try:
            return fn(self._storage)
        except sqlite3.DatabaseError as err:
            raise StorageError(f"{self.path}: token store error: {err}") from None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _keep_out_of_logs(tokens: t.Iterable[TokenStorageData]) -> None:
    for data in tokens:
        register_secret(data.access_token)
        register_secret(data.refresh_token)
