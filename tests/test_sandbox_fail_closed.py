"""Fail closed (issue 13): nrx-init never runs a command without its seccomp filter, and
the smaller in-sandbox findings (login uid, umask, PID 1's name) stay closed."""

from __future__ import annotations

import os

import pytest
import test_sandbox_fixtures as fx

from agent.sandbox import SandboxEngine
from agent.sandbox.engine import SandboxError
from agent.sandbox.faults import ExecFailed

sandbox_cfg, engine, sandbox = fx.sandbox_cfg, fx.engine, fx.sandbox  # fixtures

# one classic-BPF instruction with an opcode the kernel does not know: it passes the
# agent's framing (a whole 8-byte instruction) and is refused by prctl(PR_SET_SECCOMP)
INVALID_BPF = b"\xff\xff\x00\x00\x00\x00\x00\x00"


async def test_no_filter_no_sandbox(sandbox_cfg):
    """A config without a seccomp filter is refused by nrx-init: create fails with an error
    that says why, and no sandbox (so no command) exists."""
    eng = SandboxEngine(sandbox_cfg, seccomp_compiler=lambda name: b"")
    try:
        with pytest.raises(SandboxError, match="no usable seccomp filter"):
            await eng.create(fx.new_session_id(), tier="tiny", classification="general")
        assert eng.live == {}
    finally:
        await eng.aclose()


async def test_filter_that_fails_to_load_runs_nothing(sandbox_cfg):
    """When the kernel refuses the filter, the exec fails with a clear error and the command
    (which would have created a file) did not run."""
    eng = SandboxEngine(sandbox_cfg, seccomp_compiler=lambda name: INVALID_BPF)
    try:
        sb = await eng.create(fx.new_session_id(), tier="tiny", classification="general")
        with pytest.raises(ExecFailed, match="seccomp filter"):
            await sb.exec("touch /work/ran", timeout=10)
        with pytest.raises(FileNotFoundError):
            os.stat("work/ran", dir_fd=sb.root_fd)
        assert os.stat("work", dir_fd=sb.root_fd)  # the directory is there, the file is not
        await sb.teardown()
    finally:
        await eng.aclose()


async def test_login_uid_is_set_and_not_writable(sandbox):
    """/proc/self/loginuid inside is already set (to the sandbox user, i.e. its host uid
    seen from the host, when the agent had none) and the sandbox user cannot write it."""
    r = await sandbox.exec("cat /proc/self/loginuid; echo; echo 4242 > /proc/self/loginuid "
                           "&& echo written || echo refused", timeout=10)
    value, verdict = r.stdout.decode().split()
    assert verdict == "refused" and value != "4294967295"
    if open("/proc/self/loginuid").read().strip() == "4294967295":
        assert value == "1000"
        with open(f"/proc/{sandbox.init_pid}/loginuid") as f:
            assert int(f.read()) == sandbox.host_uid


async def test_command_umask_is_077(sandbox):
    """Files and directories a command creates are private to the sandbox user."""
    r = await sandbox.exec("umask; touch /work/f; mkdir /work/d; stat -c %a /work/f /work/d",
                           timeout=10)
    assert r.stdout.decode().split() == ["0077", "600", "700"], r.stderr


async def test_pid1_name_is_neutral(sandbox):
    """/proc/1/cmdline inside shows `nrx-init`, not where the agent is installed."""
    r = await sandbox.exec("cat /proc/1/cmdline", timeout=10)
    assert r.stdout == b"nrx-init\0"
