"""systemd's notification protocol (sd_notify), with no dependency and no-op elsewhere.

``Type=notify`` units learn from ``READY=1`` that the daemon is scheduling, from
``WATCHDOG=1`` that it is still alive, and from ``STATUS=`` what to show in
``systemctl status``. Without ``$NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import os
import socket

from syncer.logs import module_logger

log = module_logger(__name__)


def notify(**fields: str) -> bool:
    """Send ``KEY=value`` lines to systemd; returns False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as err:
        log.debug("sd_notify failed: %s", err)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half systemd's timeout), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000 / 2
    except ValueError:
        return None
