"""Sandbox creation and teardown bookkeeping: failures undo exactly what was done, slots
and hostnames are unique among live sandboxes, teardown pieces are idempotent."""

from __future__ import annotations

import os
import time

import pytest
import test_sandbox_fixtures as fx
import trio

from agent.destroy import residue
from agent.sandbox import SandboxError, mounts, namespaces, userns
from agent.sandbox.uts import new_hostname

sandbox_cfg, engine, sandbox = fx.sandbox_cfg, fx.engine, fx.sandbox  # fixtures


async def test_failed_setup_inside_undoes_everything(engine):
    """A step failing inside nrx-init (bad hostname) raises SandboxError naming it; no slot,
    cgroup, mount or process is left."""
    with pytest.raises(SandboxError, match="sethostname"):
        await engine.create(fx.new_session_id(), tier="tiny", classification="general",
                            hostname="x" * 100)
    assert not engine.slots.in_use() and not engine.live
    assert engine.cgroups.leftovers() == []
    assert list((engine.runtime_dir / "sessions").iterdir()) == []


async def test_create_returns_after_its_prelude_and_leaves_nothing_when_it_fails(engine):
    """create()'s prelude (the proof reservation) runs in a worker thread alongside the
    whole build (here it is still running when PID 1 exists); create returns only after
    it returned, and when it raises, that error ends the create and no slot, cgroup,
    mount, session directory or process is left, PID 1 included."""
    sessions = engine.runtime_dir / "sessions"
    span = engine.cfg.sandbox.uid_slot_size
    ids = [(engine.slots.base, engine.slots.base + span * engine.slots.count)]

    class Refused(Exception):
        pass

    def prelude(seen: dict, fail: bool):
        deadline = time.monotonic() + 5
        while not residue.processes_with_ids(ids, ids) and time.monotonic() < deadline:
            time.sleep(0.001)  # the sandbox is built meanwhile
        seen["pid 1 while it ran"] = residue.processes_with_ids(ids, ids) > 0
        time.sleep(0.02)
        seen["returned"] = time.monotonic()
        if fail:
            raise Refused("no room")

    seen: dict = {}
    sid = fx.new_session_id()
    with pytest.raises(Refused):
        await engine.create(sid, tier="tiny", classification="general",
                            prelude=lambda: prelude(seen, True))
    assert seen["pid 1 while it ran"]
    assert not engine.slots.in_use() and not engine.live
    assert engine.cgroups.leftovers() == []
    assert list(sessions.iterdir()) == []
    assert not mounts.is_mountpoint(mounts.mount_path(engine.runtime_dir, sid))
    assert residue.processes_with_ids(ids, ids) == 0
    seen = {}
    sb = await engine.create(fx.new_session_id(), tier="tiny", classification="general",
                             prelude=lambda: prelude(seen, False))
    after = time.monotonic()
    try:  # create did not return before its prelude did
        assert seen["pid 1 while it ran"] and "returned" in seen and seen["returned"] <= after
        assert sb.init_pid in sb.cgroup.pids()
    finally:
        await sb.teardown()


async def test_a_cgroup_that_cannot_be_made_leaves_nothing(engine, monkeypatch):
    """When the session cgroups cannot be made (here: the driver refuses, as a full or
    broken hierarchy would), nrx-init, which already mounted the tmpfs, is told nothing
    more, clones no PID 1 and undoes its part: no mount, session directory, slot, cgroup
    or process is left.  The refusal is injected: a real kernel does not fail mkdir in a
    cgroup hierarchy on demand."""
    from agent.sandbox.cgroups.base import CgroupError

    span = engine.cfg.sandbox.uid_slot_size
    ids = [(engine.slots.base, engine.slots.base + span * engine.slots.count)]

    def refuse(name, limits):
        raise CgroupError("cannot create cgroup (injected)")

    monkeypatch.setattr(engine.cgroups, "create", refuse)
    sid = fx.new_session_id()
    with pytest.raises(CgroupError):
        await engine.create(sid, tier="tiny", classification="general")
    assert not engine.slots.in_use() and not engine.live
    assert engine.cgroups.leftovers() == []
    assert list((engine.runtime_dir / "sessions").iterdir()) == []
    assert not mounts.is_mountpoint(mounts.mount_path(engine.runtime_dir, sid))
    assert residue.processes_with_ids(ids, ids) == 0


async def test_cancelled_create_undoes_everything(engine):
    """Cancelling create() at any point leaves nothing behind (checked at several delays)."""
    for delay in (0, 0.0005, 0.001, 0.002, 0.004):
        with trio.move_on_after(delay):
            sb = await engine.create(fx.new_session_id(), tier="tiny", classification="general")
            await sb.teardown()
        assert not engine.slots.in_use() and not engine.live
        assert engine.cgroups.leftovers() == []


