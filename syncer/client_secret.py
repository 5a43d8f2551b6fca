"""Where a confidential client's secret comes from, read without ever showing it.

Sources, first found wins: ``$SYNCER_CLIENT_SECRET``, the ``client_secret_file`` key,
then systemd's ``$CREDENTIALS_DIRECTORY/client_secret`` (``LoadCredential=``). With a
secret, every run uses client credentials and no login is needed. The value is
registered with the log redactor as soon as it is read, and messages name only the
source.
"""

from __future__ import annotations

import os
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
    if where.path is None:
        value = os.environ[SECRET_ENV]
    else:
        try:
            value = where.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
            raise ConfigError(f"{where.source}: cannot read the client secret: {reason}") from None
    value = value.strip()
    if not value:
        raise ConfigError(f"{where.source}: the client secret is empty")
    register_secret(value)
    return ClientSecret(value, where.source)
