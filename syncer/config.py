"""Configuration: where it is found, what keys it has, and how each is checked.

Search order: ``--config``, ``$SYNCER_CONFIG``, ``$CONFIGURATION_DIRECTORY/syncer.toml``
(systemd), ``~/.config/syncer/syncer.toml`` if present, else built-in defaults. Every
key can be overridden by ``SYNCER_<KEY>`` (text; lists comma-separated). Relative paths
resolve against the folder of the file they were written in (the working directory for
environment variables).

Every key is declared once, in :data:`SETTINGS` and :data:`HOOK_SETTINGS` (type,
default, description, check): the loader, the environment overrides, the defaults of
:class:`Config`, the sample ``config/syncer.toml`` and the tables of
``docs/configuration.md`` all come from there. ``python -m syncer.config --write``
regenerates the two files after a change (a test fails while they differ).

Every problem of a file is collected, not only the first: :class:`ConfigProblems`
carries one line per problem, each naming the file (or the variable) and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import textwrap
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


#: the identity's own statuses with which Globus shows it a group (its document and
#: listing); a group where it has left, was removed or declined is not shown (403)
MY_STATUSES = ("active", "invited", "pending")


def _my_statuses_problem(statuses: t.Any) -> str | None:
    if not statuses:
        return "must list at least one status"
    unseen = [status for status in statuses if status not in MY_STATUSES]
    if unseen:
        return (
            f"{unseen[0]!r} is not allowed: Globus shows a group only to an identity that is"
            f" {', '.join(MY_STATUSES)} in it (must be some of those)"
        )
    return None


def _sqlite_busy_timeout(value: t.Any) -> str | None:
    return _not_negative(value) or (None if value <= _SQLITE_MAX_BUSY_S else "must be at most 24d (SQLite's limit)")


#: the longest a hook may take: a hook runs between snapshots and holds up the next one
MAX_HOOK_TIMEOUT_S = 3600.0


def _hook_timeout(value: t.Any) -> str | None:
    if not 0 < value <= MAX_HOOK_TIMEOUT_S:
        return "must be more than 0 and at most 1h"
    return None


#: the types a key can have; each is read by _convert and shown by _KIND_DOC
Kind = t.Literal["strlist", "path", "duration", "int", "uuid", "uuidlist", "statuslist", "url", "mode", "bool", "argv",
                 "hookname"]


class Setting(t.NamedTuple):
    """One configuration key, declared once.

    The loader reads and checks it with this; :class:`Config` takes its default from
    here; the sample configuration and the reference table in the docs show its
    description, default and example.
    """

    name: str
    kind: Kind
    #: one line of Markdown: the docs table's "meaning", and the sample's comment (links spelled out)
    description: str
    #: the default as TOML writes it (``"15m"``, ``8``, ``["active"]``); None: no default. A
    #: relative path is under the state folder (``$STATE_DIRECTORY``, else the user data folder)
    default: t.Any = None
    #: a further check of the converted value: a reason it is refused, or None
    check: t.Callable[[t.Any], str | None] | None = None
    #: the value the sample shows when it is not the default (a key without one, or a path)
    example: t.Any = None
    #: how the docs show the default, when its TOML value would not say it (Markdown)
    default_doc: str = ""
    #: a ``[[hooks]]`` key every table must have
    required: bool = False


_HOOK_NAME_RULE = "required; letters, digits, '.', '_' and '-', at most 64 characters"
#: what a value of a kind must be, when converting it failed (the converter's own words for the other kinds)
_TYPE_HINTS: dict[str, str] = {
    "uuid": "must be a Globus client ID (a UUID)",
    "uuidlist": "must be a list of group IDs (UUIDs)",
    "int": "must be a whole number",
    "bool": "must be true or false",
    "argv": "must be a list of non-empty strings: the program and its arguments",
    "hookname": _HOOK_NAME_RULE,
}
#: each kind as the docs' tables name it
_KIND_DOC: dict[str, str] = {
    "strlist": "list of strings",
    "path": "path",
    "duration": "[duration](#durations)",
    "int": "whole number",
    "uuid": "client ID (UUID)",
    "uuidlist": "list of group IDs",
    "statuslist": "list of statuses",
    "url": "http(s) URL",
    "mode": "file mode (string)",
    "bool": "true or false",
    "argv": "list of strings",
    "hookname": "string",
}
_EXAMPLE_GROUP = "d3974728-6458-11e4-b72d-123139141556"
_MONITORING = "[Monitoring](operations.md#monitoring)"

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "client_id", "uuid",
        "Globus Auth client: a native app (register your own, \"Register a thick client or script\", at"
        " https://app.globus.org/settings/developers), or a confidential client with a secret"
        " (`client_secret_file`). The default, the Globus tutorial client, works with a warning.",
        default=TUTORIAL_CLIENT_ID,
        default_doc=f"Globus tutorial client `{TUTORIAL_CLIENT_ID}` (warns)",
    ),
    Setting(
        "client_secret_file", "path",
        "File holding a confidential client's secret (mode 0600). With a secret every run uses client credentials"
        " and `syncer login` is not needed; set `client_id` to that client's id. Also taken from"
        " `$SYNCER_CLIENT_SECRET` (first), or from systemd's `$CREDENTIALS_DIRECTORY/client_secret`"
        " (`LoadCredential=client_secret:...`). See"
        " [Service accounts](operations.md#service-accounts-confidential-clients).",
        example="/etc/syncer/client_secret",
    ),
    Setting(
        "scopes", "strlist",
        "Scopes requested at login. Must include a Globus Groups scope (else exit 78 naming the key); reading"
        " memberships needs `view_my_groups_and_memberships` (or `groups.api.globus.org:all`).",
        default=[GROUPS_SCOPE], check=_groups_scope_problem,
    ),
    Setting("database", "path", "The output SQLite database.", default="groups.db", example="/var/lib/syncer/groups.db"),
    Setting(
        "token_storage", "path",
        "The token store: an SQLite file of its own, created with mode 0600, never the database (the same file,"
        " also through a link, is exit 78). It remembers which Globus Auth issued its tokens: see"
        " [The token store](#the-token-store).",
        default="tokens.db", example="/var/lib/syncer/tokens.db",
    ),
    Setting(
        "interval", "duration",
        "Time between snapshots for `syncer run` (at most 365 days). Also sets how old the last success may get"
        " before `syncer status` reports stale (3 intervals).",
        default="15m", check=_positive,
    ),
    Setting(
        "jitter", "duration", "Random delay, up to this much, added to each scheduled snapshot (spreads load).",
        default="0s", check=_not_negative,
    ),
    Setting(
        "concurrency", "int", "Group reads in flight at once (1 to 64); halved while Globus answers 429.",
        default=8, check=lambda v: None if 1 <= v <= 64 else "must be between 1 and 64",
    ),
    Setting(
        "groups", "uuidlist",
        "Only these group IDs; empty means every group the identity belongs to. Groups recorded earlier that the"
        " list leaves out are not read and stay as they were (not recorded as removed, unless they are no"
        " longer yours).",
        default=[], example=[_EXAMPLE_GROUP],
    ),
    Setting(
        "my_statuses", "statuslist",
        "Which of your own membership statuses make a group yours to snapshot: one or more of `active`,"
        " `invited`, `pending` (Globus shows no other group to you, so others are exit 78). Globus shows a"
        " group's members to its active members only: in a group where you are `invited` or `pending`, syncer"
        " records the group (`members_visible` 0) and your own membership.",
        default=["active"], check=_my_statuses_problem,
    ),
    Setting(
        "exclude_groups", "uuidlist",
        "Groups never read, whether `groups` lists them or not (e.g. high-assurance groups an unattended job"
        " cannot log in to): they stay as last recorded, and `syncer status` lists them.",
        default=[], example=[_EXAMPLE_GROUP],
    ),
    Setting(
        "http_timeout", "duration", "Timeout of each HTTP request to Globus; a request is retried at most 3 times.",
        default="30s", check=_positive,
    ),
    Setting(
        "busy_timeout", "duration",
        "How long a sync waits for the database while another process holds a lock on it (another writer, or a"
        " reader's long write) before failing with exit 1. At most 24 days (SQLite's limit).",
        default="30s", check=_sqlite_busy_timeout,
    ),
    Setting(
        "healthcheck_url", "url",
        "Monitoring ping URL, healthchecks.io style (http or https): GET URL/start when a run starts, GET URL"
        " when it ends ok, GET URL/EXIT_CODE otherwise (3, 1, 77). 10 s per run at most; a failed ping is a"
        f" warning. A run that finds the lock busy (75) sends none. See {_MONITORING}.",
        example="https://hc-ping.com/your-check-uuid",
    ),
    Setting(
        "metrics_file", "path",
        "Prometheus text-format file rewritten atomically after every run, for node_exporter's textfile"
        f" collector (`syncer status --format prometheus` prints the same). See {_MONITORING}.",
        example="/var/lib/node_exporter/textfile/syncer.prom",
    ),
    Setting("metrics_file_mode", "mode", "The metrics file's mode, octal digits in quotes.", default="0644"),
)

#: the ``[[hooks]]`` tables, as the docs' table and the sample's comment introduce them
HOOKS_DESCRIPTION = (
    "Commands or URLs that get each run's changes (rows of `membership_changes`), at least once, in run order."
    " A hook added later starts with the next run (`syncer hooks replay NAME --since 7d` sends older ones)."
    " See [Acting on changes: hooks](operations.md#acting-on-changes-hooks)."
)

HOOK_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "name", "hookname",
        "The hook's name, unique: letters, digits, `.`, `_` and `-`, at most 64 characters. Its position in the"
        " runs is kept by name (`syncer status`, `syncer hooks replay NAME`).",
        required=True, default_doc="required",
    ),
    Setting(
        "command", "argv",
        "A program and its arguments (no shell) that gets the changes as JSON lines on stdin; exit status 0"
        " means delivered. A program written with a slash (`./notify`) is in the configuration file's folder,"
        " one without is found in `PATH`. Exactly one of `command` and `url`.",
    ),
    Setting(
        "url", "url",
        "An http or https URL that gets the changes as one JSON POST with the header `Idempotency-Key:"
        " NAME:RUN_ID`; a 2xx answer means delivered. Exactly one of `command` and `url`.",
    ),
    Setting(
        "timeout", "duration",
        "How long one call may take, at most 1h (a command is then killed, with whatever it started).",
        default="60s", check=_hook_timeout,
    ),
    Setting("groups", "uuidlist", "Only changes in these group IDs; empty means every group.", default=[]),
    Setting(
        "observations", "bool",
        "Also the observations (`first_seen`, `hidden`, `group_gone`), not only the events `joined`, `left` and"
        " `changed`.",
        default=False,
    ),
)

_SETTING = {setting.name: setting for setting in SETTINGS}
_HOOK_SETTING = {setting.name: setting for setting in HOOK_SETTINGS}


def _declared(setting: Setting) -> t.Any:
    """``setting``'s default as its field holds it (a relative path: under the state folder)."""
    if setting.default is None:
        return None
    return _convert(setting.kind, setting.default, _state_dir(), from_text=False)


