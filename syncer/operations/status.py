"""``syncer status``: recent runs, token state and database figures, as a health check.

Reads only: the database is opened read-only and the token store is never created,
so any user who can read the files can run it (and so can a monitor).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import typing as t

from syncer.config import Config
from syncer.errors import EXIT_FAILED, EXIT_LOGIN_REQUIRED, EXIT_OK, EXIT_PARTIAL, StorageError
from syncer.globus.client_secret import secret_source
from syncer.globus.token_store import TokenStore, current_auth
from syncer.operations.lock import sync_running
from syncer.storage.database import OutputDatabase, open_for_reading
from syncer.storage.ownership import DatabaseOwner, database_owner, describe_owner
from syncer.storage.schema import parse_time

if t.TYPE_CHECKING:
    from syncer.operations.hooks import Backlog

RECENT_RUNS = 5


class Health(t.NamedTuple):
    """The verdict of ``syncer status`` and its exit code (the health check)."""

    exit_code: int
    verdict: str


class StoredTokens(t.NamedTuple):
    """What status may say of a stored login's tokens (never a token itself)."""

    issuer: str  # the Globus Auth that issued them
    refresh_token: bool
    refresh_token_rejected: bool  # Globus Auth refused the refresh token
    access_token_expires_at: str
    access_token_expired: bool
    scope: str


@dataclasses.dataclass(frozen=True)
class TokenState:
    """What the token store holds now; at most one of the optional parts is set."""

    path: str
    #: a refresh token is stored that Globus Auth has not refused (or no login is needed)
    logged_in: bool = False
    #: where a confidential client's secret comes from (then no login is needed at all)
    client_secret_source: str | None = None
    #: why the token store could not be read
    error: str | None = None
    stored: StoredTokens | None = None

    @property
    def login_needed(self) -> str | None:
        """Why a login is needed now (what exit 77 says); None when it is not."""
        if self.client_secret_source is not None or self.logged_in or self.error is not None:
            return None
        if self.stored is not None and self.stored.refresh_token_rejected:
            return "Globus Auth rejected the stored refresh token"
        if self.stored is not None and self.stored.issuer != current_auth():
            return f"the stored tokens were issued by Globus Auth at {self.stored.issuer}, not by {current_auth()}"
        return "no usable tokens"

    def to_json(self) -> dict[str, t.Any]:
        """The ``tokens`` object of ``syncer status --json``."""
        out: dict[str, t.Any] = {"path": self.path, "logged_in": self.logged_in}
        if self.client_secret_source is not None:
            out.update(client_credentials=True, client_secret_source=self.client_secret_source)
        elif self.error is not None:
            out["error"] = self.error
        elif self.stored is not None:
            out.update(self.stored._asdict())
        out["login_required"] = self.login_needed is not None
        return out


class ExcludedGroup(t.NamedTuple):
    """A group of ``exclude_groups``, named where the database knows it."""

    id: str
    name: str | None


class Counts(t.NamedTuple):
    """Rows in the current state, history and runs (counted in the tables under the views)."""

    groups: int
    groups_removed: int
    memberships: int
    identities: int
    history_rows: int
    runs: int


class RecentRun(t.NamedTuple):
    """A row of ``sync_runs``, as status shows the latest ones."""

    id: int
    started_at: str
    finished_at: str | None
    status: str
    groups_synced: int
    groups_failed: int
    memberships: int
    changes: int
    error: str | None
    exit_code: int | None
    pid: int | None


class GroupNeedingLogin(t.NamedTuple):
    """A group Globus refused for a session requirement (SPEC: Session policies)."""

    id: str
    name: str | None
    asked: str  # what Globus asked for


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What a database with syncer's tables records."""

    counts: Counts
    recent_runs: tuple[RecentRun, ...]  # newest first
    #: None: a database from before groups needing a login were recorded
    needs_login: tuple[GroupNeedingLogin, ...] | None
    last_success_at: str | None  # start of the latest ok or partial run
    owner: DatabaseOwner | None
    #: the latest run is ``running`` and a live sync holds the lock
    sync_in_progress: bool


