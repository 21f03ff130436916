"""procfs / mountinfo / cgroupfs scans shared by the steps (1, 2, 5, 6).

Everything here reads the running kernel's view and returns counts or inode numbers;
nothing returns a path inside a sandbox, a command line or a file name.  Processes that
exit while being scanned are skipped (their absence is the answer we want).

The counting scans of every process on the host (namespaces, ids, mounts) run in C
(native/ext/procscan.c): from Python every readlink releases and retakes the GIL, which
serialised concurrent destructions.  The native extension is part of every install
(setup.py builds it; scripts/setup.sh runs that), so importing this module without it
fails: there is no slower fallback that could answer differently.  The same scans in
plain Python are the tests' oracles (tests/oracles.py).  The per-task walks below
(`unreaped_in_namespaces`, `ids_holders`) classify the few tasks a scan found and stay in
Python."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent._native import ffi as _ffi
from agent._native import lib as _lib

__all__ = ["NAMESPACES", "Mount", "NsHandles", "SuperblockWatch", "id_map", "ids_holders",
           "list_pids", "list_tasks", "mounts_of", "ns_inodes", "parse_mountinfo",
           "unreaped_in_namespaces", "zombies_not_ours", "processes_in_namespaces",
           "processes_with_ids", "processes_with_ids_fast", "read_mountinfo"]

NAMESPACES = ("user", "mnt", "uts", "ipc", "pid", "net", "cgroup")
PROC = Path("/proc")


def list_pids() -> list[int]:
    """Every process (thread-group leader) the host's /proc shows."""
    return [int(n) for n in os.listdir(PROC) if n.isdigit()]


def list_tasks() -> list[tuple[int, int]]:
    """Every (pid, tid) on the host: namespaces and credentials are per thread."""
    out: list[tuple[int, int]] = []
    for pid in list_pids():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        out.extend((pid, int(t)) for t in tids if t.isdigit())
    return out


def ns_inodes(pid: int | str, names: Iterable[str] = NAMESPACES) -> dict[str, int]:
    """Inode numbers of the namespaces of /proc/<pid> (`self` allowed); raises OSError."""
    return {n: os.stat(PROC / str(pid) / "ns" / n).st_ino for n in names}


def _ns_mask(names: Iterable[str]) -> int:
    """The bit mask of namespace names procscan.c takes (bit i: NAMESPACES[i])."""
    mask = 0
    for n in names:
        if n not in NAMESPACES:
            raise ValueError(f"unknown namespace {n!r}")
        mask |= 1 << NAMESPACES.index(n)
    return mask


def _ok(rc: int) -> int:
    """A native scan's result, or its negative errno raised as OSError."""
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return int(rc)


def _u64s(values: list[int]):
    return _ffi.new("uint64_t[]", values or [0])


def _flat(ranges: list[tuple[int, int]]) -> list[int]:
    return [int(x) for r in ranges for x in r]


def processes_in_namespaces(inodes: Iterable[int],
                            names: Iterable[str] = NAMESPACES) -> tuple[int, int]:
    """(processes, threads) on the host with a namespace (among `names`) whose inode is
    one of `inodes`."""
    inodes = sorted(set(inodes))
    procs, threads = _ffi.new("int *"), _ffi.new("int *")
    _ok(_lib.nrx_scan_ns(_u64s(inodes), len(inodes), _ns_mask(names), procs, threads))
    return int(procs[0]), int(threads[0])


def _tasks_in_namespaces(inodes: Iterable[int], names: tuple[str, ...]):
    """(pid, tid) of every task with a namespace (among `names`) whose inode is one of
    `inodes`."""
    # readlink of /proc/PID/task/TID/ns/<name> is "<name>:[<inode>]", the same inode
    # number stat() reports, at a third of the cost (no nsfs dentry is looked up)
    wanted = {f"{n}:[{i}]" for n in names for i in set(inodes)}
    if not wanted:
        return
    readlink = os.readlink
    for pid, tid in list_tasks():
        base = f"/proc/{pid}/task/{tid}/ns/"
        for n in names:
            try:
                link = readlink(base + n)
            except OSError:
                continue
            if link in wanted:
                yield pid, tid
                break


