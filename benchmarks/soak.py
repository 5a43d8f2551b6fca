#!/usr/bin/env python3
"""Ground-truth soak: `syncer run --interval 1s` against a changing, failing simulator.

    python benchmarks/soak.py                 # 120 s
    python benchmarks/soak.py --seconds 600   # longer
    python benchmarks/soak.py --json          # the report as JSON on stdout

The simulator (Globus Auth + Groups over HTTP) runs in this process; the daemon is a
child process talking to it through GLOBUS_SDK_SERVICE_URL_*, with a config that sets
`database`, `token_storage`, `http_timeout = "2s"` and `interval = "1s"`. While it
runs, this process

* applies random membership changes to the world every ~0.3 s,
* injects random faults into ~10% of group reads (500, 502, 503, 429, a truncated
  body, a stall of 1.8-2.2 s: about half outlast the client's 2 s timeout, so the
  simulator answers a request the client has given up on and retried),
* issues short-lived access tokens (and now and then revokes them all), so the
  daemon renews its token and writes the token store many times,
* samples the daemon's resident memory (VmRSS) a few times a second.

Then it stops the daemon with SIGTERM (it must exit 0 within 10 s) and checks the
database against the simulator's own record, read by read: every group read the
simulator served (``Simulator.read_log``: when, which group, which memberships) is
matched to the run whose time window holds it (runs never overlap: the daemon holds
the sync lock), and the history as of that run (``from_run <= K AND (to_run IS NULL
OR to_run > K)``) must equal what was served (when the client gave up on a read and
retried, the last read counts). A group the run recorded as failed
(``sync_runs.failed_groups``) must be untouched by that run instead, and so must
every group not served to it. Runs that failed or were aborted must have left no
history at all, and no run may be left ``running``. Memory: the daemon's RSS after
its last run may be at most 1.5 x + 16 MiB its RSS after its first.

Exit status 0 when every check holds, 1 otherwise. ``run_soak()`` is what the test
suite calls (tests/test_crash_and_soak.py, for ~20 s).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from syncer.simulator import Simulator, World  # noqa: E402
from syncer.storage.schema import parse_time  # noqa: E402

FAULT_KINDS = ("500", "502", "503", "429", "stall", "truncated")
MIB = 1024 * 1024
STOP_TIMEOUT_S = 10.0


@dataclasses.dataclass
class SoakReport:
    seconds: float
    runs: int = 0
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    left_running: int = 0
    daemon_exit: int | None = None
    stop_seconds: float | None = None
    world_changes: int = 0
    faults: dict[str, int] = dataclasses.field(default_factory=dict)
    token_refreshes: int = 0
    token_revocations: int = 0
    reads_served: int = 0
    reads_matched: int = 0  # (run, group) pairs checked against the history
    reads_superseded: int = 0  # served, but the client retried and used a later read
    reads_served_but_failed: int = 0  # served, but the run recorded the group as failed
    reads_outside_runs: int = 0  # served while no counted run was going (aborted/failed runs)
    mismatches: int = 0
    mismatch_examples: list[str] = dataclasses.field(default_factory=list)
    unaccounted_runs: int = 0  # groups_synced disagrees with the reads the run consumed
    half_runs: int = 0  # failed/aborted runs with history rows
    secrets_leaked: int = 0
    tracebacks: int = 0
    rss_first_mib: float | None = None
    rss_last_mib: float | None = None
    rss_max_mib: float | None = None
    rss_slope_kib_per_run: float | None = None
    rss_samples: int = 0
    rss_per_run_mib: list[float] = dataclasses.field(default_factory=list)
    workdir: str = ""
    stdout: str = ""
    stderr: str = ""

    @property
    def memory_ok(self) -> bool:
        if self.rss_first_mib is None or self.rss_last_mib is None:
            return False
        return self.rss_last_mib <= self.rss_first_mib * 1.5 + 16

    @property
    def ok(self) -> bool:
        counted = self.statuses.get("ok", 0) + self.statuses.get("partial", 0)
        return (
            self.mismatches == 0
            and self.half_runs == 0
            and self.unaccounted_runs == 0
            and self.left_running == 0
            and self.daemon_exit == 0
            and self.secrets_leaked == 0
            and self.tracebacks == 0
            and counted > 0
            and self.memory_ok
        )

    def summary(self) -> str:
        statuses = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        lines = [
            f"soak: {self.seconds:g} s of `syncer run --interval 1s`",
            f"  runs: {self.runs} ({statuses}); left running: {self.left_running}",
            f"  daemon: SIGTERM -> exit {self.daemon_exit} in {self.stop_seconds:.2f} s"
            if self.stop_seconds is not None else f"  daemon: exit {self.daemon_exit}",
            f"  world changes applied: {self.world_changes}",
            f"  faults injected: {sum(self.faults.values())} ({faults})",
            f"  token refreshes: {self.token_refreshes} (access tokens revoked {self.token_revocations} times)",
            f"  group reads served: {self.reads_served}; checked against the history: {self.reads_matched};"
            f" superseded by a retry: {self.reads_superseded}; served but recorded as failed:"
            f" {self.reads_served_but_failed}; during failed/aborted runs: {self.reads_outside_runs}",
            f"  mismatches: {self.mismatches}; half-visible runs: {self.half_runs};"
            f" runs whose groups_synced disagrees: {self.unaccounted_runs}",
            f"  memory (VmRSS after each run): first {_mib(self.rss_first_mib)}, last {_mib(self.rss_last_mib)},"
            f" max {_mib(self.rss_max_mib)}, slope {self.rss_slope_kib_per_run or 0:+.1f} KiB/run"
            f" ({self.rss_samples} samples) -> {'ok' if self.memory_ok else 'GROWING'}",
            f"  tokens in output: {self.secrets_leaked}; tracebacks in output: {self.tracebacks}",
            f"  result: {'PASS' if self.ok else 'FAIL'}",
        ]
        lines += [f"  mismatch: {m}" for m in self.mismatch_examples]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, t.Any]:
        data = dataclasses.asdict(self)
        data.pop("stdout")
        data.pop("stderr")
        data["memory_ok"] = self.memory_ok
        data["ok"] = self.ok
        return data


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MiB"


# ------------------------------------------------------------------ processes


def _environment(sim: Simulator, workdir: Path, config: Path) -> dict[str, str]:
    skip = ("SYNCER_", "GLOBUS_", "STATE_DIRECTORY", "CONFIGURATION_DIRECTORY", "NOTIFY_SOCKET", "JOURNAL_STREAM")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env.update(sim.env)
    env["HOME"] = str(workdir / "home")
    env["XDG_DATA_HOME"] = str(workdir / "home" / "data")
    env["XDG_CONFIG_HOME"] = str(workdir / "home" / "config")
    env["SYNCER_CONFIG"] = str(config)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _syncer(*args: str) -> list[str]:
    return [sys.executable, "-m", "syncer", *args]


def _login(sim: Simulator, env: dict[str, str], cwd: Path) -> str:
    """`syncer login --no-browser`, answering with the code the simulator's page shows."""
    proc = subprocess.Popen(
        _syncer("login", "--no-browser"), env=env, cwd=cwd, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = sim.answer_cli_login(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"syncer login failed ({proc.returncode}): {out}{err}")
    return out + err


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class _Every(threading.Thread):
    """Call ``fn`` every ``period`` seconds until stopped."""

    def __init__(self, period: float, fn: t.Callable[[], None], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.period, self.fn, self.halt = period, fn, threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.period):
            self.fn()

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


# ------------------------------------------------------------------ checking


def _epoch(text: str | None) -> float | None:
    return parse_time(text).timestamp() if text else None


def _check_history(db_path: Path, read_log: list[dict[str, t.Any]], report: SoakReport) -> list[dict[str, t.Any]]:
    """Match every served read to its run and compare it with the history; returns the runs."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        runs = [dict(r) for r in conn.execute("SELECT * FROM sync_runs ORDER BY id")]
        history: dict[str, list[tuple[str, str, str, int, int | None]]] = collections.defaultdict(list)
        touched: dict[int, set[str]] = collections.defaultdict(set)  # run -> groups it changed
        for row in conn.execute(
            "SELECT group_id, identity_id, role, status, from_run, to_run FROM membership_history"
        ):
            history[row[0]].append((row[1], row[2], row[3], row[4], row[5]))
            touched[row[4]].add(row[0])
            if row[5] is not None:
                touched[row[5]].add(row[0])
    finally:
        conn.close()

    report.runs = len(runs)
    report.statuses = dict(collections.Counter(r["status"] for r in runs))
    report.left_running = report.statuses.get("running", 0)
    for run in runs:
        if run["status"] not in ("ok", "partial") and touched.get(run["id"]):
            report.half_runs += 1

    # runs are serialized by the sync lock: their [started_at, finished_at] windows
    # do not overlap, so a read belongs to the run whose window holds it
    starts = [_epoch(r["started_at"]) for r in runs]
    ends = [_epoch(r["finished_at"]) or float("inf") for r in runs]
    by_run: dict[int, dict[str, list[dict[str, t.Any]]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for read in read_log:
        if not read:
            continue
        report.reads_served += 1
        i = bisect.bisect_right(starts, read["at"]) - 1
        if i < 0 or read["at"] > ends[i] or runs[i]["status"] not in ("ok", "partial"):
            report.reads_outside_runs += 1
            continue
        by_run[runs[i]["id"]][read["group_id"]].append(read)

    def as_of(group_id: str, k: int) -> list[tuple[str, str, str]]:
        return sorted(
            (iid, role, status) for iid, role, status, fr, to in history.get(group_id, ())
            if fr <= k and (to is None or to > k)
        )

    for run in runs:
        if run["status"] not in ("ok", "partial"):
            continue
        k = run["id"]
        failed = set(json.loads(run["failed_groups"] or "{}"))
        reads = by_run.get(k, {})
        consumed = 0
        for group_id, served in reads.items():
            if group_id in failed:
                # served, but the client gave up on it (timeout, retries exhausted)
                report.reads_served_but_failed += len(served)
                if group_id in touched.get(k, ()):
                    report.mismatches += 1
                    _example(report, f"run {k}: group {group_id} failed but its history changed")
                continue
            served.sort(key=lambda r: r["at"])
            report.reads_superseded += len(served) - 1
            consumed += 1
            report.reads_matched += 1
            want = sorted(tuple(m) for m in served[-1]["state"])
            have = as_of(group_id, k)
            if want != have:
                report.mismatches += 1
                missing, extra = set(want) - set(have), set(have) - set(want)
                _example(report, f"run {k}: group {group_id}: served-not-recorded {sorted(missing)[:3]},"
                                 f" recorded-not-served {sorted(extra)[:3]}")
        # a run changes the history only of groups it read (a failed read changes nothing)
        for group_id in sorted(touched.get(k, set()) - {g for g in reads if g not in failed}):
            report.mismatches += 1
            _example(report, f"run {k}: group {group_id} changed without a read served to the run")
        # every group the run says it read came from a served read (and vice versa)
        if consumed != run["groups_synced"]:
            report.unaccounted_runs += 1
            _example(report, f"run {k}: groups_synced {run['groups_synced']} but {consumed} reads consumed")
    return runs


def _example(report: SoakReport, text: str) -> None:
    if len(report.mismatch_examples) < 10:
        report.mismatch_examples.append(text)


def _memory(runs: list[dict[str, t.Any]], samples: list[tuple[float, int]], report: SoakReport) -> None:
    """The daemon's RSS just after each finished run, first vs last, and its trend."""
    report.rss_samples = len(samples)
    if not samples:
        return
    times = [s[0] for s in samples]
    per_run = []
    for run in runs:
        end = _epoch(run["finished_at"])
        if end is None or run["status"] not in ("ok", "partial", "failed"):
            continue
        i = bisect.bisect_left(times, end)
        if i < len(samples):
            per_run.append(samples[i][1])
    report.rss_max_mib = max(s[1] for s in samples) / 1024
    report.rss_per_run_mib = [round(kib / 1024, 1) for kib in per_run]
    if not per_run:
        return
    report.rss_first_mib = per_run[0] / 1024
    report.rss_last_mib = per_run[-1] / 1024
    if len(per_run) >= 3:
        n = len(per_run)
        mean_x, mean_y = (n - 1) / 2, sum(per_run) / n
        var = sum((x - mean_x) ** 2 for x in range(n))
        report.rss_slope_kib_per_run = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(per_run)) / var