@dataclasses.dataclass(frozen=True)
class DatabaseState:
    """The database file and, where it has syncer's tables, what it records."""

    path: str
    exists: bool
    excluded_groups: tuple[ExcludedGroup, ...]
    size_bytes: int | None = None  # None: no file
    recorded: Recorded | None = None  # None: no file, or no syncer tables in it yet

    def to_json(self) -> dict[str, t.Any]:
        """The ``database`` object of ``syncer status --json``."""
        out: dict[str, t.Any] = {
            "path": self.path, "exists": self.exists, "excluded_groups": [g._asdict() for g in self.excluded_groups],
        }
        if self.size_bytes is not None:
            out["size_bytes"] = self.size_bytes
        recorded = self.recorded
        if recorded is None:
            return out
        out["counts"] = recorded.counts._asdict()
        out["recent_runs"] = [run._asdict() for run in recorded.recent_runs]
        if recorded.needs_login is not None:
            out["needs_login"] = [group._asdict() for group in recorded.needs_login]
        out["last_success_at"] = recorded.last_success_at
        out["owner"] = recorded.owner._asdict() if recorded.owner else None
        out["sync_in_progress"] = recorded.sync_in_progress
        return out


@dataclasses.dataclass(frozen=True)
class StatusReport:
    """Everything ``syncer status`` says, read once: its text, its JSON and the
    Prometheus metrics are each made from this."""

    health: Health
    tokens: TokenState
    database: DatabaseState
    hooks: tuple[Backlog, ...]  # each configured hook's queue

    def to_json(self) -> dict[str, t.Any]:
        """``syncer status --json`` (its keys are relied on: they only ever grow)."""
        return {
            "health": self.health.verdict,
            "exit_code": self.health.exit_code,
            "tokens": self.tokens.to_json(),
            "database": self.database.to_json(),
            "hooks": [hook._asdict() for hook in self.hooks],
        }


def status_report(config: Config) -> StatusReport:
    """Read the token store and the database (one snapshot), and judge them."""
    tokens = token_state(config)
    database, hooks = database_state(config)
    health = with_hook_backlog(assess(config, tokens, database), hooks)
    return StatusReport(health, tokens, database, hooks)


def token_state(config: Config) -> TokenState:
    """What the token store holds now, without revealing any token (and creating nothing).

    Logged in while a refresh token is stored that Globus Auth has not refused; a
    confidential client (``client_credentials``) needs no login at all.
    """
    path = config.token_storage
    source = secret_source(config)
    if source is not None:
        return TokenState(str(path), client_secret_source=source)
    if not path.exists():
        return TokenState(str(path))
    try:
        with TokenStore(path) as store:
            tokens = store.groups_tokens()
            rejected = bool(tokens and tokens.refresh_token and store.is_rejected(tokens.refresh_token))
            issuer = store.issuer()  # read only: status never records one
    except StorageError as err:
        return TokenState(str(path), error=str(err))
    except PermissionError:
        return TokenState(str(path), error=f"{path}: not readable by this user")
    if tokens is None:
        return TokenState(str(path))
    expires = dt.datetime.fromtimestamp(tokens.expires_at_seconds, dt.UTC)
    return TokenState(
        str(path),
        logged_in=bool(tokens.refresh_token) and not rejected and issuer in (None, current_auth()),
        stored=StoredTokens(
            issuer=issuer or current_auth(),
            refresh_token=bool(tokens.refresh_token),
            refresh_token_rejected=rejected,
            access_token_expires_at=expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            access_token_expired=tokens.expires_at_seconds <= time.time(),
            scope=tokens.scope,
        ),
    )


def database_state(config: Config) -> tuple[DatabaseState, tuple[Backlog, ...]]:
    """The database's state and each hook's queue, read in one snapshot (read-only)."""
    from syncer.operations.hooks import backlogs, not_started

    path = config.database
    if not path.exists():
        excluded = tuple(ExcludedGroup(group_id, None) for group_id in config.exclude_groups)
        return DatabaseState(str(path), False, excluded), tuple(not_started(hook) for hook in config.hooks)
    size = path.stat().st_size
    # a file without syncer's tables yet (the first run is creating them) is shown as it is
    with open_for_reading(path, config.busy_timeout, syncer_tables=False) as db:
        recorded = _recorded(db, config) if db["sync_runs"].exists() else None
        excluded = tuple(
            ExcludedGroup(group_id, _scalar_text(db, "SELECT name FROM group_state WHERE id = ?", group_id)
                          if recorded else None)
            for group_id in config.exclude_groups
        )
        hooks = tuple(backlogs(db, config.hooks))
    return DatabaseState(str(path), True, excluded, size, recorded), hooks


