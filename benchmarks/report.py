#!/usr/bin/env python3
"""Benchmark: ``syncer report`` on the 10,000x100 database (time, file size, peak RSS).

    python benchmarks/report.py                      # build the database, then time the report
    python benchmarks/report.py --churns 3 --keep    # more churned re-syncs; keep the work folder
    python benchmarks/report.py --db FOLDER          # time the report on a folder kept before

The database is made as bench.py makes its query database: the built-in simulator
serves ``World.generate(10_000, 100)``, ``syncer sync`` takes a cold snapshot, then
each churn changes about 1% of the memberships (``World.random_changes``) and syncs
again. ``syncer report`` (default period, largest groups) then runs a few times, each
a new interpreter as a user runs it; the median wall time, the HTML file's size and
the peak RSS are printed with the targets (at most 10 s, at most a few MiB). Nothing
is asserted: a slow machine prints MISS, it does not fail.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import CHURN, SEED, ReadOnly, Syncer, log, python_command, run_child  # noqa: E402 - bench.py sits beside this file

TARGET_S = 10.0
TARGET_BYTES = 4 * 1024 * 1024  # "a few MiB"
REPEATS = 3


def build(folder: Path, sim: object, world: object, churns: int) -> Syncer:
    """A cold sync, then ``churns`` re-syncs after ~1% of the memberships changed each."""
    sync = Syncer(folder, sim)
    log("cold sync")
    sync.run()
    for n in range(churns):
        memberships = sync.last_run()["memberships"]
        world.random_changes(max(1, round(CHURN * memberships)), random.Random(f"report-churn:{n}"))  # type: ignore[attr-defined]
        log(f"churn {n + 1}/{churns}: re-sync")
        sync.run()
    return sync


def time_report(folder: Path, sim: object, args: list[str]) -> None:
    out = folder / "report.html"
    children = []
    for n in range(REPEATS):
        log(f"syncer report {' '.join(args)} ({n + 1}/{REPEATS})")
        children.append(run_child(python_command("-m", "syncer", "--config", str(folder / "syncer.toml"), "report",
                                                 *args, "--output", str(out)), sim=sim, cwd=folder))
    wall = statistics.median(c.wall for c in children)
    size = out.stat().st_size
    rss = max(c.rss for c in children)
    cpu = statistics.median(c.cpu for c in children)
    walls = ", ".join(f"{c.wall:.2f}" for c in children)
    label = " ".join(args) or "(default: last 90 days, largest groups)"
    # CPU time too: on a shared machine the wall time is mostly waiting for a core
    print(f"syncer report {label}: {wall:.2f} s wall (median of {REPEATS}: {walls} s), {cpu:.2f} s CPU, "
          f"{size / 1024 / 1024:.2f} MiB, peak RSS {rss / 1024 / 1024:.0f} MiB; load average {os.getloadavg()[0]:.1f}")
    print(f"  {'PASS' if wall <= TARGET_S else 'MISS'}  at most {TARGET_S:.0f} s: {wall:.2f} s")
    print(f"  {'PASS' if size <= TARGET_BYTES else 'MISS'}  at most {TARGET_BYTES // 1024 // 1024} MiB: "
          f"{size / 1024 / 1024:.2f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="10000x100", help="GROUPSxMEMBERS (default 10000x100)")
    parser.add_argument("--churns", type=int, default=2, help="re-syncs after ~1%% churn each (default 2)")
    parser.add_argument("--db", metavar="FOLDER", help="a work folder kept by --keep: time the report only")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    from syncer.simulator import Simulator, World

    groups, members = (int(x) for x in args.world.split("x"))
    world = World.generate(groups=1, members=1, seed=SEED) if args.db else World.generate(
        groups=groups, members=members, seed=SEED)
    sim = Simulator(world, port=0, latency_ms=0, record_reads=False).start()
    work = Path(args.db) if args.db else Path(tempfile.mkdtemp(prefix="syncer-report-bench-")) / args.world
    began = time.perf_counter()
    try:
        if not args.db:
            log(f"{args.world}: building the database in {work}")
            build(work, sim, world, args.churns)
        with ReadOnly(work / "groups.db") as conn:
            runs, events = conn.execute("SELECT count(*), sum(changes) FROM sync_runs").fetchone()
            versions = conn.execute("SELECT count(*) FROM membership_history").fetchone()[0]
        print(f"database: {args.world}, {runs} runs, {events:,} events, {versions:,} membership versions,"
              f" {(work / 'groups.db').stat().st_size / 1024 / 1024:.0f} MiB")
        time_report(work, sim, [])
        with ReadOnly(work / "groups.db") as conn:
            largest = conn.execute("SELECT id FROM groups ORDER BY active_member_count DESC LIMIT 1").fetchone()[0]
        time_report(work, sim, ["--group", largest])
    finally:
        sim.stop()
        if args.keep or args.db:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work.parent, ignore_errors=True)
    log(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
