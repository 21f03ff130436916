"""cgroup v1 driver (hybrid hosts like the ones here): memory, pids, cpu and freezer are
separate v1 hierarchies; a controller-less cgroup2 tree (if mounted) gives `cgroup.kill`
and `cgroup.events`, so the driver makes a directory there too."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from agent import log
from agent._native import ffi as _native_ffi
from agent._native import lib as _native_lib

from .base import (
    CPU_PERIOD_US,
    CgroupDriver,
    CgroupError,
    CgroupHandle,
    CgroupLimits,
    check_name,
    read_file,
    read_keyed,
    read_pids,
    rmdir_retry,
    write_control,
    write_file,
)

if TYPE_CHECKING:
    from .systemd_scope import SandboxScope

CONTROLLERS = ("memory", "pids", "cpu", "freezer")


def find_mounts(mountinfo: str = "/proc/self/mountinfo") -> tuple[dict[str, Path], Path | None]:
    """Mount points of the v1 controllers we use, and of the cgroup2 tree (or None)."""
    v1: dict[str, Path] = {}
    unified = None
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(rfields) < 3:
                continue
            fstype, opts = rfields[0], rfields[2].split(",")
            mnt = Path(fields[4].replace("\\040", " "))
            if fstype == "cgroup":
                for c in CONTROLLERS:
                    if c in opts and c not in v1:
                        v1[c] = mnt
            elif fstype == "cgroup2" and unified is None and fields[3] == "/":
                unified = mnt
    return v1, unified


def find_named_systemd(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """Mount point of the v1 `name=systemd` hierarchy (systemd's tracking hierarchy on a
    legacy host, kept in sync on a hybrid one), or None."""
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            rfields = right.split()
            if len(rfields) >= 3 and rfields[0] == "cgroup" and left.split()[3] == "/" \
                    and "name=systemd" in rfields[2].split(","):
                return Path(left.split()[4].replace("\\040", " "))
    return None


def service_subtree(proc_cgroup: str, env: dict[str, str]) -> str:
    """Where in the cgroup2 tree the agent's session directories go: under its own
    cgroup when systemd runs it as a service (Delegate=yes hands that subtree to it, and
    KillMode=control-group then reaches every sandbox too), else at the tree's root.
    A service's cgroup is stable across restarts, so recovery finds what a crashed agent
    left; a shell's session scope is not, hence the root outside systemd."""
    if not env.get("INVOCATION_ID"):
        return ""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            path = line[3:].strip().strip("/")
            if path.endswith(".service") and ".." not in path.split("/"):
                return path
    return ""


