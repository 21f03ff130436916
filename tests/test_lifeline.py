"""Lifetime (SPEC 3): sandboxes die with the agent (lifeline fd, no parent-death signal),
and killing a sandbox leaves nothing behind."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import test_sandbox_fixtures as fx

from agent.sandbox import SandboxEngine, namespaces

sandbox_cfg, engine, sandbox = fx.sandbox_cfg, fx.engine, fx.sandbox  # fixtures

PR_SET_CHILD_SUBREAPER = 36
AGENT_SCRIPT = textwrap.dedent("""
    import json, sys, trio
    from pathlib import Path
    from agent.config import Config, Tier, MiB
    from agent.sandbox import SandboxEngine

    async def main():
        cfg = Config()
        cfg.paths.state_dir, cfg.paths.runtime_dir = Path(sys.argv[1]), Path(sys.argv[2])
        cfg.sandbox.cgroup_prefix = sys.argv[3]
        cfg.sandbox.orphan_grace_seconds = 0  # no re-attach: the lifeline ends the sandbox
        cfg.tiers["tiny"] = Tier(memory_bytes=64 * MiB, tmpfs_bytes=16 * MiB, pids_max=32)
        eng = SandboxEngine(cfg)
        out = []
        for i in range(2):
            sb = await eng.create(f"sess_{i:016x}", tier="tiny", classification="general")
            await sb.exec("sleep 60 >/dev/null 2>&1 &", timeout=10)
            out.append({"pid": sb.init_pid, "pidns": sb.namespaces["pid"]})
        print("BOXES " + json.dumps(out), flush=True)
        await trio.sleep_forever()

    trio.run(main)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_killing_the_agent_takes_its_sandboxes_down_within_a_second(sandbox_cfg):
    """SIGKILL of an agent process with 2 sandboxes and no orphan grace: every sandbox
    process is gone in < 1 s."""
    libc = ctypes.CDLL(None, use_errno=True)
    # orphaned sandbox PID 1s are reparented to us, so we can reap them (no leftovers)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    agent = None
    try:
        agent = subprocess.Popen(
            [sys.executable, "-c", AGENT_SCRIPT, str(sandbox_cfg.paths.state_dir),
             str(sandbox_cfg.paths.runtime_dir), sandbox_cfg.sandbox.cgroup_prefix],
            stdout=subprocess.PIPE, text=True)
        line = ""
        while not line.startswith("BOXES "):
            line = agent.stdout.readline()
            assert line, "the agent script died"
        boxes = json.loads(line[6:])
        inside = {b["pid"]: namespaces.pids_in_pidns(b["pidns"]) for b in boxes}
        assert all(len(p) >= 2 for p in inside.values())  # init + the background sleep
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        t0 = time.monotonic()
        while any(_alive(p) for ps in inside.values() for p in ps):
            assert time.monotonic() - t0 < 1.0, "sandboxes outlived the agent by > 1 s"
            time.sleep(0.005)
        for pid in inside:
            os.waitpid(pid, 0)
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        # the dead agent's cgroups and tmpfs mounts: what the recovery sweep is for
        eng = SandboxEngine(sandbox_cfg)
        swept = eng.sweep_leftovers()
        eng.cgroups.remove_root()
    assert swept["mounts"] == 2 and swept["cgroups"] == 2 and not swept["errors"]


async def test_killing_a_sandbox_with_100_processes_leaves_nothing(engine):
    """teardown of a sandbox running 100 processes: no process, cgroup or mount remains."""
    sb = await engine.create(fx.new_session_id(), tier="free", classification="general")
    r = await sb.exec("for i in $(seq 100); do sleep 60 >/dev/null 2>&1 & done", timeout=30)
    assert r.exit_code == 0
    pids = sb.cgroup.pids()
    assert len(pids) >= 101
    pidns = sb.namespaces["pid"]
    assert len(namespaces.pids_in_pidns(pidns)) >= 101
    paths = list(sb.cgroup.paths)
    t0 = time.monotonic()
    await sb.teardown()
    took = time.monotonic() - t0
    assert namespaces.pids_in_pidns(pidns) == []
    assert not any(_alive(p) for p in pids)
    assert not any(p.exists() for p in paths)
    assert not sb.root_mount_path.exists()
    assert sb.session_id not in engine.live and sb.slot not in engine.slots.in_use()
    assert took < 1.0
