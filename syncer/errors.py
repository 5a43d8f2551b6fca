"""Exceptions that end a command, each carrying the exit code users rely on.

The CLI turns any of these into one line on stderr and the exit code below; anything
else escaping a command is a bug.
"""

from __future__ import annotations

from pathlib import Path

# Exit codes (see README "Exit codes"); values follow sysexits.h where one fits.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_LOCKED = 75  # EX_TEMPFAIL: try again later
EXIT_LOGIN_REQUIRED = 77  # EX_NOPERM
EXIT_CONFIG = 78  # EX_CONFIG


class SyncerError(Exception):
    """A failure with a message fit for users and a documented exit code."""

    exit_code: int = EXIT_FAILED


class ConfigError(SyncerError):
    """The configuration is unreadable or invalid; the message names file and key."""

    exit_code = EXIT_CONFIG


class LoginRequired(SyncerError):
    """No usable tokens: the user has to run ``syncer login`` again."""

    exit_code = EXIT_LOGIN_REQUIRED

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; run `syncer login` to log in again")


class LockBusy(SyncerError):
    """Another sync holds the lock on this database."""

    exit_code = EXIT_LOCKED


class StorageError(SyncerError):
    """The database or token store cannot be opened or written."""

    exit_code = EXIT_FAILED


def file_in_the_way(path: Path) -> Path | None:
    """The file that stands where one of ``path``'s folders should be, if any."""
    for folder in path.parents:
        if folder.exists():
            return None if folder.is_dir() else folder
    return None


def os_problem(path: Path, err: OSError) -> str:
    """Why ``path`` could not be made or opened, in words: "File exists" from mkdir
    means a file stands where a folder is needed, which the message then names."""
    blocker = file_in_the_way(path)
    return f"{blocker} is a file, not a folder" if blocker else err.strerror or str(err)
