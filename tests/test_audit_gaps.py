"""Audit of issues 2-8: tests for specified behaviours that no other test pinned down
(draining refuses work, file names never logged, exact end statuses of clean destructions,
`session destroy --format auditproof`)."""

from __future__ import annotations

import json

import pytest
from helpers_daemon import AgentDaemon
from service_fixtures import bare_service, real_service
from test_destroy_pipeline import engine  # noqa: F401 (fixture)

from agent.cdp.verify import verify
from agent.errors import Unavailable

MARKER = "AUDITMARK-5d1e0b"


async def test_draining_node_refuses_create_with_unavailable(tmp_path):
    """While the node drains (SIGTERM), session.create is refused with Unavailable 503."""
    with bare_service(tmp_path) as svc:
        svc.draining = True
        with pytest.raises(Unavailable) as e:
            await svc.create(customer_id="c", tier="free")
        assert e.value.status == 503 and e.value.to_wire()["error"] == "Unavailable"
        assert svc.capacity()["sessions_live"] == 0


def test_clean_destroy_is_destroyed_and_file_names_never_logged(tmp_path):
    """A session whose files and directories carry a marker name ends `destroyed`/`complete`
    on request, its auditproof can be written by `session destroy --format auditproof`, and
    the marker never reaches the daemon's logs."""
    with AgentDaemon(tmp_path / "agent") as d:
        sid = d.call("session.create", {"customer_id": "c-audit", "tier": "free"})["session_id"]
        res = d.call("session.exec", {
            "session_id": sid,
            "command": f"mkdir -p /work/{MARKER}/d && echo x > /work/{MARKER}/d/{MARKER}.txt"
                       f" && ln -s /etc/{MARKER} /tmp/{MARKER}-link && mkfifo /tmp/{MARKER}.fifo"})
        assert res["exit_code"] == 0
        out = tmp_path / "rendition.json"
        r = d.cli("session", "destroy", sid, "--out", str(out), "--format", "auditproof")
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().startswith(f"{sid}: destroyed")  # --out: a one-line summary
        result = d.call("proof.get", {"session_id": sid})
        assert result["status"] == "destroyed"
        assert result["cdp"]["destruction_state"] == "complete"
        assert verify(result["cdp"])["checks"]["destruction_complete"] is True
        rendition = json.loads(out.read_text())
        assert rendition["cdp_version"] == "2.1" and rendition["capsule_id"] == sid
        assert verify(rendition)["valid"] is True
        pend = [p for p in d.call("proof.pending") if p["session_id"] == sid]
        assert len(pend) == 1 and {"cdp", "auditproof"} <= set(pend[0])
        assert MARKER not in json.dumps(result)
    text = d.log_text()
    assert "session_destroyed" in text and MARKER not in text


def test_destroy_log_lines_carry_session_id_step_and_duration_ms(tmp_path):
    """Each destruction step logs a JSON line with session_id, step and duration_ms (issue 6)."""
    with AgentDaemon(tmp_path / "agent") as d:
        sid = d.call("session.create", {"customer_id": "c-log", "tier": "free"})["session_id"]
        d.call("session.destroy", {"session_id": sid})
        steps = [e for e in d.logs() if e.get("event") == "destroy.step"
                 and e.get("session_id") == sid]
        assert [e["step"] for e in steps] == list(range(1, 9))
        assert all(isinstance(e["duration_ms"], int) and e["duration_ms"] >= 0 for e in steps)
        done = [e for e in d.logs() if e.get("event") == "destroy.done"
                and e.get("session_id") == sid]
        assert len(done) == 1 and isinstance(done[0]["duration_ms"], int)


def test_ttl_expiry_of_an_idle_session_is_exactly_expired(tmp_path):
    """An idle session reaching its TTL ends `expired` (not `expired_unclean`) with a complete
    destruction and reason ttl_expired."""
    import time

    with AgentDaemon(tmp_path, config={"tiers": {"free": {"max_ttl_seconds": 1,
                                                          "default_ttl_seconds": 1}}}) as d:
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        t0 = time.monotonic()
        while d.call("session.get", {"session_id": sid})["status"] in ("active", "executing"):
            assert time.monotonic() - t0 < 30
            time.sleep(0.1)
        proof = d.call("proof.get", {"session_id": sid})
        assert proof["status"] == "expired" and proof["reason"] == "ttl_expired"
        assert proof["cdp"]["destruction_state"] == "complete"
        assert verify(proof["cdp"])["valid"] is True


class _Recorded(Exception):
    pass


class _RecordingSandbox:
    """Records the timeout the service passes to the sandbox, then stops the exec."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    async def exec(self, command, *, input_data=None, env=None, timeout=None, on_output=None,
                   progress=None):
        self.timeouts.append(timeout)
        raise _Recorded


@pytest.mark.parametrize("asked", [None, 10_000])
async def test_exec_timeout_defaults_to_and_never_exceeds_the_remaining_ttl(
        tmp_path, autojump_clock, asked):
    """With no `timeout` (or a larger one) the sandbox gets the session's remaining TTL."""
    import trio

    from agent.service.model import Session as _Live
    from agent.service.model import SessionRecord

    with bare_service(tmp_path) as svc:
        sb = _RecordingSandbox()
        sid = "sess_00000000000000aa"
        svc.sessions[sid] = _Live(record=SessionRecord(sid, customer_id="c"), ttl_seconds=100,
                                  created_ts=0.0, deadline=trio.current_time() + 100,
                                  sandbox=sb)
        await trio.sleep(40)  # 60 s of the TTL left
        with pytest.raises(_Recorded):
            await svc.exec(sid, "true", timeout=asked)
        assert sb.timeouts == [pytest.approx(60, abs=0.01)]
        assert svc.sessions[sid].status == "active"


