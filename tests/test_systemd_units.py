"""Checks for the systemd deployment files in ``systemd/``.

Structural tests parse the unit files and always run. The tests that need
``systemd-analyze`` (``verify`` and ``security --offline=yes``) or
``systemd-sysusers`` skip, with a reason, where those tools are missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
SERVICES = ("syncer.service", "syncer-sync.service")
DATASETTE = "syncer-datasette.service"
TIMER = "syncer-sync.timer"
# one instance per account: /etc/syncer/%i.toml, state in /var/lib/syncer/%i
TEMPLATES = ("syncer@.service", "syncer-sync@.service")
TEMPLATE_TIMER = "syncer-sync@.timer"
UNITS = (*SERVICES, TIMER, *TEMPLATES, TEMPLATE_TIMER, DATASETTE)
LOAD_CREDENTIAL = "LoadCredential=client_secret:/etc/syncer/%i.secret"
INSTALLED_BINARY = "/opt/syncer/venv/bin/syncer"
MAX_EXPOSURE = 1.5

# Keys that legitimately differ between the daemon and the oneshot unit; every
# other [Service] setting (identity, directories, hardening) must be identical.
PER_UNIT_SERVICE_KEYS = {
    "Type",
    "NotifyAccess",
    "ExecStart",
    "WatchdogSec",
    "TimeoutStartSec",
    "TimeoutStopSec",
    "Restart",
    "RestartSec",
    "RestartPreventExitStatus",
    "SuccessExitStatus",
}


# --------------------------------------------------------------------------- helpers


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Parse a unit file into {section: {key: [value, ...]}}.

    Keys may repeat (every assignment is kept, in order); ``#``/``;`` comment
    lines are skipped and a trailing backslash continues a line, as in systemd.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}:{lineno}: not 'Key=value' in a section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def effective_list(values: list[str]) -> list[str]:
    """Items of a list-valued setting; an empty assignment resets the list."""
    items: list[str] = []
    for value in values:
        items = [] if value == "" else items + value.split()
    return items


def last(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str | None:
    values = unit.get(section, {}).get(key)
    return values[-1] if values else None


@pytest.fixture(scope="module")
def units() -> dict[str, dict[str, dict[str, list[str]]]]:
    return {name: parse_unit(UNIT_DIR / name) for name in UNITS}


@pytest.fixture(scope="module")
def analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    return exe


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"}
    env.pop("SYSTEMD_UNIT_PATH", None)
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def copy_for_verify(dest: Path) -> Path:
    """Copy the units to ``dest``; point ExecStart at a real executable if needed.

    ``systemd-analyze verify`` rejects a unit whose ExecStart binary does not
    exist, and /opt/syncer/venv is only there on a deployed host. Nothing else
    is changed.
    """
    replacement = INSTALLED_BINARY
    if not os.access(INSTALLED_BINARY, os.X_OK):
        replacement = sys.executable
    for name in UNITS:
        text = (UNIT_DIR / name).read_text()
        (dest / name).write_text(text.replace(INSTALLED_BINARY, replacement))
    return dest


# ------------------------------------------------------------------ daemon unit


def test_daemon_is_a_notify_service_with_watchdog(units):
    unit = units["syncer.service"]
    assert last(unit, "Service", "Type") == "notify"
    assert last(unit, "Service", "NotifyAccess") == "main"
    assert last(unit, "Service", "ExecStart") == f"{INSTALLED_BINARY} run"
    watchdog = last(unit, "Service", "WatchdogSec")
    assert watchdog is not None and watchdog not in ("0", "infinity")
    assert watchdog == "120"


def test_daemon_restart_policy(units):
    unit = units["syncer.service"]
    assert last(unit, "Service", "Restart") == "on-failure"
    assert last(unit, "Service", "RestartSec") is not None
    prevent = effective_list(unit["Service"].get("RestartPreventExitStatus", []))
    assert {"77", "78"} <= set(prevent)
    # lock busy (75) and generic failures (1) must still be retried
    assert not {"1", "75"} & set(prevent)
    # a crash loop must be able to trip the start limit
    burst = last(unit, "Unit", "StartLimitBurst")
    assert burst is not None and int(burst) > 0
    assert last(unit, "Unit", "StartLimitIntervalSec") not in (None, "0", "infinity")
    stop = last(unit, "Service", "TimeoutStopSec")
    assert stop is not None and stop != "infinity"
    # 77/78 must show up as failures, never as success
    assert not {"77", "78"} & set(effective_list(unit["Service"].get("SuccessExitStatus", [])))


# ------------------------------------------------------------- oneshot + timer


def test_sync_service_is_oneshot_and_tolerates_partial_and_lock_busy(units):
    unit = units["syncer-sync.service"]
    assert last(unit, "Service", "Type") == "oneshot"
    assert last(unit, "Service", "ExecStart") == f"{INSTALLED_BINARY} sync"
    success = set(effective_list(unit["Service"].get("SuccessExitStatus", [])))
    assert {"3", "75"} <= success
    assert not {"1", "77", "78"} & success
    assert last(unit, "Service", "TimeoutStartSec") not in (None, "0", "infinity")
    assert "Restart" not in unit["Service"] or last(unit, "Service", "Restart") == "no"


def test_timer_triggers_the_sync_service(units):
    timer = units[TIMER]
    target = last(timer, "Timer", "Unit") or TIMER.replace(".timer", ".service")
    assert target == "syncer-sync.service"
    assert (UNIT_DIR / target).is_file()
    assert last(timer, "Timer", "OnCalendar")  # Persistent= only works with OnCalendar=
    assert last(timer, "Timer", "Persistent") in ("true", "yes")
    assert last(timer, "Timer", "RandomizedDelaySec") is not None
    assert effective_list(timer["Install"]["WantedBy"]) == ["timers.target"]


# ------------------------------------------------ identity, directories, sandbox


@pytest.mark.parametrize("name", SERVICES)
def test_service_identity_and_directories(units, name):
    service = units[name]["Service"]
    assert "DynamicUser" not in service
    assert service["User"] == ["syncer"]
    assert service["Group"] == ["syncer"]
    assert service["StateDirectory"] == ["syncer"]
    assert service["StateDirectoryMode"] == ["0750"]
    assert service["ConfigurationDirectory"] == ["syncer"]
    assert service["UMask"] == ["0027"]
    assert effective_list(service["RestrictAddressFamilies"]) == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert "PrivateNetwork" not in service  # needs HTTPS to Globus
    assert service["CapabilityBoundingSet"] == [""]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]


def test_both_services_share_identity_and_hardening(units):
    daemon, oneshot = (
        {k: v for k, v in units[name]["Service"].items() if k not in PER_UNIT_SERVICE_KEYS}
        for name in SERVICES
    )
    assert daemon == oneshot


def test_datasette_unit_reads_the_state_directory_as_group_syncer(units):
    service = units[DATASETTE]["Service"]
    assert last(units[DATASETTE], "Service", "ExecStart") == f"{INSTALLED_BINARY} serve --host 127.0.0.1 --port 8001"
    assert service["User"] == ["syncer-datasette"]
    assert service["Group"] == ["syncer"]
    # never its own StateDirectory=: systemd would chown /var/lib/syncer to this user
    assert "StateDirectory" not in service and "DynamicUser" not in service
    assert service["Environment"] == ["STATE_DIRECTORY=/var/lib/syncer"]
    assert service["ReadOnlyPaths"] == ["/var/lib/syncer"]
    assert service["ConfigurationDirectory"] == ["syncer"]
    assert effective_list(service["IPAddressDeny"]) == ["any"]
    assert effective_list(service["IPAddressAllow"]) == ["localhost"]
    # the rest of the sandbox is the daemon's
    daemon = units["syncer.service"]["Service"]
    for key in ("NoNewPrivileges", "CapabilityBoundingSet", "ProtectSystem", "ProtectHome", "PrivateUsers",
                "SystemCallFilter", "RestrictAddressFamilies", "MemoryDenyWriteExecute", "ProtectProc"):
        assert service[key] == daemon[key], key


def test_sysusers_file_creates_the_user(tmp_path):
    exe = shutil.which("systemd-sysusers")
    if exe is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    proc = run(exe, f"--root={tmp_path}", str(UNIT_DIR / "syncer.sysusers"))
    assert proc.returncode == 0, proc.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(
        r"^syncer:x:\d+:\d+:syncer Globus group snapshotter:/var/lib/syncer:", passwd, re.M
    ), passwd
    group = re.search(r"^syncer:x:(\d+):", (tmp_path / "etc" / "group").read_text(), re.M)
    assert group, "no syncer group"
    # the Datasette reader's primary group is syncer's: it reads groups.db through the group
    assert re.search(rf"^syncer-datasette:x:\d+:{group.group(1)}:syncer Datasette reader:", passwd, re.M), passwd


# ------------------------------------------------------------- systemd-analyze


@pytest.mark.parametrize("name", (*SERVICES, *TEMPLATES, DATASETTE))
def test_security_exposure(analyze, name):
    # --offline=yes analyses the unit file at this path, not a loaded unit;
    # --threshold is on the internal 0..100 scale (1.5 shown == 15).
    proc = run(
        analyze, "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}",
        "--no-pager", str(UNIT_DIR / name),
    )
    shown = name.replace("@.", "@i.")  # a template is scored as an instance named "i"
    match = re.search(rf"Overall exposure level for {re.escape(shown)}: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    exposure = float(match.group(1))
    print(f"{name}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""


@pytest.mark.parametrize(
    "files",
    [
        ("syncer.service",),
        ("syncer-sync.service",),
        (DATASETTE,),
        # a timer is verified together with the unit it triggers; verify also
        # adds the files' folder to the unit search path
        ("syncer-sync.timer", "syncer-sync.service"),
        # templates are verified as an instance of themselves
        ("syncer@demo.service",),
        ("syncer-sync@demo.service",),
        ("syncer-sync@demo.timer", "syncer-sync@demo.service"),
    ],
    ids=lambda files: "+".join(files),
)
def test_verify_is_clean(analyze, tmp_path, files):
    copy_for_verify(tmp_path)
    proc = run(analyze, "verify", *(f"./{name}" for name in files), cwd=tmp_path)
    # nothing is filtered: any warning (unknown key, bad value, missing binary) fails
    assert proc.stderr == ""
    assert proc.stdout == ""
    assert proc.returncode == 0


def test_verify_would_catch_a_bad_key(analyze, tmp_path):
    """Guard: ``verify`` exits 0 on unknown keys, so the test must read stderr."""
    copy_for_verify(tmp_path)
    unit = tmp_path / "syncer.service"
    unit.write_text(unit.read_text().replace("UMask=0027", "UMask=0027\nUmask=0027"))
    proc = run(analyze, "verify", "./syncer.service", cwd=tmp_path)
    assert "Unknown key" in proc.stderr


# ------------------------------------------------------------ template units


@pytest.mark.parametrize("template, plain", list(zip(TEMPLATES, SERVICES, strict=True)))
def test_templates_differ_from_their_unit_only_in_the_instance_paths(units, template, plain):
    """Same identity, hardening, restart policy and exit codes; config and state per instance."""
    per_instance = {"ExecStart", "StateDirectory", "WorkingDirectory"}
    mine, theirs = units[template]["Service"], units[plain]["Service"]
    assert {k: v for k, v in mine.items() if k not in per_instance} == {
        k: v for k, v in theirs.items() if k not in per_instance
    }
    command = last(units[plain], "Service", "ExecStart").removeprefix(f"{INSTALLED_BINARY} ")
    assert mine["ExecStart"] == [f"{INSTALLED_BINARY} --config /etc/syncer/%i.toml {command}"]
    assert mine["StateDirectory"] == ["syncer/%i"]
    assert mine["WorkingDirectory"] == ["%S/syncer/%i"]
    assert {k: v for k, v in units[template]["Unit"].items() if k != "Description"} == {
        k: v for k, v in units[plain]["Unit"].items() if k != "Description"
    }
    assert "%i" in last(units[template], "Unit", "Description")
    assert units[template].get("Install") == units[plain].get("Install")


def test_template_timer_starts_its_instance(units):
    timer, plain = units[TEMPLATE_TIMER], units[TIMER]
    assert last(timer, "Timer", "Unit") == "syncer-sync@%i.service"
    assert {k: v for k, v in timer["Timer"].items() if k != "Unit"} == {
        k: v for k, v in plain["Timer"].items() if k != "Unit"
    }
    assert timer["Install"] == plain["Install"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_confidential_client_variant_verifies(analyze, tmp_path, name):
    """The documented LoadCredential= line (commented out in each template) is valid as it stands."""
    copy_for_verify(tmp_path)
    unit = tmp_path / name
    text = unit.read_text()
    assert f"#{LOAD_CREDENTIAL}\n" in text
    unit.write_text(text.replace(f"#{LOAD_CREDENTIAL}", LOAD_CREDENTIAL))
    proc = run(analyze, "verify", f"./{name.replace('@.', '@demo.')}", cwd=tmp_path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    proc = run(analyze, "security", "--offline=yes", "--no-pager", str(unit))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match and float(match.group(1)) <= MAX_EXPOSURE, proc.stdout
