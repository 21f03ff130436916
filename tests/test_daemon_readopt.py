"""Sessions outlive the agent (issue 12): a SIGKILLed agent's sandboxes wait in nrx-init
for `[sandbox] orphan_grace_seconds`; the restarted agent re-adopts every journaled live
session — the same sandbox, /work intact — and ends it later through the same pipeline,
with a complete proof."""

from __future__ import annotations

import os
import threading
import time

import pytest
from helpers_daemon import AgentDaemon, start_long_exec, wait_ended

from agent.cdp.verify import verify
from agent.service import faults

CFG = {"sandbox": {"orphan_grace_seconds": 30}}


def _crash_and_readopt(d: AgentDaemon) -> tuple[list[str], threading.Thread]:
    """3 live sessions (mid-exec, a file in /work, idle), SIGKILL, restart."""
    busy, files, idle = (d.call("session.create", {"customer_id": f"c{i}", "tier": "free"})
                         ["session_id"] for i in range(3))
    d.call("session.exec", {"session_id": files, "command": "echo kept > /work/f"})
    t = start_long_exec(d, busy)
    d.kill()
    d.start()
    return [busy, files, idle], t


def test_sigkilled_agent_readopts_three_sessions(tmp_path):
    """SIGKILL with 3 live sessions (mid-exec, file in /work, idle), restart on the same
    dirs: 3/3 active, /work intact, exec works, the cut-off exec has an interrupted
    receipt, and destroy gives 3 complete proofs."""
    d = AgentDaemon(tmp_path, config=CFG)
    d.start()
    try:
        (busy, files, idle), t = _crash_and_readopt(d)
        t.join(30)
        for sid in (busy, files, idle):
            assert d.call("session.get", {"session_id": sid})["status"] == "active"
        assert d.call("session.exec", {"session_id": files,
                                       "command": "cat /work/f"})["output"] == b"kept\n"
        r = d.call("session.exec", {"session_id": idle, "command": "echo again"})
        assert r["output"] == b"again\n" and r["receipt"]["seq"] == 1
        r = d.call("session.exec", {"session_id": busy, "command": "true"})
        assert r["receipt"]["seq"] == 2  # after the interrupted one
        for sid, execs in ((busy, 2), (files, 2), (idle, 1)):
            proof = d.call("session.destroy", {"session_id": sid})
            assert proof["status"] == "destroyed", proof["cdp"]["evidence"]
            assert all(ev["ok"] for ev in proof["cdp"]["evidence"]), sid
            assert proof["cdp"]["evidence"][7]["exec_count"] == execs
            assert verify(proof["cdp"])["valid"] is True
    finally:
        assert d.stop() == 0


def test_ttl_that_passed_while_down_ends_the_session_at_restart(tmp_path):
    """A session whose TTL passes while the agent is down is destroyed (ttl_expired) right
    after re-adoption, with a complete proof."""
    cfg = {**CFG, "tiers": {"free": {"max_ttl_seconds": 3, "default_ttl_seconds": 3}}}
    d = AgentDaemon(tmp_path, config=cfg)
    d.start()
    try:
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        d.kill()
        time.sleep(3.5)
        d.start()
        proof = wait_ended(d, sid)
        assert proof["reason"] == "ttl_expired" and proof["status"] == "expired"
        assert all(ev["ok"] for ev in proof["cdp"]["evidence"])
    finally:
        assert d.stop() == 0


def test_readopted_through_the_sandbox_root_when_the_host_view_is_gone(tmp_path):
    """A restarted agent in a new mount namespace (systemd gives each start one) no longer
    sees the session tmpfs mount: it re-adopts through the sandbox PID 1's root, /work is
    intact and destroy gives a complete proof (the agent's private mount namespace
    makes that every restart)."""
    from agent.sandbox import mounts

    d = AgentDaemon(tmp_path, config=CFG)
    d.start()
    try:
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        d.call("session.exec", {"session_id": sid, "command": "echo kept > /work/f"})
        d.kill()
        # the agent mounts in its own mount namespace (issue 13), which died with it: the
        # host never saw the session tmpfs, and the restarted agent has a new namespace
        assert not os.path.ismount(mounts.mount_path(d.runtime_dir, sid))
        d.start()
        assert d.call("session.get", {"session_id": sid})["status"] == "active"
        assert d.call("session.exec", {"session_id": sid,
                                       "command": "cat /work/f"})["output"] == b"kept\n"
        proof = d.call("session.destroy", {"session_id": sid})
        assert all(ev["ok"] for ev in proof["cdp"]["evidence"]), proof["cdp"]["evidence"]
        assert proof["status"] == "destroyed"
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("point", ["adopt.attached", "adopt.rekeyed", "adopt.confirmed",
                                   "adopt.journaled"])
def test_crash_during_readoption_leaves_each_session_adopted_or_proven(tmp_path, point):
    """The agent is killed again in the middle of re-adopting (at `point`, a test-only
    crash point: a kernel cannot crash a process at an exact line on demand); the next
    start still ends with every session adopted or proven — never both, never neither —
    and the exec the first crash cut off is on the record exactly once."""
    d = AgentDaemon(tmp_path, config=CFG)
    d.start()
    try:
        busy, idle = (d.call("session.create", {"customer_id": f"c{i}", "tier": "free"})
                      ["session_id"] for i in range(2))
        t = start_long_exec(d, busy)
        d.kill()
        t.join(30)
        d.extra_env[faults.ENV] = point
        with pytest.raises(RuntimeError, match="exited"):
            d.start()
        d.extra_env.clear()
        d.start()
        pending = {p["session_id"] for p in d.call("proof.pending")}
        for sid in (busy, idle):
            active = d.call("session.get", {"session_id": sid})["status"] == "active"
            assert active != (sid in pending), (sid, active, pending)
        for sid, execs in ((busy, 1), (idle, 0)):
            if sid in pending:
                continue
            proof = d.call("session.destroy", {"session_id": sid})
            assert proof["status"] == "destroyed", proof["cdp"]["evidence"]
            assert proof["cdp"]["evidence"][7]["exec_count"] == execs
            assert verify(proof)["checks"]["receipt_keys"] is True
    finally:
        assert d.stop() == 0


def test_oom_while_the_agent_is_down_ends_the_session_after_readoption(tmp_path):
    """A background memory bomb hits the cap while the agent is down: the guard (still in
    the cgroup) keeps the kernel killer away, the session waits stalled at its cap, and
    right after re-adoption it ends `expired`/`oom` with every step ok."""
    cfg = {**CFG, "tiers": {"free": {"memory_bytes": 64 << 20, "tmpfs_bytes": 16 << 20}}}
    d = AgentDaemon(tmp_path, config=cfg)
    d.start()
    try:
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        d.call("session.exec", {"session_id": sid, "command":
                                "(sleep 1; exec python3 -c 'b = bytearray(2 << 30)') "
                                ">/dev/null 2>&1 &"})
        d.kill()
        time.sleep(2.5)  # the bomb ran into the cap meanwhile
        d.start()
        proof = wait_ended(d, sid)
        assert proof["reason"] == "oom" and proof["status"] == "expired", proof["cdp"]["evidence"]
        ev3 = proof["cdp"]["evidence"][2]
        assert ev3["oom_contained"] and ev3["kernel_oom_kills"] == 0
    finally:
        assert d.stop() == 0
