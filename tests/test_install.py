"""scripts/install.sh on this machine into a temporary prefix and root: the files land where
the unit says, `systemd-analyze verify` accepts the installed unit, a second run succeeds
(idempotent), and the installed agent serves a session without systemd."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time

import pytest
from helpers_daemon import ROOT, to_toml
from suite import cgroup_prefix

pytestmark = pytest.mark.slow


def _install(prefix, root) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "--prefix", str(prefix),
                           "--root", str(root), "--no-apt", "--host-network"],
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("install")
    prefix, root = base / "opt", base / "root"
    r = _install(prefix, root)
    assert r.returncode == 0, r.stdout + r.stderr
    return prefix, root, r


def _directive(unit: str, key: str) -> str:
    return next(ln.split("=", 1)[1] for ln in unit.splitlines() if ln.startswith(key + "="))


def test_files_land_where_the_unit_says(installed):
    """ExecStart= points into the venv, Documentation='s file exists, snippets, completion,
    the drop-in and the PATH link are installed with their modes."""
    prefix, root, r = installed
    unit_path = root / "etc/systemd/system/nanorix-agent.service"
    unit = unit_path.read_text()
    exe = _directive(unit, "ExecStart").split()[0]
    assert exe == f"{prefix}/bin/nanorix-agent" and os.access(exe, os.X_OK)
    doc = next(w for w in _directive(unit, "Documentation").split() if w.startswith("file://"))
    assert (root / doc.removeprefix("file:///")).is_file()
    for rel in ("etc/sysusers.d/nanorix-agent.conf", "etc/tmpfiles.d/nanorix-agent.conf",
                "usr/share/bash-completion/completions/nanorix-agent",
                "etc/systemd/system/nanorix-agent.service.d/host-network.conf"):
        assert (root / rel).stat().st_mode & 0o777 == 0o644, rel
    assert unit_path.stat().st_mode & 0o777 == 0o644
    assert os.readlink(root / "usr/local/bin/nanorix-agent") == exe
    assert any((prefix / "lib").glob("python3*/site-packages/agent/_bin/nrx-init"))
    v = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and v.stdout.startswith("nanorix-agent ")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_installed_unit_verifies(installed):
    """`systemd-analyze verify` accepts the installed unit (its ExecStart= exists)."""
    _prefix, root, _r = installed
    unit = root / "etc/systemd/system/nanorix-agent.service"
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and unit.name not in r.stderr, r.stderr


def test_second_run_is_idempotent(installed):
    """Running the script again over the same prefix and root succeeds and changes no file."""
    prefix, root, _r = installed
    unit = (root / "etc/systemd/system/nanorix-agent.service").read_text()
    r = _install(prefix, root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (root / "etc/systemd/system/nanorix-agent.service").read_text() == unit


def test_installed_agent_serves_without_systemd(installed, tmp_path):
    """The installed binary's `serve` (temp dirs, this suite's prefix) answers `run` with
    stdin and --env, and stops cleanly on SIGTERM."""
    prefix, _root, _r = installed
    exe = str(prefix / "bin" / "nanorix-agent")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(to_toml({"sandbox": {"cgroup_prefix": cgroup_prefix("inst"),
                                        "uid_base": (1 << 21) * (2 + secrets.randbelow(1800))},
                            "node": {"max_sessions": 8}}))
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NOTIFY_SOCKET")}
    log = open(tmp_path / "agent.log", "wb")
    p = subprocess.Popen([exe, "serve", "--config", str(cfg), "--state-dir",
                          str(tmp_path / "state"), "--runtime-dir", str(run)],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 60
        while '"agent_ready"' not in (tmp_path / "agent.log").read_text():
            assert p.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "agent.log").read_text()[-3000:]
            time.sleep(0.1)
        r = subprocess.run([exe, "--socket", str(run / "agent.sock"), "run", "--env", "WHO=op",
                            "--", 'echo "$WHO"; cat /input/data'], input=b"from stdin",
                           capture_output=True, timeout=120, cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"op\nfrom stdin"
        assert b"valid: true" in r.stderr
        info = subprocess.run([exe, "--socket", str(run / "agent.sock"), "info"],
                              capture_output=True, timeout=60, env=env)
        assert json.loads(info.stdout)["version"]
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            assert p.wait(60) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