# ------------------------------------------------------------------ the soak


def run_soak(
    seconds: float = 120,
    *,
    groups: int = 40,
    members: int = 25,
    fault_rate: float = 0.10,
    stall_s: tuple[float, float] = (1.8, 2.2),
    latency_ms: float = 5,
    token_lifetime: int = 70,
    revoke_every: float = 11.0,
    change_every: float = 0.3,
    changes_per_tick: int = 2,
    seed: int = 1,
    daemon_verbose: bool = False,
    workdir: Path | None = None,
    say: t.Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> SoakReport:
    """Run the soak for ``seconds`` and check it; see the module docstring."""
    with tempfile.TemporaryDirectory(prefix="syncer-soak-") as scratch:
        work = Path(workdir) if workdir else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        report = SoakReport(seconds=seconds, workdir=str(work))
        world = World.generate(groups=groups, members=members, seed=seed)
        # tokens live 70 s; the SDK renews them 60 s before they expire, so about
        # every 10 s; the revocations below add renewals on a 401 in mid-run
        sim = Simulator(world, port=0, latency_ms=latency_ms, access_token_lifetime=token_lifetime).start()
        try:
            _soak(sim, world, work, report, seconds=seconds, fault_rate=fault_rate, stall_s=stall_s,
                  revoke_every=revoke_every, change_every=change_every, changes_per_tick=changes_per_tick,
                  seed=seed, daemon_verbose=daemon_verbose, say=say)
        finally:
            sim.stop()
        return report


def _soak(
    sim: Simulator, world: World, work: Path, report: SoakReport, *, seconds: float, fault_rate: float,
    stall_s: tuple[float, float], revoke_every: float, change_every: float, changes_per_tick: int, seed: int,
    daemon_verbose: bool, say: t.Callable[[str], None],
) -> None:
    config = work / "syncer.toml"
    database, tokens = work / "groups.db", work / "tokens.db"
    config.write_text(
        f'database = "{database.name}"\ntoken_storage = "{tokens.name}"\n'
        'http_timeout = "2s"\ninterval = "1s"\n'
    )
    env = _environment(sim, work, config)
    outputs = [_login(sim, env, work)]
    say(f"soak: logged in; world {len(world.groups)} groups; running `syncer run --interval 1s` for {seconds:g} s")

    sim.reset_stats()
    sim.faults.random_stall_s = sum(stall_s) / 2
    sim.faults.set_random(fault_rate, kinds=FAULT_KINDS, seed=seed)
    rng = random.Random(seed)
    changes_before = len(world.change_log)
    revocations = 0

    def change() -> None:
        world.random_changes(changes_per_tick, rng)
        # a stall either side of the client's timeout; never longer than the timeout
        # plus the shortest retry backoff, so a read the client gave up on is always
        # served before the retry that replaces it
        sim.faults.random_stall_s = rng.uniform(*stall_s)

    def revoke() -> None:
        nonlocal revocations
        revocations += 1
        sim.expire_access_tokens()

    out_path, err_path = work / "daemon.out", work / "daemon.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        verbosity = ["-vv"] if daemon_verbose else []
        daemon = subprocess.Popen(_syncer(*verbosity, "run", "--interval", "1s"), env=env, cwd=work, stdout=out, stderr=err)
    samples: list[tuple[float, int]] = []

    def sample() -> None:
        rss = _rss_kib(daemon.pid)
        if rss is not None and daemon.poll() is None:
            samples.append((time.time(), rss))

    threads = [
        _Every(change_every, change, "world-changes"),
        _Every(revoke_every, revoke, "token-revocations") if revoke_every > 0 else None,
        _Every(0.1, sample, "rss-sampler"),
    ]
    for thread in threads:
        if thread:
            thread.start()
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and daemon.poll() is None:
            time.sleep(0.2)
        early = daemon.poll()
        if early is not None:
            say(f"soak: the daemon exited early with {early}")
        # stop it as systemd would, in whatever it is doing
        stop_began = time.monotonic()
        if early is None:
            daemon.send_signal(signal.SIGTERM)
        try:
            report.daemon_exit = daemon.wait(timeout=STOP_TIMEOUT_S)
            report.stop_seconds = time.monotonic() - stop_began
        except subprocess.TimeoutExpired:
            say(f"soak: the daemon did not exit within {STOP_TIMEOUT_S:g} s of SIGTERM; killing it")
            daemon.kill()
            daemon.wait()
            report.daemon_exit = None
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        for thread in threads:
            if thread:
                thread.stop()

    report.world_changes = len(world.change_log) - changes_before
    stats = sim.stats
    report.faults = {k: v for k, v in stats["faults"].items() if v}
    report.token_refreshes = stats["refresh_grants"]
    report.token_revocations = revocations
    report.stdout, report.stderr = out_path.read_text(), err_path.read_text()
    outputs += [report.stdout, report.stderr]
    text = "".join(outputs)
    report.secrets_leaked = sum(1 for token in sim.issued_tokens if token in text)
    report.tracebacks = text.count("Traceback")

    runs = _check_history(database, list(sim.read_log), report)
    _memory(runs, samples, report)


def main(argv: t.Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120, help="how long the daemon runs (default 120)")
    parser.add_argument("--groups", type=int, default=40, help="groups in the world (default 40)")
    parser.add_argument("--members", type=int, default=25, help="memberships per group (default 25)")
    parser.add_argument("--fault-rate", type=float, default=0.10, help="share of group reads that fail (0.10)")
    parser.add_argument("--stall-s", type=float, nargs=2, default=(1.8, 2.2), metavar=("MIN", "MAX"),
                        help="how long a stalled read hangs (1.8 2.2 s; the client gives up at 2 s)")
    parser.add_argument("--latency-ms", type=float, default=5, help="simulator latency per request (5 ms)")
    parser.add_argument("--token-lifetime", type=int, default=70, help="access token lifetime in seconds (70)")
    parser.add_argument("--revoke-every", type=float, default=11.0,
                        help="revoke every access token this often, in seconds (11; 0: never)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--daemon-debug", action="store_true", help="run the daemon with -vv (its log is in --workdir)")
    parser.add_argument("--workdir", type=Path, help="keep the database, config and daemon logs here")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = run_soak(
        args.seconds, groups=args.groups, members=args.members, fault_rate=args.fault_rate,
        stall_s=tuple(args.stall_s), latency_ms=args.latency_ms, token_lifetime=args.token_lifetime,
        revoke_every=args.revoke_every, seed=args.seed, daemon_verbose=args.daemon_debug, workdir=args.workdir,
    )
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
