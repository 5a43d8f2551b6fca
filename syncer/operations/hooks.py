"""Hooks: each run's changes sent to commands and URLs, at least once, in run order.

Every hook has a queue position in the database (table ``hook_deliveries``): every run
up to ``delivered_run`` has been delivered. After a run commits, each hook is sent the
runs after its position, one call per run that has changes matching its filters, oldest
first; runs without any count as delivered without a call. A call that fails (an exit
status other than 0, an HTTP status other than 2xx, a timeout, an unreachable URL)
stops that hook's queue: the same run is sent first at the next attempt. The position
moves in its own small transaction after each call, so a crash between a call and its
bookkeeping sends that run again (hence the idempotency key), and nothing is skipped.

The run's own transaction never waits for a hook: hooks are called after it committed,
from a separate connection, holding no database lock while a call is made (a run's
rows are first spooled to a temporary file). One process at a time delivers a
database's hooks (a lock file beside it); another finding it busy leaves the work to
the holder, which keeps going until its hooks have caught up, or to the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

from syncer import __version__
from syncer.config import Config, HookConfig
from syncer.errors import LockBusy
from syncer.logs import module_logger, redact
from syncer.operations.healthcheck import describe_request_error, register_url_secret
from syncer.operations.lock import LockFile
from syncer.storage.database import open_for_reading, open_for_writing
from syncer.storage.schema import utc_now
from syncer.storage.when import When

if t.TYPE_CHECKING:
    import sqlite_utils

log = module_logger(__name__)

#: characters of a hook's output (or an HTTP answer) put in the log
OUTPUT_LOGGED = 1000
#: environment variables a hook does not inherit: secrets, and systemd's channels to the service itself
#: the script that runs a hook's command and ends all of it (see its docstring)
KEEPER = Path(__file__).with_name("hook_supervisor.py")
#: seconds a keeper told to stop has to end its command's processes and exit
KEEPER_GRACE = 30.0
_WITHHELD_ENV = re.compile(r"TOKEN|SECRET|PASSW(OR)?D|CREDENTIAL|API_?KEY|^NOTIFY_SOCKET$|^WATCHDOG_", re.IGNORECASE)


class Delivery(t.NamedTuple):
    """One call of a hook: which run, how many changes, and how it went."""

    hook: str
    run_id: int
    changes: int
    delivered: bool
    detail: str


class Backlog(t.NamedTuple):
    """Where a hook's queue stands, as ``syncer status`` shows it."""

    hook: str
    #: every run up to this one has been delivered; None: the hook has not run yet (it starts with the next run)
    delivered_run: int | None
    #: runs with matching changes not delivered yet, and the oldest of them
    runs: int
    oldest_run: int | None
    oldest_at: str | None
    #: the last failed call's run and reason, and how many calls in a row failed (0: none)
    failing_run: int | None
    error: str | None
    failures: int


def lock_path(config: Config) -> Path:
    """The lock that lets one process at a time deliver a database's hooks."""
    return config.database.with_name(config.database.name + ".hooks.lock")


class Delivering(t.NamedTuple):
    """The database opened to deliver hooks, and the hooks lock's descriptor (handed to
    each hook's keeper, so the lock is held until every process of a call is gone)."""

    db: sqlite_utils.Database
    lock_fd: int


@contextlib.contextmanager
def _delivering(config: Config) -> t.Iterator[Delivering]:
    """The database, opened to deliver hooks, while this process holds the hooks lock
    (LockBusy at once if another process does)."""
    with (
        LockFile(lock_path(config), busy="another process is delivering hooks on this database") as lock,
        open_for_writing(config.database, config.busy_timeout) as db,
    ):
        yield Delivering(db, lock.fileno())


def deliver_after_run(config: Config, run_id: int, cancelled: threading.Event | None = None) -> list[Delivery]:
    """Send every hook what it has not received yet, after run ``run_id`` committed.

    A hook seen for the first time starts with this run. Never raises for a hook's
    failure: that is logged and retried after the next run.
    """
    if not config.hooks:
        return []
    try:
        with _delivering(config) as (db, lock_fd):
            deliveries: list[Delivery] = []
            for hook in config.hooks:
                queue = HookQueue(db, hook, config.database, lock_fd)
                queue.start_after(run_id - 1)
                deliveries += queue.deliver(cancelled)
            return deliveries
    except LockBusy:
        log.info("hooks: another process is delivering them now; this run's changes go out with it or after the next run")
        return []


