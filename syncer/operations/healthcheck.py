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

import threading
import time
import urllib.parse

from syncer import __version__
from syncer.logs import module_logger, register_secret

log = module_logger(__name__)

PING_TIMEOUT_S = 10.0
#: how long the end ping waits for a start ping still under way, so that they arrive in order
ORDER_GRACE_S = 1.0


class Healthcheck:
    """The pings of one run; does nothing without a URL."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self._start: _Ping | None = None
        if url:
            register_url_secret(url)

    def started(self) -> None:
        """Send the start ping, in the background: the run does not wait for it."""
        if self.url and self._start is None:
            self._start = _Ping(self.url, "start", PING_TIMEOUT_S)

    def finished(self, exit_code: int) -> None:
        """Send the end ping (``URL`` for 0, ``URL/EXIT_CODE`` otherwise), at most
        PING_TIMEOUT_S after the run ended, the wait for the start ping included."""
        if not self.url:
            return
        due = time.monotonic()
        deadline = due + PING_TIMEOUT_S
        if self._start is not None:
            self._start.wait(ORDER_GRACE_S)
        end = _Ping(self.url, "" if exit_code == 0 else str(exit_code), deadline - time.monotonic(), began=due)
        end.wait(deadline - time.monotonic())


class _Ping:
    """One GET in a daemon thread; ``wait`` logs how it went (a ping that hangs is left behind)."""

    def __init__(self, url: str, suffix: str, timeout: float, began: float | None = None) -> None:
        """``began``: when the ping became due, for the message if it gets no answer."""
        self.shown = f"/{suffix}" if suffix else "(success)"
        self.timeout = timeout
        self.problem: str | None = None
        self.began = time.monotonic() if began is None else began
        self._thread = threading.Thread(target=self._get, args=(ping_url(url, suffix),), name="syncer-ping", daemon=True)
        self._thread.start()

    def wait(self, seconds: float) -> None:
        self._thread.join(max(seconds, 0))
        if self._thread.is_alive():
            log.warning("healthcheck ping %s: no answer after %.0fs", self.shown, time.monotonic() - self.began)
        elif self.problem:
            log.warning("healthcheck ping %s: %s", self.shown, self.problem)

    def _get(self, url: str) -> None:
        import requests  # here: a run that pings has it imported by globus_sdk anyway

        try:
            with requests.get(url, timeout=self.timeout, headers={"User-Agent": f"syncer/{__version__}"}) as response:
                if not 200 <= response.status_code < 300:
                    self.problem = f"HTTP {response.status_code}"
        except requests.Timeout:
            self.problem = f"no answer after {time.monotonic() - self.began:.0f}s"
        except requests.RequestException as err:
            self.problem = f"failed: {describe_request_error(err)}"


def ping_url(url: str, suffix: str) -> str:
    """``url`` with ``/suffix`` added to its path (its query, if any, kept)."""
    if not suffix:
        return url
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + suffix))


def register_url_secret(url: str) -> None:
    """Keep a URL's path and query out of every log line (a library's debug output
    shows them): webhook and ping URLs often carry their secret there."""
    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    register_secret(url)
    if len(target) >= 8:  # not "/" or "/hook": that would hide harmless text everywhere
        register_secret(target)


def describe_request_error(err: Exception) -> str:
    """What went wrong with a request, without its URL (which may hold a secret)."""
    import requests

    if isinstance(err, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(err, requests.exceptions.ProxyError):
        return "proxy error"
    if isinstance(err, requests.ConnectionError):
        return "connection failed"
    return type(err).__name__
