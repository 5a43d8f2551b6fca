#!/usr/bin/env python3
"""Benchmark: readers and a large run, side by side, on the built-in simulator.

    python benchmarks/readers.py                 # 10,000 groups x 100 members (about 1M memberships)
    python benchmarks/readers.py --world 1000x100

Three figures, each against SPEC's target of at most 1 s:

1. **A reader's worst wait during a large run**: while `syncer sync` records a cold
   run (every membership new, committed at the end), a reader process opens the
   database read-only again and again, as `syncer status` or `sqlite3 'file:...?mode=ro'`
   would, and reads the latest run and one group's members. The worst time one such
   open-and-read took, over the whole run (its commit included), and how many reads
   found the database busy (each read tries first with no busy timeout, so this counts
   the reads that had to wait for the writer, whatever the machine's load).
2. **A commit's delay caused by a long reader**: a 1% churn re-sync while another
   process holds a read transaction open the whole time (a slow Datasette query), and
   the same re-sync without it. The delay is the difference in the time the run took
   from its last read to its end (apply, commit and closing checkpoint: the
   `finished ... in` of its debug log), and in its wall time.
3. **Reading after kill -9**: a cold run into a new database is killed once most of
   its groups are applied (the simulator holds the last reads, so the kill lands
   there), and the database is read at once, before any other run: the time one
   read-only open-and-read takes, as the owner and (when run as root) as a member of
   the database's group who may not write the folder, and `syncer status`'s verdict.

Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402 - beside this file, not a package

from syncer.simulator import Simulator, World  # noqa: E402

READER_UID, READER_GID = 65534, 4242  # nobody, in the database's group (as root only)
FINISHED = re.compile(r"finished run_db in ([\d.]+)s")

# A reader process: open read-only, read, close, again, until the stop file exists;
# prints how many reads and their times. Started before the run it watches.
POLL = """
import json, os, sqlite3, sys, time
path, stop = sys.argv[1], sys.argv[2]
times, errors, blocked, blocked_max = [], [], 0, 0.0

def read(timeout):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
    try:
        conn.execute("SELECT id, status FROM sync_runs ORDER BY id DESC LIMIT 1").fetchall()
        conn.execute("SELECT identity_id, role FROM memberships WHERE group_id ="
                     " (SELECT id FROM group_state ORDER BY key LIMIT 1)").fetchall()
    finally:
        conn.close()

while not os.path.exists(stop):
    if not os.path.exists(path):  # a cold run has not created the file yet
        time.sleep(0.01)
        continue
    began = time.perf_counter()
    try:
        try:
            read(0)  # no busy wait: SQLITE_BUSY here means this read would have waited for the writer
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) and "busy" not in str(err):
                raise
            blocked += 1
            read(30)
            blocked_max = max(blocked_max, time.perf_counter() - began)
    except sqlite3.Error as err:
        if "no such table" in str(err):  # the new file's schema is not committed yet
            time.sleep(0.01)
            continue
        errors.append(str(err))
    times.append(time.perf_counter() - began)
    time.sleep(0.01)
print(json.dumps({"reads": len(times), "max": max(times, default=0), "median": sorted(times)[len(times) // 2] if times else 0,
                  "blocked": blocked, "blocked_max": blocked_max, "errors": errors[:3], "error_count": len(errors)}))
"""

# A long reader: one read transaction held open until the stop file exists.
HOLD = """
import os, sqlite3, sys, time
path, stop = sys.argv[1], sys.argv[2]
conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
conn.execute("BEGIN")
conn.execute("SELECT count(*) FROM membership_state").fetchone()
print("holding", flush=True)
while not os.path.exists(stop):
    time.sleep(0.05)
conn.execute("COMMIT")
"""

ONE_READ = """
import sqlite3, sys, time
began = time.perf_counter()
conn = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True, timeout=30)
n = conn.execute("SELECT count(*) FROM sync_runs").fetchone()[0]
print(f"{time.perf_counter() - began:.3f}")
"""


class Folder(t.NamedTuple):
    path: Path
    config: Path
    database: Path


def make_folder(root: Path, name: str, sim: Simulator, shared: bool) -> Folder:
    """A config, database folder and login; ``shared``: the service's layout (setgid
    folder of the readers' group, files made under umask 0027)."""
    folder = root / name
    folder.mkdir()
    if shared:
        os.chown(folder, 0, READER_GID)
        os.chmod(folder, 0o2750)
    config = folder / "syncer.toml"
    config.write_text(f'database = "groups.db"\ntoken_storage = "tokens.db"\nconcurrency = {bench.CONCURRENCY}\n')
    bench.interactive_login([*bench.syncer_command(), "--config", str(config), "login", "--no-browser"], sim=sim, cwd=folder)
    return Folder(folder, config, folder / "groups.db")


def sync(folder: Folder, sim: Simulator) -> subprocess.Popen[str]:
    sim.world.prerender()
    return subprocess.Popen(
        [*bench.syncer_command(), "-v", "--config", str(folder.config), "sync"],
        env=bench.child_env(sim), cwd=folder.path, text=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen[str], began: float) -> tuple[float, float]:
    """Wait for a sync; its wall time and its last-read-to-end time."""
    out, err = proc.communicate()
    wall = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"sync exited {proc.returncode}:\n{out}\n{err}")
    found = FINISHED.search(err)
    return wall, float(found.group(1)) if found else float("nan")


def reader(script: str, database: Path, stop: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, str(database), str(stop)], text=True, stdout=subprocess.PIPE)


