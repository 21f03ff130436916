"""Under systemd the sandboxes live in a scope of their own, so they outlive the agent (issue 12).

The unit keeps `KillMode=control-group` and `Delegate=yes`, but its cgroup holds only the
agent: every session cgroup sits in `nanorix-sandboxes-<prefix>.scope` (in the agent's
slice, `Delegate=yes`), under `<scope>/<prefix>/<session>`.  When the agent dies (crash,
`systemctl kill`, watchdog) systemd kills only the agent; each sandbox's nrx-init waits
`[sandbox] orphan_grace_seconds` and the restarted agent re-adopts it.  A clean stop (every
session drained) ends the scope, so nothing is left.

Why a scope and not `KillMode=process`: with survivors in the unit's own v2 cgroup (whose
`subtree_control` has controllers) systemd < 254 cannot place the restarted main process
(219/CGROUP); `DelegateSubgroup=` needs >= 254 (Debian 12 has 252, Ubuntu 22.04 249).

A scope lives while any process is in it, so a tiny holder keeps it between sessions: a
`sleep infinity` in `<scope>/holder` (a leaf, so the scope root may have controllers).  It
is started through `systemd-run --scope` (systemd-run connects to PID 1's private socket
as root, moves itself into the new scope and execs the holder; no D-Bus library needed,
and systemd-run is on every systemd host).  The holder first takes a mount namespace of
its own (`unshare --mount`, a private copy made before any session exists): otherwise it
would keep the agent's mount namespace, and every session tmpfs mounted there, alive after
the agent died.  A restarted agent re-uses the scope (and puts a new holder into the leaf
when the old one is gone).  Outside systemd, or with `[sandbox] systemd_scope = "off"`,
nothing here runs and the sandboxes sit where they always did.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from agent import log

from .base import CgroupError, check_name, read_keyed, read_pids, write_file

HOLDER_LEAF = "holder"
RETRY_SECONDS = 0.5  # between systemd-run attempts (a stopped scope not yet collected)
SCOPE_PREFIX = "nanorix-sandboxes-"
RUN_SYSTEMD = Path("/run/systemd/system")  # sd_booted(3)
# the holder: its own (private) mount namespace, then sleep; util-linux + coreutils
HOLDER_CMD = ("unshare", "--mount", "--propagation", "private", "sleep", "infinity")
# properties of the scope: the agent owns its subtree; the sandboxes keep what the agent's
# unit gave them through its cgroup (PrivateDevices= is DevicePolicy=closed, IPAddressDeny=),
# no task limit of the scope's own (each session has pids.max)
SCOPE_PROPERTIES = ("Delegate=yes", "TasksMax=infinity", "DevicePolicy=closed",
                    "IPAddressDeny=any", "IPAddressAllow=localhost")


@dataclass(frozen=True)
class Placement:
    """Where systemd runs the agent: `unit` = its service's cgroup2 path ("system.slice/
    nanorix-agent.service"), `slice` = the slice unit that holds it ("system.slice")."""

    unit: str
    slice: str

    @property
    def unit_name(self) -> str:
        return self.unit.rsplit("/", 1)[-1]

    def scope_name(self, prefix: str) -> str:
        return f"{SCOPE_PREFIX}{check_name(prefix)}.scope"

    def scope_path(self, prefix: str) -> str:
        """The scope's cgroup path: a sibling of the unit, in the same slice."""
        parent = self.unit.rsplit("/", 1)[0] if "/" in self.unit else ""
        return f"{parent}/{self.scope_name(prefix)}".lstrip("/")


