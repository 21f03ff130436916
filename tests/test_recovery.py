"""Crash recovery reclaimers (SPEC 12) against real processes, tmpfs mounts and cgroups."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from pathlib import Path

import pytest
from suite import cgroup_prefix

from agent.config import Config
from agent.ops import recovery
from agent.ops.metrics import Metrics
from agent.sandbox.cgroups.base import CgroupLimits
from agent.sandbox.cgroups.detect import detect

MiB = 1024 * 1024
_libc = ctypes.CDLL(None, use_errno=True)


def _mount_tmpfs(path: Path) -> None:
    path.mkdir(parents=True)
    if _libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", 0, b"size=4m") != 0:
        raise OSError(ctypes.get_errno(), "mount")


def _mounted(path: Path) -> bool:
    return str(path) in recovery._mount_points()


class FakeJournal:
    """The one journal call recovery makes."""

    def __init__(self, rows):
        self.rows = rows

    def live_sessions(self):
        return list(self.rows)


@pytest.fixture
def world(agent_dirs):
    """A config on temp dirs, a cgroup driver under a private test prefix, cleaned afterwards."""
    state, runtime = agent_dirs
    cfg = Config()
    cfg.paths.state_dir, cfg.paths.runtime_dir = state, runtime
    prefix = cgroup_prefix("rec")
    cfg.sandbox.cgroup_prefix = prefix
    driver = detect(cfg, prefix=prefix)
    procs: list[subprocess.Popen] = []
    yield cfg, driver, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    for name in driver.leftovers():
        h = driver.open(name)
        h.kill_all()
        h.wait_empty()
        h.remove()
    driver.remove_root()
    for m in sorted((m for m in recovery._mount_points() if m.startswith(str(runtime))),
                    reverse=True):
        recovery.umount_detach(m)


def _row(cfg, sid, **kw):
    row = {"session_id": sid, "customer_id": "c", "tier": "free", "classification": "general",
           "jurisdiction": "US", "created_at": "2026-01-01T00:00:00Z", "status": "active",
           "slot": None, "init_pid": None, "init_starttime": None, "cgroup_paths": [],
           "mount_path": None, "namespaces": {}, "exec_count": 0}
    row.update(kw)
    return row


async def test_reclaims_every_kind_in_order_and_runs_the_pipeline_per_session(world):
    """Holder process, session tmpfs (wiped), cgroup with a process, and untracked leftovers all go."""
    cfg, driver, procs = world
    runtime = cfg.paths.runtime_dir
    # session A: a holder process inside its own cgroup, a tmpfs with data
    holder = subprocess.Popen(["sleep", "60"])
    procs.append(holder)
    h = driver.create("sess_aaaaaaaaaaaaaaaa", CgroupLimits(64 * MiB, 16, 50))
    h.attach(holder.pid)
    extra = subprocess.Popen(["sleep", "60"])
    procs.append(extra)
    h.attach(extra.pid)
    h.close()
    mp_a = runtime / "sessions" / "sess_aaaaaaaaaaaaaaaa" / "root"
    _mount_tmpfs(mp_a)
    (mp_a / "secret").write_bytes(b"MARKER-" * 1000)
    held = os.open(mp_a / "secret", os.O_RDONLY)  # sees the inode's bytes after the unmount
    row_a = _row(cfg, "sess_aaaaaaaaaaaaaaaa", init_pid=holder.pid,
                 init_starttime=recovery.starttime(holder.pid),
                 cgroup_paths=[str(p) for p in h.paths], mount_path=str(mp_a))
    # session B: its holder pid was reused by an unrelated process (start time differs)
    bystander = subprocess.Popen(["sleep", "60"])
    procs.append(bystander)
    row_b = _row(cfg, "sess_bbbbbbbbbbbbbbbb", init_pid=bystander.pid,
                 init_starttime=recovery.starttime(bystander.pid) - 1)
    # untracked leftovers: a cgroup and a mount the journal never recorded
    driver.create("sess_cccccccccccccccc", CgroupLimits(64 * MiB, 16, 50)).close()
    mp_c = runtime / "sessions" / "sess_cccccccccccccccc" / "root"
    _mount_tmpfs(mp_c)

    called = []

    async def destroy_fn(row, reason):
        called.append((row["session_id"], reason))
        return "expired"

    m = Metrics()
    rep = await recovery.recover(cfg, journal=FakeJournal([row_a, row_b]), driver=driver,
                                 destroy_fn=destroy_fn, metrics=m)
    assert [r.kind for r in rep.reclaimers] == list(recovery.ORDER)
    counts = rep.counts()
    assert counts["processes"] >= 2  # holder + the other process in the cgroup
    assert counts["mounts"] == 2 and counts["cgroups"] == 2
    assert all(not r.errors for r in rep.reclaimers), rep.to_dict()
    assert holder.wait(5) == -9 and extra.wait(5) == -9
    assert bystander.poll() is None, "a reused pid must never be killed"
    assert not _mounted(mp_a) and not _mounted(mp_c)
    try:
        assert os.pread(held, 7000, 0) == bytes(7000), "session data must be wiped before detach"
    finally:
        os.close(held)
    assert not (runtime / "sessions" / "sess_aaaaaaaaaaaaaaaa").exists()
    assert driver.leftovers() == []
    assert called == [("sess_aaaaaaaaaaaaaaaa", "agent_recovery"),
                      ("sess_bbbbbbbbbbbbbbbb", "agent_recovery")]
    assert rep.sessions == {"sess_aaaaaaaaaaaaaaaa": "expired", "sess_bbbbbbbbbbbbbbbb": "expired"}
    assert m.value("recovery_reclaimed_total", kind="cgroups") == 2


async def test_a_failing_session_or_reclaimer_does_not_stop_the_start(world, monkeypatch):
    """One pipeline raising and one reclaimer crashing are reported; the rest still runs."""
    cfg, driver, _ = world

    def broken(_ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(recovery, "RECLAIMERS", (recovery.reclaim_processes, broken,
                                                 recovery.reclaim_slots))
    seen = []

    async def destroy_fn(row, reason):
        seen.append(row["session_id"])
        if row["session_id"].endswith("1"):
            raise RuntimeError("pipeline failed")
        return "expired_unclean"

    rows = [_row(cfg, "sess_0000000000000001", slot=3), _row(cfg, "sess_0000000000000002", slot=4)]
    rep = await recovery.recover(cfg, journal=FakeJournal(rows), driver=driver,
                                 destroy_fn=destroy_fn)
    assert seen == ["sess_0000000000000001", "sess_0000000000000002"]
    assert rep.reclaimers[1].errors == ["reclaimer failed: boom"]
    assert rep.counts()["slots"] == 2
    assert rep.sessions == {"sess_0000000000000002": "expired_unclean"}
    assert "pipeline failed" in rep.errors[0]


async def test_slot_reclaimer_kills_processes_running_in_the_slot_uid_range(world):
    """A process left running as a uid of a journaled slot's host range is killed before release."""
    cfg, driver, procs = world
    slot = 7
    uid = cfg.sandbox.uid_base + slot * cfg.sandbox.uid_slot_size + 1000
    p = subprocess.Popen(["sleep", "60"], user=uid, group=uid)
    procs.append(p)
    rep = await recovery.recover(cfg, journal=FakeJournal([_row(cfg, "sess_00000000000000aa",
                                                                slot=slot)]), driver=driver,
                                 destroy_fn=None)
    assert p.wait(5) == -9
    assert rep.counts()["slots"] == 1
    assert rep.errors == ["sess_00000000000000aa: no destroy function"]


