"""The systemd unit (SPEC 11): verifies, keeps its hardening, and its security score holds."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "nanorix-agent.service"
ANALYZE = shutil.which("systemd-analyze")


def _directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k, []).append(v)
    return out


def _testable_copy(tmp_path) -> Path:
    """The unit with ExecStart pointing at this checkout's entry point (verify checks it exists)."""
    exe = Path(sys.executable).parent / "nanorix-agent"
    if not exe.exists():
        pytest.skip("nanorix-agent entry point not installed in this environment")
    p = tmp_path / "nanorix-agent.service"
    p.write_text(UNIT.read_text().replace("/opt/nanorix-agent/bin/nanorix-agent", str(exe)))
    return p


def test_unit_has_the_required_directives():
    """Type=notify with a watchdog and a SIGHUP reload, delegation, KillMode=control-group
    (systemd < 254 cannot restart a v2 unit whose cgroup still holds sandboxes), negative OOM
    score, hardening, and the host-wide lock directory."""
    d = _directives()
    want = {"Type": "notify", "NotifyAccess": "main", "Delegate": "yes",
            "KillMode": "control-group", "OOMScoreAdjust": "-900", "ProtectSystem": "strict",
            "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
            "SystemCallArchitectures": "native", "LockPersonality": "yes",
            "PrivateNetwork": "yes", "ProtectProc": "invisible",
            "ExecReload": "/bin/kill -HUP $MAINPID", "Restart": "on-failure",
            "StateDirectory": "nanorix-agent",
            "RuntimeDirectory": "nanorix-agent lock/nanorix-agent",
            "RuntimeDirectoryPreserve": "restart"}
    for k, v in want.items():
        assert d.get(k) == [v], k
    assert d["WatchdogSec"] and d["ExecStart"][0].endswith("nanorix-agent serve")
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # directives that would break sandboxes must stay off (see the comments in the unit)
    for k in ("ProtectKernelTunables", "ProtectKernelLogs", "ProtectHostname",
              "MemoryDenyWriteExecute", "RestrictNamespaces", "ProtectControlGroups",
              "SecureBits", "ProcSubset"):
        assert k not in d, k


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` accepts the unit without a warning."""
    p = _testable_copy(tmp_path)
    r = subprocess.run([ANALYZE, "verify", str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert str(p.name) not in r.stderr, r.stderr


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_security_exposure_stays_at_or_below_the_documented_score(tmp_path):
    """`systemd-analyze security --offline=true` gives at most the 4.0 documented in operations.md."""
    p = _testable_copy(tmp_path)
    r = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(p)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 4.0
    doc = (ROOT / "docs" / "operations.md").read_text()
    assert f"{float(m.group(1)):.1f}" in doc


def test_sysusers_and_tmpfiles_snippets():
    """sysusers creates the socket group; tmpfiles makes the state dir root-only."""
    su = (ROOT / "systemd" / "sysusers.d" / "nanorix-agent.conf").read_text()
    assert re.search(r"^g nanorix -$", su, re.M)
    tf = (ROOT / "systemd" / "tmpfiles.d" / "nanorix-agent.conf").read_text()
    assert re.search(r"^d /var/lib/nanorix-agent 0700 root root -$", tf, re.M)
    assert re.search(r"^d /run/nanorix-agent 0755 root root -$", tf, re.M)


def test_proc_overmounts_would_break_sandbox_proc_mount():
    """Why ProtectKernelTunables & co. stay off: a read-only /proc/sys overmount (what they do) makes
    the fresh /proc mount inside a new user namespace fail with EPERM (in a private mount ns)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("util-linux unshare missing")
    script = ("unshare --user --map-root-user --mount --pid --fork --mount-proc true; echo a=$?; "
              "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys; "
              "unshare --user --map-root-user --mount --pid --fork --mount-proc true; echo b=$?")
    r = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=30)
    assert "a=0" in r.stdout and "b=1" in r.stdout, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None or shutil.which("systemd-sysusers")
                    is None, reason="systemd tools not installed")
def test_snippets_apply_with_the_systemd_tools(tmp_path):
    """systemd-sysusers accepts the snippet (dry run) and systemd-tmpfiles creates the dirs with their modes."""
    su = ROOT / "systemd" / "sysusers.d" / "nanorix-agent.conf"
    r = subprocess.run(["systemd-sysusers", "--dry-run", str(su)], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and "nanorix" in r.stdout + r.stderr
    tf = ROOT / "systemd" / "tmpfiles.d" / "nanorix-agent.conf"
    r = subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(tf)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "var/lib/nanorix-agent").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "run/nanorix-agent").stat().st_mode & 0o777 == 0o755


def _unit_bounding_caps() -> list[str]:
    return [c.lower().removeprefix("cap_") for c in _directives()["CapabilityBoundingSet"][0].split()]


class WrappedDaemon:
    """The helper's daemon started through a wrapper command (setpriv, unshare, …)."""

    @staticmethod
    def make(base, wrapper: list[str]):
        from helpers_daemon import AgentDaemon, to_toml

        class Wrapped(AgentDaemon):
            def _start(self):
                self.base.mkdir(parents=True, exist_ok=True)
                self.config_path.write_text(to_toml(self.config))
                self._runs += 1
                self.log_path = self.base / f"agent-{self._runs}.log"
                with open(self.log_path, "wb") as logf:
                    self.proc = subprocess.Popen(
                        [*wrapper, sys.executable, "-m", "agent.cli", "serve", "--config",
                         str(self.config_path), "--state-dir", str(self.state_dir),
                         "--runtime-dir", str(self.runtime_dir)],
                        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                        env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
                self.wait_ready()
                return self

        return Wrapped(base)


def _lifecycle_all_steps_verified(d) -> None:
    assert d.call("agent.health")["status"] == "healthy"
    sid = d.call("session.create", {"customer_id": "c", "tier": "free",
                                    "data_classification": "PHI"})["session_id"]
    r = d.call("session.exec", {"session_id": sid, "command": "echo x > /work/f; cat /work/f"})
    assert r["exit_code"] == 0 and r["output"] == b"x\n"
    out = d.call("session.destroy", {"session_id": sid})
    assert out["status"] == "destroyed", [e for e in out["cdp"]["evidence"] if not e["ok"]]


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare missing")
def test_agent_works_in_the_units_network_and_proc_namespaces(tmp_path):
    """As PrivateNetwork=yes and ProtectProc=invisible set it up (a new network namespace;
    /proc replaced by a fresh procfs with hidepid=invisible, in a private mount namespace),
    the agent is healthy and a PHI session runs and is destroyed with every step verified."""
    setup = ('d=$(mktemp -d) && mount -t proc -o hidepid=invisible,nosuid,nodev,noexec proc "$d"'
             ' && umount -R /proc && mount --move "$d" /proc && rmdir "$d"'
             ' && grep -q "hidepid=invisible" /proc/self/mountinfo && exec "$@"')
    d = WrappedDaemon.make(tmp_path / "agent", ["unshare", "--net", "--mount", "--propagation",
                                                "private", "sh", "-c", setup, "sh"])
    d.start()
    try:
        import os

        assert os.readlink(f"/proc/{d.proc.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        _lifecycle_all_steps_verified(d)
    finally:
        d.stop()


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv missing")
def test_agent_works_under_the_units_privilege_model(tmp_path):
    """Under NoNewPrivileges and exactly the unit's bounding set (via setpriv), a session is
    created, runs, and is destroyed with every step verified."""
    bset = "-all," + ",".join("+" + c for c in _unit_bounding_caps())
    d = WrappedDaemon.make(tmp_path / "agent", ["setpriv", "--nnp", "--inh-caps=-all",
                                                f"--bounding-set={bset}", "--"])
    d.start()
    try:
        status = open(f"/proc/{d.proc.pid}/status").read()
        assert "NoNewPrivs:\t1" in status
        _lifecycle_all_steps_verified(d)
    finally:
        d.stop()
