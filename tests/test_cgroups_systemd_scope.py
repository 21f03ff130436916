"""The systemd sandbox scope (agent/sandbox/cgroups/systemd_scope.py) on this host.

This machine runs no systemd, so the scope itself (systemd-run, the unit) is proven in the
systemd VM lane (tests/vm/test_systemd_host.py).  Here: the placement decisions on real
/proc/self/cgroup texts, systemd-run failing for real when no systemd runs, and the parts the
agent does itself on real cgroups: re-using a scope whose holder is gone (a new holder in a
mount namespace of its own), the v1/hybrid driver putting sessions into the scope's
cgroup2 and name=systemd directories, and release() ending the holder.  A directory tree
made here stands in for the scope systemd would have made (said in each test).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from suite import cgroup_prefix

from agent.sandbox.cgroups import CgroupError, CgroupLimits, detect_mode
from agent.sandbox.cgroups.systemd_scope import Placement, SandboxScope, placement
from agent.sandbox.cgroups.v1 import V1Driver, find_mounts, find_named_systemd
from agent.sandbox.cgroups.v2 import V2Driver

MiB = 1 << 20
SVC = "0::/system.slice/nanorix-agent.service\n"
ENV = {"INVOCATION_ID": "0123abcd"}


def test_placement_only_for_a_systemd_service():
    """A service in a slice under a booted systemd with $INVOCATION_ID gets a placement;
    a shell scope, a foreground run, no systemd, or a path with `..` do not."""
    p = placement(SVC, ENV, booted=True)
    assert p == Placement("system.slice/nanorix-agent.service", "system.slice")
    assert p.scope_name("nanorix-agent") == "nanorix-sandboxes-nanorix-agent.scope"
    assert p.scope_path("nanorix-agent") == "system.slice/nanorix-sandboxes-nanorix-agent.scope"
    assert placement(SVC, {}, booted=True) is None
    assert placement(SVC, ENV, booted=False) is None
    assert placement("0::/user.slice/user-0.slice/session-3.scope\n", ENV, booted=True) is None
    assert placement("0::/nanorix-agent.service\n", ENV, booted=True) is None
    assert placement("0::/system.slice/../x.service\n", ENV, booted=True) is None


def test_placement_nested_slice_and_legacy_host():
    """A nested slice keeps the scope beside the unit; a legacy (v1-only) host is read from
    its name=systemd line; this process's own /proc/self/cgroup (no systemd) gives none."""
    nested = "0::/app.slice/app-agents.slice/nrx.service\n"
    p = placement(nested, ENV, booted=True)
    assert p is not None and p.slice == "app-agents.slice"
    assert p.scope_path("x") == "app.slice/app-agents.slice/nanorix-sandboxes-x.scope"
    legacy = "4:memory:/system.slice/a.service\n1:name=systemd:/system.slice/a.service\n"
    assert placement(legacy, ENV, booted=True) == Placement("system.slice/a.service",
                                                            "system.slice")
    assert placement(Path("/proc/self/cgroup").read_text(), ENV, booted=True) is None


def test_systemd_run_without_systemd_fails_loudly():
    """With no systemd as PID 1, starting the scope fails with a CgroupError (the agent then
    keeps its sessions in its unit and logs it), and nothing is left running."""
    where = Placement(f"{cgroup_prefix('slice')}.slice/a.service", "x.slice")
    missing = Path("/sys/fs/cgroup/unified") / where.scope_path("p")
    scope = SandboxScope(where, "p", [missing], holder_leaf=True, start_timeout=2)
    with pytest.raises(CgroupError, match="systemd-run"):
        scope.ensure()
    assert scope._child is not None and scope._child.poll() is not None


def _stand_in_scope(dirs: list[Path]) -> subprocess.Popen:
    """Directories standing in for the scope systemd made (one per hierarchy), holding a
    process standing in for a surviving sandbox, as after a crash whose holder is gone."""
    p = subprocess.Popen(["sleep", "600"])
    for d in dirs:
        (d / "stand-in" / "s0").mkdir(parents=True)
        (d / "stand-in" / "s0" / "cgroup.procs").write_text(str(p.pid))
    return p