class Replay(t.NamedTuple):
    """What ``syncer hooks replay`` did: the first run sent again (None: no run since WHEN), and the calls."""

    first_run: int | None
    deliveries: list[Delivery]


def replay(config: Config, hook: HookConfig, since: When, cancelled: threading.Event | None = None) -> Replay:
    """Send ``hook`` every run since ``since`` (a moment, or a run) again, and
    whatever it has not received yet, in order.

    Raises LockBusy while another process delivers hooks on this database.
    """
    first = first_run_since(config, since)
    if first is None:
        return Replay(None, [])
    try:
        with _delivering(config) as (db, lock_fd):
            queue = HookQueue(db, hook, config.database, lock_fd)
            queue.rewind(first - 1)
            return Replay(first, queue.deliver(cancelled))
    except LockBusy:
        raise LockBusy(f"another process is delivering hooks on this database (lock {lock_path(config)}); try again") from None


def first_run_since(config: Config, when: When) -> int | None:
    """The first run that started at or after ``when`` (a run: that run or the next), if any."""
    with open_for_reading(config.database, config.busy_timeout) as db:
        if when.run_id is not None:
            row = db.execute("SELECT min(id) FROM sync_runs WHERE id >= ?", [when.run_id]).fetchone()
        else:
            row = db.execute("SELECT min(id) FROM sync_runs WHERE started_at >= ?", [when.moment]).fetchone()
    return None if row[0] is None else int(row[0])


class ChangeQuery(t.NamedTuple):
    """Where a hook's rows come from: a view with the columns of ``membership_changes``,
    and SQL conditions on it (``" AND ..."``) with their parameters."""

    view: str
    where: str
    params: list[t.Any]


def change_query(hook: HookConfig) -> ChangeQuery:
    """What ``hook`` is sent. Events only (the default) come from ``membership_events``:
    the same rows as ``membership_changes`` with reason joined, left, changed or unknown
    (older releases' changes), found without reading a first run's observations."""
    view = "membership_changes" if hook.observations else "membership_events"
    if not hook.groups:
        return ChangeQuery(view, "", [])
    return ChangeQuery(view, f" AND group_id IN ({', '.join('?' * len(hook.groups))})", list(hook.groups))


def backlogs(db: sqlite_utils.Database, hooks: t.Iterable[HookConfig]) -> list[Backlog]:
    """Each hook's position and what it has not received yet (reads only)."""
    has_table = db["hook_deliveries"].exists()
    result = []
    for hook in hooks:
        row = None
        if has_table:
            row = db.execute(
                "SELECT delivered_run, failing_run, error, failures FROM hook_deliveries WHERE hook = ?", [hook.name]
            ).fetchone()
        if row is None:
            result.append(not_started(hook))
            continue
        delivered_run, failing_run, error, failures = row
        view, where, params = change_query(hook)
        runs, oldest_run, oldest_at = db.execute(
            f"SELECT count(DISTINCT run_id), min(run_id), min(at) FROM {view} WHERE run_id > ?{where}",
            [delivered_run, *params],
        ).fetchone()
        result.append(Backlog(hook.name, delivered_run, runs, oldest_run, oldest_at, failing_run, error, failures))
    return result


def not_started(hook: HookConfig) -> Backlog:
    """The backlog of a hook that has not run yet: none (it starts with the next run)."""
    return Backlog(hook.name, None, 0, None, None, None, None, 0)


def hook_environment(environ: t.Mapping[str, str]) -> dict[str, str]:
    """The service's environment without anything secret, for a hook's command."""
    return {key: value for key, value in environ.items() if not _WITHHELD_ENV.search(key)}


