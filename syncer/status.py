"""``syncer status``: recent runs, token state and database figures, as a health check.

Reads only: the database is opened read-only and the token store is never created,
so any user who can read the files can run it (and so can a monitor).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import time
import typing as t

from syncer.client_secret import secret_source
from syncer.config import Config
from syncer.errors import EXIT_FAILED, EXIT_LOGIN_REQUIRED, EXIT_OK, EXIT_PARTIAL, StorageError
from syncer.lock import is_held
from syncer.ownership import DatabaseOwner, database_owner, describe_owner
from syncer.schema import connect, parse_time
from syncer.token_store import TokenStore

RECENT_RUNS = 5


@dataclasses.dataclass
class Health:
    exit_code: int
    verdict: str


def token_state(config: Config) -> dict[str, t.Any]:
    """What the token store holds now, without revealing any token.

    ``logged_in`` is true while a refresh token is stored that Globus Auth has not
    refused; a confidential client (``client_credentials``) needs no login at all.
    """
    path = config.token_storage
    state: dict[str, t.Any] = {"path": str(path), "logged_in": False}
    source = secret_source(config)
    if source is not None:
        state.update(client_credentials=True, client_secret_source=source)
        return state
    if not path.exists():
        return state
    try:
        with TokenStore(path) as store:
            tokens = store.groups_tokens()
            rejected = bool(tokens and tokens.refresh_token and store.is_rejected(tokens.refresh_token))
    except StorageError as err:
        state["error"] = str(err)
        return state
    except PermissionError:
        state["error"] = f"{path}: not readable by this user"
        return state
    if tokens is not None:
        expires = dt.datetime.fromtimestamp(tokens.expires_at_seconds, dt.UTC)
        state.update(
            logged_in=bool(tokens.refresh_token) and not rejected,
            refresh_token=bool(tokens.refresh_token),
            refresh_token_rejected=rejected,
            access_token_expires_at=expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            access_token_expired=tokens.expires_at_seconds <= time.time(),
            scope=tokens.scope,
        )
    return state


def database_state(config: Config) -> dict[str, t.Any]:
    path = config.database
    state: dict[str, t.Any] = {"path": str(path), "exists": path.exists()}
    # named where the database knows them
    state["excluded_groups"] = [{"id": group_id, "name": None} for group_id in config.exclude_groups]
    if not path.exists():
        return state
    state["size_bytes"] = path.stat().st_size
    db = connect(path, readonly=True, busy_timeout=config.busy_timeout)
    try:
        if not db["sync_runs"].exists():
            return state
        state["counts"] = {
            # counted in the tables under the views: the same rows, without the views' joins
            "groups": _scalar(db, "SELECT count(*) FROM group_state WHERE removed_run IS NULL"),
            "groups_removed": _scalar(db, "SELECT count(*) FROM group_state WHERE removed_run IS NOT NULL"),
            "memberships": _scalar(db, "SELECT count(*) FROM membership_state"),
            "identities": _scalar(db, "SELECT count(*) FROM identity_state"),
            "history_rows": _scalar(db, "SELECT count(*) FROM membership_versions"),
            "runs": _scalar(db, "SELECT count(*) FROM sync_runs"),
        }
        runs = state["recent_runs"] = list(
            db.query(
                "SELECT id, started_at, finished_at, status, groups_synced, groups_failed,"
                " memberships, changes, error, exit_code, pid FROM sync_runs ORDER BY id DESC LIMIT ?",
                [RECENT_RUNS],
            )
        )
        last_ok = db.execute(
            "SELECT max(started_at) FROM sync_runs WHERE status IN ('ok', 'partial')"
        ).fetchone()[0]
        state["last_success_at"] = last_ok
        owner = database_owner(db)
        state["owner"] = owner._asdict() if owner else None
        for group in state["excluded_groups"]:
            group["name"] = _scalar_text(db, "SELECT name FROM group_state WHERE id = ?", group["id"])
    except sqlite3.Error as err:
        raise StorageError(f"{path}: cannot read database: {err}") from None
    finally:
        db.close()
    state["sync_in_progress"] = bool(runs) and runs[0]["status"] == "running" and _sync_running(config)
    return state


def _sync_running(config: Config) -> bool:
    """Whether a sync is running on the database: it holds the sync lock. A ``running``
    row alone does not tell: a killed run leaves one, which the next sync marks ``aborted``."""
    try:
        return is_held(config.lock_path)
    except OSError:
        return True  # the lock is not readable by this user: cannot tell, so do not call the run dead


def _scalar_text(db: t.Any, sql: str, *params: t.Any) -> str | None:
    row = db.execute(sql, params).fetchone()
    return None if row is None else row[0]


def _scalar(db: t.Any, sql: str) -> int:
    return int(db.execute(sql).fetchone()[0])


def assess(config: Config, tokens: dict[str, t.Any], database: dict[str, t.Any]) -> Health:
    """Turn the state into the documented exit code and a one-line verdict.

    A sync in progress does not hide the verdict: the latest finished run is judged.
    """
    runs = database.get("recent_runs") or []
    if runs and runs[0]["status"] == "running" and database.get("sync_in_progress"):
        health = _judge(config, tokens, database, runs[1:])
        health.verdict += f"; run {runs[0]['id']} is in progress"
        return health
    return _judge(config, tokens, database, runs)


def _judge(config: Config, tokens: dict[str, t.Any], database: dict[str, t.Any], runs: list[dict[str, t.Any]]) -> Health:
    latest = runs[0] if runs else None
    login_needed = _login_needed(tokens)
    if login_needed:
        return Health(EXIT_LOGIN_REQUIRED, f"login required: {login_needed}; run `syncer login`")
    if latest and latest["exit_code"] == EXIT_LOGIN_REQUIRED and latest["status"] == "failed":
        # the store holds a login Globus has not refused: one done since that run
        return Health(EXIT_FAILED, f"failed: run {latest['id']} needed a new login, done since; the next run will tell")
    if latest is None:
        return Health(EXIT_FAILED, "no finished run yet")
    last_ok = database.get("last_success_at")
    if last_ok:
        age = (dt.datetime.now(dt.UTC) - parse_time(last_ok)).total_seconds()
        if age > 3 * config.interval:
            return Health(EXIT_FAILED, f"stale: last successful run was {_ago(age)} ago (interval {_ago(config.interval)})")
    if latest["status"] == "running":  # and no sync holds the lock: its process ended without finishing
        return Health(EXIT_FAILED, f"aborted: run {latest['id']} ended without finishing (the next sync marks it aborted)")
    if latest["status"] == "ok":
        return Health(EXIT_OK, f"ok: run {latest['id']} at {latest['started_at']}")
    if latest["status"] == "partial":
        return Health(EXIT_PARTIAL, f"partial: run {latest['id']} could not read {latest['groups_failed']} group(s)")
    return Health(EXIT_FAILED, f"{latest['status']}: run {latest['id']}: {latest['error'] or 'no detail'}")


def _login_needed(tokens: dict[str, t.Any]) -> str | None:
    """Why a login is needed now, from the token store as it is; None when it is not."""
    if tokens.get("client_credentials") or tokens.get("logged_in") or "error" in tokens:
        return None
    if tokens.get("refresh_token_rejected"):
        return "Globus Auth rejected the stored refresh token"
    return "no usable tokens"


def _ago(seconds: float) -> str:
    if seconds >= 7200:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 120:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:.0f}s"


def report(config: Config) -> tuple[dict[str, t.Any], Health]:
    tokens = token_state(config)
    tokens["login_required"] = _login_needed(tokens) is not None  # what exit 77 says
    database = database_state(config)
    hooks = hook_state(config)
    health = with_hook_backlog(assess(config, tokens, database), hooks)
    data = {"health": health.verdict, "exit_code": health.exit_code, "tokens": tokens, "database": database, "hooks": hooks}
    return data, health


def hook_state(config: Config) -> list[dict[str, t.Any]]:
    """Each configured hook's queue: its position, and the runs it has not received yet."""
    from syncer.hooks import backlogs, not_started

    if not config.hooks or not config.database.exists():
        return [not_started(hook)._asdict() for hook in config.hooks]
    db = connect(config.database, readonly=True, busy_timeout=config.busy_timeout)
    try:
        return [backlog._asdict() for backlog in backlogs(db, config.hooks)]
    except sqlite3.Error as err:
        raise StorageError(f"{config.database}: cannot read database: {err}") from None
    finally:
        db.close()


