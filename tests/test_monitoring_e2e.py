"""End to end: healthcheck pings, the metrics file and `status --format prometheus`, what
hooks get to see, and the hook settings' checks (issue 15)."""

from __future__ import annotations

import json
import re
import stat
import threading
import time
import typing as t
from pathlib import Path

import conftest
import pytest
from conftest import Env
from helpers import admin_groups, my_active_groups, others
from prometheus_client.parser import text_string_to_metric_families
from receivers import CommandHook, Receiver, Silent, configure, watch_everything

from syncer.config import HookConfig
from syncer.operations.healthcheck import ping_url
from syncer.operations.hooks import hook_environment
from syncer.operations.lock import LockFile

REQUIRED_METRICS = {
    "syncer_last_run_timestamp_seconds", "syncer_last_success_timestamp_seconds", "syncer_last_run_duration_seconds",
    "syncer_last_run_exit_code", "syncer_groups", "syncer_memberships", "syncer_last_run_changes",
    "syncer_last_run_groups_failed", "syncer_hook_backlog_runs",
}



@pytest.fixture
def receiver() -> t.Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def break_every_group(env: Env) -> None:
    for gid in my_active_groups(env.world):
        env.sim.faults.set_group_error(gid, 404)  # final at once, not retried


def test_pings_arrive_in_order_with_each_outcomes_path(logged_in: Env, receiver: Receiver) -> None:
    env = logged_in
    configure(env, healthcheck_url=f"{receiver.url}/ping/abc")
    expected: list[str] = []
    outcomes = [
        ("ok", 0, "/ping/abc"), ("partial", 3, "/ping/abc/3"), ("failed", 1, "/ping/abc/1"), ("login", 77, "/ping/abc/77"),
    ]
    for outcome, code, path in outcomes:
        if outcome == "partial":
            env.sim.faults.set_group_error(admin_groups(env.world)[0], 404)
        if outcome == "failed":
            break_every_group(env)
        if outcome == "login":
            env.sim.faults.clear()
            env.sim.expire_access_tokens()
            env.sim.revoke_all_refresh_tokens(status=400)
        result = env.run("sync")
        assert result.returncode == code, result.output
        expected += ["/ping/abc/start", path]
        assert receiver.paths() == expected
    assert {r.method for r in receiver.requests} == {"GET"}

    # another sync holding the lock: this one did nothing, and says nothing (the holder pings)
    with LockFile(env.database.with_name("groups.db.lock")):
        assert env.run("sync").returncode == 75
    assert receiver.paths() == expected


def test_a_dead_ping_url_costs_at_most_its_timeout(logged_in: Env) -> None:
    env = logged_in
    silent = Silent()
    try:
        configure(env, healthcheck_url=silent.url)
        began = time.monotonic()
        result = env.run("sync")
        took = time.monotonic() - began
    finally:
        silent.close()
    assert result.returncode == 0, result.output
    assert "healthcheck ping /start: no answer after " in result.stderr
    assert "healthcheck ping (success): no answer after 10s" in result.stderr
    assert silent.url not in result.output
    # both pings were sent, in order; the start ping waited alongside the run
    assert silent.request_lines == ["GET /ping/start HTTP/1.1", "GET /ping HTTP/1.1"]
    assert 10 <= took < 10 + 8  # the end ping's 10 s, and a sync's own few seconds