class HookQueue:
    """One hook's queue on an open database: its position, and sending what follows it."""

    def __init__(self, db: sqlite_utils.Database, hook: HookConfig, database: Path, lock_fd: int | None = None) -> None:
        self.db = db
        self.hook = hook
        self.database = database
        self.lock_fd = lock_fd  # the hooks lock, held by each command's keeper too

    def start_after(self, run_id: int) -> None:
        """Give a hook seen for the first time its position: it gets the runs after ``run_id``."""
        if self.position() is None:
            with self.db.atomic():
                self.db.execute("INSERT INTO hook_deliveries (hook, delivered_run) VALUES (?, ?)", [self.hook.name, run_id])

    def rewind(self, run_id: int) -> None:
        """Move the position back to ``run_id`` (never forward: that would skip runs)."""
        with self.db.atomic():
            self.start_after(run_id)
            self.db.execute(
                "UPDATE hook_deliveries SET delivered_run = min(delivered_run, ?) WHERE hook = ?", [run_id, self.hook.name]
            )

    def position(self) -> int | None:
        """Every run up to this one has been delivered; None: the hook has no position yet."""
        row = self.db.execute("SELECT delivered_run FROM hook_deliveries WHERE hook = ?", [self.hook.name]).fetchone()
        return None if row is None else int(row[0])

    def deliver(self, cancelled: threading.Event | None = None) -> list[Delivery]:
        """Send the runs after the position, oldest first, until one fails or none is left."""
        deliveries: list[Delivery] = []
        while not (cancelled and cancelled.is_set()):
            position, last = self.position() or 0, _last_finished_run(self.db)
            run_id = self._next_run(position, last)
            if run_id is None:
                # the runs in between had nothing for this hook: move past them, so that
                # their changes are not looked through again (unchanged runs have none,
                # and cost no write)
                if _any_changes(self.db, position, last):
                    self._record(last, None)
                break
            delivery = self._send(run_id, cancelled)
            self._record(run_id, delivery)
            deliveries.append(delivery)
            if not delivery.delivered:
                break
        return deliveries

    def _next_run(self, after: int, last: int) -> int | None:
        """The first finished run after ``after`` with changes for this hook."""
        view, where, params = change_query(self.hook)
        row = self.db.execute(
            f"SELECT min(run_id) FROM {view} WHERE run_id > ? AND run_id <= ?{where}", [after, last, *params]
        ).fetchone()
        return None if row[0] is None else int(row[0])

    def _send(self, run_id: int, cancelled: threading.Event | None) -> Delivery:
        began = time.monotonic()
        with tempfile.TemporaryFile() as payload:
            changes = self._spool(run_id, payload)
            payload.seek(0)
            if self.hook.command:
                delivered, detail = _run_command(self.hook, run_id, payload, self.database, cancelled, self.lock_fd)
            else:
                delivered, detail = _post(self.hook, run_id, payload, cancelled)
        took = time.monotonic() - began
        delivery = Delivery(self.hook.name, run_id, changes, delivered, detail)
        if delivered:
            log.info("hook %s: run %d delivered (%d changes, %.1fs)%s", self.hook.name, run_id, changes, took, detail)
        else:
            log.warning(
                "hook %s: run %d not delivered (%d changes): %s; it is sent again, before later runs, after the next run",
                self.hook.name, run_id, changes, detail,
            )
        return delivery

    def _spool(self, run_id: int, out: t.IO[bytes]) -> int:
        """Write the run's changes for this hook to ``out`` (JSON lines for a command, the
        POST body for a URL); return how many. Read in full before any call is made, so
        no read lock is held on the database while a hook runs."""
        view, where, params = change_query(self.hook)
        rows = self.db.query(
            f"SELECT * FROM {view} WHERE run_id = ?{where} ORDER BY group_id, identity_id, change",
            [run_id, *params],
        )
        count = 0
        if self.hook.command:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
                count += 1
            return count
        at = self.db.execute("SELECT started_at FROM sync_runs WHERE id = ?", [run_id]).fetchone()[0]
        head = json.dumps({"hook": self.hook.name, "run_id": run_id, "at": at}, ensure_ascii=False)
        out.write(head[:-1].encode() + b', "changes": [')
        for row in rows:
            out.write((b", " if count else b"") + json.dumps(row, ensure_ascii=False).encode())
            count += 1
        out.write(b"]}")
        return count

    def _record(self, run_id: int, delivery: Delivery | None) -> None:
        """Move the position to ``run_id`` (delivered, or nothing to send), or note a failed call."""
        now = utc_now()
        with self.db.atomic():
            if delivery is None or delivery.delivered:
                self.db.execute(
                    "UPDATE hook_deliveries SET delivered_run = max(delivered_run, ?), delivered_at = ?,"
                    " attempted_at = coalesce(?, attempted_at), failing_run = NULL, error = NULL, failures = 0"
                    " WHERE hook = ?",
                    [run_id, now, now if delivery else None, self.hook.name],
                )
            else:
                # the runs before it had nothing for this hook: the position moves up to it
                self.db.execute(
                    "UPDATE hook_deliveries SET delivered_run = max(delivered_run, ?), attempted_at = ?,"
                    " failures = CASE WHEN failing_run = ? THEN failures + 1 ELSE 1 END, failing_run = ?, error = ?"
                    " WHERE hook = ?",
                    [run_id - 1, now, run_id, run_id, delivery.detail, self.hook.name],
                )


