"""An exec cut off by an agent crash in a session that ran into its memory cap while the
agent was down (issue 12): the restarted agent, unable to ask the stalled PID 1, still
gives the exec its `interrupted` receipt, and the session ends `expired`/`oom` with a
complete proof."""

from __future__ import annotations

import time

import pytest
from helpers_daemon import AgentDaemon, start_long_exec, wait_ended

from agent.cdp.verify import verify
from agent.service import faults

CFG = {"sandbox": {"orphan_grace_seconds": 30},
       "tiers": {"free": {"memory_bytes": 64 << 20, "tmpfs_bytes": 16 << 20}}}


@pytest.mark.parametrize("crash_again", [None, "adopt.confirmed"])
def test_exec_cut_by_crash_then_oom_while_down_gets_its_receipt(tmp_path, crash_again):
    """SIGKILL the agent mid-exec, a background bomb pushes the session over its cap while
    the agent is down, restart: the session ends expired/oom with every step ok, and
    the cut-off exec is counted and receipted exactly once (exec_count 2: the bomb's
    launcher and the interrupted one) under a key the proof lists — also when the
    restarted agent is killed again right after re-adopting it (`crash_again`, a
    test-only crash point: a kernel cannot crash a process at an exact line)."""
    d = AgentDaemon(tmp_path, config=CFG)
    d.start()
    try:
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        d.call("session.exec", {"session_id": sid, "command":
                                "(sleep 1.5; exec python3 -c 'b = bytearray(2 << 30)') "
                                ">/dev/null 2>&1 &"})
        t = start_long_exec(d, sid)
        d.kill()
        t.join(30)
        time.sleep(3.5)  # the bomb ran into the cap meanwhile
        if crash_again:
            d.extra_env[faults.ENV] = crash_again
            with pytest.raises(RuntimeError, match="exited"):
                d.start()
            d.extra_env.clear()
        d.start()
        proof = wait_ended(d, sid)
        ev = proof["cdp"]["evidence"]
        assert proof["reason"] == "oom" and proof["status"] == "expired", ev
        assert all(e["ok"] for e in ev), ev
        assert ev[7]["exec_count"] == 2, ev[7]
        assert ev[2]["oom_contained"] and ev[2]["kernel_oom_kills"] == 0
        assert [k["epoch"] for k in ev[7]["receipt_keys"]] == [0, 1, 2][:3 if crash_again else 2]
        assert verify(proof)["valid"] is True
    finally:
        assert d.stop() == 0
