"""Headless Chromium driven over the DevTools protocol, to look at a page as a person would.

Chromium runs with ``--remote-debugging-pipe``: it reads protocol commands on fd 3
and writes answers and events on fd 4, NUL-separated JSON, so no port and no
websocket library are needed. The page is opened at a window size (desktop, phone),
and everything it asks the network for, every console message and every uncaught
error are kept; a screenshot of the whole page (up to a height) can be written.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
import typing as t
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--mute-audio", "--hide-scrollbars")


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Visit(t.NamedTuple):
    """What one page load did."""

    requests: list[str]  # every URL the page requested, the page itself included
    console: list[tuple[str, str]]  # (level, text) of console messages, log entries and uncaught errors
    layout: dict[str, t.Any]  # figures read from the rendered page (see Browser.visit)
    html: str  # the rendered document (its DOM, serialized)


class Browser:
    """One headless Chromium with its own profile; ``visit`` opens a page in a new tab."""

    def __init__(self, timeout: float = 120) -> None:
        path = chromium_path()
        if path is None:
            raise RuntimeError("chromium is not installed")
        self.timeout = timeout
        self._profile = tempfile.TemporaryDirectory(prefix="report-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire() -> None:  # in the child: the protocol's fds 3 (commands in) and 4 (answers out)
            a, b = os.dup(to_child_r), os.dup(from_child_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [path, *FLAGS, f"--user-data-dir={self._profile.name}", "--remote-debugging-pipe", "about:blank"],
            # its own logging is not read (a full pipe would stall it): the protocol reports what matters
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, close_fds=False,  # fds 3 and 4 are set up in the child, and must survive exec
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, t.Any]] = []

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("Browser.close")
            except (OSError, RuntimeError):
                self.proc.kill()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        os.close(self._to_child)
        os.close(self._from_child)
        self._profile.cleanup()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- protocol

    def _read_message(self, deadline: float) -> dict[str, t.Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("chromium did not answer in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium exited ({self.proc.poll()})")
                self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params: t.Any) -> dict[str, t.Any]:
        """Send a command and wait for its answer, keeping the events that come meanwhile."""
        self._next_id += 1
        command: dict[str, t.Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            command["sessionId"] = session
        os.write(self._to_child, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._read_message(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._events.append(message)

    def wait_event(self, method: str, session: str) -> dict[str, t.Any]:
        deadline = time.monotonic() + self.timeout
        for n, event in enumerate(self._events):
            if event.get("method") == method and event.get("sessionId") == session:
                return self._events.pop(n)
        while True:
            message = self._read_message(deadline)
            if message.get("method") == method and message.get("sessionId") == session:
                return message
            self._events.append(message)

    # ------------------------------------------------------------------ pages

    def visit(self, url: str, width: int, height: int, *, mobile: bool = False, screenshot: Path | None = None,
              max_shot_height: int = 5000) -> Visit:
        """Open ``url`` at ``width`` x ``height`` CSS pixels and wait for its load event.

        ``layout`` holds the page's ``scrollWidth`` and ``innerWidth`` (a page wider
        than the window scrolls sideways as a whole), its height, and the number of
        SVG marks with a ``<title>``.
        """
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self._events.clear()
        for domain in ("Page", "Network", "Runtime", "Log"):
            self.send(f"{domain}.enable", session)
        self.send("Emulation.setDeviceMetricsOverride", session, width=width, height=height,
                  deviceScaleFactor=1, mobile=mobile)
        self.send("Page.navigate", session, url=url)
        self.wait_event("Page.loadEventFired", session)
        layout = json.loads(self.send("Runtime.evaluate", session, returnByValue=True, expression="""JSON.stringify({
            scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
            height: document.documentElement.scrollHeight,
            titledMarks: document.querySelectorAll('svg g > title').length,
            svgs: document.querySelectorAll('svg').length})""")["result"]["value"])
        if screenshot is not None:
            shot_height = min(layout["height"], max_shot_height)
            self.send("Emulation.setDeviceMetricsOverride", session, width=width, height=shot_height,
                      deviceScaleFactor=1, mobile=mobile)
            data = self.send("Page.captureScreenshot", session, format="png",
                             clip={"x": 0, "y": 0, "width": width, "height": shot_height, "scale": 1})["data"]
            screenshot.write_bytes(base64.b64decode(data))
        # also a round trip after the load: messages logged during it have arrived
        html = self.send("Runtime.evaluate", session, returnByValue=True,
                         expression="document.documentElement.outerHTML")["result"]["value"]
        requests, console = [], []
        for event in self._events:
            if event.get("sessionId") != session:
                continue
            params = event.get("params", {})
            match event.get("method"):
                case "Network.requestWillBeSent":
                    requests.append(params["request"]["url"])
                case "Runtime.consoleAPICalled":
                    text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                    console.append((params.get("type", ""), text))
                case "Runtime.exceptionThrown":
                    console.append(("exception", json.dumps(params.get("exceptionDetails", {}))))
                case "Log.entryAdded":
                    entry = params.get("entry", {})
                    console.append((entry.get("level", ""), f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}"))
        self.send("Target.closeTarget", targetId=target)
        return Visit(requests, console, layout, html)
