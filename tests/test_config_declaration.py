"""The configuration declared once (syncer.config.SETTINGS, HOOK_SETTINGS): the loader,
the environment overrides and the defaults read it; the sample configuration and the
docs' tables are generated from it and must not drift; and a file's problems are
reported all at once, one ``syncer: error:`` line each, exit 78. In-process: the
loader itself, and the CLI through click's CliRunner."""

from __future__ import annotations

import dataclasses
import re
import typing as t
from pathlib import Path

import pytest
from click.testing import CliRunner

from syncer import config as config_module
from syncer.cli import cli
from syncer.config import (
    HOOK_SETTINGS,
    SETTINGS,
    WRITE_COMMAND,
    Config,
    ConfigProblems,
    HookConfig,
    load_config,
    render_docs,
    render_sample,
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "config" / "syncer.toml"
DOCS = ROOT / "docs" / "configuration.md"

# one file with something wrong of every sort: unknown key, wrong type, bad value, bad hooks
BROKEN = """\
colour = "blue"
concurrency = "many"
interval = 15
my_statuses = ["left"]
database = "groups.db"

[[hooks]]
name = "two words"
retries = 3

[[hooks]]
name = "ldap"
command = ["/usr/local/bin/sync-ldap"]
timeout = "2h"

[[hooks]]
name = "ldap"
url = "https://h.example"
"""


def broken_problems(path: Path) -> list[str]:
    """What the loader must say about BROKEN at ``path``, in the order the file says it."""
    known = ", ".join(setting.name for setting in SETTINGS)
    hook_keys = ", ".join(setting.name for setting in HOOK_SETTINGS)
    return [
        f"{path}: unknown key 'colour' (known keys: {known}, hooks)",
        f"{path}: key 'concurrency': must be a whole number",
        f'{path}: key \'interval\': a bare number (15) has no unit: write it in quotes with one, e.g. "15s" or "15m"',
        f"{path}: key 'my_statuses': 'left' is not allowed: Globus shows a group only to an identity that is"
        " active, invited, pending in it (must be some of those)",
        f"{path}: [[hooks]] #1 ('two words'), key 'retries': unknown key (known keys: {hook_keys})",
        f"{path}: [[hooks]] #1 ('two words'), key 'command': a hook needs exactly one of 'command' and 'url'",
        f"{path}: [[hooks]] #1 ('two words'), key 'name': required; letters, digits, '.', '_' and '-', at most 64 characters",
        f"{path}: [[hooks]] #2 ('ldap'), key 'timeout': must be more than 0 and at most 1h",
        f"{path}: [[hooks]] #3 ('ldap'), key 'name': hook #2 has that name; names must be unique",
    ]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting of the machine running the tests reaches the loader."""
    for setting in SETTINGS:
        monkeypatch.delenv(f"SYNCER_{setting.name.upper()}", raising=False)
    for key in ("SYNCER_CONFIG", "CONFIGURATION_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


# ---------------------------------------------------------------- every problem at once


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    conf = tmp_path / "syncer.toml"
    conf.write_text(BROKEN)
    with pytest.raises(ConfigProblems) as caught:
        load_config(conf)
    assert list(caught.value.problems) == broken_problems(conf)
    assert str(caught.value) == "\n".join(broken_problems(conf))
    assert caught.value.exit_code == 78


def test_bad_environment_variables_join_the_files_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "syncer.toml"
    conf.write_text('surprise = 1\nconcurrency = 0\ndatabase = "same.db"\ntoken_storage = "same.db"\n')
    monkeypatch.setenv("SYNCER_CONCURRENCY", "4")  # a good override does not hide the file's bad value
    monkeypatch.setenv("SYNCER_JITTER", "nan")
    monkeypatch.setenv("SYNCER_GROUPS", "nope")
    with pytest.raises(ConfigProblems) as caught:
        load_config(conf)
    same = tmp_path / "same.db"
    assert list(caught.value.problems) == [
        f"{conf}: unknown key 'surprise' (known keys: {', '.join(s.name for s in SETTINGS)}, hooks)",
        f"{conf}: key 'concurrency': must be between 1 and 64",
        "environment variable SYNCER_JITTER: not a duration: 'nan' (use e.g. 30s, 15m, 1h)",
        "environment variable SYNCER_GROUPS: must be a list of group IDs (UUIDs)",
        f"{conf}: key 'token_storage': token_storage ({same}) is the same file as database ({same});"
        " tokens must be kept in a file of their own",
    ]


def test_a_refused_path_is_not_compared_with_the_other(tmp_path: Path) -> None:
    """A bad `database` says so once, not also that the default token store is or is not it."""
    conf = tmp_path / "syncer.toml"
    conf.write_text("database = 3\n")
    with pytest.raises(ConfigProblems) as caught:
        load_config(conf)
    assert list(caught.value.problems) == [f"{conf}: key 'database': must be a non-empty string"]


def test_the_cli_prints_one_error_line_per_problem_and_exits_78(tmp_path: Path) -> None:
    conf = tmp_path / "syncer.toml"
    conf.write_text(BROKEN)
    for command in (["sync"], ["status"], ["members", "d3974728-6458-11e4-b72d-123139141556"]):
        result = CliRunner().invoke(cli, ["--config", str(conf), *command])
        assert result.exit_code == 78, (command, result.output)
        assert result.stderr.splitlines() == [f"syncer: error: {problem}" for problem in broken_problems(conf)]
        assert result.stdout == ""
    assert not (tmp_path / "groups.db").exists()


def test_one_problem_is_still_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "syncer.toml"
    conf.write_text('concurrency = "many"\n')
    result = CliRunner().invoke(cli, ["--config", str(conf), "status"])
    assert result.exit_code == 78
    assert result.stderr == f"syncer: error: {conf}: key 'concurrency': must be a whole number\n"


# ---------------------------------------------------------------- environment overrides


def _as_text(value: t.Any) -> str:
    """A declared TOML value as an environment variable writes it (lists comma-separated)."""
    return ",".join(value) if isinstance(value, list) else str(value)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda setting: setting.name)
def test_every_key_has_an_environment_override(
    setting: config_module.Setting, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SYNCER_<KEY> replaces the file's value, read as text (relative paths: the working directory)."""
    shown = setting.example if setting.example is not None else setting.default
    conf = tmp_path / "conf" / "syncer.toml"
    conf.parent.mkdir()
    conf.write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(f"SYNCER_{setting.name.upper()}", _as_text(shown))
    loaded = getattr(load_config(conf), setting.name)
    assert loaded == config_module._convert(setting.kind, shown, tmp_path, from_text=False)
    if setting.kind == "path":
        monkeypatch.setenv(f"SYNCER_{setting.name.upper()}", "relative/x.db")
        assert getattr(load_config(conf), setting.name) == tmp_path / "relative" / "x.db"


def test_overrides_win_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "syncer.toml"
    conf.write_text('interval = "1h"\nconcurrency = 2\nmetrics_file_mode = "0600"\n')
    monkeypatch.setenv("SYNCER_INTERVAL", "90s")
    monkeypatch.setenv("SYNCER_METRICS_FILE_MODE", "0640")
    config = load_config(conf)
    assert (config.interval, config.concurrency, config.metrics_file_mode) == (90, 2, 0o640)


# ---------------------------------------------------------------- one declaration


def test_the_settings_classes_hold_exactly_the_declared_keys() -> None:
    assert {f.name for f in dataclasses.fields(Config)} == {s.name for s in SETTINGS} | {"hooks", "source"}
    assert {f.name for f in dataclasses.fields(HookConfig)} == {s.name for s in HOOK_SETTINGS}


def test_defaults_are_the_declared_ones(tmp_path: Path) -> None:
    config, hook = Config(), HookConfig("x")
    state = tmp_path / "xdg-data" / "syncer"
    assert (config.interval, config.jitter, config.concurrency, config.metrics_file_mode) == (900, 0, 8, 0o644)
    assert (config.database, config.token_storage) == (state / "groups.db", state / "tokens.db")
    assert (hook.timeout, hook.groups, hook.observations, hook.command, hook.url) == (60, (), False, None, None)
    assert load_config() == config  # no file: the same defaults


@pytest.mark.parametrize("setting", SETTINGS + HOOK_SETTINGS, ids=lambda setting: setting.name)
def test_each_declaration_is_usable(setting: config_module.Setting, tmp_path: Path) -> None:
    """Its default and its example pass its own checks; its description fits a table cell."""
    for value in (setting.default, setting.example):
        if value is not None:
            config_module._value(setting, value, tmp_path, from_text=False)
    assert "|" not in setting.description and "\n" not in setting.description
    assert setting.kind in config_module._KIND_DOC


# ---------------------------------------------------------------- generated files


def test_the_sample_and_the_docs_tables_are_what_the_declaration_says() -> None:
    """Both generated; a hand edit, or a declaration changed without regenerating, fails here."""
    hint = f"edit the declaration in syncer/config.py, then run `{WRITE_COMMAND}`"
    assert SAMPLE.read_text() == render_sample(), f"config/syncer.toml has drifted from the declaration: {hint}"
    docs = DOCS.read_text()
    assert docs == render_docs(docs), f"the tables in docs/configuration.md have drifted from the declaration: {hint}"


def test_the_drift_check_sees_a_changed_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = DOCS.read_text()
    changed = tuple(s._replace(default="5m") if s.name == "interval" else s for s in SETTINGS)
    monkeypatch.setattr(config_module, "SETTINGS", changed)
    assert render_sample() != SAMPLE.read_text() and render_docs(docs) != docs
    assert '# interval = "5m"' in render_sample() and '| `"5m"` |' in render_docs(docs)


def test_the_generator_command_rewrites_what_drifted(tmp_path: Path) -> None:
    """`python -m syncer.config --write`, run as a maintainer does, in a copy of the
    checkout's two files with a hand edit in each: both are made whole again, only they."""
    import shutil
    import subprocess
    import sys

    for relative in (config_module.SAMPLE_FILE, config_module.DOCS_FILE):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, tmp_path / relative)
    sample, docs = tmp_path / config_module.SAMPLE_FILE, tmp_path / config_module.DOCS_FILE
    sample.write_text(sample.read_text().replace('# interval = "15m"', '# interval = "5m"'))
    docs.write_text(docs.read_text().replace("| `interval` |", "| `interval` (hand-edited) |"))
    assert sorted(config_module.write_generated(tmp_path)) == sorted([sample, docs])
    assert (sample.read_text(), docs.read_text()) == (SAMPLE.read_text(), DOCS.read_text())
    assert config_module.write_generated(tmp_path) == []  # nothing left to rewrite

    printed = subprocess.run([sys.executable, "-m", "syncer.config", "--sample"], capture_output=True, text=True,
                             check=True, cwd=tmp_path).stdout
    assert printed == SAMPLE.read_text()
    tables = subprocess.run([sys.executable, "-m", "syncer.config", "--docs-table"], capture_output=True, text=True,
                            check=True, cwd=tmp_path).stdout
    assert all(table in DOCS.read_text() for table in tables.strip().split("\n\n"))
    usage = subprocess.run([sys.executable, "-m", "syncer.config"], capture_output=True, text=True, cwd=tmp_path)
    assert usage.returncode == 2 and "one of the arguments --sample --docs-table --write is required" in usage.stderr


