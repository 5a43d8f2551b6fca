"""`syncer` run inside the test process, through click's ``CliRunner``.

Most commands need no process of their own: what a test checks is the exit code, the
output and what the command left in the database and the token store. Run in-process
they cost milliseconds instead of an interpreter start and ~0.5 s of imports, and the
same code runs (``syncer.cli.cli``, the real globus_sdk talking HTTP to the simulator).

What a process gives that this does not (signals, a daemon, a crash, another user, an
interpreter's exit, memory peaks, file descriptors) stays with ``Env.run(process=True)``
and ``Env.popen``.

A command here sees exactly the environment and working folder a subprocess would
(``os.environ`` is replaced, not merged), and everything it changes in the process is put
back: the environment, the folder, the signal handlers, the logging set-up and the
secrets it redacts. Warnings
follow Python's default filters and go to the command's stderr, as a process prints them.
An exception
that escapes the command is printed to stderr as Python would print it, and the exit code
is 1, so the tests' "never a traceback" checks see it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import traceback
import typing as t
import warnings
from pathlib import Path

from click.testing import CliRunner

from syncer import logs
from syncer.cli import cli

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Outcome(t.NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    stdout_bytes: bytes  # as written, for the formats that must be lossless


class _LoginUser(io.RawIOBase):
    """stdin for ``syncer login --no-browser``: at the first read, take the URL the
    command has printed so far, do the browser's part and answer with the code."""

    def __init__(self, authorize: t.Callable[[str], str]) -> None:
        self.authorize = authorize
        self.answer: bytes | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: t.Any) -> int:
        if len(buffer) == 0:
            return 0
        if self.answer is None:
            sys.stdout.flush()
            printed = sys.stdout.buffer.getvalue().decode()
            url = next((line for line in printed.splitlines() if line.startswith("http")), None)
            self.answer = b"" if url is None else (self.authorize(url) + "\n").encode()
        n = min(len(buffer), len(self.answer))
        buffer[:n] = self.answer[:n]
        self.answer = self.answer[n:]
        return n


def _logger_levels() -> dict[str, int]:
    """Every logger's own level, the root's under ""."""
    loggers = logging.root.manager.loggerDict
    levels = {name: logger.level for name, logger in loggers.items() if isinstance(logger, logging.Logger)}
    return {"": logging.root.level, **levels}


@contextlib.contextmanager
def _as_a_process(variables: dict[str, str], cwd: Path) -> t.Iterator[None]:
    """The process state a command may read or change, set as for a subprocess and restored."""
    saved_environ = dict(os.environ)
    saved_cwd = os.getcwd()
    saved_signals = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    saved_levels = _logger_levels()
    saved_handlers = list(logging.getLogger().handlers)
    # the values redacted from log lines: a new process knows none (and one command's
    # secrets must not blank out the next one's output)
    saved_secrets = set(logs._SECRETS)
    logs._SECRETS.clear()
    os.environ.clear()
    os.environ.update(variables)
    os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            # Python's own filters, not pytest's: a warning a user would see on stderr is
            # printed there (to the command's stderr), not collected by pytest
            warnings.resetwarnings()
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", quiet)
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved_environ)
        os.chdir(saved_cwd)
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)
        for name in _logger_levels():  # the demo quietens syncer.sync, -v raises others
            logging.getLogger(name or None).setLevel(saved_levels.get(name, logging.NOTSET))
        logging.getLogger().handlers[:] = saved_handlers
        logs._SECRETS.clear()
        logs._SECRETS.update(saved_secrets)


def invoke(
    args: t.Sequence[str],
    variables: dict[str, str],
    cwd: Path,
    input: str | None = None,  # noqa: A002 - as subprocess.run names it
    authorize: t.Callable[[str], str] | None = None,
) -> Outcome:
    """Run ``syncer ARGS`` in this process; ``authorize`` plays the browser for a login."""
    stdin: t.Any = io.BufferedReader(_LoginUser(authorize)) if authorize is not None else input
    with _as_a_process(variables, cwd):
        result = CliRunner().invoke(cli, list(args), input=stdin, prog_name="syncer", catch_exceptions=True)
    stderr = result.stderr
    code = result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
        code = 1
    return Outcome(code, result.stdout, stderr, result.stdout_bytes)
