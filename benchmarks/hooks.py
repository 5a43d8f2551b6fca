#!/usr/bin/env python3
"""Benchmark: what hooks add to a sync, on the built-in simulator.

    python benchmarks/hooks.py                  # 1,000 groups x 100 members
    python benchmarks/hooks.py --world 200x50

Two databases are synced side by side from the same world: one without hooks, one with
two command hooks that read all they are sent (``cat > /dev/null``): ``events`` (the
default: events only) and ``everything`` (``observations = true``). Each is synced
cold, unchanged, and after a 1% churn; the table shows each sync's wall time and the
hooks' own calls (from their log lines). Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402 - beside this file, not a package

HOOKS = """
[[hooks]]
name = "events"
command = ["sh", "-c", "cat > /dev/null"]

[[hooks]]
name = "everything"
command = ["sh", "-c", "cat > /dev/null"]
observations = true
"""
DELIVERED = re.compile(r"hook (\S+): run \d+ delivered \((\d+) changes, ([\d.]+)s\)")


def setup(folder: Path, sim: object, hooks: bool) -> list[str]:
    folder.mkdir(parents=True)
    config = folder / "syncer.toml"
    config.write_text('database = "groups.db"\ntoken_storage = "tokens.db"\n' + (HOOKS if hooks else ""))
    command = [*bench.syncer_command(), "--config", str(config)]
    bench.interactive_login([*command, "login", "--no-browser"], sim=sim, cwd=folder)
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="1000x100", help="GROUPSxMEMBERS (default 1000x100)")
    args = parser.parse_args()
    groups, members = (int(n) for n in args.world.split("x"))

    from syncer.simulator import Simulator, World

    world = World.generate(groups=groups, members=members, seed=bench.SEED)
    sim = Simulator(world, port=0, latency_ms=0, record_reads=False).start()
    work = Path(tempfile.mkdtemp(prefix="syncer-hooks-bench-"))
    rows = []
    try:
        plain = setup(work / "plain", sim, hooks=False)
        hooked = setup(work / "hooks", sim, hooks=True)
        for phase in ("cold", "unchanged", "1% churn"):
            if phase == "1% churn":
                world.random_changes(max(1, int(bench.world_memberships(world) * bench.CHURN)), random.Random(bench.SEED))
            without = bench.run_child([*plain, "sync"], sim=sim, cwd=work / "plain")
            withhooks = bench.run_child([*hooked, "sync"], sim=sim, cwd=work / "hooks")
            calls = {name: (int(n), float(s)) for name, n, s in DELIVERED.findall(withhooks.stderr)}
            rows.append((phase, without.wall, withhooks.wall, calls))
    finally:
        sim.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"hooks benchmark: {groups:,} groups x {members} members, {bench.world_memberships(world):,} memberships")
    print()
    print("| sync | without hooks | with 2 hooks | hook `events` (rows, s) | hook `everything` (rows, s) |")
    print("|---|---|---|---|---|")
    for phase, without_s, with_s, calls in rows:
        shown = [f"{calls[n][0]:,}, {calls[n][1]:.2f} s" if n in calls else "no call" for n in ("events", "everything")]
        print(f"| {phase} | {without_s:.2f} s | {with_s:.2f} s | {shown[0]} | {shown[1]} |")


if __name__ == "__main__":
    main()
