"""cgroup v2 driver.

This machine has no cgroup v2 controllers (memory/pids/cpu are v1 here; the cgroup2 tree
at /sys/fs/cgroup/unified has none), so the limit-writing and delegation logic is tested
against a FAKE cgroupfs tree built in tmp_path, whose directories get the control files the
kernel would create.  cgroup.freeze, cgroup.kill and cgroup.events are core cgroup2 files,
so those are also tested against the real controller-less cgroup2 tree, in a subdirectory
of our own.
"""

from __future__ import annotations

import os
import select
import subprocess
from pathlib import Path

import pytest
from suite import cgroup_prefix

from agent.sandbox.cgroups import CgroupError, CgroupLimits, detect_mode
from agent.sandbox.cgroups.v2 import V2Driver, V2Handle, inotify_modify_fd

MiB = 1 << 20
UNIFIED = Path("/sys/fs/cgroup/unified")

CORE_FILES = {"cgroup.procs": "", "cgroup.events": "populated 0\nfrozen 0\n",
              "cgroup.freeze": "0\n", "cgroup.kill": "", "cgroup.controllers": "cpu memory pids\n",
              "cgroup.subtree_control": "", "memory.max": "max\n", "memory.swap.max": "max\n",
              "memory.oom.group": "0\n", "pids.max": "max\n", "cpu.max": "max 100000\n",
              "memory.current": "0\n", "memory.high": "max\n",
              "memory.stat": "anon 0\nfile 0\nshmem 0\nkernel 0\n", "memory.reclaim": "",
              "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"}


class FakeCgroupfsDriver(V2Driver):
    """V2Driver on a plain directory tree: mkdir also creates the kernel's control files."""

    def _mkdir(self, path: Path) -> None:
        super()._mkdir(path)
        for name, content in CORE_FILES.items():
            (path / name).write_text(content)


@pytest.fixture
def fake(tmp_path):
    root = tmp_path / "delegated"
    root.mkdir()
    for name, content in CORE_FILES.items():
        (root / name).write_text(content)
    return FakeCgroupfsDriver("nanorix-agent", root)


def test_create_writes_v2_limits_and_enables_controllers(fake):
    """create() enables memory/pids/cpu for the tree and writes memory.max,
    memory.swap.max=0, memory.oom.group=1, pids.max and cpu.max in the session cgroup."""
    h = fake.create("s1", CgroupLimits(256 * MiB, 64, 150))
    d = fake.root / "nanorix-agent" / "s1"
    assert h.paths == [d] and h.procs_files() == [d / "cgroup.procs"]
    assert (d / "memory.max").read_text() == str(256 * MiB)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "memory.oom.group").read_text() == "1"
    assert (d / "pids.max").read_text() == "64"
    assert (d / "cpu.max").read_text() == "150000 100000"
    for level in (fake.root, fake.root / "nanorix-agent"):
        assert set((level / "cgroup.subtree_control").read_text().split()) == {
            "+memory", "+pids", "+cpu"}
    assert fake.leftovers() == ["s1"]


def test_missing_controllers_give_a_delegation_hint(fake):
    """Without delegated controllers the error says to use systemd Delegate=yes."""
    (fake.root / "cgroup.controllers").write_text("cpu\n")
    with pytest.raises(CgroupError, match="Delegate=yes"):
        fake.create("s1", CgroupLimits(64 * MiB, 16, 100))


def test_enter_leaf_moves_agent_and_is_skipped_by_leftovers(fake):
    """enter_leaf() puts the agent's pid into <prefix>/agent; that leaf is not a session
    leftover, and remove_root refuses while the agent is inside."""
    fake.enter_leaf()
    leaf = fake.root / "nanorix-agent" / "agent"
    assert (leaf / "cgroup.procs").read_text() == str(os.getpid())
    assert fake.leftovers() == []
    assert fake.remove_root() is False
    (leaf / "cgroup.procs").write_text("")
    with pytest.raises(CgroupError, match="reserved"):
        fake.create("agent", CgroupLimits(64 * MiB, 16, 100))


def test_delegated_root_agent_moves_itself_before_enabling(tmp_path):
    """Under systemd delegation the agent sits in the subtree root; the first create()
    moves it into <prefix>/agent before writing the root's subtree_control."""
    root = tmp_path / "nanorix-agent.service"
    root.mkdir()
    for name, content in CORE_FILES.items():
        (root / name).write_text(content)
    (root / "cgroup.procs").write_text(f"{os.getpid()}\n")
    d = FakeCgroupfsDriver("nanorix-agent", root, delegated=True)
    d.create("s1", CgroupLimits(64 * MiB, 16, 100))
    assert (root / "nanorix-agent" / "agent" / "cgroup.procs").read_text() == str(os.getpid())
    assert "+memory" in (root / "cgroup.subtree_control").read_text()


