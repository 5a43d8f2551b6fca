"""The README's commands, run as printed: the quick start's demo line in a fresh copy
of the checkout, the first run against a (simulated) Globus, and the questions asked
of the demo's database. The suite's own command is what .ci/run runs, verbatim."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import Env, record
from test_login_e2e import with_browser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent  # this venv's `syncer` script, as `.venv/bin` holds it


def block(name: str) -> list[str]:
    """The command lines of the ```sh block marked ``<!-- readme-test: NAME -->``."""
    text = README.read_text()
    after = text.split(f"<!-- readme-test: {name} -->\n", 1)[1]
    body = re.match(r"\s*```sh\n(.*?)\n\s*```", after, flags=re.S)
    assert body, f"no sh block after the {name} marker"
    return [line.strip() for line in body.group(1).splitlines() if line.strip()]


def shell(line: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", "-c", line], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    record(proc.stdout, proc.stderr)
    return proc


def user_env(home: Path) -> dict[str, str]:
    """A user's shell: nothing of syncer's or the SDK's set, this venv's scripts on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCER_", "GLOBUS_", "XDG_", "VIRTUAL_ENV"))}
    env["HOME"] = str(home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_the_suite_command_is_the_one_ci_runs() -> None:
    [command] = block("suite")
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_install_lines_name_this_distribution_and_its_extras() -> None:
    """`syncer` on PyPI is another project: the lines must name ours, and extras it has."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert project["name"] == "globus-group-syncer" and project["scripts"] == {"syncer": "syncer.cli:main"}
    install, *injects = block("install")
    assert install == "pipx install ."
    injected = {}
    for line in injects:
        name, spec, extra = re.fullmatch(r"pipx inject (\S+) '([^']+)'\s+# optional \((\w+)\).*", line).groups()  # type: ignore[union-attr]
        assert name == project["name"]
        injected[extra] = [spec]
    assert injected == {extra: extras[extra] for extra in ("datasette", "report")}
    for extra in injected:
        assert f"'{project['name']}[{extra}]'" in README.read_text()
    assert f"{project['name']}[datasette,report]" in extras["test"]


def fresh_copy(where: Path) -> Path:
    """A copy of the checkout's tracked files, as a fresh clone has them."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, tracked.stdout.split("\0")):
        if (ROOT / name).is_file():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, where / name)
    return where


@pytest.mark.slow
def test_the_install_lines_work_with_pipx(tmp_path: Path) -> None:
    """`pipx install .` in a fresh copy, then Datasette and pygal injected into the same venv,
    the one `pipx inject` finds by the distribution's name."""
    if not shutil.which("pipx"):
        pytest.skip("pipx is not installed here (Debian: apt-get install pipx)")
    clone = fresh_copy(tmp_path / "clone")
    env = user_env(tmp_path / "home")
    env["PATH"] = env["PATH"].split(os.pathsep, 1)[1]
    env.update(PIPX_HOME=str(tmp_path / "pipx"), PIPX_BIN_DIR=str(tmp_path / "bin"))
    for line in block("install"):
        ran = shell(line, env, clone, timeout=900)
        assert ran.returncode == 0, (line, ran.stderr[-3000:])
    syncer = tmp_path / "bin" / "syncer"
    served = subprocess.run([str(syncer), "serve", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert served.returncode == 0 and "--port" in served.stdout, served.stderr  # the command is there
    probe = subprocess.run(
        [str(tmp_path / "pipx" / "venvs" / "globus-group-syncer" / "bin" / "python"), "-c", "import datasette, pygal, syncer"],
        capture_output=True, text=True, timeout=120,
    )
    assert probe.returncode == 0, probe.stderr


@pytest.mark.slow
def test_the_demo_line_works_in_a_fresh_copy_of_the_checkout(tmp_path: Path) -> None:
    """The quick start's first command, as printed, in a copy of the tracked files:
    its own venv, an install from the index, the demo."""
    [command] = block("demo")
    clone = fresh_copy(tmp_path / "clone")
    env = user_env(tmp_path / "home")
    env["PATH"] = env["PATH"].split(os.pathsep, 1)[1]  # not this venv: the one the line makes
    ran = shell(command, env, clone, timeout=900)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "== What changed" in ran.stdout and "== Ask syncer" in ran.stdout
    assert (tmp_path / "home" / ".local" / "share" / "syncer" / "demo" / "groups.db").exists()


def test_the_first_run_against_globus(env: Env) -> None:
    """Step 3 of "First run against your Globus account", with the simulator standing in
    for Globus and a browser that follows the login page, as a person's would."""
    with_browser(env, "follow")
    env.vars["PATH"] = f"{BIN}{os.pathsep}{env.vars.get('PATH', '')}"
    lines = block("first-run")
    assert lines == ["syncer login", "syncer sync", "syncer status", "syncer groups"]
    results = {line: shell(line, env.vars, env.tmp) for line in lines}
    assert all(r.returncode == 0 for r in results.values()), {k: r.stderr for k, r in results.items()}
    assert "Logged in as" in results["syncer login"].stdout
    assert re.search(r"run 1 ok: \d+ groups read, 0 failed", results["syncer sync"].stderr)
    assert results["syncer status"].stdout.startswith("status: ok")
    assert len(results["syncer groups"].stdout.splitlines()) > 1


def test_the_questions_asked_of_the_demo_database(tmp_path: Path) -> None:
    """The "Asking the database" block, line by line in one shell, after `syncer demo`."""
    env = user_env(tmp_path / "home")
    demo = shell("syncer demo", env, tmp_path)
    assert demo.returncode == 0, demo.stderr
    export, *questions = block("asking")
    assert export.startswith("export SYNCER_DATABASE=")
    for line in questions:
        if line.startswith("sqlite3") and not shutil.which("sqlite3"):
            continue  # the sqlite3 shell is not installed here (.ci/run installs it)
        ran = shell(f"{export}\n{line}", env, tmp_path)
        assert ran.returncode == 0 and ran.stdout.strip(), (line, ran.stderr)
    changes = shell(f"{export}\nsyncer changes --all --format csv", env, tmp_path).stdout
    assert "barbara.turing@example.org" in changes  # the names the README uses are the demo's