def _any_changes(db: sqlite_utils.Database, after: int, last: int) -> bool:
    """Whether any run after ``after``, up to ``last``, recorded changes (events or observations)."""
    row = db.execute("SELECT 1 FROM membership_changes WHERE run_id > ? AND run_id <= ? LIMIT 1", [after, last]).fetchone()
    return row is not None


def _last_finished_run(db: sqlite_utils.Database) -> int:
    """The latest run id up to which every run has finished: a run still in progress
    (or left running by a crash, until the next run marks it aborted) is not passed."""
    row = db.execute(
        "SELECT coalesce((SELECT min(id) - 1 FROM sync_runs WHERE status = 'running'), (SELECT max(id) FROM sync_runs), 0)"
    ).fetchone()
    return int(row[0])


def _run_command(
    hook: HookConfig, run_id: int, payload: t.IO[bytes], database: Path, cancelled: threading.Event | None,
    lock_fd: int | None = None,
) -> tuple[bool, str]:
    """Run the hook's command with the changes on stdin; True if it exits 0 within its timeout.

    It runs under a keeper (``syncer/operations/hook_supervisor.py``) that ends every process of
    the command, its children and their children included, when the command exits,
    at the timeout, or when this process goes, however (kill -9 too): a call is over
    only when all of it is gone, so calls of one hook never overlap.
    """
    assert hook.command is not None
    env = hook_environment(os.environ)
    env.update(SYNCER_HOOK=hook.name, SYNCER_RUN_ID=str(run_id), SYNCER_DATABASE=str(database))
    control_read, control = os.pipe()  # only this process writes: its end closes with it
    status, status_write = os.pipe()
    keep = (control_read, status_write) + (() if lock_fd is None else (lock_fd,))
    try:
        with tempfile.TemporaryFile() as output:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", str(KEEPER), str(control_read), str(status_write), "--", *hook.command],
                    stdin=payload, stdout=output, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True, pass_fds=keep,
                )
            except OSError as err:
                return False, f"cannot start the hook's keeper: {err.strerror or err}"
            finally:
                os.close(control_read)
                os.close(status_write)
            stopped = _wait_bounded(lambda seconds: _exited(proc, seconds), hook.timeout, cancelled)
            os.close(control)  # the keeper ends whatever of the command is left, then exits
            control = -1
            _reap_keeper(proc)
            with os.fdopen(status, "rb") as answer:
                status = -1
                said = answer.read()
            output.seek(0)
            shown = _excerpt(output.read(OUTPUT_LOGGED * 4 + 1))
    finally:
        for fd in (control, status):
            if fd >= 0:
                os.close(fd)
    return _verdict(stopped, said, shown)


