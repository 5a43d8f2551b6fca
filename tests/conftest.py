"""Shared fixtures: a running simulator, a private configuration, and `syncer` as a user runs it.

End-to-end tests run the real ``syncer`` command (``syncer.cli.cli``): in the test's
process by default (tests/inprocess.py), in a process of its own where only a process
shows what is tested. Either way the real ``globus_sdk`` talks HTTP to the simulator
through ``GLOBUS_SDK_SERVICE_URL_*``. Every output of every command is kept, so the secrets
test can check that no token the simulator issued ever appears in one.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
from inprocess import invoke

from syncer.simulator import Simulator, World

# What `syncer` printed during the current test, and every token and client secret any
# simulator of this test process has issued: after each test, no output may hold one.
OUTPUTS: list[str] = []
ISSUED_TOKENS: set[str] = set()


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    stdout_bytes: bytes | None = None  # in-process runs: stdout as written, undecoded

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@dataclasses.dataclass
class Env:
    """One user's setup: a config file, its database and token store, and a simulator."""

    tmp: Path
    sim: Simulator
    world: World
    vars: dict[str, str]

    @property
    def config(self) -> Path:
        return self.tmp / "syncer.toml"

    @property
    def database(self) -> Path:
        return self.tmp / "groups.db"

    @property
    def tokens(self) -> Path:
        return self.tmp / "tokens.db"

    def write_config(self, **extra: t.Any) -> None:
        settings: dict[str, t.Any] = {"database": "groups.db", "token_storage": "tokens.db", "http_timeout": "3s"}
        settings.update(extra)
        lines = []
        for key, value in settings.items():
            if isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            elif isinstance(value, (list, tuple)):
                lines.append(f"{key} = [{', '.join(repr(v) for v in value)}]".replace("'", '"'))
            else:
                lines.append(f"{key} = {value}")
        self.config.write_text("\n".join(lines) + "\n")

    def popen(self, *args: str, **kwargs: t.Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "syncer", *args],
            env=self.vars, cwd=self.tmp, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
        )

    def run(
        self, *args: str, input: str | None = None, timeout: float = 120, process: bool = False,  # noqa: A002 - subprocess.run's name
        variables: dict[str, str] | None = None,
    ) -> Result:
        """`syncer ARGS` with this setup's environment (plus ``variables``) and folder: in
        this process (tests/inprocess.py), or with ``process=True`` as a process of its
        own, for what only a process shows (signals, exits, other users, memory)."""
        environment = {**self.vars, **(variables or {})}
        if not process:
            return self._in_process(args, environment, input=input)
        proc = subprocess.run(
            [sys.executable, "-m", "syncer", *args],
            env=environment, cwd=self.tmp, text=True, input=input,
            capture_output=True, timeout=timeout,
        )
        record(proc.stdout, proc.stderr)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def login(self, *extra: str, process: bool = False) -> Result:
        """`syncer login --no-browser`, reading the URL off stdout and answering with the code."""
        if not process:
            return self._in_process(("login", "--no-browser", *extra), self.vars, authorize=self.sim.authorize)
        proc = self.popen("login", "--no-browser", *extra, stdin=subprocess.PIPE)
        out, err = self.sim.answer_cli_login(proc)
        record(out, err)
        return Result(proc.returncode, out, err)

    def _in_process(self, args: t.Sequence[str], variables: dict[str, str], **how: t.Any) -> Result:
        outcome = invoke(args, variables, self.tmp, **how)
        record(outcome.stdout, outcome.stderr)
        return Result(*outcome)

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        return conn

    def query(self, sql: str, params: t.Sequence[t.Any] = ()) -> list[sqlite3.Row]:
        conn = self.db()
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: three workers a core. Many tests spend most of their time waiting (on a
    process to start or stop, on a retry's back-off or a timeout under test), so one a
    core leaves the cores idle (on 2 cores, `-m "not slow"`: 106 s with 4 workers, 90 s
    with 6, 89 s with 8)."""
    return 3 * (os.cpu_count() or 1)


def record(*texts: str) -> None:
    OUTPUTS.extend(texts)


@pytest.fixture(autouse=True)
def no_token_in_any_output() -> t.Iterator[None]:
    """Every test is also a secrets test: after it (its simulators stopped, so their
    tokens are in ISSUED_TOKENS), nothing `syncer` printed in it holds a token or a
    client secret issued in this test process so far."""
    OUTPUTS.clear()
    yield
    leaked = [token for token in ISSUED_TOKENS if any(token in text for text in OUTPUTS)]
    OUTPUTS.clear()
    assert not leaked, f"{len(leaked)} token(s) issued by the simulator appeared in syncer's output"


@pytest.fixture
def world() -> World:
    return World.generate(groups=6, members=8, seed=11)


@pytest.fixture
def sim(world: World) -> t.Iterator[Simulator]:
    simulator = Simulator(world, port=0).start()
    yield simulator
    ISSUED_TOKENS.update(simulator.issued_tokens)
    ISSUED_TOKENS.update(simulator.world.clients.values())  # confidential clients' secrets
    simulator.stop()


@pytest.fixture
def env(tmp_path: Path, sim: Simulator, world: World) -> Env:
    return make_env(tmp_path, sim, world)


def make_env(tmp_path: Path, sim: Simulator, world: World) -> Env:
    """A private user setup in ``tmp_path`` pointed at ``sim``, its config file written."""
    variables = {
        key: value for key, value in os.environ.items()
        if not key.startswith(
            ("SYNCER_", "GLOBUS_", "STATE_DIRECTORY", "CONFIGURATION_DIRECTORY", "NOTIFY_SOCKET", "JOURNAL_STREAM")
        )
    }
    variables.update(sim.env)
    variables["HOME"] = str(tmp_path / "home")
    variables["XDG_DATA_HOME"] = str(tmp_path / "home" / "data")
    variables["XDG_CONFIG_HOME"] = str(tmp_path / "home" / "config")
    variables["SYNCER_CONFIG"] = str(tmp_path / "syncer.toml")
    variables["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    e = Env(tmp=tmp_path, sim=sim, world=world, vars=variables)
    e.write_config()
    return e


@pytest.fixture
def logged_in(env: Env) -> Env:
    result = env.login()
    assert result.returncode == 0, result.output
    env.sim.reset_stats()  # tests count requests from here: not the login's own check
    env.sim.read_log.clear()
    return env


@pytest.fixture(scope="session")
def history(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[t.Any]:
    """One database with five runs (failed, ok, ok, partial, ok; see history_scenario),
    shared by the read-only query and Datasette tests."""
    from history_scenario import build

    world = World.generate(groups=6, members=8, seed=11)
    simulator = Simulator(world, port=0).start()
    try:
        built = build(make_env(tmp_path_factory.mktemp("history"), simulator, world))
        ISSUED_TOKENS.update(simulator.issued_tokens)
        yield built
    finally:
        ISSUED_TOKENS.update(simulator.issued_tokens)
        simulator.stop()
