"""The cgroup driver interface (SPEC 3.5): one interface, a v1 and a v2 driver.

A driver owns the agent's tree `<controller root>/<prefix>/` and creates one cgroup per
session under it (`<prefix>/<name>`).  It never writes to a cgroup it did not create;
the only exception is v2's delegated subtree root, whose `cgroup.subtree_control` the
agent must write to give its sessions controllers (systemd `Delegate=yes` hands it over).
"""

from __future__ import annotations

import abc
import errno
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from agent import fsops

CPU_PERIOD_US = 100_000
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class CgroupError(RuntimeError):
    """A cgroup operation failed; the message says what and how to fix it."""


class CgroupBusy(CgroupError):
    """remove() found processes still in the cgroup."""


@dataclass(frozen=True)
class CgroupLimits:
    """Per-session limits (from the session's tier)."""

    memory_bytes: int
    pids_max: int
    cpu_percent: int  # of one core; 200 = two cores

    @classmethod
    def from_tier(cls, tier) -> CgroupLimits:
        return cls(tier.memory_bytes, tier.pids_max, tier.cpu_percent)

    def cpu_quota_us(self) -> int:
        return max(1000, self.cpu_percent * CPU_PERIOD_US // 100)


def check_name(name: str) -> str:
    if not _NAME_RE.match(name) or name in (".", ".."):
        raise CgroupError(f"invalid cgroup name {name!r}: use [A-Za-z0-9_.-], 1..128 chars")
    return name


def write_file(path: Path, value: str | int) -> None:
    """Write one value to an existing control file (never creates one)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def read_file(path: Path) -> str:
    return fsops.read_small(path).decode()  # unbuffered: an exec reads oom counts twice


def read_keyed(path: Path) -> dict[str, int]:
    """Parse a flat-keyed file (`key value` per line) into ints."""
    out = {}
    for line in read_file(path).splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return out


def read_pids(procs: Path) -> list[int]:
    try:
        return [int(x) for x in read_file(procs).split()]
    except FileNotFoundError:
        return []


def rmdir_retry(path: Path, timeout: float = 1.0) -> None:
    """rmdir a cgroup directory; retry briefly on EBUSY (tasks still exiting)."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                raise CgroupBusy(f"cannot remove cgroup {path}: {e.strerror} "
                                 "(processes or child cgroups still inside)") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.02)


class _suppress_os:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et, e, tb) -> bool:
        return et is not None and issubclass(et, (OSError, CgroupError))


def write_control(path: Path, value: str) -> bool:
    """Write `value` to a control file if it exists; True when written."""
    try:
        write_file(path, value)
        return True
    except OSError:
        return False


