"""Helpers shared by the VM lanes' tests (tests/vm): what they read back from the guest."""

from __future__ import annotations

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
    assert proof["cdp"]["destruction_state"] == "complete"
