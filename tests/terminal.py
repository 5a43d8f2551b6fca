"""Running `syncer` on a terminal: a real pseudo-terminal of a given size as its stdout."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import sys
import termios
import typing as t

from conftest import Result, record


def run_in_terminal(
    variables: dict[str, str], cwd: t.Any, args: t.Sequence[str], columns: int, rows: int = 24, timeout: float = 120,
) -> Result:
    """``syncer ARGS`` with stdout on a pty ``columns`` wide (set with TIOCSWINSZ, as a
    terminal emulator does) and stderr on a pipe; stdout as the terminal got it, line
    ends back to ``\\n``. ``COLUMNS``/``LINES`` are removed: the width is the terminal's."""
    main, secondary = os.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in variables.items() if k not in ("COLUMNS", "LINES")}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "syncer", *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                stdout=secondary, stderr=subprocess.PIPE)
    finally:
        os.close(secondary)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError as err:  # EIO: every writer closed the terminal
                if err.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(main)
    stderr = proc.stderr.read() if proc.stderr else b""
    if proc.stderr:
        proc.stderr.close()
    proc.wait(timeout=timeout)
    out = b"".join(chunks).decode("utf-8").replace("\r\n", "\n")
    err = stderr.decode("utf-8")
    record(out, err)
    return Result(proc.returncode, out, err)
