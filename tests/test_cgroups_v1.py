"""cgroup v1 driver against the real v1 hierarchies of this (hybrid) machine.

Every cgroup is created under a `nanorix-agent-test-*` prefix beside (never inside) the
cgroup the test process sits in, and removed again.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from suite import cgroup_prefix

from agent.config import Config
from agent.sandbox.cgroups import CgroupBusy, CgroupLimits, detect, detect_mode
from agent.sandbox.cgroups.base import CgroupHandle
from agent.sandbox.cgroups.v1 import V1Driver

MiB = 1 << 20
pytestmark = pytest.mark.skipif(detect_mode() != "v1", reason="host has no cgroup v1 hierarchies")


@pytest.fixture
def driver():
    d = detect(Config(), prefix=cgroup_prefix())
    assert isinstance(d, V1Driver)
    yield d
    for name in d.leftovers():
        h = d.open(name)
        h.kill_all()
        h.wait_empty()
        h.remove()
    assert d.remove_root()


def _waiting_child(code: str) -> subprocess.Popen:
    """A python child that blocks until it reads one byte from stdin, then runs `code`."""
    return subprocess.Popen([sys.executable, "-c", f"import sys,os\nsys.stdin.read(1)\n{code}"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def _go(p: subprocess.Popen) -> None:
    p.stdin.write(b"x")
    p.stdin.flush()


def test_detect_reports_v1_here():
    """statfs of /sys/fs/cgroup is a tmpfs on this hybrid host, so detection picks v1."""
    assert detect_mode() == "v1"


def test_create_writes_limits_in_our_own_tree(driver):
    """create() makes one directory per controller under the prefix and writes every limit."""
    h = driver.create("s1", CgroupLimits(64 * MiB, 32, 20))
    try:
        mem, pids, cpu = h.dirs["memory"], h.dirs["pids"], h.dirs["cpu"]
        assert mem.parent.name == driver.prefix and mem.parent.parent == Path("/sys/fs/cgroup/memory")
        assert int((mem / "memory.limit_in_bytes").read_text()) == 64 * MiB
        assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == 64 * MiB
        assert (pids / "pids.max").read_text().strip() == "32"
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == 20_000
        assert int((cpu / "cpu.cfs_period_us").read_text()) == 100_000
        assert all(p.is_dir() for p in h.paths)
        assert h.unified is not None and h.unified in h.paths
        assert sorted(h.procs_files()) == sorted(p / "cgroup.procs" for p in h.paths)
        assert driver.leftovers() == ["s1"]
    finally:
        h.remove()
    assert not any(p.exists() for p in h.paths)


def test_attach_freeze_kill_remove(driver):
    """A process attached to every hierarchy is listed, freezes, dies by kill_all, and the
    cgroup is then empty and removable (remove refuses while it is populated)."""
    h = driver.create("s2", CgroupLimits(128 * MiB, 32, 100))
    p = subprocess.Popen(["sleep", "60"])
    try:
        h.attach(p.pid)
        assert h.pids() == [p.pid]
        for procs in h.procs_files():
            assert procs.read_text().split() == [str(p.pid)]
        assert not h.empty()
        h.freeze()
        assert h.frozen()
        assert open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("D", "S")
        with pytest.raises(CgroupBusy):
            h.remove()
        h.kill_all()
        assert p.wait(timeout=5) == -9
        assert h.wait_empty(2)
        assert not h.frozen()
    finally:
        p.kill()
        p.wait()
        h.remove()


def test_kill_all_without_unified_tree_kills_pid_by_pid():
    """Without a cgroup2 tree, kill_all freezes, SIGKILLs every pid, and thaws."""
    d = V1Driver(cgroup_prefix(), unified=None)
    h = d.create("s3", CgroupLimits(128 * MiB, 32, 100))
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        for p in procs:
            h.attach(p.pid)
        assert len(h.pids()) == 3
        h.kill_all()
        assert [p.wait(timeout=5) for p in procs] == [-9, -9, -9]
        assert h.wait_empty(2)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        h.remove()
        assert d.remove_root()


def test_oom_kill_fires_eventfd_and_counts(driver):
    """Allocating past the memory cap is OOM-killed, the eventfd wakes, oom_kills() counts it."""
    h = driver.create("s4", CgroupLimits(32 * MiB, 32, 100))
    p = _waiting_child("b = b'x' * (200 << 20)\nprint('survived')")
    try:
        fd = h.oom_fd()
        h.attach(p.pid)
        assert h.oom_kills() == 0
        _go(p)
        assert p.wait(timeout=10) == -9
        assert select.select([fd], [], [], 5)[0] == [fd]
        assert int.from_bytes(os.read(fd, 8), "little") >= 1
        assert h.oom_kills() == 1
    finally:
        p.kill()
        p.communicate()
        h.remove()


def test_pids_max_stops_a_fork_bomb(driver):
    """Forking past pids.max fails with EAGAIN instead of filling the host."""
    h = driver.create("s5", CgroupLimits(128 * MiB, 8, 100))
    code = ("import time\nkids=[]\nfails=0\n"
            "for i in range(20):\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except BlockingIOError:\n"
            "        fails += 1\n"
            "        continue\n"
            "    if pid == 0:\n"
            "        time.sleep(30); os._exit(0)\n"
            "    kids.append(pid)\n"
            "print(len(kids), fails, flush=True)\n"
            "[os.kill(k, 9) for k in kids]; [os.waitpid(k, 0) for k in kids]\n")
    p = _waiting_child(code)
    try:
        h.attach(p.pid)
        _go(p)
        out, _ = p.communicate(timeout=20)
        kids, fails = map(int, out.split())
        assert kids == 7 and fails == 13
    finally:
        p.kill()
        p.wait()
        h.wait_empty(2)
        h.remove()


def test_memory_usage_counts_the_session(driver):
    """memory_usage() reflects memory touched inside the cgroup."""
    h = driver.create("s6", CgroupLimits(256 * MiB, 32, 100))
    p = _waiting_child("b = b'x' * (40 << 20)\nprint('ok', flush=True)\nsys.stdin.read(1)")
    try:
        h.attach(p.pid)
        _go(p)
        assert p.stdout.readline() == b"ok\n"
        assert h.memory_usage() >= 40 * MiB
        _go(p)
        p.wait(timeout=5)
    finally:
        p.kill()
        p.communicate()
        h.wait_empty(2)
        h.remove()


def test_open_leftovers_and_remove_root(driver):
    """A crash leftover is listed, can be opened without limits, and blocks remove_root."""
    h = driver.create("left", CgroupLimits(64 * MiB, 16, 50))
    h.close()
    assert driver.leftovers() == ["left"]
    assert driver.remove_root() is False
    again = driver.open("left")
    assert again.empty() and again.memory_usage() == 0
    again.remove()
    assert driver.leftovers() == []


def test_create_refuses_bad_or_duplicate_names(driver):
    """Names with slashes or dots, and a name in use, are refused with a clear error."""
    from agent.sandbox.cgroups import CgroupError
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(CgroupError, match="invalid cgroup name"):
            driver.create(bad, CgroupLimits(64 * MiB, 16, 50))
    h = driver.create("dup", CgroupLimits(64 * MiB, 16, 50))
    try:
        with pytest.raises(CgroupError, match="already exists"):
            driver.create("dup", CgroupLimits(64 * MiB, 16, 50))
    finally:
        h.remove()


def test_create_and_remove_is_fast(driver):
    """Creating, limiting and removing a session cgroup takes a few milliseconds at most."""
    t = time.perf_counter()
    for i in range(20):
        driver.create(f"f{i}", CgroupLimits(64 * MiB, 16, 50)).remove()
    assert (time.perf_counter() - t) / 20 < 0.02


def test_set_memory_limit_moves_limit_and_memsw_together(driver):
    """Raising and lowering the cap keeps memory and memsw limits equal (write order matters)."""
    h = driver.create("lim", CgroupLimits(64 * MiB, 16, 50))
    try:
        mem = h.dirs["memory"]
        for value in (256 * MiB, 32 * MiB):
            h.set_memory_limit(value)
            assert int((mem / "memory.limit_in_bytes").read_text()) == value
            assert int((mem / "memory.memsw.limit_in_bytes").read_text()) == value
    finally:
        h.remove()


def test_kill_all_reaches_a_half_attached_process(driver):
    """A process that joined only the v1 memory and freezer cgroups (not the unified one that
    cgroup.kill acts on) keeps the cgroup non-empty and is still killed by kill_all."""
    h = driver.create("half", CgroupLimits(128 * MiB, 32, 100))
    full, half = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    try:
        h.attach(full.pid)
        for c in ("memory", "freezer"):
            (h.dirs[c] / "cgroup.procs").write_text(str(half.pid))
        assert not h.empty()
        full.kill()
        full.wait()
        assert not h.empty()  # the unified tree is empty, the v1 ones are not
        h.kill_all()
        assert half.wait(timeout=5) == -9
        assert h.wait_empty(2) and not h.pids()
    finally:
        for p in (full, half):
            p.kill()
            p.wait()
        h.remove()


def test_service_subtree_only_under_systemd_service():
    """Session cgroup2 dirs go under the agent's own cgroup only when systemd runs it as a
    service (stable across restarts); elsewhere at the root."""
    from agent.sandbox.cgroups.v1 import service_subtree

    svc = "12:pids:/\n0::/system.slice/nanorix-agent.service\n"
    assert service_subtree(svc, {"INVOCATION_ID": "abc"}) == "system.slice/nanorix-agent.service"
    assert service_subtree(svc, {}) == ""
    scope = "0::/user.slice/user-0.slice/session-3.scope\n"
    assert service_subtree(scope, {"INVOCATION_ID": "abc"}) == ""
    assert service_subtree("0::/../x.service\n", {"INVOCATION_ID": "abc"}) == ""


def test_driver_under_a_service_cgroup_nests_session_dirs_in_it():
    """A driver started inside a (test) `.service` cgroup2 directory with INVOCATION_ID set
    makes its session cgroup2 directory inside that service cgroup, and removes it."""
    unified = Path("/sys/fs/cgroup/unified")
    if not (unified / "cgroup.procs").exists():
        pytest.skip("no cgroup2 tree mounted")
    top = unified / cgroup_prefix()
    svc = top / "fake.service"
    svc.mkdir(parents=True)
    script = (
        "import os, sys\n"
        f"open('{svc}/cgroup.procs', 'w').write(str(os.getpid()))\n"
        "from agent.sandbox.cgroups import CgroupLimits\n"
        "from agent.sandbox.cgroups.v1 import V1Driver\n"
        "d = V1Driver(sys.argv[1])\n"
        "h = d.create('sess_0123456789abcdef', CgroupLimits(64 << 20, 16, 50))\n"
        "print(h.unified)\n"
        "h.remove(); d.remove_root()\n"
    )
    prefix = cgroup_prefix()
    try:
        out = subprocess.run([sys.executable, "-c", script, prefix], capture_output=True,
                             text=True, env={**os.environ, "INVOCATION_ID": "test"}, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(svc / prefix / "sess_0123456789abcdef")
        assert not (svc / prefix).exists()
    finally:
        for d in (svc, top):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def _charge_page_cache_and_exit(h, tmp_path: Path) -> None:
    """A child in the cgroup writes 8 MiB of page cache to a file on disk and exits: the
    empty cgroup keeps that cache (and per-CPU charge stocks) charged to it."""
    target = tmp_path / "cache.bin"
    p = _waiting_child(f"open({str(target)!r}, 'wb').write(b'y' * (8 << 20))")
    h.attach(p.pid)
    _go(p)
    p.wait(timeout=10)
    assert h.wait_empty(2)
    assert h.memory_after()[0] >= 8 * MiB


@pytest.mark.parametrize("native", [True, False])
def test_reclaim_rounds_release_an_empty_cgroups_page_cache(driver, tmp_path, native):
    """reclaim_rounds (one native call on v1, the Python loop as fallback) asks the kernel
    to release the cache an exited process left charged and reports the counters it read."""
    h = driver.create("rel-n" if native else "rel-p", CgroupLimits(256 * MiB, 32, 100))
    try:
        _charge_page_cache_and_exit(h, tmp_path)
        if native:
            n, user, kernel = h.reclaim_rounds(3)
        else:
            n, user, kernel = CgroupHandle.reclaim_rounds(h, 3)
        assert 1 <= n <= 3 and user == 0
        assert (user, kernel) == h.memory_after() or h.memory_after()[0] == 0
        # nothing left: no request, or one when a kernel object was freed (RCU) between
        # the look's two counter reads (usage read before, kmem after: a phantom user byte)
        n2, user2, _ = h.reclaim_rounds(3)
        assert user2 == 0 and n2 <= 1, (n2, user2)
    finally:
        h.remove()


def test_reclaim_rounds_fall_back_when_the_counters_are_gone(driver, tmp_path):
    """With the memory directory unreadable to the native call (removed under it), the
    handle falls back to the Python loop, whose OSError reaches the caller."""
    h = driver.create("rel-gone", CgroupLimits(64 * MiB, 16, 50))
    h.remove()
    with pytest.raises(OSError):
        h.reclaim_rounds(3)
