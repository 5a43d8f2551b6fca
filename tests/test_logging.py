"""Logging: journald-friendly under systemd, JSON on request, tokens never shown."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from conftest import Env, record

from syncer import logs


def run_with_stderr_pipe(env: Env, *args: str, journal: bool) -> tuple[int, str]:
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    variables = dict(env.vars)
    if journal:
        variables["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncer", *args], env=variables, cwd=env.tmp,
        stdout=subprocess.DEVNULL, stderr=write_end,
    )
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        err = reader.read()
    proc.wait(timeout=120)
    record(err)
    return proc.returncode, err


def test_journald_lines_have_priorities_and_no_timestamps(logged_in: Env) -> None:
    code, err = run_with_stderr_pipe(logged_in, "sync", journal=True)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert lines, "a run logs its summary line"
    assert all(line.startswith("<") for line in lines)
    summary = next(line for line in lines if "syncer.sync: run 1 ok" in line)
    assert summary.startswith("<6>")  # info
    assert "2026-" not in summary and "INFO" not in summary


def test_plain_stderr_lines_have_timestamps(logged_in: Env) -> None:
    code, err = run_with_stderr_pipe(logged_in, "sync", journal=False)
    assert code == 0
    summary = next(line for line in err.splitlines() if "run 1 ok" in line)
    assert summary[:4].isdigit() and " INFO syncer.sync: " in summary


def test_json_log_format(logged_in: Env) -> None:
    env = logged_in
    env.sim.faults.set_group_error(next(iter(env.world.groups)), 500)
    result = env.run("--log-format", "json", "-v", "sync")
    assert result.returncode == 3
    entries = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert entries
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(e["level"] == "warning" and "not read" in e["message"] for e in entries)
    assert any(e["level"] == "info" and e["message"].startswith("run 1 partial") for e in entries)


def test_json_lines_under_journald_carry_priorities(logged_in: Env) -> None:
    env = logged_in
    env.sim.faults.set_group_error(next(iter(env.world.groups)), 500)
    code, err = run_with_stderr_pipe(env, "--log-format", "json", "sync", journal=True)
    assert code == 3, err
    lines = err.strip().splitlines()
    entries = {}
    for line in lines:
        prefix, _, rest = line.partition(">")
        entries[json.loads(rest)["level"]] = prefix + ">"
    assert entries == {"warning": "<4>", "info": "<6>"}


def test_quiet_hides_the_summary(logged_in: Env) -> None:
    result = logged_in.run("-q", "sync")
    assert result.returncode == 0
    assert "INFO" not in result.stderr


def test_redaction_replaces_registered_secrets() -> None:
    logs.register_secret("s3cr3t-token-value")
    record_ = logging.LogRecord("x", logging.WARNING, __file__, 1, "saw %s", ("Bearer s3cr3t-token-value",), None)
    for formatter in (logs.JSONFormatter(), logs.JournalFormatter("%(message)s")):
        out = formatter.format(record_)
        assert "s3cr3t-token-value" not in out and "[redacted]" in out