def test_the_sample_as_shipped_loads_as_the_defaults() -> None:
    assert dataclasses.replace(load_config(SAMPLE), source=None) == Config()


_SETTING_LINE = re.compile(r"^# (\w+ = .*|\[\[hooks\]\])$")


def test_the_sample_with_every_key_uncommented_is_valid(tmp_path: Path) -> None:
    """Every declared key, the hooks' too, is shown once as a setting, and the values shown load."""
    lines = [line[2:] for line in SAMPLE.read_text().splitlines() if _SETTING_LINE.match(line)]
    first_hook = lines.index("[[hooks]]")
    assert [line.split(" = ")[0] for line in lines[:first_hook]] == [s.name for s in SETTINGS]
    hook_keys = {line.split(" = ")[0] for line in lines[first_hook:] if " = " in line}
    assert hook_keys == {s.name for s in HOOK_SETTINGS}
    uncommented = tmp_path / "syncer.toml"
    uncommented.write_text("\n".join(lines) + "\n")
    config = load_config(uncommented)
    for setting in SETTINGS:
        shown = setting.example if setting.example is not None else setting.default
        assert getattr(config, setting.name) == config_module._convert(setting.kind, shown, tmp_path, False)
    assert [hook.name for hook in config.hooks] == [hook["name"] for hook in config_module.SAMPLE_HOOKS]
