"""The systemd lane: the unit, installed the documented way, under systemd as PID 1 on a pure
cgroup v2 host.

Runs inside the VM that `scripts/vmtest.sh systemd` boots (systemd 252 as PID 1, this clone
read-only over 9p, /etc, /usr and /opt overlaid writable, /var/lib and /tmp on tmpfs);
anywhere else every test here is skipped.  The tests share one installed unit and run in file order: each leaves
the service active for the next.  Everything is ~20-40x slower under TCG (an agent start
takes ~30 s), so the waits are long; the unit gets one drop-in for that (TimeoutStartSec).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from guest import complete, memory_cap, session_survived_restart

from agent.cdp.verify import verify
from agent.rpc.client import Client

ROOT = Path(__file__).resolve().parents[2]
UNIT = "nanorix-agent.service"
SOCK = Path("/run/nanorix-agent/agent.sock")
CG = Path("/sys/fs/cgroup")
RESTART_TIMEOUT = 900.0  # watchdog (30 s) + stop + an agent start under TCG

pytestmark = pytest.mark.skipif(
    os.environ.get("NRX_VM_LANE") != "systemd" or not Path("/run/systemd/system").is_dir(),
    reason="needs systemd as PID 1 in the VM (run scripts/vmtest.sh systemd)")


def sh(*cmd: str, check: bool = True, timeout: float = RESTART_TIMEOUT) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} exited {res.returncode}: {res.stdout}{res.stderr}")
    return res.stdout + res.stderr


def show(*props: str) -> dict[str, str]:
    out = sh("systemctl", "show", UNIT, "-p", ",".join(props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def call(method: str, params: dict | None = None) -> object:
    with Client(SOCK, timeout=RESTART_TIMEOUT) as c:
        return c.call(method, params or {})


def wait_restarted(before: dict[str, str]) -> dict[str, str]:
    """Wait until systemd restarted the unit (NRestarts up, a new MainPID, active again)."""
    t0 = time.monotonic()
    while True:
        now = show("ActiveState", "SubState", "MainPID", "NRestarts", "Result")
        if (int(now["NRestarts"]) > int(before["NRestarts"]) and now["ActiveState"] == "active"
                and now["MainPID"] not in ("0", before["MainPID"])):
            return now
        assert time.monotonic() - t0 < RESTART_TIMEOUT, f"not restarted: {now}"
        time.sleep(2)


def install_documented() -> None:
    """Install the unit the documented way: scripts/install.sh.  The guest has no network for
    pip, so scripts/vmtest.sh ran the script on the host in its packaging mode (--root
    .vmtest/instroot, --prefix .vmtest/sysvenv with the distribution's python3); here its
    files are copied in and applied as the script's last step does on a systemd host."""
    for top in sorted((ROOT / ".vmtest" / "instroot").iterdir()):  # etc, usr (/ is read-only)
        sh("cp", "-a", f"{top}/.", f"/{top.name}/")
    sh("systemd-sysusers", "/etc/sysusers.d/nanorix-agent.conf")
    sh("systemd-tmpfiles", "--create", "/etc/tmpfiles.d/nanorix-agent.conf")
    # the VM only: TCG is 20-40x slower than the hosts the unit's timeouts are sized for
    dropin = Path("/etc/systemd/system/nanorix-agent.service.d")
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "vmtest-tcg.conf").write_text("[Service]\nTimeoutStartSec=900s\n")
    sh("systemctl", "daemon-reload")
    assert f"{ROOT}/.vmtest/sysvenv/bin/nanorix-agent" in show("ExecStart")["ExecStart"]


@pytest.fixture(scope="module", autouse=True)
def installed():
    install_documented()
    yield
    sh("systemctl", "stop", UNIT, check=False)


def test_start_reaches_ready():
    """`systemctl start` returns once the agent sent READY=1: the unit is active (running),
    the agent answers on the unit's socket and says it runs on cgroup v2."""
    sh("systemctl", "start", UNIT)
    st = show("ActiveState", "SubState", "Type")
    assert (st["ActiveState"], st["SubState"], st["Type"]) == ("active", "running", "notify")
    assert call("agent.info")["cgroup_mode"] == "v2"
    assert call("agent.health")["status"] in ("healthy", "degraded")


def _agent_sends_status() -> bool:
    import inspect

    from agent import daemon
    return "notifier.ready()" not in inspect.getsource(daemon.Daemon.run)


@pytest.mark.xfail(not _agent_sends_status(), strict=True,
                   reason="the agent sends READY=1 without STATUS= until issue 16 (operator) lands")
def test_status_shown_by_systemctl():
    """The agent's STATUS= text (sent with READY=1) is what systemctl shows for the unit."""
    assert show("StatusText")["StatusText"], "no STATUS= shown by systemctl"