def test_the_metrics_file_parses_after_ok_partial_and_failed_runs(logged_in: Env) -> None:
    env, world = logged_in, logged_in.world
    folder = env.tmp / "textfile"
    folder.mkdir()
    metrics = folder / "syncer.prom"
    hook = CommandHook(env.tmp, "events", mode="fail")
    configure(env, {"name": "events", "command": hook.command}, metrics_file="textfile/syncer.prom")

    seen: list[str] = []
    stop = threading.Event()

    def read_all_the_time() -> None:  # a textfile collector, reading while runs rewrite the file
        while not stop.is_set():
            if metrics.exists():
                seen.append(metrics.read_text())

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        assert env.run("sync").returncode == 0
        first = parse(metrics.read_text())
        g1 = admin_groups(world)[0]
        world.add_member(g1)
        world.remove_member(g1, others(world, g1)[0])
        env.sim.faults.set_group_error(admin_groups(world)[1], 404)
        assert env.run("sync").returncode == 3
        second = parse(metrics.read_text())
        break_every_group(env)
        assert env.run("sync").returncode == 1
        third = parse(metrics.read_text())
    finally:
        stop.set()
        reader.join()

    assert all(set(families) >= REQUIRED_METRICS for families in (first, second, third))
    runs = env.query("SELECT * FROM sync_runs ORDER BY id")
    assert first["syncer_last_run_exit_code"] == {(): 0}
    assert first["syncer_groups"] == {(): len(my_active_groups(world))}
    assert first["syncer_memberships"] == {(): runs[0]["memberships"]}
    assert first["syncer_last_run_changes"] == {(): runs[0]["changes"]}
    assert first["syncer_hook_backlog_runs"] == {(("hook", "events"),): 0}
    assert second["syncer_last_run_exit_code"] == {(): 3} and second["syncer_last_run_groups_failed"] == {(): 1}
    assert second["syncer_last_run_changes"] == {(): 2}
    assert second["syncer_hook_backlog_runs"] == {(("hook", "events"),): 1}  # the failing hook is behind
    assert second["syncer_status_exit_code"] == {(): 3}
    assert third["syncer_last_run_exit_code"] == {(): 1}
    assert third["syncer_last_run_groups_failed"] == {(): len(my_active_groups(world))}
    # the last success is still run 2's start, the last run is run 3's
    assert third["syncer_last_success_timestamp_seconds"] == second["syncer_last_run_timestamp_seconds"]
    assert third["syncer_last_run_timestamp_seconds"][()] > second["syncer_last_run_timestamp_seconds"][()]
    assert 0 <= third["syncer_last_run_duration_seconds"][()] < 60

    assert stat.S_IMODE(metrics.stat().st_mode) == 0o644
    assert [p.name for p in folder.iterdir()] == ["syncer.prom"]  # no temporary file left behind
    assert seen and all(set(parse(text)) >= REQUIRED_METRICS for text in seen)  # never half written

    shown = env.run("status", "--format", "prometheus")
    assert shown.returncode == 1  # the latest run failed
    # the same figures, but for when the run ended, which only its own process knows
    assert parse(shown.stdout) == {k: v for k, v in third.items() if k != "syncer_last_run_end_timestamp_seconds"}
    for family in text_string_to_metric_families(shown.stdout):
        assert family.documentation and family.type == "gauge"
    assert "# HELP syncer_last_run_exit_code " in shown.stdout and "# TYPE syncer_last_run_exit_code gauge" in shown.stdout
    assert json.loads(env.run("status", "--format", "json").stdout)["hooks"][0]["runs"] == 1
    assert json.loads(env.run("status", "--json").stdout)["hooks"][0]["hook"] == "events"


def test_the_metrics_file_mode_can_be_set_and_a_missing_folder_is_a_warning(logged_in: Env) -> None:
    env = logged_in
    env.write_config(metrics_file="syncer.prom", metrics_file_mode="0640")
    assert env.run("sync").returncode == 0
    assert stat.S_IMODE((env.tmp / "syncer.prom").stat().st_mode) == 0o640
    env.write_config(metrics_file="missing/syncer.prom")
    result = env.run("sync")
    assert result.returncode == 0, result.output
    assert "could not write the metrics file" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("breakage", ["not-a-database", "unreadable"])
def test_the_metrics_file_says_a_run_failed_when_the_database_cannot_be_read(logged_in: Env, breakage: str) -> None:
    """Issue 21: with the database broken, `sync` exits 1 and the metrics file says 1 (it
    kept the last good run's 0), with the database marked unreadable."""
    env = logged_in
    env.write_config(metrics_file="syncer.prom")
    assert env.run("sync").returncode == 0
    metrics = env.tmp / "syncer.prom"
    good = parse(metrics.read_text())
    assert good["syncer_last_run_exit_code"] == {(): 0} and good["syncer_database_readable"] == {(): 1}
    if breakage == "not-a-database":
        for suffix in ("-wal", "-shm"):
            Path(f"{env.database}{suffix}").unlink()
        env.database.write_bytes(b"this is not an SQLite database, but it was one" * 100)
    else:  # the run's own database is a folder now: nothing can open it
        env.database.rename(env.tmp / "moved.db")
        env.database.mkdir()
    failed = env.run("sync")
    assert failed.returncode == 1, failed.output
    assert failed.stderr.count("syncer: error:") == 1 and "Traceback" not in failed.output
    broken = parse(metrics.read_text())
    assert broken["syncer_last_run_exit_code"] == {(): 1}
    assert broken["syncer_database_readable"] == {(): 0}
    assert broken["syncer_status_exit_code"] == {(): 1}
    assert broken["syncer_last_run_end_timestamp_seconds"][()] > good["syncer_last_run_end_timestamp_seconds"][()]
    assert "syncer_memberships" not in broken  # no figure from a database that could not be read


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Metric name -> {labels: value}, through prometheus-client's own parser."""
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = {tuple(sorted(s.labels.items())): s.value for s in family.samples}
    return families


