"""A hook command's keeper: it runs the command and ends every process of it when
the syncer process that started it goes, however that process ends (kill -9 too).

syncer starts this file as a script (standard library only, nothing of syncer's
imported, so it starts fast) in a session of its own, with two pipes:

- ``CONTROL_FD``: the read end of a pipe only syncer can write to. End of file on it
  means "stop now": syncer closed it (a timeout, a shutdown) or syncer is gone (the
  kernel closes a dead process's descriptors, whatever killed it).
- ``STATUS_FD``: one JSON line back to syncer at the end: ``{"returncode": N}``
  (negative: killed by that signal), ``{"stopped": true}`` or ``{"error": "..."}``.

The command runs in a session of its own (its process group is killed whole), and
with ``PR_SET_PDEATHSIG`` so that it dies with this keeper even if the keeper itself
is killed. The keeper is a child subreaper (``PR_SET_CHILD_SUBREAPER``): processes the
command leaves behind, even ones that started sessions of their own or whose parents
exited, become the keeper's children instead of init's, and are killed and reaped
before it exits. A delivery is over when every process of it is gone, so the next
delivery of the hook cannot overlap it; syncer also hands the keeper its hooks lock,
which the kernel releases only when both have exited.

Usage: ``python hook_supervisor.py CONTROL_FD STATUS_FD -- COMMAND...``
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import typing as t
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


class Stop(Exception):
    """SIGTERM to the keeper: end the command as if syncer had gone."""


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _die_with_keeper(keeper: int) -> t.Callable[[], None]:
    """The command's pre-exec step: be killed when the keeper dies (and, if it already
    died between the fork and now, go at once)."""

    def setup() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != keeper:
            os._exit(1)

    return setup


def _children() -> list[int]:
    """This process's children (orphans it adopted as a subreaper among them)."""
    me = os.getpid()
    listed = Path(f"/proc/{me}/task/{me}/children")
    with contextlib.suppress(OSError):
        return [int(pid) for pid in listed.read_text().split()]
    found = []  # kernels without CONFIG_PROC_CHILDREN: look through every process
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                    found.append(int(entry.name))
    return found


def _end_everything(group: int) -> None:
    """Kill the command's process group, then every process left under the keeper,
    until none is: an orphan's descendants become the keeper's children in turn as
    their parents die."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
    while True:
        for pid in _children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _on_sigterm(signum: int, frame: object) -> None:
    raise Stop


def supervise(control: int, command: list[str]) -> dict[str, t.Any]:
    """Run ``command`` until it exits or ``control`` ends; return what happened."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        # preexec_fn is safe here: the keeper has one thread
        proc = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_keeper(os.getpid()))
    except OSError as err:
        return {"error": f"cannot start {command[0]}: {err.strerror or err}"}
    outcome: dict[str, t.Any] = {"stopped": True}
    try:
        exited = os.pidfd_open(proc.pid)
        while True:
            ready, _, _ = select.select([control, exited], [], [])
            if exited in ready:
                outcome = {"returncode": proc.wait()}
                break
            if control in ready and not os.read(control, 512):
                break  # syncer closed it, or is gone
    except Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nothing interrupts the clean-up
        _end_everything(proc.pid)
    return outcome


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # syncer decides when a hook stops
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    control, status = int(argv[1]), int(argv[2])
    command = argv[4:]
    outcome = supervise(control, command)
    with contextlib.suppress(OSError):  # syncer gone: no one to tell
        os.write(status, json.dumps(outcome).encode() + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
