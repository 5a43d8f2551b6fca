"""Pings to a monitoring URL (the healthchecks.io convention) around each run.

``GET URL/start`` once a run holds the lock, ``GET URL`` when it ends ``ok``,
``GET URL/EXIT_CODE`` otherwise (3 partial, 1 failed, 77 login required). A run that
finds another sync holding the lock (75) did nothing and sends nothing: the run
holding it pings for itself. Each ping is bounded by PING_TIMEOUT_S; one that fails
is a warning, never a change of the run's exit code. The start ping goes out while
the run works; the end ping waits for it, so they arrive in order. The URL is never
logged: anyone who has it can report on the check.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse

from syncer import __version__

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 10.0


class Healthcheck:
    """The pings of one run; does nothing without a URL."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self._start: threading.Thread | None = None

    def started(self) -> None:
        """Send the start ping, in the background."""
        if self.url and self._start is None:
            self._start = _ping_thread(self.url, "start")

    def finished(self, exit_code: int) -> None:
        """Send the end ping (``URL`` for 0, ``URL/EXIT_CODE`` otherwise) after the start ping."""
        if not self.url:
            return
        if self._start is not None:
            self._start.join(PING_TIMEOUT_S)
        _ping_thread(self.url, "" if exit_code == 0 else str(exit_code)).join(PING_TIMEOUT_S)


def ping_url(url: str, suffix: str) -> str:
    """``url`` with ``/suffix`` added to its path (its query, if any, kept)."""
    if not suffix:
        return url
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + suffix))


def _ping_thread(url: str, suffix: str) -> threading.Thread:
    """Ping in a daemon thread, so a ping that hangs costs at most the caller's join."""
    thread = threading.Thread(target=_ping, args=(url, suffix), name="syncer-ping", daemon=True)
    thread.start()
    return thread


def _ping(url: str, suffix: str) -> None:
    import requests  # here: a run that pings has it imported by globus_sdk anyway

    from syncer.hooks import describe_request_error

    shown = f"/{suffix}" if suffix else "(success)"
    try:
        response = requests.get(ping_url(url, suffix), timeout=PING_TIMEOUT_S, headers={"User-Agent": f"syncer/{__version__}"})
    except requests.Timeout:
        log.warning("healthcheck ping %s: no answer within %gs", shown, PING_TIMEOUT_S)
        return
    except requests.RequestException as err:
        log.warning("healthcheck ping %s failed: %s", shown, describe_request_error(err))
        return
    with response:
        if not 200 <= response.status_code < 300:
            log.warning("healthcheck ping %s: HTTP %d", shown, response.status_code)