def with_hook_backlog(health: Health, hooks: list[dict[str, t.Any]]) -> Health:
    """A hook with undelivered runs makes an ``ok`` verdict a warning (exit 3)."""
    behind = [hook for hook in hooks if hook["runs"]]
    if not behind:
        return health
    note = "; ".join(
        f"hook {hook['hook']} has {hook['runs']} undelivered run(s) since run {hook['oldest_run']}" for hook in behind
    )
    if health.exit_code == EXIT_OK:
        return Health(EXIT_PARTIAL, f"{health.verdict}; but {note}")
    return Health(health.exit_code, f"{health.verdict}; {note}")


def render_text(data: dict[str, t.Any]) -> str:
    """The human-readable form of ``report``."""
    tokens, database = data["tokens"], data["database"]
    lines = [f"status: {data['health']}"]
    if tokens.get("error"):
        lines.append(f"tokens: {tokens['error']}")
    elif tokens.get("client_credentials"):
        lines.append(f"tokens: client credentials (secret from {tokens['client_secret_source']}); no login needed")
    elif tokens.get("refresh_token_rejected"):
        lines.append(f"tokens: refresh token rejected by Globus Auth; run `syncer login` ({tokens['path']})")
    elif tokens.get("logged_in"):
        if tokens["access_token_expired"]:
            expiry = "expired (renews on next run)"
        else:
            expiry = f"until {tokens['access_token_expires_at']}"
        lines.append(f"tokens: refresh token present; access token valid {expiry} ({tokens['path']})")
    else:
        lines.append(f"tokens: none ({tokens['path']})")
    lines += _hook_lines(data.get("hooks") or [])
    excluded = database.get("excluded_groups") or []
    if excluded:
        lines.append(f"excluded groups (exclude_groups, never read): {len(excluded)}")
        lines += [f"  {group['id']}" + (f" {group['name']}" if group["name"] else "") for group in excluded]
    if not database.get("exists"):
        lines.append(f"database: not created yet ({database['path']})")
        return "\n".join(lines)
    size = database.get("size_bytes", 0)
    lines.append(f"database: {database['path']} ({size / 1024:.0f} KiB)")
    owner = database.get("owner")
    if owner:
        lines.append(
            f"  belongs to {describe_owner(DatabaseOwner(**owner))}"
            f" (recorded by run {owner['recorded_by_run']} at {owner['recorded_at']})"
        )
    elif database.get("counts"):
        lines.append("  belongs to: not recorded yet (the next successful run records it)")
    counts = database.get("counts")
    if counts:
        lines.append(
            "  {groups} groups ({groups_removed} removed), {memberships} memberships,"
            " {identities} identities, {history_rows} history rows, {runs} runs".format(**counts)
        )
    runs = database.get("recent_runs") or []
    if runs:
        lines.append("recent runs:")
        for run in runs:
            detail = f"  #{run['id']} {run['started_at']} {run['status']:<8}" f" groups={run['groups_synced']}"
            detail += f" failed={run['groups_failed']} memberships={run['memberships']} changes={run['changes']}"
            if run["error"]:
                detail += f"  error: {run['error']}"
            lines.append(detail)
    return "\n".join(lines)


def _hook_lines(hooks: list[dict[str, t.Any]]) -> list[str]:
    lines = ["hooks:"] if hooks else []
    for hook in hooks:
        if hook["delivered_run"] is None:
            state = "starts with the next run"
        elif hook["runs"]:
            state = f"{hook['runs']} run(s) undelivered, the oldest run {hook['oldest_run']} at {hook['oldest_at']}"
        else:
            state = "up to date"
        if hook["failures"]:
            state += f"; run {hook['failing_run']} failed {hook['failures']} time(s) in a row: {hook['error']}"
        lines.append(f"  {hook['hook']}: {state}")
    return lines
