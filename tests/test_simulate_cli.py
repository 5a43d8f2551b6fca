"""`syncer simulate` as a user runs it: a separate process that syncer is pointed at."""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import typing as t
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import Env, Result, record


def browser_step(url: str) -> str:
    """What a person does: open the URL, log in, copy the code off the page."""
    with urllib.request.urlopen(url, timeout=30) as page:
        match = re.search(r'id="auth-code"[^>]*>([^<]+)<', page.read().decode())
    assert match, "the auth-code page shows the code"
    return match.group(1).strip()


SIMULATOR_DOC = Path(__file__).resolve().parent.parent / "docs" / "simulator.md"


class Served(t.NamedTuple):
    proc: subprocess.Popen[str]
    url: str
    #: every `export NAME=VALUE` line it printed, as a shell would read them
    exported: dict[str, str]


@contextlib.contextmanager
def simulate(env: Env, *args: str, export_all: bool = False, port: str = "0") -> t.Iterator[Served]:
    """`syncer simulate --port PORT ARGS` in its own process; env points syncer at it (the
    SDK's variables; ``export_all``: also its SYNCER_* ones, as a user pasting them)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "syncer", "simulate", "--port", port, *args],
        env=env.vars, cwd=env.tmp, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        exported = {}
        for line in server.stdout:
            if line.startswith("export "):
                key, value = shlex.split(line[len("export "):])[0].split("=", 1)
                exported[key] = value
            if line.startswith("# Globus simulator on"):  # printed after the exports
                break
        assert len(exported) == 4, server.communicate(timeout=10)
        env.vars.update({k: v for k, v in exported.items() if export_all or k.startswith("GLOBUS_")})
        yield Served(server, exported["GLOBUS_SDK_SERVICE_URL_AUTH"].removesuffix("/auth/"), exported)
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
        record(out, err)
    assert server.returncode == 0, err


def admin(served: Served, action: str, **payload: t.Any) -> dict[str, t.Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    if action == "world":
        request = urllib.request.Request(f"{served.url}/admin/world")
    else:
        request = urllib.request.Request(
            f"{served.url}/admin/{action}", data=json.dumps(payload).encode(), method="POST"
        )
    with opener.open(request, timeout=30) as answer:
        return t.cast(dict[str, t.Any], json.load(answer))


def login_by_hand(env: Env) -> Result:
    """`syncer login --no-browser`, with the code copied off the simulator's page."""
    login = env.popen("login", "--no-browser", stdin=subprocess.PIPE)
    assert login.stdout is not None
    url = next(line.strip() for line in login.stdout if line.startswith("http"))
    out, err = login.communicate(browser_step(url) + "\n", timeout=60)
    record(out, err)
    return Result(login.returncode, out, err)


def test_simulate_serves_until_terminated(env: Env) -> None:
    with simulate(env, "--groups", "3", "--members", "4"):
        exported = {key: env.vars[key] for key in ("GLOBUS_SDK_SERVICE_URL_AUTH", "GLOBUS_SDK_SERVICE_URL_GROUPS")}
        assert all(v.startswith("http://127.0.0.1:") and v.endswith("/") for v in exported.values())
        login = login_by_hand(env)
        assert login.returncode == 0, login.stderr
        result = env.run("sync")
        assert result.returncode == 0, result.output
        assert env.query("SELECT count(*) FROM groups")[0][0] == 3


# ------------------------------------------------ a simulator a newcomer can drive


def test_a_login_survives_a_simulator_restart_with_state(env: Env) -> None:
    state = env.tmp / "sim-state.json"
    with simulate(env, "--groups", "3", "--members", "4", "--state", str(state)):
        assert login_by_hand(env).returncode == 0
        assert env.run("sync").returncode == 0
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    saved = json.loads(state.read_text())
    assert saved["format"] == "syncer-simulator-state" and saved["tokens"]["refresh_tokens"]
    # on the same address: the token store knows which Globus Auth issued its tokens
    port = env.vars["GLOBUS_SDK_SERVICE_URL_AUTH"].split(":")[2].split("/")[0]
    with simulate(env, "--state", str(state), port=port) as served:
        assert len(admin(served, "world")["groups"]) == 3  # the same world, not a new one
        result = env.run("sync")  # the stored tokens still work: no new login
        assert result.returncode == 0, result.output
        assert "0 changes" in result.stderr
        status = env.run("status")
        assert status.returncode == 0, status.output


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{", "not JSON"),
        ("[]", "must be a JSON object"),
        ('{"format": "other"}', 'format: must be "syncer-simulator-world"'),
        ("README:role", "groups[0].memberships[1].role: must be one of member, manager, admin"),
        ("README:me", "me: 'nobody' is not one of the identities"),
        ("README:missing-name", "groups[1].name: missing"),
    ],
)
def test_a_bad_world_file_is_one_line(env: Env, content: str, problem: str) -> None:
    if content.startswith("README:"):
        world = readme_world()
        change = content.removeprefix("README:")
        if change == "role":
            world["groups"][0]["memberships"][1]["role"] = "boss"
        elif change == "me":
            world["me"] = "nobody"
        else:
            del world["groups"][1]["name"]
        content = json.dumps(world)
    path = env.tmp / "world.json"
    path.write_text(content)
    result = env.run("simulate", "--port", "0", "--world", str(path), timeout=60)
    assert result.returncode == 78
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"syncer: error: {path}: not a valid world file: {problem}")


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--fault-rate", "2", "Invalid value for '--fault-rate': 2 is out of range: must be between 0 and 1"),
        ("--port", "65536", "Invalid value for '--port': 65536 is out of range: must be between 0 and 65535"),
        ("--members", "0", "Invalid value for '--members': 0 is out of range: must be between 1 and 100000"),
        ("--latency-ms", "-5", "Invalid value for '--latency-ms': -5 is out of range: must be between 0 and 600000"),
    ],
)
def test_simulate_option_values_are_range_checked(env: Env, option: str, value: str, message: str) -> None:
    result = env.run("simulate", option, value, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"syncer: error: {message}\n")


