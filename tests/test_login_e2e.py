"""`syncer login` as a user meets it: a browser with a local redirect, the paste flow,
scopes that cannot work, and `syncer status` telling the login state as it is now."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from conftest import Env, Result, record
from helpers import stored_tokens

from syncer.config import GROUPS_SCOPE
from syncer.globus.token_store import TokenStore

# A stand-in for a browser: follows the authorize URL and its redirects, as a browser
# does once the user has logged in (the simulator approves at once), and notes the URL.
BROWSER = '''#!{python}
import sys, urllib.request
with open({visited!r}, "a") as fh:
    fh.write(sys.argv[1] + "\\n")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
with opener.open(sys.argv[1], timeout=30) as page:
    page.read()
'''


def with_browser(env: Env, command: str) -> Path:
    """Set $BROWSER to ``command`` (a script written here if "follow"); return the visited-URL log."""
    visited = env.tmp / "visited.txt"
    if command == "follow":
        script = env.tmp / "browser.py"
        script.write_text(BROWSER.format(python=sys.executable, visited=str(visited)))
        script.chmod(0o755)
        command = str(script)
    env.vars["BROWSER"] = command
    for key in ("SSH_TTY", "SSH_CONNECTION", "DISPLAY", "WAYLAND_DISPLAY"):
        env.vars.pop(key, None)
    return visited


def run_without_stdin(env: Env, *args: str) -> Result:
    """Run syncer with file descriptor 0 closed: no stdin at all."""
    proc = subprocess.run(
        ["sh", "-c", 'exec "$0" -m syncer "$@" <&-', sys.executable, *args],
        env=env.vars, cwd=env.tmp, text=True, capture_output=True, timeout=120,
    )
    record(proc.stdout, proc.stderr)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def has_tokens(env: Env) -> bool:
    if not env.tokens.exists():
        return False
    with TokenStore(env.tokens) as store:
        return store.groups_tokens() is not None


def test_browser_login_receives_the_code_on_a_local_redirect(env: Env) -> None:
    visited = with_browser(env, "follow")
    result = run_without_stdin(env, "login")
    assert result.returncode == 0, result.output
    username = env.world.identities[env.world.me]["username"]
    assert f"Logged in as {username}" in result.stdout
    assert "read " in result.stdout and "membership(s)" in result.stdout  # the proof read a group
    [url] = visited.read_text().splitlines()
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    redirect = urllib.parse.urlsplit(query["redirect_uri"][0])
    assert (redirect.scheme, redirect.hostname) == ("http", "127.0.0.1")
    assert query["access_type"] == ["offline"] and query["code_challenge_method"] == ["S256"]
    assert env.sim.stats["code_exchanges"] == 1
    assert stored_tokens(env.tokens)["refresh"]
    assert "code=" not in result.output  # the redirect's request line is not logged
    assert "Opening a browser to log in to Globus" in result.stdout  # says what it waits for
    assert env.run("sync").returncode == 0


def test_without_a_browser_login_falls_back_to_pasting_the_code(env: Env) -> None:
    with_browser(env, "false")  # a browser command that fails, as on a headless host
    proc = env.popen("login", stdin=subprocess.PIPE)
    out, err = env.sim.answer_cli_login(proc)
    record(out, err)
    assert proc.returncode == 0, err
    assert "No browser can be opened here" in out
    assert "Logged in as" in out
    assert has_tokens(env)


@pytest.mark.parametrize("stdin", ["empty line", "end of input", "no stdin"])
def test_no_code_is_one_line_and_changes_nothing(env: Env, stdin: str) -> None:
    if stdin == "no stdin":
        result = run_without_stdin(env, "login", "--no-browser")
    else:
        result = env.run("login", "--no-browser", input="\n" if stdin == "empty line" else "")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("syncer: error: no authorization code") and lines[-1].endswith("nothing changed")
    assert [line for line in lines if not line.startswith(" ") and "WARNING" not in line] == lines[-1:]
    assert "Aborted" not in result.output and "Traceback" not in result.output
    assert not has_tokens(env)


def test_scopes_without_a_groups_scope_are_a_configuration_error(env: Env) -> None:
    env.write_config(scopes=["openid", "email"])
    result = env.run("login", "--no-browser")
    assert result.returncode == 78
    assert result.stderr.strip().splitlines() == [
        f"syncer: error: {env.config}: key 'scopes': must include a Globus Groups scope, e.g. \"{GROUPS_SCOPE}\""
    ]
    assert env.sim.stats["requests"].get("authorize", 0) == 0


def test_a_login_whose_scope_cannot_read_memberships_names_the_scope_to_add(env: Env) -> None:
    env.write_config(scopes=["urn:globus:auth:scope:groups.api.globus.org:view_my_groups"])
    result = env.login()
    assert result.returncode == 78, result.output
    [line] = [line for line in result.stderr.splitlines() if line.startswith("syncer: error:")]
    assert f'add "{GROUPS_SCOPE}" to `scopes` in {env.config}' in line
    assert "the tokens were not kept" in line
    assert not has_tokens(env)  # `syncer login` after fixing the file needs no --force
    env.write_config()
    assert env.login().returncode == 0


def status(env: Env) -> tuple[Result, dict]:
    text = env.run("status")
    data = json.loads(env.run("status", "--json").stdout)
    assert text.stdout.splitlines()[0] == f"status: {data['health']}"  # text and JSON agree
    assert data["exit_code"] == text.returncode
    return text, data


def test_status_reports_the_login_as_it_is_now(logged_in: Env) -> None:
    env = logged_in
    assert env.run("sync").returncode == 0
    env.sim.expire_access_tokens()
    env.sim.revoke_all_refresh_tokens()
    assert env.run("sync").returncode == 77

    text, data = status(env)
    assert text.returncode == 77
    assert data["tokens"]["logged_in"] is False and data["tokens"]["refresh_token_rejected"] is True
    assert data["tokens"]["login_required"] is True
    assert "refresh token rejected by Globus Auth" in text.stdout

    assert env.login().returncode == 0  # as the message says: no --force needed for refused tokens
    text, data = status(env)
    assert text.returncode == 1  # the latest run failed, but no login is needed now
    assert data["tokens"]["logged_in"] is True and data["tokens"]["refresh_token_rejected"] is False
    assert data["tokens"]["login_required"] is False
    assert "login required" not in data["health"] and "new login, done since" in data["health"]
    assert "refresh token present" in text.stdout

    assert env.run("sync").returncode == 0
    text, data = status(env)
    assert text.returncode == 0 and data["health"].startswith("ok: run 3")