def _remove(dirs: list[Path], procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    for d in dirs:
        for dirpath, _dirs, _files in sorted(os.walk(d), key=lambda w: -w[0].count("/")):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
        with contextlib.suppress(OSError):
            os.rmdir(d.parent)


UNIFIED = find_mounts()[1] if detect_mode() == "v1" else None


@pytest.mark.skipif(UNIFIED is None, reason="needs the cgroup2 tree of a hybrid host")
def test_reused_scope_without_holder_gets_one_in_its_own_mount_namespace():
    """ensure() on a scope that is alive (a sandbox stands in) but lost its holder re-uses it:
    a new holder goes into `<scope>/holder`, in a mount namespace that is not the agent's
    (it must not keep session mounts alive); release() ends it."""
    assert UNIFIED is not None
    where = Placement(f"{cgroup_prefix('slice')}.slice/a.service", "x.slice")
    root = UNIFIED / where.scope_path("p")
    survivor = _stand_in_scope([root])
    scope = SandboxScope(where, "p", [root], holder_leaf=True, start_timeout=0.2)
    try:
        scope.ensure()
        holder = [int(x) for x in (root / "holder" / "cgroup.procs").read_text().split()]
        assert holder == [scope.holder_pid] and scope._child is not None
        deadline = 200
        while Path(f"/proc/{scope.holder_pid}/comm").read_text().strip() != "sleep":
            deadline -= 1
            assert deadline, "the holder did not exec sleep"
            subprocess.run(["sleep", "0.05"])
        assert os.readlink(f"/proc/{scope.holder_pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert scope._alive()
        holder_proc = scope._child
        scope.release()
        assert holder_proc.poll() is not None
        assert not (root / "holder" / "cgroup.procs").read_text().split()
    finally:
        _remove([root], [survivor] + ([scope._child] if scope._child else []))
        assert not root.exists()


@pytest.mark.skipif(UNIFIED is None or find_named_systemd() is None,
                    reason="needs a hybrid host with cgroup2 and name=systemd trees")
def test_v1_driver_puts_sessions_into_the_scope_tracking_hierarchies():
    """Under a scope, a v1 session also gets directories below the scope in the cgroup2 and
    name=systemd hierarchies (which systemd tracks units by), a process attached lands in
    both, a session of the older layout (under the unit's cgroup2 directory) is still found
    and opened; remove_root() removes it all and ends the holder."""
    assert UNIFIED is not None
    named = find_named_systemd()
    assert named is not None
    prefix = cgroup_prefix("scope")
    where = Placement(f"{cgroup_prefix('slice')}.slice/a.service", "x.slice")
    dirs = [UNIFIED / where.scope_path(prefix), named / where.scope_path(prefix)]
    survivor = _stand_in_scope(dirs)
    scope = SandboxScope(where, prefix, dirs, holder_leaf=False, start_timeout=0.2)
    procs = [survivor]
    legacy = UNIFIED / where.unit / prefix / "old"
    try:
        scope.ensure()
        assert scope._child is not None
        procs.append(scope._child)
        os.environ["INVOCATION_ID"] = "stand-in"
        try:
            d = V1Driver(prefix, scope=scope)
        finally:
            del os.environ["INVOCATION_ID"]
        h = d.create("s1", CgroupLimits(64 * MiB, 16, 100))
        assert dirs[0] / prefix / "s1" in h.paths and dirs[1] / prefix / "s1" in h.paths
        p = subprocess.Popen(["sleep", "600"])
        procs.append(p)
        h.attach(p.pid)
        for where_ in (dirs[0], dirs[1]):
            assert str(p.pid) in (where_ / prefix / "s1" / "cgroup.procs").read_text().split()
        h.kill_all()
        assert h.wait_empty()
        h.remove()
        legacy.mkdir(parents=True)  # a session the pre-scope layout left (stands in)
        d.legacy_unified_root = legacy.parent
        assert d.leftovers() == ["old"] and d.open("old").paths == [legacy]
        legacy.rmdir()
        survivor.kill()
        survivor.wait()
        assert d.remove_root()
        assert procs[1].poll() is not None  # the holder was ended (and reaped)
        assert not (dirs[0] / prefix).exists() and not (dirs[1] / prefix).exists()
        assert not legacy.parent.exists()
    finally:
        for p in (UNIFIED / where.unit / prefix, UNIFIED / where.unit):
            with contextlib.suppress(OSError):
                p.rmdir()
        _remove(dirs, procs)


def test_v2_driver_lists_and_opens_sessions_of_the_older_layout(tmp_path):
    """A v2 driver rooted at the scope still lists, opens and (once empty) removes the
    sessions an older agent put under its unit's cgroup; it never creates there."""
    scope_root, unit = tmp_path / "scope", tmp_path / "unit"
    (unit / "p" / "old").mkdir(parents=True)
    (unit / "p" / "agent").mkdir()
    (scope_root / "p" / "new").mkdir(parents=True)
    d = V2Driver("p", scope_root, delegated=True, legacy_roots=[unit])
    assert d.leftovers() == ["new", "old"]
    assert d.open("old").paths == [unit / "p" / "old"]
    assert d.open("new").paths == [scope_root / "p" / "new"]
    (unit / "p" / "old").rmdir()
    (scope_root / "p" / "new").rmdir()
    for f in ("cgroup.procs",):
        (unit / "p" / "agent" / f).write_text("")
    # plain directories with a file cannot be rmdir'ed as cgroupfs ones can: empty it first
    (unit / "p" / "agent" / "cgroup.procs").unlink()
    assert d.remove_root()
    assert not (scope_root / "p").exists() and not (unit / "p").exists()
