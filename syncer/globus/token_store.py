"""The token store: Globus tokens in their own SQLite file, never the output database.

``TokenStore`` is a globus-sdk ``TokenStorage`` of syncer's own over one SQLite
connection, in the file layout of the SDK's ``SQLiteTokenStorage`` (table
``token_storage``, one JSON record per namespace and resource server), so stores
written by earlier releases, which used the SDK's class, are read as they are. It is
syncer's own because the SDK's class offers no transaction: a renewal's compare and
write must be one (``TokenStore.save_renewal``), and syncer keeps small tables of its
own beside the tokens. SQLite transactions make every write atomic and crash-safe; a
new file is created user-only (0600) from the start, never chmod-ed afterwards. Tokens
are renewed from whichever worker thread meets an expired one, so the connection is
shared between threads and every use goes through one lock.

A sync writes renewed tokens back only over the grant it renewed: a ``syncer login``
or ``logout`` run meanwhile, in another process, has the last word (see
``TokenStore.save_renewal``).

The store remembers which Globus Auth issued its tokens (the Auth URL the SDK used,
per namespace, in table ``syncer_token_issuer``), so that tokens the simulator issued
are never sent to the real Globus Auth, nor real tokens to a simulator: a store whose
tokens came from another Auth is reported as such (``ForeignTokens``, exit 77), and a
login replaces them. A store written before the issuer was kept has no record: its
tokens are taken as issued by the Auth that first uses them after the upgrade (the
one it was configured for all along, in every deployment that did not mix the two),
and that Auth is recorded then.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import stat
import threading
import typing as t
from pathlib import Path

import globus_sdk
import globus_sdk.config
from globus_sdk.token_storage import TokenStorage, TokenStorageData

from syncer.errors import LoginRequired, StorageError, SyncerError, os_problem
from syncer.globus.client_secret import ClientSecret, secret_digest
from syncer.logs import module_logger, register_secret

log = module_logger(__name__)

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"

class _Keep:
    """The type of ``_KEEP``: "leave the stored value as it is" (None is a value)."""


_KEEP = _Keep()


def current_auth() -> str:
    """The Globus Auth this process talks to: the URL the SDK uses (honouring
    ``GLOBUS_SDK_SERVICE_URL_AUTH`` and ``GLOBUS_SDK_ENVIRONMENT``)."""
    return str(globus_sdk.config.get_service_url("auth"))


class ForeignTokens(LoginRequired):
    """The stored tokens were issued by another Globus Auth than the one configured now
    (a LoginRequired: ``syncer run`` stops with 77 as for a rejected refresh token)."""

    def __init__(self, path: Path, issuer: str, here: str, advice: str) -> None:
        SyncerError.__init__(
            self,
            f"the tokens in {path} were issued by Globus Auth at {issuer}, not by the one this command"
            f" uses ({here}); they are not sent there. {advice}"
        )


#: the table of the SDK's ``SQLiteTokenStorage`` (globus-sdk 4), as it lays it out
_TOKENS_TABLE = (
    "CREATE TABLE IF NOT EXISTS token_storage (namespace VARCHAR NOT NULL, resource_server VARCHAR NOT NULL,"
    " token_data_json VARCHAR NOT NULL, PRIMARY KEY (namespace, resource_server))"
)
# syncer's own tables, each created when first written
_ISSUERS_TABLE = "CREATE TABLE IF NOT EXISTS syncer_token_issuer (namespace TEXT PRIMARY KEY, issuer TEXT NOT NULL)"
_REJECTED_TABLE = "CREATE TABLE IF NOT EXISTS syncer_rejected_grants (grant_sha256 TEXT PRIMARY KEY)"
_DIGESTS_TABLE = (
    "CREATE TABLE IF NOT EXISTS syncer_secret_digests"
    " (namespace TEXT PRIMARY KEY, digest_key BLOB NOT NULL, digest TEXT NOT NULL)"
)


class TokenStore(TokenStorage):
    """Thread-safe access to the tokens syncer keeps for Globus Groups.

    ``namespace`` separates token sets in one file: a login's tokens live in the
    SDK's default namespace, a confidential client's cached tokens in their own.
    """

    def __init__(self, path: Path, namespace: str = "DEFAULT") -> None:
        super().__init__(namespace=namespace)
        self.path = path
        self._lock = threading.RLock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if path.exists():
                self._warn_if_exposed()
            else:  # user-only from the start (SQLite gives its journal files the same mode)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            # autocommit: every transaction is explicit (see _transaction)
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=15, isolation_level=None)
        except OSError as err:
            raise StorageError(f"{path}: cannot open token store: {os_problem(path, err)}") from None
        except sqlite3.DatabaseError as err:
            raise StorageError(f"{path}: cannot open token store: {err}") from None
        try:
            if path.stat().st_size == 0:  # a new file; tables are never added to another SQLite file
                self._db.execute(_TOKENS_TABLE)
            # touch the table so a file that is not a token store fails here, clearly
            self._db.execute("SELECT 1 FROM token_storage LIMIT 1").fetchall()
        except (OSError, sqlite3.DatabaseError) as err:
            self._db.close()
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
            self._db.close()

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> t.Iterator[sqlite3.Connection]:
        """One write transaction for the block, committed at its end, rolled back if it
        raises. ``BEGIN IMMEDIATE`` takes the file's write lock at once, so what the block
        reads cannot change before it writes. A block inside another joins it."""
        with self._lock:
            if self._db.in_transaction:
                yield self._db
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:  # SQLite may have ended it already (a full disk)
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.DatabaseError as err:
                raise StorageError(f"{self.path}: token store error: {err}") from None

    def _rows(self, sql: str, params: t.Sequence[t.Any], optional_table: bool = False) -> list[t.Any]:
        """A query's rows. ``optional_table``: one of syncer's tables, which a store that
        never needed it does not have (read as empty)."""
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.OperationalError as err:
                if optional_table:
                    return []
                raise StorageError(f"{self.path}: token store error: {err}") from None
            except sqlite3.DatabaseError as err:
                raise StorageError(f"{self.path}: token store error: {err}") from None

    # -- the SDK's TokenStorage interface

    def get_token_data_by_resource_server(self) -> dict[str, TokenStorageData]:
        rows = self._rows(
            "SELECT resource_server, token_data_json FROM token_storage WHERE namespace = ?", [self.namespace]
        )
        return {server: TokenStorageData.from_dict(json.loads(text)) for server, text in rows}

    def store_token_data_by_resource_server(self, token_data_by_resource_server: t.Mapping[str, TokenStorageData]) -> None:
        with self._transaction() as db:
            db.executemany(
                "REPLACE INTO token_storage (namespace, resource_server, token_data_json) VALUES (?, ?, ?)",
                [(self.namespace, server, json.dumps(data.to_dict())) for server, data in token_data_by_resource_server.items()],
            )

    def remove_token_data(self, resource_server: str) -> bool:
        with self._transaction() as db:
            deleted = db.execute(
                "DELETE FROM token_storage WHERE namespace = ? AND resource_server = ?", [self.namespace, resource_server]
            )
            return deleted.rowcount > 0

    # -- syncer's

    def groups_tokens(self) -> TokenStorageData | None:
        """The stored token data for Globus Groups, if any."""
        return self.all_tokens().get(GROUPS_RESOURCE_SERVER)

    def all_tokens(self) -> dict[str, TokenStorageData]:
        """Every stored token, by resource server (token values become log-redacted)."""
        tokens = self.get_token_data_by_resource_server()
        _keep_out_of_logs(tokens.values())
        return tokens

    def issuer(self) -> str | None:
        """The Globus Auth that issued this namespace's tokens (None: not recorded)."""
        rows = self._rows(
            "SELECT issuer FROM syncer_token_issuer WHERE namespace = ?", [self.namespace], optional_table=True
        )
        return str(rows[0][0]) if rows else None

    def issued_here(self) -> bool:
        """Whether the stored tokens (if any) may be sent to the Auth this process uses.

        A store with tokens but no recorded issuer (from an older syncer) is adopted by
        the first Auth that uses it: that Auth is recorded now.
        """
        with self._lock:
            issuer = self.issuer()
            if issuer is None:
                if self.all_tokens():
                    self._record_issuer(current_auth())
                return True
            return issuer == current_auth()

    def check_issuer(self, advice: str = "Run `syncer login` to log in to this one.") -> None:
        """Raise ForeignTokens (77) when the stored tokens came from another Globus Auth."""
        if not self.issued_here():
            raise ForeignTokens(self.path, self.issuer() or "?", current_auth(), advice)

    def _record_issuer(self, issuer: str) -> None:
        with self._transaction() as db:
            db.execute(_ISSUERS_TABLE)
            db.execute("INSERT OR REPLACE INTO syncer_token_issuer VALUES (?, ?)", [self.namespace, issuer])

    def save(self, response: globus_sdk.OAuthTokenResponse, identity_id: str | _Keep | None = _KEEP) -> None:
        """Store every token in a login or refresh response, all in one transaction.

        A refresh response that omits the refresh token keeps the stored one.
        ``identity_id``: whose tokens these are (a login says, from its ``id_token``;
        see ``syncer.storage.ownership``); a renewal leaves it out and keeps the stored one.
        Tokens another Globus Auth issued are dropped first: the response came from the
        Auth this process uses, which is recorded as the issuer.
        """
        with self._transaction():
            here, issuer = current_auth(), self.issuer()
            if issuer != here:
                if issuer is not None:
                    self.clear()
                self._record_issuer(here)
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
            self.store_token_data_by_resource_server(data)

    def save_renewal(self, response: globus_sdk.OAuthTokenResponse, renewed_from: str) -> bool:
        """Store a refresh's tokens, unless the stored grant is no longer the one renewed.

        ``renewed_from`` is the refresh token the refresh used. A ``syncer login
        --force`` or ``logout`` may have run while a sync was using the tokens it read
        at its start: writing the renewal back then would put the old grant (perhaps
        another identity's) over the new login, or tokens back after a logout. The
        compare and the write are one transaction holding the file's write lock, so no
        other process writes in between. Returns whether the tokens were stored.
        """
        with self._transaction():
            stored = self.groups_tokens()
            if stored is None or stored.refresh_token != renewed_from:
                return False
            self.save(response)
        return True

    def mark_rejected(self, refresh_token: str) -> None:
        """Remember that Globus Auth refused this refresh token (``invalid_grant``).

        The tokens stay (a ``syncer login`` replaces them), but ``status`` can tell
        from the store as it is whether a login is needed now: a new login stores a
        new refresh token, which is not marked. Only a hash is kept.
        """
        with contextlib.suppress(StorageError), self._transaction() as db:
            db.execute(_REJECTED_TABLE)
            db.execute("INSERT OR IGNORE INTO syncer_rejected_grants VALUES (?)", [_digest(refresh_token)])

    def is_rejected(self, refresh_token: str) -> bool:
        """Whether Globus Auth refused this refresh token (see ``mark_rejected``)."""
        return bool(self._rows(
            "SELECT 1 FROM syncer_rejected_grants WHERE grant_sha256 = ?", [_digest(refresh_token)], optional_table=True
        ))

    def issued_for(self, secret: ClientSecret) -> bool:
        """Whether the cached tokens were issued for this client secret (see ``save_issued_for``).

        False when no secret is recorded (tokens cached by an older release): a new
        token is cheap, using one with the wrong secret hides a bad rotation until it
        expires.
        """
        rows = self._rows(
            "SELECT digest_key, digest FROM syncer_secret_digests WHERE namespace = ?", [self.namespace],
            optional_table=True,
        )
        return bool(rows) and hmac.compare_digest(secret_digest(secret, rows[0][0]), rows[0][1])

    def save_issued_for(self, response: globus_sdk.OAuthTokenResponse, secret: ClientSecret) -> None:
        """Store a client-credentials response with a keyed digest of the secret it was
        issued for (never the secret), in one transaction: the tokens and the secret
        they are bound to change together."""
        key = secrets.token_bytes(32)
        with self._transaction() as db:
            self.save(response)
            db.execute(_DIGESTS_TABLE)
            db.execute(
                "INSERT OR REPLACE INTO syncer_secret_digests (namespace, digest_key, digest) VALUES (?, ?, ?)",
                [self.namespace, key, secret_digest(secret, key)],
            )

    def clear(self) -> None:
        """Delete every stored token of this namespace."""
        with self._transaction() as db:
            db.execute("DELETE FROM token_storage WHERE namespace = ?", [self.namespace])


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _keep_out_of_logs(tokens: t.Iterable[TokenStorageData]) -> None:
    for data in tokens:
        register_secret(data.access_token)
        register_secret(data.refresh_token)
