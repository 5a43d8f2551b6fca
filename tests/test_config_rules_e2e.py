"""The configuration rules of "Reading Globus": `my_statuses` only statuses with which
Globus shows a group, `token_storage` never the database file (whatever its names),
and `exclude_groups` never read and listed by `syncer status` — each through the real
`syncer` command against the simulator."""

from __future__ import annotations

import json
import os

import pytest
from conftest import Env
from helpers import current_state, my_active_groups, others


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("syncer: error: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("statuses", [["left"], ["active", "removed"], ["declined"]])
def test_my_statuses_outside_active_invited_pending_is_a_78_naming_file_and_key(
    logged_in: Env, statuses: list[str]
) -> None:
    env = logged_in
    env.write_config(my_statuses=statuses)
    result = env.run("sync")
    assert result.returncode == 78, result.output
    line = one_error_line(result.stderr)
    assert str(env.config) in line and "'my_statuses'" in line and "active, invited, pending" in line
    assert env.sim.stats["requests"].get("my_groups", 0) == 0  # refused before asking Globus
    assert not env.database.exists()


def test_my_statuses_from_the_environment_names_the_variable(logged_in: Env) -> None:
    env = logged_in
    env.vars["SYNCER_MY_STATUSES"] = "active,left"
    result = env.run("sync")
    assert result.returncode == 78
    assert "environment variable SYNCER_MY_STATUSES" in one_error_line(result.stderr)
    env.vars["SYNCER_MY_STATUSES"] = "active,invited,pending"
    assert env.run("sync").returncode == 0


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_token_storage_that_is_the_database_is_a_78(logged_in: Env, how: str) -> None:
    env = logged_in
    assert env.run("sync").returncode == 0
    before = current_state(env)
    if how == "same path":
        env.write_config(token_storage="groups.db")
    else:
        link = env.tmp / "tokens-link.db"
        if how == "symlink":
            link.symlink_to(env.database)
        else:
            os.link(env.database, link)
        env.write_config(token_storage=link.name)
    for command in (["sync"], ["status"], ["login", "--no-browser"], ["members", my_active_groups(env.world)[0]]):
        result = env.run(*command, input="")
        assert result.returncode == 78, (command, result.output)
        line = one_error_line(result.stderr)
        assert "'token_storage'" in line and "same file as database" in line and str(env.database) in line
    assert current_state(env) == before  # nothing stored was touched
    assert env.query("SELECT count(*) FROM sync_runs")[0][0] == 1


def test_excluded_groups_are_never_read_kept_as_they_were_and_listed_in_status(logged_in: Env) -> None:
    env = logged_in
    assert env.run("sync").returncode == 0
    world = env.world
    with world.lock:
        excluded = my_active_groups(world)[0]
        name = world.groups[excluded]["name"]
        member = others(world, excluded)[0]
    before = {key: value for key, value in current_state(env).items() if key[0] == excluded}
    assert before
    world.remove_member(excluded, member)
    env.sim.read_log.clear()

    env.write_config(exclude_groups=[excluded])
    result = env.run("sync")
    assert result.returncode == 0, result.output
    assert excluded not in {read.get("group_id") for read in env.sim.read_log}
    assert {key: value for key, value in current_state(env).items() if key[0] == excluded} == before
    assert env.query("SELECT removed_at FROM groups WHERE id = ?", [excluded])[0][0] is None
    assert env.query("SELECT count(*) FROM membership_changes WHERE group_id = ?", [excluded])[0][0] == len(before)

    status = env.run("status")
    assert f"excluded groups (exclude_groups, never read): 1\n  {excluded} {name}" in status.stdout
    data = json.loads(env.run("status", "--json").stdout)
    assert data["database"]["excluded_groups"] == [{"id": excluded, "name": name}]

    # even when `groups` names it
    env.write_config(exclude_groups=[excluded], groups=[excluded])
    env.sim.read_log.clear()
    assert env.run("sync").returncode == 0
    assert excluded not in {read.get("group_id") for read in env.sim.read_log}
