"""The ``syncer`` command line: thin click commands over the modules that do the work.

Every failure a user can cause or meet ends as one line on stderr and a documented
exit code (see ``syncer.errors``); a traceback means a bug.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import typing as t
from pathlib import Path

import click

from syncer import __version__
from syncer.config import Config, ConfigProblems, load_config, parse_duration
from syncer.errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, SyncerError
from syncer.logs import configure as configure_logging
from syncer.logs import redact

if t.TYPE_CHECKING:
    from syncer.storage.database import OutputDatabase

log = logging.getLogger("syncer")


class _Settings(t.NamedTuple):
    config_path: str | None

    def config(self, warn_client: bool = False) -> Config:
        config = load_config(self.config_path)
        if warn_client and config.uses_tutorial_client:
            log.warning(
                "using the Globus tutorial client ID; register your own native app at"
                " https://app.globus.org/settings/developers and set client_id"
            )
        return config


class SyncerGroup(click.Group):
    """Turns SyncerError into one line and its exit code; anything else too, but as a bug.

    Usage errors too: click's own (an unknown option, a missing argument, a value not
    among the choices) are one ``syncer: error:`` line with exit 2, as ours are, not
    click's three-line block.
    """

    def main(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        standalone = kwargs.pop("standalone_mode", True)
        if not standalone:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as err:
            click.echo(f"syncer: error: {_usage_message(err)}", err=True)
            sys.exit(err.exit_code)
        except click.exceptions.Abort:  # end of input or ^C while click prompted
            click.echo("syncer: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else EXIT_OK)

    def invoke(self, ctx: click.Context) -> t.Any:
        try:
            return super().invoke(ctx)
        except SyncerError as err:
            for line in err.problems if isinstance(err, ConfigProblems) else (str(err),):  # each problem a line
                click.echo(f"syncer: error: {_one_line(line)}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("syncer: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            # the reader went away (`syncer changes | head`): nothing to say, and stdout
            # pointed at /dev/null so that flushing it at exit does not fail again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(EXIT_FAILED)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as err:  # last resort: one line, not a traceback
            log.debug("unexpected error", exc_info=True)
            reason = f"{type(err).__name__}: {_one_line(str(err))}"
            click.echo(f"syncer: internal error: {reason} (run with -vv for details)", err=True)
            ctx.exit(EXIT_FAILED)


def _usage_message(err: click.ClickException) -> str:
    """A click error as one line, naming where to read the usage."""
    message = _one_line(err.format_message())
    ctx = getattr(err, "ctx", None)
    # a bad value names its option already; an unknown option or a missing one needs the usage
    names_the_option = isinstance(err, click.BadParameter) and not isinstance(err, click.MissingParameter)
    if isinstance(err, click.UsageError) and ctx is not None and not names_the_option:
        message += f" (see `{ctx.command_path} --help`)"
    return message


def _one_line(message: str) -> str:
    """An error message as one line, tokens redacted: it may quote Globus (a group's
    name, an error's detail), whose text can hold line breaks."""
    return " ".join(redact(message).split())


class _BadValue(click.BadParameter):
    """A bad option value: one line on stderr and exit 2, like every other error here."""

    def show(self, file: t.IO[t.Any] | None = None) -> None:
        click.echo(f"syncer: error: {self.format_message()}", err=True)


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as err:
        raise _BadValue(str(err)) from None
    if seconds <= 0:
        raise _BadValue("must be greater than zero")
    return seconds


@click.group(cls=SyncerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="FILE", help="Configuration file (TOML).")
@click.option("-v", "--verbose", count=True, help="More logging (-vv: also libraries).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.version_option(__version__, prog_name="syncer")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int, quiet: bool, log_format: str) -> None:
    """Snapshot Globus group memberships into SQLite, with full change history."""
    configure_logging(-1 if quiet else verbose, log_format)
    ctx.obj = _Settings(config_path)


@cli.command()
@click.option("--no-browser", is_flag=True, help="Print the login URL and read the code from stdin.")
@click.option("--force", is_flag=True, help="Log in again even if tokens are stored.")
@click.pass_obj
def login(settings: _Settings, no_browser: bool, force: bool) -> None:
    """Log in to Globus (once); tokens go to the token store.

    Opens a browser where one can be opened (honouring $BROWSER) and receives the
    code on a local redirect; otherwise, or with --no-browser, prints the URL and
    reads the code you paste.
    """
    from syncer.globus.client_secret import load_client_secret
    from syncer.globus.login import confirm_client_credentials
    from syncer.globus.login import login as do_login
    from syncer.globus.token_store import TokenStore

    config = settings.config(warn_client=True)
    secret = load_client_secret(config)
    if secret is not None:
        confirm_client_credentials(config, secret, say=click.echo)
        return
    with TokenStore(config.token_storage) as store:
        existing = store.groups_tokens()
        usable = (
            existing is not None and existing.refresh_token and not store.is_rejected(existing.refresh_token)
            and store.issued_here()  # another Auth's tokens (the simulator's) are no login here
        )
        if usable and not force:
            click.echo(f"Already logged in (tokens in {store.path}); use --force to log in again.")
            return
        do_login(config, store, no_browser=no_browser, read_code=_read_code, say=click.echo)


def _read_code(url: str) -> str:
    """One line from stdin: the pasted authorization code (a prompt only on a terminal)."""
    if sys.stdin is None:  # started with no stdin at all
        raise SyncerError("no authorization code: there is no input to read it from; nothing changed")
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo("Authorization code: ", nl=False, err=True)
    line = sys.stdin.readline()
    if not line:
        if interactive:
            click.echo("", err=True)
        raise SyncerError("no authorization code: end of input; nothing changed")
    return line


@cli.command()
@click.pass_obj
def logout(settings: _Settings) -> None:
    """Revoke the stored tokens at Globus Auth and delete them."""
    from syncer.globus.auth import logout as do_logout
    from syncer.globus.auth import open_token_store
    from syncer.globus.client_secret import load_client_secret

    config = settings.config()
    secret = load_client_secret(config)
    with open_token_store(config, secret) as store:
        do_logout(config, store, say=click.echo, secret=secret)


@cli.command()
@click.pass_context
def sync(ctx: click.Context) -> None:
    """Take one snapshot, then exit (for cron or a systemd timer)."""
    from syncer.operations.run_effects import sync_with_effects

    config = ctx.obj.config()
    cancelled = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("received %s: stopping this run", signal.Signals(signum).name)
        cancelled.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    with _TerminalProgress.on_stderr() as progress:
        run = sync_with_effects(config, cancelled=cancelled, progress=progress.show if progress else None)
    # the run's summary is run_sync's log line: printed here too, it reached the journal
    # (and cron's mail) twice
    ctx.exit(EXIT_PARTIAL if run.status == "partial" else EXIT_OK)


class _TerminalProgress(logging.Filter):
    """"reading groups: N/M" on one terminal line, erased before any log line (the
    summary among them) is written and at the end, so no line starts mid-progress."""

    _ERASE = "\r\x1b[K"  # to the line's start, then clear it

    def __init__(self) -> None:
        super().__init__()
        self.shown = False

    @classmethod
    @contextlib.contextmanager
    def on_stderr(cls) -> t.Iterator[_TerminalProgress | None]:
        """A progress line while stderr is a terminal (None otherwise), hooked to the log handlers."""
        if not sys.stderr.isatty():
            yield None
            return
        progress = cls()
        handlers = list(logging.getLogger().handlers)
        for handler in handlers:
            handler.addFilter(progress)
        try:
            yield progress
        finally:
            for handler in handlers:
                handler.removeFilter(progress)
            progress.clear()

    def show(self, done: int, total: int) -> None:
        click.echo(f"{self._ERASE}reading groups: {done}/{total}", nl=False, err=True)
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            click.echo(self._ERASE, nl=False, err=True)
            self.shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        self.clear()  # a log line is about to be written: take the progress off its line first
        return True


@cli.command()
@click.option("--interval", callback=_duration, metavar="DURATION", help="Override `interval` (e.g. 30s, 15m).")
@click.pass_context
def run(ctx: click.Context, interval: float | None) -> None:
    """Run the scheduler: a snapshot now, then every interval, until SIGTERM."""
    from syncer.operations.scheduler import run_daemon

    ctx.exit(run_daemon(ctx.obj.config(warn_client=True), interval))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (same as --format json).")
@click.option(
    "--format", "output_format", type=click.Choice(["text", "json", "prometheus"]), default="text", show_default=True,
    help="prometheus: the Prometheus text format, as in `metrics_file`.",
)
@click.pass_context
def status(ctx: click.Context, as_json: bool, output_format: str) -> None:
    """Last runs, token state, hooks' backlog and database figures; the exit code is a health check."""
    from syncer.operations.status import render_text, status_report

    report = status_report(ctx.obj.config())
    if output_format == "prometheus":
        from syncer.operations.metrics import render_metrics

        click.echo(render_metrics(report), nl=False)
    else:
        click.echo(json.dumps(report.to_json(), indent=2) if as_json or output_format == "json" else render_text(report))
    ctx.exit(report.health.exit_code)


@cli.group()
def hooks() -> None:
    """Hooks: each run's changes sent to commands and URLs (see `[[hooks]]` in the configuration)."""


@hooks.command()
@click.argument("name")
@click.option("--since", required=True, metavar="WHEN", help="YYYY-MM-DD, an ISO date-time, a span ago (7d) or run:N.")
@click.pass_context
def replay(ctx: click.Context, name: str, since: str) -> None:
    """Send hook NAME the runs since WHEN again (or for the first time: a hook starts with the run after it was added)."""
    from syncer.operations.hooks import find_hook
    from syncer.operations.hooks import replay as replay_hook
    from syncer.storage.queries import check_period
    from syncer.storage.when import parse_when

    config = ctx.obj.config()
    hook = find_hook(config, name)
    if hook is None:
        known = ", ".join(h.name for h in config.hooks) or "none configured"
        raise _BadValue(f"no hook named {name!r} (hooks: {known})")
    when = parse_when(since)
    with _reading(ctx.obj) as db:  # a run:N that does not exist is a usage error, as in the query commands
        check_period(db, when, None)
    first, deliveries = replay_hook(config, hook, when)
    if first is None:
        click.echo(f"no run since {since}: nothing to replay")
        return
    for delivery in deliveries:
        state = "delivered" if delivery.delivered else f"NOT delivered: {delivery.detail}"
        click.echo(f"run {delivery.run_id}: {delivery.changes} change(s) {state}")
    if deliveries and not deliveries[-1].delivered:
        click.echo(f"hook {name}: stopped at run {deliveries[-1].run_id}; it is retried after the next run", err=True)
        ctx.exit(EXIT_FAILED)
    click.echo(f"hook {name}: up to date from run {first} on ({len(deliveries)} call(s))")


@cli.command()
@click.option("--groups", default=6, show_default=True, help="Groups in the simulated world.")
@click.option("--members", default=8, show_default=True, help="Members per group.")
@click.option("--dir", "folder", metavar="DIR", help="Where to put the demo's database (default: a folder of its own in your"
              " user data folder, replaced at every demo; never your real database).")
@click.pass_context
def demo(ctx: click.Context, groups: int, members: int, folder: str | None) -> None:
    """The whole flow on this machine, offline, against the built-in simulator."""
    from syncer.demo import run_demo

    if ctx.parent and not ctx.parent.params["verbose"]:
        logging.getLogger("syncer.sync").setLevel(logging.WARNING)  # the demo narrates runs itself
    run_demo(groups=groups, members=members, folder=folder, say=click.echo)


def _in_range(low: float, high: float) -> t.Callable[[click.Context, click.Parameter, t.Any], t.Any]:
    """An option callback: the value must lie in [low, high], else one line and exit 2."""

    def check(ctx: click.Context, param: click.Parameter, value: t.Any) -> t.Any:
        if not low <= value <= high:
            raise _BadValue(f"{value:g} is out of range: must be between {low:g} and {high:g}", param=param)
        return value

    return check


@cli.command()
@click.option("--port", default=8765, show_default=True, callback=_in_range(0, 65535),
              help="Port on 127.0.0.1 (0: any free port).")
@click.option("--groups", default=20, show_default=True, callback=_in_range(1, 1_000_000))
@click.option("--members", default=10, show_default=True, callback=_in_range(1, 100_000))
@click.option("--latency-ms", default=0, show_default=True, callback=_in_range(0, 600_000),
              help="Added to every response.")
@click.option("--token-lifetime", default=3600, show_default=True, callback=_in_range(1, 365 * 86400),
              help="Access token lifetime (s).")
@click.option("--world", "world_file", metavar="FILE",
              help="Load the world from a world file (JSON; see docs/simulator.md).")
@click.option("--state", "state_file", metavar="FILE",
              help="Keep the world and issued tokens in FILE across restarts (restored when it exists).")
@click.option("--seed", default=1, show_default=True, help="Seed for the generated world.")
@click.option("--fault-rate", default=0.0, show_default=True, callback=_in_range(0, 1),
              help="Share of group reads that fail at random (0 to 1).")
@click.option("--tls-cert", metavar="FILE", type=click.Path(dir_okay=False),
              help="Serve HTTPS with this PEM certificate (chain); needs --tls-key.")
@click.option("--tls-key", metavar="FILE", type=click.Path(dir_okay=False), help="The certificate's private key (PEM).")
@click.option("--dir", "syncer_dir", metavar="DIR",
              help="Folder for syncer's database and token store while it talks to this simulator"
              " (default: STATE.syncer beside --state, else a temporary folder removed at exit).")
def simulate(
    port: int, groups: int, members: int, latency_ms: int, token_lifetime: int,
    world_file: str | None, state_file: str | None, seed: int, fault_rate: float,
    tls_cert: str | None, tls_key: str | None, syncer_dir: str | None,
) -> None:
    """Serve a simulated Globus Auth + Groups on 127.0.0.1 until interrupted.

    Opening its login URL approves at once. Change its world while it runs with
    POST /admin/ACTION (add-member, remove-member, set-role, set-status, leave,
    rename-group, add-client); GET /admin/world shows it. See docs/simulator.md.

    Besides the SDK's variables it prints SYNCER_DATABASE and SYNCER_TOKEN_STORAGE
    for a folder of its own: export all four, and the simulator's tokens and
    history stay out of your real store.
    """
    from syncer.errors import ConfigError
    from syncer.simulator import SimulatorSetupError, TLSFiles, serve_cli

    if (tls_cert is None) != (tls_key is None):
        raise _BadValue("--tls-cert and --tls-key go together")
    if world_file and state_file and Path(state_file).exists():
        raise _BadValue(
            f"the state file {state_file} exists and holds its own world; give --world or an existing --state,"
            " not both (delete the state file to start again from the world file)", param_hint="'--world'",
        )
    try:
        serve_cli(
            port=port, groups=groups, members=members, latency_ms=latency_ms,
            token_lifetime=token_lifetime, world_file=world_file, state_file=state_file,
            seed=seed, fault_rate=fault_rate, syncer_dir=syncer_dir, say=click.echo,
            tls=TLSFiles(tls_cert, tls_key) if tls_cert and tls_key else None,
        )
    except SimulatorSetupError as err:
        raise (ConfigError(str(err)) if err.config else SyncerError(str(err))) from None


# ------------------------------------------------------------ asking the database
# members / changes / groups / identity only read: the database is opened read-only
# (read permission on the file is enough, and so is a copy of it), the sync lock is
# never taken, and a run that is committing is waited for (busy_timeout).


def _when(ctx: click.Context, param: click.Parameter, value: str | None) -> t.Any:
    from syncer.storage.when import parse_when

    return None if value is None else parse_when(value)


def _format_option(command: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    from syncer.output import FORMATS

    return click.option(
        "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
        help="table for people (fits the terminal); csv, tsv, json (one array) or jsonl for scripts.",
    )(command)


def _reading(settings: _Settings) -> OutputDatabase:
    """The configured output database, open for reading (see ``open_for_reading``:
    whatever the file holds, a failure is one line, exit 1)."""
    from syncer.storage.database import open_for_reading

    config = settings.config()
    return open_for_reading(config.database, config.busy_timeout)


def _note(text: str) -> None:
    click.echo(f"syncer: note: {text}", err=True)


def _emit(
    rows: t.Sequence[t.Sequence[t.Any]], fields: t.Sequence[str], fmt: str, nothing: str, layout: t.Any = None,
) -> None:
    """The rows on stdout: a table (fitted to a terminal, full to a pipe or a file, its
    notes on stderr) or a machine format, written as bytes, exactly."""
    from syncer.output import render, table, write_stdout

    if fmt != "table":
        write_stdout(render(rows, fields, fmt))
        return
    if not rows:
        _note(nothing)
        return
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    shown = table(rows, fields, width, layout)
    write_stdout(shown.text)
    for note in shown.notes:
        _note(note)


def _visibility_note(db: t.Any, group: t.Any, run: t.Any, what: str | None, every_status: bool = False) -> None:
    """Say what the identity could see of a group as of a run, where it could not see
    everything. ``what``: what that means for the answer; None: say what is recorded,
    counted from the stored memberships rather than assumed from the group's label."""
    from syncer.storage import queries

    version = queries.group_version(db, group.id, run.id)
    if version is None:
        _note(f"group {group.name!r} ({group.id}) was not among your groups as of run {run.id}")
    elif not version.members_visible:
        if what is None:
            recorded = len(queries.members(db, group.id, run.id, every_status=True))
            what = "only your own membership is recorded" if recorded else "no membership of it is recorded"
        _note(
            f"the members of {version.name!r} were not visible to your identity as of run {run.id}"
            f" (members_visible = 0): {what}"
        )
    elif every_status and version.members_view == "active":
        _note(
            f"your identity saw only the active memberships of {version.name!r} as of run {run.id}"
            " (members_view = 'active'): other statuses are not known"
        )


def _groups_count(count: int, what: str) -> str:
    """'1 of these groups does', '2 of these groups do': a count with its verb agreeing."""
    return f"{count} of {what} {'does' if count == 1 else 'do'}"


@cli.command("members")
@click.argument("group")
@click.option("--at", callback=_when, metavar="WHEN", help="As of WHEN (2026-06-01, 2026-06-01T09:30Z, 7d, run:42).")
@click.option("--all", "every_status", is_flag=True, help="Every status (invited, left, ...), not only active members.")
@_format_option
@click.pass_obj
def members_command(settings: _Settings, group: str, at: t.Any, every_status: bool, fmt: str) -> None:
    """A group's members now or as of WHEN. GROUP: its id or any name it has had."""
    from syncer import output
    from syncer.storage import queries

    with _reading(settings) as db:
        run = queries.as_of(db, at)
        found = queries.resolve_group(db, group)
        rows = queries.members(db, found.id, run.id, every_status=every_status)
        if at is not None and fmt == "table":
            _note(f"as of run {run.id} ({run.status}, started {run.started_at})")
        _visibility_note(db, found, run, None, every_status)
    _emit(rows, queries.MEMBER_FIELDS, fmt, "no members", output.MEMBERS_LAYOUT)


@cli.command("changes")
@click.option("--since", callback=_when, metavar="WHEN", help="From runs started at WHEN (default: 7d ago).")
@click.option("--until", callback=_when, metavar="WHEN", help="Through runs started at WHEN (default: now).")
@click.option("--group", metavar="GROUP", help="Only this group (id or any name it has had).")
@click.option("--user", metavar="USER", help="Only this person (username or identity id).")
@click.option("--all", "observations", is_flag=True, help="Also observations: first_seen, hidden, group_gone.")
@_format_option
@click.pass_obj
def changes_command(
    settings: _Settings, since: t.Any, until: t.Any, group: str | None, user: str | None, observations: bool, fmt: str,
) -> None:
    """Membership events in a period (default: the last 7 days), oldest first."""
    from syncer import output
    from syncer.storage import queries
    from syncer.storage.when import When, parse_when

    with _reading(settings) as db:
        since = since or parse_when("7d")._replace(text="7d, the default")
        queries.check_period(db, since, until)  # a bad period is a usage error before anything else
        queries.latest_run(db)  # no successful run yet: nothing to answer from (exit 1)
        found = queries.resolve_group(db, group) if group is not None else None
        people = queries.resolve_user(db, user) if user is not None else ()
        runs = queries.run_span(db, since, until)
        rows = queries.changes(
            db, runs, group_id=found and found.id, identity_ids=people, observations=observations
        ) if runs else []
        if found is not None and runs:
            # as of the period's last run; no committed run by then means nothing to say
            with contextlib.suppress(queries.NotFound):
                last = queries.as_of(db, When(until.text, run_id=runs[1]) if until else None)
                _visibility_note(db, found, last, "changes of other members are not known")
    _emit(rows, queries.CHANGE_FIELDS, fmt, "no changes in that period", output.CHANGES_LAYOUT)


@cli.command("groups")
@click.option("--at", callback=_when, metavar="WHEN", help="As of WHEN (2026-06-01, 2026-06-01T09:30Z, 7d, run:42).")
@_format_option
@click.pass_obj
def groups_command(settings: _Settings, at: t.Any, fmt: str) -> None:
    """Your groups now or as of WHEN: role, status, whether you see the members, active members."""
    from syncer import output
    from syncer.storage import queries

    with _reading(settings) as db:
        run = queries.as_of(db, at)
        rows = queries.current_groups(db) if at is None else queries.groups_as_of(db, run.id)
    if at is not None and fmt == "table":
        _note(f"as of run {run.id} ({run.status}, started {run.started_at})")
    hidden = sum(1 for row in rows if not row.members_visible)
    if hidden and fmt == "table":
        _note(f"{_groups_count(hidden, 'these groups')} not show your identity their members: their active_members is empty")
    _emit(rows, queries.GROUP_FIELDS, fmt, "no groups", output.GROUPS_LAYOUT)


@cli.command("identity")
@click.argument("user")
@_format_option
@click.pass_obj
def identity_command(settings: _Settings, user: str, fmt: str) -> None:
    """One person's memberships over time. USER: a username or an identity id."""
    from syncer import output
    from syncer.storage import queries

    with _reading(settings) as db:
        queries.latest_run(db)
        people = queries.resolve_user(db, user)
        rows = queries.identity_history(db, people)
        hidden = queries.hidden_groups(db)
    if hidden:
        _note(
            f"{_groups_count(hidden, 'your groups')} not show your identity their members:"
            f" {user}'s memberships there are not known"
        )
    _emit(rows, queries.IDENTITY_FIELDS, fmt, "no memberships", output.IDENTITY_LAYOUT)


@cli.command("report")
@click.option("--since", callback=_when, metavar="WHEN", help="From runs started at WHEN (default: 90d ago).")
@click.option("--until", callback=_when, metavar="WHEN", help="Through runs started at WHEN (default: now).")
@click.option("--group", metavar="GROUP", help="Only this group (id or any name it has had); default: the largest groups.")
@click.option("--output", metavar="FILE", help="The HTML file to write (required; replaced if it exists).")
@click.pass_obj
def report_command(settings: _Settings, since: t.Any, until: t.Any, group: str | None, output: str | None) -> None:
    """One self-contained HTML report (charts and tables) of a period; opens offline."""
    from pathlib import Path

    from syncer.audit_report import ReportUsageError, build_report

    if not output:  # not click's required=True: its message is a usage block, not one line
        raise ReportUsageError("--output FILE is required: the HTML file to write")

    with _reading(settings) as db:
        data, size = build_report(db, db.path, Path(output), since, until, group)
    click.echo(f"wrote {output} ({size / 1024:.0f} KiB): {data.events_total} events, {len(data.groups)} groups")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8001, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--allow-sql", is_flag=True, help="Let visitors run their own SQL (on the documented tables and views).")
@click.pass_obj
def serve(settings: _Settings, host: str, port: int, allow_sql: bool) -> None:
    """Datasette on the database, read-only, with descriptions and canned queries."""
    from syncer.storage.database import require_existing
    from syncer.web import serve as serve_datasette

    config = settings.config()
    require_existing(config.database)  # before Datasette is looked for: no database is the first thing to fix
    serve_datasette(config.database, host, port, allow_sql)


def main() -> None:
    cli(prog_name="syncer")
