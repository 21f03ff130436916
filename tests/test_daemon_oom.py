"""OOM ends the session (SPEC 3.5, issue 12): the agent, not the kernel, handles a session
at its memory cap — the kernel OOM killer is kept away, the agent freezes the session with
nothing freed, wipes it and only then kills it: status `expired`, reason `oom`, every
destruction step ok, and the exec in flight answers with `oom_killed: true` and a receipt."""

from __future__ import annotations

import threading
import time

from helpers_daemon import AgentDaemon, wait_ended

from agent.cdp.verify import verify

MiB = 1024 * 1024
CFG = {"tiers": {"free": {"memory_bytes": 64 * MiB, "tmpfs_bytes": 16 * MiB}}}
BOMBS = {
    "huge": "python3 -c 'b = bytearray(2 << 30); print(len(b))'",
    "loop": "python3 -c 'x = []\nwhile True: x.append(bytearray(1 << 20))'",
    "background": "python3 -c 'x = []\nwhile True: x.append(b\"y\" * (1 << 20))' & sleep 60",
}


def _bomb(d: AgentDaemon, kind: str, out: dict, n: int) -> None:
    sid = d.call("session.create", {"customer_id": f"c{n}", "tier": "free"})["session_id"]
    res = d.call("session.exec", {"session_id": sid, "command": BOMBS[kind]})
    out[sid] = (kind, res, wait_ended(d, sid))


def test_memory_bombs_end_expired_oom_with_complete_proofs(tmp_path):
    """10 memory bombs of 3 kinds (one huge allocation, a growth loop, a background
    process), 5 at a time: 10/10 end `expired`/`oom` with every step ok, the foreground
    exec answers `oom_killed: true` with an interrupted receipt, the kernel killed nothing,
    and agent.health answers within 1 s throughout."""
    with AgentDaemon(tmp_path, config=CFG) as d:
        results: dict = {}
        health_errors: list[BaseException] = []
        stop = threading.Event()

        def health() -> None:
            while not stop.is_set():
                try:
                    d.call("agent.health", timeout=1.0)
                except BaseException as e:  # reported below
                    health_errors.append(e)
                time.sleep(0.1)

        h = threading.Thread(target=health)
        h.start()
        try:
            kinds = [list(BOMBS)[i % 3] for i in range(10)]
            for batch in (range(5), range(5, 10)):
                threads = [threading.Thread(target=_bomb, args=(d, kinds[n], results, n))
                           for n in batch]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
        finally:
            stop.set()
            h.join()
        assert not health_errors, health_errors[:3]
        assert len(results) == 10
        for kind, res, proof in results.values():
            assert res["oom_killed"] is True, (kind, res)
            assert res["interrupted"] == "oom" and res["receipt"]["interrupted"] == "oom"
            assert res["exit_code"] == 137 and res["receipt"]["seq"] == 1
            assert proof["reason"] == "oom" and proof["status"] == "expired", (kind, proof)
            evidence = proof["cdp"]["evidence"]
            assert all(ev["ok"] for ev in evidence), (kind, evidence)
            step3 = evidence[2]
            assert step3["oom_killer_disabled"] and step3["oom_contained"]
            assert step3["kernel_oom_kills"] == 0 and not step3["oom_kernel_fallback"]
            assert step3["oom_over_cap_bytes"] <= 8 * MiB  # within the headroom
            # SPEC 13 limit, recorded rather than claimed
            assert step3["pipe_socket_buffers_wiped"] is False and "pipe_buffer_bytes" in step3
            assert evidence[7]["exec_count"] == 1  # the interrupted exec is on the record
            assert verify(proof["cdp"])["valid"] is True
        assert d.call("agent.health")["status"] in ("healthy", "degraded")
