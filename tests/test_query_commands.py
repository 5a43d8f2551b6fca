"""`syncer members / changes / groups / identity`, run as a user runs them, against a
database made by real syncs (tests/history_scenario.py) and compared with the
simulator's world at each run."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import typing as t
from pathlib import Path

import pytest
from conftest import Env, Result
from helpers import OtherUsersPython, admin_groups, has_running_run, others, python_for, wait_for
from history_scenario import LONG_NAME, Scenario, expected_changes, versions
from terminal import run_in_terminal

from syncer.storage.when import EXAMPLES

RUNS = (2, 3, 4, 5)
NOBODY = 65534


def query(history: Scenario, *args: str, env: dict[str, str] | None = None) -> Result:
    return history.env.run(*args, variables=env)


def as_json(history: Scenario, *args: str) -> list[dict[str, t.Any]]:
    result = query(history, *args, "--format", "json")
    assert result.returncode == 0, result.output
    assert "Traceback" not in result.output
    return json.loads(result.stdout)


# ------------------------------------------------------------------- members


@pytest.mark.parametrize("run_id", RUNS)
@pytest.mark.parametrize("every_status", [False, True], ids=["active", "all"])
def test_members_as_of_each_run_match_the_world_then(history: Scenario, run_id: int, every_status: bool) -> None:
    truth = history.truths[run_id]
    for gid, group in truth.groups.items():
        rows = as_json(history, "members", gid, "--at", f"run:{run_id}", *(["--all"] if every_status else []))
        assert {r["identity_id"]: (r["role"], r["status"]) for r in rows} == truth.members(gid, every_status)
        assert {r["group_name"] for r in rows} <= {group.name}  # the name it had then
        assert all(r["username"] == history.username(r["identity_id"]) for r in rows)
        assert [r["username"] for r in rows] == sorted(r["username"] for r in rows)
        assert all(list(r) == ["group_id", "group_name", "identity_id", "username", "role", "status"] for r in rows)


def test_members_now_and_by_time_are_the_latest_and_the_run_then(history: Scenario) -> None:
    latest = history.truths[5]
    assert {r["identity_id"] for r in as_json(history, "members", history.a)} == set(latest.members(history.a))
    # a moment just after run 3 started is run 3, as an ISO time with Z and with an offset
    third = history.truths[3]
    at = third.started_at.replace("Z", "+00:00")
    rows = as_json(history, "members", history.a, "--at", at)
    assert {r["identity_id"] for r in rows} == set(third.members(history.a))
    shifted = as_json(history, "members", history.a, "--at", _with_offset(history.truths[4].started_at))
    assert {r["identity_id"] for r in shifted} == set(history.truths[4].members(history.a))
    # a span ago that reaches back past every run is before the first one
    result = query(history, "members", history.a, "--at", "30d")
    assert result.returncode == 1 and "nothing recorded as of 30d" in result.stderr


def _with_offset(stamp: str) -> str:
    """The same moment written in UTC+02:00."""
    import datetime as dt

    moment = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return moment.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()


def test_members_by_any_name_the_group_has_had(history: Scenario) -> None:
    by_id = as_json(history, "members", history.a, "--at", "run:3")
    assert as_json(history, "members", LONG_NAME, "--at", "run:3") == by_id
    assert as_json(history, "members", LONG_NAME.upper(), "--at", "run:3") == by_id  # case is forgiven
    # D took A's old name in run 5: that name is now ambiguous, and the error lists both
    result = query(history, "members", history.a_old_name)
    assert result.returncode == 1, result.output
    assert "ambiguous" in result.stderr and history.a in result.stderr and history.d in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_members_of_a_group_whose_members_became_hidden_say_so(history: Scenario) -> None:
    result = query(history, "members", history.c)
    assert result.returncode == 0, result.output
    assert "not visible" in result.stderr and "members_visible = 0" in result.stderr
    rows = as_json(history, "members", history.c, "--all")
    assert [r["identity_id"] for r in rows] == [history.world.me]
    before = query(history, "members", history.c, "--at", "run:4")
    assert before.returncode == 0 and "not visible" not in before.stderr


def test_members_all_where_only_active_memberships_are_visible_says_so(history: Scenario) -> None:
    truth = history.truths[5]
    gid = next(g for g, v in truth.groups.items() if v.my_role == "member" and v.members_visible)
    result = query(history, "members", gid, "--all")
    assert result.returncode == 0, result.output
    assert "members_view = 'active'" in result.stderr
    assert "members_view" not in query(history, "members", gid).stderr  # active members: nothing missing


def test_a_partial_run_carries_the_failed_groups_previous_state(history: Scenario) -> None:
    at4 = {r["identity_id"] for r in as_json(history, "members", history.b, "--at", "run:4")}
    at3 = {r["identity_id"] for r in as_json(history, "members", history.b, "--at", "run:3")}
    assert at4 == at3 and history.b_joiner not in at4
    assert history.b_joiner in {r["identity_id"] for r in as_json(history, "members", history.b)}


def test_before_the_first_successful_run_says_so(history: Scenario) -> None:
    # run 1 failed: nothing was recorded as of it
    result = query(history, "members", history.a, "--at", "run:1")
    assert result.returncode == 1
    assert "nothing recorded as of run:1" in result.stderr and "run 2" in result.stderr
    today = history.truths[2].started_at[:10]
    result = query(history, "groups", "--at", today)  # 00:00 UTC today: before every run
    assert result.returncode == 1 and "first successful run (run 2)" in result.stderr


# ------------------------------------------------------------------- groups


@pytest.mark.parametrize("run_id", RUNS)
def test_groups_as_of_each_run(history: Scenario, run_id: int) -> None:
    truth = history.truths[run_id]
    rows = as_json(history, "groups", "--at", f"run:{run_id}")
    assert [list(r) for r in rows[:1]] == [
        ["id", "name", "my_role", "my_status", "members_visible", "active_members", "needs_login"]]  # SPEC's columns
    got = {r["id"]: (r["name"], r["my_role"], r["my_status"], r["members_visible"], r["active_members"]) for r in rows}
    assert got == {gid: (g.name, g.my_role, g.my_status, g.members_visible, g.active_members)
                   for gid, g in truth.groups.items()}


def test_groups_now_and_its_table(history: Scenario) -> None:
    truth = history.truths[5]
    rows = as_json(history, "groups")
    assert {r["id"]: r["active_members"] for r in rows} == {gid: g.active_members for gid, g in truth.groups.items()}
    assert {r["id"] for r in rows if not r["members_visible"]} >= {history.c}
    table = query(history, "groups")
    assert table.returncode == 0
    hidden = sum(1 for g in truth.groups.values() if not g.members_visible)
    verb = "does" if hidden == 1 else "do"
    assert f"{hidden} of these groups {verb} not show your identity their members" in table.stderr


# ------------------------------------------------------------------- changes


@pytest.mark.parametrize("run_id", RUNS)
def test_changes_of_each_run_with_observations(history: Scenario, run_id: int) -> None:
    before = history.truths.get(run_id - 1)
    rows = as_json(history, "changes", "--since", f"run:{run_id}", "--until", f"run:{run_id}", "--all")
    assert {(r["group_id"], r["identity_id"], r["change"], r["reason"]) for r in rows} == expected_changes(
        before, history.truths[run_id]
    )
    names = {gid: g.name for gid, g in history.truths[run_id].groups.items()}
    assert all(r["group_name"] == names[r["group_id"]] for r in rows)  # the name at that run
    assert all(r["run_id"] == run_id and r["at"] == history.truths[run_id].started_at for r in rows)


def test_changes_default_is_the_last_week_of_events_oldest_first(history: Scenario) -> None:
    rows = as_json(history, "changes")
    every = set()
    for run_id in RUNS:
        every |= {c for c in expected_changes(history.truths.get(run_id - 1), history.truths[run_id])
                  if c[3] in ("joined", "left", "changed")}
    assert {(r["group_id"], r["identity_id"], r["change"], r["reason"]) for r in rows} == every
    assert [r["run_id"] for r in rows] == sorted(r["run_id"] for r in rows)
    assert list(rows[0]) == ["at", "run_id", "group_id", "group_name", "identity_id", "username", "change", "reason",
                             "old_role", "new_role", "old_status", "new_status"]
    assert not [r for r in rows if r["run_id"] == 2]  # the first snapshot is observations only


def test_changes_filtered_by_group_user_and_time(history: Scenario) -> None:
    by_group = as_json(history, "changes", "--group", LONG_NAME)
    assert by_group and {r["group_id"] for r in by_group} == {history.a}
    promoted = as_json(history, "changes", "--user", history.username(history.p))
    assert [(r["group_id"], r["change"], r["old_role"], r["new_role"]) for r in promoted] == [
        (history.a, "changed", history.truths[2].state[(history.a, history.p)][0],
         history.truths[3].state[(history.a, history.p)][0])
    ]
    assert as_json(history, "changes", "--user", history.p) == promoted  # by identity id too
    later = history.truths[5].started_at
    assert {r["run_id"] for r in as_json(history, "changes", "--since", later, "--all")} == {5}
    hidden = query(history, "changes", "--group", history.c)
    assert hidden.returncode == 0 and "not visible" in hidden.stderr


# ------------------------------------------------------------------- identity


def test_identity_history_is_every_version(history: Scenario) -> None:
    for person in (history.p, history.joiner):
        rows = as_json(history, "identity", history.username(person))
        assert list(rows[0]) == ["group_id", "group_name", "role", "status", "from", "to", "began", "ended"]
        assert {(r["group_id"], r["role"], r["status"], r["from"], r["to"]) for r in rows} == versions(
            history.truths, person)
        assert [r["from"] for r in rows] == sorted(r["from"] for r in rows)
        names = {gid: g.name for gid, g in history.truths[5].groups.items()}
        assert all(r["group_name"] == names[r["group_id"]] for r in rows)
        # began/ended are the reasons `changes` gives for the runs that began and ended each version
        reasons = {(r["group_id"], r["at"], r["change"]): r["reason"] for r in as_json(history, "changes", "--since",
                   "run:1", "--all", "--user", person)}
        for row in rows:
            began = reasons.get((row["group_id"], row["from"], "added")) or reasons[(row["group_id"], row["from"], "changed")]
            assert row["began"] == began
            ended = None if row["to"] is None else (reasons.get((row["group_id"], row["to"], "removed"))
                                                    or reasons[(row["group_id"], row["to"], "changed")])
            assert row["ended"] == ended


# ------------------------------------------------------------------- formats


def test_every_format_holds_the_same_rows(history: Scenario) -> None:
    args = ("changes", "--all")
    rows = as_json(history, *args)
    assert rows
    fields = list(rows[0])
    texts = {f: query(history, *args, "--format", f).stdout for f in ("csv", "tsv", "jsonl")}
    assert [json.loads(line) for line in texts["jsonl"].splitlines()] == rows
    for fmt, dialect in (("csv", "excel"), ("tsv", "excel-tab")):
        parsed = list(csv.reader(io.StringIO(texts[fmt]), dialect=dialect))
        assert parsed[0] == fields
        assert parsed[1:] == [["" if v is None else str(v) for v in r.values()] for r in rows]


@pytest.mark.parametrize("width", [72, 100])
def test_tables_fit_the_terminal_with_ellipses(history: Scenario, width: int) -> None:
    result = run_in_terminal(history.env.vars, history.env.tmp, ("members", history.a, "--at", "run:3"), width)
    assert result.returncode == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"group_id: {history.a}" and lines[1].startswith("group_name: Alpha Laboratory")
    header = lines.index("") + 1
    assert lines[header].split()[:2] == ["identity_id", "username"]
    assert len(lines) == header + 1 + len(history.truths[3].members(history.a))
    assert all(len(line) <= width for line in lines)
    if len(f"group_name: {LONG_NAME}") > width:
        assert lines[1].endswith("…")  # the long name is shortened, not wrapped
    else:
        assert lines[1] == f"group_name: {LONG_NAME}"
    wide = run_in_terminal(history.env.vars, history.env.tmp, ("members", history.a, "--at", "run:3"), 400)
    assert f"group_name: {LONG_NAME}" in wide.stdout and "…" not in wide.stdout


def test_empty_results_exit_0(history: Scenario) -> None:
    result = query(history, "changes", "--since", "run:2", "--until", "run:2")
    assert (result.returncode, result.stdout) == (0, "") and "no changes" in result.stderr
    assert as_json(history, "changes", "--since", "run:2", "--until", "run:2") == []


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("members", "Alpha Laboratory for Cryo-Electron Microscopy"), 1, "did you mean: 'Alpha Laboratory"),
        (("members", "no such group at all"), 1, "unknown group 'no such group at all'"),
        (("changes", "--group", "nope"), 1, "unknown group 'nope'"),
        (("identity", "nobody@nowhere.example"), 1, "unknown user 'nobody@nowhere.example'"),
        (("changes", "--user", "nobody"), 1, "unknown user"),
        (("members", "x", "--at", "yesterday"), 2, "bad WHEN 'yesterday'"),
        (("groups", "--at", "2026-06-01T09:30"), 2, "needs Z or an offset"),
        (("changes", "--since", "run:99"), 2, "there is no run 99 (runs 1-5)"),
        (("groups", "--at", "2026-02-30"), 2, "bad WHEN"),
        (("groups", "--format", "xml"), 2, "xml"),
        (("changes", "--since", "run:99999999999999999999"), 2, "out of range"),
        (("members", "x", "--at", "run:0"), 2, "out of range"),
        (("groups", "--at", "9999-12-31T23:00-05:00"), 2, "out of range"),
        (("changes", "--since", "0001-01-01T00:00+01:00"), 2, "out of range"),
        (("changes", "--since", "99999999999999999999999d"), 2, "bad WHEN"),
        (("changes", "--since", "run:4", "--until", "run:3"), 2, "--until is before --since 'run:4'"),
        (("changes", "--since", "2026-06-02", "--until", "2026-06-01"), 2, "--until is before --since"),
        (("changes", "--since", "run:5", "--until", "2000-01-01"), 2, "--until is before --since"),
        (("changes", "--since", "2999-01-01", "--until", "run:2"), 2, "--until is before --since"),
        (("changes", "--until", "run:77"), 2, "there is no run 77"),
        (("members", "x", "--at", "run:77"), 2, "there is no run 77 (runs 1-5)"),
        (("groups", "--at", "run:77"), 2, "there is no run 77 (runs 1-5)"),
        (("members", "x\x1b[2J"), 1, "unknown group 'x\\x1b[2J'"),  # what was typed, shown escaped
    ],
)
def test_errors_are_one_line_with_the_documented_code(history: Scenario, args: tuple[str, ...], code: int, says: str) -> None:
    result = query(history, *args)
    assert result.returncode == code, result.output
    assert says in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert result.stderr.startswith("syncer: error: ") and result.stderr.count("\n") == 1
    if code == 2 and "WHEN" in says:
        assert EXAMPLES in result.stderr


def test_a_period_ending_where_it_starts_is_fine(history: Scenario) -> None:
    at = history.truths[3].started_at
    assert {r["run_id"] for r in as_json(history, "changes", "--since", at, "--until", "run:3", "--all")} == {3}
    assert {r["run_id"] for r in as_json(history, "changes", "--since", "run:3", "--until", at, "--all")} == {3}


def test_close_matches_and_ids_in_any_case(history: Scenario) -> None:
    name = history.truths[5].groups[history.b].name
    part = name.split()[0][:-2].lower()  # "Bioinformatics Beamtime 0003" -> "bioinformati"
    result = query(history, "members", part)
    assert result.returncode == 1, result.output
    assert f"unknown group {part!r}; did you mean: " in result.stderr and repr(name) in result.stderr
    assert as_json(history, "members", history.a.upper()) == as_json(history, "members", history.a)
    assert as_json(history, "changes", "--group", history.a.upper()) == as_json(history, "changes", "--group", history.a)
    assert as_json(history, "identity", history.p.upper()) == as_json(history, "identity", history.p)
    assert as_json(history, "changes", "--user", history.p.upper()) == as_json(history, "changes", "--user", history.p)


def test_a_close_username_is_suggested(history: Scenario) -> None:
    name = history.username(history.p)
    result = query(history, "identity", name[:-1] + "x" if not name.endswith("x") else name[:-1] + "y")
    assert result.returncode == 1 and f"did you mean: '{name}'" in result.stderr


def test_no_database_yet_says_to_sync(env: Env) -> None:
    for args in (("members", "x"), ("changes",), ("groups",), ("identity", "x"), ("serve",)):
        result = env.run(*args)
        assert result.returncode == 1, result.output
        assert "run `syncer sync`" in result.stderr and str(env.database) in result.stderr
    assert not env.database.exists()  # reading made no file


def test_a_database_without_a_successful_run_says_to_sync(env: Env) -> None:
    env.login()
    for gid in env.world.groups:
        env.sim.faults.set_group_error(gid, 403)
    assert env.run("sync").returncode == 1
    for args in (("groups",), ("changes",), ("changes", "--all", "--since", "run:1"), ("members", "x"), ("identity", "x")):
        result = env.run(*args)
        assert result.returncode == 1, (args, result.output)
        assert result.stderr == "syncer: error: no successful run recorded yet; run `syncer sync` first\n", args


# every command and group, as click knows them: a usage error in any is one line, exit 2
def _commands() -> list[tuple[str, ...]]:
    from syncer.cli import cli

    found: list[tuple[str, ...]] = [()]
    for name, command in cli.commands.items():
        found.append((name,))
        found.extend((name, sub) for sub in getattr(command, "commands", {}))
    return found


@pytest.mark.parametrize("path", _commands(), ids=lambda p: " ".join(p) or "syncer")
def test_usage_errors_are_one_line_and_exit_2_for_every_command(env: Env, path: tuple[str, ...]) -> None:
    result = env.run(*path, "--no-such-option")
    assert result.returncode == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("syncer: error: No such option") and result.stderr.count("\n") == 1
    assert f"see `{' '.join(('syncer', *path))} --help`" in result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("members",), "Missing argument 'GROUP'"),
        (("identity",), "Missing argument 'USER'"),
        (("hooks", "replay", "x"), "Missing option '--since'"),
        (("changes", "--since"), "Option '--since' requires an argument"),
        (("status", "--format", "yaml"), "'yaml' is not one of"),
        (("--log-format", "xml", "groups"), "'xml' is not one of"),
        (("run", "--interval", "soon"), "not a duration"),
        (("simulate", "--port", "70000"), "70000 is out of range"),
        (("serve", "--port", "-1"), "--port"),
        (("no-such-command",), "No such command 'no-such-command'"),
    ],
)
def test_click_and_syncer_usage_errors_look_alike(env: Env, args: tuple[str, ...], says: str) -> None:
    result = env.run(*args)
    assert result.returncode == 2, result.output
    assert result.stderr.startswith("syncer: error: ") and says in result.stderr and result.stderr.count("\n") == 1
    assert "Usage:" not in result.output and "Traceback" not in result.output


def test_hooks_replay_takes_when_as_the_queries_do(history: Scenario, tmp_path: Path) -> None:
    """A run:N that does not exist, a WHEN out of range: exit 2, nothing delivered."""
    marker = tmp_path / "delivered"
    config = tmp_path / "syncer.toml"
    config.write_text(f'database = "{history.env.database}"\ntoken_storage = "{tmp_path / "tokens.db"}"\n'
                      f'[[hooks]]\nname = "audit"\ncommand = ["sh", "-c", "cat > {marker}"]\n')
    variables = {"SYNCER_CONFIG": str(config)}
    for since, says in (("run:999", "there is no run 999 (runs 1-5)"), ("run:99999999999999999999", "out of range"),
                        ("9999-12-31T23:59-01:00", "out of range"), ("tomorrow", "bad WHEN")):
        result = history.env.run("hooks", "replay", "audit", "--since", since, variables=variables)
        assert result.returncode == 2, result.output
        assert result.stderr.startswith("syncer: error: bad WHEN") and says in result.stderr
        assert result.stderr.count("\n") == 1
    assert not marker.exists()


QUERY_COMMANDS = (("members", "x"), ("changes",), ("groups",), ("identity", "x"))


def _foreign_sqlite(path: Path) -> None:
    import sqlite3

    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, title TEXT)")
    conn.commit()
    conn.close()


def _damaged(path: Path) -> None:
    """The first pages of a real syncer database: SQLite opens it, then finds it malformed."""
    import sqlite3

    conn = sqlite3.connect(path)
    for n in range(40):
        conn.execute(f"CREATE TABLE t{n} (x TEXT)")
    conn.execute("CREATE TABLE sync_runs (id INTEGER)")
    conn.commit()
    conn.close()
    path.write_bytes(path.read_bytes()[:6000])


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.write_text("not a database at all\n" * 100), "file is not a database"),
        (lambda p: p.write_bytes(b"\x00\xff" * 3000), "file is not a database"),
        (_foreign_sqlite, "not a syncer database"),
        (_damaged, "malformed"),
    ],
    ids=["text", "binary", "foreign-sqlite", "damaged"],
)
def test_a_file_that_is_not_a_syncer_database_is_one_clear_line(env: Env, make: t.Any, says: str) -> None:
    make(env.database)
    before = env.database.read_bytes()
    for args in QUERY_COMMANDS:
        result = env.run(*args)
        assert result.returncode == 1, (args, result.output)
        assert result.stderr.startswith(f"syncer: error: {env.database}: ") and says in result.stderr, args
        assert result.stderr.count("\n") == 1 and "internal error" not in result.stderr
    assert env.database.read_bytes() == before  # reading changed nothing


def test_a_folder_where_the_database_is_expected_is_named(env: Env) -> None:
    env.database.mkdir()
    for args in QUERY_COMMANDS:
        result = env.run(*args)
        assert result.returncode == 1, (args, result.output)
        assert result.stderr == f"syncer: error: {env.database}: cannot open database: it is a folder, not a file\n"


def test_a_file_where_a_folder_is_expected_is_named(env: Env) -> None:
    blocker = env.tmp / "state"
    blocker.write_text("a file, not a folder\n")
    env.write_config(database="state/groups.db", token_storage="state/tokens.db")
    for args in (*QUERY_COMMANDS, ("sync",), ("login", "--no-browser")):
        result = env.run(*args, input="")
        assert result.returncode == 1, (args, result.output)
        error = [line for line in result.stderr.splitlines() if line.startswith("syncer: error:")]
        assert error and error[0].endswith(f"{blocker} is a file, not a folder"), (args, result.stderr)
        assert "File exists" not in result.stderr
    assert blocker.read_text() == "a file, not a folder\n"


# ------------------------------------------------------------------- read-only use


@pytest.fixture
def read_only_copy(history: Scenario) -> t.Iterator[tuple[Path, dict[str, str]]]:
    """A copy of the database, 0444 in a folder 0555 (reachable by every user), and the
    environment that points syncer at it."""
    folder = Path(tempfile.mkdtemp(prefix="syncer-ro-"))
    folder.chmod(0o755)
    shutil.copy(history.env.database, folder / "groups.db")
    (folder / "syncer.toml").write_text('database = "groups.db"\n')
    (folder / "syncer.toml").chmod(0o444)
    (folder / "groups.db").chmod(0o444)
    folder.chmod(0o555)
    try:
        yield folder, {**history.env.vars, "SYNCER_CONFIG": str(folder / "syncer.toml"), "HOME": str(folder)}
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


QUERIES = (("members", "{a}", "--all"), ("changes", "--all"), ("groups",), ("identity", "{p}"))


def _check_read_only_use(history: Scenario, folder: Path, variables: dict[str, str], prefix: list[str]) -> None:
    python = python_for(prefix) if prefix else OtherUsersPython(sys.executable, {})
    for args in QUERIES:
        args = tuple(a.format(a=history.a, p=history.p) for a in args)
        proc = subprocess.run([*prefix, python.executable, "-m", "syncer", *args, "--format", "json"],
                              env={**variables, **python.env}, cwd=folder, text=True, capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == as_json(history, *args)
    assert sorted(p.name for p in folder.iterdir()) == ["groups.db", "syncer.toml"]  # no journal, no lock file


def test_a_copy_in_a_read_only_folder(history: Scenario, read_only_copy: tuple[Path, dict[str, str]]) -> None:
    _check_read_only_use(history, *read_only_copy, prefix=[])


def test_another_user_with_read_permission_only(history: Scenario, read_only_copy: tuple[Path, dict[str, str]]) -> None:
    """As `nobody` (via setpriv), for whom the 0444/0555 bits hold (they do not for root)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    _check_read_only_use(history, *read_only_copy, prefix=as_nobody)


