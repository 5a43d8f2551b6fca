"""Configuration: where it is found, what keys it has, and how each is checked.

Search order: ``--config``, ``$SYNCER_CONFIG``, ``$CONFIGURATION_DIRECTORY/syncer.toml``
(systemd), ``~/.config/syncer/syncer.toml`` if present, else built-in defaults. Every
key can be overridden by ``SYNCER_<KEY>`` (text; lists comma-separated). Relative paths
resolve against the folder of the file they were written in (the working directory for
environment variables).
Unknown keys and wrong types are errors that name the file and the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import tomllib
import typing as t
import urllib.parse
import uuid
from pathlib import Path

import platformdirs

from syncer.errors import ConfigError

TUTORIAL_CLIENT_ID = "61338d24-54d5-408f-a10d-66c06b59f6d2"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
#: the two ways a scope of the Globus Groups API is written (URN, and the URL form)
_GROUPS_SCOPE_PREFIXES = ("urn:globus:auth:scope:groups.api.globus.org:", "https://auth.globus.org/scopes/groups.api.globus.org/")
MEMBERSHIP_STATUSES = ("active", "invited", "pending", "rejected", "removed", "left", "declined")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_BARE_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: the longest duration accepted: far beyond any sensible interval, far below what
#: overflows the scheduler's datetime arithmetic (year 9999)
MAX_DURATION_S = 365 * 86400.0
#: SQLite takes its busy timeout in milliseconds as a C int (up to ~24.8 days); beyond, it silently becomes 0
_SQLITE_MAX_BUSY_S = 24 * 86400


def parse_duration(text: str) -> float:
    """Parse ``"15m"``, ``"90s"``, ``"1h30m"`` (up to 365 days) into seconds.

    Every part needs its unit: a bare ``15`` was once taken as seconds, and a user who
    meant minutes polled Globus sixty times as often as intended.
    """
    text = text.strip().lower()
    if _BARE_NUMBER.fullmatch(text):
        raise ValueError(f"{text!r} has no unit: write e.g. \"{text}s\", \"{text}m\" or \"{text}h\"")
    # parts are matched one by one, not float(): that also takes "inf", "nan", "1e400" and "1_000"
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 15m, 1h)")
    return _bounded_seconds(total, repr(text))


def _bounded_seconds(seconds: float, shown: str) -> float:
    """Return ``seconds`` if it is a number no longer than MAX_DURATION_S, else raise ValueError."""
    if math.isnan(seconds):
        raise ValueError(f"not a duration: {shown}")
    if seconds > MAX_DURATION_S:  # also inf, which float() makes of a long run of digits
        raise ValueError(f"too long: {shown} (at most 365d)")
    return seconds


def _state_dir() -> Path:
    # systemd may pass several colon-separated folders; the first is ours
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0])
    return Path(platformdirs.user_data_dir("syncer", appauthor=False))


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated settings; every field has a working default."""

    client_id: str = TUTORIAL_CLIENT_ID
    scopes: tuple[str, ...] = (GROUPS_SCOPE,)
    database: Path = dataclasses.field(default_factory=lambda: _state_dir() / "groups.db")
    token_storage: Path = dataclasses.field(default_factory=lambda: _state_dir() / "tokens.db")
    interval: float = 15 * 60
    jitter: float = 0.0
    concurrency: int = 8
    groups: tuple[str, ...] = ()
    my_statuses: tuple[str, ...] = ("active",)
    http_timeout: float = 30.0
    busy_timeout: float = 30.0
    #: a confidential client's secret (see syncer.client_credentials for the other sources)
    client_secret_file: Path | None = None
    healthcheck_url: str | None = None
    metrics_file: Path | None = None
    metrics_file_mode: int = 0o644
    hooks: tuple[HookConfig, ...] = ()
    #: where the settings came from, for messages (None: built-in defaults only)
    source: Path | None = None

    @property
    def uses_tutorial_client(self) -> bool:
        return self.client_id == TUTORIAL_CLIENT_ID

    @property
    def lock_path(self) -> Path:
        """The lock file that serializes syncs on one database."""
        return self.database.with_name(self.database.name + ".lock")


