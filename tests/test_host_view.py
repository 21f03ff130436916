"""The host sees nothing of a live session (issue 13): the session tmpfs is mounted only in
the agent's own mount namespace, session directories are 0700 root, and an unprivileged
host user (uid/gid 65534 via setpriv) can neither list, read nor write any of it, with the
daemon in the foreground and after it was SIGKILLed."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers_daemon import AgentDaemon

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--"]
pytestmark = pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")


@pytest.fixture
def open_base():
    """A base directory every host user may traverse (0755 up to /), unlike pytest's
    0700 tmp_path: so a refusal below it comes from the agent's own modes."""
    d = Path(tempfile.mkdtemp(prefix="nrx-hostview-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def as_nobody(script: str) -> list[str]:
    """Run `script` (one probe per line, each printing `ok` or `no`) as uid 65534."""
    r = subprocess.run([*NOBODY, "sh", "-c", script], capture_output=True, text=True,
                       timeout=30, cwd="/")
    return r.stdout.split()


def probes(paths: list[str]) -> str:
    lines = []
    for p in paths:
        lines += [f"ls -A '{p}' >/dev/null 2>&1 && echo ok || echo no",
                  f"cat '{p}/input/data' >/dev/null 2>&1 && echo ok || echo no",
                  f"cat '{p}/tmp/t' >/dev/null 2>&1 && echo ok || echo no",
                  f"touch '{p}/tmp/x' 2>/dev/null && echo ok || echo no",
                  f"touch '{p}/dev/shm/x' 2>/dev/null && echo ok || echo no"]
    return "\n".join(lines)


def sandbox_inits(agent_pid: int) -> list[int]:
    """Host pids of the daemon's sandbox PID 1s (its children named nrx-init)."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:]
        if comm == "nrx-init" and int(rest.split()[1]) == agent_pid:
            out.append(int(p))
    return out


def test_unprivileged_user_reaches_nothing_of_a_live_session(open_base):
    """Foreground daemon, live session with input, /tmp and /dev/shm files: the host's mount
    table has no session mount, and uid 65534 can list the runtime dir but not list, read
    or write the session through its host path, the agent's /proc/PID/root or the sandbox
    PID 1's /proc/PID/root; the same after the agent is SIGKILLed."""
    d = AgentDaemon(open_base / "agent")
    d.start()
    try:
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        d.call("session.exec", {"session_id": sid, "input_data": b"secret\n",
                                "command": "echo t > /tmp/t; echo s > /dev/shm/s; cat /input/data"})
        run = d.runtime_dir
        host_path = run / "sessions" / sid / "root"
        assert as_nobody(f"ls '{run}' >/dev/null && echo ok || echo no") == ["ok"]
        # the host's mount table (this test's namespace) never lists the session tmpfs;
        # the agent's own namespace does
        assert str(run) not in Path("/proc/self/mountinfo").read_text()
        assert str(host_path) in Path(f"/proc/{d.proc.pid}/mountinfo").read_text()
        assert (run / "sessions").stat().st_mode & 0o777 == 0o700
        inits = sandbox_inits(d.proc.pid)
        assert inits
        paths = [str(host_path), f"/proc/{d.proc.pid}/root{host_path}",
                 *[f"/proc/{p}/root" for p in inits]]
        assert as_nobody(probes(paths)) == ["no"] * 5 * len(paths)
        # root can reach it through the sandbox PID 1 (what a re-adopting agent uses)
        assert Path(f"/proc/{inits[0]}/root/tmp").is_dir()

        d.kill()
        paths = [str(host_path), *[f"/proc/{p}/root" for p in inits]]
        assert as_nobody(probes(paths)) == ["no"] * 5 * len(paths)
        assert str(run) not in Path("/proc/self/mountinfo").read_text()
        d.start()  # recovery reclaims what the dead agent left
    finally:
        d.stop()