def test_queries_answer_while_a_sync_holds_the_lock(logged_in: Env) -> None:
    """A run in progress holds the sync lock and writes: the commands neither wait for
    the lock nor see half a run; they answer from the last committed run."""
    env, world = logged_in, logged_in.world
    assert env.run("sync").returncode == 0
    gid = admin_groups(world)[0]
    before = env.run("members", gid, "--format", "json")
    newcomer = world.add_member(gid)
    env.sim.faults.hold_reads()
    proc = env.popen("sync")
    try:
        wait_for(lambda: has_running_run(env), what="the second run to start")
        during = env.run("members", gid, "--format", "json")
        assert during.returncode == 0, during.output
        assert during.stdout == before.stdout
        assert newcomer not in during.stdout
    finally:
        env.sim.faults.release_reads()
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert newcomer in env.run("members", gid, "--format", "json").stdout


# ------------------------------------------------------------------- reasons, as auditors read them


def test_an_invitation_is_joined_with_status_invited_and_an_admins_removal_is_left(logged_in: Env) -> None:
    """In a group whose members the identity manages (members_view 'all') an invitation
    is `joined` with status `invited`; in one where it sees the active members only
    (members_view 'active') an admin's removal (status `removed`) is `left`, which is
    also how `identity` ends that membership."""
    env, world = logged_in, logged_in.world
    managed, watched = admin_groups(world)[:2]
    world.set_policy(watched, members_visibility="members")
    world.set_role(watched, world.me, "member")
    assert env.run("sync").returncode == 0
    invitee = world.add_member(managed, status="invited")
    removed = next(i for i in others(world, watched) if world.groups[watched]["memberships"][i].status == "active")
    world.set_status(watched, removed, "removed")
    assert env.run("sync").returncode == 0

    result = env.run("changes", "--since", "run:2", "--format", "json")
    assert result.returncode == 0, result.output
    rows = {(r["group_id"], r["identity_id"]): r for r in json.loads(result.stdout)}
    invited = rows[(managed, invitee)]
    assert (invited["change"], invited["reason"], invited["new_status"]) == ("added", "joined", "invited")
    gone = rows[(watched, removed)]
    assert (gone["change"], gone["reason"], gone["old_status"], gone["new_status"]) == ("removed", "left", "active", None)
    history = json.loads(env.run("identity", removed, "--format", "json").stdout)
    assert [(r["status"], r["began"], r["ended"]) for r in history if r["group_id"] == watched] == [
        ("active", "first_seen", "left")]
    # and a person reads it so in the table at 80 columns
    table = run_in_terminal(env.vars, env.tmp, ("changes", "--since", "run:2"), 80).stdout.splitlines()
    line_of = {iid: next(line for line in table if world.identities[iid]["username"][:15] in line)
               for iid in (invitee, removed)}
    assert re.search(r"\badded +joined .*\binvited\b", line_of[invitee]), table
    assert re.search(r"\bremoved +left\b", line_of[removed]), table