class _Key(t.NamedTuple):
    kind: str  # str | strlist | path | duration | int | uuid | uuidlist | statuslist | url | mode
    check: t.Callable[[t.Any], str | None] | None = None


def _positive(value: t.Any) -> str | None:
    return None if value > 0 else "must be greater than zero"


def _not_negative(value: t.Any) -> str | None:
    return None if value >= 0 else "must not be negative"


def is_groups_scope(scope: str) -> bool:
    """Whether ``scope`` is a scope of the Globus Groups API."""
    return scope.startswith(_GROUPS_SCOPE_PREFIXES)


def _groups_scope_problem(scopes: t.Any) -> str | None:
    """Without a Groups scope Globus issues no token syncer can use: say so before a login."""
    if any(is_groups_scope(scope) for scope in scopes):
        return None
    return f'must include a Globus Groups scope, e.g. "{GROUPS_SCOPE}"'


def _sqlite_busy_timeout(value: t.Any) -> str | None:
    return _not_negative(value) or (None if value <= _SQLITE_MAX_BUSY_S else "must be at most 24d (SQLite's limit)")


_KEYS: dict[str, _Key] = {
    "client_id": _Key("uuid"),
    "scopes": _Key("strlist", _groups_scope_problem),
    "database": _Key("path"),
    "token_storage": _Key("path"),
    "interval": _Key("duration", _positive),
    "jitter": _Key("duration", _not_negative),
    "concurrency": _Key("int", lambda v: None if 1 <= v <= 64 else "must be between 1 and 64"),
    "groups": _Key("uuidlist"),
    "my_statuses": _Key("statuslist", lambda v: None if v else "must list at least one status"),
    "http_timeout": _Key("duration", _positive),
    "busy_timeout": _Key("duration", _sqlite_busy_timeout),
    "client_secret_file": _Key("path"),
    "healthcheck_url": _Key("url"),
    "metrics_file": _Key("path"),
    "metrics_file_mode": _Key("mode"),
}


def _convert(kind: str, value: t.Any, base: Path, from_text: bool) -> t.Any:
    """Turn a TOML value, or an environment variable's text, into the field's type; else raise ValueError.

    Only text (``from_text``) is read as a number or a comma-separated list: a TOML
    file has types of its own, and a wrong one there is an error.
    """
    if kind in ("strlist", "uuidlist", "statuslist"):
        if from_text:
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("must be a list of strings")
        if kind == "uuidlist":
            return tuple(str(uuid.UUID(v)) for v in value)
        if kind == "statuslist":
            bad = [v for v in value if v not in MEMBERSHIP_STATUSES]
            if bad:
                raise ValueError(f"unknown status {bad[0]!r} (one of {', '.join(MEMBERSHIP_STATUSES)})")
        return tuple(value)
    if kind == "duration":
        if isinstance(value, str):
            return parse_duration(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a duration such as \"30s\", \"15m\" or \"1h\"")
        if not math.isfinite(value):
            raise ValueError("must be a duration such as \"30s\", \"15m\" or \"1h\"")
        # a TOML number: no unit, so no way to tell seconds from minutes
        raise ValueError(f"a bare number ({value}) has no unit: write it in quotes with one, e.g. \"{value}s\" or \"{value}m\"")
    if kind == "mode":
        return _file_mode(value)
    if kind == "int":
        if from_text:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be a whole number")
        return value
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    if kind == "uuid":
        return str(uuid.UUID(value))
    if kind == "url":
        return _http_url(value)
    if kind == "path":
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    return value


