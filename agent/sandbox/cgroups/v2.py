"""cgroup v2 driver (modern hosts): one directory per session under the agent's delegated
subtree.  Under systemd that subtree is the sandbox scope (`nanorix-sandboxes-<prefix>.scope`,
`Delegate=yes`, systemd_scope.py), so the sandboxes outlive the agent's unit; with the scope
off (`[sandbox] systemd_scope = "off"`) it is the agent's own unit cgroup, and the "no
internal processes" rule means the agent first moves itself into `<prefix>/agent`
(`enter_leaf()`), then enables controllers for its children."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent import log

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

CONTROLLERS = ("memory", "pids", "cpu")
OOM_SLACK = 1 << 20  # unreclaimable bytes this close to memory.high count as an OOM
AGENT_LEAF = "agent"
_IN_MODIFY = 0x2
_IN_CLOEXEC = 0o2000000
_IN_NONBLOCK = 0o4000
_libc = ctypes.CDLL(None, use_errno=True)


def inotify_modify_fd(path: Path) -> int:
    """An inotify fd that becomes readable when `path` is modified (kernfs notifies)."""
    fd = _libc.inotify_init1(_IN_CLOEXEC | _IN_NONBLOCK)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    if _libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, os.strerror(e), str(path))
    return fd


def own_cgroup() -> str:
    """This process's cgroup2 path ("0::/…" line of /proc/self/cgroup)."""
    for line in read_file(Path("/proc/self/cgroup")).splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