def _recorded(db: OutputDatabase, config: Config) -> Recorded:
    counts = Counts(
        groups=_scalar(db, "SELECT count(*) FROM group_state WHERE removed_run IS NULL"),
        groups_removed=_scalar(db, "SELECT count(*) FROM group_state WHERE removed_run IS NOT NULL"),
        memberships=_scalar(db, "SELECT count(*) FROM membership_state"),
        identities=_scalar(db, "SELECT count(*) FROM identity_state"),
        history_rows=_scalar(db, "SELECT count(*) FROM membership_versions"),
        runs=_scalar(db, "SELECT count(*) FROM sync_runs"),
    )
    runs = tuple(
        RecentRun(*row) for row in db.execute(
            "SELECT id, started_at, finished_at, status, groups_synced, groups_failed,"
            " memberships, changes, error, exit_code, pid FROM sync_runs ORDER BY id DESC LIMIT ?",
            [RECENT_RUNS],
        )
    )
    last_ok = db.execute("SELECT max(started_at) FROM sync_runs WHERE status IN ('ok', 'partial')").fetchone()[0]
    needs_login = None
    if "needs_login" in db["group_state"].columns_dict:
        needs_login = tuple(
            GroupNeedingLogin(*row) for row in db.execute(
                "SELECT id, name, needs_login FROM group_state"
                " WHERE needs_login IS NOT NULL AND removed_run IS NULL ORDER BY name, id")
        )
    in_progress = bool(runs) and runs[0].status == "running" and _sync_running(config)
    return Recorded(counts, runs, needs_login, last_ok, database_owner(db), in_progress)


def _sync_running(config: Config) -> bool:
    """Whether a sync is running on the database: it holds the sync lock (and the run
    marker that every reader of the folder may check). A ``running`` row alone does not
    tell: a killed run leaves one, which the next sync marks ``aborted``."""
    running = sync_running(config.lock_path)
    return True if running is None else running  # cannot tell: do not call the run dead


def _scalar_text(db: t.Any, sql: str, *params: t.Any) -> str | None:
    row = db.execute(sql, params).fetchone()
    return None if row is None else row[0]


def _scalar(db: t.Any, sql: str) -> int:
    return int(db.execute(sql).fetchone()[0])


def assess(config: Config, tokens: TokenState, database: DatabaseState) -> Health:
    """Turn the state into the documented exit code and a one-line verdict.

    A sync in progress does not hide the verdict: the latest finished run is judged.
    """
    recorded = database.recorded
    runs = recorded.recent_runs if recorded else ()
    if recorded and runs and runs[0].status == "running" and recorded.sync_in_progress:
        health = _judge(config, tokens, recorded.last_success_at, runs[1:])
        return health._replace(verdict=f"{health.verdict}; run {runs[0].id} is in progress")
    return _judge(config, tokens, recorded.last_success_at if recorded else None, runs)


def _judge(config: Config, tokens: TokenState, last_ok: str | None, runs: tuple[RecentRun, ...]) -> Health:
    latest = runs[0] if runs else None
    login_needed = tokens.login_needed
    if login_needed:
        return Health(EXIT_LOGIN_REQUIRED, f"login required: {login_needed}; run `syncer login`")
    if latest and latest.exit_code == EXIT_LOGIN_REQUIRED and latest.status == "failed":
        # the store holds a login Globus has not refused: one done since that run
        return Health(EXIT_FAILED, f"failed: run {latest.id} needed a new login, done since; the next run will tell")
    if latest is None:
        return Health(EXIT_FAILED, "no finished run yet")
    if last_ok:
        age = (dt.datetime.now(dt.UTC) - parse_time(last_ok)).total_seconds()
        if age > 3 * config.interval:
            return Health(EXIT_FAILED, f"stale: last successful run was {_ago(age)} ago (interval {_ago(config.interval)})")
    if latest.status == "running":  # and no sync holds the lock: its process ended without finishing
        return Health(EXIT_FAILED, f"aborted: run {latest.id} ended without finishing (the next sync marks it aborted)")
    if latest.status == "ok":
        return Health(EXIT_OK, f"ok: run {latest.id} at {latest.started_at}")
    if latest.status == "partial":
        return Health(EXIT_PARTIAL, f"partial: run {latest.id} could not read {latest.groups_failed} group(s)")
    return Health(EXIT_FAILED, f"{latest.status}: run {latest.id}: {latest.error or 'no detail'}")


