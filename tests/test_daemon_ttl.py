"""TTL on the node (SPEC 2, 4): sessions expire with nobody connected, mid-exec too; exec
timeouts default to and are clamped by the remaining TTL; the TTL policy clamps or
refuses a request above the tier maximum."""

from __future__ import annotations

import time

import pytest
from helpers_daemon import AgentDaemon

from agent.cdp.verify import verify
from agent.errors import BadRequest

SHORT = {"tiers": {"free": {"max_ttl_seconds": 2, "default_ttl_seconds": 2}},
         "exec": {"kill_grace_seconds": 0.5}}


def _wait_status(d, sid, statuses, timeout=15.0) -> dict:
    t0 = time.monotonic()
    while True:
        got = d.call("session.get", {"session_id": sid})
        if got["status"] in statuses:
            return got
        assert time.monotonic() - t0 < timeout, got
        time.sleep(0.1)


def test_ttl_expiry_with_nobody_connected(tmp_path):
    """An idle session reaching its TTL is destroyed by the agent: expired (every step
    verified, SPEC 2) + spooled CDP."""
    with AgentDaemon(tmp_path, config=SHORT) as d:
        sid = d.call("session.create", {"customer_id": "c", "tier": "free",
                                        "ttl_seconds": 1})["session_id"]
        # every connection is closed now; the agent alone must end the session
        got = _wait_status(d, sid, ("expired", "expired_unclean"))
        assert got["status"] == "expired"
        spooled = d.state_dir / "spool" / f"{sid}.json"
        assert spooled.exists()
        proof = d.call("proof.get", {"session_id": sid})
        assert proof["status"] == got["status"] and proof["reason"] == "ttl_expired"
        assert proof["cdp"]["evidence"][7]["reason"] == "ttl_expired"
        assert verify(proof["cdp"])["valid"] is True
        assert d.call("agent.info")["capacity"]["sessions_live"] == 0


def test_ttl_expiry_mid_exec(tmp_path):
    """A session whose TTL runs out during a long exec is ended anyway; the exec is stopped
    and still answers with a result and a receipt (cut by its timeout, clamped to the ~2 s
    left, or marked interrupted by the TTL when the destruction got there first)."""
    with AgentDaemon(tmp_path, config=SHORT) as d:
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        t0 = time.monotonic()
        res = d.call("session.exec", {"session_id": sid, "command": "sleep 60",
                                      "timeout": 600})
        assert res["timed_out"] is True or res["interrupted"] == "ttl_expired"
        assert res["receipt"]["seq"] == 1
        assert time.monotonic() - t0 < 10
        assert _wait_status(d, sid, ("expired", "expired_unclean"))["status"] == "expired"
        assert d.call("proof.get", {"session_id": sid})["reason"] == "ttl_expired"


def test_exec_timeout_is_clamped_to_remaining_ttl(tmp_path):
    """An exec asking for more time than the session has left is cut at the TTL."""
    cfg = {"tiers": {"free": {"max_ttl_seconds": 4, "default_ttl_seconds": 4}},
           "exec": {"kill_grace_seconds": 0.2}}
    with AgentDaemon(tmp_path, config=cfg) as d:
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        t0 = time.monotonic()
        res = d.call("session.exec", {"session_id": sid, "command": "sleep 30",
                                      "timeout": 1000})
        # the TTL destroy may win the race against the timeout: then the exec is
        # interrupted, with its receipt
        assert res["timed_out"] is True or res["interrupted"] == "ttl_expired"
        assert time.monotonic() - t0 < 4 + 3


def test_exec_timeout_below_ttl_is_kept(tmp_path):
    """A timeout shorter than the remaining TTL applies as asked."""
    with AgentDaemon(tmp_path, config={"exec": {"kill_grace_seconds": 0.2}}) as d:
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        t0 = time.monotonic()
        res = d.call("session.exec", {"session_id": sid, "command": "sleep 30", "timeout": 0.5})
        assert res["timed_out"] is True and time.monotonic() - t0 < 3
        assert d.call("session.get", {"session_id": sid})["status"] == "active"
        d.call("session.destroy", {"session_id": sid})


def test_ttl_policy_clamp_shows_clamped_value(tmp_path):
    """Default policy clamp: ttl above the tier max is lowered to the max and reported."""
    with AgentDaemon(tmp_path) as d:
        res = d.call("session.create", {"customer_id": "c", "tier": "free",
                                        "ttl_seconds": 9999})
        assert res["ttl_seconds"] == 300
        assert d.call("session.get", {"session_id": res["session_id"]})["ttl_seconds"] == 300
        d.call("session.destroy", {"session_id": res["session_id"]})


def test_ttl_policy_refuse_is_bad_request(tmp_path):
    """Policy refuse: ttl above the tier max is BadRequest naming ttl_seconds."""
    with AgentDaemon(tmp_path, config={"node": {"ttl_policy": "refuse"}}) as d:
        with pytest.raises(BadRequest) as e:
            d.call("session.create", {"customer_id": "c", "tier": "free", "ttl_seconds": 301})
        assert e.value.field == "ttl_seconds"
        assert d.call("agent.info")["capacity"]["sessions_live"] == 0
