"""The configuration rules of "Reading Globus": `my_statuses` only statuses with which
Globus shows a group, `token_storage` never the database file (whatever its names),
and `exclude_groups` never read and listed by `syncer status` — each through the real
`syncer` command against the simulator."""

from __future__ import annotations

import json
import os
import re

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


def test_every_problem_of_the_file_at_once_one_line_each_exit_78(logged_in: Env) -> None:
    """A file with an unknown key, a wrong type, a bad value and a bad hook: `syncer sync`
    names all of them, one `syncer: error:` line each, before anything is read or written."""
    env = logged_in
    env.write_config(colour="blue", concurrency="many", my_statuses=["left"])
    with env.config.open("a") as fh:
        fh.write('[[hooks]]\nname = "ldap"\ncommand = ["/usr/local/bin/sync-ldap"]\ntimeout = "2h"\nretries = 3\n')
    env.vars["SYNCER_INTERVAL"] = "15"
    result = env.run("sync")
    assert result.returncode == 78, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.splitlines()
    assert all(line.startswith(f"syncer: error: {env.config}: ") for line in lines[:-1]), result.stderr
    named = [re.search(r"(unknown key '\w+'|key '\w+')", line).group(1) for line in lines[:-1]]  # type: ignore[union-attr]
    assert named == ["unknown key 'colour'", "key 'concurrency'", "key 'my_statuses'", "key 'retries'", "key 'timeout'"]
    assert "[[hooks]] #1 ('ldap'), key 'timeout': must be more than 0 and at most 1h" in lines[-2]
    expected = "syncer: error: environment variable SYNCER_INTERVAL: '15' has no unit: write e.g. \"15s\", \"15m\" or \"15h\""
    assert lines[-1] == expected
    assert env.sim.stats["requests"].get("my_groups", 0) == 0  # refused before asking Globus
    assert not env.database.exists()