def test_run_through_the_socket_and_cgroups_under_the_unit(tmp_path):
    """A session run with the CLI on the unit's socket: its cgroup sits in the unit's delegated
    cgroup (the agent itself in its leaf, +memory +pids +cpu enabled), and its proof verifies."""
    unit_cg = CG / show("ControlGroup")["ControlGroup"].lstrip("/")
    main = show("MainPID")["MainPID"]
    sid = call("session.create", {"customer_id": "vm", "tier": "free"})["session_id"]
    try:
        found = [p for p in unit_cg.rglob(sid) if p.is_dir()]
        assert len(found) == 1, f"session cgroup not under {unit_cg}"
        assert memory_cap(found[0]) == 256 * 1024 * 1024
        leaf = [p for p in unit_cg.rglob("cgroup.procs") if main in p.read_text().split()]
        assert [p.parent.name for p in leaf] == ["agent"]
        assert not (unit_cg / "cgroup.procs").read_text().split()
        assert {"memory", "pids", "cpu"} <= set(
            (unit_cg / "cgroup.subtree_control").read_text().split())
    finally:
        complete(call("session.destroy", {"session_id": sid}))
    out = sh(str(ROOT / ".venv/bin/nanorix-agent"), "run", "--cdp-out",
             str(tmp_path / "p.json"), "--", "echo hello from systemd")
    assert "hello from systemd" in out and "valid: true" in out
    assert verify(json.loads((tmp_path / "p.json").read_text()))["valid"] is True


def test_watchdog_restarts_a_stopped_agent():
    """SIGSTOP of the main pid stops the WATCHDOG=1 pings: systemd restarts the unit once
    (result watchdog) and the session the stopped agent held is not lost."""
    sid = call("session.create", {"customer_id": "vm", "tier": "free"})["session_id"]
    before = show("MainPID", "NRestarts")
    os.kill(int(before["MainPID"]), signal.SIGSTOP)
    now = wait_restarted(before)
    journal = sh("journalctl", "-u", UNIT, "-o", "cat", "--no-pager")
    assert "result 'watchdog'" in journal
    session_survived_restart(call, sid)
    restarts = int(now["NRestarts"]) - int(before["NRestarts"])
    if restarts != 1 and "219/CGROUP" in journal and _restart_blocked_by_survivors():
        pytest.xfail(
            f"{restarts} restarts, each failing with 219/CGROUP: with KillMode=process the "
            "sandboxes outlive the agent in the unit's cgroup, whose subtree_control has "
            "controllers, so systemd < 254 (no DelegateSubgroup=) cannot start the new main "
            "process there until they are gone (sandbox.orphan_grace_seconds): no re-adoption")
    assert restarts == 1, f"the watchdog took {restarts} restarts"


def _restart_blocked_by_survivors() -> bool:
    """KillMode=process on a systemd without DelegateSubgroup= (v254): the known limit."""
    version = int(sh("systemctl", "--version").split()[1])
    return show("KillMode")["KillMode"] == "process" and version < 254


def test_kill_9_restarts_and_recovers():
    """`systemctl kill -s KILL` (a crash of the whole unit): Restart=on-failure brings it back
    and recovery ends the session; nothing of it stays in the unit's cgroup."""
    sid = call("session.create", {"customer_id": "vm", "tier": "free"})["session_id"]
    before = show("MainPID", "NRestarts")
    sh("systemctl", "kill", "-s", "KILL", UNIT)
    wait_restarted(before)
    session_survived_restart(call, sid)
    unit_cg = CG / show("ControlGroup")["ControlGroup"].lstrip("/")
    assert not [p for p in unit_cg.rglob(sid)]


def test_stop_drains_with_complete_proofs():
    """`systemctl stop`: SIGTERM drains, every live session is destroyed (reason operator) and
    its complete proof spooled; the unit ends inactive (not failed), no cgroup of it remains;
    after the next start the proofs are pending."""
    sids = [call("session.create", {"customer_id": f"c{i}", "tier": "free"})["session_id"]
            for i in range(2)]
    unit_cg = CG / show("ControlGroup")["ControlGroup"].lstrip("/")
    sh("systemctl", "stop", UNIT)
    st = show("ActiveState", "Result", "ExecMainStatus")
    assert (st["ActiveState"], st["Result"], st["ExecMainStatus"]) == ("inactive", "success", "0")
    assert not unit_cg.exists()
    sh("systemctl", "start", UNIT)
    pending = {p["session_id"]: p for p in call("proof.pending")}
    for sid in sids:
        assert pending[sid]["reason"] == "operator"
        complete(pending[sid])


def test_systemd_analyze_security_matches_the_documented_score():
    """`systemd-analyze security` on the installed unit in a real systemd gives the overall
    exposure docs/operations.md reports."""
    out = sh("systemd-analyze", "security", "--no-pager", UNIT, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", out)
    assert m, out[-2000:]
    doc = (ROOT / "docs" / "operations.md").read_text()
    d = re.search(r"\*\*(\d+\.\d+) (\w+)\*\*", doc)
    assert d and (m.group(1), m.group(2)) == (d.group(1), d.group(2)), out[-3000:]