def _default(name: str, settings: dict[str, Setting] = _SETTING) -> t.Callable[[], t.Any]:
    """A field's default factory: the declared default, computed when an instance is made
    (a path's state folder comes from the environment of that moment)."""
    return lambda: _declared(settings[name])


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated settings; every field has a working default, the one declared in SETTINGS."""

    client_id: str = dataclasses.field(default_factory=_default("client_id"))
    scopes: tuple[str, ...] = dataclasses.field(default_factory=_default("scopes"))
    database: Path = dataclasses.field(default_factory=_default("database"))
    token_storage: Path = dataclasses.field(default_factory=_default("token_storage"))
    interval: float = dataclasses.field(default_factory=_default("interval"))
    jitter: float = dataclasses.field(default_factory=_default("jitter"))
    concurrency: int = dataclasses.field(default_factory=_default("concurrency"))
    groups: tuple[str, ...] = dataclasses.field(default_factory=_default("groups"))
    #: groups never read, whether listed in ``groups`` or not (listed in ``status``)
    exclude_groups: tuple[str, ...] = dataclasses.field(default_factory=_default("exclude_groups"))
    my_statuses: tuple[str, ...] = dataclasses.field(default_factory=_default("my_statuses"))
    http_timeout: float = dataclasses.field(default_factory=_default("http_timeout"))
    busy_timeout: float = dataclasses.field(default_factory=_default("busy_timeout"))
    #: a confidential client's secret (see syncer.client_credentials for the other sources)
    client_secret_file: Path | None = dataclasses.field(default_factory=_default("client_secret_file"))
    healthcheck_url: str | None = dataclasses.field(default_factory=_default("healthcheck_url"))
    metrics_file: Path | None = dataclasses.field(default_factory=_default("metrics_file"))
    metrics_file_mode: int = dataclasses.field(default_factory=_default("metrics_file_mode"))
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


@dataclasses.dataclass(frozen=True)
class HookConfig:
    """One ``[[hooks]]`` table: where a run's changes are sent, and which of them."""

    name: str
    #: argv of a command that gets the changes as JSON lines on stdin (or None)
    command: tuple[str, ...] | None = dataclasses.field(default_factory=_default("command", _HOOK_SETTING))
    #: a URL that gets them as one JSON POST (or None); exactly one of command and url is set
    url: str | None = dataclasses.field(default_factory=_default("url", _HOOK_SETTING))
    timeout: float = dataclasses.field(default_factory=_default("timeout", _HOOK_SETTING))
    #: only changes in these groups; empty: every group
    groups: tuple[str, ...] = dataclasses.field(default_factory=_default("groups", _HOOK_SETTING))
    #: also observations (first_seen, hidden, group_gone), not only events
    observations: bool = dataclasses.field(default_factory=_default("observations", _HOOK_SETTING))