class V2Handle(CgroupHandle):
    mode = "v2"

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.paths = [path]
        self._ifd = -1
        self._headroom = 0
        self._cap: int | None = None

    def procs_files(self) -> list[Path]:
        return [self.path / "cgroup.procs"]

    def pids(self) -> list[int]:
        return read_pids(self.path / "cgroup.procs")

    def _events(self) -> dict[str, int]:
        return read_keyed(self.path / "cgroup.events")

    def freeze(self, timeout: float = 5.0) -> None:
        write_file(self.path / "cgroup.freeze", 1)
        deadline = time.monotonic() + timeout
        delay = 0.0002
        while self._events().get("frozen") != 1:
            if time.monotonic() > deadline:
                raise CgroupError(f"cgroup {self.name} did not freeze within {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def thaw(self) -> None:
        write_file(self.path / "cgroup.freeze", 0)

    def frozen(self) -> bool:
        return self._events().get("frozen") == 1

    def kill_all(self) -> None:
        # cgroup.kill delivers SIGKILL to frozen tasks too (v2 freezer lets fatal signals in)
        write_file(self.path / "cgroup.kill", 1)

    def empty(self) -> bool:
        try:
            return self._events().get("populated", 1) == 0
        except FileNotFoundError:
            return True

    def memory_usage(self) -> int:
        return int(read_file(self.path / "memory.current"))

    def oom_kills(self) -> int:
        return read_keyed(self.path / "memory.events").get("oom_kill", 0)

    def set_memory_limit(self, limit_bytes: int) -> None:
        # with the OOM guard on, memory.high is the cap and memory.max sits above it
        if self._read_limit("memory.high") is not None:
            write_file(self.path / "memory.high", limit_bytes)
        write_file(self.path / "memory.max", limit_bytes + self._headroom)

    def memory_usage_limit(self) -> int:
        for name in ("memory.high", "memory.max"):
            v = self._read_limit(name)
            if v is not None:
                return v
        return 0

    def _read_limit(self, name: str) -> int | None:
        try:
            v = read_file(self.path / name).strip()
        except FileNotFoundError:
            return None
        return None if v == "max" else int(v)

    def _stat(self) -> dict[str, int]:
        return read_keyed(self.path / "memory.stat")

    def memory_after(self) -> tuple[int, int]:
        """v2: memory.stat anon + file + swap as user bytes, `kernel` apart."""
        stat = self._stat()
        user = stat.get("anon", 0) + stat.get("file", 0) + stat.get("swap", 0)
        return user, stat.get("kernel", max(0, self.memory_usage() - user))

    def reclaim(self) -> bool:
        return write_control(self.path / "memory.reclaim", str(1 << 30))

    def swap_limited(self) -> bool:
        return self._read_limit("memory.swap.max") == 0

    # -- OOM guard ------------------------------------------------------------------
    def guard_oom(self, headroom: int) -> bool:
        """memory.high = the cap (a task above it is throttled in reclaim, never killed),
        memory.max = cap + headroom (the kernel killer only beyond that, e.g. while the
        agent is down for longer than the throttle lasts)."""
        cap = self._read_limit("memory.max")
        if cap is None:
            return False
        try:
            write_file(self.path / "memory.high", cap)
            write_file(self.path / "memory.max", cap + headroom)
        except OSError:
            return False
        self._headroom, self._cap = headroom, cap
        return True

    def oom_stalled(self) -> bool:
        high = self._read_limit("memory.high")
        if high is None:
            return False
        stat = self._stat()
        # without swap, anonymous and shmem (tmpfs) pages cannot be reclaimed: once they
        # reach the cap, throttling cannot help and the session is out of memory (page
        # cache over the cap is reclaimed, so plain `high` events are not an OOM)
        return stat.get("anon", 0) + stat.get("shmem", 0) + OOM_SLACK >= high

    def make_room(self, headroom: int) -> None:
        mx = self._read_limit("memory.max")
        if mx is not None:
            write_file(self.path / "memory.high", mx)

    def kernel_oom_fallback(self) -> None:
        if self._cap is not None:
            write_file(self.path / "memory.max", self._cap)
        self.thaw()

    def oom_fd(self) -> int:
        if self._ifd < 0:
            self._ifd = inotify_modify_fd(self.path / "memory.events")
        return self._ifd

    def close(self) -> None:
        if self._ifd >= 0:
            os.close(self._ifd)
            self._ifd = -1

    def remove(self) -> None:
        self.close()
        rmdir_retry(self.path)


class V2Driver(CgroupDriver):
    mode = "v2"

    def __init__(self, prefix: str, root: Path, *, delegated: bool = False,
                 scope: SandboxScope | None = None, legacy_roots: Sequence[Path] = ()) -> None:
        """`root` is the delegated subtree (or the cgroup2 mount when the agent runs in "/").
        `delegated`: root is delegated to the agent (its own cgroup, or the sandbox scope);
        if the agent itself sits in it, it moves into its leaf before enabling controllers
        there (the root cgroup is exempt from that rule).  `scope`: the systemd sandbox
        scope whose cgroup `root` is (systemd_scope.py), ended by remove_root().
        `legacy_roots`: where sessions of an older layout may still be (under the agent's
        unit cgroup, before the scope): listed, opened and removed, never created in."""
        self.prefix = check_name(prefix)
        self.root = Path(root)
        self.delegated = delegated
        self.scope = scope
        self.tree = self.root / self.prefix
        self.legacy_trees = [Path(r) / self.prefix for r in legacy_roots
                             if Path(r) / self.prefix != self.tree]
        self._enabled = False
        self._log = log.get().bind(component="cgroups", mode="v2")

    # a test seam: the fake cgroupfs populates control files here, as the kernel does
    def _mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o755)

    def _available(self, d: Path) -> set[str]:
        return set(read_file(d / "cgroup.controllers").split())

    def _enable(self, d: Path) -> None:
        have = self._available(d)
        missing = [c for c in CONTROLLERS if c not in have]
        if missing:
            raise CgroupError(
                f"cgroup v2 controllers {', '.join(missing)} not available in {d}: run the agent "
                "with systemd Delegate=yes (or enable them in the parent's cgroup.subtree_control)")
        on = set(read_file(d / "cgroup.subtree_control").split())
        want = [c for c in CONTROLLERS if c not in on]
        if want:
            try:
                write_file(d / "cgroup.subtree_control", " ".join("+" + c for c in want))
            except OSError as e:
                hint = (" (the directory still holds processes: call enter_leaf() first, the "
                        "'no internal processes' rule)") if e.errno == errno.EBUSY else ""
                raise CgroupError(f"cannot enable controllers in {d}: {e.strerror}{hint}") from None

    def prepare(self) -> None:
        self._ensure_tree()

    def _ensure_tree(self) -> None:
        if self._enabled:
            return
        if not self.tree.is_dir():
            with contextlib.suppress(FileExistsError):
                self._mkdir(self.tree)
        if self.delegated and os.getpid() in read_pids(self.root / "cgroup.procs"):
            self.enter_leaf()
        self._enable(self.root)
        self._enable(self.tree)
        self._enabled = True

    def enter_leaf(self) -> None:
        """Move this process into `<prefix>/agent` so the subtree root holds no process."""
        if not self.tree.is_dir():
            with contextlib.suppress(FileExistsError):
                self._mkdir(self.tree)
        leaf = self.tree / AGENT_LEAF
        if not leaf.is_dir():
            with contextlib.suppress(FileExistsError):
                self._mkdir(leaf)
        write_file(leaf / "cgroup.procs", os.getpid())
        self._log.info("cgroup_enter_leaf")

    def _dir(self, name: str) -> Path:
        check_name(name)
        if name == AGENT_LEAF:
            raise CgroupError(f"cgroup name {AGENT_LEAF!r} is reserved for the agent's own leaf")
        return self.tree / name

    def create(self, name: str, limits: CgroupLimits) -> CgroupHandle:
        path = self._dir(name)
        self._ensure_tree()
        try:
            self._mkdir(path)
        except FileExistsError:
            raise CgroupError(f"cgroup {name} already exists under {self.tree}") from None
        try:
            write_file(path / "memory.max", limits.memory_bytes)
            if (path / "memory.swap.max").exists():
                write_file(path / "memory.swap.max", 0)
            write_file(path / "memory.oom.group", 1)
            write_file(path / "pids.max", limits.pids_max)
            write_file(path / "cpu.max", f"{limits.cpu_quota_us()} {CPU_PERIOD_US}")
        except OSError as e:
            with contextlib.suppress(OSError):
                os.rmdir(path)
            raise CgroupError(f"cannot set limits on cgroup {name}: {e}") from None
        return V2Handle(name, path)

    def open(self, name: str) -> CgroupHandle:
        path = self._dir(name)
        if not path.is_dir():  # a session of the older layout (recovery after an upgrade)
            path = next((t / name for t in self.legacy_trees if (t / name).is_dir()), path)
        return V2Handle(name, path)

    def leftovers(self) -> list[str]:
        names: set[str] = set()
        for tree in [self.tree, *self.legacy_trees]:
            if tree.is_dir():
                names.update(e.name for e in os.scandir(tree)
                             if e.is_dir(follow_symlinks=False) and e.name != AGENT_LEAF)
        return sorted(names)

    def remove_root(self) -> bool:
        """Remove the tree (and an empty one of the older layout) once it holds no session;
        then, under systemd, end the sandbox scope (nothing is left to keep)."""
        if self.leftovers():
            return False
        leaf = self.tree / AGENT_LEAF
        if leaf.is_dir():
            if read_pids(leaf / "cgroup.procs"):
                return False  # the agent is still inside its leaf
            rmdir_retry(leaf)
        rmdir_retry(self.tree)
        for tree in self.legacy_trees:  # best effort: an old agent's leaf may still be busy
            with contextlib.suppress(OSError, CgroupError):
                rmdir_retry(tree / AGENT_LEAF, timeout=0)
                rmdir_retry(tree, timeout=0)
        if self.scope is not None:
            self.scope.release()
        return True
