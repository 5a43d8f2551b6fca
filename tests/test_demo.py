"""`syncer demo`: the whole flow offline, as a new user first runs it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from conftest import record
from inprocess import invoke


def test_demo_runs_offline_and_leaves_a_queryable_database(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCER_", "GLOBUS_"))}
    env["HOME"] = str(tmp_path)
    proc = invoke(["demo", "--dir", str(tmp_path / "demo")], env, tmp_path)
    record(proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stderr
    assert "Logged in as" in proc.stdout
    changes = proc.stdout.split("What changed (view membership_changes")[1].split("== Database")[0].strip().splitlines()[1:]
    kinds = sorted(line.split()[0] for line in changes)
    assert kinds == ["added", "added", "changed", "removed", "removed"]
    # leaving a group is not its members leaving: the one removal that is an observation
    assert [line for line in changes if "an observation" in line] == [
        line for line in changes if "[group_gone, an observation]" in line] and len(changes) > 1
    assert "run 2: 5 groups, 4 changes (events)" in proc.stdout
    # the commands it suggests answer, run as printed
    suggested = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("SYNCER_DATABASE=")]
    assert len(suggested) == 3
    for command in suggested:
        ran = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0 and ran.stdout.strip(), (command, ran.stderr)
    conn = sqlite3.connect(tmp_path / "demo" / "groups.db")
    assert [r[0] for r in conn.execute("SELECT status FROM sync_runs ORDER BY id")] == ["ok", "ok"]
    assert conn.execute("SELECT count(*) FROM membership_changes WHERE run_id = 2").fetchone()[0] == len(changes)
    assert oct((tmp_path / "demo" / "tokens.db").stat().st_mode & 0o777) == "0o600"
    assert proc.stdout.count(str(tmp_path / "demo" / "groups.db")) >= 4  # the queries point at the kept file

    again = invoke(["demo", "--dir", str(tmp_path / "demo")], env, tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_demo_without_a_folder_replaces_its_own_and_leaves_no_temporary_ones(tmp_path: Path) -> None:
    """Run twice without --dir: one folder of the demo's own (the second run replaces the
    first's database), nothing in the temporary folder, and no "paste" while it plays the browser.
    Processes: a process reads TMPDIR once, so only a new one honours this test's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCER_", "GLOBUS_", "XDG_"))}
    env["HOME"] = str(tmp_path / "home")
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    outputs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "syncer", "demo"], env=env, capture_output=True, text=True, timeout=120,
        )
        record(proc.stdout, proc.stderr)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    folder = tmp_path / "home" / ".local" / "share" / "syncer" / "demo"
    assert f"== Database: {folder / 'groups.db'}" in outputs[1]
    conn = sqlite3.connect(folder / "groups.db")
    assert [r[0] for r in conn.execute("SELECT id FROM sync_runs")] == [1, 2]  # the second demo's, afresh
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not (tmp_path / "home" / ".local" / "share" / "syncer" / "groups.db").exists()  # the real store: untouched
    assert all("paste" not in out.lower() for out in outputs)
    assert "the demo opens the login page" in outputs[0]