class ConfigProblems(ConfigError):
    """Every problem found in the settings at once, one line each, each naming the file
    (or the environment variable) and the key: a user fixes them all in one go instead
    of meeting them one run at a time."""

    def __init__(self, problems: t.Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = tuple(problems)


def _convert(kind: str, value: t.Any, base: Path, from_text: bool) -> t.Any:
    """Turn a TOML value, or an environment variable's text, into the field's type; else raise ValueError.

    Only text (``from_text``) is read as a number, a boolean or a comma-separated list: a
    TOML file has types of its own, and a wrong one there is an error.
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
    if kind == "bool":
        if from_text:
            value = {"true": True, "false": False}.get(value.strip().lower(), value)
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if kind == "argv":
        return _argv(value, base)
    if kind == "hookname":
        if not isinstance(value, str) or not _HOOK_NAME.fullmatch(value):
            raise ValueError(_HOOK_NAME_RULE)
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


def _value(setting: Setting, raw: t.Any, base: Path, *, from_text: bool) -> t.Any:
    """``raw`` read and checked as ``setting``; else raise ValueError saying why, in users' words."""
    try:
        value = _convert(setting.kind, raw, base, from_text)
    except ValueError as err:
        raise ValueError(_TYPE_HINTS.get(setting.kind, str(err))) from None
    problem = setting.check(value) if setting.check else None
    if problem:
        raise ValueError(problem)
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
    """Find, read and validate the configuration.

    Raise ConfigError for a file that cannot be read as TOML; else ConfigProblems with
    every problem found (unknown keys, wrong types and values, bad ``[[hooks]]`` tables,
    bad environment variables), each naming the file or variable and the key.
    """
    path = find_config_file(explicit)
    values: dict[str, t.Any] = {}
    origins: dict[str, str] = {}  # where each key's value came from, for messages
    problems: list[str] = []
    refused: set[str] = set()  # keys with a problem: no check across keys uses them

    def take(setting: Setting, raw: t.Any, base: Path, where: str, *, from_text: bool) -> None:
        origins[setting.name] = where
        try:
            values[setting.name] = _value(setting, raw, base, from_text=from_text)
        except ValueError as err:
            problems.append(f"{where}: {err}")
            refused.add(setting.name)

    if path is not None:
        path = path.expanduser().absolute()
        for key, raw in _read_toml(path).items():
            if key == "hooks":
                values[key] = _hooks(raw, path, problems)
            elif key in _SETTING:
                take(_SETTING[key], raw, path.parent, f"{path}: key {key!r}", from_text=False)
            else:
                problems.append(f"{path}: unknown key {key!r} (known keys: {', '.join(_SETTING)}, hooks)")
    for setting in SETTINGS:
        env_name = f"SYNCER_{setting.name.upper()}"
        if env_name in os.environ:
            take(setting, os.environ[env_name], Path.cwd(), f"environment variable {env_name}", from_text=True)
    config = Config(source=path, **values)
    if not refused & {"database", "token_storage"}:
        problem = _token_storage_problem(config, origins.get("token_storage") or origins.get("database"))
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigProblems(problems)
    return config


def _token_storage_problem(config: Config, where: str | None) -> str | None:
    """The token store must not be the database: readers of the database (``syncer
    serve`` among them) would be handed the refresh token. Also through a symbolic or
    hard link: the same file, whatever its names."""
    tokens, database = config.token_storage, config.database
    try:
        same = tokens.exists() and database.exists() and os.path.samefile(tokens, database)
    except OSError:
        same = False
    if same or os.path.realpath(tokens) == os.path.realpath(database):
        where = where or "the default settings"
        return (
            f"{where}: token_storage ({tokens}) is the same file as database ({database});"
            " tokens must be kept in a file of their own"
        )
    return None


# ---------------------------------------------------------------- URLs, file modes, hooks

#: a hook's name: it appears in a header, an environment variable and a metric label
_HOOK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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


def _hooks(raw: t.Any, path: Path, problems: list[str]) -> tuple[HookConfig, ...]:
    """The ``[[hooks]]`` tables without a problem; the problems of the others go to ``problems``."""
    if not isinstance(raw, list) or not all(isinstance(table, dict) for table in raw):
        problems.append(f"{path}: key 'hooks': must be [[hooks]] tables")
        return ()
    hooks: list[HookConfig] = []
    numbers: dict[str, int] = {}  # each name's first table
    for number, table in enumerate(raw, start=1):
        hook = _hook(table, path, number, problems)
        name = table.get("name")
        if isinstance(name, str) and _HOOK_NAME.fullmatch(name):
            if name in numbers:
                where = f"{path}: [[hooks]] #{number} ({name!r}), key 'name'"
                problems.append(f"{where}: hook #{numbers[name]} has that name; names must be unique")
            numbers.setdefault(name, number)
        if hook is not None:
            hooks.append(hook)
    return tuple(hooks)


def _hook(table: dict[str, t.Any], path: Path, number: int, problems: list[str]) -> HookConfig | None:
    """One ``[[hooks]]`` table as a HookConfig, or None with its problems added to ``problems``."""
    named = f" ({table['name']!r})" if isinstance(table.get("name"), str) else ""

    def where(key: str) -> str:
        return f"{path}: [[hooks]] #{number}{named}, key {key!r}"

    found = len(problems)
    for key in table:
        if key not in _HOOK_SETTING:
            problems.append(f"{where(key)}: unknown key (known keys: {', '.join(_HOOK_SETTING)})")
    if ("command" in table) == ("url" in table):
        problems.append(f"{where('command')}: a hook needs exactly one of 'command' and 'url'")
    settings: dict[str, t.Any] = {}
    for setting in HOOK_SETTINGS:
        if setting.name not in table and not setting.required:
            continue
        try:  # a required key that is missing is refused as a value would be
            settings[setting.name] = _value(setting, table.get(setting.name), path.parent, from_text=False)
        except ValueError as err:
            problems.append(f"{where(setting.name)}: {err}")
    return HookConfig(**settings) if len(problems) == found else None


def _argv(value: t.Any, base: Path) -> tuple[str, ...]:
    """An argv list; a relative program path (one with a slash) resolves against the config's folder."""
    if not isinstance(value, list) or not value or not all(isinstance(arg, str) and arg for arg in value):
        raise ValueError(_TYPE_HINTS["argv"])
    program = Path(value[0]).expanduser()
    if "/" in value[0] and not program.is_absolute():
        program = base / program
    return (str(program) if "/" in value[0] else value[0], *value[1:])


# ---------------------------------------------------------------- the sample and the docs' tables

#: the sample's opening comment, before the keys
SAMPLE_PREAMBLE = """\
# syncer configuration. Every key is optional: each is shown with its default, or with an
# example and its default above it. Uncomment and change what you need.
# Found at --config FILE, else $SYNCER_CONFIG, else $CONFIGURATION_DIRECTORY/syncer.toml
# (systemd: /etc/syncer/syncer.toml), else ~/.config/syncer/syncer.toml.
# Any key can be overridden by an environment variable SYNCER_<KEY>, e.g. SYNCER_INTERVAL=5m.
# Relative paths are relative to this file's folder.
# Durations are strings with a unit: s, m, h or d, combined as in "1h30m". A bare
# number (interval 15) is an error (exit 78): seconds or minutes cannot be told apart.
# Every problem of the file is reported at once, one line each, and exits 78.
# Reference: docs/configuration.md.
"""
#: the ``[[hooks]]`` tables the sample shows, commented out
SAMPLE_HOOKS: tuple[dict[str, t.Any], ...] = (
    {"name": "ntfy", "command": ["/usr/local/bin/syncer-ntfy"], "timeout": "30s"},
    {"name": "portal", "url": "https://portal.example.org/globus-changes", "groups": [_EXAMPLE_GROUP],
     "observations": True},
)
#: the generated parts of docs/configuration.md lie between these markers
_TABLE_MARKERS = {
    "config-table": ("<!-- config-table:start (python -m syncer.config --write) -->", "<!-- config-table:end -->"),
    "hooks-table": ("<!-- hooks-table:start (python -m syncer.config --write) -->", "<!-- hooks-table:end -->"),
}
_WIDTH = 88
_LINK = re.compile(r"\[([^\]]+)\]\(([^)]+)\)")
#: the command that rewrites the generated files, as the drift test and the docs name it
WRITE_COMMAND = "python -m syncer.config --write"


def _toml(value: t.Any) -> str:
    """``value`` as TOML writes it (strings, numbers, booleans and lists of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is a JSON string, for the text we declare
    return str(value)


def _plain(markdown: str) -> str:
    """Markdown for a TOML comment: links spelled out as their text and where they point."""
    def spelled(match: re.Match[str]) -> str:
        target = match.group(2)
        target = target if "://" in target else "docs/" + ("configuration.md" + target if target.startswith("#") else target)
        return f"{match.group(1)} ({target})"

    return _LINK.sub(spelled, markdown)


def _default_doc(setting: Setting) -> str:
    """The default as the docs' tables show it (Markdown)."""
    if setting.default_doc:
        return setting.default_doc
    if setting.default is None:
        return "none"
    if setting.kind == "path":
        return f"`$STATE_DIRECTORY/{setting.default}`, else `~/.local/share/syncer/{setting.default}`"
    return f"`{_toml(setting.default)}`"


def _comment(text: str, first: str = "# ", rest: str = "# ") -> list[str]:
    return textwrap.wrap(text, _WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)


def render_sample() -> str:
    """The text of ``config/syncer.toml``: every key commented out, with its description."""
    lines = SAMPLE_PREAMBLE.splitlines()
    for setting in SETTINGS:
        lines.append("")
        lines += _comment(_plain(setting.description))
        shown = setting.default if setting.example is None else setting.example
        if shown != setting.default:
            lines += _comment(_plain(f"Default: {_default_doc(setting)}."))
        lines.append(f"# {setting.name} = {_toml(shown)}")
    lines += ["", *_comment(_plain(f"Hooks. {HOOKS_DESCRIPTION} Each [[hooks]] table has these keys:"))]
    for setting in HOOK_SETTINGS:
        default = "" if setting.default is None or setting.required else f" Default: {_default_doc(setting)}."
        required = " (required)" if setting.required else ""
        lines += _comment(_plain(f"{setting.name}{required}: {setting.description}{default}"), "# - ", "#   ")
    for hook in SAMPLE_HOOKS:
        lines += ["#", "# [[hooks]]", *(f"# {key} = {_toml(value)}" for key, value in hook.items())]
    return "\n".join(lines) + "\n"


def _table(rows: t.Iterable[tuple[str, ...]]) -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_tables() -> dict[str, str]:
    """The reference tables of docs/configuration.md, by marker name: top-level keys, ``[[hooks]]`` keys."""
    def row(setting: Setting) -> tuple[str, ...]:
        return f"`{setting.name}`", _KIND_DOC[setting.kind], _default_doc(setting), setting.description

    hooks_row = ("`[[hooks]]`", "tables", "none", f"{HOOKS_DESCRIPTION} Their keys: [below](#hooks-keys).")
    return {
        "config-table": _table([*map(row, SETTINGS), hooks_row]),
        "hooks-table": _table(map(row, HOOK_SETTINGS)),
    }


def render_docs(current: str) -> str:
    """``current`` (the text of docs/configuration.md) with its generated tables replaced."""
    for name, table in render_tables().items():
        start, end = _TABLE_MARKERS[name]
        before, found, rest = current.partition(start)
        _, found_end, after = rest.partition(end)
        if not (found and found_end):
            raise ValueError(f"no {start} ... {end} markers")
        current = f"{before}{start}\n{table}\n{end}{after}"
    return current


#: the generated files, relative to the checkout
SAMPLE_FILE = Path("config") / "syncer.toml"
DOCS_FILE = Path("docs") / "configuration.md"


def write_generated(root: Path) -> list[Path]:
    """Rewrite the sample and the docs' tables in the checkout at ``root``; return the files changed."""
    changed = []
    for relative, render in ((SAMPLE_FILE, lambda _: render_sample()), (DOCS_FILE, render_docs)):
        path = root / relative
        old = path.read_text()
        new = render(old)
        if new != old:
            path.write_text(new)
            changed.append(path)
    return changed


def _main(argv: list[str]) -> int:
    """``python -m syncer.config``: print or rewrite what is generated from the declaration."""
    parser = argparse.ArgumentParser(
        prog="python -m syncer.config", description="Print or rewrite what is generated from the configuration's declaration."
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--sample", action="store_true", help="print the sample config/syncer.toml")
    what.add_argument("--docs-table", action="store_true", help="print the reference tables of docs/configuration.md")
    what.add_argument("--write", action="store_true", help="rewrite both in this checkout")
    args = parser.parse_args(argv)
    if args.sample:
        sys.stdout.write(render_sample())
    elif args.docs_table:
        sys.stdout.write("\n\n".join(render_tables().values()) + "\n")
    else:
        root = Path(__file__).resolve().parent.parent
        if not (root / DOCS_FILE).is_file():
            parser.error(f"{root} is not a checkout of syncer (no {DOCS_FILE})")
        for path in write_generated(root):
            print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
