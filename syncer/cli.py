"""The ``syncer`` command line: thin click commands over the modules that do the work.

Every failure a user can cause or meet ends as one line on stderr and a documented
exit code (see ``syncer.errors``); a traceback means a bug.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import typing as t

import click

from syncer import __version__
from syncer.config import Config, load_config, parse_duration
from syncer.errors import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, SyncerError
from syncer.logs import configure as configure_logging
from syncer.logs import redact

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
    """Turns SyncerError into one line and its exit code; anything else too, but as a bug."""

    def invoke(self, ctx: click.Context) -> t.Any:
        try:
            return super().invoke(ctx)
        except SyncerError as err:
            click.echo(f"syncer: error: {_one_line(str(err))}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("syncer: interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as err:  # last resort: one line, not a traceback
            log.debug("unexpected error", exc_info=True)
            reason = f"{type(err).__name__}: {_one_line(str(err))}"
            click.echo(f"syncer: internal error: {reason} (run with -vv for details)", err=True)
            ctx.exit(EXIT_FAILED)


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
    from syncer.client_secret import load_client_secret
    from syncer.login import confirm_client_credentials
    from syncer.login import login as do_login
    from syncer.token_store import TokenStore

    config = settings.config(warn_client=True)
    secret = load_client_secret(config)
    if secret is not None:
        confirm_client_credentials(config, secret, say=click.echo)
        return
    with TokenStore(config.token_storage) as store:
        existing = store.groups_tokens()
        usable = existing is not None and existing.refresh_token and not store.is_rejected(existing.refresh_token)
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
    from syncer.auth import logout as do_logout
    from syncer.auth import open_token_store
    from syncer.client_secret import load_client_secret

    config = settings.config()
    secret = load_client_secret(config)
    with open_token_store(config, secret) as store:
        do_logout(config, store, say=click.echo, secret=secret)


@cli.command()
@click.pass_context
def sync(ctx: click.Context) -> None:
    """Take one snapshot, then exit (for cron or a systemd timer)."""
    from syncer.reporting import sync_and_report

    config = ctx.obj.config()
    cancelled = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("received %s: stopping this run", signal.Signals(signum).name)
        cancelled.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    progress = _terminal_progress() if sys.stderr.isatty() else None
    run = sync_and_report(config, cancelled=cancelled, progress=progress)
    if progress:
        click.echo("", err=True)
    # the run's summary is run_sync's log line: printed here too, it reached the journal
    # (and cron's mail) twice
    ctx.exit(EXIT_PARTIAL if run.status == "partial" else EXIT_OK)


def _terminal_progress() -> t.Callable[[int, int], None]:
    def show(done: int, total: int) -> None:
        click.echo(f"\rreading groups: {done}/{total}", nl=False, err=True)

    return show


@cli.command()
@click.option("--interval", callback=_duration, metavar="DURATION", help="Override `interval` (e.g. 30s, 15m).")
@click.pass_context
def run(ctx: click.Context, interval: float | None) -> None:
    """Run the scheduler: a snapshot now, then every interval, until SIGTERM."""
    from syncer.scheduler import run_daemon

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
    from syncer.status import render_text, report

    data, health = report(ctx.obj.config())
    if output_format == "prometheus":
        from syncer.metrics import render_metrics

        click.echo(render_metrics(data), nl=False)
    else:
        click.echo(json.dumps(data, indent=2) if as_json or output_format == "json" else render_text(data))
    ctx.exit(health.exit_code)


@cli.group()
def hooks() -> None:
    """Hooks: each run's changes sent to commands and URLs (see `[[hooks]]` in the configuration)."""


@hooks.command()
@click.argument("name")
@click.option("--since", required=True, metavar="WHEN", help="YYYY-MM-DD, an ISO date-time, a span ago (7d) or run:N.")
@click.pass_context
def replay(ctx: click.Context, name: str, since: str) -> None:
    """Send hook NAME the runs since WHEN again (or for the first time: a hook starts with the run after it was added)."""
    import datetime as dt

    from syncer.hooks import find_hook
    from syncer.hooks import replay as replay_hook
    from syncer.when import parse_when

    config = ctx.obj.config()
    hook = find_hook(config, name)
    if hook is None:
        known = ", ".join(h.name for h in config.hooks) or "none configured"
        raise _BadValue(f"no hook named {name!r} (hooks: {known})")
    try:
        when = parse_when(since, dt.datetime.now(dt.UTC))
    except ValueError as err:
        raise _BadValue(f"--since: {err}") from None
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
@click.option("--dir", "folder", metavar="DIR", help="Where to put the demo's database (default: a new temporary folder).")
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
@click.option("--world", "world_file", metavar="FILE", help="Load the world from a world file (JSON; see README).")
@click.option("--state", "state_file", metavar="FILE",
              help="Keep the world and issued tokens in FILE across restarts (restored when it exists).")
@click.option("--seed", default=1, show_default=True, help="Seed for the generated world.")
@click.option("--fault-rate", default=0.0, show_default=True, callback=_in_range(0, 1),
              help="Share of group reads that fail at random (0 to 1).")
def simulate(
    port: int, groups: int, members: int, latency_ms: int, token_lifetime: int,
    world_file: str | None, state_file: str | None, seed: int, fault_rate: float,
) -> None:
    """Serve a simulated Globus Auth + Groups on 127.0.0.1 until interrupted.

    Opening its login URL approves at once. Change its world while it runs with
    POST /admin/ACTION (add-member, remove-member, set-role, set-status, leave,
    rename-group, add-client); GET /admin/world shows it. See README: The simulator.
    """
    from syncer.errors import ConfigError
    from syncer.simulator import SimulatorSetupError, serve_cli

    try:
        serve_cli(
            port=port, groups=groups, members=members, latency_ms=latency_ms,
            token_lifetime=token_lifetime, world_file=world_file, state_file=state_file,
            seed=seed, fault_rate=fault_rate, say=click.echo,
        )
    except SimulatorSetupError as err:
        raise (ConfigError(str(err)) if err.config else SyncerError(str(err))) from None


def main() -> None:
    cli(prog_name="syncer")