def find_config_file(explicit: str | os.PathLike[str] | None) -> Path | None:
    """Return the configuration file to read, following the documented search order."""
    if explicit:
        return Path(explicit)
    if os.environ.get("SYNCER_CONFIG"):
        return Path(os.environ["SYNCER_CONFIG"])
    if os.environ.get("CONFIGURATION_DIRECTORY"):
        return Path(os.environ["CONFIGURATION_DIRECTORY"].split(":")[0]) / "syncer.toml"
    user_file = Path(platformdirs.user_config_dir("syncer", appauthor=False)) / "syncer.toml"
    return user_file if user_file.is_file() else None


def _read_toml(path: Path) -> dict[str, t.Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: configuration file is not readable (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a configuration file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text") from None


def load_config(explicit: str | os.PathLike[str] | None = None) -> Config:
    """Find, read and validate the configuration; raise ConfigError naming file and key."""
    path = find_config_file(explicit)
    values: dict[str, t.Any] = {}
    if path is not None:
        path = path.expanduser().absolute()
        for key, raw in _read_toml(path).items():
            if key == "hooks":
                values[key] = _hooks(raw, path)
                continue
            spec = _KEYS.get(key)
            if spec is None:
                raise ConfigError(f"{path}: unknown key {key!r} (known keys: {', '.join(_KEYS)}, hooks)")
            values[key] = _checked(spec, raw, path.parent, f"{path}: key {key!r}", from_text=False)
    for key, spec in _KEYS.items():
        env_name = f"SYNCER_{key.upper()}"
        if env_name in os.environ:
            where = f"environment variable {env_name}"
            values[key] = _checked(spec, os.environ[env_name], Path.cwd(), where, from_text=True)
    config = Config(source=path, **values)
    _check_separate_files(config)
    return config


def _check_separate_files(config: Config) -> None:
    """The token store is never the database (nor a link to it): readers of the database
    would read the tokens, and each file's writes would trample the other's."""
    same = config.token_storage.resolve() == config.database.resolve()
    if not same:
        # also a hard link; a reader who may not look into the token store's folder cannot
        # tell, and need not: only a run, which may, writes either file
        with contextlib.suppress(OSError):
            same = os.path.samefile(config.token_storage, config.database)
    if same:
        where = f"{config.source}: key 'token_storage'" if config.source else "token_storage"
        raise ConfigError(f"{where}: {config.token_storage} is the database's file ({config.database});"
                          " the token store needs a file of its own")


def _checked(spec: _Key, raw: t.Any, base: Path, where: str, *, from_text: bool) -> t.Any:
    try:
        value = _convert(spec.kind, raw, base, from_text)
    except ValueError as err:
        reason = str(err) if spec.kind not in ("uuid", "uuidlist", "int") else _type_hint(spec.kind)
        raise ConfigError(f"{where}: {reason}") from None
    problem = spec.check(value) if spec.check else None
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return value


def _type_hint(kind: str) -> str:
    return {
        "uuid": "must be a Globus client ID (a UUID)",
        "uuidlist": "must be a list of group IDs (UUIDs)",
        "int": "must be a whole number",
    }[kind]


# ---------------------------------------------------------------- URLs, file modes, hooks

#: a hook's name: it appears in a header, an environment variable and a metric label
_HOOK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: the longest a hook may take: a hook runs between snapshots and holds up the next one
MAX_HOOK_TIMEOUT_S = 3600.0
_HOOK_KEYS = ("name", "command", "url", "timeout", "groups", "observations")


@dataclasses.dataclass(frozen=True)
class HookConfig:
    """One ``[[hooks]]`` table: where a run's changes are sent, and which of them."""

    name: str
    #: argv of a command that gets the changes as JSON lines on stdin (or None)
    command: tuple[str, ...] | None = None
    #: a URL that gets them as one JSON POST (or None); exactly one of command and url is set
    url: str | None = None
    timeout: float = 60.0
    #: only changes in these groups; empty: every group
    groups: tuple[str, ...] = ()
    #: also observations (first_seen, hidden, group_gone), not only events
    observations: bool = False


def _http_url(value: str) -> str:
    """``value`` if it is an absolute http(s) URL with a host, else raise ValueError."""
    problem = "must be an http:// or https:// URL"
    if any(ch.isspace() for ch in value):
        raise ValueError(f"{problem} without spaces")
    try:
        parts = urllib.parse.urlsplit(value)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        raise ValueError(problem) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(problem)
    return value


def _file_mode(value: t.Any) -> int:
    """A file mode written as octal digits in a string (``"0640"``)."""
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value.strip()):
        raise ValueError('must be a file mode as octal digits in quotes, e.g. "0644"')
    return int(value.strip(), 8)


def _hooks(raw: t.Any, path: Path) -> tuple[HookConfig, ...]:
    """The ``[[hooks]]`` tables, checked; raise ConfigError naming the table and its key."""
    if not isinstance(raw, list) or not all(isinstance(table, dict) for table in raw):
        raise ConfigError(f"{path}: key 'hooks': must be [[hooks]] tables")
    hooks: list[HookConfig] = []
    for number, table in enumerate(raw, start=1):
        hook = _hook(table, path, number)
        same = next((i for i, other in enumerate(hooks, start=1) if other.name == hook.name), None)
        if same:
            where = f"{path}: [[hooks]] #{number} ({hook.name!r}), key 'name'"
            raise ConfigError(f"{where}: hook #{same} has that name; names must be unique")
        hooks.append(hook)
    return tuple(hooks)


def _hook(table: dict[str, t.Any], path: Path, number: int) -> HookConfig:
    def where(key: str) -> str:
        named = f" ({table['name']!r})" if isinstance(table.get("name"), str) else ""
        return f"{path}: [[hooks]] #{number}{named}, key {key!r}"

    for key in table:
        if key not in _HOOK_KEYS:
            raise ConfigError(f"{where(key)}: unknown key (known keys: {', '.join(_HOOK_KEYS)})")
    name = table.get("name")
    if not isinstance(name, str) or not _HOOK_NAME.fullmatch(name):
        raise ConfigError(f"{where('name')}: required; letters, digits, '.', '_' and '-', at most 64 characters")
    if ("command" in table) == ("url" in table):
        raise ConfigError(f"{where('command')}: a hook needs exactly one of 'command' and 'url'")
    settings: dict[str, t.Any] = {"name": name}
    if "command" in table:
        settings["command"] = _hook_command(table["command"], path.parent, where("command"))
    if "url" in table:
        settings["url"] = _checked(_Key("url"), table["url"], path.parent, where("url"), from_text=False)
    if "timeout" in table:
        timeout = _Key("duration", _hook_timeout)
        settings["timeout"] = _checked(timeout, table["timeout"], path.parent, where("timeout"), from_text=False)
    if "groups" in table:
        settings["groups"] = _checked(_Key("uuidlist"), table["groups"], path.parent, where("groups"), from_text=False)
    if "observations" in table:
        if not isinstance(table["observations"], bool):
            raise ConfigError(f"{where('observations')}: must be true or false")
        settings["observations"] = table["observations"]
    return HookConfig(**settings)


def _hook_command(value: t.Any, base: Path, where: str) -> tuple[str, ...]:
    """An argv list; a relative program path (one with a slash) resolves against the config's folder."""
    if not isinstance(value, list) or not value or not all(isinstance(arg, str) and arg for arg in value):
        raise ConfigError(f"{where}: must be a list of non-empty strings: the program and its arguments")
    program = Path(value[0]).expanduser()
    if "/" in value[0] and not program.is_absolute():
        program = base / program
    return (str(program) if "/" in value[0] else value[0], *value[1:])


def _hook_timeout(value: t.Any) -> str | None:
    if not 0 < value <= MAX_HOOK_TIMEOUT_S:
        return "must be more than 0 and at most 1h"
    return None