def unreaped_in_namespaces(inodes: Iterable[int],
                           names: Iterable[str] = NAMESPACES) -> tuple[int, int]:
    """(processes in the namespaces, of which exited and not yet reaped): a zombie keeps its
    PID and user namespace links until its parent reaps it, but holds no memory, files or
    other namespaces and runs no code.  A re-adopted sandbox's PID 1 is not the agent's
    child, so where the host's init is slow to reap (or never does), it is such a zombie."""
    kinds: dict[int, bool] = {}  # pid -> every matching thread exited so far
    for pid, tid in _tasks_in_namespaces(inodes, tuple(names)):
        try:
            with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
                dead = _status_state(f.read()) in (b"Z", b"X")
        except FileNotFoundError:
            dead = True  # reaped meanwhile
        kinds[pid] = kinds.get(pid, True) and dead
    return len(kinds), sum(1 for dead in kinds.values() if dead)


def processes_with_ids(uid_ranges: list[tuple[int, int]],
                       gid_ranges: list[tuple[int, int]]) -> int:
    """Processes with any thread whose real/effective/saved/fs uid or gid is in a range
    ([start, end))."""
    u, g = _flat(uid_ranges), _flat(gid_ranges)
    return _ok(_lib.nrx_scan_ids(_u64s(u), len(u), _u64s(g), len(g)))


def processes_with_ids_fast(uid_ranges: list[tuple[int, int]],
                            gid_ranges: list[tuple[int, int]]) -> tuple[int, str]:
    """(processes_with_ids(...), how the ids were read): every thread's real, effective,
    saved and fs uid and gid through a thread pidfd (PIDFD_GET_INFO, Linux 6.13; no
    status text is generated, ~3x cheaper per task), or from /proc/PID/task/TID/status
    where the kernel has no PIDFD_GET_INFO or /proc is not of this PID namespace."""
    u, g = _flat(uid_ranges), _flat(gid_ranges)
    n = _lib.nrx_scan_ids_pidfd(_u64s(u), len(u), _u64s(g), len(g))
    # not on this kernel (ENOTTY, EINVAL: no PIDFD_GET_INFO / PIDFD_THREAD; ENOSYS), denied
    # by a seccomp filter (EPERM), or a /proc of another PID namespace (EXDEV)
    if n in (-errno.ENOTTY, -errno.EINVAL, -errno.EXDEV, -errno.ENOSYS, -errno.EPERM):
        return processes_with_ids(uid_ranges, gid_ranges), "proc_status"
    return _ok(n), "pidfd_info"


def _tasks_with_ids(uid_ranges: list[tuple[int, int]], gid_ranges: list[tuple[int, int]]):
    """(pid, tid, status text) of every task with an id in a range (see processes_with_ids)."""
    def inside(ids: list[int], ranges: list[tuple[int, int]]) -> bool:
        return any(lo <= i < hi for i in ids for lo, hi in ranges)

    for pid, tid in list_tasks():
        try:
            with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
                data = f.read()
        except OSError:
            continue
        uids, gids = _status_ids(data, b"\nUid:"), _status_ids(data, b"\nGid:")
        if inside(uids, uid_ranges) or inside(gids, gid_ranges):
            yield pid, tid, data


def ids_holders(uid_ranges: list[tuple[int, int]], gid_ranges: list[tuple[int, int]],
                pid_ns: int | None) -> dict[str, int]:
    """The processes processes_with_ids counts, by what the kernel says of them:
    `exiting` (a zombie or dead task, or one past releasing its namespaces in exit: it
    holds no memory and runs no code, only its pid and credentials until reaped),
    `in_session` (alive in the session's PID namespace `pid_ns`) and `outside` (alive
    anywhere else: another workload on this host runs with the session's ids)."""
    kinds: dict[int, str] = {}
    rank = {"exiting": 0, "outside": 1, "in_session": 2}
    for pid, tid, status in _tasks_with_ids(uid_ranges, gid_ranges):
        kind = "exiting"
        if _status_state(status) not in (b"Z", b"X"):
            try:
                ino = os.stat(f"/proc/{pid}/task/{tid}/ns/pid").st_ino
                kind = "in_session" if ino == pid_ns else "outside"
            except (FileNotFoundError, ProcessLookupError):
                pass  # namespaces already released: in exit (or gone meanwhile)
            except OSError:
                kind = "outside" if _outside_sandboxes(f"/proc/{pid}") else "in_session"
        if rank[kind] >= rank[kinds.get(pid, "exiting")]:
            kinds[pid] = kind  # a process counts by its most alive thread
    out = {"exiting": 0, "in_session": 0, "outside": 0}
    for kind in kinds.values():
        out[kind] += 1
    return out


