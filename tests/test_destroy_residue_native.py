"""The C scans of /proc used by destruction steps 5 and 6 count exactly what the Python
oracles (tests/oracles.py) count, on a real sandbox (hits) and on ids nobody uses
(misses)."""

from __future__ import annotations

import oracles
import test_sandbox_fixtures as fx

from agent.destroy import residue

sandbox_cfg, engine, sandbox = fx.sandbox_cfg, fx.engine, fx.sandbox  # fixtures


async def test_native_scans_match_python_reference(sandbox):
    """Processes/threads in the session's namespaces and processes with its host ids agree
    between the native and Python scans (the id scan also through thread pidfds), and a
    miss is zero in all."""
    r = await sandbox.exec(
        "sleep 60 >/dev/null 2>&1 & sleep 60 >/dev/null 2>&1 & "
        "python3 -c 'import threading,time; [threading.Thread(target=time.sleep, args=(60,),"
        " daemon=True).start() for _ in range(3)]; open(\"/tmp/ready\", \"w\").close();"
        " time.sleep(60)' >/dev/null 2>&1 & "
        "while [ ! -e /tmp/ready ]; do sleep 0.01; done",
        timeout=10)
    assert r.exit_code == 0
    inodes = list(sandbox.namespaces.values())
    ids = [(sandbox.slot_root_uid, sandbox.slot_root_uid + sandbox._engine.cfg.sandbox.uid_slot_size)]
    gids = [(sandbox.slot_root_gid, sandbox.slot_root_gid + sandbox._engine.cfg.sandbox.uid_slot_size)]
    sandbox.cgroup.freeze()  # a stable population for both scans
    try:
        names = tuple(residue.NAMESPACES)
        native_ns = residue.processes_in_namespaces(inodes)
        python_ns = oracles.py_processes_in_namespaces(inodes, names)
        native_ids = residue.processes_with_ids(ids, gids)
        python_ids = oracles.py_processes_with_ids(ids, gids)
        pidfd_ids = residue.processes_with_ids_fast(ids, gids)
        user = [sandbox.namespaces["user"]]  # the one-link-per-process walk
        native_user = residue.processes_in_namespaces(user, ("user",))[0]
        python_user = oracles.py_processes_in_namespaces(user, ("user",))[0]
    finally:
        sandbox.cgroup.thaw()
    assert native_ns == python_ns and native_ns[0] >= 4 and native_ns[1] > native_ns[0]
    assert native_ids == python_ids and native_ids >= 3
    assert pidfd_ids == (native_ids, "pidfd_info")
    assert native_user == python_user == native_ns[0]
    nobody = [(4_000_000_000, 4_000_000_001)]
    assert residue.processes_in_namespaces([1]) == oracles.py_processes_in_namespaces([1], names) == (0, 0)
    assert residue.processes_with_ids(nobody, nobody) == oracles.py_processes_with_ids(nobody, nobody) == 0
    assert residue.processes_with_ids_fast(nobody, nobody) == (0, "pidfd_info")


async def test_native_mount_scan_matches_python_reference(sandbox):
    """The mounts of a live session's tmpfs (and nsfs pins of its namespaces) in every
    mount namespace on the host agree between the C and the Python scans, and are found."""
    import os

    dev = residue.dev_str(os.fstat(sandbox.root_fd).st_dev)
    inodes = list(sandbox.namespaces.values())
    # other suites on this host make and drop mount namespaces (and a sandbox being
    # created holds a copy of its parent's mounts for a moment) between the two scans:
    # compare pairs taken back to back until one pair saw the same host
    sandbox.cgroup.freeze()
    try:
        pairs = []
        for _ in range(20):
            pairs.append((residue.mounts_of(dev, inodes),
                          oracles.py_mounts_of(dev, inodes, "/proc")))
            if pairs[-1][0] == pairs[-1][1]:
                break
    finally:
        sandbox.cgroup.thaw()
    native, python = pairs[-1]
    assert native == python, pairs
    assert native[0] >= 1 and native[1] >= 2
    # a miss: no mount in either (the namespace counts of two moments may differ by the
    # sandboxes other suites create meanwhile, as above)
    assert residue.mounts_of("0:1", [1])[0] == oracles.py_mounts_of("0:1", [1], "/proc")[0] == 0


def test_an_exited_unreaped_process_is_told_apart_from_a_live_one():
    """A zombie keeps its user namespace link until reaped; unreaped_in_namespaces counts it
    as exited (what steps 5 and 6 record as unreaped for a re-adopted PID 1), and a live
    process in the same namespace as not."""
    import subprocess
    import time

    from agent.destroy import residue

    live = subprocess.Popen(["unshare", "-U", "sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        ino = None
        while ino is None and time.monotonic() < deadline:
            ino = residue.ns_inodes(live.pid, ("user",)).get("user")
            if ino == residue.ns_inodes("self", ("user",)).get("user"):
                ino = None  # not unshared yet
            time.sleep(0.01)
        assert ino is not None
        assert residue.unreaped_in_namespaces([ino], ("user",)) == (1, 0)
        live.kill()
        while residue.unreaped_in_namespaces([ino], ("user",)) != (1, 1):
            assert time.monotonic() < deadline, "the killed process never showed as exited"
            time.sleep(0.01)
    finally:
        live.kill()
        live.wait()
    assert residue.unreaped_in_namespaces([ino], ("user",)) == (0, 0)


async def test_own_mount_table_reads_match_mountinfo(sandbox):
    """listmount/statmount count the live session's view in the agent's mount table as
    mountinfo does (then none after the detach), statx's mount-root attribute agrees with
    mountinfo on the view's mount point, and fstatfs says tmpfs."""
    import os

    from agent.sandbox import mounts

    dev = residue.dev_str(os.fstat(sandbox.root_fd).st_dev)
    path = str(mounts.mount_path(sandbox._engine.runtime_dir, sandbox.session_id))
    assert residue.own_mounts_of(dev) == oracles.py_own_mounts_of(dev) >= 1
    assert mounts.is_mountpoint(path) is oracles.py_is_mountpoint(path) is True
    assert residue.fs_magic(sandbox.root_fd) == residue.TMPFS_MAGIC
    assert residue.own_mounts_of("0:1") == oracles.py_own_mounts_of("0:1") == 0
    parent = os.path.dirname(path)
    assert mounts.is_mountpoint(parent) is oracles.py_is_mountpoint(parent) is False
    sandbox.detach_root_mount()
    assert residue.own_mounts_of(dev) == oracles.py_own_mounts_of(dev) == 0
