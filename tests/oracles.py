"""Reference implementations (oracles) of the native wipe (native/ext/fsops.c through
agent/fsops.py) and of the native /proc scans (native/ext/procscan.c through
agent/destroy/residue.py): the same algorithms in plain Python, used only by tests to check
the native code's answers.  Moved out of agent/destroy/wipe.py and residue.py (issue 11):
the agent runs the native code only, so these never run in production.  The scans walk
the tasks through residue's own per-task generators (which production uses to classify
what a scan found), so only the counting is repeated here."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Sequence

from agent.destroy import residue
from agent.destroy.wipe import BLOCK, WipeResult

CHUNK = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
_SKIP_MAPS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")
_ZERO_BLOCK = bytes(BLOCK)


def _pattern(name: str, n: int) -> bytes:
    if name == "zeros":
        return bytes(n)
    if name == "ones":
        return b"\xff" * n
    if name == "random":
        return os.urandom(n)
    raise ValueError(f"unknown wipe pass {name!r}")


def py_wipe(fd: int, ranges: Sequence[tuple[int, int]], passes: Sequence[str]) -> WipeResult:
    """agent.destroy.wipe.wipe_ranges in Python: every pass over every range, the last read
    back as one SHA-256 leaf per 4 KiB block (a short last block zero-padded)."""
    res = WipeResult()
    ones = zeros = None
    for p in passes:
        for off, length in ranges:
            pos, end = off, off + length
            while pos < end:
                n = min(CHUNK, end - pos)
                buf: bytes | memoryview
                if p == "random":
                    buf = os.urandom(n)
                elif p == "ones":
                    ones = ones if ones is not None and len(ones) >= n else _pattern("ones", CHUNK)
                    buf = memoryview(ones)[:n]
                else:
                    zeros = zeros if zeros is not None else bytes(CHUNK)
                    buf = memoryview(zeros)[:n]
                w = os.pwrite(fd, buf, pos)
                if w <= 0:
                    raise OSError(5, "short write during wipe")
                pos += w
    leaves = bytearray()
    sha = hashlib.sha256
    for off, length in ranges:
        pos, end = off, off + length
        while pos < end:
            n = min(CHUNK, end - pos)
            data = os.pread(fd, n, pos)
            if len(data) != n:
                raise OSError(5, "short read during read-back")
            mv = memoryview(data)
            for i in range(0, n, BLOCK):
                blk = bytes(mv[i:i + BLOCK])
                if len(blk) < BLOCK:
                    blk = blk + bytes(BLOCK - len(blk))
                leaves += sha(blk).digest()
                res.blocks += 1
                if blk != _ZERO_BLOCK:
                    res.nonzero_blocks += 1
            pos += n
        res.bytes += length
    res.leaf_digests = bytes(leaves)
    return res


def _smaps(pid: int) -> list[tuple[str, str, str, dict[str, int]]]:
    """(range, perms, name, {field: kB}) per mapping of /proc/<pid>/smaps."""
    out: list[tuple[str, str, str, dict[str, int]]] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                name = head[5].strip() if len(head) > 5 else ""
                out.append((head[0], head[1], name, {}))
            elif out and len(head) >= 2 and head[0].endswith(":") and head[1].isdigit():
                out[-1][3][head[0][:-1]] = int(head[1])
    return out


def py_present_ranges(pid: int) -> list[tuple[int, int]]:
    """agent.destroy.wipe.present_ranges in Python: resident private (and resident writable
    shared) pages of `pid` from smaps and pagemap."""
    out: list[tuple[int, int]] = []
    maps = _smaps(pid)
    pm = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for rng, perms, name, fields in maps:
            if name in _SKIP_MAPS:
                continue
            shared = perms[3] == "s"
            if shared and (perms[1] != "w" or not fields.get("Rss")):
                continue
            if not shared and not fields.get("Anonymous"):
                continue  # no private dirty page: nothing of the process's own data
            parts = [rng]
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            npages = (hi - lo) // PAGE
            first = lo // PAGE
            idx = 0
            run_start = None
            while idx < npages:
                n = min(npages - idx, 65536)
                raw = os.pread(pm, n * 8, (first + idx) * 8)
                entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
                for j, e in enumerate(entries):
                    present = e >> 63 & 1
                    file_or_shared = e >> 61 & 1
                    keep = present and (shared or not file_or_shared)
                    addr = lo + (idx + j) * PAGE
                    if keep and run_start is None:
                        run_start = addr
                    elif not keep and run_start is not None:
                        out.append((run_start, addr - run_start))
                        run_start = None
                idx += len(entries)
                if len(entries) < n:
                    break
            if run_start is not None:
                out.append((run_start, lo + idx * PAGE - run_start))
    finally:
        os.close(pm)
    return out


# ---- /proc scans (residue.processes_in_namespaces, processes_with_ids, mounts_of) -------

def py_processes_in_namespaces(inodes: Iterable[int],
                               names: Sequence[str] = residue.NAMESPACES) -> tuple[int, int]:
    """residue.processes_in_namespaces in Python: (processes, threads) with a namespace
    among `names` whose inode is one of `inodes`."""
    procs: set[int] = set()
    threads = 0
    for pid, _tid in residue._tasks_in_namespaces(inodes, tuple(names)):
        procs.add(pid)
        threads += 1
    return len(procs), threads


def py_processes_with_ids(uid_ranges: list[tuple[int, int]],
                          gid_ranges: list[tuple[int, int]]) -> int:
    """residue.processes_with_ids in Python: processes with a thread whose uid or gid
    (any of real, effective, saved, fs) is in a range."""
    return len({pid for pid, _tid, _status in residue._tasks_with_ids(uid_ranges, gid_ranges)})


def py_mounts_of(dev: str | None, ns_inodes: Iterable[int],
                 proc: str = "/proc") -> tuple[int, int]:
    """residue.mounts_of in Python: (mounts of superblock `dev` or nsfs mounts pinning one
    of `ns_inodes`, mount namespaces read), each mount namespace read once."""
    pinned = {f"{n}:[{i}]" for i in ns_inodes for n in residue.NAMESPACES}
    seen_ns: set[str] = set()
    count = 0
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            mnt_ns = os.readlink(f"{proc}/{name}/ns/mnt")  # "mnt:[inode]"
            if mnt_ns in seen_ns:
                continue
            with open(f"{proc}/{name}/mountinfo") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited
        except PermissionError:
            if residue._outside_sandboxes(f"{proc}/{name}"):
                continue
            raise
        seen_ns.add(mnt_ns)
        for m in residue.parse_mountinfo(text):
            if (dev is not None and m.dev == dev) or (m.fs_type == "nsfs" and m.root in pinned):
                count += 1
    return count, len(seen_ns)


def py_own_mounts_of(dev: str) -> int:
    """residue.own_mounts_of in Python: mounts of superblock `dev` in this process's
    /proc/self/mountinfo."""
    return sum(1 for m in residue.read_mountinfo() if m.dev == dev)


def py_is_mountpoint(path: str) -> bool:
    """mounts.is_mountpoint in Python: a /proc/self/mountinfo line has `path` as its mount
    point."""
    target = os.path.abspath(path)
    return any(m.mount_point.replace("\\040", " ") == target for m in residue.read_mountinfo())
