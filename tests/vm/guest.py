"""Helpers shared by the VM lanes' tests (tests/vm): what they read back from the guest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from agent.cdp.verify import verify


def memory_cap(cgroup: Path) -> int:
    """The session's memory cap as the kernel holds it: memory.high when the agent's OOM guard
    set one (memory.max then sits above it, as headroom), else memory.max."""
    high = (cgroup / "memory.high").read_text().strip()
    mx = int((cgroup / "memory.max").read_text())
    cap = mx if high == "max" else int(high)
    assert mx >= cap, f"memory.max {mx} below memory.high {cap}"
    return cap


def complete(proof: dict) -> None:
    """A proof whose CDP verifies and says the destruction was complete."""
    res = verify(proof["cdp"])
    assert res["valid"] is True, res["errors"]
    failed = {i + 1: e.get("error") for i, e in enumerate(proof["cdp"]["evidence"])
              if e.get("ok") is not True}
    assert proof["cdp"]["destruction_state"] == "complete", f"failed steps: {failed}"


def session_survived_restart(call: Callable[[str, dict], object], sid: str) -> None:
    """A session whose agent died is never lost: recovery ended it (reason agent_recovery,
    a valid proof that says honestly whether the destruction could be completed), or the
    restarted agent re-adopted it (live again, and its destroy proof is complete)."""
    pending = {p["session_id"]: p for p in call("proof.pending", {})}
    if sid in pending:
        assert pending[sid]["reason"] == "agent_recovery"
        assert pending[sid]["status"] in ("expired", "expired_unclean")
        assert verify(pending[sid]["cdp"])["valid"] is True
        call("proof.ack", {"session_id": sid})
    else:
        assert call("session.get", {"session_id": sid})["status"] == "active"
        complete(call("session.destroy", {"session_id": sid}))