def _reap_keeper(proc: subprocess.Popen[bytes]) -> None:
    """Wait for the keeper to end the command and exit (killing it would leave the
    command's processes behind, so it is killed only if it does not answer)."""
    try:
        proc.wait(timeout=KEEPER_GRACE)
    except subprocess.TimeoutExpired:
        log.warning("hook keeper %d did not exit in %gs after it was told to stop; killed", proc.pid, KEEPER_GRACE)
        proc.kill()
        proc.wait()


def _verdict(stopped: str | None, said: bytes, shown: str) -> tuple[bool, str]:
    """Whether a command's call delivered, and what to log, from the keeper's answer."""
    if stopped:
        return False, f"{stopped}: killed{shown}"
    try:
        outcome = json.loads(said)
    except ValueError:
        return False, f"the hook's keeper ended without an answer{shown}"
    if "error" in outcome:
        return False, str(outcome["error"]) + shown
    returncode = outcome.get("returncode")
    if returncode == 0:
        return True, shown
    if not isinstance(returncode, int):
        return False, f"stopped{shown}"
    status = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    return False, status + shown


def _post(hook: HookConfig, run_id: int, payload: t.IO[bytes], cancelled: threading.Event | None) -> tuple[bool, str]:
    """POST the changes to the hook's URL; True on a 2xx answer within the timeout.

    The request runs in a daemon thread, so the timeout bounds the whole call (requests'
    own bounds each socket operation only) and a stop does not wait for it. The URL is
    never logged: webhook URLs often hold a secret.
    """
    outcome: list[tuple[bool, str]] = []
    thread = threading.Thread(target=lambda: outcome.append(_request(hook, run_id, payload)), name="syncer-hook", daemon=True)
    thread.start()
    stopped = _wait_bounded(lambda seconds: _joined(thread, seconds), hook.timeout, cancelled)
    return (False, stopped) if stopped else outcome[0]


def _request(hook: HookConfig, run_id: int, payload: t.IO[bytes]) -> tuple[bool, str]:
    import requests  # here, not at the top: only URL hooks need it, and it takes a while to import

    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": f"{hook.name}:{run_id}",
        "User-Agent": f"syncer/{__version__}",
    }
    assert hook.url is not None
    register_url_secret(hook.url)
    try:
        response = requests.post(
            hook.url, data=payload, headers=headers, timeout=hook.timeout, allow_redirects=False, stream=True
        )
        with response:
            shown = _excerpt(next(response.iter_content(OUTPUT_LOGGED * 4 + 1), b""))
    except requests.Timeout:
        return False, f"timed out after {hook.timeout:g}s"
    except requests.RequestException as err:
        return False, f"cannot reach the URL ({describe_request_error(err)})"
    except (OSError, ValueError) as err:  # the payload closed under it: the call was abandoned
        return False, type(err).__name__
    if 200 <= response.status_code < 300:
        return True, shown
    return False, f"HTTP {response.status_code}" + shown


def _wait_bounded(finished: t.Callable[[float], bool], timeout: float, cancelled: threading.Event | None) -> str | None:
    """Wait until ``finished(seconds)`` (which may block that long) is true; else say why
    waiting stopped: the timeout, or syncer shutting down."""
    deadline = time.monotonic() + timeout
    while not finished(min(0.2, max(deadline - time.monotonic(), 0.01))):
        if cancelled is not None and cancelled.is_set():
            return "stopped: syncer is shutting down"
        if time.monotonic() >= deadline:
            return f"timed out after {timeout:g}s"
    return None


def _joined(thread: threading.Thread, seconds: float) -> bool:
    thread.join(seconds)
    return not thread.is_alive()


def _exited(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True


def _excerpt(raw: bytes) -> str:
    """Output or an answer body for the log: at most OUTPUT_LOGGED characters, redacted."""
    text = raw.decode("utf-8", errors="replace").strip()
    if not text:
        return ""
    if len(text) > OUTPUT_LOGGED:
        text = text[:OUTPUT_LOGGED] + " [...]"
    return f"; output: {redact(text)}"


def find_hook(config: Config, name: str) -> HookConfig | None:
    """The configured hook called ``name``, if any."""
    return next((hook for hook in config.hooks if hook.name == name), None)