def zombies_not_ours(uid_ranges: list[tuple[int, int]],
                     gid_ranges: list[tuple[int, int]]) -> int:
    """Zombies holding the ids (their leader thread exited) whose parent is not this
    process: nothing the agent does reaps them (a re-adopted PID 1 is the host init's
    child), so waiting for them only waits for another program."""
    me = os.getpid()
    n = 0
    for pid, tid, status in _tasks_with_ids(uid_ranges, gid_ranges):
        if pid == tid and _status_state(status) in (b"Z", b"X") \
                and _status_ids(status, b"\nPPid:") != [me]:
            n += 1
    return n


def _status_state(data: bytes) -> bytes:
    """The state letter of a /proc status text (`State:\tZ (zombie)` -> b"Z")."""
    i = data.find(b"\nState:")
    return data[i + 7:i + 16].strip()[:1] if i >= 0 else b""


def _status_ids(data: bytes, key: bytes) -> list[int]:
    """The ids of one `Uid:`/`Gid:` line of /proc/.../status (real, effective, saved, fs)."""
    i = data.find(key)
    if i < 0:
        return []
    i += len(key)
    return [int(x) for x in data[i:data.find(b"\n", i)].split()]


def id_map(pid: int, which: str) -> list[tuple[int, int]]:
    """Host ranges [start, end) of /proc/<pid>/uid_map or gid_map (`which`)."""
    out = []
    with open(PROC / str(pid) / which) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                host, count = int(parts[1]), int(parts[2])
                out.append((host, host + count))
    return out


@dataclass(frozen=True)
class Mount:
    mount_id: int
    dev: str          # "major:minor" of the superblock
    root: str         # root of the mount within its filesystem (nsfs: "net:[inode]")
    mount_point: str
    fs_type: str


def parse_mountinfo(text: str) -> list[Mount]:
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if not sep or len(f) < 5 or not r:
            continue
        out.append(Mount(int(f[0]), f[2], f[3], f[4], r[0]))
    return out


def read_mountinfo(pid: int | str = "self") -> list[Mount]:
    with open(PROC / str(pid) / "mountinfo") as f:
        return parse_mountinfo(f.read())


def mounts_of(dev: str | None, ns_inodes_: Iterable[int] = (),
              proc: str = "/proc") -> tuple[int, int]:
    """(mounts, mount namespaces scanned): mounts in ANY mount namespace on the host whose
    superblock is `dev`, plus nsfs mounts pinning one of the given namespace inodes.  Each
    mount namespace is read once (through the first process found in it).  A process that
    exited meanwhile is skipped; any other read error raises (a scan that could not look
    never answers "none"), except a refused one for a process provably outside every
    sandbox (one NSpid entry, as `_outside_sandboxes` tells).  `proc` is for tests on a
    /proc-shaped tree.  With many sessions, every one of their mount namespaces is read
    and parsed by each destruction: in C (procscan.c, nrx_count_mounts_at)."""
    ns_inodes_ = sorted(set(ns_inodes_))
    out = _ffi.new("int[2]")
    _ok(_lib.nrx_count_mounts_at(os.fsencode(proc),
                                 dev.encode() if dev is not None else _ffi.NULL,
                                 _u64s(ns_inodes_), len(ns_inodes_), out, out + 1))
    return int(out[0]), int(out[1])