class CgroupHandle(abc.ABC):
    """One session's cgroup (one directory per v1 controller, or one v2 directory)."""

    mode: str  # "v1" | "v2", as the driver that made it
    name: str
    paths: list[Path]  # every directory created (journal, recovery)

    @abc.abstractmethod
    def procs_files(self) -> list[Path]:
        """Every `cgroup.procs` a process must join to be fully inside this cgroup."""

    def attach(self, pid: int) -> None:
        """Move a process (all its threads) into this cgroup, in every hierarchy."""
        for procs in self.procs_files():
            write_file(procs, pid)

    @abc.abstractmethod
    def pids(self) -> list[int]: ...

    @abc.abstractmethod
    def freeze(self, timeout: float = 5.0) -> None: ...

    @abc.abstractmethod
    def thaw(self) -> None: ...

    @abc.abstractmethod
    def frozen(self) -> bool: ...

    @abc.abstractmethod
    def kill_all(self) -> None:
        """SIGKILL every process inside (cgroup.kill where available, else pid by pid
        while frozen); a frozen cgroup is thawed afterwards so the kills are delivered."""

    @abc.abstractmethod
    def empty(self) -> bool: ...

    def wait_empty(self, timeout: float = 5.0) -> bool:
        """Poll empty() until true or timeout; returns the final answer."""
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while not self.empty():
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return True

    @abc.abstractmethod
    def memory_usage(self) -> int: ...

    @abc.abstractmethod
    def set_memory_limit(self, limit_bytes: int) -> None:
        """Change the memory cap (and the v1 memsw cap with it).  Destruction may raise it
        before overwriting memory: writing a copy-on-write page allocates."""

    @abc.abstractmethod
    def memory_after(self) -> tuple[int, int]:
        """(user bytes, kernel bytes) still charged.  User bytes are the pages that can hold
        the session's data (anonymous, file/shmem i.e. tmpfs, swap); kernel bytes (slab
        objects freed lazily by RCU) are reported apart."""

    @abc.abstractmethod
    def reclaim(self) -> bool:
        """Ask the kernel to drop what the (empty) cgroup still has charged: per-CPU charge
        stocks and reclaimable caches.  True when a request was made."""

    def reclaim_rounds(self, tries: int) -> tuple[int, int, int]:
        """Up to `tries` reclaim requests, each followed by a look at the counters; stops at
        the first look with no user byte charged.  Returns (requests, user bytes, kernel
        bytes) of the last look; OSError when the counters cannot be read.  (v1 does the
        same in one native call.)"""
        user, kernel = self.memory_after()
        n = 0
        while user and n < tries:
            self.reclaim()
            n += 1
            user, kernel = self.memory_after()
        return n, user, kernel

    @abc.abstractmethod
    def swap_limited(self) -> bool:
        """The cgroup forbids swap (its pages can never be written to a swap device)."""

    @abc.abstractmethod
    def memory_usage_limit(self) -> int:
        """The session's memory cap as configured (v2 with the guard on: memory.high)."""

    @abc.abstractmethod
    def oom_kills(self) -> int: ...

    # -- the agent, not the kernel, handles OOM (issue 12) -------------------------------
    @abc.abstractmethod
    def guard_oom(self, headroom: int) -> bool:
        """Keep the kernel OOM killer away from this cgroup so the agent can end the
        session itself (wipe before free): v1 memory.oom_control = 1 (a task at the cap
        sleeps, under_oom); v2 memory.high = the cap and memory.max = cap + `headroom`
        (a task over the cap is throttled).  True when in force."""

    @abc.abstractmethod
    def oom_stalled(self) -> bool:
        """The session is at its cap and cannot get more memory: v1 under_oom; v2 the
        unreclaimable bytes (anon + shmem, no swap) reached memory.high."""

    @abc.abstractmethod
    def make_room(self, headroom: int) -> None:
        """Let a task stalled at the cap run on to the (already requested) freezer: v1
        raises the limit by `headroom`; v2 lifts memory.high to memory.max."""

    @abc.abstractmethod
    def kernel_oom_fallback(self) -> None:
        """Hand the cgroup back to the kernel OOM killer (the agent did not end the
        session in bounded time): thaw, and let the cap be enforced by killing."""

    def request_freeze(self) -> None:
        """Ask for a freeze without waiting for it (a task stalled at the cap only
        reaches the freezer once make_room() lets it run)."""
        with _suppress_os():
            self.freeze(timeout=0)

    def contain_oom(self, headroom: int, timeout: float = 5.0) -> None:
        """Freeze a cgroup stalled at its cap: request the freeze, make room, wait."""
        self.request_freeze()
        self.make_room(headroom)
        self.freeze(timeout)

    @abc.abstractmethod
    def oom_fd(self) -> int:
        """A file descriptor that becomes readable when an OOM kill happens.  Owned by the
        handle (closed by remove()/close()); read it to re-arm (v1 eventfd: 8 bytes)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the handle's fds without removing anything (idempotent)."""

    @abc.abstractmethod
    def remove(self) -> None:
        """rmdir every directory; raises CgroupBusy if processes remain."""


class CgroupDriver(abc.ABC):
    mode: str  # "v1" | "v2"
    prefix: str

    @abc.abstractmethod
    def create(self, name: str, limits: CgroupLimits) -> CgroupHandle: ...

    @abc.abstractmethod
    def open(self, name: str) -> CgroupHandle:
        """A handle on an existing session cgroup (recovery), without touching its limits."""

    @abc.abstractmethod
    def leftovers(self) -> list[str]:
        """Names of session cgroups under our prefix (what a crash left behind)."""

    @abc.abstractmethod
    def remove_root(self) -> bool:
        """Remove the agent's tree if it holds no session; True when it is gone."""

    def enter_leaf(self) -> None:  # noqa: B027 - optional verb, v2 only
        """Move the agent into its own leaf (v2 "no internal processes"); v1: nothing."""

    def prepare(self) -> None:  # noqa: B027 - optional verb, v2 only
        """Make the agent's tree ready for sessions; the engine calls it once before it
        spawns its first nrx-init, which is started before its session's cgroups exist:
        on a delegated v2 tree a helper spawned while the agent still sits in the
        delegated cgroup would stay there, and the "no internal processes" rule would
        then refuse the controllers.  v1: nothing."""