def test_a_busy_port_is_one_error_line(env: Env) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = env.run("simulate", "--port", str(port), timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"syncer: error: cannot listen on 127.0.0.1:{port}: Address already in use"]


def readme_world() -> dict[str, t.Any]:
    """The world file docs/simulator.md documents, as written there."""
    text = SIMULATOR_DOC.read_text()
    block = text.split("<!-- world-file-example -->\n```json\n", 1)[1].split("```", 1)[0]
    return t.cast(dict[str, t.Any], json.loads(block))


def test_admin_changes_while_serving_are_picked_up_by_a_sync(env: Env) -> None:
    """The README's world file, changed through the admin route between two syncs."""
    world_file = env.tmp / "world.json"
    world_file.write_text(json.dumps(readme_world()))
    with simulate(env, "--world", str(world_file)) as served:
        assert login_by_hand(env).returncode == 0
        assert env.run("sync").returncode == 0
        new = admin(served, "add-member", group="Compilers", role="manager")
        admin(served, "remove-member", group="Compilers", identity="alan@example.org")
        admin(served, "set-role", group="Compilers", identity="grace@example.org", role="admin")
        admin(served, "rename-group", group="Compilers", name="Compiler Writers")
        admin(served, "leave", group="Codebreakers")
        world = admin(served, "world")
        assert {g["name"]: g["my_status"] for g in world["groups"]} == {"Compiler Writers": "active", "Codebreakers": "left"}
        result = env.run("sync")
        assert result.returncode == 0, result.output
    rows = env.query(
        "SELECT group_id, group_name, username, change, old_role, new_role FROM membership_changes WHERE run_id = 2"
    )
    compilers, codebreakers = "b1e2d3c4-0000-4000-8000-00000000000a", "b1e2d3c4-0000-4000-8000-00000000000b"
    assert {
        (r["group_name"], r["username"], r["change"], r["old_role"], r["new_role"])
        for r in rows if r["group_id"] == compilers
    } == {
        ("Compiler Writers", new["username"], "added", None, "manager"),
        ("Compiler Writers", "alan@example.org", "removed", "member", None),
        ("Compiler Writers", "grace@example.org", "changed", "member", "admin"),
    }
    # having left Codebreakers, it is no longer among my groups: gone, its members too
    assert {r["change"] for r in rows if r["group_id"] == codebreakers} == {"removed"}
    groups = {r["id"]: r for r in env.query("SELECT id, name, removed_at FROM groups")}
    assert groups[compilers]["name"] == "Compiler Writers" and groups[compilers]["removed_at"] is None
    assert groups[codebreakers]["removed_at"] is not None


def test_admin_refuses_bad_requests_with_a_reason(env: Env) -> None:
    world_file = env.tmp / "world.json"
    world_file.write_text(json.dumps(readme_world()))
    with simulate(env, "--world", str(world_file)) as served:
        for action, payload, status, reason in [
            ("no-such-thing", {}, 404, "no admin action 'no-such-thing'"),
            ("set-role", {"group": "Compilers", "identity": "alan@example.org", "role": "boss"}, 400, "role must be one of"),
            ("remove-member", {"group": "Nope", "identity": "me"}, 404, "no group 'Nope'"),
            ("leave", {"group": "Codebreakers", "identity": "grace@example.org"}, 404, "is not in group"),
        ]:
            with pytest.raises(urllib.error.HTTPError) as refused:
                admin(served, action, **payload)
            assert refused.value.code == status
            assert reason in json.load(refused.value)["error"]
        assert admin(served, "world")["version"] == 0  # nothing changed