def _outside_sandboxes(pid_dir: str) -> bool:
    """True when the process lives in the PID namespace of the /proc being read and in no
    namespace below it (one NSpid entry), or exited: every sandbox process is in its
    sandbox's own PID namespace, a child of the agent's (this VM's PID 1 refuses its
    ns links and mountinfo even to root with CAP_SYS_PTRACE; procscan.c does the same)."""
    try:
        with open(f"{pid_dir}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return len(line.split()) == 2
    except (FileNotFoundError, ProcessLookupError):
        return True
    return False


# -- kernel facts that answer without a walk ------------------------------------------------

class NsHandles:
    """The session's namespaces by nsfs file handle (Linux 6.18) instead of by fd pins.

    A handle names a namespace by its 64-bit id, which the kernel never reuses (inode
    numbers are reused at once, hence step 1's pins).  Reopening a handle answers ESTALE
    once the namespace no longer exists: then no task is in it and no fd or nsfs bind
    mount holds it, a kernel fact that needs no walk of /proc.  A namespace that still
    exists is reopened (a pin again, so its inode number stays its own) and walked for."""

    def __init__(self, handles: dict[str, bytes]) -> None:
        self.handles = handles

    @classmethod
    def from_pins(cls, pins: list[int]) -> NsHandles | None:
        """Handles of step 1's seven pins (NAMESPACES order), or None where the kernel
        makes none (before 6.18) or a pin is missing."""
        if len(pins) != len(NAMESPACES):
            return None
        out = {}
        buf = _ffi.new("unsigned char[256]")
        for name, fd in zip(NAMESPACES, pins, strict=True):
            n = _lib.nrx_ns_handle(fd, buf, 256)
            if n < 0:
                return None
            out[name] = bytes(_ffi.buffer(buf, n))
        return cls(out)

    def reopen(self, names: Iterable[str] = NAMESPACES
               ) -> tuple[dict[str, int], dict[str, int]]:
        """({name: inode} of the namespaces among `names` that still exist, {name: fd}
        pinning them).  Only ESTALE counts as gone: any other error leaves the namespace
        to the walk (without a pin: at worst a reused inode is found as residue, never the
        reverse)."""
        alive: dict[str, int] = {}
        fds: dict[str, int] = {}
        for name in names:
            h = self.handles[name]
            fd = _lib.nrx_ns_open(h, len(h))
            if fd == -errno.ESTALE:
                continue
            if fd >= 0:
                fds[name] = fd
                alive[name] = os.fstat(fd).st_ino
            else:
                alive[name] = int.from_bytes(h[-4:], "little")  # nsfs handle: ..., ns_inum
        return alive, fds


# ioctl(2) on a PID namespace fd (Linux 6.10): the pid, in the caller's namespace, of the
# thread-group leader whose pid is `arg` in that namespace; ESRCH when there is none
NS_GET_TGID_FROM_PIDNS = (2 << 30) | (4 << 16) | (0xB7 << 8) | 7


def pid_namespace_emptied(fd: int) -> bool:
    """True when the PID namespace `fd` is open on has no process 1 any more.  The kernel
    reaps a PID namespace's init only after every other task of it (nested namespaces
    included) was reaped, and allocates no pid in it after that, so this is "no task is,
    or can again be, in this namespace".  False when its init exists (alive or zombie)."""
    try:
        fcntl.ioctl(fd, NS_GET_TGID_FROM_PIDNS, 1)
    except ProcessLookupError:
        return True
    return False


class SuperblockWatch:
    """An inotify watch on the session tmpfs root: the kernel queues IN_UNMOUNT when the
    superblock is shut down, which it does only once no mount of it is left anywhere
    (every mount, attached or not, in any mount namespace, and every open file holds an
    active reference on it).  So `released()` true is "no mount of the tmpfs exists" as a
    kernel fact, with no mount namespace read."""

    def __init__(self, fd: int) -> None:
        self.ifd = _ok(_lib.nrx_sb_watch(fd))
        self.seen = False

    def released(self) -> bool:
        if not self.seen:
            self.seen = bool(_ok(_lib.nrx_sb_released(self.ifd)))
        return self.seen

    def close(self) -> None:
        if self.ifd >= 0:
            os.close(self.ifd)
            self.ifd = -1


TMPFS_MAGIC = 0x01021994  # statfs(2) f_type of a tmpfs


def fs_magic(fd: int) -> int:
    """The f_type fstatfs(2) reports for the filesystem `fd` is on."""
    return _ok(_lib.nrx_fs_magic(fd))


def own_mounts_of(dev: str) -> int:
    """Mounts in this process's mount namespace whose superblock is `dev` ("major:minor"):
    the mount table mountinfo prints, read through listmount(2)/statmount(2) (Linux 6.8)
    without a text line per mount (the agent's table holds a view of every live session);
    /proc/self/mountinfo where the kernel has neither."""
    major, minor = (int(x) for x in dev.split(":"))
    n = _lib.nrx_own_mounts_of_dev(major, minor)
    if n in (-errno.ENOSYS, -errno.EPERM):  # an older kernel, or a seccomp filter
        return sum(1 for m in read_mountinfo() if m.dev == dev)
    return _ok(n)


def dev_str(st_dev: int) -> str:
    """st_dev as mountinfo writes it ("major:minor")."""
    return f"{os.major(st_dev)}:{os.minor(st_dev)}"