def test_no_token_or_secret_reaches_hooks_pings_or_metrics(logged_in: Env, receiver: Receiver) -> None:
    env, world = logged_in, logged_in.world
    secrets = {
        "MY_API_TOKEN": "tok-0123456789", "DB_PASSWORD": "pw-0123456789", "AWS_SECRET_ACCESS_KEY": "aws-0123456789",
        "CREDENTIALS_DIRECTORY": "/run/credentials/syncer.service", "SENDGRID_API_KEY": "sg-0123456789",
    }
    env.vars.update(secrets)
    env.vars["HARMLESS_SETTING"] = "kept"
    hook = watch_everything(env, receiver, hook_path="/hook/T0-B0-webhook-key", ping_path="/ping/check-uuid-0123")
    logs = [env.run("-vv", "sync")]
    env.sim.expire_access_tokens()  # a renewal: a new access token exists during the next run
    world.add_member(admin_groups(world)[0])
    logs.append(env.run("-vv", "--log-format", "json", "sync"))
    assert [result.returncode for result in logs] == [0, 0]
    for result in logs:  # the URLs' secret parts stay out of the logs, libraries' debug lines included
        assert "urllib3" in result.stderr and "/hook/T0-B0-webhook-key" not in result.stderr
        assert "check-uuid-0123" not in result.stderr

    calls = hook.calls()
    assert [c["run_id"] for c in calls] == ["1", "2"]
    for call in calls:
        assert set(secrets).isdisjoint(call["env"]), "a secret's variable reached the hook"
        assert call["env"]["HARMLESS_SETTING"] == "kept" and call["env"]["SYNCER_HOOK"] == "everything"
    sent = [json.dumps(calls)] + [json.dumps(r.headers) + r.path + r.body.decode() for r in receiver.requests]
    sent.append((env.tmp / "syncer.prom").read_text())
    assert {r.path for r in receiver.requests if r.method == "GET"} == {"/ping/check-uuid-0123/start", "/ping/check-uuid-0123"}
    tokens = set(env.sim.issued_tokens) | conftest.ISSUED_TOKENS
    assert len(env.sim.issued_tokens) >= 3
    for text in sent:
        for secret in (*tokens, *(v for k, v in secrets.items() if k != "CREDENTIALS_DIRECTORY")):
            assert secret not in text


def test_hook_environment_leaves_out_every_secret() -> None:
    environ = {
        "PATH": "/usr/bin", "HOME": "/var/lib/syncer", "SYNCER_CONFIG": "/etc/syncer/syncer.toml",
        "SYNCER_CLIENT_SECRET": "s", "CREDENTIALS_DIRECTORY": "/run/credentials/x", "GITHUB_TOKEN": "t",
        "my_secret": "s", "DB_PASSWORD": "p", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1",
    }
    kept = {"PATH": "/usr/bin", "HOME": "/var/lib/syncer", "SYNCER_CONFIG": "/etc/syncer/syncer.toml"}
    assert hook_environment(environ) == kept


def test_ping_urls() -> None:
    assert ping_url("https://hc-ping.com/1234", "start") == "https://hc-ping.com/1234/start"
    assert ping_url("https://hc.example/ping/1234/", "77") == "https://hc.example/ping/1234/77"
    assert ping_url("https://hc.example/p?rid=5", "start") == "https://hc.example/p/start?rid=5"
    assert ping_url("https://hc.example/p", "") == "https://hc.example/p"


GOOD = {"name": "ldap", "command": ["/usr/local/bin/sync-ldap"]}


