"""OOM ends the session (SPEC 3.5): a command that exceeds the tier's memory cap gets the
session destroyed by the agent with reason `oom`, status `expired`, and a spooled CDP."""

from __future__ import annotations

import time

from helpers_daemon import AgentDaemon

from agent.cdp.verify import verify
from agent.errors import Conflict

MiB = 1024 * 1024


def test_oom_destroys_session_with_reason_oom(tmp_path):
    """Allocating past a 64 MiB cap OOM-kills the command and expires the session (reason oom)."""
    cfg = {"tiers": {"free": {"memory_bytes": 64 * MiB, "tmpfs_bytes": 16 * MiB}}}
    with AgentDaemon(tmp_path, config=cfg) as d:
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        try:
            res = d.call("session.exec", {
                "session_id": sid,
                "command": "python3 -c 'b = bytearray(256 * 1024 * 1024); print(len(b))'"})
            assert res["oom_killed"] is True and res["exit_code"] != 0
        except Conflict as e:  # the OOM destroy may end the session before the exec returns
            assert "oom" in e.message
        t0 = time.monotonic()
        while d.call("session.get", {"session_id": sid})["status"] in ("active", "executing"):
            assert time.monotonic() - t0 < 15, "session was not ended after the OOM kill"
            time.sleep(0.05)
        proof = d.call("proof.get", {"session_id": sid})
        assert proof["reason"] == "oom"
        assert proof["status"] in ("expired", "expired_unclean")
        assert verify(proof["cdp"])["valid"] is True
