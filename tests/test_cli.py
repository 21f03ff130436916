"""The `nanorix-agent` CLI against a real daemon (SPEC 8 CLI table): run, session
create/exec/get/list/destroy, keys, health, verify, and its exit codes."""

from __future__ import annotations

import json

import pytest
from helpers_daemon import AgentDaemon


@pytest.fixture
def daemon(tmp_path):
    with AgentDaemon(tmp_path / "agent") as d:
        yield d


def test_run_one_shot(daemon, tmp_path):
    """`run -- python3 -c 'print(42)'` streams 42, writes a verifying CDP, prints a summary."""
    r = daemon.cli("run", "--", "python3", "-c", "print(42)", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"42\n"
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 2
    sid = lines[0].split(":")[0]
    assert "exit code 0" in lines[0]
    assert f"cdp: ./{sid}.cdp.json" in lines[1] and "valid: true" in lines[1]
    doc = json.loads((tmp_path / f"{sid}.cdp.json").read_text())
    assert doc["cdp_version"] == "1.0" and doc["session_id"] == sid
    v = daemon.cli("verify", str(tmp_path / f"{sid}.cdp.json"))
    assert v.returncode == 0, v.stdout + v.stderr


def test_run_exit_code_input_and_auditproof(daemon, tmp_path):
    """run passes --input-file, exits with the command's code and can write the 2.1 rendition."""
    (tmp_path / "in.txt").write_bytes(b"abc")
    out = tmp_path / "p.json"
    r = daemon.cli("run", "--input-file", str(tmp_path / "in.txt"), "--cdp-out", str(out),
                   "--format", "auditproof", "--classification", "PHI", "--",
                   "cat /input/data; exit 7", cwd=tmp_path)
    assert r.returncode == 7, r.stderr
    assert r.stdout == b"abc"
    assert json.loads(out.read_text())["cdp_version"] == "2.1"
    assert b"valid: true" in r.stderr


def test_session_commands(daemon, tmp_path):
    """session create/exec/get/list/destroy --out; exec streams and exits with the code."""
    r = daemon.cli("session", "create", "--customer", "cli", "--ttl", "60")
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    sid = created["session_id"]
    assert created["ttl_seconds"] == 60
    r = daemon.cli("session", "exec", sid, "--input-data", "hey", "--",
                   "cat /input/data; echo E >&2; exit 4")
    assert r.returncode == 4 and r.stdout == b"hey" and r.stderr == b"E\n"
    r = daemon.cli("session", "exec", sid, "--json", "--", "echo", "a b")
    res = json.loads(r.stdout)
    assert r.returncode == 0 and res["output"] == "a b\n" and res["receipt"]["seq"] == 2
    assert json.loads(daemon.cli("session", "get", sid).stdout)["status"] == "active"
    listed = json.loads(daemon.cli("session", "list", "--customer", "cli").stdout)
    assert [s["session_id"] for s in listed] == [sid]
    out = tmp_path / "cdp.json"
    r = daemon.cli("session", "destroy", sid, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().startswith(f"{sid}: destroyed")  # --out: one summary line
    cdp = json.loads(out.read_text())
    assert cdp == json.loads(daemon.cli("proof", "get", sid).stdout)["cdp"]
    key = daemon.cli("keys", "get", cdp["attestation"]["key_id"])
    assert key.returncode == 0 and json.loads(key.stdout)["algorithm"] == "Ed25519"
    r = daemon.cli("session", "exec", sid, "--", "true")
    assert r.returncode == 125 and b"Conflict" in r.stderr


def test_errors_and_unreachable_agent(daemon, tmp_path):
    """Agent errors and an unreachable socket exit 125 with the error in one line."""
    r = daemon.cli("session", "get", "sess_0000000000000001")
    assert r.returncode == 125 and b"NotFound 404" in r.stderr
    r = daemon.cli("keys", "get", "nrx-verify-nothing")
    assert r.returncode == 125 and b"NotFound" in r.stderr
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "agent.cli", "--socket",
                        str(tmp_path / "none.sock"), "health"], capture_output=True,
                       cwd=daemon.base, timeout=60)
    assert r.returncode == 125 and b"cannot reach the agent" in r.stderr
    h = daemon.cli("health")
    assert json.loads(h.stdout)["database"] is True


def test_debug_and_doctor_are_dispatched(daemon):
    """`debug CMD` reaches the daemon's debug socket beside --socket; `doctor` runs its checks."""
    r = daemon.cli("debug", "status")
    assert r.returncode == 0, r.stderr
    assert b"status" in r.stdout or b"healthy" in r.stdout or b"degraded" in r.stdout
    r = daemon.cli("doctor")
    assert r.returncode in (0, 1) and r.stdout.strip()


def test_run_refused_exits_125(daemon, tmp_path):
    """When the agent refuses the session (RateLimited), run exits 125 with the error name."""
    for _ in range(3):
        daemon.call("session.create", {"customer_id": "local", "tier": "free"})
    r = daemon.cli("run", "--", "true", cwd=tmp_path)
    assert r.returncode == 125 and b"RateLimited 429" in r.stderr
    assert not list(tmp_path.glob("sess_*.cdp.json"))