def test_a_confidential_client_of_the_world_file_syncs_without_login(env: Env) -> None:
    world = readme_world()
    [client] = world["clients"]
    world_file = env.tmp / "world.json"
    world_file.write_text(json.dumps(world))
    env.write_config(client_id=client["id"])
    env.vars["SYNCER_CLIENT_SECRET"] = client["secret"]
    with simulate(env, "--world", str(world_file)):
        result = env.run("sync")
    assert result.returncode == 0, result.output
    assert [r["name"] for r in env.query("SELECT name FROM groups")] == ["Compilers"]


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "cannot write the state file: No such file or directory"),
        ("{}", 'not a valid state file: not a simulator state file ("format" must be "syncer-simulator-state")'),
        (
            '{"format": "syncer-simulator-state", "format_version": 1, "world": {"format": "syncer-simulator-world"},'
            ' "tokens": {"refresh_tokens": [], "access_tokens": []}}',
            "not a valid state file: world.identities: missing",
        ),
    ],
)
def test_a_bad_state_file_is_one_line(env: Env, content: str | None, problem: str) -> None:
    path = env.tmp / "no-such-folder" / "state.json" if content is None else env.tmp / "state.json"
    if content is not None:
        path.write_text(content)
    result = env.run("simulate", "--port", "0", "--state", str(path), timeout=60)
    assert (result.returncode, result.stdout) == (78, "")
    assert result.stderr.splitlines() == [f"syncer: error: {path}: {problem}"]


# ------------------------------------------- the simulator's data apart from the real store


def test_the_exported_lines_keep_the_simulators_tokens_and_history_apart(env: Env) -> None:
    """A user who pastes every export line: login and sync land in the simulator's own
    folder, never in the configured (real) database and token store."""
    with simulate(env, "--groups", "3", "--members", "4", export_all=True) as served:
        folder = Path(served.exported["SYNCER_DATABASE"]).parent
        assert Path(served.exported["SYNCER_TOKEN_STORAGE"]).parent == folder and folder.is_dir()
        assert folder.name.startswith("syncer-simulate-")
        assert login_by_hand(env).returncode == 0
        assert env.run("sync").returncode == 0
        assert (folder / "groups.db").exists() and (folder / "tokens.db").exists()
        assert not env.database.exists() and not env.tokens.exists()  # the real store: untouched
    assert not folder.exists()  # its world is gone, and so is what syncer kept of it


def test_a_state_file_keeps_its_syncer_folder_beside_it(env: Env) -> None:
    state = env.tmp / "sim-state.json"
    with simulate(env, "--groups", "2", "--members", "3", "--state", str(state), export_all=True) as served:
        assert served.exported["SYNCER_DATABASE"] == str(env.tmp / "sim-state.syncer" / "groups.db")
        assert login_by_hand(env).returncode == 0
        assert env.run("sync").returncode == 0
    assert (env.tmp / "sim-state.syncer" / "groups.db").exists()
    port = env.vars["GLOBUS_SDK_SERVICE_URL_AUTH"].split(":")[2].split("/")[0]
    with simulate(env, "--state", str(state), export_all=True, port=port):  # restarted: the same folder, logged in
        assert env.run("sync").returncode == 0
    assert not env.database.exists()


def test_a_world_file_beside_an_existing_state_file_is_refused(env: Env) -> None:
    state = env.tmp / "sim-state.json"
    with simulate(env, "--groups", "2", "--members", "3", "--state", str(state)):
        pass
    world = env.tmp / "world.json"
    world.write_text(json.dumps(readme_world()))
    result = env.run("simulate", "--port", "0", "--state", str(state), "--world", str(world), timeout=60)
    assert (result.returncode, result.stdout) == (2, "")
    [line] = result.stderr.splitlines()
    assert line.startswith("syncer: error: Invalid value for '--world': the state file") and str(state) in line


@pytest.mark.parametrize(
    "place, change",
    [
        ("colour", lambda w: w.update(colour="blue")),
        ("identities[0].nickname", lambda w: w["identities"][0].update(nickname="x")),
        ("groups[0].members", lambda w: w["groups"][0].update(members=[])),
        ("groups[0].policies.group_visiblity", lambda w: w["groups"][0]["policies"].update(group_visiblity="public")),
        ("groups[0].memberships[0].rol", lambda w: w["groups"][0]["memberships"][0].update(rol="admin")),
        ("clients[0].scope", lambda w: w["clients"][0].update(scope="all")),
    ],
)
def test_unknown_world_keys_are_refused(env: Env, place: str, change: t.Callable[[dict[str, t.Any]], None]) -> None:
    world = readme_world()
    world["groups"][0].setdefault("policies", {})
    change(world)
    path = env.tmp / "world.json"
    path.write_text(json.dumps(world))
    result = env.run("simulate", "--port", "0", "--world", str(path), timeout=60)
    assert (result.returncode, result.stdout) == (78, "")
    [line] = result.stderr.splitlines()
    assert line.startswith(f"syncer: error: {path}: not a valid world file: {place}: unknown key (known: "), line
