"""HTTP simulation of Globus Auth (native-app OAuth2 + PKCE) and Globus Groups.

One ``ThreadingHTTPServer`` on 127.0.0.1 serves both services, under
``/auth/`` and ``/groups/``, so the real ``globus_sdk`` can be pointed at it
with ``GLOBUS_SDK_SERVICE_URL_AUTH`` / ``GLOBUS_SDK_SERVICE_URL_GROUPS``
(see :attr:`Simulator.env`). There is no human in the loop: the authorize
endpoint auto-approves as ``world.me``.

Fault injection (:class:`Faults`) is adjustable while the server runs, so
tests and soak runs can make individual groups fail, stall, rate-limit, or
return malformed bodies, and later check what was really served through
:attr:`Simulator.read_log` and :attr:`Simulator.stats`.

Token values are never logged.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import html
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt

from . import admin
from .state import read_state, write_state
from .world import GROUPS_RESOURCE_SERVER, STATUSES, World

__all__ = ["LISTING_KINDS", "SHAPE_KINDS", "Faults", "Simulator", "SimulatorSetupError", "TLSFiles", "serve", "serve_cli"]

log = logging.getLogger("syncer.simulator")

AUTH_CODE_LIFETIME_S = 600
_GROUPS_SCOPE_RE = re.compile(
    r"(?:^|\s)urn:globus:auth:scope:groups\.api\.globus\.org:(?:all|view_my_groups_and_memberships)(?:\s|\[|$)"
)
_INCLUDE_VALUES = frozenset(
    {"memberships", "my_memberships", "policies", "allowed_actions", "child_ids"}
)
_ERROR_CODES = {
    400: "BAD_REQUEST",
    401: "INVALID_TOKEN",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    422: "VALIDATION_ERROR",
    429: "TOO_MANY_REQUESTS",
    500: "INTERNAL_SERVER_ERROR",
    503: "SERVICE_UNAVAILABLE",
}
# Gateways (not the Groups app) produce these, so their bodies are HTML,
# exactly the kind of non-JSON error body a client must survive.
_GATEWAY_STATUSES = frozenset({502, 504})
_GROUP_READ_RE = re.compile(r"/groups/v2/groups/(?!my_groups/?$)[^/]+/?")
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_AUTH_CODE_RE = re.compile(r'<code id="auth-code">([^<]*)</code>')
_HUGE_TEXT = ("Ünïcödé ☃ 日本語のグループ名 Ωμέγα — " * 400)[:10_000]
_SQL_TEXT = "Robert'); DROP TABLE memberships;--"
_RANDOM_KINDS_DEFAULT = ("500", "502", "503", "429", "stall", "truncated")
MALFORMED_KINDS = (
    "truncated", "memberships_not_list", "missing_identity_id", "nulls", "unknown_values", "no_id", "huge_names",
    "last_entry_bad",
)
# Shapes real group documents take that the simulator does not send by default (see
# docs/simulator-fidelity.md): no memberships key, an empty list, every membership
# whatever the viewer's rights, membership documents without membership_fields/updated.
SHAPE_KINDS = ("no_memberships", "empty_memberships", "all_memberships", "slim")
# Broken my_groups answers, for the listing's fault tests.
LISTING_KINDS = ("not_json", "whitespace", "object", "junk_entry", "no_id", "no_my_memberships",
                 "empty_my_memberships", "null_role")


# --------------------------------------------------------------------- faults


class Faults:
    """Run-time adjustable fault injection for the Groups API.

    Plain attributes (dicts/numbers) may be changed at any time from any
    thread; compound read-modify-write operations (counters) go through the
    methods below, which hold an internal lock.

    Attributes:
        latency_ms: extra delay added to every request (Auth and Groups).
        access_token_lifetime: seconds; applies to tokens issued from now on.
        group_errors: ``{group_id: http_status}`` -- that group's GET fails
            with the status until the entry is removed (or ``group_errors_times``
            runs out). 502/504 bodies are HTML like a gateway's, others JSON.
        group_errors_times: ``{group_id: n}`` -- clear the group's error after
            it has been served ``n`` times (a transient failure).
        stall: ``{group_id: seconds}`` -- hold that group's response this long
            (longer than a client's timeout means "never answers").
        malformed: ``{group_id: kind}`` -- kind in :data:`MALFORMED_KINDS`.
        random_rate: probability that a group read gets a random fault (the
            kind is then drawn uniformly from ``random_kinds``).
        random_kinds: kinds for random faults; default "500", "502", "503",
            "429", "stall", "truncated" (other statuses and the malformed
            kinds work too).
        random_stall_s: how long a random "stall" holds the response.
        token_error: an HTTP status (e.g. 502) the Auth token endpoint answers
            every request with, as when Globus Auth is down; None: it works.

    :meth:`hold_reads` makes group reads wait, after their token was accepted, until
    :meth:`release_reads`: a test can then act while a client is mid-run.
    """

    def __init__(
        self,
        latency_ms: float = 0,
        access_token_lifetime: int = 3600,
        *,
        random_rate: float = 0.0,
        random_kinds: Iterable[str | int] | None = None,
        seed: int | None = None,
        random_stall_s: float = 0.25,
    ) -> None:
        self._lock = threading.Lock()
        self.latency_ms: float = latency_ms
        self.access_token_lifetime: int = access_token_lifetime
        self.group_errors: dict[str, int] = {}
        self.group_errors_times: dict[str, int] = {}
        self.stall: dict[str, float] = {}
        self.malformed: dict[str, str] = {}
        # groups whose session policy (e.g. high assurance) the token's session fails
        self.session_required: set[str] = set()
        # group id -> a shape of SHAPE_KINDS its documents are served in
        self.shape: dict[str, str] = {}
        # a kind of LISTING_KINDS: my_groups answers broken that way
        self.listing_malformed: str | None = None
        # path (e.g. "/groups/v2/groups/my_groups") -> (status, body, content type):
        # a recorded answer served as it is, once the token is accepted
        self.recorded: dict[str, tuple[int, bytes, str]] = {}
        self.token_error: int | None = None
        self.random_rate: float = random_rate
        self.random_kinds: list[str] = [str(k) for k in (random_kinds or _RANDOM_KINDS_DEFAULT)]
        self.random_stall_s: float = random_stall_s
        self._seed = seed
        self._rng = random.Random(seed)
        self._rate_limited = 0
        self._retry_after = 1
        self._released = threading.Event()
        self._released.set()
        self._hold_exempt: frozenset[str] = frozenset()

    # -- public helpers

    def hold_reads(self, except_groups: Iterable[str] = ()) -> None:
        """Make every group read wait (counted as fault ``held``) until :meth:`release_reads`;
        reads of ``except_groups`` answer as usual."""
        self._hold_exempt = frozenset(except_groups)
        self._released.clear()

    def release_reads(self) -> None:
        """Let held group reads, and later ones, answer."""
        self._released.set()

    @property
    def reads_held(self) -> bool:
        """Whether group reads wait (:meth:`hold_reads`)."""
        return not self._released.is_set()

    def record_answer(self, path: str, status: int, body: bytes, ctype: str = "application/json") -> None:
        """Answer every request for ``path`` (e.g. ``/groups/v2/groups/my_groups`` or
        ``/auth/v2/oauth2/token``) with this status and body, once its token is accepted:
        globus-sdk's recorded fixtures served over real HTTP."""
        self.recorded[path] = (int(status), body, ctype)

    def rate_limit(self, n: int, retry_after: int = 1) -> None:
        """Answer the next ``n`` Groups requests with 429 + ``Retry-After``."""
        with self._lock:
            self._rate_limited = max(0, int(n))
            self._retry_after = int(retry_after)

    def set_group_error(self, group_id: str, status: int, times: int | None = None) -> None:
        """Make ``group_id`` fail with ``status`` (for ``times`` reads, or until cleared)."""
        with self._lock:
            self.group_errors[group_id] = int(status)
            if times is None:
                self.group_errors_times.pop(group_id, None)
            else:
                self.group_errors_times[group_id] = int(times)

    def set_random(
        self, rate: float, kinds: Iterable[str | int] | None = None, seed: int | None = None
    ) -> None:
        """Configure random faults; ``seed`` makes the fault sequence reproducible."""
        with self._lock:
            self.random_rate = float(rate)
            if kinds is not None:
                self.random_kinds = [str(k) for k in kinds]
            if seed is not None:
                self._seed = seed
                self._rng = random.Random(seed)

    @property
    def seed(self) -> int | None:
        """Seed of the random-fault generator (setting it restarts the sequence)."""
        return self._seed

    @seed.setter
    def seed(self, value: int | None) -> None:
        with self._lock:
            self._seed = value
            self._rng = random.Random(value)

    def clear(self) -> None:
        """Remove every fault (latency and token lifetime are left as they are)."""
        with self._lock:
            self.group_errors.clear()
            self.group_errors_times.clear()
            self.stall.clear()
            self.malformed.clear()
            self.shape.clear()
            self.listing_malformed = None
            self.recorded.clear()
            self.random_rate = 0.0
            self._rate_limited = 0
            self.token_error = None
        self.release_reads()

    # -- used by the server

    def _wait_released(self, stopping: threading.Event) -> None:
        """Wait while reads are held, or until ``stopping`` is set."""
        while not self._released.wait(0.05) and not stopping.is_set():
            pass

    def _take_rate_limit(self) -> int | None:
        """Consume one queued 429; return its Retry-After, or None."""
        with self._lock:
            if self._rate_limited <= 0:
                return None
            self._rate_limited -= 1
            return self._retry_after

    def _take_group_error(self, group_id: str) -> int | None:
        """The status to fail ``group_id`` with (counting down transient errors)."""
        with self._lock:
            status = self.group_errors.get(group_id)
            if status is None:
                return None
            left = self.group_errors_times.get(group_id)
            if left is not None:
                if left <= 1:
                    self.group_errors.pop(group_id, None)
                    self.group_errors_times.pop(group_id, None)
                    if left <= 0:
                        return None
                else:
                    self.group_errors_times[group_id] = left - 1
            return status

    def _roll_random(self) -> str | None:
        """Pick a random fault kind for this group read, or None."""
        with self._lock:
            if self.random_rate <= 0 or not self.random_kinds:
                return None
            if self._rng.random() >= self.random_rate:
                return None
            return self._rng.choice(self.random_kinds)

    def __repr__(self) -> str:
        return (
            f"Faults(latency_ms={self.latency_ms}, group_errors={self.group_errors}, "
            f"stall={self.stall}, malformed={self.malformed}, random_rate={self.random_rate}, "
            f"rate_limited={self._rate_limited})"
        )


class TLSFiles(t.NamedTuple):
    """A certificate (PEM, the chain the server presents) and its private key: the
    simulator then serves HTTPS, as Globus does, for testing trust settings."""

    cert: str
    key: str


# --------------------------------------------------------------- token store


@dataclass(slots=True)
class _Code:
    client_id: str
    redirect_uri: str
    scope: str
    challenge: str
    access_type: str
    state: str | None
    identity_id: str
    expires_at: float
    used: bool = False


@dataclass(slots=True)
class _Refresh:
    client_id: str
    scope: str
    state: str | None
    identity_id: str
    revoked: bool = False
    auth_time: float = 0.0  # when the login that issued it happened


@dataclass(slots=True)
class _Access:
    scope: str
    identity_id: str
    expires_at: float
    serial: int
    refresh_token: str | None
    revoked: bool = False
    auth_time: float = 0.0  # the login's time: a refresh keeps it, a session is not renewed


@dataclass(slots=True)
class _Resp:
    """A response built by a route, sent by ``Simulator._dispatch``."""

    status: int
    body: bytes
    ctype: str
    headers: dict[str, str]
    read: dict[str, Any] | None = None  # set on successful group reads


# ------------------------------------------------------------------- server


class _HTTPServer(ThreadingHTTPServer):
    """Threaded server that can forcibly close its keep-alive connections."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], sim: Simulator) -> None:
        self.sim = sim
        self.tls_context: ssl.SSLContext | None = None
        if sim.tls is not None:
            self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls_context.load_cert_chain(sim.tls.cert, sim.tls.key)
        self.open_sockets: set[socket.socket] = set()
        self._sock_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._sock_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._sock_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that went away mid-request (timed out, killed) is not a server
        # error: no traceback on the console for it
        if isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):  # a client refusing our certificate too
            return
        super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Shut down live connections so idle keep-alive threads exit too."""
        with self._sock_lock:
            socks = list(self.open_sockets)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    """Thin adapter: all logic lives in :meth:`Simulator._dispatch`."""

    # HTTP/1.1 keep-alive: the SDK's requests.Session reuses connections,
    # which keeps benchmark overhead realistic.
    protocol_version = "HTTP/1.1"
    server_version = "GlobusSimulator/1.0"
    timeout = 300
    server: _HTTPServer

    def setup(self) -> None:
        if self.server.tls_context is not None:
            # the TLS handshake happens here, in the request's thread, not in the accept loop
            self.request = self.server.tls_context.wrap_socket(self.request, server_side=True)
        super().setup()
        # Headers and body go out in separate writes; without NODELAY, Nagle
        # plus delayed ACKs add ~40 ms to every keep-alive response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self.server.sim._dispatch(self, "GET")

    def do_POST(self) -> None:
        self.server.sim._dispatch(self, "POST")

    def do_PUT(self) -> None:
        self.server.sim._dispatch(self, "PUT")

    def do_DELETE(self) -> None:
        self.server.sim._dispatch(self, "DELETE")

    def do_PATCH(self) -> None:
        self.server.sim._dispatch(self, "PATCH")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        # The default logs the request line, whose query string can carry
        # auth codes; the simulator logs its own redacted line instead.
        pass


class Simulator:
    """Globus Auth + Groups on 127.0.0.1, backed by a :class:`World`.

    ``port=0`` picks a free port (kept across ``stop()``/``start()``).
    ``latency_ms``/``access_token_lifetime`` seed the :class:`Faults` object;
    when ``faults`` is given they only override it if not left at defaults.
    ``record_reads=False`` turns off :attr:`read_log` (long benchmarks).
    """

    def __init__(
        self,
        world: World,
        port: int = 0,
        latency_ms: float = 0,
        access_token_lifetime: int = 3600,
        faults: Faults | None = None,
        *,
        record_reads: bool = True,
        verbose: bool = False,
        state_file: str | os.PathLike[str] | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        self.world = world
        #: serve HTTPS with this certificate (e.g. one signed by a test's own CA)
        self.tls = tls
        self.port = port
        if faults is None:
            faults = Faults(latency_ms=latency_ms, access_token_lifetime=access_token_lifetime)
        else:
            if latency_ms:
                faults.latency_ms = latency_ms
            if access_token_lifetime != 3600:
                faults.access_token_lifetime = access_token_lifetime
        self.faults: Faults = faults
        self.record_reads = record_reads
        self.verbose = verbose
        self.issued_tokens: set[str] = set()
        self.read_log: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._codes: dict[str, _Code] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._access: dict[str, _Access] = {}
        self._id_token_key = secrets.token_bytes(32)
        self._serial = 0
        self._access_cutoff = 0  # access tokens with serial <= this are dead
        self._invalid_grant_status = 400
        self._stats: dict[str, Any] = self._fresh_stats()
        self._stop_evt = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        #: where the world and issued tokens are kept across restarts (see ``state.py``)
        self.state_file = Path(state_file) if state_file is not None else None
        self._tokens_version = 0  # bumped whenever a token is issued or revoked
        self._saved_versions: tuple[int, int] | None = None
        self._saver: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Simulator:
        """Bind 127.0.0.1 and serve in a daemon thread; returns self."""
        if self._httpd is not None:
            return self
        self._stop_evt.clear()
        self._httpd = _HTTPServer(("127.0.0.1", self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"globus-simulator:{self.port}",
            daemon=True,
        )
        self._thread.start()
        if self.state_file is not None:
            self._saver = threading.Thread(target=self._keep_state, name="globus-simulator-state", daemon=True)
            self._saver.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and wake stalled handlers."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stop_evt.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._saver is not None:
            self._saver.join(timeout=10)
            self._saver = None
        self.save_state()

    # ----------------------------------------------------------- state file

    def _keep_state(self) -> None:
        """Write the state file soon after each change (at most every 0.2 s)."""
        while not self._stop_evt.wait(0.2):
            try:
                self.save_state()
            except OSError as err:  # a full disk, say: keep serving, try again at the next change
                log.warning("cannot write the state file %s: %s", self.state_file, err)

    def save_state(self) -> None:
        """Write the state file if anything changed since it was last written."""
        if self.state_file is None:
            return
        with self.world.lock, self._lock:
            versions = (self.world.version, self._tokens_version)
            if versions == self._saved_versions:
                return
            tokens = self.export_tokens()
        write_state(self.state_file, self.world, tokens)
        self._saved_versions = versions

    def export_tokens(self) -> dict[str, Any]:
        """The refresh tokens and live access tokens issued (caller holds ``self._lock``)."""
        now = time.time()
        return {
            "refresh_tokens": [
                {"token": token, "client_id": r.client_id, "scope": r.scope, "state": r.state,
                 "identity_id": r.identity_id, "revoked": r.revoked, "auth_time": r.auth_time}
                for token, r in self._refresh.items()
            ],
            "access_tokens": [
                {"token": token, "scope": a.scope, "identity_id": a.identity_id,
                 "expires_at": a.expires_at, "refresh_token": a.refresh_token, "auth_time": a.auth_time}
                for token, a in self._access.items()
                if not a.revoked and a.serial > self._access_cutoff and a.expires_at > now
            ],
        }

    def restore_tokens(self, tokens: dict[str, Any]) -> None:
        """Take back the tokens of :meth:`export_tokens` (from a state file)."""
        try:
            with self._lock:
                for r in tokens["refresh_tokens"]:
                    self._refresh[r["token"]] = _Refresh(
                        r["client_id"], r["scope"], r["state"], r["identity_id"], bool(r["revoked"]),
                        float(r.get("auth_time", 0.0)),
                    )
                    self.issued_tokens.add(r["token"])
                for a in tokens["access_tokens"]:
                    self._serial += 1
                    self._access[a["token"]] = _Access(
                        a["scope"], a["identity_id"], float(a["expires_at"]), self._serial, a["refresh_token"],
                        auth_time=float(a.get("auth_time", 0.0)),
                    )
                    self.issued_tokens.add(a["token"])
                self._saved_versions = (self.world.version, self._tokens_version)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"tokens: a token record is malformed ({type(err).__name__}: {err})") from None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        return self._httpd is not None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8765`` (no trailing slash)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point globus_sdk at this simulator."""
        return {
            "GLOBUS_SDK_SERVICE_URL_AUTH": f"{self.url}/auth/",
            "GLOBUS_SDK_SERVICE_URL_GROUPS": f"{self.url}/groups/",
        }

    @property
    def latency_ms(self) -> float:
        """Shortcut for ``faults.latency_ms``."""
        return self.faults.latency_ms

    @latency_ms.setter
    def latency_ms(self, value: float) -> None:
        self.faults.latency_ms = value

    @property
    def access_token_lifetime(self) -> int:
        """Shortcut for ``faults.access_token_lifetime``."""
        return self.faults.access_token_lifetime

    @access_token_lifetime.setter
    def access_token_lifetime(self, value: int) -> None:
        self.faults.access_token_lifetime = value

    def serve_forever(
        self, print_env: bool = True, say: Callable[[str], Any] | None = None, extra_env: dict[str, str] | None = None
    ) -> None:
        """Start (if needed) and block until SIGINT/SIGTERM, then stop. ``extra_env``:
        more variables to print after the SDK's (quoted for a POSIX shell)."""
        say = say or (lambda s: print(s, flush=True))
        self.start()
        done = threading.Event()
        previous: dict[int, Any] = {}
        # before the lines below: whoever reads them may stop the simulator at once
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: done.set())
        if print_env:
            for k, v in {**self.env, **(extra_env or {})}.items():
                say(f"export {k}={shlex.quote(v)}")
            say(
                f"# Globus simulator on {self.url}: {len(self.world.groups)} groups, "
                f"me={self.world.me}. Ctrl-C to stop."
            )
        try:
            while not done.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.stop()

    # --------------------------------------------------------- test hooks

    def answer_cli_login(self, proc: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
        """Be the user of ``syncer login --no-browser``: read the URL it prints on its
        own line, do the browser step, type the code in. Returns all of its (stdout,
        stderr); when it prints no URL (e.g. "already logged in") it is just waited for.
        """
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("http"):
                out, err = proc.communicate(self.authorize(line.strip()) + "\n", timeout=timeout)
                return "".join(seen) + out, err
        out, err = proc.communicate(timeout=timeout)
        return "".join(seen) + out, err

    def authorize(self, url: str) -> str:
        """Play the browser: open the authorize URL, follow the redirect and
        return the auth code.

        When the redirect goes to the simulator's own auth-code page, the code
        is read off that HTML page (as a user would copy it). When it goes to
        another loopback URL (an app's local callback server) it is followed
        so the app receives the code, and the code is taken from the URL.
        Raises ``RuntimeError`` if the authorize request is rejected.
        """
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({}), _NoRedirect()]
        if self.tls:
            # the "browser" is this process talking to itself on loopback: nothing to verify
            unverified = ssl.create_default_context()
            unverified.check_hostname = False
            unverified.verify_mode = ssl.CERT_NONE
            handlers.append(urllib.request.HTTPSHandler(context=unverified))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(url, timeout=30) as resp:
                raise RuntimeError(f"authorize did not redirect (HTTP {resp.status})")
        except urllib.error.HTTPError as e:
            if e.code not in (301, 302, 303, 307, 308):
                body = e.read().decode("utf-8", "replace")
                raise RuntimeError(f"authorize failed: HTTP {e.code}: {_strip_tags(body)[:300]}") from None
            location = e.headers.get("Location", "")
        parts = urllib.parse.urlsplit(location)
        code = urllib.parse.parse_qs(parts.query).get("code", [""])[0]
        page = f"{self.url}/auth/v2/web/auth-code"
        if location.startswith(page):
            with opener.open(location, timeout=30) as resp:
                m = _AUTH_CODE_RE.search(resp.read().decode("utf-8"))
            if not m:
                raise RuntimeError("auth-code page did not contain a code")
            return html.unescape(m.group(1))
        if _is_loopback(parts.hostname):
            try:
                with opener.open(location, timeout=30) as resp:
                    resp.read()
            except (urllib.error.URLError, OSError):
                pass  # the app's callback may already be gone; code is known
        if not code:
            raise RuntimeError("redirect carried no code")
        return code

    def revoke_all_refresh_tokens(self, status: int = 400) -> None:
        """Invalidate every refresh token issued so far; refresh grants
        then fail with ``{"error": "invalid_grant"}`` and HTTP ``status``."""
        if status not in (400, 401):
            raise ValueError("status must be 400 or 401")
        with self._lock:
            for r in self._refresh.values():
                r.revoked = True
            self._invalid_grant_status = status
            self._tokens_version += 1

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far invalid (Groups -> 401)."""
        with self._lock:
            self._access_cutoff = self._serial
            self._tokens_version += 1

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (see ``_fresh_stats`` for the keys)."""
        with self._lock:
            return copy.deepcopy(self._stats)

    def reset_stats(self) -> None:
        """Zero every counter (the in-flight gauges excepted)."""
        with self._lock:
            gauges = {key: self._stats[key] for key in ("in_flight_group_reads", "in_flight_requests")}
            self._stats = self._fresh_stats()
            self._stats.update(gauges)

    @staticmethod
    def _fresh_stats() -> dict[str, Any]:
        return {
            # requests by endpoint: authorize, auth_code_page, token, revoke,
            # my_groups, group, other
            "requests": {},
            "responses_by_status": {},
            "responses_429": 0,
            # faults by kind: group_error, rate_limit, stall, malformed:<kind>,
            # random:<kind>
            "faults": {},
            "in_flight_group_reads": 0,
            "in_flight_requests": 0,  # every endpoint's, latency included
            "max_concurrent_group_reads": 0,
            "group_reads_ok": 0,
            "code_exchanges": 0,
            "code_exchanges_failed": 0,
            "refresh_grants": 0,
            "refresh_grants_failed": 0,
            "client_credentials_grants": 0,
            "client_credentials_grants_failed": 0,
            "admin_changes": 0,
            "revocations": 0,
        }

    def _count(self, key: str, sub: str | None = None, n: int = 1) -> None:
        with self._lock:
            if sub is None:
                self._stats[key] += n
            else:
                d = self._stats[key]
                d[sub] = d.get(sub, 0) + n

    def _fault(self, kind: str) -> None:
        self._count("faults", kind)

    # ------------------------------------------------------------ dispatch

    def _dispatch(self, h: _Handler, method: str) -> None:
        """Route one request. Never raises: errors become a 500 response."""
        parts = urllib.parse.urlsplit(h.path)
        path = re.sub(r"/{2,}", "/", parts.path)
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        body = b""
        length = int(h.headers.get("Content-Length") or 0)
        if length:
            body = h.rfile.read(length)  # always drain, or keep-alive desyncs
        # Group reads are "in flight" from arrival (latency included) until
        # their response is ready, which is what a client's concurrency shows.
        group_read = bool(_GROUP_READ_RE.fullmatch(path))
        with self._lock:
            st = self._stats
            st["in_flight_requests"] += 1
            if group_read:
                st["in_flight_group_reads"] += 1
                st["max_concurrent_group_reads"] = max(
                    st["max_concurrent_group_reads"], st["in_flight_group_reads"]
                )
        try:
            if self.faults.latency_ms:
                self._stop_evt.wait(self.faults.latency_ms / 1000.0)
            resp = self._route(h, method, path, query, body)
        except Exception:  # pragma: no cover - a bug; keep serving
            log.exception("simulator error on %s %s", method, path)
            resp = self._json(500, {"code": "INTERNAL_SERVER_ERROR", "detail": "simulator bug", "status": 500})
        finally:
            with self._lock:
                self._stats["in_flight_requests"] -= 1
                if group_read:
                    self._stats["in_flight_group_reads"] -= 1
        # Bookkeeping happens before the bytes go out, so a client that has
        # its response can rely on stats/read_log already reflecting it.
        self._count("responses_by_status", str(resp.status))
        if resp.read is not None:
            with self._lock:
                self._stats["group_reads_ok"] += 1
            if resp.read and self.record_reads:
                self.read_log.append(resp.read)
        if self.verbose:
            # path only: query strings can contain codes
            log.info("%s %s -> %s", method, path, resp.status)
        try:
            h.send_response(resp.status)
            h.send_header("Content-Type", resp.ctype)
            h.send_header("Content-Length", str(len(resp.body)))
            for k, v in resp.headers.items():
                h.send_header(k, v)
            h.end_headers()
            if resp.body:
                h.wfile.write(resp.body)
            h.wfile.flush()
        except OSError:
            # The client went away (e.g. it timed out on a stall).
            h.close_connection = True

    def _route(self, h: _Handler, method: str, path: str, query: dict[str, list[str]], body: bytes) -> _Resp:
        if path.startswith("/auth/"):
            sub = path[len("/auth"):]
            if sub == "/v2/oauth2/authorize":
                self._count("requests", "authorize")
                return self._only(method, "GET") or self._authorize(query)
            if sub == "/v2/web/auth-code":
                self._count("requests", "auth_code_page")
                return self._only(method, "GET") or self._auth_code_page(query)
            if sub == "/v2/oauth2/token":
                self._count("requests", "token")
                if self.faults.token_error is not None:
                    return self._status_error(self.faults.token_error)
                recorded = self.faults.recorded.get(path)
                if recorded is not None:
                    self._fault("recorded")
                    return self._send(*recorded)
                return self._only(method, "POST", oauth=True) or self._token(h, body)
            if sub == "/v2/oauth2/token/revoke":
                self._count("requests", "revoke")
                return self._only(method, "POST", oauth=True) or self._revoke(body)
            self._count("requests", "other")
            return self._json(404, {"error": "not_found"})
        if path.startswith("/groups/"):
            sub = path[len("/groups"):].rstrip("/")
            if sub == "/v2/groups/my_groups":
                self._count("requests", "my_groups")
                return self._only(method, "GET", groups=True) or self._my_groups(h, query)
            m = re.fullmatch(r"/v2/groups/([^/]+)", sub)
            if m:
                self._count("requests", "group")
                return self._only(method, "GET", groups=True) or self._group(
                    h, urllib.parse.unquote(m.group(1)), query
                )
            self._count("requests", "other")
            return self._groups_error(404, "No such endpoint.")
        if path.startswith("/admin/"):
            self._count("requests", "admin")
            return self._admin(method, path[len("/admin/"):].rstrip("/"), body)
        self._count("requests", "other")
        if path in ("/", "/health"):
            return self._json(200, {"ok": True, "env": self.env})
        return self._json(404, {"error": "not_found"})

    def _only(self, method: str, allowed: str, *, oauth: bool = False, groups: bool = False) -> _Resp | None:
        """405 for the wrong method; None when the method is fine."""
        if method == allowed:
            return None
        if groups:
            return self._groups_error(405, f"{method} not allowed", headers={"Allow": allowed})
        payload = {"error": "invalid_request"} if oauth else {"error": "method_not_allowed"}
        return self._json(405, payload, headers={"Allow": allowed})

    # ------------------------------------------------------------ auth

    def _authorize(self, query: dict[str, list[str]]) -> _Resp:
        q = {k: v[0] for k, v in query.items()}
        problem = None
        redirect_uri = q.get("redirect_uri", "")
        if q.get("response_type") != "code":
            problem = "response_type must be 'code'"
        elif not q.get("client_id"):
            problem = "missing client_id"
        elif not redirect_uri or urllib.parse.urlsplit(redirect_uri).scheme not in ("http", "https"):
            problem = "missing or invalid redirect_uri"
        elif not _is_loopback(urllib.parse.urlsplit(redirect_uri).hostname):
            # a native app may use the auth-code page (here on 127.0.0.1 too) or a
            # local redirect to a loopback address on any port (RFC 8252), as with Globus
            problem = "redirect_uri must be the auth-code page or a loopback (127.0.0.1) address"
        elif not q.get("scope", "").split():
            problem = "missing scope"
        elif not q.get("code_challenge"):
            problem = "missing code_challenge (PKCE is required for native apps)"
        elif q.get("code_challenge_method", "plain") != "S256":
            problem = "code_challenge_method must be S256"
        elif q.get("access_type", "online") not in ("online", "offline"):
            problem = "access_type must be online or offline"
        if problem:
            return self._html(400, "Invalid authorization request", f"<p>{html.escape(problem)}</p>")
        code = secrets.token_urlsafe(32)
        rec = _Code(
            client_id=q["client_id"],
            redirect_uri=redirect_uri,
            scope=_normalize_scope(q["scope"]),
            challenge=q["code_challenge"],
            access_type=q.get("access_type", "online"),
            state=q.get("state"),
            identity_id=self.world.me,
            expires_at=time.time() + AUTH_CODE_LIFETIME_S,
        )
        with self._lock:
            if len(self._codes) > 10_000:
                # Long soak runs: forget codes that can no longer be used.
                now = time.time()
                self._codes = {k: v for k, v in self._codes.items() if not v.used and v.expires_at > now}
            self._codes[code] = rec
            self.issued_tokens.add(code)
        params = {"code": code}
        if rec.state is not None:
            params["state"] = rec.state
        sep = "&" if urllib.parse.urlsplit(redirect_uri).query else ("" if redirect_uri.endswith("?") else "?")
        location = f"{redirect_uri}{sep}{urllib.parse.urlencode(params)}"
        return self._send(302, b"", "text/plain", headers={"Location": location, "Cache-Control": "no-store"})

    def _auth_code_page(self, query: dict[str, list[str]]) -> _Resp:
        code = (query.get("code") or [""])[0]
        if not code:
            err = (query.get("error") or ["no code"])[0]
            return self._html(400, "Authorization failed", f"<p>{html.escape(err)}</p>")
        inner = (
            "<p>Copy this code and paste it into your application:</p>\n"
            f'<code id="auth-code">{html.escape(code)}</code>'
        )
        return self._html(200, "Native App Authorization Code", inner)

    def _token(self, h: _Handler, body: bytes) -> _Resp:
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        client_id = form.get("client_id") or _basic_auth(h.headers.get("Authorization"))[0]
        grant = form.get("grant_type")
        if grant == "authorization_code":
            return self._grant_code(form, client_id)
        if grant == "refresh_token":
            return self._grant_refresh(form, client_id)
        if grant == "client_credentials":
            return self._grant_client_credentials(form, h.headers.get("Authorization"))
        if not grant:
            return self._oauth_error(400, "invalid_request")
        return self._oauth_error(400, "unsupported_grant_type")

    def _grant_code(self, form: dict[str, str], client_id: str | None) -> _Resp:
        code = form.get("code", "")
        verifier = form.get("code_verifier", "")
        redirect_uri = form.get("redirect_uri", "")
        if not code or not redirect_uri:
            self._count("code_exchanges_failed")
            return self._oauth_error(400, "invalid_request")
        payload: dict[str, Any] | None = None
        with self._lock:
            rec = self._codes.get(code)
            if (
                rec is not None
                and not rec.used
                and time.time() < rec.expires_at
                and client_id == rec.client_id
                and redirect_uri == rec.redirect_uri
                and bool(verifier)
                and secrets.compare_digest(_s256(verifier), rec.challenge)
            ):
                # Single use. A failed attempt (e.g. a wrong verifier) does
                # not burn the code, so the rightful client can still finish.
                rec.used = True
                refresh = None
                now = time.time()
                if rec.access_type == "offline":
                    refresh = secrets.token_urlsafe(32)
                    self._refresh[refresh] = _Refresh(
                        rec.client_id, rec.scope, rec.state, rec.identity_id, auth_time=now)
                    self.issued_tokens.add(refresh)
                payload = self._issue_access(rec.scope, rec.identity_id, rec.state, refresh, auth_time=now)
                self._oidc_tokens(payload, rec)
                self._stats["code_exchanges"] += 1
            else:
                self._stats["code_exchanges_failed"] += 1
        if payload is None:
            return self._oauth_error(400, "invalid_grant")
        return self._json(200, payload, headers=_NO_STORE)

    def _grant_refresh(self, form: dict[str, str], client_id: str | None) -> _Resp:
        token = form.get("refresh_token", "")
        if not token:
            self._count("refresh_grants_failed")
            return self._oauth_error(400, "invalid_request")
        if not client_id:
            # A native app has no secret, so it must at least name itself.
            self._count("refresh_grants_failed")
            return self._oauth_error(401, "invalid_client")
        payload: dict[str, Any] | None = None
        with self._lock:
            rec = self._refresh.get(token)
            status = self._invalid_grant_status
            if rec is not None and not rec.revoked and rec.client_id == client_id:
                payload = self._issue_access(rec.scope, rec.identity_id, rec.state, token, auth_time=rec.auth_time)
                self._stats["refresh_grants"] += 1
            else:
                self._stats["refresh_grants_failed"] += 1
        if payload is None:
            return self._oauth_error(status, "invalid_grant")
        return self._json(200, payload, headers=_NO_STORE)

    def _grant_client_credentials(self, form: dict[str, str], authorization: str | None) -> _Resp:
        """A confidential client acting as itself: HTTP basic auth with its id and
        secret; a wrong or missing secret is 401 ``invalid_client``, as Globus answers."""
        client_id, secret = _basic_auth(authorization)
        scope = _normalize_scope(form.get("scope", ""))
        with self.world.lock:
            known = self.world.clients.get(client_id or "")
        if known is None or secret is None or not secrets.compare_digest(secret.encode(), known.encode()):
            self._count("client_credentials_grants_failed")
            return self._oauth_error(401, "invalid_client")
        if not scope:
            self._count("client_credentials_grants_failed")
            return self._oauth_error(400, "invalid_scope")
        with self._lock:
            payload = self._issue_access(scope, str(client_id), None, None, auth_time=time.time())
            self._stats["client_credentials_grants"] += 1
        return self._json(200, payload, headers=_NO_STORE)

    def _issue_access(
        self, scope: str, identity_id: str, state: str | None, refresh: str | None, auth_time: float = 0.0
    ) -> dict[str, Any]:
        """Mint an access token (caller holds ``self._lock``) and build the
        token response in Globus' shape."""
        lifetime = int(self.faults.access_token_lifetime)
        token = secrets.token_urlsafe(32)
        self._serial += 1
        self._tokens_version += 1
        self._access[token] = _Access(
            scope, identity_id, time.time() + lifetime, self._serial, refresh, auth_time=auth_time)
        self.issued_tokens.add(token)
        payload: dict[str, Any] = {
            "access_token": token,
            "expires_in": lifetime,
            "resource_server": GROUPS_RESOURCE_SERVER,
            "scope": scope,
            "token_type": "Bearer",
            "state": state if state is not None else "_default",
            "other_tokens": [],
        }
        if refresh is not None:
            payload["refresh_token"] = refresh
        # the OpenID Connect scopes belong to Globus Auth's own token (see _oidc_tokens)
        payload["scope"] = " ".join(s for s in scope.split() if s not in _OIDC_SCOPES)
        return payload

    def _oidc_tokens(self, payload: dict[str, Any], rec: _Code) -> None:
        """A code grant that asked for ``openid``: as Globus answers it, an ``id_token``
        and a token for auth.globus.org beside the Groups one (caller holds ``self._lock``).
        Refreshing the Groups token renews that token alone."""
        oidc = [s for s in rec.scope.split() if s in _OIDC_SCOPES]
        if "openid" not in oidc:
            return
        auth_token = secrets.token_urlsafe(32)
        self.issued_tokens.add(auth_token)
        payload["other_tokens"] = [{
            "access_token": auth_token,
            "expires_in": payload["expires_in"],
            "resource_server": "auth.globus.org",
            "scope": " ".join(oidc),
            "token_type": "Bearer",
            "state": payload["state"],
        }]
        payload["id_token"] = self._id_token(rec)

    def _id_token(self, rec: _Code) -> str:
        """The OpenID Connect ``id_token``: the identity's ``sub``, username and identity
        set, as Globus Auth issues it (signed with a key of this simulator's: a client
        reading it straight from the token endpoint over TLS may rely on TLS instead of
        the signature, OIDC Core 3.1.3.7)."""
        with self.world.lock:
            username = self.world.identities.get(rec.identity_id, {}).get("username")
        now = int(time.time())
        claims = {
            "iss": f"{self.url}/auth", "sub": rec.identity_id, "aud": rec.client_id,
            "iat": now, "exp": now + 172800, "preferred_username": username,
            "identity_set": [{"sub": rec.identity_id, "username": username}],
        }
        return jwt.encode(claims, self._id_token_key, algorithm="HS256")

    def _revoke(self, body: bytes) -> _Resp:
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()}
        token = form.get("token", "")
        with self._lock:
            self._stats["revocations"] += 1
            self._tokens_version += 1
            acc = self._access.get(token)
            if acc is not None:
                acc.revoked = True
            ref = self._refresh.get(token)
            if ref is not None:
                ref.revoked = True
                # Revoking a refresh token kills the access tokens minted from it.
                for a in self._access.values():
                    if a.refresh_token == token:
                        a.revoked = True
        return self._json(200, {"active": False})

    def _admin(self, method: str, action: str, body: bytes) -> _Resp:
        try:
            answer = admin.apply(self.world, method, action, body)
        except admin.AdminError as err:
            return self._json(err.status, {"error": str(err)})
        if method == "POST":
            self._count("admin_changes")
        return self._json(200, answer)

    def _check_bearer(self, h: _Handler) -> str | None:
        """Identity id for a valid groups-scoped access token, else None."""
        found = self._bearer(h)
        return found.identity_id if found is not None else None

    def _bearer(self, h: _Handler) -> _Access | None:
        """The record of a valid groups-scoped access token, else None."""
        auth = h.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        with self._lock:
            acc = self._access.get(token.strip())
            if (
                acc is None
                or acc.revoked
                or acc.serial <= self._access_cutoff
                or time.time() >= acc.expires_at
                or not _GROUPS_SCOPE_RE.search(acc.scope)
            ):
                return None
            return acc

    # ------------------------------------------------------------ groups

    def _groups_gate(self, h: _Handler, path: str) -> tuple[_Access | None, _Resp | None]:
        """Auth + rate limit shared by every Groups endpoint, then any answer a test
        recorded for ``path`` (:meth:`Faults.record_answer`).

        Returns (the token's record, None) to proceed or (None, the response to send).
        """
        access = self._bearer(h)
        if access is None:
            # Globus's documented 401 body (AuthErrorModel) always carries
            # authorization_parameters, here with no session requirement in it
            return None, self._json(
                401,
                {"code": "INVALID_TOKEN", "detail": "Missing, invalid, expired or revoked access token.",
                 "status": 401, "authorization_parameters": {}},
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        retry_after = self.faults._take_rate_limit()
        if retry_after is not None:
            self._fault("rate_limit")
            return None, self._too_many(retry_after)
        recorded = self.faults.recorded.get(path)
        if recorded is not None:
            self._fault("recorded")
            return None, self._send(*recorded)
        return access, None

    def _my_groups(self, h: _Handler, query: dict[str, list[str]]) -> _Resp:
        access, denied = self._groups_gate(h, "/groups/v2/groups/my_groups")
        if access is None:
            assert denied is not None
            return denied
        viewer = access.identity_id
        listing_fault = self.faults.listing_malformed
        if listing_fault is not None:
            self._fault(f"listing:{listing_fault}")
            return self._send(200, _malformed_listing(self.world, viewer, listing_fault))
        statuses = _split_list(query.get("statuses")) or ["active"]
        bad = [s for s in statuses if s not in STATUSES]
        if bad:
            return self._groups_error(422, f"Invalid statuses: {', '.join(bad)}")
        return self._send(200, self.world.render_my_groups(tuple(statuses), viewer))

    def _group(self, h: _Handler, gid: str, query: dict[str, list[str]]) -> _Resp:
        access, denied = self._groups_gate(h, f"/groups/v2/groups/{gid}")
        if access is None:
            assert denied is not None
            return denied
        viewer = access.identity_id
        faults = self.faults
        tag: str | None = None  # fault applied to an otherwise-successful read
        malformed: str | None = None
        kind = faults._roll_random()
        if kind is not None:
            self._fault(f"random:{kind}")
            if kind == "429":
                return self._too_many(1)
            if kind.isdigit():
                return self._status_error(int(kind))
            if kind == "stall":
                tag = "random:stall"
                self._stop_evt.wait(faults.random_stall_s)
            elif kind in MALFORMED_KINDS:
                malformed = kind
        err = faults._take_group_error(gid)
        if err is not None:
            self._fault("group_error")
            return self._status_error(err)
        if gid in faults.session_required:
            self._fault("session_required")
            return self._session_required(gid)
        with self.world.lock:
            assurance = self.world.assurance_timeout(gid)
        if assurance is not None and time.time() - access.auth_time > assurance:
            # a high-assurance group: the token's login is older than the group allows
            self._fault("high_assurance")
            return self._high_assurance_required(viewer)
        stall = faults.stall.get(gid)
        if stall:
            self._fault("stall")
            tag = "stall"
            self._stop_evt.wait(float(stall))
        if faults.reads_held and gid not in faults._hold_exempt:
            self._fault("held")
            faults._wait_released(self._stop_evt)
        include = _split_list(query.get("include"))
        unknown = [v for v in include if v not in _INCLUDE_VALUES]
        if unknown:
            return self._groups_error(422, f"Invalid include: {', '.join(unknown)}")
        with_members = "memberships" in include
        if malformed is None:
            malformed = faults.malformed.get(gid)
            if malformed is not None:
                self._fault(f"malformed:{malformed}")
        shape = faults.shape.get(gid)
        if malformed is None and (shape is not None or self.world.has_implicit(gid)):
            if shape is not None:
                self._fault(f"shape:{shape}")
            return self._shaped(gid, viewer, with_members, shape, tag)
        if malformed is None:
            with self.world.lock:
                try:
                    rendered = self.world.render_group(gid, viewer, include_memberships=with_members)
                except KeyError:
                    rendered = None
                    missing = True
                else:
                    missing = False
                at = time.time()
            if missing:
                return self._groups_error(404, f"Group {gid} not found.")
            if rendered is None:
                return self._groups_error(403, "You do not have access to this group.")
            body, state = rendered
            return self._read_ok(self._send(200, body), at, gid, state, with_members, tag)
        return self._malformed(gid, viewer, with_members, malformed, tag)

    def _doc_to_tamper(
        self, gid: str, viewer: str, with_members: bool, *, all_memberships: bool = False
    ) -> tuple[dict[str, Any], float] | _Resp:
        """A fresh document of the group as ``viewer`` may see it (with every membership,
        whoever may see them, if ``all_memberships``) and when it was read; or the 404 or
        403 answer."""
        with self.world.lock:
            try:
                doc = self.world.group_doc(gid, viewer, include_memberships=with_members)
            except KeyError:
                return self._groups_error(404, f"Group {gid} not found.")
            at = time.time()
            if doc is not None and all_memberships and with_members:
                doc["memberships"] = self.world.all_membership_docs(gid)
        if doc is None:
            return self._groups_error(403, "You do not have access to this group.")
        return doc, at

    def _malformed(self, gid: str, viewer: str, with_members: bool, kind: str, tag: str | None) -> _Resp:
        """Serve a tampered group document (fault kinds in MALFORMED_KINDS)."""
        found = self._doc_to_tamper(gid, viewer, with_members)
        if isinstance(found, _Resp):
            return found
        doc, at = found
        members: list[dict[str, Any]] = doc.get("memberships", [])
        # Prefer tampering with someone other than me, so my_memberships stays sane.
        victim = next((m for m in members if m["identity_id"] != viewer), members[0] if members else None)
        if kind == "truncated":
            full = json.dumps(doc, ensure_ascii=False).encode("utf-8")
            return self._send(200, full[: len(full) // 2])
        if kind == "memberships_not_list":
            doc["memberships"] = {m["identity_id"]: m for m in members}
        elif kind == "missing_identity_id":
            if victim is not None:
                del victim["identity_id"]
        elif kind == "nulls":
            doc["name"] = None
            if victim is not None:
                victim["username"] = None
                victim["role"] = None
                victim["membership_fields"]["name"] = None
        elif kind == "unknown_values":
            if victim is not None:
                victim["role"] = "owner"
                victim["status"] = "suspended"
        elif kind == "no_id":
            del doc["id"]
        elif kind == "last_entry_bad":
            # a fault only the end of a long list shows (a streamed parse meets it last)
            if members:
                members[-1]["role"] = "owner"
        elif kind == "huge_names":
            doc["name"] = _HUGE_TEXT
            doc["description"] = f"{_SQL_TEXT} {_HUGE_TEXT[:200]}"
            if victim is not None:
                victim["username"] = f"{_SQL_TEXT}@example.org"
                victim["membership_fields"]["name"] = _HUGE_TEXT
                victim["membership_fields"]["institution"] = _SQL_TEXT
        resp = self._send(200, json.dumps(doc, ensure_ascii=False).encode("utf-8"))
        if kind == "huge_names":
            # Odd but valid data: a client should store it, so it counts as a read.
            state = sorted((m["identity_id"], m["role"], m["status"]) for m in members)
            return self._read_ok(resp, at, gid, state, with_members, tag or "huge_names")
        return resp

    def _shaped(self, gid: str, viewer: str, with_members: bool, shape: str | None, tag: str | None) -> _Resp:
        """Serve a group document in one of the shapes real answers take (SHAPE_KINDS),
        and with its implicit memberships (members of subgroups, ``source_group_id``)."""
        found = self._doc_to_tamper(gid, viewer, with_members, all_memberships=shape == "all_memberships")
        if isinstance(found, _Resp):
            return found
        doc, at = found
        if shape == "no_memberships":
            doc.pop("memberships", None)
        elif shape == "empty_memberships":
            doc["memberships"] = []
        elif shape == "slim":
            keep = ("group_id", "identity_id", "username", "role", "status", "source_group_id")
            doc["memberships"] = [{k: m[k] for k in keep if k in m} for m in doc.get("memberships", [])]
        members = doc.get("memberships", [])
        state = sorted((m["identity_id"], m["role"], m["status"]) for m in members)
        resp = self._send(200, json.dumps(doc, ensure_ascii=False).encode("utf-8"))
        return self._read_ok(resp, at, gid, state, with_members, tag or shape)

    @staticmethod
    def _read_ok(
        resp: _Resp, at: float, gid: str, state: list[tuple[str, str, str]], with_members: bool, tag: str | None
    ) -> _Resp:
        """Mark a response as a successful group read (for read_log/stats).

        Reads without include=memberships count in stats but carry no state,
        so they are not logged.
        """
        resp.read = {"at": at, "group_id": gid, "state": state, "fault": tag} if with_members else {}
        return resp

    # ------------------------------------------------------------ responses

    @staticmethod
    def _send(
        status: int, body: bytes, ctype: str = "application/json; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> _Resp:
        return _Resp(status, body, ctype, headers or {})

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> _Resp:
        return self._send(status, json.dumps(payload).encode("utf-8"), headers=headers)

    def _html(self, status: int, title: str, inner: str) -> _Resp:
        page = (
            "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>Globus Auth (simulated) - {html.escape(title)}</title></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n{inner}\n</body></html>\n"
        )
        return self._send(status, page.encode("utf-8"), "text/html; charset=utf-8")

    def _oauth_error(self, status: int, error: str) -> _Resp:
        return self._json(status, {"error": error}, headers={"Cache-Control": "no-store"})

    def _groups_error(self, status: int, detail: str, headers: dict[str, str] | None = None) -> _Resp:
        code = _ERROR_CODES.get(status, "ERROR")
        return self._json(status, {"code": code, "detail": detail, "status": status}, headers=headers)

    def _too_many(self, retry_after: int) -> _Resp:
        self._count("responses_429")
        return self._groups_error(429, "Rate limit exceeded; slow down.", headers={"Retry-After": str(retry_after)})

    def _high_assurance_required(self, viewer: str) -> _Resp:
        """What a high-assurance group answers a token whose login is too old: a Globus
        Auth requirements error asking for a recent login as that identity."""
        return self._json(401, {
            "code": "AuthenticationRequired",
            "detail": "This high-assurance group requires a recent authentication.",
            "status": 401,
            "authorization_parameters": {
                "session_message": "This group requires a recent login with your identity.",
                "session_required_identities": [viewer],
                "prompt": "login",
            },
        })

    def _session_required(self, group_id: str) -> _Resp:
        """What Globus answers when a group's session policy needs a fresh login."""
        return self._json(401, {
            "code": "AUTHENTICATION_REQUIRED",
            "detail": "This group requires a recent authentication with a specific identity provider.",
            "status": 401,
            "authorization_parameters": {
                "session_message": "This group's policy requires a recent login.",
                "session_required_policies": [f"policy-{group_id}"],
            },
        })

    def _status_error(self, status: int) -> _Resp:
        """An injected failure status, shaped like the real source would send it."""
        if status == 429:
            return self._too_many(1)
        if status in _GATEWAY_STATUSES:
            reason = {502: "Bad Gateway", 504: "Gateway Time-out"}[status]
            page = (
                f"<html>\r\n<head><title>{status} {reason}</title></head>\r\n<body>\r\n"
                f"<center><h1>{status} {reason}</h1></center>\r\n</body>\r\n</html>\r\n"
            )
            return self._send(status, page.encode(), "text/html")
        detail = {
            403: "You do not have access to this group.",
            404: "Group not found.",
        }.get(status, "Injected failure.")
        return self._groups_error(status, detail)


# ------------------------------------------------------------------ helpers


def _malformed_listing(world: World, viewer: str, kind: str) -> bytes:
    """A broken ``my_groups`` body (LISTING_KINDS), built from the real one."""
    if kind == "not_json":
        return b"<html><body>Service temporarily degraded</body></html>"
    if kind == "whitespace":
        return b"  \n  "
    with world.lock:
        entries = json.loads(world.render_my_groups(("active",), viewer))
    if kind == "object":
        return json.dumps({"groups": entries}).encode()
    victim = entries[0] if entries else {}
    if kind == "junk_entry":
        entries.append(42)
    elif kind == "no_id":
        victim.pop("id", None)
    elif kind == "no_my_memberships":
        victim.pop("my_memberships", None)
    elif kind == "empty_my_memberships":
        victim["my_memberships"] = []
    elif kind == "null_role":
        for own in victim.get("my_memberships", []):
            own["role"] = None
    return json.dumps(entries).encode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Surface redirects as HTTPError so :meth:`Simulator.authorize` can read Location."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _s256(verifier: str) -> str:
    """PKCE S256: base64url(sha256(verifier)) without padding (RFC 7636)."""
    digest = hashlib.sha256(verifier.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


#: the OpenID Connect scopes, which Globus Auth answers with a token of its own
_OIDC_SCOPES = ("openid", "profile", "email")


def _normalize_scope(scope: str) -> str:
    """Requested scopes, de-duplicated, order kept, single-space separated."""
    seen: dict[str, None] = {}
    for s in scope.split():
        seen.setdefault(s, None)
    return " ".join(seen)


def _split_list(values: list[str] | None) -> list[str]:
    """Comma-separated and/or repeated query values as one list."""
    out: list[str] = []
    for v in values or []:
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


def _basic_auth(header: str | None) -> tuple[str | None, str | None]:
    """(client id, secret) from an HTTP Basic Authorization header; Nones if absent."""
    if not header or not header.lower().startswith("basic "):
        return None, None
    try:
        raw = base64.b64decode(header[6:].strip()).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None, None
    user, sep, password = raw.partition(":")
    return urllib.parse.unquote(user) or None, urllib.parse.unquote(password) if sep else None



def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _strip_tags(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)).strip()


# -------------------------------------------------------------- entry points


def serve(
    world: World,
    port: int = 0,
    latency_ms: float = 0,
    access_token_lifetime: int = 3600,
    faults: Faults | None = None,
    print_env: bool = True,
    say: Callable[[str], Any] | None = None,
) -> None:
    """Serve ``world`` on 127.0.0.1:``port`` until SIGINT/SIGTERM."""
    sim = Simulator(world, port=port, latency_ms=latency_ms,
                    access_token_lifetime=access_token_lifetime, faults=faults)
    sim.serve_forever(print_env=print_env, say=say)


class SimulatorSetupError(Exception):
    """``syncer simulate`` cannot start: a bad world or state file (``config``), or
    the port cannot be bound; the message is one line."""

    def __init__(self, message: str, *, config: bool) -> None:
        super().__init__(message)
        self.config = config


def serve_cli(
    *,
    port: int = 8765,
    groups: int = 20,
    members: int = 10,
    latency_ms: float = 0,
    token_lifetime: int = 3600,
    world_file: str | None = None,
    state_file: str | None = None,
    seed: int = 1,
    fault_rate: float = 0.0,
    syncer_dir: str | None = None,
    say: Callable[[str], Any] | None = None,
    tls: TLSFiles | None = None,
) -> None:
    """Back end of ``syncer simulate``: build, load or restore a world and serve it.

    ``fault_rate`` is the share of group reads that get a random fault. With
    ``state_file``, an existing file restores the world and the tokens issued (the
    CLI refuses a world file beside it: the state holds the world), and changes are written
    back while serving. Besides the SDK's variables it prints ``SYNCER_DATABASE`` and
    ``SYNCER_TOKEN_STORAGE`` for a folder of the simulator's own (see
    ``simulator_folder``), so its tokens and history never mix into a real store.
    Raises ``SimulatorSetupError`` when it cannot start.
    """
    say = say or (lambda s: print(s, flush=True))
    saved = None
    if state_file and Path(state_file).exists():
        saved = _load(state_file, read_state, "state file")
        world = saved.world
        say(f"# restored the world and {len(saved.tokens['refresh_tokens'])} refresh token(s) from {state_file}")
    elif world_file:
        world = _load(world_file, World.from_json, "world file")
    else:
        world = World.generate(groups=groups, members=members, seed=seed)
    faults = Faults(latency_ms=latency_ms, access_token_lifetime=token_lifetime, random_rate=fault_rate, seed=seed)
    sim = Simulator(world, port=port, faults=faults, state_file=state_file, tls=tls)
    if saved is not None:
        try:
            sim.restore_tokens(saved.tokens)
        except ValueError as err:
            raise SimulatorSetupError(f"{state_file}: not a valid state file: {err}", config=True) from None
    try:
        sim.save_state()  # a state file that cannot be written fails now, not at the first login
    except OSError as err:
        raise SimulatorSetupError(f"{state_file}: cannot write the state file: {err.strerror or err}", config=True) from None
    try:
        sim.start()
    except ssl.SSLError as err:
        raise SimulatorSetupError(f"cannot use the TLS certificate and key: {err.reason or err}", config=True) from None
    except OSError as err:
        raise SimulatorSetupError(f"cannot listen on 127.0.0.1:{port}: {err.strerror or err}", config=False) from None
    folder = simulator_folder(syncer_dir, state_file)
    for client_id in world.clients:
        say(f"# confidential client {client_id} (its secret is in the world or state file)")
    say(f"# admin: GET {sim.url}/admin/world; POST {sim.url}/admin/ACTION (see docs/simulator.md)")
    kept = "kept" if folder.kept else "removed when the simulator stops, with its world"
    say(f"# syncer's database and token store for this simulator: {folder.path} ({kept})")
    syncer_env = {"SYNCER_DATABASE": str(folder.path / "groups.db"), "SYNCER_TOKEN_STORAGE": str(folder.path / "tokens.db")}
    try:
        sim.serve_forever(print_env=True, say=say, extra_env=syncer_env)
    finally:
        if not folder.kept:
            shutil.rmtree(folder.path, ignore_errors=True)


class SimulatorFolder(t.NamedTuple):
    """Where syncer keeps what it gets from one simulator: never the real store."""

    path: Path
    #: False for a temporary folder, whose world (and so its data) ends with the simulator
    kept: bool


def simulator_folder(syncer_dir: str | None, state_file: str | None) -> SimulatorFolder:
    """The folder for syncer's database and token store while it talks to this simulator.

    ``syncer_dir`` if given; beside a state file, ``STEM.syncer`` (the state keeps the
    world and its tokens, so the history stays meaningful across restarts); else a new
    temporary folder, removed when the simulator stops: its world is generated afresh
    next time, and tokens from it would be worthless.
    """
    try:
        if syncer_dir:
            path = Path(syncer_dir).expanduser().absolute()
        elif state_file:
            state = Path(state_file).expanduser().absolute()
            path = state.with_name(f"{state.stem}.syncer")
        else:
            return SimulatorFolder(Path(tempfile.mkdtemp(prefix="syncer-simulate-")), kept=False)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise SimulatorSetupError(f"{syncer_dir or state_file}: cannot make the simulator's folder: {err.strerror or err}",
                                  config=True) from None
    return SimulatorFolder(path, kept=True)


_T = t.TypeVar("_T")


def _load(path: str, reader: Callable[[Any], _T], what: str) -> _T:
    """Read a world or state file; any problem is one line naming the file."""
    try:
        return reader(Path(path))
    except FileNotFoundError:
        raise SimulatorSetupError(f"{path}: {what} not found", config=True) from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise SimulatorSetupError(f"{path}: cannot read the {what}: {reason}", config=True) from None
    except ValueError as err:
        raise SimulatorSetupError(f"{path}: not a valid {what}: {err}", config=True) from None
