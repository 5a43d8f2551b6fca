"""The sync lock file's mode, and log records that text from Globus cannot split into forged ones."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import stat
import sys
from pathlib import Path

import pytest

from syncer import logs
from syncer.operations.lock import LockFile, marker_path, sync_running

# --------------------------------------------------------------------- the lock file


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_the_lock_file_is_created_0600(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "groups.db.lock"
    previous = os.umask(umask)
    try:
        with LockFile(path):
            assert mode(path) == 0o600
    finally:
        os.umask(previous)


def test_an_older_releases_0640_lock_file_becomes_0600(tmp_path: Path) -> None:
    path = tmp_path / "groups.db.lock"
    path.touch()
    path.chmod(0o640)
    with LockFile(path):
        assert mode(path) == 0o600
    assert mode(path) == 0o600


def test_readers_see_a_sync_through_the_run_marker_and_cannot_hold_it_off(tmp_path: Path) -> None:
    """Issue 21: the marker is group-readable (umask 0027) and locked while a sync holds
    the lock; a reader holding a lock on it (as anyone who may read it can) does not
    stop the next sync, whose marker is a new file."""
    path = tmp_path / "groups.db.lock"
    marker = marker_path(path)
    assert sync_running(path) is False  # no sync ever ran
    previous = os.umask(0o027)
    try:
        with LockFile(path):
            assert mode(marker) == 0o640 and mode(path) == 0o600
            assert sync_running(path) is True
        assert sync_running(path) is False
        reader = os.open(marker, os.O_RDONLY)
        try:
            fcntl.flock(reader, fcntl.LOCK_SH)  # a reader's lock, held on purpose
            with LockFile(path):
                assert sync_running(path) is True
            assert sync_running(path) is False
        finally:
            os.close(reader)
    finally:
        os.umask(previous)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary marker left


# ---------------------------------------------------------------------------- logs

# a group name as any Globus group admin may set it
EVIL_NAME = "evil\n<0>forged emergency\r\n<1>forged alert\0<0>after a NUL\u2028<0>after U+2028"
LINE_MAX = 48 * 1024  # journald's default LineMax, in bytes


def group_not_read(name: str) -> logging.LogRecord:
    return logging.LogRecord(
        "syncer.sync", logging.WARNING, __file__, 1, "group %s (%s) not read: %s", ("g-1", name, "HTTP 500"), None
    )


def failed_with_traceback() -> logging.LogRecord:
    try:
        raise RuntimeError("boom\n<0>from an exception message")
    except RuntimeError:
        exc_info = sys.exc_info()
    return logging.LogRecord("syncer.scheduler", logging.ERROR, __file__, 1, "snapshot failed unexpectedly", (), exc_info)


def journald_entries(stream: str) -> list[tuple[int, str]]:
    """The (priority, message) entries journald makes of a stderr stream (SyslogLevelPrefix=yes):
    an entry ends at "\\n", at NUL or after LINE_MAX bytes, and each may open with a <N> prefix."""
    entries = []
    for line in re.split(rb"[\n\0]", stream.encode("utf-8", "backslashreplace")):
        for start in range(0, max(len(line), 1), LINE_MAX):
            text = line[start : start + LINE_MAX].decode("utf-8", "replace")
            prefix = re.match(r"<(\d{1,3})>", text)
            entries.append((int(prefix[1]) & 7, text[prefix.end() :]) if prefix else (6, text))
    return entries


def test_journald_a_line_break_in_a_message_cannot_forge_an_entry() -> None:
    out = logs.JournalFormatter("%(name)s: %(message)s").format(group_not_read(EVIL_NAME))
    entries = journald_entries(out)
    assert {priority for priority, _ in entries} == {4}  # warning, every one
    messages = [message for _, message in entries]
    assert messages[0] == "syncer.sync: group g-1 (evil"
    assert "<0>forged emergency" in messages and "<1>forged alert" in messages  # plain text now


def test_journald_every_traceback_line_keeps_the_records_priority() -> None:
    out = logs.JournalFormatter("%(name)s: %(message)s").format(failed_with_traceback())
    entries = journald_entries(out)
    assert len(entries) > 3 and {priority for priority, _ in entries} == {3}
    assert entries[1][1] == "Traceback (most recent call last):"
    assert "<0>from an exception message" in [message for _, message in entries]


def test_journald_a_line_longer_than_line_max_cannot_forge_an_entry() -> None:
    # journald would cut this line after LINE_MAX bytes, just before the "<0>"
    name = "x" * (LINE_MAX - len("<4>syncer.sync: group g-1 (")) + "<0>forged emergency"
    out = logs.JournalFormatter("%(name)s: %(message)s").format(group_not_read(name))
    entries = journald_entries(out)
    assert {priority for priority, _ in entries} == {4}
    assert "".join(message for _, message in entries) == f"syncer.sync: group g-1 ({name}) not read: HTTP 500"


def test_text_continuation_lines_are_indented() -> None:
    formatter = logs.TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    forged = "x\n2026-01-01 00:00:00,000 ERROR syncer.sync: forged\rback at the margin"
    for record_ in (group_not_read(forged), failed_with_traceback()):
        first, *rest = formatter.format(record_).splitlines()
        assert first[:4].isdigit() and rest
        assert all(line.startswith("  ") for line in rest), rest
    assert "  Traceback (most recent call last):" in formatter.format(failed_with_traceback()).splitlines()


def test_plain_stderr_uses_the_text_formatter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    loggers = [logging.getLogger(name) for name in ("", "syncer", "apscheduler")]
    saved = [(lg.handlers[:], lg.level) for lg in loggers]
    try:
        logs.configure(0, "text")
        assert isinstance(logging.getLogger().handlers[0].formatter, logs.TextFormatter)
    finally:
        for lg, (handlers, level) in zip(loggers, saved, strict=True):
            lg.handlers[:] = handlers
            lg.setLevel(level)


def test_json_every_line_break_is_escaped() -> None:
    name = EVIL_NAME + "\x85<0>after NEL\u2029<0>after U+2029"
    for record_ in (group_not_read(name), failed_with_traceback()):
        out = logs.JSONFormatter().format(record_)
        assert len(out.splitlines()) == 1 and "\0" not in out
        assert json.loads(out)["message"] == record_.getMessage()