async def test_sandbox_exposes_what_destruction_needs(sandbox):
    """pidfd, init pid + starttime, pinned root fd on the host tmpfs, 7 namespace inodes
    (PID 1's own, as /proc shows them once it is ready: six read while it set up, the
    cgroup one it made in setup read after), cgroup paths, slot ids."""
    assert sandbox.init_pid in sandbox.cgroup.pids()
    assert sandbox.init_starttime == namespaces.starttime(sandbox.init_pid)
    assert sandbox.namespaces == namespaces.inodes(sandbox.init_pid)
    for ns, ino in sandbox.namespaces.items():
        assert ino != os.stat(f"/proc/self/ns/{ns}").st_ino, ns
    st = os.stat(".", dir_fd=sandbox.root_fd)
    assert st.st_dev == os.stat(sandbox.root_mount_path).st_dev
    assert st.st_uid == sandbox.slot_root_uid
    r = await sandbox.exec("echo hello > /work/f", timeout=10)
    assert r.exit_code == 0
    with open(os.open("work/f", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=sandbox.root_fd)) as f:
        assert f.read() == "hello\n"
    assert os.statvfs(sandbox.root_mount_path).f_blocks * 4096 == sandbox.tmpfs_bytes


async def test_teardown_pieces_are_idempotent(sandbox):
    """kill_init, detach_root_mount, release_slot and teardown may each run twice."""
    await sandbox.kill_init()
    await sandbox.kill_init()
    assert not sandbox.alive
    await sandbox.remove_cgroup()
    sandbox.detach_root_mount()
    sandbox.detach_root_mount()
    sandbox.release_slot()
    sandbox.release_slot()
    await sandbox.teardown()


def test_slot_allocator_gives_unique_lowest_free_slots():
    """Slots are unique among live sessions, reused after release, and run out cleanly."""
    a = userns.SlotAllocator(200000, 65536, 3)
    s = [a.allocate() for _ in range(3)]
    assert [x.slot for x in s] == [0, 1, 2]
    assert s[1].base == 200000 + 65536 and s[1].sandbox_host_id == 200000 + 65536 + 1000
    with pytest.raises(userns.SlotsExhausted):
        a.allocate()
    a.release(1)
    assert a.allocate().slot == 1
    with pytest.raises(ValueError):
        a.reserve(0)


def test_hostnames_avoid_taken_names():
    """new_hostname never returns a name in use."""
    taken = {new_hostname("nrx-", set()) for _ in range(50)}
    for _ in range(200):
        assert new_hostname("nrx-", taken) not in taken


def test_mount_plan_from_host_and_from_an_image_dir(tmp_path):
    """Without image_dir the host's /usr is bound with the merged-usr links the host has;
    with image_dir the runtime comes from the image and links follow the image's /usr."""
    from agent.config import SandboxConfig
    from agent.sandbox import mounts

    binds, links = mounts.plan(SandboxConfig())
    assert binds == [("/usr", "/usr")]
    assert [n for n, _ in links] == [n for n in ("bin", "lib", "lib64", "sbin")
                                     if os.path.isdir(f"/usr/{n}")]
    image = tmp_path / "image"
    (image / "usr" / "bin").mkdir(parents=True)
    (image / "usr" / "lib").mkdir()
    (image / "opt").mkdir()
    binds, links = mounts.plan(SandboxConfig(image_dir=image, ro_binds=["/usr", "/opt", "/nope"]))
    assert binds == [(str(image / "usr"), "/usr"), (str(image / "opt"), "/opt")]
    assert links == [("bin", "usr/bin"), ("lib", "usr/lib")]


async def test_concurrent_creates_get_unique_slots_hostnames_and_work(engine):
    """20 sandboxes created concurrently all run commands, with distinct slots, host uids
    and hostnames; aclose() takes them all down."""
    boxes = []

    async def one() -> None:
        sb = await engine.create(fx.new_session_id(), tier="tiny", classification="general")
        boxes.append(sb)
        r = await sb.exec("hostname", timeout=20)
        assert r.stdout.decode().strip() == sb.hostname

    async with trio.open_nursery() as n:
        for _ in range(20):
            n.start_soon(one)
    assert len({b.slot for b in boxes}) == len({b.host_uid for b in boxes}) == 20
    assert len({b.hostname for b in boxes}) == 20
    await engine.aclose()
    assert not engine.live and not engine.slots.in_use()
    assert all(not b.alive for b in boxes)


async def test_teardown_of_a_frozen_sandbox_completes(sandbox):
    """A sandbox left frozen (e.g. a destruction interrupted after step 1) still dies and is
    reaped by kill_init (used by teardown) instead of waiting forever on a frozen PID 1."""
    r = await sandbox.exec("sleep 100 >/dev/null 2>&1 &", timeout=10)
    assert r.exit_code == 0
    sandbox.cgroup.freeze()
    assert sandbox.cgroup.frozen()
    try:
        with trio.fail_after(5):
            await sandbox.kill_init()
    finally:
        sandbox.cgroup.thaw()  # without the fix: let the fixture's teardown finish
    assert not sandbox.alive
