"""`syncer report`, run as a user runs it against a database made by real syncs with
changes between them (tests/history_scenario.py): its numbers against what
`syncer members/changes/groups` say for the same period, its errors, and the file
in a real headless Chromium at desktop and phone widths (no request, no console
error; the screenshots are kept in tests/artifacts/)."""

from __future__ import annotations

import collections
import html.parser
import json
import sqlite3
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
from browser import Browser, chromium_path
from conftest import Env, Result, record
from helpers import admin_groups
from history_scenario import LONG_NAME, Scenario

from syncer.audit_report import INSTALL_HINT

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


class Page(html.parser.HTMLParser):
    """The report's tables by id (rows of cell texts), its header's fields, and its tags."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.header: dict[str, str] = {}
        self.tags: collections.Counter[str] = collections.Counter()
        self.attrs_seen: list[tuple[str, str, str | None]] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._in_head = False
        self._dt: str | None = None
        self._text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        self.attrs_seen += [(tag, name, value) for name, value in attrs]
        if tag == "table":
            self._table = dict(attrs).get("id") or f"table-{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "thead":
            self._in_head = True
        elif tag == "tr" and self._table and not self._in_head:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag in ("dt", "dd"):
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "thead":
            self._in_head = False
        elif tag == "td" and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "dt":
            self._dt = "".join(self._text)
        elif tag == "dd" and self._dt:
            self.header[self._dt] = "".join(self._text)

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        self._text.append(data)


def report(env: Env, out: Path, *args: str) -> tuple[Result, Page | None]:
    result = env.run("report", *args, "--output", str(out))
    assert "Traceback" not in result.output
    return result, Page(out.read_text()) if result.returncode == 0 else None


def as_json(env: Env, *args: str) -> list[dict[str, t.Any]]:
    result = env.run(*args, "--format", "json")
    assert result.returncode == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def whole(history: Scenario, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Page]:
    """The default report (the last 90 days, the largest groups) on the five-run history."""
    out = tmp_path_factory.mktemp("report") / "report.html"
    result, page = report(history.env, out)
    assert result.returncode == 0, result.output
    assert result.stdout.startswith(f"wrote {out} (") and not result.stderr
    assert page is not None
    return out, page


def _kind(reason: str | None) -> str:
    return reason if reason in ("joined", "left", "changed") else "unknown"


# ------------------------------------------------------------------- numbers


def test_events_equal_syncer_changes_for_the_same_period(history: Scenario, whole: tuple[Path, Page]) -> None:
    _, page = whole
    changes = as_json(history.env, "changes", "--since", "90d")
    assert changes, "the scenario records events"
    shown = [(int(r[1]), r[2], r[3], r[5]) for r in page.tables["events"]]
    assert shown == [(c["run_id"], c["group_name"], c["username"], c["reason"]) for c in changes]
    # the group's name at the time: the rename of A shows its long name from run 3 on
    assert any(name == LONG_NAME for _, name, _, _ in shown)
    by_week = collections.Counter(_kind(c["reason"]) for c in changes)
    weeks = page.tables["events-per-week"]
    assert sum(int(w[-1]) for w in weeks) == len(changes)
    assert sum(int(w[1]) for w in weeks) == by_week["joined"]
    assert sum(int(w[2]) for w in weeks) == by_week["left"]
    assert sum(int(w[3]) for w in weeks) == by_week["changed"]


def test_movers_count_each_persons_and_groups_events(history: Scenario, whole: tuple[Path, Page]) -> None:
    _, page = whole
    changes = as_json(history.env, "changes", "--since", "90d")
    per_person = collections.Counter(c["username"] for c in changes)
    people = page.tables["movers-people"]
    assert {r[0]: int(r[-1]) for r in people} == dict(per_person.most_common(10))
    assert [int(r[-1]) for r in people] == sorted((int(r[-1]) for r in people), reverse=True)
    per_group = collections.Counter(c["group_id"] for c in changes)
    groups = as_json(history.env, "groups")
    names = {g["id"]: g["name"] for g in groups}
    assert {r[0]: int(r[-1]) for r in page.tables["movers-groups"]} == {names[g]: n for g, n in per_group.items()}


def test_groups_at_the_end_equal_syncer_groups(history: Scenario, whole: tuple[Path, Page]) -> None:
    _, page = whole
    groups = as_json(history.env, "groups")
    shown = [(r[0], r[1], r[2], r[3], r[4] == "yes", None if r[5] == "not visible" else int(r[5]))
             for r in page.tables["groups"]]
    assert shown == [(g["id"], g["name"], g["my_role"], g["my_status"], bool(g["members_visible"]), g["active_members"])
                     for g in groups]
    # the policies the database keeps, as of the period's end
    assert all(len(r) >= 8 and r[6] and r[7] for r in page.tables["groups"])


def test_active_members_over_time_equal_syncer_members_at_each_run(history: Scenario, whole: tuple[Path, Page]) -> None:
    _, page = whole
    rows = page.tables["members-over-time"]
    groups = as_json(history.env, "groups")
    largest = sorted((g for g in groups if g["active_members"] is not None),
                     key=lambda g: (-g["active_members"], g["name"], g["id"]))[:5]
    assert {r[0] for r in rows} == {g["id"] for g in largest}
    for gid, _name, run, _at, active in rows:
        assert int(active) == len(as_json(history.env, "members", gid, "--at", f"run:{run}")), (gid, run)
    # A changed in runs 3 and 4: its series has a point at each of its successful runs
    if history.a in {g["id"] for g in largest}:
        assert {int(r[2]) for r in rows if r[0] == history.a} == {2, 3, 4, 5}


def test_runs_and_failures_equal_sync_runs(history: Scenario, whole: tuple[Path, Page]) -> None:
    _, page = whole
    runs = history.env.query("SELECT id, status, error FROM sync_runs ORDER BY id")
    per_status = collections.Counter(r["status"] for r in runs)
    table = page.tables["runs-per-day"]
    assert sum(int(r[-1]) for r in table) == len(runs)
    assert sum(int(r[1]) for r in table) == per_status["ok"]
    assert sum(int(r[2]) for r in table) == per_status["partial"] == 1
    assert sum(int(r[3]) for r in table) == per_status["failed"] == 1
    failures = {(r[0], r[1], int(r[2])) for r in page.tables["failures"]}
    failed = history.env.query("SELECT error FROM sync_runs WHERE status = 'failed'")[0]["error"]
    b_name = history.truths[3].groups[history.b].name
    partial = json.loads(history.env.query("SELECT failed_groups FROM sync_runs WHERE status = 'partial'")[0][0])
    assert failures == {("failed", failed, 1), ("partial", f"group {b_name} ({history.b}): {partial[history.b]}", 1)}
    assert list(partial) == [history.b] and failed


def test_header_says_whose_which_database_which_period_and_when(history: Scenario, whole: tuple[Path, Page]) -> None:
    from syncer.storage.database import open_for_reading
    from syncer.storage.ownership import database_owner, describe_owner

    _, page = whole
    with open_for_reading(history.env.database) as db:
        owner = database_owner(db)
    assert owner is not None and owner.id == history.world.me
    assert page.header["Identity"] == f"{describe_owner(owner)}, recorded by run {owner.recorded_by_run}"
    assert page.header["Database"] == str(history.env.database)
    assert "--since 90d, --until now" in page.header["Period"] and "runs 1\u20135" in page.header["Period"]
    assert page.header["Generated"].endswith(" UTC by syncer " + __import__("syncer").__version__)


def test_a_database_without_a_recorded_owner_says_so(history: Scenario, tmp_path: Path) -> None:
    """A database from before owners were recorded (the row is gone from a copy of the history)."""
    copy = tmp_path / "old.db"
    source = sqlite3.connect(history.env.database)
    try:
        target = sqlite3.connect(copy)
        source.backup(target)
        target.execute("DELETE FROM database_owner")
        target.commit()
        target.close()
    finally:
        source.close()
    out = tmp_path / "r.html"
    result = history.env.run("--config", str(_config_for(tmp_path, copy)), "report", "--output", str(out))
    assert result.returncode == 0, result.output
    header = Page(out.read_text()).header
    assert header["Identity"] == "this database has no recorded owner yet (the next successful syncer sync records it)"


def _config_for(folder: Path, database: Path) -> Path:
    config = folder / "other.toml"
    config.write_text(f'database = "{database}"\ntoken_storage = "{folder / "tokens.db"}"\n')
    return config


def test_the_file_loads_nothing(whole: tuple[Path, Page]) -> None:
    out, page = whole
    text = out.read_text()
    assert page.tags["script"] == 0 and page.tags["link"] == 0 and page.tags["img"] == 0 and page.tags["iframe"] == 0
    fetching = [(tag, name, value) for tag, name, value in page.attrs_seen
                if name in ("src", "href", "xlink:href", "srcset", "action", "data") and value]
    assert fetching == []
    assert "@import" not in text and "url(" not in text
    assert "default-src 'none'" in text  # the browser itself refuses to fetch anything
    # every chart's every mark says its number
    assert page.tags["svg"] >= 4 and page.tags["title"] > page.tags["svg"]
    assert out.stat().st_size < 1024 * 1024


# ---------------------------------------------------------------- one group


def test_one_group_between_two_runs(history: Scenario, tmp_path: Path) -> None:
    env = history.env
    result, page = report(env, tmp_path / "a.html", "--group", LONG_NAME, "--since", "run:3", "--until", "run:4")
    assert result.returncode == 0, result.output
    assert page is not None
    changes = as_json(env, "changes", "--since", "run:3", "--until", "run:4", "--group", LONG_NAME)
    assert [(int(r[1]), r[3], r[5]) for r in page.tables["events"]] == [
        (c["run_id"], c["username"], c["reason"]) for c in changes]
    assert {int(r[1]) for r in page.tables["events"]} == {3, 4}
    groups = [g for g in as_json(env, "groups", "--at", "run:4") if g["id"] == history.a]
    assert [(r[0], r[1], int(r[5])) for r in page.tables["groups"]] == [
        (g["id"], g["name"], g["active_members"]) for g in groups]
    series = page.tables["members-over-time"]
    assert {r[0] for r in series} == {history.a}
    for _gid, _name, run, _at, active in series:
        assert int(active) == len(as_json(env, "members", history.a, "--at", f"run:{run}"))
    assert page.header["Scope"] == f"group {LONG_NAME} ({history.a})"


def test_a_period_without_runs_reports_nothing_happened(history: Scenario, tmp_path: Path) -> None:
    result, page = report(history.env, tmp_path / "none.html", "--since", "2099-01-01", "--until", "2099-02-01")
    assert result.returncode == 0, result.output
    assert page is not None and "events" not in page.tables
    assert page.tables["runs-per-day"] and all(r[-1] == "0" for r in page.tables["runs-per-day"])
    # the groups as of the period's end: the latest run, as `syncer groups --at 2099-02-01` says
    assert len(page.tables["groups"]) == len(as_json(history.env, "groups", "--at", "2099-02-01"))


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(("args", "code", "message"), [
    (("--group", "no such group"), 1, "unknown group 'no such group'"),
    (("--since", "yesterday"), 2, "bad WHEN 'yesterday'"),
    (("--since", "run:99"), 2, "there is no run 99"),
    (("--since", "run:4", "--until", "run:2"), 2, "--until is before --since 'run:4'"),
    (("--since", "2026-13-01"), 2, "bad WHEN '2026-13-01'"),
], ids=["unknown-group", "bad-when", "missing-run", "until-before-since", "bad-date"])
def test_errors_are_one_line_with_the_query_commands_codes(
    history: Scenario, tmp_path: Path, args: tuple[str, ...], code: int, message: str,
) -> None:
    out = tmp_path / "r.html"
    result = history.env.run("report", *args, "--output", str(out))
    assert result.returncode == code, result.output
    assert result.stderr.startswith("syncer: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_without_output_it_says_so_in_one_line(history: Scenario) -> None:
    result = history.env.run("report", "--since", "7d")
    assert result.returncode == 2
    assert result.stderr == "syncer: error: --output FILE is required: the HTML file to write\n"


def test_an_ambiguous_group_name_lists_the_ids(history: Scenario, tmp_path: Path) -> None:
    result = history.env.run("report", "--group", history.a_old_name, "--output", str(tmp_path / "r.html"))
    assert result.returncode == 1 and "ambiguous" in result.stderr
    assert history.a in result.stderr and history.d in result.stderr


def test_no_database_is_exit_1_and_a_missing_folder_exit_2(env: Env, history: Scenario, tmp_path: Path) -> None:
    result = env.run("report", "--output", str(tmp_path / "r.html"))
    assert result.returncode == 1 and "no database at" in result.stderr and "Traceback" not in result.output
    result = history.env.run("report", "--output", str(tmp_path / "missing" / "r.html"))
    assert result.returncode == 2 and result.stderr.startswith("syncer: error: --output ")
    assert "does not exist" in result.stderr


def test_no_successful_run_yet_is_exit_1(logged_in: Env, tmp_path: Path) -> None:
    for gid in logged_in.world.groups:
        logged_in.sim.faults.set_group_error(gid, 403)
    assert logged_in.run("sync").returncode == 1
    result = logged_in.run("report", "--output", str(tmp_path / "r.html"))
    assert result.returncode == 1 and "no successful run recorded yet" in result.stderr


def test_without_pygal_it_says_how_to_install_it(history: Scenario, tmp_path: Path) -> None:
    shim = tmp_path / "shim" / "pygal"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('pygal is not installed here')\n")
    variables = {**history.env.vars, "PYTHONPATH": f"{shim.parent}:{history.env.vars['PYTHONPATH']}"}
    proc = subprocess.run([sys.executable, "-m", "syncer", "report", "--output", str(tmp_path / "r.html")],
                          env=variables, cwd=history.env.tmp, text=True, capture_output=True, timeout=60)
    record(proc.stdout, proc.stderr)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == ("syncer: error: the report's charts need pygal, which is not installed;"
                                   f" install it with: {INSTALL_HINT}")


# ------------------------------------------------------------ in a browser


@pytest.mark.parametrize(("width", "height", "mobile"), [(1280, 900, False), (390, 844, True)], ids=["desktop", "phone"])
def test_chromium_renders_it_offline_without_errors(whole: tuple[Path, Page], width: int, height: int, mobile: bool) -> None:
    if chromium_path() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    out, page = whole
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"report-{'phone' if mobile else 'desktop'}.png"
    shot.unlink(missing_ok=True)
    with Browser() as browser:
        visit = browser.visit(out.as_uri(), width, height, mobile=mobile, screenshot=shot)
    assert visit.requests == [out.as_uri()]  # the page itself, nothing else
    assert visit.console == []
    # every <title> in the file is a mark's, but the page's own and each chart's (pygal's)
    assert visit.layout["svgs"] == page.tags["svg"] >= 4
    assert visit.layout["titledMarks"] == page.tags["title"] - 1 - page.tags["svg"] > 0
    # the page never scrolls sideways as a whole: wide charts and tables scroll in their own boxes
    assert visit.layout["scrollWidth"] <= visit.layout["innerWidth"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


# ------------------------------------------------------------ end to end


def test_a_hostile_group_name_is_shown_as_text(logged_in: Env, tmp_path: Path) -> None:
    """Two real syncs with a rename and a join between them; the name that would be
    markup (and holds a control character) reads as text in every table and chart."""
    env = logged_in
    assert env.run("sync").returncode == 0
    gid = admin_groups(env.world)[0]
    name = '<script>alert("x")</script> & Lab\x07'
    env.world.rename_group(gid, name)
    joiner = env.world.add_member(gid)
    assert env.run("sync").returncode == 0
    out = tmp_path / "r.html"
    result, page = report(env, out, "--group", gid, "--since", "1d")
    assert result.returncode == 0, result.output
    assert page is not None and page.tags["script"] == 0
    shown = name.replace("\x07", "\\x07")
    assert page.header["Scope"] == f"group {shown} ({gid})"
    assert [(r[2], r[3], r[5]) for r in page.tables["events"]] == [
        (shown, env.world.identities[joiner]["username"], "joined")]
    assert [r[1] for r in page.tables["groups"]] == [shown]
    assert "\x07" not in out.read_text()
