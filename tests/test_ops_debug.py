"""Operator debug socket (SPEC 9) against a real daemon: every command, 0600, no customer data."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

import pytest
from helpers_daemon import ROOT, AgentDaemon, agent_daemon  # noqa: F401 (fixture)
from prometheus_client.parser import text_string_to_metric_families

from agent.ops import debug

MARKER = "ZQXMARKER7731"


@pytest.fixture
def daemon(agent_daemon):  # noqa: F811 (the imported fixture, by name)
    return agent_daemon


def _ask(d, cmd: str) -> str:
    return debug.request(d.runtime_dir / "debug.sock", cmd)


def test_debug_commands_answer_and_never_show_customer_data(daemon):
    """status, sessions, session, metrics, config, keys, log-level, destroy: all answer, no marker."""
    d = daemon
    sid = d.call("session.create", {"customer_id": "cust-1", "tier": "free"})["session_id"]
    res = d.call("session.exec", {"session_id": sid,
                                  "command": f"echo {MARKER}; echo {MARKER} >&2; "
                                             f"echo x > /work/{MARKER}.txt; cat /input/data",
                                  "input_data": MARKER.encode()})
    assert MARKER.encode() in res["output"]
    answers = {}
    for cmd in ("status", "sessions", f"session {sid}", "metrics", "config", "keys",
                "log-level", "help"):
        answers[cmd] = _ask(d, cmd)
        assert not answers[cmd].startswith("error"), (cmd, answers[cmd])
        assert MARKER not in answers[cmd], cmd
    status = json.loads(answers["status"])
    assert status["status"] == "healthy" and status["sessions_by_status"] == {"active": 1}
    assert set(status["engines"]) == {"eee", "dire", "rzl", "fgx", "ave"}
    sessions = json.loads(answers["sessions"])
    assert [s["session_id"] for s in sessions] == [sid]
    meta = json.loads(answers[f"session {sid}"])
    assert meta["customer_id"] == "cust-1" and meta["exec_count"] == 1
    assert set(meta) <= set(debug.SESSION_KEYS)
    fams = {f.name: f for f in text_string_to_metric_families(answers["metrics"])}
    assert fams["nanorix_agent_creates"].samples[0].value == 1
    assert fams["nanorix_agent_execs"].samples[0].value == 1
    assert json.loads(answers["config"])["node"]["node_id"] == "test-node"
    keys = json.loads(answers["keys"])
    assert keys["current"].startswith("nrx-verify-") and "private" not in answers["keys"]
    # destroy ID: operator-forced, reason operator, CDP spooled
    out = json.loads(_ask(d, f"destroy {sid}"))
    assert out["status"] == "expired" and out["reason"] == "operator"
    assert MARKER not in json.dumps(out)
    pending = d.call("proof.pending")
    pend = pending if isinstance(pending, list) else pending.get("proofs", pending)
    assert sid in json.dumps(pend, default=str)
    assert _ask(d, f"session {sid}").find('"reason": "operator"') > 0
    assert _ask(d, "destroy sess_0000000000000000").startswith("error: session not found")
    # the logs of the whole run carry no marker either
    assert MARKER not in d.log_text()


def test_log_level_changes_live(daemon):
    """`log-level warning` stops info events at once; `log-level debug` brings them back."""
    d = daemon
    assert json.loads(_ask(d, "log-level warning")) == {"log_level": "warning"}
    before = len(d.logs())
    d.call("session.create", {"customer_id": "c", "tier": "free"})
    assert not [e for e in d.logs()[before:] if e.get("level") == "info"]
    assert json.loads(_ask(d, "log-level debug")) == {"log_level": "debug"}
    assert _ask(d, "log-level loud").startswith("error")
    before = len(d.logs())
    d.call("session.create", {"customer_id": "c", "tier": "free"})
    assert [e for e in d.logs()[before:] if e.get("level") == "info"]


def test_socket_is_0600_and_refuses_other_users(daemon):
    """The debug socket is mode 0600 owned by root; an unprivileged user cannot connect."""
    path = daemon.runtime_dir / "debug.sock"
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); "
            "s.connect(sys.argv[1]); print('connected')")
    r = subprocess.run(["/usr/bin/python3", "-c", code, str(path)], user=65534, group=65534,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "PermissionError" in r.stderr


def test_bad_input_gets_an_error_line(daemon):
    """Unknown commands, wrong arity, overlong and non-UTF-8 lines get `error:` answers."""
    d = daemon
    assert _ask(d, "frobnicate").startswith("error: unknown command")
    assert _ask(d, "session").startswith("error: unknown command")
    assert _ask(d, "session sess_ffffffffffffffff").startswith("error: session not found")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(d.runtime_dir / "debug.sock"))
        s.sendall(b"\xff\xfe\n")
        assert s.recv(100).startswith(b"error: not UTF-8")
    assert _ask(d, "x" * 10000).startswith("error: line too long")


def test_cli_client(daemon):
    """`nanorix-agent debug status` through the real CLI prints JSON and exits 0; errors exit 1."""
    d = daemon
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "agent.cli", "--socket", str(d.socket), "debug",
                        "status"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "healthy"
    r = subprocess.run([sys.executable, "-m", "agent.cli", "debug", "--socket",
                        str(d.runtime_dir / "debug.sock"), "nope"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 1 and r.stdout.startswith("error:")


def test_failing_engine_degrades_status_with_reason_and_recovers(tmp_path):
    """With the spool dir broken the periodic self-test marks rzl degraded (reason in `status`); fixed, it heals."""
    import shutil
    import time

    d = AgentDaemon(tmp_path / "agent", config={"health": {"interval_seconds": 1}})
    d.start()
    try:
        spool = d.state_dir / "spool"
        shutil.rmtree(spool)
        spool.write_text("broken")
        deadline = time.monotonic() + 15
        while True:
            st = json.loads(_ask(d, "status"))
            if st["status"] == "degraded":
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.2)
        assert st["engines"]["rzl"] is False and "rzl" in st["reasons"]
        assert d.call("agent.health")["status"] == "degraded"
        assert d.call("agent.info")  # the daemon keeps serving
        spool.unlink()
        spool.mkdir(mode=0o700)
        deadline = time.monotonic() + 15
        while json.loads(_ask(d, "status"))["status"] != "healthy":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert d.call("agent.health")["engines"]["rzl"] is True
    finally:
        d.stop()