async def test_network_reclaimer_kills_processes_left_in_a_session_netns(world):
    """A process still inside a journaled session's network namespace is killed."""
    cfg, driver, procs = world
    p = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    procs.append(p)
    for _ in range(200):
        ino = os.stat(f"/proc/{p.pid}/ns/net").st_ino
        if ino != os.stat("/proc/self/ns/net").st_ino:
            break
        await __import__("trio").sleep(0.01)
    row = _row(cfg, "sess_00000000000000bb", namespaces={"net": ino})
    rep = await recovery.recover(cfg, journal=FakeJournal([row]), driver=driver, destroy_fn=None)
    assert p.wait(5) == -9
    assert rep.counts()["network"] == 1


async def test_a_sandbox_left_frozen_mid_destruction_is_reclaimed(world):
    """A crash during step 1 leaves a frozen cgroup (SIGKILL alone cannot end it): it is thawed, killed, removed."""
    cfg, driver, procs = world
    p = subprocess.Popen(["sleep", "60"])
    procs.append(p)
    h = driver.create("sess_dddddddddddddddd", CgroupLimits(64 * MiB, 16, 50))
    h.attach(p.pid)
    h.freeze()
    assert h.frozen()
    row = _row(cfg, "sess_dddddddddddddddd", init_pid=p.pid,
               init_starttime=recovery.starttime(p.pid), cgroup_paths=[str(x) for x in h.paths])
    h.close()
    t0 = time.monotonic()
    rep = await recovery.recover(cfg, journal=FakeJournal([row]), driver=driver, destroy_fn=None)
    assert p.wait(5) == -9
    assert time.monotonic() - t0 < 3
    assert rep.counts()["cgroups"] == 1 and driver.leftovers() == []


async def test_recovery_asks_systemd_for_more_start_time(world, tmp_path, monkeypatch):
    """With sessions to reclaim, recovery sends EXTEND_TIMEOUT_USEC so TimeoutStartSec is not hit."""
    import socket

    cfg, driver, _ = world
    path = tmp_path / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(path))
    srv.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    cfg.timeouts.systemd_extend_every_seconds = 0.0  # every step asks (the default is 10 s)

    async def destroy_fn(row, reason):
        return "expired_unclean"

    rows = [_row(cfg, f"sess_00000000000000c{i}") for i in range(3)]
    await recovery.recover(cfg, journal=FakeJournal(rows), driver=driver, destroy_fn=destroy_fn)
    msgs = [srv.recv(100) for _ in range(4)]
    srv.close()
    assert msgs == [b"EXTEND_TIMEOUT_USEC=60000000"] * 4  # once at start, once per session
