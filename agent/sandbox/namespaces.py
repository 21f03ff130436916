"""PID, IPC and cgroup namespaces (created by nrx-init's clone) and the identity of all
seven namespaces of a sandbox, read from /proc/PID/ns/* (journal, destruction evidence)."""

from __future__ import annotations

import os

NAMESPACES = ("user", "mnt", "uts", "ipc", "pid", "net", "cgroup")


def inodes(pid: int, names: tuple[str, ...] = NAMESPACES) -> dict[str, int]:
    """Namespace name -> inode number for process `pid` (of `names`)."""
    return {ns: os.stat(f"/proc/{pid}/ns/{ns}").st_ino for ns in names}


def starttime(pid: int) -> int:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot): with the pid it
    names one process across pid reuse."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def pids_in_pidns(inode: int) -> list[int]:
    """Host pids of every process whose PID namespace is `inode`."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}/ns/pid").st_ino == inode:
                    out.append(int(name))
            except OSError:
                pass
    return out
