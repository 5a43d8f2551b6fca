"""`syncer simulate` as a user runs it: a separate process that syncer is pointed at."""

from __future__ import annotations

import signal
import subprocess
import sys

from conftest import Env, record
from helpers import answer_login_prompt


def test_simulate_serves_until_terminated(env: Env) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "syncer", "simulate", "--port", "0", "--groups", "3", "--members", "4"],
        env=env.vars, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        exported = {}
        for line in server.stdout:
            if line.startswith("export "):
                key, value = line[len("export "):].strip().split("=", 1)
                exported[key] = value
            if len(exported) == 2:
                break
        assert set(exported) == {"GLOBUS_SDK_SERVICE_URL_AUTH", "GLOBUS_SDK_SERVICE_URL_GROUPS"}
        assert all(v.startswith("http://127.0.0.1:") and v.endswith("/") for v in exported.values())
        env.vars.update(exported)

        login = env.popen("login", "--no-browser", stdin=subprocess.PIPE)
        out, err = answer_login_prompt(login, exported["GLOBUS_SDK_SERVICE_URL_AUTH"].removesuffix("/auth/"))
        record(out, err)
        assert login.returncode == 0, err
        result = env.run("sync")
        assert result.returncode == 0, result.output
        assert env.query("SELECT count(*) FROM groups")[0][0] == 3
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=10)
    assert server.returncode == 0
