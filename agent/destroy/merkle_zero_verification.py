"""Step 6 (fgx_forensic / merkle_zero_verification, method `merkle_tree_verification`).

An independent re-check of the host, trusting nothing the earlier steps reported, that
asks the kernel first and walks /proc only where the kernel's answer leaves a doubt:

* processes: each of the session's seven namespaces (step 1) is reopened by its nsfs file
  handle (Linux 6.18; the handles replaced step 1's pins in step 5).  ESTALE is the
  kernel's answer that the namespace no longer exists, so no task is in it
  (`namespaces_released` counts those).  For any that still exists (reopened, so pinned
  and its inode number its own) every thread in /proc is walked for a namespace link
  (/proc/PID/task/TID/ns/*) with that inode;
* mounts: an inotify watch on the session tmpfs root is set while step 2's O_PATH pin
  still holds the superblock; the pin is then dropped, and IN_UNMOUNT on the watch is the
  kernel's answer that the superblock was shut down, which happens only once no mount of
  it is left in any mount namespace (attached or detached) and no file of it is open
  (`superblock_released`).  Otherwise every mount namespace on the host (each read once
  through one of its processes' /proc/PID/mountinfo) is searched for a mount whose
  superblock device (mountinfo field 3, "major:minor", from fstat of the pinned root fd)
  is the session tmpfs: the superblock is still alive then, so the number is still its
  own (if it shuts down during the scan, the kernel's answer wins).  nsfs bind mounts
  pinning a session namespace are searched for the namespaces that still exist (one
  that no longer exists is held by no mount);
* cgroups: each of the session's cgroup directories must no longer exist.

Without nsfs handles or inotify (older kernels) every check is the walk, as before:
step 1's pins keep the namespace inode numbers from reuse until the process walk is done,
and are dropped before the mount scan so the sandbox's own mount of the tmpfs (kept by
its mount namespace) is gone when counted.

Then the Merkle root (SPEC 6) over the read-back leaf digests of step 2 followed by step 3
must equal the root of the same number of all-zero 4 KiB blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import trio

from agent.cdp import merkle
from agent.destroy import credential_incineration, residue, shared_walk
from agent.destroy.context import DestroyContext, DestroyState, StepError

METHOD = "merkle_tree_verification"
INLINE_LEAVES = 64  # a root over this few leaves is computed on the event loop (no hop)


@dataclass
class _Left:
    """What the kernel leaves to the walks after the handles were reopened."""

    walk: dict[str, int]      # namespaces to walk /proc for (name -> inode)
    pins: dict[str, int]      # namespaces to search nsfs bind mounts of
    fds: list[int]            # pins on those that still exist, while they are searched
    released: int = 0         # namespaces the kernel says no longer exist
    pid_emptied: bool = False  # the PID namespace exists but its init was reaped


async def scan(st: DestroyState) -> dict:
    """Processes in the session's namespaces: none in those the kernel says no longer
    exist (nsfs handles, step 5) or, for the PID namespace, whose init was reaped; the
    others are walked for (shared with the destructions in flight: shared_walk).  Then
    the mounts and cgroups in one worker-thread call."""
    watch = _watch_superblock(st)
    try:
        left = await trio.to_thread.run_sync(_namespaces_left, st)
        try:
            procs = threads = served = unreaped = 0
            if left.walk:
                (procs, threads), served = await shared_walk.IN_NAMESPACES.ask(
                    (tuple(left.walk), tuple(left.walk.values())))
            if procs:  # exited, not reaped (a re-adopted PID 1 whose parent is the host's init)?
                found, unreaped = await trio.to_thread.run_sync(
                    residue.unreaped_in_namespaces, tuple(left.walk.values()), tuple(left.walk))
                if found and unreaped == found:
                    procs = 0  # none runs: said in the evidence as processes_unreaped
                else:
                    unreaped = 0
        finally:
            while left.fds:
                os.close(left.fds.pop())
        r = await trio.to_thread.run_sync(_mounts_and_cgroups, st, watch, left.pins)
    finally:
        if watch is not None:
            watch.close()
    return {"processes": procs, "threads": threads, "walk_sessions": served,
            "unreaped": unreaped, "released": left.released, "pid_emptied": left.pid_emptied,
            "walked": sorted(left.walk), "pins": sorted(left.pins), **r}


def _watch_superblock(st: DestroyState) -> residue.SuperblockWatch | None:
    """A watch for the shutdown of the session tmpfs superblock, set while step 2's pin
    still holds it (so the shutdown cannot come before the watch)."""
    if st.pin_fd < 0:
        return None
    try:
        return residue.SuperblockWatch(st.pin_fd)
    except OSError:
        return None  # the mount scan answers


# Namespaces the kernel keeps for a while after their last task was reaped (RCU-delayed
# release of the tasks' credentials and pids: measured here 10-50 ms), so that a destroy
# finds them still existing nearly every time.  An nsfs bind mount of one of them is not
# searched for: it would keep no task (the walk and the PID-namespace check say there is
# none) and none of the session's files, memory, IPC objects or network state, which
# live in the other namespaces and the tmpfs, all of which are checked.
LINGERING = ("user", "pid")


def _namespaces_left(st: DestroyState) -> _Left:
    """In a worker thread: what is left to walk and search for after asking the kernel.
    Without handles (a kernel before 6.18) everything (still pinned by step 1)."""
    handles = credential_incineration.namespace_handles(st)
    if handles is None:
        return _Left(dict(st.namespaces), dict(st.namespaces), [])
    alive, fds = handles.reopen()
    released = len(handles.handles) - len(alive)
    alive = {n: i for n, i in alive.items() if n in st.namespaces}
    left = _Left(dict(alive), {n: i for n, i in alive.items() if n not in LINGERING},
                 list(fds.values()), released=released)
    if "pid" in alive:
        fd = fds.get("pid", -1)
        if fd >= 0 and residue.pid_namespace_emptied(fd):
            left.pid_emptied = True
            del left.walk["pid"]
    return left


def _mounts_and_cgroups(st: DestroyState, watch: residue.SuperblockWatch | None,
                        pins: dict[str, int]) -> dict:
    # Step 1's namespace pins (still here only without handles) have served: dropping
    # them lets the session's mount namespace, and with it the sandbox's own mount of the
    # tmpfs, go away before mounts are counted.
    while st.ns_fds:
        os.close(st.ns_fds.pop())
    released = False
    if watch is not None:
        # the watch stands in for step 2's pin: drop it, so that nothing of ours holds the
        # superblock; when the kernel then shuts it down, no mount of it is left anywhere
        os.close(st.pin_fd)
        st.pin_fd = -1
        released = watch.released()
    mounts = mnt_ns = 0
    if not released or pins:
        mounts, mnt_ns = residue.mounts_of(None if released else st.tmpfs_dev, pins.values())
        if not released and watch is not None and watch.released():
            # shut down during the scan: its device number may have been reused meanwhile,
            # but the superblock is gone, so no mount of it is left (the kernel's answer)
            released = True
            if pins:
                mounts, mnt_ns = residue.mounts_of(None, pins.values())
            else:
                mounts = 0
    cgroups = sum(1 for p in st.cgroup_paths if os.path.exists(p))
    return {"mounts": mounts, "mnt_ns": mnt_ns, "cgroups": cgroups, "sb_released": released}


def release_pin(st: DestroyState) -> None:
    """Drop the step-2 pin on the (empty, detached) tmpfs superblock and the step-1 pins
    on the (empty) namespaces."""
    if st.pin_fd >= 0:
        os.close(st.pin_fd)
        st.pin_fd = -1
    while st.ns_fds:
        os.close(st.ns_fds.pop())


async def run(ctx: DestroyContext, st: DestroyState, ev: dict) -> None:
    sb = ctx.sandbox
    errors: list[str] = []
    if st.tmpfs_dev is None and sb is not None and sb.root_fd >= 0:
        try:
            st.tmpfs_dev = residue.dev_str(os.fstat(sb.root_fd).st_dev)
        except (OSError, TypeError):
            pass
    if not st.cgroup_paths and sb is not None:
        st.cgroup_paths = [str(p) for p in sb.cgroup.paths]
    leaves = st.leaves_fs + st.leaves_mem
    blocks = len(leaves)
    # step 1 pinned all seven (the fds, or since step 5 the nsfs handles that replaced them)
    pinned = len(st.ns_fds) == len(residue.NAMESPACES) or st.ns_handles is not None
    r = await scan(st)
    root = (merkle.merkle_root(leaves) if blocks <= INLINE_LEAVES
            else await trio.to_thread.run_sync(merkle.merkle_root, leaves))
    expected = merkle.zero_root(blocks)
    release_pin(st)
    ev.update({"block_size": merkle.BLOCK_SIZE, "blocks": blocks, "merkle_root": root,
               "expected_root": expected, "match": root == expected,
               "residue": {"processes": r["processes"], "mounts": r["mounts"],
                           "cgroups": r["cgroups"]},
               "processes_unreaped": r["unreaped"],
               "mount_namespaces_scanned": r["mnt_ns"], "host_walk_sessions": r["walk_sessions"],
               "mount_identity": "superblock_dev_pinned", "namespaces_pinned": pinned,
               "namespaces_released": r["released"], "pid_namespace_emptied": r["pid_emptied"],
               "namespaces_walked": r["walked"], "nsfs_mounts_searched": r["pins"],
               "superblock_released": r["sb_released"]})
    if not ev["match"]:
        errors.append("read-back root is not the zero root")
    if len(st.namespaces) != len(residue.NAMESPACES):
        errors.append("session namespaces unknown")
    if st.tmpfs_dev is None:
        errors.append("session tmpfs unknown")
    if not st.cgroup_paths:
        errors.append("session cgroups unknown")
    if r["processes"] or r["mounts"] or r["cgroups"]:
        errors.append("session residue found")
    if errors:
        raise StepError("; ".join(errors))