def test_freeze_waits_for_events_and_reads_counters(fake):
    """freeze() writes cgroup.freeze and waits for `frozen 1`; counters come from
    memory.events and memory.current; a cgroup that never freezes times out."""
    h = fake.create("s2", CgroupLimits(64 * MiB, 16, 100))
    d = h.paths[0]
    with pytest.raises(CgroupError, match="did not freeze"):
        h.freeze(timeout=0.05)
    (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    h.freeze()
    assert (d / "cgroup.freeze").read_text() == "1" and h.frozen() and not h.empty()
    h.thaw()
    assert (d / "cgroup.freeze").read_text() == "0"
    (d / "memory.current").write_text("12345\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n")
    assert h.memory_usage() == 12345 and h.oom_kills() == 2
    h.set_memory_limit(300 * MiB)
    assert (d / "memory.max").read_text() == str(300 * MiB)
    h.kill_all()
    assert (d / "cgroup.kill").read_text() == "1"


def test_oom_fd_wakes_on_memory_events_change(fake):
    """oom_fd() is an inotify fd that becomes readable when memory.events changes."""
    h = fake.create("s3", CgroupLimits(64 * MiB, 16, 100))
    fd = h.oom_fd()
    assert select.select([fd], [], [], 0)[0] == []
    (h.paths[0] / "memory.events").write_text("oom 1\noom_kill 1\n")
    assert select.select([fd], [], [], 2)[0] == [fd]
    h.close()


def test_remove_and_remove_root(fake):
    """remove() deletes the session directory; remove_root() the tree once it is empty."""
    h = fake.create("s4", CgroupLimits(64 * MiB, 16, 100))
    for f in h.paths[0].iterdir():
        f.unlink()  # the kernel's rmdir ignores control files; a plain directory does not
    h.remove()
    assert fake.leftovers() == []
    for f in (fake.root / "nanorix-agent").iterdir():
        f.unlink()
    assert fake.remove_root() is True
    assert not (fake.root / "nanorix-agent").exists()


def test_detect_mode_by_statfs_magic():
    """statfs magic: the cgroup2 tree is "v2", a tmpfs (this host's /sys/fs/cgroup) "v1"."""
    assert detect_mode(UNIFIED) == "v2"
    assert detect_mode(Path("/dev/shm")) == "v1"
    with pytest.raises(CgroupError, match="neither cgroup2"):
        detect_mode(Path("/proc"))


@pytest.fixture
def real_v2():
    if not (UNIFIED / "cgroup.procs").exists() or detect_mode(UNIFIED) != "v2":
        pytest.skip("no cgroup2 tree at /sys/fs/cgroup/unified")
    tree = UNIFIED / cgroup_prefix()
    tree.mkdir()
    (tree / "s").mkdir()
    yield V2Handle("s", tree / "s")
    os.rmdir(tree / "s") if (tree / "s").exists() else None
    os.rmdir(tree)


def test_real_cgroup2_freeze_kill_events(real_v2):
    """On the real (controller-less) cgroup2 tree: attach, freeze via cgroup.freeze,
    cgroup.kill kills frozen processes, cgroup.events reports empty, inotify wakes."""
    h = real_v2
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        for p in procs:
            h.attach(p.pid)
        assert h.pids() == sorted(p.pid for p in procs) and not h.empty()
        events = inotify_modify_fd(h.path / "cgroup.events")
        try:
            h.freeze()
            assert h.frozen()
            h.kill_all()
            assert [p.wait(timeout=5) for p in procs] == [-9, -9, -9]
            assert h.wait_empty(2)
            assert select.select([events], [], [], 2)[0] == [events]
        finally:
            os.close(events)
        h.thaw()
        h.remove()
        assert not h.path.exists()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_oom_guard_keeps_the_kernel_killer_away_and_hands_back_on_fallback(fake):
    """v2 OOM guard (fake cgroupfs: no v2 memory controller here): memory.high = the cap,
    memory.max = cap + headroom; only unreclaimable anon + shmem at the cap is an OOM (page
    cache is not); make_room lifts memory.high to memory.max; the fallback restores
    memory.max to the cap and thaws, so the kernel killer acts."""
    h = fake.create("s1", CgroupLimits(64 * MiB, 16, 100))
    d = fake.root / "nanorix-agent" / "s1"
    assert h.memory_usage_limit() == 64 * MiB
    assert h.guard_oom(8 * MiB)
    assert (d / "memory.high").read_text() == str(64 * MiB)
    assert (d / "memory.max").read_text() == str(72 * MiB)
    assert h.memory_usage_limit() == 64 * MiB
    (d / "memory.stat").write_text(f"anon {10 * MiB}\nfile {60 * MiB}\nshmem 0\n")
    assert not h.oom_stalled()  # page cache over memory.high is reclaimed, not an OOM
    (d / "memory.stat").write_text(f"anon {50 * MiB}\nfile 0\nshmem {14 * MiB}\n")
    assert h.oom_stalled()
    h.make_room(8 * MiB)
    assert (d / "memory.high").read_text() == str(72 * MiB)
    h.set_memory_limit(100 * MiB)  # destruction raising the cap keeps the margin
    assert (d / "memory.high").read_text() == str(100 * MiB)
    assert (d / "memory.max").read_text() == str(108 * MiB)
    (d / "cgroup.freeze").write_text("1")
    h.kernel_oom_fallback()
    assert (d / "memory.max").read_text() == str(64 * MiB)
    assert (d / "cgroup.freeze").read_text() == "0"


def test_memory_after_reclaim_and_swap_on_the_handle(fake):
    """Step 3's cgroup reads and writes are handle methods: memory_after from memory.stat
    (anon + file + swap as user bytes, kernel apart), reclaim writes memory.reclaim,
    swap_limited reads memory.swap.max."""
    h = fake.create("s1", CgroupLimits(64 * MiB, 16, 100))
    d = fake.root / "nanorix-agent" / "s1"
    (d / "memory.stat").write_text("anon 4096\nfile 8192\nswap 0\nkernel 12288\n")
    assert h.memory_after() == (12288, 12288)
    assert h.reclaim() and (d / "memory.reclaim").read_text() == str(1 << 30)
    assert h.swap_limited()
    (d / "memory.swap.max").write_text("max\n")
    assert not h.swap_limited()
