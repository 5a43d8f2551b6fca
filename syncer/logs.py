"""Logging to stderr: readable on a terminal, clean under journald, or JSON lines.

Under systemd (stderr connected to the journal, per ``$JOURNAL_STREAM``) lines carry
no timestamp of their own, since journald adds one, and start with a ``<N>`` syslog
priority prefix so ``journalctl -p warning`` works. A redacting filter replaces any
known token value with ``[redacted]`` as a last line of defence: syncer never logs
tokens on purpose, but a library's debug output could carry one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

_SECRETS: set[str] = set()
_SECRETS_LOCK = threading.Lock()

# syslog priorities for the journald prefix
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


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


class JournalFormatter(_RedactingFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and error, if any)."""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, ensure_ascii=False))


def configure(verbosity: int, log_format: str) -> None:
    """Set up the root logger: ``verbosity`` -1 quiet, 0 normal, 1 debug, 2 debug for all."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    elif stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        formatter = _RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%SZ")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    ours = {-1: logging.WARNING, 0: logging.INFO}.get(min(verbosity, 1), logging.DEBUG)
    logging.getLogger("syncer").setLevel(ours)
    # APScheduler logs every job start and finish at INFO: keep it to warnings
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
