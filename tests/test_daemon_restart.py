"""Unacknowledged proofs survive a restart (SPEC 8): the spool is durable and
proof.pending / proof.get answer the same documents after the daemon comes back."""

from __future__ import annotations

import time

from helpers_daemon import AgentDaemon

from agent.cdp.canonical import canonical_json
from agent.cdp.verify import verify


def test_restart_keeps_unacked_proofs(tmp_path):
    """Two destroyed sessions, one acked: after a restart only the other is pending, intact."""
    d = AgentDaemon(tmp_path)
    d.start()
    try:
        outs = []
        for _ in range(2):
            sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
            outs.append(d.call("session.destroy", {"session_id": sid}))
        d.call("proof.ack", {"session_id": outs[0]["session_id"]})
    finally:
        assert d.stop() == 0
    d.start()
    try:
        pending = d.call("proof.pending")
        assert [p["session_id"] for p in pending] == [outs[1]["session_id"]]
        stored = d.call("proof.get", {"session_id": outs[1]["session_id"]})
        assert canonical_json(stored["cdp"]) == canonical_json(outs[1]["cdp"])
        assert canonical_json(stored["auditproof"]) == canonical_json(outs[1]["auditproof"])
        assert verify(stored)["valid"] is True
        # the ended session is still known after the restart
        got = d.call("session.get", {"session_id": outs[1]["session_id"]})
        assert got["status"] == outs[1]["status"]
        # and its receipt key can still be looked up
        assert d.call("session.list", {"customer_id": "c"})
    finally:
        assert d.stop() == 0


def test_sigterm_destroys_live_sessions_with_reason_operator(tmp_path):
    """SIGTERM drains: every live session is destroyed (reason operator), spooled, exit 0."""
    d = AgentDaemon(tmp_path)
    d.start()
    sids = [d.call("session.create", {"customer_id": f"c{i}", "tier": "free"})["session_id"]
            for i in range(2)]
    assert d.stop() == 0
    d.start()
    try:
        pending = {p["session_id"]: p for p in d.call("proof.pending")}
        assert set(pending) == set(sids)
        assert all(p["reason"] == "operator" for p in pending.values())
        assert all(verify(p["cdp"])["valid"] for p in pending.values())
    finally:
        d.stop()


def test_sigkill_then_start_recovers_sessions(tmp_path):
    """After a SIGKILL and longer down than the orphan grace (1 s), the sandboxes ended
    themselves and the next start destroys the journaled sessions (agent_recovery) and
    spools their proofs."""
    d = AgentDaemon(tmp_path, config={"sandbox": {"orphan_grace_seconds": 1}})
    d.start()
    sids = [d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
            for _ in range(2)]
    d.call("session.exec", {"session_id": sids[0], "command": "echo x > /work/f"})
    d.kill()
    time.sleep(1.5)
    d.start()
    try:
        pending = {p["session_id"]: p for p in d.call("proof.pending")}
        assert set(pending) == set(sids)
        for p in pending.values():
            assert p["reason"] == "agent_recovery"
            assert verify(p["cdp"])["valid"] is True
        assert d.call("session.get", {"session_id": sids[0]})["status"] in (
            "expired", "expired_unclean")
        assert d.call("agent.info")["capacity"]["sessions_live"] == 0
    finally:
        assert d.stop() == 0


def test_second_agent_on_same_state_dir_is_refused(tmp_path):
    """A second agent on a state directory in use exits 1 and leaves the first one serving."""
    import subprocess
    import sys

    with AgentDaemon(tmp_path) as d:
        r = subprocess.run([sys.executable, "-m", "agent.cli", "serve", "--config",
                            str(d.config_path), "--state-dir", str(d.state_dir),
                            "--runtime-dir", str(tmp_path / "run2")],
                           capture_output=True, timeout=60, cwd=d.base)
        assert r.returncode == 1 and b"another agent is running" in r.stderr
        assert d.call("agent.info")["node_id"] == "test-node"