def as_group_member(cmd: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={READER_UID}", f"--regid={READER_GID}", "--clear-groups", *cmd]


def worst_wait(folder: Folder, sim: Simulator) -> dict[str, t.Any]:
    stop = folder.path / "stop-poll"
    poll = reader(POLL, folder.database, stop)
    began = time.perf_counter()
    wall, apply_s = finish(sync(folder, sim), began)
    stop.touch()
    result = json.loads(poll.communicate()[0])
    return {**result, "sync_wall": wall, "sync_finish": apply_s}


def commit_delay(folder: Folder, sim: Simulator, rng: random.Random, memberships: int) -> dict[str, t.Any]:
    figures: dict[str, t.Any] = {}
    for label in ("alone", "with_long_reader"):
        sim.world.random_changes(max(1, memberships // 100), rng)
        stop = folder.path / f"stop-{label}"
        hold = None
        if label == "with_long_reader":
            hold = reader(HOLD, folder.database, stop)
            assert hold.stdout is not None
            hold.stdout.readline()  # its read transaction is open
        began = time.perf_counter()
        wall, apply_s = finish(sync(folder, sim), began)
        stop.touch()
        if hold is not None:
            hold.wait()
        figures[label] = {"wall": wall, "finish": apply_s}
    figures["delay_finish"] = figures["with_long_reader"]["finish"] - figures["alone"]["finish"]
    figures["delay_wall"] = figures["with_long_reader"]["wall"] - figures["alone"]["wall"]
    return figures


def after_kill(folder: Folder, sim: Simulator, groups: list[str], shared: bool) -> dict[str, t.Any]:
    """Kill a cold run with 90% of its groups applied; read at once."""
    held_from = len(groups) * 9 // 10
    sim.reset_stats()
    sim.faults.hold_reads(except_groups=groups[:held_from])
    proc = sync(folder, sim)
    deadline = time.monotonic() + 1800
    while sim.stats["faults"].get("held", 0) < bench.CONCURRENCY and time.monotonic() < deadline:
        time.sleep(0.2)  # every read in flight now waits: all before them are applied
    time.sleep(2)  # the last answers before the held ones are staged and applied
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    sim.faults.release_reads()
    figures: dict[str, t.Any] = {
        "wal_bytes": folder.database.with_name("groups.db-wal").stat().st_size,
        "owner_read_s": [float(_run([sys.executable, "-c", ONE_READ, str(folder.database)])) for _ in range(3)],
    }
    status = [*bench.syncer_command(), "--config", str(folder.config), "status", "--json"]
    if shared:
        figures["group_read_s"] = [
            float(_run(as_group_member([sys.executable, "-I", "-c", ONE_READ, str(folder.database)]))) for _ in range(3)
        ]
        began = time.perf_counter()
        shown = subprocess.run(
            as_group_member([sys.executable, "-m", "syncer", *status[-4:]]), capture_output=True, text=True,
            cwd=folder.path, env={**bench.child_env(sim), "PYTHONPATH": str(HERE.parent)},
        )
        figures["group_status_s"] = time.perf_counter() - began
        figures["group_status"] = json.loads(shown.stdout)["health"] if shown.stdout else shown.stderr.strip()
    return figures


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="10000x100", help="GROUPSxMEMBERS (default 10000x100)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    groups, members = (int(n) for n in args.world.split("x"))
    shared = os.geteuid() == 0 and shutil.which("setpriv") is not None
    world = World.generate(groups=groups, members=members, seed=1)
    memberships = bench.world_memberships(world)
    sim = Simulator(world, port=0).start()
    root = Path(tempfile.mkdtemp(prefix="syncer-readers-"))
    os.chmod(root, 0o755)  # the group member must reach the folders
    old_umask = os.umask(0o027)
    try:
        bench.log(f"world {args.world}: {memberships:,} memberships")
        main_folder = make_folder(root, "main", sim, shared)
        wait = worst_wait(main_folder, sim)
        bench.log(f"1. reader during a cold run: {wait}")
        delay = commit_delay(main_folder, sim, random.Random(5), memberships)
        bench.log(f"2. commit with and without a long reader: {delay}")
        killed = after_kill(make_folder(root, "killed", sim, shared), sim, sorted(world.groups), shared)
        bench.log(f"3. after kill -9: {killed}")
    finally:
        os.umask(old_umask)
        sim.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nreaders and a large run: world {args.world} ({memberships:,} memberships)")
    print(f"1. reader's worst wait during a cold run of {wait['sync_wall']:.1f} s (commit phase {wait['sync_finish']:.1f} s):"
          f" {wait['max']:.3f} s over {wait['reads']} reads (median {wait['median'] * 1000:.1f} ms;"
          f" {wait['blocked']} found the database busy, the longest of them {wait['blocked_max']:.3f} s;"
          f" {wait['error_count']} errors {wait['errors']})  target <= 1 s")
    print(f"2. 1% churn re-sync, last read to end: {delay['alone']['finish']:.2f} s alone,"
          f" {delay['with_long_reader']['finish']:.2f} s with a long reader (delay {delay['delay_finish']:+.2f} s;"
          f" wall {delay['alone']['wall']:.1f} s vs {delay['with_long_reader']['wall']:.1f} s)  target <= 1 s")
    line = (f"3. after kill -9 (WAL left: {killed['wal_bytes'] / 2**20:.0f} MiB): owner's read"
            f" {statistics.median(killed['owner_read_s']):.2f} s")
    if shared:
        line += (f", group member's read {statistics.median(killed['group_read_s']):.2f} s,"
                 f" group member's `syncer status` {killed['group_status_s']:.2f} s: {killed['group_status']!r}")
    print(line)


if __name__ == "__main__":
    main()
