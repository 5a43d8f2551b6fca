"""``syncer demo``: the whole flow, offline, against the built-in simulator.

The same code paths as production: the real SDK talks HTTP to the simulator through
``GLOBUS_SDK_SERVICE_URL_*``; login runs the Native App flow (the demo plays the
browser), and both snapshots go through ``run_sync``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import typing as t
from pathlib import Path

import platformdirs

from syncer.config import Config
from syncer.errors import SyncerError
from syncer.globus.login import login
from syncer.globus.token_store import TokenStore
from syncer.operations.sync import run_sync
from syncer.simulator import Simulator, World
from syncer.storage.database import open_for_reading
from syncer.storage.schema import OBSERVATIONS

Say = t.Callable[[str], None]


def _world_changes(world: World) -> list[str]:
    """Change the simulated world the way a busy week would; describe each change."""
    me = world.me
    managed = [gid for gid, g in world.groups.items() if g["memberships"].get(me) and g["memberships"][me].role == "admin"]
    plain = [gid for gid, g in world.groups.items() if gid not in managed]
    first, second = managed[0], managed[1 % len(managed)]
    done = []
    newcomer = world.add_member(first)
    done.append(f"{world.identities[newcomer]['username']} joined {world.groups[first]['name']!r}")
    others = [i for i in world.groups[first]["memberships"] if i not in (me, newcomer)]
    world.set_role(first, others[0], "manager")
    done.append(f"{world.identities[others[0]]['username']} became a manager of {world.groups[first]['name']!r}")
    # an active member, so the change reads as someone losing access
    members = world.groups[second]["memberships"]
    leaving = [i for i, m in members.items() if i != me and m.status == "active"][-1]
    world.remove_member(second, leaving)
    done.append(f"{world.identities[leaving]['username']} was removed from {world.groups[second]['name']!r}")
    invited = world.add_member(second, status="invited")
    done.append(f"{world.identities[invited]['username']} was invited to {world.groups[second]['name']!r}")
    old_name = world.groups[second]["name"]
    world.rename_group(second, f"{old_name} (renamed)")
    done.append(f"group {old_name!r} was renamed")
    if plain:
        world.set_status(plain[0], me, "left")
        done.append(f"you left {world.groups[plain[0]]['name']!r}")
    return done


def default_folder() -> Path:
    """Where the demo keeps its database when not told: a folder of its own in the user
    data folder (beside, never in place of, the real store), replaced at every demo so
    that demos leave one folder behind, not one per run."""
    return Path(platformdirs.user_data_dir("syncer", appauthor=False)) / "demo"


def run_demo(groups: int, members: int, folder: str | None, say: Say) -> None:
    """Run the demo; its database stays in ``folder`` (default: ``default_folder()``,
    the previous demo's files there replaced), so the commands it suggests work after it."""
    with contextlib.ExitStack() as stack:
        where = Path(folder) if folder else default_folder()
        if not folder and where.exists():
            shutil.rmtree(where)  # the previous demo's: only the demo writes there
        where.mkdir(parents=True, exist_ok=True)
        world = World.generate(groups=max(groups, 3), members=max(members, 3), seed=7)
        sim = Simulator(world, port=0).start()
        stack.callback(sim.stop)
        saved = {key: os.environ.get(key) for key in sim.env}
        os.environ.update(sim.env)
        stack.callback(_restore, saved)
        config = Config(database=where / "groups.db", token_storage=where / "tokens.db")
        if config.database.exists():
            raise SyncerError(f"{config.database} already exists; give the demo an empty folder")

        say(f"== Simulated Globus running at {sim.url} (offline, nothing leaves this machine)")
        say("== 1. syncer login (the demo plays the browser step)")
        with TokenStore(config.token_storage) as store:
            login(config, store, no_browser=True, read_code=sim.authorize, say=_LoginNarration(say))

        say("== 2. first snapshot")
        first = run_sync(config)
        say(f"   run {first.run_id}: {first.groups_synced} groups, {first.memberships} memberships recorded")

        say("== 3. meanwhile, in Globus:")
        changes = _world_changes(world)
        for line in changes:
            say(f"   - {line}")

        say("== 4. second snapshot")
        second = run_sync(config)
        say(f"   run {second.run_id}: {second.groups_synced} groups, {second.changes} changes (events)")
        with open_for_reading(config.database, config.busy_timeout) as db:
            say("== What changed (view membership_changes; the reason says why, observations are marked):")
            for row in db.query(
                "SELECT change, reason, username, group_name, old_role, new_role, old_status, new_status"
                " FROM membership_changes WHERE run_id = ? ORDER BY group_name, username",
                [second.run_id],
            ):
                say("   " + _describe(row))
        size = config.database.stat().st_size
        say(f"== Database: {config.database} ({size / 1024:.0f} KiB)")
        say("== Ask syncer (SYNCER_DATABASE points it at the demo's database):")
        renamed = next(line for line in changes if "was renamed" in line).split("'")[1]
        for args in ("changes --all", f"members '{renamed}' --at run:1", "groups"):
            say(f"   SYNCER_DATABASE={config.database} {_syncer_command()} {args}")
        say("== Or SQL:")
        for query in _EXAMPLE_QUERIES:
            say(f"   {_query_command(config.database, query)}")


class _LoginNarration:
    """What ``syncer login --no-browser`` says, retold for the demo: there is nothing to
    paste (the demo opens the page and reads the code itself), and the URL is shown
    without its long query."""

    def __init__(self, say: Say) -> None:
        self.say = say

    def __call__(self, line: str) -> None:
        if line.startswith("Open this URL"):
            self.say("   the demo opens the login page, as your browser would, and reads the code off it:")
        elif line.startswith("http"):
            self.say(f"   {line.split('?', 1)[0]}?...")
        else:
            self.say(f"   {line}")


def _describe(row: dict[str, t.Any]) -> str:
    who = row["username"] or "?"
    why = f"{row['reason']}, an observation" if row["reason"] in OBSERVATIONS else row["reason"]
    if row["change"] == "added":
        return f"added    {who} to {row['group_name']!r} as {row['new_role']} ({row['new_status']}) [{why}]"
    if row["change"] == "removed":
        return f"removed  {who} from {row['group_name']!r} (was {row['old_role']}, {row['old_status']}) [{why}]"
    return (
        f"changed  {who} in {row['group_name']!r}: {row['old_role']}/{row['old_status']}"
        f" -> {row['new_role']}/{row['new_status']}"
    )


_EXAMPLE_QUERIES = (
    "SELECT group_name, username, role FROM active_members ORDER BY group_name LIMIT 10",
    "SELECT at, change, reason, username, group_name FROM membership_events ORDER BY at DESC LIMIT 10",
    "SELECT name, valid_from, valid_to FROM group_history ORDER BY group_id, from_run",
    "SELECT id, started_at, status, memberships, changes FROM sync_runs",
)


def _query_command(database: Path, query: str) -> str:
    """A command line that runs ``query``: sqlite3 if installed, else sqlite-utils (a dependency)."""
    if shutil.which("sqlite3"):
        return f'sqlite3 -header -column {database} "{query}"'
    sqlite_utils_cli = Path(sys.executable).parent / "sqlite-utils"
    return f'{sqlite_utils_cli if sqlite_utils_cli.exists() else "sqlite-utils"} {database} "{query}" --table'


def _syncer_command() -> str:
    """How to run syncer: the script beside this Python if there is one (a venv), else by name."""
    script = Path(sys.executable).parent / "syncer"
    return str(script) if script.exists() else "syncer"


def _restore(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
