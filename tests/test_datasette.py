"""Datasette on syncer's database: the metadata, every canned query through Datasette's
own in-process client, `syncer serve` in a real headless Chromium, and the message
when Datasette is not installed."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import socket
import subprocess
import sys
import typing as t
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from browser import Browser, chromium_path
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
    # syncer's own tables are not even listed as hidden: they cannot be viewed at all
    assert {t["name"] for t in tables} | views == USER_FACING


def internal_names(history: Scenario) -> list[str]:
    """Every table and view in the file that SPEC does not document."""
    rows = history.env.query("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') ORDER BY name")
    return [r["name"] for r in rows if r["name"] not in USER_FACING]


def status_of(ds: t.Any, path: str) -> int:
    return int(asyncio.run(ds.client.get(path)).status_code)


def test_internal_tables_cannot_be_reached_by_url(ds: t.Any, history: Scenario) -> None:
    internal = internal_names(history)
    # the storage behind the views, the migrations, hook state, SQLite's own
    assert {"_sqlite_migrations", "hook_deliveries", "membership_state", "sqlite_sequence"} <= set(internal)
    for name in internal:
        quoted = urllib.parse.quote(name)
        for path in (f"/groups/{quoted}", f"/groups/{quoted}.json", f"/groups/{quoted}.csv",
                     f"/groups/{quoted}/1.json", f"/groups/{quoted}.json?_shape=array&_size=max",
                     f"/groups/{urllib.parse.quote(name.upper())}.json"):
            assert status_of(ds, path) in (403, 404), path
    assert status_of(ds, "/groups.db") in (403, 404)  # no download of the whole file
    for name in USER_FACING:  # the documented ones stay open
        assert status_of(ds, f"/groups/{name}.json") == 200, name


def test_arbitrary_sql_is_off_unless_allowed(ds: t.Any, history: Scenario) -> None:
    assert status_of(ds, "/groups.json?sql=select+1") == 403
    assert status_of(ds, "/groups/sync_runs.json?_where=id>1") == 403
    open_sql = make_datasette(history.env.database, allow_sql=True)
    asyncio.run(open_sql.invoke_startup())

    def ask(sql: str) -> t.Any:
        return asyncio.run(open_sql.client.get(f"/groups.json?{urllib.parse.urlencode({'sql': sql})}"))

    counted = ask("select count(*) from membership_history")
    assert counted.status_code == 200 and counted.json()["rows"][0][0] > 0
    # the documented views read the storage tables behind them; a visitor's SQL may not
    for name in internal_names(history):
        for sql in (f"select * from [{name}]", f"select rowid from [{name}]",
                    f"select 1 from groups where exists (select * from [{name}])"):
            refused = ask(sql)
            assert refused.status_code == 400 and not refused.json()["rows"], sql
            if sql.startswith("select *"):
                assert f"access to {name}." in refused.json()["error"], sql
    for name in internal_names(history):  # and the internal tables stay unreachable by URL
        assert asyncio.run(open_sql.client.get(f"/groups/{urllib.parse.quote(name)}.json")).status_code in (403, 404)


def error_of(ds: t.Any, name: str, **params: str) -> str:
    """The error a canned query shows for these parameters (HTTP 400, never rows)."""
    response = asyncio.run(ds.client.get(f"/groups/{name}.json?{urllib.parse.urlencode(params)}"))
    body = response.json()
    assert response.status_code == 400 and body["ok"] is False and not body["rows"], body
    return str(body["error"])


def as_of_run(ds: t.Any, history: Scenario, at: str) -> set[int]:
    return {r["run_id"] for r in canned(ds, "members_as_of", group=history.a, at=at)}


def test_members_as_of_takes_every_form_of_when_the_cli_takes(ds: t.Any, history: Scenario) -> None:
    third = dt.datetime.fromisoformat(history.truths[3].started_at)
    assert as_of_run(ds, history, history.truths[3].started_at) == {3}
    assert as_of_run(ds, history, third.astimezone(dt.timezone(dt.timedelta(hours=5))).isoformat()) == {3}
    assert as_of_run(ds, history, third.astimezone(dt.timezone(dt.timedelta(hours=-7))).isoformat()) == {3}
    assert as_of_run(ds, history, "run:3") == {3}
    assert as_of_run(ds, history, "run:4") == {4}  # the partial run answers for itself
    assert as_of_run(ds, history, "0s") == {5}
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).date().isoformat()
    assert as_of_run(ds, history, tomorrow) == {5}
    assert as_of_run(ds, history, "") == {5}


def test_a_bad_when_is_an_error_never_another_answer(ds: t.Any, history: Scenario) -> None:
    second = dt.datetime.fromisoformat(history.truths[2].started_at)
    before_first = (second - dt.timedelta(minutes=1)).astimezone(dt.timezone(dt.timedelta(hours=5))).isoformat()
    for at, message in [
        ("yesterday", "bad WHEN 'yesterday': not a date, date-time, span or run"),
        ("7 days", "bad WHEN '7 days'"),
        ("2026-06-01T09:30", "a date-time needs Z or an offset"),
        ("2026-02-30", "bad WHEN '2026-02-30'"),
        ("run:99", "there is no run 99 (runs 1-5)"),
        ("run:1", "nothing recorded as of run:1: the first successful run (run 2) started"),
        ("400d", "too long"),
        ("300d", "nothing recorded as of 300d"),
        (before_first, f"nothing recorded as of {before_first}"),
        ("1999-01-01", "nothing recorded as of 1999-01-01"),
    ]:
        assert message in error_of(ds, "members_as_of", group=history.a, at=at), at
    assert "bad WHEN 'last week'" in error_of(ds, "events_between", since="last week", until="")
    assert "there is no run 42" in error_of(ds, "events_between", since="run:2", until="run:42")


def test_an_ambiguous_or_unknown_group_is_an_error_listing_the_ids(ds: t.Any, history: Scenario) -> None:
    for name in ("members_as_of", "group_sizes", "admins_and_managers"):
        params = {"group": history.a_old_name, **({"at": ""} if name == "members_as_of" else {})}
        error = error_of(ds, name, **params)
        assert f"group name {history.a_old_name!r} is ambiguous: 2 groups have or had it" in error, name
        assert history.a in error and history.d in error and "give the id" in error
        unknown = error_of(ds, name, **{**params, "group": "No Such Group"})
        assert "unknown group 'No Such Group'" in unknown
    # each id still answers, and a unique old name finds its group
    assert {r["group_id"] for r in canned(ds, "admins_and_managers", group=history.d)} == {history.d}
    assert "unknown user 'nobody@example.org'" in error_of(ds, "identity_history", user="nobody@example.org")


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


def test_plain_datasette_with_the_config_copy_checks_parameters_too(history: Scenario) -> None:
    """`datasette groups.db -m config/datasette-metadata.json` where syncer is installed:
    the canned queries' magic parameters come with syncer's plugin (its entry point)."""

    def get(path: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "datasette", "serve", str(history.env.database),
             "-m", str(ROOT / "config" / "datasette-metadata.json"), "--get", path],
            capture_output=True, text=True, timeout=120,
        )

    answer = get("/groups/members_as_of.json?" + urllib.parse.urlencode(
        {"group": history.a, "at": "run:3", "_shape": "array"}))
    assert answer.returncode == 0, answer.stderr
    assert {r["identity_id"] for r in json.loads(answer.stdout)} == set(history.truths[3].members(history.a))
    refused = get("/groups/members_as_of.json?" + urllib.parse.urlencode({"group": history.a, "at": "yesterday"}))
    assert "bad WHEN 'yesterday'" in refused.stdout


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


@pytest.fixture(scope="module")
def browser() -> t.Iterator[Browser]:
    """One headless Chromium for the page tests (tests/browser.py)."""
    if chromium_path() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    with Browser() as chromium:
        yield chromium


def test_members_as_of_page_in_headless_chromium(history: Scenario, browser: Browser) -> None:
    query = urllib.parse.urlencode({"group": LONG_NAME, "at": history.truths[3].started_at})
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "members_as_of.png"
    shot.unlink(missing_ok=True)
    with serving(history.env) as base:
        dom = browse(browser, f"{base}/groups/members_as_of?{query}", shot)
    assert "Members of a group as of a date" in dom
    for iid in history.truths[3].members(history.a):
        assert history.username(iid) in dom
    assert shot.stat().st_size > 10_000


@contextlib.contextmanager
def serving(env: Env, *options: str) -> t.Iterator[str]:
    """`syncer serve` on a free port with ``options``, until the block ends; yields its base URL."""
    port = _free_port()
    server = env.popen("serve", "--port", str(port), *options)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.poll() is not None or _up(f"{base}/-/versions.json"), what="syncer serve")
        assert server.poll() is None, server.communicate()
        yield base
    finally:
        server.terminate()
        server.communicate(timeout=30)


def browse(browser: Browser, url: str, shot: Path) -> str:
    """The page at ``url`` as headless Chromium renders it at 1400x1000 (its DOM), with a screenshot."""
    visit = browser.visit(url, 1400, 1000, screenshot=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return visit.html


def test_serve_in_headless_chromium_shows_errors_and_hides_internal_tables(
    history: Scenario, tmp_path: Path, browser: Browser,
) -> None:
    env: Env = history.env
    with serving(env) as base:
        ambiguous = browse(browser, f"{base}/groups/members_as_of?" + urllib.parse.urlencode(
            {"group": history.a_old_name, "at": "run:3"}), tmp_path / "ambiguous.png")
        bad_when = browse(browser, f"{base}/groups/members_as_of?" + urllib.parse.urlencode(
            {"group": history.a, "at": "yesterday"}), tmp_path / "bad-when.png")
        index = browse(browser, f"{base}/groups", tmp_path / "index.png")
        internal = browse(browser, f"{base}/groups/hook_deliveries", tmp_path / "internal.png")
        no_sql = browse(browser, f"{base}/groups?sql=select+*+from+sync_runs", tmp_path / "no-sql.png")
    assert "is ambiguous: 2 groups have or had it" in ambiguous and history.a in ambiguous and history.d in ambiguous
    assert "bad WHEN &#39;yesterday&#39;" in bad_when or "bad WHEN 'yesterday'" in bad_when
    for page in (ambiguous, bad_when):  # an error instead of rows, never another question's answer
        assert all(history.username(iid) not in page for iid in history.truths[5].members(history.a))
    assert "membership_changes" in index and "Members of a group as of a date" in index
    for name in internal_names(history):
        assert f'/groups/{name}"' not in index, name
    assert "Forbidden" in internal and "delivered_run" not in internal
    assert "Forbidden" in no_sql

    with serving(env, "--allow-sql") as base:
        own_sql = browse(browser, f"{base}/groups?" + urllib.parse.urlencode(
            {"sql": "select status, count(*) as n from sync_runs group by status"}), tmp_path / "own-sql.png")
        sneaky = browse(browser, f"{base}/groups?" + urllib.parse.urlencode(
            {"sql": "select * from hook_deliveries"}), tmp_path / "sneaky-sql.png")
        still_hidden = browse(browser, f"{base}/groups/hook_deliveries.json", tmp_path / "still-hidden.png")
    assert "partial" in own_sql and "failed" in own_sql
    assert "access to hook_deliveries." in sneaky and "is prohibited" in sneaky
    assert "Forbidden" in still_hidden or "403" in still_hidden
