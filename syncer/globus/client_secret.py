"""Where a confidential client's secret comes from, read without ever showing it.

Sources, first found wins: ``$SYNCER_CLIENT_SECRET``, the ``client_secret_file`` key,
then systemd's ``$CREDENTIALS_DIRECTORY/client_secret`` (``LoadCredential=``). With a
secret, every run uses client credentials and no login is needed. The value is
registered with the log redactor as soon as it is read, and messages name only the
source.

A secret file (the ``client_secret_file`` key) that group or others may read or
write is refused (exit 78), as ssh refuses such a private key: a secret others can
read is no longer the client's alone. systemd's credential is not checked this way:
systemd keeps it in a directory only the service's user can enter, and may grant
that user access with an ACL, which shows in the group bits.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import typing as t
from pathlib import Path

from syncer.config import Config
from syncer.errors import ConfigError
from syncer.logs import register_secret

SECRET_ENV = "SYNCER_CLIENT_SECRET"
CREDENTIAL_NAME = "client_secret"


class ClientSecret(t.NamedTuple):
    """A secret and, for messages, where it came from."""

    value: str
    source: str

    def __repr__(self) -> str:  # never the value, even in a debugger or a traceback
        return f"ClientSecret(source={self.source!r})"


class _Where(t.NamedTuple):
    source: str
    path: Path | None  # None: the value is in the environment variable


def _where(config: Config) -> _Where | None:
    if os.environ.get(SECRET_ENV):
        return _Where(f"environment variable {SECRET_ENV}", None)
    if config.client_secret_file is not None:
        where = f" in {config.source}" if config.source else ""
        return _Where(f"{config.client_secret_file} (key 'client_secret_file'{where})", config.client_secret_file)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL_NAME).exists():
        path = Path(credentials) / CREDENTIAL_NAME
        return _Where(f"{path} (systemd credential {CREDENTIAL_NAME})", path)
    return None


def secret_source(config: Config) -> str | None:
    """Where the secret would be read from, without reading it (for ``status``)."""
    where = _where(config)
    return where.source if where else None


def load_client_secret(config: Config) -> ClientSecret | None:
    """The configured secret, or None for a native app (login with refresh tokens)."""
    where = _where(config)
    if where is None:
        return None
    private = where.path == config.client_secret_file  # systemd's credential: see the module's docstring
    value = os.environ[SECRET_ENV] if where.path is None else _read_file(where, private)
    value = value.strip()
    if not value:
        raise ConfigError(f"{where.source}: the client secret is empty")
    register_secret(value)
    return ClientSecret(value, where.source)


def _read_file(where: _Where, private: bool) -> str:
    """The file's text; with ``private``, only if no one but its owner may read or write it
    (checked on the open file, so a file swapped in between is not read unchecked)."""
    assert where.path is not None
    try:
        with open(where.path, encoding="utf-8") as handle:
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
            if private and mode & 0o077:
                raise ConfigError(
                    f"{where.source}: the client secret file may be read or written by group or others"
                    f" (mode {mode:04o}); run: chmod 600 {where.path}"
                )
            return handle.read()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        raise ConfigError(f"{where.source}: cannot read the client secret: {reason}") from None


def secret_digest(secret: ClientSecret, key: bytes) -> str:
    """A keyed digest (HMAC-SHA256) of the secret: what the token store keeps to tell
    which secret its cached token was issued for, without keeping the secret. The key
    is random per token store, so the digest cannot be checked against guesses
    elsewhere."""
    return hmac.new(key, secret.value.encode(), hashlib.sha256).hexdigest()