class V1Handle(CgroupHandle):
    mode = "v1"

    def __init__(self, name: str, dirs: dict[str, Path], unified: Path | None) -> None:
        self.name = name
        self.dirs = dirs  # controller -> directory
        self.unified = unified
        self.paths = [*dirs.values()] + ([unified] if unified else [])
        self._efd = -1
        self._oom_ctl_fd = -1

    # -- membership --------------------------------------------------------------
    def procs_files(self) -> list[Path]:
        return [p / "cgroup.procs" for p in self.paths]

    def pids(self) -> list[int]:
        seen: set[int] = set()
        for procs in self.procs_files():
            seen.update(read_pids(procs))
        return sorted(seen)

    # -- freezer -------------------------------------------------------------------
    def _state(self) -> str:
        return read_file(self.dirs["freezer"] / "freezer.state").strip()

    def freeze(self, timeout: float = 5.0) -> None:
        write_file(self.dirs["freezer"] / "freezer.state", "FROZEN")
        deadline = time.monotonic() + timeout
        delay = 0.0002
        while self._state() != "FROZEN":
            if time.monotonic() > deadline:
                raise CgroupError(f"cgroup {self.name} did not freeze within {timeout} s")
            # re-writing FROZEN retries tasks that were busy in the kernel
            write_file(self.dirs["freezer"] / "freezer.state", "FROZEN")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def thaw(self) -> None:
        write_file(self.dirs["freezer"] / "freezer.state", "THAWED")

    def frozen(self) -> bool:
        return self._state() == "FROZEN"

    # -- killing ---------------------------------------------------------------------
    def kill_all(self) -> None:
        per_pid = True
        if self.unified is not None:
            write_file(self.unified / "cgroup.kill", 1)  # atomic, no pid-reuse race
            inside = set(read_pids(self.unified / "cgroup.procs"))
            # a process that joined only some v1 hierarchies (a half-done attach) is not
            # reached by cgroup.kill: kill those stragglers pid by pid
            per_pid = any(set(read_pids(p / "cgroup.procs")) - inside
                          for p in self.dirs.values())
        if per_pid:
            # frozen first, so no listed pid can exit and be reused before the kill
            if self._state() != "FROZEN":
                self.freeze()
            for _ in range(100):
                pids = self.pids()
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if set(self.pids()) <= set(pids):
                    break
        # v1-frozen tasks cannot act on SIGKILL until thawed
        self.thaw()

    def empty(self) -> bool:
        if self.unified is not None:
            try:
                if read_keyed(self.unified / "cgroup.events").get("populated", 1) != 0:
                    return False
            except FileNotFoundError:
                pass
        return not any(read_pids(p / "cgroup.procs") for p in self.dirs.values())

    # -- memory ----------------------------------------------------------------------
    def memory_usage(self) -> int:
        return int(read_file(self.dirs["memory"] / "memory.usage_in_bytes"))

    def oom_kills(self) -> int:
        return read_keyed(self.dirs["memory"] / "memory.oom_control").get("oom_kill", 0)

    def memory_usage_limit(self) -> int:
        return int(read_file(self.dirs["memory"] / "memory.limit_in_bytes"))

    def guard_oom(self, headroom: int) -> bool:
        try:
            write_file(self.dirs["memory"] / "memory.oom_control", 1)
        except OSError:
            return False
        return read_keyed(self.dirs["memory"] / "memory.oom_control").get(
            "oom_kill_disable", 0) == 1

    def oom_stalled(self) -> bool:
        return read_keyed(self.dirs["memory"] / "memory.oom_control").get("under_oom", 0) == 1

    def make_room(self, headroom: int) -> None:
        self.set_memory_limit(int(read_file(self.dirs["memory"] / "memory.limit_in_bytes"))
                              + headroom)

    def kernel_oom_fallback(self) -> None:
        write_file(self.dirs["memory"] / "memory.oom_control", 0)
        self.thaw()

    def _read_int(self, name: str) -> int | None:
        try:
            return int(read_file(self.dirs["memory"] / name))
        except (OSError, ValueError):
            return None

    def _counters(self) -> tuple[int, int] | None:
        """(memsw-or-memory usage minus kmem usage, kmem usage) from one consistent reading:
        the total is read before and after kmem and the reading is retried until both
        agree (a kernel object freed between the two reads would otherwise show as user
        memory)."""
        total = "memory.memsw.usage_in_bytes"
        if not (self.dirs["memory"] / total).exists():
            total = "memory.usage_in_bytes"
        for _ in range(100):
            a = self._read_int(total)
            k = self._read_int("memory.kmem.usage_in_bytes")
            b = self._read_int(total)
            if a is None or k is None:
                return None
            if a == b:
                return max(0, a - k), k
        return None

    def memory_after(self) -> tuple[int, int]:
        """v1: the exact page counters (memory.stat is flushed lazily, up to ~2 s stale);
        memory.stat total_rss + total_cache + total_swap only when they are unreadable."""
        got = self._counters()
        if got is not None:
            return got
        stat = read_keyed(self.dirs["memory"] / "memory.stat")
        user = stat["total_rss"] + stat["total_cache"] + stat.get("total_swap", 0)
        return user, max(0, self.memory_usage() - user)

    def reclaim(self) -> bool:
        return write_control(self.dirs["memory"] / "memory.force_empty", "0")

    def reclaim_rounds(self, tries: int) -> tuple[int, int, int]:
        """CgroupHandle.reclaim_rounds in one native call (native/ext/cgmem.c: the same
        requests and exact page counters, without a Python file open per read); the
        Python loop (with memory_after's memory.stat fallback) when it cannot read them."""
        out = _native_ffi.new("int64_t[3]")
        if _native_lib.nrx_cg_v1_release(os.fsencode(self.dirs["memory"]), tries, out) < 0:
            return super().reclaim_rounds(tries)
        return int(out[0]), int(out[1]), int(out[2])

    def swap_limited(self) -> bool:
        """memsw limit == memory limit: no byte of the session may go to swap."""
        memsw = self._read_int("memory.memsw.limit_in_bytes")
        return memsw is not None and memsw == self._read_int("memory.limit_in_bytes")

    def set_memory_limit(self, limit_bytes: int) -> None:
        mem = self.dirs["memory"]
        memsw = mem / "memory.memsw.limit_in_bytes"
        # the kernel keeps limit <= memsw limit at every step: order the writes
        if memsw.exists() and limit_bytes > int(read_file(mem / "memory.limit_in_bytes")):
            write_file(memsw, limit_bytes)
            write_file(mem / "memory.limit_in_bytes", limit_bytes)
        else:
            write_file(mem / "memory.limit_in_bytes", limit_bytes)
            if memsw.exists():
                write_file(memsw, limit_bytes)

    def oom_fd(self) -> int:
        if self._efd < 0:
            mem = self.dirs["memory"]
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                ctl = os.open(mem / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    write_file(mem / "cgroup.event_control", f"{efd} {ctl}")
                except OSError:
                    os.close(ctl)
                    raise
            except OSError:
                os.close(efd)
                raise
            self._efd, self._oom_ctl_fd = efd, ctl
        return self._efd

    # -- lifetime --------------------------------------------------------------------
    def close(self) -> None:
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1
        if self._oom_ctl_fd >= 0:
            os.close(self._oom_ctl_fd)
            self._oom_ctl_fd = -1

    def remove(self) -> None:
        if self.dirs.get("freezer") is not None and self.dirs["freezer"].exists():
            with contextlib.suppress(OSError):
                if self._state() != "THAWED":
                    self.thaw()
        self.close()
        for p in self.paths:
            rmdir_retry(p)


class V1Driver(CgroupDriver):
    mode = "v1"

    def __init__(self, prefix: str, *, mounts: dict[str, Path] | None = None,
                 unified: Path | None | bool = True, scope: SandboxScope | None = None) -> None:
        """`scope`: under systemd, the sandbox scope (systemd_scope.py): each session also
        gets a directory under the scope in the hierarchies systemd tracks units by
        (the cgroup2 tree, name=systemd), so KillMode= of the agent's unit no longer
        reaches it; the older layout (under the unit's cgroup2 directory) is still listed
        and opened for recovery.  remove_root() ends the scope."""
        found, found_unified = find_mounts()
        self.scope = scope
        self.prefix = check_name(prefix)
        mounts = mounts if mounts is not None else found
        missing = [c for c in CONTROLLERS if c not in mounts]
        if missing:
            raise CgroupError(f"cgroup v1 controllers not mounted: {', '.join(missing)} "
                              "(mount them under /sys/fs/cgroup/<controller>)")
        self.roots = {c: mounts[c] / self.prefix for c in CONTROLLERS}
        self.legacy_unified_root: Path | None = None
        if unified is True:
            unified = found_unified
            if unified is not None:
                with open("/proc/self/cgroup") as f:
                    sub = service_subtree(f.read(), dict(os.environ))
                if scope is not None:
                    if sub:
                        self.legacy_unified_root = unified / sub / self.prefix
                    unified = scope.dir_under(unified)
                else:
                    unified = unified / sub if sub else unified
        self.unified_root = (unified / self.prefix) if unified else None
        if scope is not None:
            named = find_named_systemd()
            if named is not None:
                self.roots["systemd"] = scope.dir_under(named) / self.prefix
        self._memsw: bool | None = None
        self._log = log.get().bind(component="cgroups", mode="v1")

    def _ensure_root(self) -> None:
        for root in [*self.roots.values(), self.unified_root]:
            if root is not None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(root, 0o755)

    def _dirs(self, name: str) -> tuple[dict[str, Path], Path | None]:
        check_name(name)
        dirs = {c: r / name for c, r in self.roots.items()}
        return dirs, (self.unified_root / name if self.unified_root else None)

    def create(self, name: str, limits: CgroupLimits) -> CgroupHandle:
        self._ensure_root()
        dirs, unified = self._dirs(name)
        made: list[Path] = []
        try:
            for p in [*dirs.values(), unified]:
                if p is not None:
                    os.mkdir(p, 0o755)
                    made.append(p)
            mem = dirs["memory"]
            write_file(mem / "memory.limit_in_bytes", limits.memory_bytes)
            if (mem / "memory.memsw.limit_in_bytes").exists():
                write_file(mem / "memory.memsw.limit_in_bytes", limits.memory_bytes)
            with contextlib.suppress(OSError):
                write_file(mem / "memory.swappiness", 0)
            write_file(dirs["pids"] / "pids.max", limits.pids_max)
            write_file(dirs["cpu"] / "cpu.cfs_period_us", CPU_PERIOD_US)
            write_file(dirs["cpu"] / "cpu.cfs_quota_us", limits.cpu_quota_us())
        except OSError as e:
            for p in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(p)
            if e.errno == errno.EEXIST:
                raise CgroupError(f"cgroup {name} already exists under {self.prefix}") from None
            raise CgroupError(f"cannot create cgroup {name}: {e}") from None
        return V1Handle(name, dirs, unified)

    def open(self, name: str) -> CgroupHandle:
        dirs, unified = self._dirs(name)
        dirs = {c: p for c, p in dirs.items() if p.is_dir()}
        if unified is not None and not unified.is_dir():
            legacy = self.legacy_unified_root
            unified = legacy / name if legacy is not None and (legacy / name).is_dir() else None
        return _PartialV1Handle(name, dirs, unified)

    def leftovers(self) -> list[str]:
        names: set[str] = set()
        for root in [*self.roots.values(), self.unified_root, self.legacy_unified_root]:
            if root is not None and root.is_dir():
                names.update(e.name for e in os.scandir(root) if e.is_dir(follow_symlinks=False))
        return sorted(names)

    def remove_root(self) -> bool:
        """Remove the tree once it holds no session; then end the sandbox scope, if any."""
        if self.leftovers():
            return False
        for root in [*self.roots.values(), self.unified_root]:
            if root is not None:
                rmdir_retry(root)
        if self.legacy_unified_root is not None:
            with contextlib.suppress(OSError, CgroupError):
                rmdir_retry(self.legacy_unified_root, timeout=0)
        if self.scope is not None:
            self.scope.release()
        return True


class _PartialV1Handle(V1Handle):
    """A handle on what recovery found: some controller directories may be missing."""

    def __init__(self, name: str, dirs: dict[str, Path], unified: Path | None) -> None:
        super().__init__(name, dirs, unified)

    def _state(self) -> str:
        if "freezer" not in self.dirs:
            return "THAWED"
        return super()._state()

    def freeze(self, timeout: float = 5.0) -> None:
        if "freezer" in self.dirs:
            super().freeze(timeout)

    def thaw(self) -> None:
        if "freezer" in self.dirs:
            super().thaw()

    def memory_usage(self) -> int:
        return super().memory_usage() if "memory" in self.dirs else 0

    def set_memory_limit(self, limit_bytes: int) -> None:
        if "memory" in self.dirs:
            super().set_memory_limit(limit_bytes)

    def oom_kills(self) -> int:
        return super().oom_kills() if "memory" in self.dirs else 0

    def oom_stalled(self) -> bool:
        return super().oom_stalled() if "memory" in self.dirs else False

    def memory_usage_limit(self) -> int:
        return super().memory_usage_limit() if "memory" in self.dirs else 0

    def guard_oom(self, headroom: int) -> bool:
        return super().guard_oom(headroom) if "memory" in self.dirs else False

    def memory_after(self) -> tuple[int, int]:
        return super().memory_after() if "memory" in self.dirs else (0, 0)

    def reclaim(self) -> bool:
        return super().reclaim() if "memory" in self.dirs else False

    def reclaim_rounds(self, tries: int) -> tuple[int, int, int]:
        return super().reclaim_rounds(tries) if "memory" in self.dirs else (0, 0, 0)

    def swap_limited(self) -> bool:
        return super().swap_limited() if "memory" in self.dirs else False
