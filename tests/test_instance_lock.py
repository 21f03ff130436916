"""One agent per cgroup prefix and uid range (agent/ops/instance_lock.py), with real daemons."""

from __future__ import annotations

import copy
from pathlib import Path

from helpers_daemon import AgentDaemon


def _twin(first: AgentDaemon, base, **over) -> AgentDaemon:
    """A daemon on its own state and runtime dirs with `first`'s prefix and uid range."""
    d = AgentDaemon(base)
    d.config = copy.deepcopy(first.config)
    for section, values in over.items():
        d.config[section].update(values)
    return d


def _refusal(d: AgentDaemon) -> tuple[int, str]:
    try:
        d._start()  # not start(): it would draw another uid range after an overlap
    except RuntimeError:
        return d.proc.returncode, d.log_text()
    d.stop()
    raise AssertionError("the second agent started")


def test_second_agent_on_the_same_prefix_refuses_with_one_line(tmp_path):
    """A second agent with different state/runtime dirs but the same cgroup prefix exits 1
    with one line naming the first one's pid and dirs; the first one's session survives."""
    with AgentDaemon(tmp_path / "a") as first:
        sid = first.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        second = _twin(first, tmp_path / "b")
        rc, out = _refusal(second)
        assert rc == 1
        lines = [ln for ln in out.splitlines() if ln.startswith("nanorix-agent:")]
        assert len(lines) == 1, out
        assert f"pid {first.proc.pid}" in lines[0]
        assert str(first.state_dir) in lines[0] and str(first.runtime_dir) in lines[0]
        assert "cgroup prefix" in lines[0]
        assert "Traceback" not in out
        assert not second.socket.exists()
        r = first.call("session.exec", {"session_id": sid, "command": "echo alive"})
        assert r["output"] == b"alive\n"
        assert first.call("session.get", {"session_id": sid})["status"] == "active"


def test_overlapping_uid_range_is_refused_and_the_lock_dies_with_the_agent(tmp_path):
    """Another prefix with an overlapping sandbox uid range is refused; after the first agent
    is SIGKILLed the overlapping one starts (sweeping the dead agent's lock file) and so does
    the same prefix again."""
    first = AgentDaemon(tmp_path / "a")
    first.start()
    try:
        other = _twin(first, tmp_path / "b", sandbox={
            "cgroup_prefix": first.config["sandbox"]["cgroup_prefix"] + "-other",
            "uid_base": first.config["sandbox"]["uid_base"] + 65536})
        rc, out = _refusal(other)
        assert rc == 1 and "overlap ours" in out and f"pid {first.proc.pid}" in out
    finally:
        first.kill()
    stale = Path("/run/lock/nanorix-agent") / f"prefix-{first.config['sandbox']['cgroup_prefix']}.lock"
    assert stale.exists()  # SIGKILL: no clean-up, but the kernel dropped the flock
    other._start()  # the same overlap, now with a dead holder: starts, sweeps the stale file
    assert not stale.exists()
    other.stop()
    again = _twin(first, tmp_path / "c")
    again.start()  # the kernel dropped the dead agent's flock
    again.stop()
    first.start()  # its own dirs again: recovery runs, nothing else holds the prefix
    first.stop()
