"""Receivers on 127.0.0.1 for what syncer sends out: webhook POSTs, healthcheck pings, hook commands."""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
import threading
import typing as t
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import Env


@dataclasses.dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> t.Any:
        return json.loads(self.body)


class Receiver:
    """A real HTTP server recording every request; it answers ``status``.

    ``hold()`` makes the next request wait, once recorded, until ``release()``: a test
    can then act (kill the sender) while a call is in flight. ``stop()`` and ``start()``
    take it down and bring it back on the same port.
    """

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[Request] = []
        self.arrived = threading.Event()  # a held request has been recorded
        self._release = threading.Event()
        self._release.set()
        self._lock = threading.Lock()
        self.port = 0
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                receiver._handle(self)

            def do_POST(self) -> None:
                receiver._handle(self)

            def log_message(self, format: str, *args: t.Any) -> None:  # noqa: A002 - the base class's name
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def hold(self) -> None:
        self.arrived.clear()
        self._release.clear()

    def release(self) -> None:
        self._release.set()

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        request = Request(handler.command, handler.path, dict(handler.headers.items()), body)
        with self._lock:
            self.requests.append(request)
        if not self._release.is_set():
            self.arrived.set()
            self._release.wait(60)
        try:
            handler.send_response(self.status)
            handler.send_header("Content-Length", "2")
            handler.end_headers()
            handler.wfile.write(b"ok")
        except OSError:
            pass  # the sender is gone (killed while held)

    def paths(self) -> list[str]:
        with self._lock:
            return [r.path for r in self.requests]

    def posts(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST"]


class Silent:
    """A server that accepts connections and reads requests but never answers (a dead ping URL)."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(16)
        self.port = self._socket.getsockname()[1]
        self.request_lines: list[str] = []
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ping"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._socket.accept()
            except OSError:
                return
            self._connections.append(conn)
            data = conn.recv(65536)
            self.request_lines.append(data.split(b"\r\n", 1)[0].decode())

    def close(self) -> None:
        for conn in self._connections:
            conn.close()
        self._socket.close()


# A hook command: records each call (run id, hook, database, environment, stdin lines)
# as one JSON line in OUT; MODE says what else it does.
#   ok    exit 0
#   fail  exit 1
#   hang  start a grandchild that sleeps, note both pids and the time, then wait forever
#   once  the first time: note its pid in OUT.pid, then wait forever; later calls: exit 0
HOOK_SCRIPT = r'''
import json, os, subprocess, sys, time
out, mode = sys.argv[1], sys.argv[2]
record = {"run_id": os.environ.get("SYNCER_RUN_ID"), "hook": os.environ.get("SYNCER_HOOK"),
          "database": os.environ.get("SYNCER_DATABASE"), "env": dict(os.environ),
          "lines": [json.loads(line) for line in sys.stdin], "started": time.time()}
with open(out, "a") as fh:
    fh.write(json.dumps(record) + "\n")
if mode == "fail":
    sys.exit(1)
if mode == "hang":
    child = subprocess.Popen(["sleep", "300"])
    with open(out + ".pids", "w") as fh:
        fh.write(f"{os.getpid()} {child.pid}")
    time.sleep(300)
if mode == "once" and not os.path.exists(out + ".pid"):
    with open(out + ".pid", "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(300)
'''


class CommandHook:
    """The hook script above, installed in a folder: what its calls received."""

    def __init__(self, folder: Path, name: str, mode: str = "ok") -> None:
        self.script = folder / "hook.py"
        self.script.write_text(HOOK_SCRIPT)
        self.out = folder / f"{name}.jsonl"
        self.mode = mode

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(self.script), str(self.out), self.mode]

    def calls(self) -> list[dict[str, t.Any]]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines()]

    def runs(self) -> list[int]:
        return [int(call["run_id"]) for call in self.calls()]


def configure(env: Env, *hooks: dict[str, t.Any], **settings: t.Any) -> None:
    """The test's configuration with these settings and ``[[hooks]]`` tables."""
    env.write_config(**settings)
    with env.config.open("a") as fh:
        fh.write(hooks_toml(*hooks))


def watch_everything(
    env: Env, receiver: Receiver, hook_path: str = "/hook", ping_path: str = "/ping", **settings: t.Any
) -> CommandHook:
    """Every way out at once: a command hook and a webhook (both ``observations = true``,
    named ``everything`` and ``web``), pings to the receiver, and the metrics file
    ``syncer.prom``. Returns the command hook."""
    hook = CommandHook(env.tmp, "everything")
    configure(
        env,
        {"name": "everything", "command": hook.command, "observations": True},
        {"name": "web", "url": receiver.url + hook_path, "observations": True},
        healthcheck_url=receiver.url + ping_path, metrics_file="syncer.prom", **settings,
    )
    return hook


def hooks_toml(*tables: dict[str, t.Any]) -> str:
    """``[[hooks]]`` tables as TOML text."""
    out = []
    for table in tables:
        out.append("[[hooks]]")
        out += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(out) + "\n"
