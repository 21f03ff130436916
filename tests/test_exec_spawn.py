"""How nrx-init starts a command (issue 18): clone(CLONE_VM | CLONE_VFORK) with no error
pipe, the bounding set emptied once in PID 1, only PID 1's changed signals reset; and the
exec path's small pieces (PID 1's exec tag, the per-second timestamp memo)."""

from __future__ import annotations

import json
import os

import pytest
import test_sandbox_fixtures as fx

from agent.cdp.canonical import canonical_json
from agent.sandbox.faults import ExecFailed
from agent.service.receipts import exec_tag
from agent.timefmt import iso_seconds

sandbox_cfg, engine, sandbox = fx.sandbox_cfg, fx.engine, fx.sandbox  # fixtures


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


async def test_command_starts_with_default_signals_and_none_blocked(sandbox):
    """PID 1 ignores SIGPIPE and blocks SIGCHLD (execve keeps both), yet a command starts
    with no signal ignored and none blocked."""
    init = _status(sandbox.init_pid)
    assert int(init["SigIgn"], 16) & (1 << 12)  # SIGPIPE (13) ignored by PID 1
    r = await sandbox.exec("exec grep -E '^Sig(Ign|Blk)' /proc/self/status", timeout=10)
    fields = dict(line.split(":\t") for line in r.stdout.decode().splitlines())
    assert int(fields["SigIgn"], 16) == 0 and int(fields["SigBlk"], 16) == 0


async def test_pid1_bounding_set_is_empty_before_any_command(sandbox):
    """PID 1 (which never execs) emptied its bounding set at setup and keeps its effective
    capabilities for its own work (BIND); every command inherits the empty set."""
    init = _status(sandbox.init_pid)
    assert int(init["CapBnd"], 16) == 0
    assert int(init["CapEff"], 16) != 0
    r = await sandbox.exec("grep CapBnd /proc/self/status", timeout=10)
    assert int(r.stdout.decode().split()[1], 16) == 0


async def test_many_execs_each_lead_their_own_session_and_are_all_reaped(sandbox):
    """Fifty commands in a row each get a fresh process that leads its own session (setsid
    in the child) and are all reaped: afterwards PID 1 is alone in the sandbox's cgroup."""
    pids = set()
    for _ in range(50):
        r = await sandbox.exec("echo $$; cut -d' ' -f6 /proc/$$/stat", timeout=10)
        pid, sid = r.stdout.split()
        assert r.exit_code == 0 and pid == sid
        pids.add(pid)
    assert len(pids) == 50
    assert sandbox.cgroup.pids() == [sandbox.init_pid]


async def test_a_start_that_fails_in_the_child_is_reported_and_the_next_one_runs(sandbox):
    """When a step between clone and execve fails (here chdir: the command made /work
    unreadable to itself), the child's reason reaches the agent through the memory it
    shares with PID 1 ("chdir: Permission denied"), nothing runs, and once the directory
    is usable again the next command runs."""
    await sandbox.exec("chmod 000 /work", timeout=10)
    with pytest.raises(ExecFailed, match="chdir: Permission denied"):
        await sandbox.exec("touch /tmp/ran", timeout=10)
    with pytest.raises(ExecFailed, match="chdir: Permission denied"):  # again, same answer
        await sandbox.exec("touch /tmp/ran", timeout=10)
    os.chmod("work", 0o700, dir_fd=sandbox.root_fd)
    r = await sandbox.exec("ls /tmp; echo ok", timeout=10)
    assert r.stdout == b"ok\n"  # neither refused command ran
    assert sandbox.cgroup.pids() == [sandbox.init_pid]


def test_exec_tag_is_the_canonical_json_of_its_fields():
    """PID 1's exec tag, written out by hand, is byte for byte the canonical JSON of the
    hashes and the start time (a restarted agent parses it; the proof code would write
    the same bytes), also for a non-ASCII command and binary input."""
    tag = exec_tag("echo \u00e9t\u00e9 \U0001f600", b"\x00\xff input")
    fields = json.loads(tag)
    assert set(fields) == {"command_sha256", "input_sha256", "started_at"}
    assert canonical_json(fields) == tag
    assert exec_tag("true", None) == canonical_json(json.loads(exec_tag("true", None)))


def test_iso_seconds_memo_follows_the_second():
    """The per-second memo of iso_seconds returns each second's own text, whatever the
    order in which seconds are asked for."""
    assert iso_seconds(0) == "1970-01-01T00:00:00Z"
    assert iso_seconds(0.9) == "1970-01-01T00:00:00Z"
    assert iso_seconds(1) == "1970-01-01T00:00:01Z"
    assert iso_seconds(0) == "1970-01-01T00:00:00Z"
    assert iso_seconds(1_800_000_000) == "2027-01-15T08:00:00Z"
