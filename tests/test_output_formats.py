"""What the query commands write: tables people can read on a terminal (a real pty of
80 and 40 columns) and in a pipe, and machine formats that keep every character of
every value, whatever a group admin put in a group's name.

The hostile values go the way production's do: the simulator's world holds them, the
real `syncer sync` reads them over HTTP with the real SDK, and `syncer changes/groups/
members/identity` print them.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import typing as t
import unicodedata

import pytest
from conftest import ISSUED_TOKENS, Env, Result, make_env
from helpers import admin_groups
from history_scenario import Scenario
from terminal import run_in_terminal

from syncer.simulator import Simulator, World

# every class of byte a name may hold that a terminal or a lossy writer would act on:
# ESC sequences (clear screen, set the window title ended by BEL), C1 (CSI, NEL), DEL,
# other C0, binary-looking text (no NUL: Globus's JSON cannot carry one into SQLite
# text usefully), a right-to-left override, line breaks, tab, backslash, quotes, and a
# spreadsheet formula
EVIL_NAME = (
    'Evil\x1b[2J\x1b]0;pwned\x07 csi\x9b31m nel\x85 rlo\u202etxt.exe del\x7f c0\x01\x02\x1f'
    ' bin\xfe\xff\u00ad line\nbreak cr\rlf\r\n tab\there back\\slash "quoted" =HYPERLINK("http://x")'
)
EVIL_USERNAME = "mallory\x1b[31m\u202eevil\x9b\x07@example.org"
RAW = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")


class Evil(t.NamedTuple):
    env: Env
    group: str  # named EVIL_NAME
    mallory: str  # identity whose username is EVIL_USERNAME; joined `group` in run 2
    sync_log: Result  # a sync in which `group` could not be read


@pytest.fixture(scope="module")
def evil(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Evil]:
    world = World.generate(groups=3, members=4, seed=5)
    sim = Simulator(world, port=0).start()
    try:
        env = make_env(tmp_path_factory.mktemp("evil"), sim, world)
        assert env.login().returncode == 0
        group = admin_groups(world)[0]
        world.rename_group(group, EVIL_NAME)
        mallory = next(i for i in world.identities if i != world.me and i not in world.groups[group]["memberships"])
        with world.lock:
            world.identities[mallory]["username"] = EVIL_USERNAME
        assert env.run("sync").returncode == 0
        world.add_member(group, mallory)
        assert env.run("sync").returncode == 0
        sim.faults.set_group_error(group, 500)
        log = env.run("sync")
        assert log.returncode == 3, log.output
        sim.faults.clear()
        yield Evil(env, group, mallory, log)
    finally:
        ISSUED_TOKENS.update(sim.issued_tokens)
        sim.stop()


def run_bytes(env: Env, *args: str) -> tuple[int, bytes, str]:
    """``syncer ARGS`` with stdout as the bytes it wrote (no decoding, no newline translation)."""
    result = env.run(*args)
    assert result.stdout_bytes is not None
    return result.returncode, result.stdout_bytes, result.stderr


def tsv_unescape(cell: str) -> str:
    """A TSV cell back to its value, per the documented escapes."""
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}[m.group(1)], cell)


def parse(fmt: str, data: bytes) -> list[dict[str, str | None]]:
    text = data.decode("utf-8")
    if fmt == "json":
        return json.loads(text)
    if fmt == "jsonl":
        return [json.loads(line) for line in text.split("\n") if line]
    if fmt == "csv":
        header, *rows = csv.reader(io.StringIO(text, newline=""))
        return [dict(zip(header, row, strict=True)) for row in rows]
    lines = text.split("\n")
    assert lines[-1] == "", "TSV ends with a newline"
    header, *rows = (line.split("\t") for line in lines[:-1])
    assert all(len(row) == len(header) for row in rows), "a tab or line break inside a TSV value"
    return [dict(zip(header, (tsv_unescape(c) for c in row), strict=True)) for row in rows]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl"])
def test_machine_formats_keep_every_character_into_a_pipe(evil: Evil, fmt: str) -> None:
    code, out, err = run_bytes(evil.env, "changes", "--all", "--format", fmt)
    assert code == 0, err
    rows = parse(fmt, out)
    names = {r["group_name"] for r in rows if r["group_id"] == evil.group}
    assert names == {EVIL_NAME}
    assert {r["username"] for r in rows if r["identity_id"] == evil.mallory} == {EVIL_USERNAME}
    joined = [r for r in rows if r["identity_id"] == evil.mallory and r["group_id"] == evil.group]
    assert [(r["change"], r["reason"]) for r in joined] == [("added", "joined")]
    if fmt in ("csv", "tsv"):  # the raw bytes went out as they are: nothing stripped as "ANSI"
        assert b"\x1b[2J\x1b]0;pwned\x07" in out and "\x9b31m".encode() in out and "\u202e".encode() in out
    groups_code, groups_out, _ = run_bytes(evil.env, "groups", "--format", fmt)
    assert groups_code == 0 and EVIL_NAME in {r["name"] for r in parse(fmt, groups_out)}


def test_tsv_escapes_are_the_documented_ones(evil: Evil) -> None:
    _, out, _ = run_bytes(evil.env, "groups", "--format", "tsv")
    line = next(line for line in out.decode().split("\n") if line.startswith(evil.group))
    assert "line\\nbreak cr\\rlf\\r\\n tab\\there back\\\\slash" in line
    assert '"quoted" =HYPERLINK("http://x")' in line  # no quoting in TSV: quotes as they are


def _no_raw_controls(text: str) -> None:
    found = sorted({f"U+{ord(c):04X}" for c in RAW.findall(text)})
    assert not found, f"raw control characters reached the output: {found}"


@pytest.mark.parametrize("args", [("changes", "--all"), ("groups",), ("members", "{group}"), ("identity", "{mallory}")])
def test_tables_show_control_characters_escaped_in_full_into_a_pipe(evil: Evil, args: tuple[str, ...]) -> None:
    args = tuple(a.format(group=evil.group, mallory=evil.mallory) for a in args)
    code, out, err = run_bytes(evil.env, *args)
    assert code == 0, err
    text = out.decode("utf-8")
    _no_raw_controls(text)
    escaped_name = "Evil\\x1b[2J\\x1b]0;pwned\\x07 csi\\x9b31m nel\\x85 rlo\\u202etxt.exe del\\x7f c0\\x01\\x02\\x1f"
    if args[0] != "identity":
        assert escaped_name in text and "line\\nbreak cr\\rlf\\r\\n tab\\there" in text  # in full, on one line
    if args[0] in ("changes", "members"):
        assert "mallory\\x1b[31m\\u202eevil\\x9b\\x07@example.org" in text
    assert "…" not in text


def test_tables_on_a_terminal_show_control_characters_escaped(evil: Evil) -> None:
    for columns in (200, 80, 40):
        for args in (("changes", "--all"), ("groups",), ("members", evil.group)):
            result = run_in_terminal(evil.env.vars, evil.env.tmp, args, columns)
            assert result.returncode == 0, result.stderr
            _no_raw_controls(result.stdout)
            _no_raw_controls(result.stderr)
            assert "Evil\\x1" in result.stdout
            assert all(len(line) <= columns for line in result.stdout.splitlines())


def test_text_logs_show_control_characters_escaped(evil: Evil) -> None:
    warning = [line for line in evil.sync_log.stderr.splitlines() if evil.group in line]
    assert warning and "Evil\\x1b[2J\\x1b]0;pwned\\x07 csi\\x9b31m" in warning[0]
    _no_raw_controls(evil.sync_log.stderr)
    # a line break in a name still cannot start what reads as a record of its own
    assert all(line.startswith(("20", "  ")) for line in evil.sync_log.stderr.splitlines())


def test_escapes_cover_every_control_and_bidi_character() -> None:
    from syncer.output import escape_controls

    for code in range(0x110000):
        char = chr(code)
        if unicodedata.category(char) == "Cc" or unicodedata.bidirectional(char) in ("LRE", "RLE", "LRO", "RLO", "PDF",
                                                                                     "LRI", "RLI", "FSI", "PDI"):
            assert escape_controls(char) != char, f"U+{code:04X} is not escaped"
    assert escape_controls("a\nb", keep="\n") == "a\nb"
    assert escape_controls("é ü 漢字 ✓") == "é ü 漢字 ✓"


# ---------------------------------------------------------- tables on a terminal


def test_changes_at_80_columns_show_when_which_group_who_what_and_why(history: Scenario) -> None:
    env = history.env
    rows = json.loads(env.run("changes", "--all", "--format", "json").stdout)
    result = run_in_terminal(env.vars, env.tmp, ("changes", "--all"), 80)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("at "))
    body = lines[header + 1:]
    assert len(body) == len(rows)
    for row, line in zip(rows, body, strict=True):
        assert line.startswith(row["at"][:16].replace("T", " "))  # when: to the minute
        assert row["group_name"][:12] in line  # which group
        assert row["username"][:12] in line  # who
        if row["change"] != "changed":
            assert f"{row['reason']} as {row['new_role']}" in line or f"{row['reason']}, was {row['old_role']}" in line
        else:  # what: the role or status it changed from and to
            assert any(f"{old}→{new}" in line for old, new in
                       ((row["old_role"], row["new_role"]), (row["old_status"], row["new_status"])) if old != new)
    assert "left out to fit 80 columns: run_id, group_id, identity_id" in result.stderr


@pytest.mark.parametrize("args", [("changes", "--all"), ("members", "{a}"), ("groups",), ("identity", "{p}")])
def test_a_narrow_terminal_leaves_out_ids_and_says_so(history: Scenario, args: tuple[str, ...]) -> None:
    args = tuple(a.format(a=history.a, p=history.p) for a in args)
    result = run_in_terminal(history.env.vars, history.env.tmp, args, 40)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(len(line) <= 40 for line in lines)
    assert "left out to fit 40 columns:" in result.stderr and "--format tsv" in result.stderr
    left_out = next(line for line in result.stderr.splitlines() if "left out" in line).split("columns: ", 1)[1].split(", ")
    assert {"group_id", "identity_id", "id"} & set(left_out)
    header = next(line for line in lines if line and ":" not in line)
    assert not set(header.split()) & set(left_out)
    # the ids themselves are nowhere in the rows (a heading may name the one group)
    assert not [line for line in lines if ": " not in line and re.search(r"[0-9a-f]{8}-[0-9a-f]{4}", line)]


def test_members_on_a_terminal_name_the_group_once(history: Scenario) -> None:
    result = run_in_terminal(history.env.vars, history.env.tmp, ("members", history.a), 100)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(history.a) == 1
    assert result.stdout.splitlines()[0] == f"group_id: {history.a}"
    members = history.truths[5].members(history.a)
    body = result.stdout.split("\n\n", 1)[1].splitlines()
    assert body[0].split()[:2] == ["identity_id", "username"] and "group_name" not in body[0]
    assert sorted(line.split()[0] for line in body[1:]) == sorted(members)
    assert all(history.username(line.split()[0]) in line for line in body[1:])  # usernames in full


def test_a_wide_terminal_shows_everything(history: Scenario) -> None:
    result = run_in_terminal(history.env.vars, history.env.tmp, ("changes", "--all"), 400)
    assert result.returncode == 0 and "…" not in result.stdout and "left out" not in result.stderr
    assert result.stdout.splitlines()[0].split() == ["at", "run_id", "group_id", "group_name", "identity_id", "username",
                                                     "change", "reason", "old_role", "new_role", "old_status", "new_status"]


def test_a_table_into_a_pipe_cuts_nothing_whatever_columns_says(history: Scenario) -> None:
    env = history.env
    rows = json.loads(env.run("changes", "--all", "--format", "json").stdout)
    proc = env.run("changes", "--all", variables={"COLUMNS": "40"})
    assert proc.returncode == 0 and "…" not in proc.stdout and proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["at", "run_id", "group_id"]
    for row, line in zip(rows, lines[1:], strict=True):  # `| grep someone` finds whole rows
        assert line.split()[:3] == [row["at"], str(row["run_id"]), row["group_id"]]
        assert row["group_name"] in line and row["identity_id"] in line and row["username"] in line


def test_a_reader_that_goes_away_is_no_error(history: Scenario) -> None:
    """`syncer changes | head -1`: once the reader has closed the pipe, syncer stops quietly."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        for fmt in ("table", "csv", "json"):
            proc = subprocess.run([sys.executable, "-m", "syncer", "changes", "--all", "--format", fmt],
                                  env=history.env.vars, cwd=history.env.tmp, stdout=write_end, stderr=subprocess.PIPE,
                                  text=True, timeout=120)
            assert (proc.returncode, proc.stderr) == (1, ""), fmt
    finally:
        os.close(write_end)