def placement(proc_cgroup: str, env: dict[str, str], *, booted: bool) -> Placement | None:
    """The agent's service placement when systemd runs it as a service ($INVOCATION_ID
    set, systemd booted, the cgroup2 path ends in `.service` inside a `.slice`), else None
    (a shell, a foreground `serve`, another supervisor, a scope).  `proc_cgroup` is the
    text of /proc/self/cgroup: the cgroup2 line ("0::") on v2 and hybrid hosts, the
    name=systemd line on a legacy (v1 only) host."""
    if not booted or not env.get("INVOCATION_ID"):
        return None
    path = None
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            path = line[3:]
            break
        hier, _, rest = line.partition(":")
        ctrl, _, p = rest.partition(":")
        if hier.isdigit() and ctrl == "name=systemd" and path is None:
            path = p
    if not path:
        return None
    parts = path.strip().strip("/").split("/")
    if len(parts) < 2 or ".." in parts or not parts[-1].endswith(".service") \
            or not parts[-2].endswith(".slice"):
        return None
    return Placement("/".join(parts), parts[-2])


def systemd_booted() -> bool:
    return RUN_SYSTEMD.is_dir()


def from_host(mode: str) -> Placement | None:
    """placement() for this process, or None when `mode` is "off"."""
    if mode == "off":
        return None
    with open("/proc/self/cgroup") as f:
        return placement(f.read(), dict(os.environ), booted=systemd_booted())


