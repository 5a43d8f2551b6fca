"""syncer under a real systemd: the units as shipped, installed the way systemd/README.md says.

The host's systemd boots as PID 1 of a throw-away container (tests/systemd_container.py).
Inside it, the install steps of systemd/README.md run as written (read from the file,
not retyped; only ``/path/to/syncer`` becomes the wheel built from this tree), with the
simulator as a unit in place of Globus. Test-only drop-ins point the units at the
simulator and shorten the watchdog, the restart delay and the timer's calendar.

The tests share one container and run in file order: each leaves the daemon running,
logged in.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import typing as t
import urllib.request
from pathlib import Path

import pytest
from helpers import answer_login_prompt
from systemd_container import Container, boot, unavailable_reason

ROOT = Path(__file__).resolve().parent.parent
UNAVAILABLE = unavailable_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(UNAVAILABLE is not None, reason=f"live systemd test: {UNAVAILABLE}")]

SYSTEM_PYTHON = Path("/usr/bin/python3")
WATCHDOG_S = 4  # pings every 2 s: room for a loaded machine, and a hang is noticed quickly
SUMMARY = re.compile(r"run \d+ (ok|partial): ")


def install_steps(readme: Path = ROOT / "systemd" / "README.md") -> dict[int, str]:
    """The first ``sh`` block of each numbered step of the README's Install section."""
    install = readme.read_text().split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    steps: dict[int, str] = {}
    for number, body in re.findall(r"^(\d+)\. (.*?)(?=^\d+\. |\Z)", install, flags=re.M | re.S):
        block = re.search(r"```sh\n(.*?)^\s*```", body, flags=re.M | re.S)
        if block:
            steps[int(number)] = "\n".join(line.removeprefix("   ") for line in block.group(1).splitlines())
    return steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live(t.NamedTuple):
    """The booted container and what the tests need to talk to it."""

    box: Container
    steps: dict[int, str]
    globus: dict[str, str]  # GLOBUS_SDK_SERVICE_URL_* of the simulator unit
    base_url: str


def test_system_python_can_make_a_venv(tmp_path: Path) -> None:
    """The README's install uses the system Python; CI installs python3-venv (.ci/run)."""
    assert SYSTEM_PYTHON.exists(), f"{SYSTEM_PYTHON} is missing"
    made = subprocess.run([SYSTEM_PYTHON, "-m", "venv", tmp_path / "venv"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "venv" / "bin" / "pip").exists()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Live]:
    work = tmp_path_factory.mktemp("systemd-live")
    wheels = work / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True, capture_output=True,
    )
    wheel = next(wheels.glob("globus_group_syncer-*.whl"))  # the distribution's name
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    globus = {"GLOBUS_SDK_SERVICE_URL_AUTH": f"{base_url}/auth/", "GLOBUS_SDK_SERVICE_URL_GROUPS": f"{base_url}/groups/"}
    environment = "".join(f"Environment={key}={value}\n" for key, value in globus.items())
    units = {
        "syncer-simulator.service": (
            "[Unit]\nDescription=Globus simulator for the live test\n"
            f"[Service]\nExecStart=/opt/syncer/venv/bin/syncer simulate --port {port} --groups 4 --members 5\n"
        ),
        "syncer.service.d/live-test.conf": (
            f"[Unit]\nAfter=syncer-simulator.service\n[Service]\n{environment}"
            f"WatchdogSec={WATCHDOG_S}\nRestartSec=1\nLimitCORE=0\n"
        ),
        "syncer-sync.service.d/live-test.conf": f"[Unit]\nAfter=syncer-simulator.service\n[Service]\n{environment}",
        # every 2 s, so the test sees it fire
        "syncer-sync.timer.d/live-test.conf": (
            "[Timer]\nOnCalendar=\nOnCalendar=*:*:0/2\nRandomizedDelaySec=0\nPersistent=false\n"
        ),
    }
    box = boot(f"syncer-live-{os.getpid()}", work / "container", units)
    try:
        steps = install_steps()
        wheel_inside = box.copy_in(wheel, "/tmp")
        readme = lambda n: steps[n].replace("/path/to/syncer", wheel_inside)  # noqa: E731
        # the steps run in a checkout: a copy inside, as the host's may be hidden (the
        # container has its own /tmp)
        checkout = "/usr/local/src/syncer"
        for part in ("systemd", "config"):
            box.copy_in(ROOT / part, checkout)
        box.sh(f"cd {checkout}\n{readme(1)}\n{readme(2)}\n{readme(3)}\n{readme(4)}", timeout=300)
        box.write("/etc/syncer/syncer.toml", box.read("/etc/syncer/syncer.toml") + 'interval = "1h"\nhttp_timeout = "10s"\n')
        box.systemctl("start", "syncer-simulator.service")
        box.wait_until(lambda: _answers(base_url), "the simulator unit to listen")
        live = Live(box, steps, globus, base_url)
        login(live)
        box.sh(f"cd {checkout}\n{readme(6)}")
        yield live
    finally:
        box.shutdown()
        leftovers = [str(path) for path in box.cgroups if path.exists()]
        assert not leftovers, f"cgroups left behind: {leftovers}"
        assert box.process.poll() is not None
        assert "syncer-live" not in Path("/proc/self/mountinfo").read_text()  # the container's mounts stayed inside


