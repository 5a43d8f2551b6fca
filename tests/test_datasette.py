"""Datasette on syncer's database: the metadata, every canned query through Datasette's
own in-process client, `syncer serve` in a real headless Chromium, and the message
when Datasette is not installed."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import typing as t
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import Env, record
from helpers import wait_for
from history_scenario import LONG_NAME, Scenario, versions

from syncer.web import INSTALL_HINT, METADATA_FILE, USER_FACING, make_datasette

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="module")
def ds(history: Scenario) -> t.Any:
    datasette = make_datasette(history.env.database)
    asyncio.run(datasette.invoke_startup())
    return datasette


def get(ds: t.Any, path: str, **params: str) -> t.Any:
    url = f"{path}?{urllib.parse.urlencode(params)}" if params else path
    response = asyncio.run(ds.client.get(url))
    assert response.status_code == 200, response.text
    return response.json()


def canned(ds: t.Any, name: str, **params: str) -> list[dict[str, t.Any]]:
    return get(ds, f"/groups/{name}.json", **params, _shape="array")


# ------------------------------------------------------------------- metadata


def test_the_config_copy_is_the_shipped_metadata() -> None:
    assert (ROOT / "config" / "datasette-metadata.json").read_text() == METADATA_FILE.read_text()


def test_every_user_facing_table_and_column_is_described_and_the_rest_hidden(ds: t.Any, history: Scenario) -> None:
    tables = get(ds, "/groups.json")["tables"]
    shown = {t["name"] for t in tables if not t["hidden"]}
    assert shown == {name for name in USER_FACING if name in {t["name"] for t in tables}}
    views = {v["name"] if isinstance(v, dict) else v for v in get(ds, "/groups.json")["views"]}
    described = json.loads(METADATA_FILE.read_text())["databases"]["groups"]["tables"]
    for name in shown | (views & USER_FACING):
        assert described[name]["description"], name
        columns = [r["name"] for r in history.env.query(f"PRAGMA table_info([{name}])")]
        assert columns, name
        missing = [c for c in columns if not described[name]["columns"].get(c)]
        assert not missing, f"{name}: columns without a description: {missing}"
    assert shown | views >= USER_FACING  # every documented name is there, none hidden
    assert {t["name"] for t in tables if t["hidden"]} >= {"_sqlite_migrations", "sqlite_sequence"}


# ------------------------------------------------------------------- canned queries


@pytest.mark.parametrize("run_id", [2, 3, 4, 5])
def test_members_as_of(ds: t.Any, history: Scenario, run_id: int) -> None:
    truth = history.truths[run_id]
    for gid in truth.groups:
        rows = canned(ds, "members_as_of", group=gid, at=truth.started_at)
        assert {r["identity_id"] for r in rows} == set(truth.members(gid)), gid
        assert {(r["run_id"], r["group_name"]) for r in rows} <= {(run_id, truth.groups[gid].name)}
    latest = canned(ds, "members_as_of", group=LONG_NAME, at="")
    assert {r["identity_id"] for r in latest} == set(history.truths[5].members(history.a))


def test_events_between(ds: t.Any, history: Scenario) -> None:
    third = history.truths[3]
    rows = canned(ds, "events_between", since=third.started_at, until=third.started_at)
    assert rows and {r["run_id"] for r in rows} == {3}
    joined = {r["identity_id"] for r in rows if r["reason"] == "joined"}
    assert history.joiner in joined
    everything = canned(ds, "events_between", since=history.truths[2].started_at, until="")
    assert {r["run_id"] for r in everything} == {3, 4, 5}  # run 2 is observations only
    assert all(r["reason"] in ("joined", "left", "changed") for r in everything)


def test_identity_history(ds: t.Any, history: Scenario) -> None:
    for user in (history.username(history.p), history.p):
        rows = canned(ds, "identity_history", user=user)
        assert {(r["group_id"], r["role"], r["status"], r["from"], r["to"]) for r in rows} == versions(
            history.truths, history.p)


def test_admins_and_managers_list_groups_with_hidden_members_too(ds: t.Any, history: Scenario) -> None:
    truth = history.truths[5]
    expected = {
        (gid, iid, role) for (gid, iid), (role, status) in truth.state.items()
        if role in ("admin", "manager") and status == "active"
    } | {(gid, None, "members not visible") for gid, g in truth.groups.items() if not g.members_visible}
    rows = canned(ds, "admins_and_managers", group="")
    assert {(r["group_id"], r["identity_id"], r["role"]) for r in rows} == expected
    only_a = canned(ds, "admins_and_managers", group=LONG_NAME)
    assert {r["group_id"] for r in only_a} == {history.a}


def test_group_sizes_over_time(ds: t.Any, history: Scenario) -> None:
    rows = canned(ds, "group_sizes", group=history.a)
    assert [(r["run_id"], r["active_members"]) for r in rows] == [
        (k, history.truths[k].groups[history.a].active_members) for k in sorted(history.truths)
    ]
    hidden = canned(ds, "group_sizes", group=history.c)
    assert hidden[-1]["members_visible"] == 0 and hidden[-1]["active_members"] is None


def test_runs_and_failures(ds: t.Any) -> None:
    rows = canned(ds, "runs_and_failures", status="")
    assert [(r["id"], r["status"]) for r in rows] == [(5, "ok"), (4, "partial"), (3, "ok"), (2, "ok"), (1, "failed")]
    failed = canned(ds, "runs_and_failures", status="partial")
    assert len(failed) == 1 and failed[0]["groups_failed"] == 1 and failed[0]["failed_groups"]


# ------------------------------------------------------------------- syncer serve


def test_serve_without_datasette_says_how_to_install_it(history: Scenario, tmp_path: Path) -> None:
    shim = tmp_path / "shim" / "datasette"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('datasette is not installed here')\n")
    variables = {**history.env.vars, "PYTHONPATH": f"{shim.parent}:{history.env.vars['PYTHONPATH']}"}
    proc = subprocess.run([sys.executable, "-m", "syncer", "serve"],
                          env=variables, cwd=history.env.tmp, text=True, capture_output=True, timeout=60)
    record(proc.stdout, proc.stderr)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == f"syncer: error: Datasette is not installed; install it with: {INSTALL_HINT}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def test_members_as_of_page_in_headless_chromium(history: Scenario) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    env: Env = history.env
    port = _free_port()
    server = env.popen("serve", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.poll() is not None or _up(f"{base}/-/versions.json"), what="syncer serve")
        assert server.poll() is None, server.communicate()
        query = urllib.parse.urlencode({"group": LONG_NAME, "at": history.truths[3].started_at})
        url = f"{base}/groups/members_as_of?{query}"
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "members_as_of.png"
        shot.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={profile}", "--window-size=1400,1000"]
            dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
            assert dom.returncode == 0, dom.stderr
            subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=120,
                           check=True)
    finally:
        server.terminate()
        server.communicate(timeout=30)
    assert "Members of a group as of a date" in dom.stdout
    for iid in history.truths[3].members(history.a):
        assert history.username(iid) in dom.stdout
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