@pytest.mark.parametrize(
    "hooks, settings, message",
    [
        ([GOOD, {"name": "ldap", "url": "https://h.example"}], {}, "[[hooks]] #2 ('ldap'), key 'name': hook #1 has that name"),
        ([{"name": "x", "command": ["a"], "url": "https://h.example"}], {}, "#1 ('x'), key 'command': a hook needs exactly one"),
        ([{"name": "x"}], {}, "key 'command': a hook needs exactly one of 'command' and 'url'"),
        ([{"name": "x", "url": "ftp://example.org/h"}], {}, "key 'url': must be an http:// or https:// URL"),
        ([{"name": "x", "url": "https://"}], {}, "key 'url': must be an http:// or https:// URL"),
        ([{**GOOD, "timeout": "0s"}], {}, "key 'timeout': must be more than 0 and at most 1h"),
        ([{**GOOD, "timeout": "2h"}], {}, "key 'timeout': must be more than 0 and at most 1h"),
        ([{**GOOD, "timeout": "soon"}], {}, "key 'timeout': not a duration"),
        ([{**GOOD, "observations": "yes"}], {}, "key 'observations': must be true or false"),
        ([{**GOOD, "groups": ["not-a-uuid"]}], {}, "key 'groups': must be a list of group IDs"),
        ([{**GOOD, "command": []}], {}, "key 'command': must be a list of non-empty strings"),
        ([{**GOOD, "retries": 3}], {}, "key 'retries': unknown key"),
        ([{"name": "two words", "url": "https://example.org"}], {}, "key 'name': required; letters, digits"),
        ([], {"healthcheck_url": "hc-ping.com/abc"}, "key 'healthcheck_url': must be an http:// or https:// URL"),
        ([], {"metrics_file_mode": "rw-r--r--"}, "key 'metrics_file_mode': must be a file mode"),
    ],
)
def test_bad_hook_settings_exit_78_naming_the_key(
    env: Env, hooks: list[dict[str, t.Any]], settings: dict[str, t.Any], message: str
) -> None:
    configure(env, *hooks, **settings)
    result = env.run("sync")
    assert result.returncode == 78, result.output
    assert str(env.config) in result.stderr and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not env.database.exists()


def test_hook_settings_are_read_with_their_defaults(env: Env) -> None:
    configure(
        env,
        {"name": "a", "command": ["./notify.sh", "--quiet"]},
        {"name": "b", "url": "https://example.org/hook", "timeout": "5m", "observations": True,
         "groups": ["D3974728-6458-11E4-B72D-123139141556"]},
        healthcheck_url="https://hc-ping.com/abc", metrics_file="m/syncer.prom",
    )
    from syncer.config import load_config

    config = load_config(env.config)
    assert config.hooks == (
        HookConfig("a", command=(str(env.tmp / "notify.sh"), "--quiet")),
        HookConfig("b", url="https://example.org/hook", timeout=300.0, observations=True,
                   groups=("d3974728-6458-11e4-b72d-123139141556",)),
    )
    assert config.healthcheck_url == "https://hc-ping.com/abc"
    assert (config.metrics_file, config.metrics_file_mode) == (env.tmp / "m" / "syncer.prom", 0o644)


def test_the_example_configuration_with_everything_uncommented_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "syncer.toml"
    settings = re.compile(r"^# (\w+ = .*|\[\[hooks\]\])$")
    lines = [
        line[2:] if settings.match(line) else "" if line.startswith("#") else line for line in example.read_text().splitlines()
    ]
    uncommented = tmp_path / "syncer.toml"
    uncommented.write_text("\n".join(lines) + "\n")
    from syncer.config import load_config

    config = load_config(uncommented)
    assert [hook.name for hook in config.hooks] == ["ntfy", "portal"]
    assert config.hooks[1].observations and config.hooks[0].timeout == 30
    assert config.healthcheck_url and config.metrics_file and config.metrics_file_mode == 0o644


@pytest.mark.parametrize("source", ["SYNCER_CLIENT_SECRET", "CREDENTIALS_DIRECTORY"])
def test_a_confidential_clients_secret_reaches_no_hook_ping_or_metric(env: Env, receiver: Receiver, source: str) -> None:
    client_id, secret = env.world.add_client(list(env.world.groups)[:3], role="admin")
    if source == "SYNCER_CLIENT_SECRET":
        env.vars["SYNCER_CLIENT_SECRET"] = secret
    else:
        credentials = env.tmp / "credentials"
        credentials.mkdir()
        (credentials / "client_secret").write_text(secret)
        env.vars["CREDENTIALS_DIRECTORY"] = str(credentials)
    hook = watch_everything(env, receiver, client_id=client_id)
    result = env.run("-vv", "sync")
    assert result.returncode == 0, result.output
    [call] = hook.calls()
    assert call["lines"] and source not in call["env"]
    sent = [json.dumps(call), result.output, (env.tmp / "syncer.prom").read_text()]
    sent += [json.dumps(r.headers) + r.path + r.body.decode() for r in receiver.requests]
    assert {r.path for r in receiver.requests} == {"/ping/start", "/ping", "/hook"}
    for text in sent:
        assert secret not in text
        assert all(token not in text for token in env.sim.issued_tokens)