def _answers(base_url: str) -> bool:
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{base_url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def login(live: Live) -> str:
    """The README's login step, as root in the container, answering the prompt as a user would."""
    proc = live.box.popen(
        "/bin/sh", "-ec", live.steps[5], env=live.globus,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = answer_login_prompt(proc, live.base_url)
    assert proc.returncode == 0, out + err
    assert "Logged in as" in out, out + err
    return out


def as_service_user(live: Live, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`syncer ARGS` as the service user, the way the README's login step runs it."""
    return live.box.run(
        "runuser", "-u", "syncer", "--", "env", "STATE_DIRECTORY=/var/lib/syncer", "CONFIGURATION_DIRECTORY=/etc/syncer",
        "/opt/syncer/venv/bin/syncer", *args, env=live.globus, check=check,
    )


def journal(box: Container, unit: str) -> list[str]:
    return box.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout.splitlines()


def daemon_running(box: Container) -> dict[str, str] | None:
    state = box.show("syncer.service", "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
    return state if state["SubState"] == "running" and state["StatusText"].startswith("last run") else None


def test_the_daemon_is_ready_reports_its_status_and_pings_the_watchdog(live: Live) -> None:
    box = live.box
    state = box.wait_until(lambda: daemon_running(box), "syncer.service to report its first run")
    assert state["ActiveState"] == "active"
    assert re.match(r"last run #1 ok at \S+: 4 groups, \d+ memberships, \d+ changes", state["StatusText"]), state
    status = box.systemctl("status", "syncer.service").stdout
    assert "active (running)" in status and 'Status: "last run #1 ok' in status, status
    first = box.show("syncer.service", "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
    box.wait_until(
        lambda: box.show("syncer.service", "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] != first,
        "a WATCHDOG=1 ping", timeout=3 * WATCHDOG_S,
    )
    summaries = [line for line in journal(box, "syncer.service") if SUMMARY.search(line)]
    assert len(summaries) == 1 and "run 1 ok" in summaries[0], summaries


def test_the_sandbox_is_applied(live: Live) -> None:
    box = live.box
    pid = box.wait_until(lambda: daemon_running(box), "syncer.service")["MainPID"]
    status = dict(line.split(":\t", 1) for line in box.read(f"/proc/{pid}/status").splitlines() if ":\t" in line)
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])
    syncer_uid = box.run("id", "-u", "syncer").stdout.strip()
    mapped = sorted(line.split()[0] for line in box.read(f"/proc/{pid}/uid_map").splitlines())
    assert mapped == sorted({"0", syncer_uid}), mapped  # PrivateUsers=: only root and syncer


def test_a_member_of_group_syncer_reads_the_database(live: Live) -> None:
    box = live.box
    box.wait_until(lambda: daemon_running(box), "syncer.service")
    box.sh("useradd --create-home alice && usermod -aG syncer alice && useradd --create-home bob")
    query = ["sqlite3", "-cmd", ".timeout 10000", "file:/var/lib/syncer/groups.db?mode=ro", "SELECT count(*) FROM active_members"]
    as_root = int(box.run(*query).stdout)
    assert as_root > 0
    assert int(box.run("runuser", "-u", "alice", "--", *query).stdout) == as_root
    outsider = box.run("runuser", "-u", "bob", "--", *query, check=False)
    assert outsider.returncode != 0 and "unable to open" in outsider.stderr, outsider


def test_a_hung_daemon_is_killed_by_the_watchdog_and_restarted(live: Live) -> None:
    """A stopped process is the surest hang: no thread of it can ping."""
    box = live.box
    before = box.wait_until(lambda: daemon_running(box), "syncer.service")
    box.systemctl("kill", "--signal=SIGSTOP", "syncer.service")
    after = box.wait_until(
        lambda: (s := daemon_running(box)) and s["MainPID"] != before["MainPID"] and s,
        "the watchdog to kill and restart syncer.service", timeout=6 * WATCHDOG_S,
    )
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert any("Watchdog timeout" in line for line in journal(box, "syncer.service"))


@pytest.mark.parametrize("exit_code", [77, 78])
def test_login_required_and_bad_configuration_are_not_restarted(live: Live, exit_code: int) -> None:
    box = live.box
    box.wait_until(lambda: daemon_running(box), "syncer.service")
    config = box.read("/etc/syncer/syncer.toml")
    if exit_code == 77:
        as_service_user(live, "logout")
    else:
        box.write("/etc/syncer/syncer.toml", config + "no_such_key = 1\n")
    try:
        box.systemctl("restart", "--no-block", "syncer.service")
        # with a restart ahead the unit would be "activating (auto-restart)", never "failed"
        state = box.wait_until(
            lambda: (s := box.show("syncer.service", "ActiveState", "ExecMainStatus", "NRestarts", "StatusText"))
            and s["ActiveState"] == "failed" and s,
            f"syncer.service to fail with {exit_code}",
        )
        assert state["ExecMainStatus"] == str(exit_code)
        assert state["NRestarts"] == "0"  # counted from the manual restart
        if exit_code == 77:
            # the reason stays on show, not the "stopping" of the final message
            assert state["StatusText"].startswith("login required"), state
            assert "syncer login" in box.systemctl("status", "syncer.service", check=False).stdout
    finally:
        if exit_code == 77:
            login(live)
        else:
            box.write("/etc/syncer/syncer.toml", config)
        box.systemctl("reset-failed", "syncer.service")
        box.systemctl("start", "syncer.service")
    box.wait_until(lambda: daemon_running(box), "syncer.service to run again")


def test_the_oneshot_and_the_timer(live: Live) -> None:
    box = live.box
    box.systemctl("start", "syncer-sync.service")  # waits until the run is over
    state = box.show("syncer-sync.service", "Result", "ExecMainStatus")
    assert state == {"Result": "success", "ExecMainStatus": "0"}, state
    summaries = [line for line in journal(box, "syncer-sync.service") if SUMMARY.search(line)]
    assert len(summaries) == 1, summaries  # one line per run, not a log line and an echo
    runs = lambda: int(box.run("sqlite3", "/var/lib/syncer/groups.db", "SELECT count(*) FROM sync_runs").stdout)  # noqa: E731
    done = runs()
    # the README's other choice, commented out in its block
    enable_timer = next(line for line in live.steps[6].splitlines() if "syncer-sync.timer" in line)
    box.sh(enable_timer.lstrip("# "))
    try:
        box.wait_until(lambda: runs() > done, "the timer to start a run")
    finally:
        box.systemctl("disable", "--now", "syncer-sync.timer")
    assert box.show("syncer-sync.service", "Result")["Result"] == "success"