def _ago(seconds: float) -> str:
    if seconds >= 7200:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 120:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:.0f}s"


def with_hook_backlog(health: Health, hooks: tuple[Backlog, ...]) -> Health:
    """A hook with undelivered runs makes an ``ok`` verdict a warning (exit 3)."""
    behind = [hook for hook in hooks if hook.runs]
    if not behind:
        return health
    note = "; ".join(f"hook {hook.hook} has {hook.runs} undelivered run(s) since run {hook.oldest_run}" for hook in behind)
    if health.exit_code == EXIT_OK:
        return Health(EXIT_PARTIAL, f"{health.verdict}; but {note}")
    return Health(health.exit_code, f"{health.verdict}; {note}")


def render_text(report: StatusReport) -> str:
    """The human-readable form of the report."""
    tokens, database = report.tokens, report.database
    lines = [f"status: {report.health.verdict}", _token_line(tokens)]
    lines += _hook_lines(report.hooks)
    excluded = database.excluded_groups
    if excluded:
        lines.append(f"excluded groups (exclude_groups, never read): {len(excluded)}")
        lines += [f"  {group.id}" + (f" {group.name}" if group.name else "") for group in excluded]
    if not database.exists:
        lines.append(f"database: not created yet ({database.path})")
        return "\n".join(lines)
    lines.append(f"database: {database.path} ({(database.size_bytes or 0) / 1024:.0f} KiB)")
    recorded = database.recorded
    if recorded is None:
        return "\n".join(lines)
    owner = recorded.owner
    if owner:
        lines.append(
            f"  belongs to {describe_owner(owner)} (recorded by run {owner.recorded_by_run} at {owner.recorded_at})"
        )
    else:
        lines.append("  belongs to: not recorded yet (the next successful run records it)")
    lines.append(
        "  {groups} groups ({groups_removed} removed), {memberships} memberships,"
        " {identities} identities, {history_rows} history rows, {runs} runs".format(**recorded.counts._asdict())
    )
    for group in recorded.needs_login or ():
        lines.append(
            f"needs login: group {group.name!r} ({group.id}): Globus asks for a new login session"
            f" ({group.asked}); run `syncer login`, or list it in exclude_groups"
        )
    if recorded.recent_runs:
        lines.append("recent runs:")
        for run in recorded.recent_runs:
            detail = f"  #{run.id} {run.started_at} {run.status:<8} groups={run.groups_synced}"
            detail += f" failed={run.groups_failed} memberships={run.memberships} changes={run.changes}"
            if run.error:
                detail += f"  error: {run.error}"
            lines.append(detail)
    return "\n".join(lines)


def _token_line(tokens: TokenState) -> str:
    stored = tokens.stored
    if tokens.error:
        return f"tokens: {tokens.error}"
    if tokens.client_secret_source is not None:
        return f"tokens: client credentials (secret from {tokens.client_secret_source}); no login needed"
    if stored and stored.refresh_token_rejected:
        return f"tokens: refresh token rejected by Globus Auth; run `syncer login` ({tokens.path})"
    if stored and not tokens.logged_in and stored.issuer != current_auth():
        return f"tokens: issued by Globus Auth at {stored.issuer}, not by {current_auth()}; run `syncer login` ({tokens.path})"
    if stored and tokens.logged_in:
        expiry = "expired (renews on next run)" if stored.access_token_expired else f"until {stored.access_token_expires_at}"
        return f"tokens: refresh token present; access token valid {expiry} ({tokens.path})"
    return f"tokens: none ({tokens.path})"


def _hook_lines(hooks: tuple[Backlog, ...]) -> list[str]:
    lines = ["hooks:"] if hooks else []
    for hook in hooks:
        if hook.delivered_run is None:
            state = "starts with the next run"
        elif hook.runs:
            state = f"{hook.runs} run(s) undelivered, the oldest run {hook.oldest_run} at {hook.oldest_at}"
        else:
            state = "up to date"
        if hook.failures:
            state += f"; run {hook.failing_run} failed {hook.failures} time(s) in a row: {hook.error}"
        lines.append(f"  {hook.hook}: {state}")
    return lines
