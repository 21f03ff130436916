"""`nanorix-agent doctor` (SPEC 11): one line per check, the fix on warn/fail, exit code."""

from __future__ import annotations

import json

from agent import doctor
from agent.config import Config

EXPECTED = ["namespace.user", "namespace.mount", "namespace.pid", "namespace.net", "userns.max",
            "userns.apparmor", "cgroup.mode", "cgroup.controllers", "cgroup.delegation",
            "libseccomp", "pidfd_open", "openat2", "swap", "init_on_free", "core_pattern",
            "memory", "uid_range"]


def test_doctor_on_this_machine_prints_every_check_and_exits_right(capsys):
    """Every check prints one ok/warn/fail line (fix on non-ok) and the exit code reflects fails."""
    rc = doctor.main([])
    lines = capsys.readouterr().out.splitlines()
    names = [ln.split()[1] for ln in lines[:-1]]
    for n in EXPECTED:
        assert names.count(n) == 1, n
    for ln in lines[:-1]:
        level = ln.split()[0]
        assert level in ("ok", "warn", "fail")
        if level != "ok":
            assert "— fix: " in ln
    fails = sum(ln.split()[0] == "fail" for ln in lines[:-1])
    assert rc == (1 if fails else 0)
    # facts of this machine kind (NOTES): namespaces work, no swap, init_on_free off
    by = {ln.split()[1]: ln.split()[0] for ln in lines[:-1]}
    assert by["namespace.user"] == by["namespace.net"] == "ok"
    assert by["openat2"] == by["pidfd_open"] == "ok"


def test_doctor_fails_when_capacity_exceeds_memory(tmp_path, capsys):
    """A configured capacity above MemTotal is a fail, with the fix, and exit status 1."""
    cfgf = tmp_path / "agent.toml"
    cfgf.write_text(f"[node]\nmemory_capacity_bytes = {1 << 50}\n")
    rc = doctor.main(["--config", str(cfgf), "--json"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert checks["memory"]["level"] == "fail"
    assert "node.memory_capacity_bytes" in checks["memory"]["fix"]
    assert rc == 1


def test_restrictions_are_reported_with_their_fix(monkeypatch):
    """No user namespaces, an AppArmor restriction and a piped core_pattern are each caught."""
    fake = {"/proc/sys/user/max_user_namespaces": "0",
            "/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "1",
            "/proc/sys/kernel/core_pattern": "|/usr/lib/systemd/systemd-coredump %P",
            "/proc/swaps": "Filename Type\n/swapfile file 100 0 -2"}
    real = doctor._read
    monkeypatch.setattr(doctor, "_read", lambda p: fake.get(p, real(p)))
    checks = {c.name: c for c in doctor.check_userns_limits(Config())}
    assert checks["userns.max"].level == "fail" and "sysctl" in checks["userns.max"].fix
    assert checks["userns.apparmor"].level == "warn"
    assert doctor.check_core_pattern().level == "warn"
    assert doctor.check_swap().level == "warn"


def test_bad_config_is_a_fail(tmp_path, capsys):
    """An invalid config file is reported as a failing check, not a traceback."""
    cfgf = tmp_path / "agent.toml"
    cfgf.write_text("[nope]\n")
    assert doctor.main(["--config", str(cfgf)]) == 1
    assert capsys.readouterr().out.startswith("fail  config")


def test_uid_range_overlapping_subuid_is_a_fail(tmp_path):
    """A sandbox uid range that overlaps a rootless-container subordinate range fails with its fix."""
    sub = tmp_path / "subuid"
    sub.write_text("alice:100000:65536\nbob:300000:65536\n")
    c = doctor.check_uid_range(Config(), subid_files=(str(sub),))
    assert c.level == "fail" and "bob:300000:65536" in c.detail and "uid_base" in c.fix
    cfg = Config()
    cfg.sandbox.uid_base, cfg.node.max_sessions = 4_000_000_000, 1  # a range nobody runs in
    assert doctor.check_uid_range(cfg, subid_files=(str(sub),)).level == "ok"


def test_cli_dispatches_doctor():
    """`nanorix-agent doctor` through the real CLI prints the checks and exits with doctor's code."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "agent.cli", "doctor", "--json"], cwd=root,
                       capture_output=True, text=True, timeout=60)
    checks = json.loads(r.stdout)
    assert {c["name"] for c in checks} >= set(EXPECTED)
    assert r.returncode == (1 if any(c["level"] == "fail" for c in checks) else 0)