class SandboxScope:
    """The agent's sandbox scope: `dirs` = the scope's directory in each cgroup hierarchy
    that tracks it (the v2 mount on a v2 host; unified and/or name=systemd on a hybrid or
    legacy one), `dirs[0]` the one systemd watches.  `ensure()` makes or re-uses it;
    `release()` ends it once no session is left."""

    def __init__(self, where: Placement, prefix: str, dirs: list[Path], *,
                 holder_leaf: bool, start_timeout: float) -> None:
        self.where = where
        self.prefix = prefix
        self.name = where.scope_name(prefix)
        self.dirs = dirs
        self.holder_leaf = holder_leaf  # v2: the scope root must hold no process
        self.start_timeout = start_timeout
        self.holder_pid = -1
        self._child: subprocess.Popen | None = None
        self._log = log.get().bind(component="cgroups", scope=self.name)

    @property
    def root(self) -> Path:
        return self.dirs[0]

    def dir_under(self, mount: Path) -> Path:
        """The scope's directory in the hierarchy mounted at `mount`."""
        return Path(mount) / self.where.scope_path(self.prefix)

    def _leaf(self) -> Path:
        return self.root / HOLDER_LEAF if self.holder_leaf else self.root

    def _alive(self) -> bool:
        """The scope's cgroup exists and holds a process (v2: cgroup.events)."""
        events = self.root / "cgroup.events"
        try:
            return read_keyed(events).get("populated", 0) == 1
        except FileNotFoundError:
            return bool(_tree_pids(self.root))  # gone, or a v1 name=systemd directory

    def ensure(self) -> None:
        """Re-use the scope if it is alive (a restarted agent: the sandboxes and the holder
        are still in it), else start it; then make sure a holder sits in its leaf."""
        t0 = time.monotonic()
        reused = self._alive()
        if not reused:
            self._start()
            if self.holder_leaf:
                self._into_leaf()
        leaf = self._leaf()
        held = read_pids(leaf / "cgroup.procs") if leaf.is_dir() else []
        if not held:  # the scope outlived its holder (sandboxes kept it): a new one
            if self.holder_leaf:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(leaf, 0o755)
            self._spawn_holder(into=leaf)
            held = read_pids(leaf / "cgroup.procs")
        self.holder_pid = held[0] if held else -1
        self._log.info("sandbox_scope_ready", reused=reused, holder_pid=self.holder_pid,
                       ms=round((time.monotonic() - t0) * 1000, 1))

    def _start(self) -> None:
        """systemd-run --scope: the child moves itself into the new scope, then execs the
        holder.  Done once the scope's cgroup holds it."""
        exe = shutil.which("systemd-run")
        if exe is None:
            raise CgroupError("systemd-run not found: cannot make the sandbox scope")
        cmd = [exe, "--scope", "--quiet", "--collect", f"--unit={self.name}",
               f"--slice={self.where.slice}",
               f"--description=nanorix-agent sandboxes ({self.where.unit_name})"]
        cmd += [f"--property={p}" for p in SCOPE_PROPERTIES]
        # at shutdown units stop in the reverse of their start order: the agent drains its
        # sessions before the scope is stopped
        cmd += [f"--property=Before={self.where.unit_name}"]
        cmd += ["--", *_holder_cmd()]
        self._child = _popen(cmd)
        deadline = time.monotonic() + self.start_timeout
        # systemd-run execs the holder once its job is done: until then leave it alone
        while self._child.pid not in _tree_pids(self.root) or _comm(self._child.pid) == \
                "systemd-run":
            rc = self._child.poll()
            if rc is not None:
                # the previous scope of this name (a stop just now) may still be loaded
                # until systemd collects it: "unit already exists"; try again in a moment
                if time.monotonic() + RETRY_SECONDS > deadline:
                    why = _first_line(self._child)
                    raise CgroupError(f"systemd-run could not start {self.name} (exit {rc}: "
                                      f"{why})")
                time.sleep(RETRY_SECONDS)
                self._child = _popen(cmd)
                continue
            if time.monotonic() > deadline:
                self._child.kill()
                self._child.wait()
                raise CgroupError(f"{self.name} did not start within {self.start_timeout} s")
            time.sleep(0.01)
        if self._child.stderr is not None:
            self._child.stderr.close()

    def _spawn_holder(self, into: Path) -> None:
        self._child = _popen(list(_holder_cmd()))
        if self._child.stderr is not None:
            self._child.stderr.close()
        for d in (into, *(x / into.relative_to(self.root) for x in self.dirs[1:])):
            if d.is_dir():
                write_file(d / "cgroup.procs", self._child.pid)

    def _into_leaf(self) -> None:
        """v2, a scope just made: move the holder systemd-run left in its root into the
        leaf (the root may then get controllers for the session cgroups)."""
        leaf = self._leaf()
        with contextlib.suppress(FileExistsError):
            os.mkdir(leaf, 0o755)
        for pid in read_pids(self.root / "cgroup.procs"):
            with contextlib.suppress(ProcessLookupError):
                write_file(leaf / "cgroup.procs", pid)

    def release(self) -> None:
        """End the holder (no session is left): the scope empties and systemd removes it
        (`--collect`).  Waits a bounded time for its cgroup to go."""
        pids = read_pids(self._leaf() / "cgroup.procs") if self._leaf().is_dir() else []
        for pid in pids:
            _kill_pid(pid)
        if self._child is not None:
            with contextlib.suppress(Exception):
                self._child.wait(timeout=self.start_timeout)
            self._child = None
        deadline = time.monotonic() + self.start_timeout
        while self.root.is_dir() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._log.info("sandbox_scope_released", gone=not self.root.is_dir())


def _holder_cmd() -> tuple[str, ...]:
    out = []
    for i, a in enumerate(HOLDER_CMD):
        out.append((shutil.which(a) or a) if i in (0, 4) else a)
    return tuple(out)


def _popen(cmd: list[str]) -> subprocess.Popen:
    """A child that outlives the agent: its own session, stdin/stdout on /dev/null, no fds;
    stderr a pipe (systemd-run's reason when it fails), closed on our side once it runs."""
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, close_fds=True, start_new_session=True)


def _first_line(child: subprocess.Popen) -> str:
    """The first line systemd-run wrote to stderr (its error), bounded."""
    if child.stderr is None:
        return ""
    try:
        return child.stderr.read(400).decode(errors="replace").strip().split("\n")[0]
    except OSError:
        return ""
    finally:
        child.stderr.close()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _tree_pids(d: Path) -> list[int]:
    """Every pid in `d` and the cgroups below it."""
    out: list[int] = []
    if not d.is_dir():
        return out
    for dirpath, _dirs, _files in os.walk(d):
        out += read_pids(Path(dirpath) / "cgroup.procs")
    return out


def _kill_pid(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)
