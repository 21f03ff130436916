"""Step 6 (fgx_forensic / merkle_zero_verification, method `merkle_tree_verification`).

An independent re-scan of the host, trusting nothing the earlier steps reported:

* processes: every thread in /proc whose any namespace (/proc/PID/task/TID/ns/*) is one
  of the session's seven namespace inodes (step 1);
* mounts: every mount namespace on the host (each read once through one of its
  processes' /proc/PID/mountinfo) is searched for a mount whose superblock device
  (mountinfo field 3, "major:minor", taken from fstat of the pinned root fd) is the
  session tmpfs, and for nsfs bind mounts pinning one of the session namespaces.  Step 2
  keeps an O_PATH fd on the (emptied, detached) superblock until this scan is done, so
  its device number cannot be reused by another tmpfs meanwhile, and step 1 pins the
  seven namespaces for the same reason (namespace inode numbers are reused at once); the
  namespace pins are dropped after the process scan and before the mount scan, so the
  sandbox's own mount of the tmpfs (kept by its mount namespace) is gone when counted;
* cgroups: each of the session's cgroup directories must no longer exist.

Then the Merkle root (SPEC 6) over the read-back leaf digests of step 2 followed by step 3
must equal the root of the same number of all-zero 4 KiB blocks.
"""

from __future__ import annotations

import os

import trio

from agent.cdp import merkle
from agent.destroy import residue, shared_walk
from agent.destroy.context import DestroyContext, DestroyState, StepError

METHOD = "merkle_tree_verification"
INLINE_LEAVES = 64  # a root over this few leaves is computed on the event loop (no hop)


async def scan(st: DestroyState) -> dict:
    """The process walk (shared with the destructions in flight: shared_walk), then the
    mounts and cgroups in one worker-thread call."""
    (procs, threads), served = await shared_walk.IN_NAMESPACES.ask(
        tuple(st.namespaces.values()))
    unreaped = 0
    if procs:  # exited but not reaped (a re-adopted PID 1 whose parent is the host's init)?
        found, unreaped = await trio.to_thread.run_sync(
            residue.unreaped_in_namespaces, tuple(st.namespaces.values()))
        if found and unreaped == found:
            procs = 0  # none runs: said in the evidence as processes_unreaped
        else:
            unreaped = 0
    return {"processes": procs, "threads": threads, "walk_sessions": served,
            "unreaped": unreaped, **await trio.to_thread.run_sync(_mounts_and_cgroups, st)}


def _mounts_and_cgroups(st: DestroyState) -> dict:
    # The namespace pins have served (no process was found in them while their inode
    # numbers could not be reused); dropping them now lets the session's mount namespace,
    # and with it the sandbox's own mount of the tmpfs, go away before mounts are counted.
    while st.ns_fds:
        os.close(st.ns_fds.pop())
    mounts, mnt_ns = residue.mounts_of(st.tmpfs_dev, st.namespaces.values())
    cgroups = sum(1 for p in st.cgroup_paths if os.path.exists(p))
    return {"mounts": mounts, "mnt_ns": mnt_ns, "cgroups": cgroups}


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
    pinned = len(st.ns_fds) == len(residue.NAMESPACES)
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
               "mount_namespaces_scanned": r["mnt_ns"], "host_walk_sessions": r["walk_sessions"], "mount_identity": "superblock_dev_pinned",
               "namespaces_pinned": pinned})
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
