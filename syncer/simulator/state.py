"""``syncer simulate --state FILE``: the world and the tokens issued, kept across restarts.

The file is JSON (mode 0600: it holds live simulated tokens) written atomically
(temporary file, fsync, rename), so a crash at any moment leaves the previous
version readable. Authorization codes are not kept: they live for minutes.
"""

from __future__ import annotations

import json
import os
import tempfile
import typing as t
from pathlib import Path

from .world import World

STATE_FORMAT = "syncer-simulator-state"
STATE_VERSION = 1


class SavedState(t.NamedTuple):
    world: World
    tokens: dict[str, t.Any]  # "refresh_tokens" and "access_tokens" lists, as Simulator.export_tokens gives


def read_state(path: Path) -> SavedState:
    """Load a state file; ``ValueError`` says what is wrong with it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
        raise ValueError(f'not a simulator state file ("format" must be "{STATE_FORMAT}")')
    if data.get("format_version") != STATE_VERSION:
        raise ValueError(f"format_version must be {STATE_VERSION}")
    tokens = data.get("tokens")
    if not isinstance(tokens, dict) or not all(
        isinstance(tokens.get(key), list) for key in ("refresh_tokens", "access_tokens")
    ):
        raise ValueError('"tokens" must hold "refresh_tokens" and "access_tokens" lists')
    try:
        world = World.from_dict(data.get("world"))  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"world.{err}") from None
    return SavedState(world, tokens)


def write_state(path: Path, world: World, tokens: dict[str, t.Any]) -> None:
    """Write the state file atomically, readable by its owner only."""
    document = {"format": STATE_FORMAT, "format_version": STATE_VERSION, "world": world.to_dict(), "tokens": tokens}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(document, fh, ensure_ascii=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