def test_sandbox_engine_log_errors_never_carry_a_path():
    """The sandbox engine's error text for its logs names the errno, never the file name."""
    import errno

    from agent.sandbox.engine import _err_text

    e = OSError(errno.EBUSY, "Device or resource busy", f"/sys/fs/cgroup/x/{MARKER}")
    text = _err_text(e)
    assert text == "OSError EBUSY" and MARKER not in text
    assert _err_text(FileNotFoundError(errno.ENOENT, "x", f"/{MARKER}")) == \
        "FileNotFoundError ENOENT"


def test_cli_picks_the_agent_from_the_environment(tmp_path):
    """Without --socket the CLI talks to $NANORIX_AGENT_SOCKET (SPEC 8 CLI)."""
    import os
    import subprocess
    import sys

    with AgentDaemon(tmp_path / "agent") as d:
        from helpers_daemon import ROOT

        env = {**os.environ, "NANORIX_AGENT_SOCKET": str(d.socket), "PYTHONPATH": str(ROOT)}
        r = subprocess.run([sys.executable, "-m", "agent.cli", "session", "create",
                            "--customer", "c-env"], capture_output=True, timeout=60,
                           cwd=d.base, env=env)
        assert r.returncode == 0, r.stderr
        sid = json.loads(r.stdout)["session_id"]
        r = subprocess.run([sys.executable, "-m", "agent.cli", "session", "destroy", sid],
                           capture_output=True, timeout=60, cwd=d.base, env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["session_id"] == sid


async def test_slot_is_kept_while_a_host_process_runs_with_the_session_uid(engine):  # noqa: F811
    """Step 5 does not release the uid slot while any host process runs as the session's host
    uid: it records the process and fails, so the session ends expired_unclean."""
    import subprocess

    from test_destroy_kernel_facts import _destroy_with

    # after step 4 the sandbox is dead; a stray process keeps its host uid
    out, ev = await _destroy_with(engine, lambda sb: subprocess.Popen(
        ["sleep", "60"], user=sb.host_uid, group=sb.host_gid, extra_groups=[]), at_step=4)
    ev5 = ev[5]
    assert ev5["processes_with_ids"] >= 1 and ev5["slot_released"] is False
    assert ev5["ok"] is False and out.status == "expired_unclean"


def test_rpc_socket_gets_the_configured_group_and_mode(tmp_path):
    """bind_unix_socket gives the socket the configured group (when it exists) and mode 0660."""
    import grp
    import os

    from agent.rpc.server import bind_unix_socket

    group = grp.getgrgid(1).gr_name  # "daemon" on Debian: any group other than root's
    for name, want_gid in ((group, 1), ("no-such-group-audit", os.getgid())):
        path = tmp_path / name / "agent.sock"
        sock = bind_unix_socket(path, mode=0o660, group=name)
        try:
            st = os.stat(path)
            assert st.st_gid == want_gid and (st.st_mode & 0o777) == 0o660, name
        finally:
            sock.close()


async def test_sandbox_root_tmpfs_is_nosuid_and_nodev(engine):  # noqa: F811
    """The session's root is a tmpfs mounted nosuid,nodev (SPEC 3.2), as seen from inside."""
    from test_destroy_pipeline import new_id

    sb = await engine.create(new_id(), tier="tiny", classification="general")
    try:
        r = await sb.exec("grep ' / / ' /proc/self/mountinfo", timeout=20)
    finally:
        await sb.teardown()
    line = r.stdout.decode().strip().splitlines()[0].split()
    opts = set(line[5].split(","))
    assert {"nosuid", "nodev"} <= opts
    assert line[line.index("-") + 1] == "tmpfs"


async def test_node_memory_capacity_full_is_unavailable(tmp_path):
    """A create whose tier memory would exceed node.memory_capacity_bytes is Unavailable 503."""
    def full(cfg):
        cfg.node.memory_capacity_bytes = cfg.tiers["free"].memory_bytes - 1

    with bare_service(tmp_path, full) as svc:
        with pytest.raises(Unavailable, match="memory capacity"):
            await svc.create(customer_id="c", tier="free")
        assert svc.capacity()["sessions_live"] == 0


async def test_ttl_runs_from_the_exact_creation_time(agent_dirs):
    """The deadline is the creation instant + ttl and created_ts keeps its fraction of a
    second, not truncated to whole seconds (issue 13): a real service and sandbox; a
    truncated start would fall before the instant the create call began."""
    import time

    import trio

    state, runtime = agent_dirs
    async with real_service(state, runtime, "ttl") as svc:
        start, before = trio.current_time(), time.time()
        res = await svc.create(customer_id="c", tier="free", ttl_seconds=60)
        end, after = trio.current_time(), time.time()
        s = svc.sessions[res["session_id"]]
        assert start + 60 <= s.deadline <= end + 60
        assert before <= s.created_ts <= after  # truncation would put it before `before`
        await svc.destroy(res["session_id"])
