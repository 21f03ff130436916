"""System V shared memory of a session (used by step 3).

A segment nobody has attached is in no process's address space, so the /proc/PID/mem
wipe cannot reach it, and it lives until the session's IPC namespace dies.  This module
enters that IPC namespace from a dedicated thread (IPC namespaces are per thread; the
thread returns to the agent's own namespace before it ends), lists the segments from
/proc/sysvipc/shm as that namespace shows them, attaches each one, overwrites its
resident pages only (mincore; never-touched pages are not allocated) with the passes
through /proc/self/mem, reads the last pass back into Merkle leaves, detaches, and
removes the segment (IPC_RMID) so its pages are freed now.
Counts and leaves only: never a key, id or content.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

from agent.destroy import wipe

CLONE_NEWIPC = 0x08000000
PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmat.restype = ctypes.c_void_p
_libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.shmdt.argtypes = [ctypes.c_void_p]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
IPC_RMID = 0
_FAILED = ctypes.c_void_p(-1).value


def _segments() -> list[tuple[int, int]]:
    """(shmid, size) of every segment in the calling thread's IPC namespace."""
    out = []
    with open("/proc/sysvipc/shm") as f:
        next(f, None)
        for line in f:
            parts = line.split()
            if len(parts) >= 4:
                out.append((int(parts[1]), int(parts[3])))
    return out


def _resident(addr: int, size: int) -> list[tuple[int, int]]:
    npages = (size + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * max(1, npages))()
    if _libc.mincore(addr, npages * PAGE, vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    out: list[tuple[int, int]] = []
    start = None
    for i in range(npages):
        if vec[i] & 1 and start is None:
            start = i
        elif not vec[i] & 1 and start is not None:
            out.append((addr + start * PAGE, (i - start) * PAGE))
            start = None
    if start is not None:
        out.append((addr + start * PAGE, (npages - start) * PAGE))
    return out


def _wipe_in_ns(ipc_ns_path: str, passes: list[str], out: dict) -> None:
    try:
        _wipe_in_ns_unguarded(ipc_ns_path, passes, out)
    except Exception as e:  # the thread must report, never die silently
        out["error"] = out["error"] or f"shm wipe failed: {type(e).__name__}"


def _wipe_in_ns_unguarded(ipc_ns_path: str, passes: list[str], out: dict) -> None:
    own = os.open("/proc/thread-self/ns/ipc", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(ipc_ns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, CLONE_NEWIPC) != 0:
            out["error"] = "cannot enter the session IPC namespace"
            return
        try:
            mem = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
            try:
                for shmid, size in _segments():
                    addr = _libc.shmat(shmid, None, 0)
                    if addr is None or addr == _FAILED:
                        out["failed"] += 1
                        continue
                    try:
                        r = wipe.wipe_ranges(mem, _resident(addr, size), passes)
                    except OSError:
                        out["failed"] += 1
                        continue
                    finally:
                        _libc.shmdt(addr)
                    # overwritten: remove it so its pages are freed now, not when the
                    # (pinned) namespace finally goes
                    if _libc.shmctl(shmid, IPC_RMID, None) == 0:
                        out["removed"] += 1
                    out["segments"] += 1
                    out["bytes"] += r.bytes
                    out["blocks"] += r.blocks
                    out["nonzero"] += r.nonzero_blocks
                    d = r.leaf_digests
                    out["leaves"].extend(d[i:i + 32] for i in range(0, len(d), 32))
            finally:
                os.close(mem)
        finally:
            if _libc.setns(own, CLONE_NEWIPC) != 0:
                out["error"] = "cannot return to the agent IPC namespace"
    finally:
        os.close(own)
        os.close(target)


def wipe_segments(ipc_ns_fd: int, passes: list[str]) -> dict:
    """Overwrite every SysV shm segment of the IPC namespace behind `ipc_ns_fd` (an fd on
    a /proc/PID/ns/ipc).  Blocking; runs in its own short-lived thread."""
    out: dict[str, Any] = {"segments": 0, "removed": 0, "failed": 0, "bytes": 0, "blocks": 0,
                           "nonzero": 0, "leaves": [], "error": None}
    t = threading.Thread(target=_wipe_in_ns, args=(f"/proc/self/fd/{ipc_ns_fd}", list(passes),
                                                   out), name="nrx-sysv-shm-wipe")
    t.start()
    t.join()
    return out
