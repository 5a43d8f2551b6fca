"""Logging to stderr: readable on a terminal, clean under journald, or JSON lines.

Under systemd (stderr connected to the journal, per ``$JOURNAL_STREAM``) lines carry
no timestamp of their own, since journald adds one, and start with a ``<N>`` syslog
priority prefix so ``journalctl -p warning`` works. Messages carry text from Globus
(group names, set by any group admin), so no format lets a line break in one start
what reads as a record of its own: every journald line carries the record's prefix,
text continuation lines are indented, and JSON escapes every line break. A redacting
filter replaces any known token value with ``[redacted]`` as a last line of defence:
syncer never logs tokens on purpose, but a library's debug output could carry one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

from syncer.output import escape_controls

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()

# syslog priorities for the journald prefix
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
# characters per journald line: even at 6 bytes each (a surrogate escaped as \udcxx)
# a chunk stays under journald's default LineMax, beyond which it cuts a line itself
_JOURNAL_CHUNK = 4096
# line breaks json.dumps leaves as they are when ensure_ascii is off (str.splitlines honours them)
_JSON_RAW_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def module_logger(module: str) -> logging.Logger:
    """The logger of the module named ``module`` (pass ``__name__``): ``syncer.`` and the
    module's own name, whatever subpackage holds it. Log lines carry these names (and
    filters and alerts match them), so they stay as they were before the subpackages."""
    return logging.getLogger("syncer." + module.rpartition(".")[2])


def register_secret(value: str | None) -> None:
    """Never let ``value`` reach a log line."""
    if value:
        with _SECRETS_LOCK:
            _SECRETS.add(value)


def redact(text: str) -> str:
    with _SECRETS_LOCK:
        secrets = list(_SECRETS)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, "[redacted]")
    return text


def stderr_is_journal() -> bool:
    """True when stderr is the journal stream systemd connected us to."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class TextFormatter(_RedactingFormatter):
    """Continuation lines (a traceback, a line break in a message) are indented, so only
    a record's first line starts at the margin with its timestamp. Control characters
    (ESC, BEL, C1, bidi overrides, a carriage return: a group's name may hold any) are
    shown escaped, never sent raw to the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n  ".join(escape_controls(super().format(record), keep="\n").split("\n"))


class JournalFormatter(_RedactingFormatter):
    """Every line carries the record's ``<N>`` priority: journald makes each line an
    entry of its own and reads a prefix at its start, so an unprefixed continuation
    line would take the default priority, or a ``<0>`` within a message its own."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in _journal_lines(super().format(record)))


def _journal_lines(text: str) -> list[str]:
    """``text`` cut wherever journald would end an entry: at a line break, at NUL, and
    within a line too long for its LineMax (48K bytes by default)."""
    lines = [piece for line in text.splitlines() for piece in line.split("\0")] or [""]
    return [line[i : i + _JOURNAL_CHUNK] for line in lines for i in range(0, max(len(line), 1), _JOURNAL_CHUNK)]


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and error, if any).

    Under journald each line starts with the record's ``<N>`` priority, which journald
    strips: the entry is the JSON object, and ``journalctl -p`` works as with text.
    """

    converter = time.gmtime

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        line = redact(json.dumps(entry, ensure_ascii=False)).translate(_JSON_RAW_BREAKS)
        return f"<{_PRIORITY.get(record.levelno, 6)}>{line}" if self.journal else line


def configure(verbosity: int, log_format: str) -> None:
    """Set up the root logger: ``verbosity`` -1 quiet, 0 normal, 1 debug, 2 debug for all."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter(journal=stderr_is_journal()))
    elif stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        formatter = TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%SZ")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    ours = {-1: logging.WARNING, 0: logging.INFO}.get(min(verbosity, 1), logging.DEBUG)
    logging.getLogger("syncer").setLevel(ours)
    # APScheduler logs every job start and finish at INFO: keep it to warnings
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    # the SDK warns of each request that ran out of retries; syncer reports what that
    # request was for (the group, the listing, the renewal) itself, so show it with -v
    logging.getLogger("globus_sdk").setLevel({2: logging.DEBUG, 1: logging.WARNING}.get(min(verbosity, 2), logging.ERROR))
