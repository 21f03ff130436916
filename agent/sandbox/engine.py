"""The sandbox engine: the ordered plan that makes a session sandbox (SPEC 3) and the
Sandbox object the rest of the agent uses (docs/design.md).

create(): uid slot (userns) -> hostname (uts) -> seccomp BPF -> nrx-init [makes the mount
point, mounts the tmpfs] while a worker thread makes the cgroup (cgroups driver) -> GO ->
nrx-init [joins the cgroup, clones PID 1 into user/mnt/uts/ipc/pid/net/cgroup namespaces,
maps ids] -> pidfd, root fd, namespace inodes, OOM watcher.  Every step pushes its undo on a stack, so a failure undoes exactly what
was done, newest first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import select
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from agent import log
from agent._native import lib as _native_lib
from agent.config import Config

from . import exec as _exec
from . import initproto, initrecord, mounts, userns, uts
from . import namespaces as namespaces_mod
from .cgroups import CgroupHandle, CgroupLimits, detect
from .cleanup import CleanupStack
from .exec import ExecResult
from .faults import ExecBusy, SandboxGone

INIT_BIN = Path(__file__).resolve().parent.parent / "_bin" / "nrx-init"
SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)
O_PATH = 0o10000000
_SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# the namespaces PID 1's clone makes (the cgroup one it makes again in its setup)
_CLONED_NAMESPACES = tuple(n for n in namespaces_mod.NAMESPACES if n != "cgroup")


def _cloned_identity(pid: int) -> tuple[int, dict[str, int]]:
    """PID 1's start time and the inodes of the namespaces its clone made."""
    return namespaces_mod.starttime(pid), namespaces_mod.inodes(pid, _CLONED_NAMESPACES)


def unbound_mark(runtime_dir: Path, session_id: str) -> Path:
    """A file in a warm-pool sandbox's session directory until it is bound (issue 18):
    after a crash it tells the start's state check that this sandbox never held a session
    (no journal row to rebuild, nothing to prove; the reclaimers remove it)."""
    return mounts.session_dir(runtime_dir, session_id) / "unbound"


def _err_text(e: BaseException) -> str:
    """An error for the logs: type and errno name, never str() of an OSError (it carries a
    path, and logs never carry file names)."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"{type(e).__name__} {errno.errorcode.get(e.errno, e.errno)}"
    return f"{type(e).__name__}: {e}"[:200]


SO_SNDBUFFORCE = 32  # socket(7): SO_SNDBUF above wmem_max, needs CAP_NET_ADMIN


def _size_control_socket(sock: socket.socket) -> None:
    """A SEQPACKET message must fit the sender's buffer (default net.core.wmem_default,
    208 KiB): size ours for the largest EXEC request exec.py admits.  SO_SNDBUF is capped
    at net.core.wmem_max; SO_SNDBUFFORCE is not but needs CAP_NET_ADMIN (dropped by
    self-hardening); a message still too big is BadRequest (exec.Control.send)."""
    for opt in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, initproto.MAX_MSG + 64 * 1024)
            return
        except PermissionError:
            continue


class SandboxError(RuntimeError):
    """A sandbox could not be created; the message names the failing step."""


class BindFailed(SandboxError):
    """A pooled sandbox did not take its session's identity (the caller destroys it)."""


class AdoptFailed(SandboxError):
    """A journaled sandbox cannot be re-adopted (gone, or not provably the same one)."""


def _compile_seccomp(profile: str) -> bytes:
    """The profile's BPF; seccomp is required (without it a capability-less sandbox can
    still unshare a user namespace), so a missing or empty profile is an error."""
    from agent.sandbox import seccomp

    bpf = seccomp.compile_profile(profile)
    if not bpf:
        raise SandboxError(f"seccomp profile {profile!r} compiled to an empty filter")
    return bpf


async def _reap(pidfd: int) -> bool:
    """Wait until the process behind `pidfd` exits, and reap it if it is our child; True
    when it was reaped.  A re-adopted sandbox's PID 1 is not (its parent agent died, the
    host's init inherited it): once it exited it holds no memory, files or namespaces,
    only its pid and credentials until that init reaps it — which took 1.5-1.7 s on the
    Firecracker host here, and may never happen.  Nothing is waited for then: steps 5
    and 6 find it and record it as unreaped (evidence), not as running residue."""
    while True:
        try:
            if os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG) is not None:
                return True
        except ChildProcessError:
            if not _exited(pidfd):
                await trio.lowlevel.wait_readable(pidfd)
            return _pidfd_pid(pidfd) <= 0
        await trio.lowlevel.wait_readable(pidfd)


def _pidfd_pid(pidfd: int) -> int:
    """The pid behind a pidfd, -1 once the process has been reaped (fdinfo `Pid:`)."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def _open_same_init(pid: int, start: int, namespaces: dict[str, int]) -> int:
    """A pidfd on `pid` if it still is the journaled sandbox PID 1: alive, same start
    time (pid reuse), same 7 namespace inodes.  Raises AdoptFailed otherwise."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        raise AdoptFailed("init process gone") from None
    try:
        same = (not _exited(pidfd) and namespaces_mod.starttime(pid) == start
                and namespaces_mod.inodes(pid) == namespaces)
    except OSError:
        same = False
    if not same:
        os.close(pidfd)
        raise AdoptFailed("init process gone, pid reused or namespaces differ")
    return pidfd


def _root_view(root: Path, pidfd: int, kept_fd: int) -> int:
    """An O_PATH fd on the session tmpfs without the sandbox's submounts: the agent's own
    mount of it, or (a new mount namespace since the restart, as systemd gives each start)
    the view PID 1 kept, fetched with pidfd_getfd."""
    if mounts.is_mountpoint(root):
        return os.open(root, O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return _pidfd_getfd(pidfd, kept_fd)


def _contained_earlier(cg: CgroupHandle, tier) -> bool:
    """Frozen with its memory limit above the tier's cap: contained at OOM by an agent
    that died before ending it (a freeze of destruction's step 1 leaves the cap)."""
    try:
        return (tier is not None and cg.frozen()
                and cg.memory_usage_limit() > tier.memory_bytes)
    except (OSError, ValueError):
        return False


def _read_cut(session_id: str, pid: int) -> initrecord.CutRecord | None:
    """The exec a stalled (frozen) PID 1 recorded as cut off by the agent's death, read
    from its memory; None when none, or (logged loudly) when it cannot be read."""
    try:
        return initrecord.read(pid)
    except (OSError, ValueError) as e:
        log.get().error("init_record_unreadable", session_id=session_id, error=_err_text(e))
        return None


def _dead_control() -> _exec.Control:
    """A control connection whose peer is closed: any exec on it is SandboxGone."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    theirs.close()
    return _exec.Control(ours)


def _find_root_view(pidfd: int, pid: int) -> int:
    """The fd number of the tmpfs view PID 1 keeps (for a PID 1 that cannot be asked):
    the directory fd among its few fds that is the root of the session tmpfs; -1."""
    try:
        fds = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1
    for n in fds:
        try:
            fd = _pidfd_getfd(pidfd, n)
        except AdoptFailed:
            continue
        try:
            if _is_tmpfs_root(fd, pid):
                return n
        finally:
            os.close(fd)
    return -1


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    """pidfd_getfd(2) (Python 3.11 has no wrapper): a copy of fd `fd` of that process."""
    if fd < 0:
        raise AdoptFailed("the sandbox kept no view of its tmpfs")
    r = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if r >= 0:
        return r
    err = ctypes.get_errno()
    if err in (errno.EPERM, errno.ENOSYS):
        # the systemd unit's SystemCallFilter=~@debug denies pidfd_getfd (EPERM): reach the
        # same open file through its /proc/PID/fd link, as root with CAP_SYS_PTRACE may
        pid = _pidfd_pid(pidfd)
        try:
            r = os.open(f"/proc/{pid}/fd/{fd}", O_PATH | os.O_CLOEXEC)
        except OSError as e:
            err = e.errno or err
        else:
            if not _exited(pidfd) and _pidfd_pid(pidfd) == pid:  # still that process
                return r
            os.close(r)
            raise AdoptFailed("init process gone")
    raise AdoptFailed(f"pidfd_getfd failed ({errno.errorcode.get(err)})")


def _is_tmpfs_root(fd: int, pid: int) -> bool:
    """`fd` is the root of the sandbox's tmpfs: the device of the sandbox's own root
    (PID 1's `/`, its pivot_root target), which its mount table says is a tmpfs."""
    try:
        st = os.fstat(fd)
        dev = st.st_dev
        root = os.stat(f"/proc/{pid}/root")
        if (root.st_dev, root.st_ino) != (dev, st.st_ino):
            return False
        with open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                major, minor = (int(x) for x in fields[2].split(":"))
                if fields[4] == "/" and os.makedev(major, minor) == dev:
                    return right.split()[0] == "tmpfs"
    except (OSError, ValueError, IndexError):
        pass
    return False


def _exited(pidfd: int) -> bool:
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def _late_pid(sock: socket.socket) -> int:
    """The PID message still queued on the agent's end of the control socket, or -1."""
    while True:
        try:
            msg = sock.recv(initproto.MAX_MSG, socket.MSG_DONTWAIT)
        except OSError:
            return -1
        if not msg:
            return -1
        try:
            kind, fields = initproto.decode(msg)
        except initproto.InitProtocolError:
            continue
        if kind == initproto.MSG_PID:
            return fields[0]


class Sandbox:
    """One live session sandbox.  See docs/design.md for the contract.

    Everything its creation made is undone by its cleanup stack (`cleanup`), newest
    first, exactly once: the destruction steps run single pieces early through the
    methods below, `teardown()` runs the rest."""

    def __init__(self, *, session_id: str, hostname: str, ids: userns.IdRange,
                 init_pid: int, pidfd: int, control: _exec.Control, root_mount_path: Path,
                 root_fd: int, tmpfs_bytes: int, cgroup: CgroupHandle, engine: SandboxEngine,
                 cleanup: CleanupStack, init_starttime: int | None = None,
                 namespaces: dict[str, int] | None = None) -> None:
        self.session_id = session_id
        self.hostname = hostname
        self.slot = ids.slot
        self.host_uid = self.host_gid = ids.sandbox_host_id
        self.slot_root_uid = self.slot_root_gid = ids.base
        self.ids = ids
        self.init_pid = init_pid
        self.pidfd = pidfd
        self.control = control
        self.init_starttime = (init_starttime if init_starttime is not None
                               else namespaces_mod.starttime(init_pid))
        self.root_fd = root_fd
        self.root_mount_path = root_mount_path
        self.tmpfs_bytes = tmpfs_bytes
        self.namespaces = (dict(namespaces) if namespaces is not None
                           else namespaces_mod.inodes(init_pid))
        self.cgroup = cgroup
        self.cleanup = cleanup
        self.oom = trio.Event()  # set once the cgroup ran out of memory (contained or killed)
        self.oom_guarded = False  # the kernel OOM killer is kept away (the agent ends it)
        self.oom_contained = False  # frozen at the cap by the agent, nothing freed
        self.oom_fallback = False  # the agent handed the cgroup back to the kernel killer
        self.oom_contain_us = -1  # event to frozen (request freeze, make room, wait)
        self.oom_over_cap_bytes = -1  # charged beyond the cap when frozen (the headroom used)
        self.ending = False  # destruction began: an exec in flight is not aborted by itself
        self.attached = True  # PID 1 listens on `control` (False: adopted frozen at OOM)
        # re-adoption only: (wait status, exec tag) of the command the agent's death cut off
        self.interrupted: tuple[int, bytes] | None = None
        self.cut_record: initrecord.CutRecord | None = None  # read from a stalled PID 1
        self.buffers_zeroed = 0  # bytes of exec buffers zeroed (exec.py; step 4 evidence)
        self._engine = engine
        self._busy = False
        self._oom_fd = -1

    # -- exec --------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self.cleanup.done("init") and not _exited(self.pidfd)

    async def exec(self, command: str, *, input_data: bytes | None = None,
                   env: dict[str, str] | None = None, timeout: float,
                   on_output: Callable | None = None,
                   progress: _exec.ExecProgress | None = None) -> ExecResult:
        if self._busy:
            raise ExecBusy()
        if not self.alive:
            raise SandboxGone()
        if isinstance(input_data, str):
            input_data = input_data.encode()
        self._busy = True
        try:
            cfg = self._engine.cfg.exec
            return await _exec.run(self, command, input_data=input_data, env=env,
                                   timeout=timeout, on_output=on_output,
                                   output_cap=cfg.output_cap_bytes,
                                   kill_grace=cfg.kill_grace_seconds,
                                   max_input=cfg.max_input_bytes, progress=progress)
        finally:
            self._busy = False

    # -- OOM (issue 12: the agent, not the kernel, ends a session at its cap) -----------
    async def watch_oom(self, *, guard: bool, headroom: int) -> None:
        """Return once the cgroup ran out of memory.  With `guard`, the kernel OOM killer
        is kept away first (CgroupHandle.guard_oom) and the stalled cgroup is frozen here,
        with nothing freed, so destruction can wipe before the kill; without it (or when
        the guard cannot be set) the kernel kills and this reports it.  Sets `oom`."""
        try:
            fd = self._oom_fd = self.cgroup.oom_fd()
        except OSError as e:
            log.get().warning("oom_fd_unavailable", session_id=self.session_id,
                              error=_err_text(e))
            await trio.sleep_forever()
        cap = 0
        if guard:
            cap = self.cgroup.memory_usage_limit()
            self.oom_guarded = await trio.to_thread.run_sync(self.cgroup.guard_oom, headroom)
            if not self.oom_guarded:
                log.get().warning("oom_guard_unavailable", session_id=self.session_id)
        if self.oom_contained:  # adopt() found it stalled at its cap and froze it
            self.oom.set()
            return
        # an OOM while the agent was down (re-adoption) left no event to wait for
        look_now = self.oom_guarded
        while True:
            if self._oom_fd != fd:
                # stop_oom_watch() closed it meanwhile (the session ended while the guard
                # was set in its thread): its number may already be another fd a task
                # waits on, and registering it again would be trio's BusyResourceError
                await trio.sleep_forever()
            if not look_now:
                try:
                    await trio.lowlevel.wait_readable(fd)
                except (trio.ClosedResourceError, OSError):
                    await trio.sleep_forever()
                with contextlib.suppress(OSError):
                    os.read(fd, 64)
            look_now = False
            try:
                stalled = self.oom_guarded and self.cgroup.oom_stalled()
                killed = self.cgroup.oom_kills() > 0
            except OSError:
                stalled = killed = False
            if stalled and not killed:
                try:
                    t0 = time.perf_counter_ns()
                    await trio.to_thread.run_sync(self.cgroup.contain_oom, headroom)
                    self.oom_contain_us = (time.perf_counter_ns() - t0) // 1000
                    self.oom_over_cap_bytes = max(0, self.cgroup.memory_usage() - cap)
                    self.oom_contained = True
                except Exception as e:
                    log.get().error("oom_contain_failed", session_id=self.session_id,
                                    error=_err_text(e))
            if stalled or killed:
                break
            if not self.oom_guarded and self._oom_fd >= 0:
                break  # the kernel killer acts: any OOM event is one
        log.get().info("sandbox_oom", session_id=self.session_id,
                       contained=self.oom_contained)
        self.oom.set()

    async def confirm_adopted(self) -> None:
        """Tell PID 1 the command the agent's death cut off is on the record (until
        then a crashed re-adoption reports it again to the next agent); a PID 1 stalled
        at the cap cannot be told: its record is cleared in its memory instead."""
        if self.attached:
            await self.control.send(initproto.encode_adopted())
        elif self.cut_record is not None:
            try:
                initrecord.clear(self.init_pid, self.cut_record)
            except OSError as e:  # a second crash before the proof would report it again
                log.get().error("init_record_not_cleared", session_id=self.session_id,
                                error=_err_text(e))
            self.cut_record = None

    def fall_back_to_kernel_oom(self) -> None:
        """The agent did not end an OOM'd session in bounded time: the kernel killer
        takes over (the memory it frees is not wiped; step 3 reports it)."""
        self.oom_fallback = True
        log.get().error("oom_kernel_fallback", session_id=self.session_id)
        self.cgroup.kernel_oom_fallback()

    def oom_evidence(self) -> dict:
        """What step 3 records about OOM handling, as measured now."""
        try:
            kills = self.cgroup.oom_kills()
        except OSError:
            kills = -1
        ev = {"oom_killer_disabled": self.oom_guarded, "oom_contained": self.oom_contained,
              "oom_kernel_fallback": self.oom_fallback, "kernel_oom_kills": kills}
        if self.oom_contained:
            ev.update({"oom_contain_us": self.oom_contain_us,
                       "oom_over_cap_bytes": self.oom_over_cap_bytes})
        return ev


    # -- lifetime: each runs its undo from the cleanup stack once -------------------------
    async def kill_init(self) -> None:
        """SIGKILL PID 1 through the pidfd (the whole PID namespace dies with it) and wait
        until it is reaped."""
        await self.cleanup.acall("init")

    def detach_root_mount(self) -> None:
        """Close the root fd and detach the session tmpfs from the host; remove its dir."""
        if not self.cleanup.done("root_fd"):
            self.root_fd = -1  # closed by the undo below
        self.cleanup.call("root_fd")
        self.cleanup.call("mount")
        self.cleanup.call("session_dir")

    def release_slot(self) -> None:
        self.cleanup.call("slot")

    def stop_oom_watch(self) -> None:
        """Close the OOM watcher's fd (a task waiting on it is woken first)."""
        if self._oom_fd >= 0:
            trio.lowlevel.notify_closing(self._oom_fd)
            self._oom_fd = -1
        self.cgroup.close()

    def retire_hostname(self) -> None:
        """Nothing to do: hostnames are only unique among live sandboxes (engine.live)."""

    async def remove_cgroup(self) -> None:
        """Confirm the cgroup is empty (kill what is left), then remove it."""
        self.stop_oom_watch()
        await self.cleanup.acall("cgroup")

    async def teardown(self) -> None:
        """Best effort: run every undo not yet run, newest first (kill PID 1, detach the
        tmpfs, remove the cgroup, release the slot).  Errors of one do not stop the
        others; the first is raised at the end."""
        with trio.CancelScope(shield=True):  # cleanup must not stop halfway
            self.stop_oom_watch()
            errors = await self.cleanup.run(lambda name, e: log.get().error(
                "teardown_step_failed", session_id=self.session_id, step=name,
                error=_err_text(e)))
        if errors:
            raise errors[0][1]


async def _kill_and_reap(pidfd: int, cgroup: CgroupHandle, control: _exec.Control) -> None:
    """SIGKILL a sandbox's PID 1 through its pidfd, wait until reaped, close its fds."""
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    # a frozen task cannot act on SIGKILL until thawed (v1 freezer): a sandbox left
    # frozen by an interrupted destruction would otherwise never be reaped
    with contextlib.suppress(Exception):
        if cgroup.frozen():
            cgroup.thaw()
    await _reap(pidfd)
    control.close()
    os.close(pidfd)


async def _remove_cgroup(cgroup: CgroupHandle) -> None:
    """Confirm the cgroup is empty (kill what is left), then remove it."""
    cgroup.close()
    if not cgroup.empty():
        cgroup.kill_all()
        await trio.to_thread.run_sync(cgroup.wait_empty)
    # rmdir of each cgroup directory (css offlining) off the event loop
    await trio.to_thread.run_sync(cgroup.remove)


def _spawn_helper(path: str, control_fd: int) -> int:
    """Start nrx-init: stdio on /dev/null, the control socket on fd 3, empty signal mask,
    SIGPIPE/SIGXFSZ default, empty environment (native/ext/nrxspawn.c: posix_spawn without
    holding the GIL; os.posix_spawn held it through the whole vfork+exec, ~6% of the trio
    thread's time under 16 clients)."""
    pid = _native_lib.nrx_spawn_helper(os.fsencode(path), control_fd)
    if pid < 0:
        raise OSError(-pid, os.strerror(-pid))
    return pid


class _Background:
    """A blocking call started in a worker thread at once and awaited later: create()
    starts the proof reservation and the cgroups this way right after it spawned
    nrx-init, so the three run together (trio.to_thread.run_sync would wait for its
    result at once, and start the thread only after a trip through the scheduler).  It takes a token of trio's default
    thread limiter like to_thread does (bounded threads); `result()` is always awaited."""

    def __init__(self, fn: Callable[[], Any], limiter: trio.CapacityLimiter) -> None:
        self._done = trio.Event()
        self._outcome: Any = None
        self._limiter = limiter
        token = trio.lowlevel.current_trio_token()

        def finish(result: Any) -> None:  # in the trio thread
            self._outcome = result
            limiter.release_on_behalf_of(self)
            self._done.set()

        limiter.acquire_on_behalf_of_nowait(self)  # WouldBlock: the caller waits first
        try:
            trio.lowlevel.start_thread_soon(fn, lambda r: token.run_sync_soon(finish, r),
                                            name="nrx-create")
        except BaseException:  # no thread: nothing ran, the token goes back
            limiter.release_on_behalf_of(self)
            raise

    @classmethod
    async def start(cls, fn: Callable[[], Any]) -> _Background:
        limiter = trio.to_thread.current_default_thread_limiter()
        while True:
            try:
                return cls(fn, limiter)
            except trio.WouldBlock:
                await limiter.acquire()  # wait for a token, then hand it back and retry
                limiter.release()

    async def result(self) -> Any:
        """The call's return value or exception; waits for it even when cancelled (what
        it made must be known to be undone)."""
        with trio.CancelScope(shield=True):
            await self._done.wait()
        return self._outcome.unwrap()


class SandboxEngine:
    """Creates sandboxes; one per agent process."""

    def __init__(self, cfg: Config, *, cgroup_prefix: str | None = None,
                 seccomp_compiler: Callable[[str], bytes] | None = None) -> None:
        self.cfg = cfg
        self.runtime_dir = Path(cfg.paths.runtime_dir)
        sc = cfg.sandbox
        self.slots = userns.SlotAllocator(sc.uid_base, sc.uid_slot_size, cfg.node.max_sessions)
        self.cgroups = detect(cfg, prefix=cgroup_prefix)
        self._compile = seccomp_compiler or _compile_seccomp
        self._bpf: dict[str, bytes] = {}
        self.live: dict[str, Sandbox] = {}
        self._cgroups_prepared = False  # cgroups.prepare() ran (before the first spawn)
        self._log = log.get().bind(component="sandbox")
        self.binds, self.links = mounts.plan(sc)
        # the same for every sandbox: built, checked and encoded once
        self.plan_records = initproto.encode_plan(mounts.setup_plan(
            self.binds, self.links, sandbox_id=userns.SANDBOX_ID))
        mounts.sessions_root(self.runtime_dir)  # 0700; nrx-init makes each session's below
        for cls in cfg.classes.values():  # once per profile, at start: fail early
            self.bpf(cls.seccomp_profile)

    def _forget(self, session_id: str, slot: int) -> None:
        sb = self.live.get(session_id)
        if sb is not None and sb.slot == slot:
            del self.live[session_id]
        self.slots.release(slot)

    def bpf(self, profile: str) -> bytes:
        if profile not in self._bpf:
            self._bpf[profile] = self._compile(profile)
        return self._bpf[profile]

    async def create(self, session_id: str, *, tier: str, classification: str,
                     hostname: str | None = None, unbound: bool = False,
                     prelude: Callable[[], object] | None = None) -> Sandbox:
        """A new sandbox.  `unbound` (the warm pool, issue 18): everything but the session
        identity; its PID 1 runs nothing until bind() gave it its hostname.  `prelude`: a
        blocking call (the session's proof reservation: its fsyncs wait on the disk) run
        in a worker thread alongside the whole build; create returns only after it did,
        so before the caller answers, and PID 1 runs nothing before an EXEC, which needs
        that answer.  Its exception ends the create: everything built is undone (nothing
        ran in it) and that exception is raised."""
        cfg, sc = self.cfg, self.cfg.sandbox
        if not _SESSION_ID_RE.match(session_id):
            raise SandboxError(f"invalid session id {session_id!r}: use [A-Za-z0-9_-], 1..64")
        if session_id in self.live:
            raise SandboxError(f"session {session_id} already has a sandbox")
        t = cfg.tiers[tier]
        tmpfs_bytes = cfg.tmpfs_bytes(tier)
        bpf = self.bpf(cfg.classes[classification].seccomp_profile)
        undo = CleanupStack()
        t0 = time.monotonic()
        started: list[_Background] = []  # the prelude's thread, once _spawn started it
        try:
            if not self._cgroups_prepared:  # v2: the agent in its leaf before any spawn
                await trio.to_thread.run_sync(self.cgroups.prepare)
                self._cgroups_prepared = True
            ids = self.slots.allocate()
            undo.push("slot", lambda: self._forget(session_id, ids.slot))
            hostname = (uts.placeholder(sc.hostname_prefix) if unbound else hostname
                        or uts.new_hostname(sc.hostname_prefix, self._hostnames()))
            # nrx-init makes the mount point (and a pooled sandbox's unbound mark) and
            # mounts the tmpfs while a worker thread makes the prelude and the cgroups
            root = mounts.mount_path(self.runtime_dir, session_id)
            undo.push("session_dir", lambda: mounts.remove_session_dir(self.runtime_dir,
                                                                       session_id))
            undo.push("mount", lambda: mounts.detach(root))
            init_cfg = initproto.InitConfig(
                hostname=hostname, root=str(root), tmpfs_size=tmpfs_bytes,
                tmpfs_inodes=t.tmpfs_inodes, uid_base=ids.base, gid_base=ids.base,
                map_size=ids.size, sandbox_id=userns.SANDBOX_ID, plan_records=self.plan_records,
                oom_score_adj=sc.sandbox_oom_score_adj, nofile=sc.rlimit_nofile,
                fsize=sc.rlimit_fsize_bytes or tmpfs_bytes, seccomp_bpf=bpf,
                attach_path=str(mounts.attach_path(self.runtime_dir, session_id)),
                orphan_grace_ms=int(sc.orphan_grace_seconds * 1000), unbound=unbound)
            limits = CgroupLimits.from_tier(t)
            pid, pidfd, control, cg, (start, ns) = await self._spawn(
                init_cfg, undo, lambda: self.cgroups.create(session_id, limits), prelude,
                started)
            root_fd = os.open(root, O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            undo.push("root_fd", lambda: os.close(root_fd))
            sb = Sandbox(session_id=session_id, hostname=hostname, ids=ids, init_pid=pid,
                         pidfd=pidfd, control=control, root_mount_path=root, root_fd=root_fd,
                         tmpfs_bytes=tmpfs_bytes, cgroup=cg, engine=self, cleanup=undo,
                         init_starttime=start, namespaces=ns)
            if started:  # done before create returns (before the caller answers)
                await started.pop().result()
        except BaseException:
            with trio.CancelScope(shield=True):
                await undo.run(lambda name, e: self._log.error(
                    "create_undo_failed", session_id=session_id, step=name,
                    error=_err_text(e)))
                if started:  # waited for, so the caller can undo it; its error first
                    await started.pop().result()
            raise
        self.live[session_id] = sb
        self._log.info("sandbox_created", session_id=session_id, slot=ids.slot,
                       init_pid=pid, ms=round((time.monotonic() - t0) * 1000, 2),
                       pooled=unbound)
        return sb

    def _hostnames(self) -> set[str]:
        return {s.hostname for s in self.live.values()}

    async def bind(self, sb: Sandbox) -> None:
        """Give a pooled (unbound) sandbox its session's identity: a fresh hostname unique
        among live sandboxes, set by its PID 1 (UTS name, /etc/hostname, /etc/hosts) before
        anything ran in it.  BindFailed when it did not confirm; the sandbox is then the
        caller's to destroy."""
        hostname = uts.new_hostname(self.cfg.sandbox.hostname_prefix, self._hostnames())
        with contextlib.suppress(FileNotFoundError):  # from here on it is a session's
            os.unlink(unbound_mark(self.runtime_dir, sb.session_id))
        try:
            await sb.control.send(initproto.encode_bind(hostname))
            with trio.fail_after(self.cfg.timeouts.create_seconds):
                kind, fields = await sb.control.recv()
        except (SandboxGone, trio.TooSlowError, initproto.InitProtocolError) as e:
            raise BindFailed(f"the pooled sandbox did not answer BIND ({type(e).__name__})"
                             ) from None
        if kind != initproto.MSG_BOUND or fields[0] != 0:
            why = errno.errorcode.get(fields[0], fields[0]) if fields else kind
            raise BindFailed(f"the pooled sandbox refused BIND ({why})")
        sb.hostname = hostname

    async def adopt(self, row: dict) -> Sandbox:
        """Re-adopt a journaled session whose sandbox outlived the agent (issue 12): its
        PID 1 kept it for `orphan_grace_seconds` and waits on the re-attach socket.
        Verifies it is the same sandbox (pidfd on the journaled pid, same start time,
        same 7 namespace inodes, inside the session cgroup, tmpfs still mounted), attaches
        (the new connection becomes the lifeline) and returns a real Sandbox whose cleanup
        stack undoes everything, as for a created one.  Raises AdoptFailed (nothing was
        changed) when it is not there or not the same."""
        sid = row["session_id"]
        if sid in self.live:
            raise AdoptFailed("already live")
        pid, start = row.get("init_pid"), row.get("init_starttime")
        recorded = {k: int(v) for k, v in (row.get("namespaces") or {}).items()}
        if not pid or start is None or set(recorded) != set(namespaces_mod.NAMESPACES):
            raise AdoptFailed("journal row lacks the sandbox's identity")
        undo = CleanupStack()
        try:
            pidfd = _open_same_init(int(pid), int(start), recorded)
            undo.push("pidfd", lambda: os.close(pidfd))
            cg = self.cgroups.open(sid)
            undo.push("cgroup_handle", cg.close)
            if int(pid) not in cg.pids():
                raise AdoptFailed("init process not in the session cgroup")
            root = mounts.mount_path(self.runtime_dir, sid)
            stalled = cg.oom_stalled()
            # or an agent that re-adopted it so already contained it (frozen, its limit
            # raised above the tier's cap) and died before ending it
            contained = not stalled and _contained_earlier(cg, self.cfg.tiers.get(
                row.get("tier") or ""))
            if stalled or contained:
                # it ran into its cap while the agent was down: PID 1, charged to the same
                # cgroup, cannot answer an attach either.  Contain it (frozen, nothing
                # freed) and adopt it only to end it: exec gets a dead control socket
                if stalled:
                    await trio.to_thread.run_sync(cg.contain_oom,
                                                  self.cfg.sandbox.oom_headroom_bytes)
                stalled = True
                cut = _read_cut(sid, int(pid))
                control, attached = _dead_control(), (
                    cut is not None, cut.status if cut else 0,
                    _find_root_view(pidfd, int(pid)), cut.tag if cut else b"")
            else:
                control, attached = await self._attach(sid)
            undo.push("control", control.close)
            root_fd = _root_view(root, pidfd, attached[2])
            undo.push("root_fd", lambda: os.close(root_fd))
            if not _is_tmpfs_root(root_fd, int(pid)):
                raise AdoptFailed("session tmpfs not found")
            ids = self.slots.reserve(int(row["slot"]))
        except BaseException:
            with trio.CancelScope(shield=True):
                await undo.run()
            raise
        # from here on the sandbox is ours: the same stack as create() builds
        cleanup = CleanupStack()
        cleanup.push("slot", lambda: self._forget(sid, ids.slot))
        cleanup.push("cgroup", lambda: _remove_cgroup(cg))
        cleanup.push("session_dir", lambda: mounts.remove_session_dir(self.runtime_dir, sid))
        cleanup.push("mount", lambda: mounts.detach(root))
        cleanup.push("control", control.close)
        cleanup.push("init", lambda: _kill_and_reap(pidfd, cg, control))
        cleanup.push("root_fd", lambda: os.close(root_fd))
        t = self.cfg.tiers.get(row.get("tier") or "")
        sb = Sandbox(session_id=sid, hostname=row.get("hostname") or "", ids=ids,
                     init_pid=int(pid), pidfd=pidfd, control=control, root_mount_path=root,
                     root_fd=root_fd, tmpfs_bytes=self.cfg.tmpfs_bytes(row["tier"]) if t else 0,
                     cgroup=cg, engine=self, cleanup=cleanup, init_starttime=int(start),
                     namespaces=recorded)
        if attached[0]:
            sb.interrupted = (attached[1], attached[3])
        if stalled:
            sb.cut_record = cut
            sb.oom_guarded = sb.oom_contained = True
            sb.attached = False
            self._log.warning("sandbox_adopted_at_oom", session_id=sid)
        self.live[sid] = sb
        self._log.info("sandbox_adopted", session_id=sid, slot=ids.slot, init_pid=pid,
                       interrupted_exec=bool(attached[0]))
        return sb

    async def _attach(self, session_id: str) -> tuple[_exec.Control, tuple]:
        """Connect to the session's re-attach socket and send ATTACH; returns the control
        connection and (interrupted, wait status, exec tag)."""
        d = mounts.session_dir(self.runtime_dir, session_id)
        try:
            dfd = os.open(d, O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            raise AdoptFailed("no session directory") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            try:  # sun_path is short; the runtime dir may be deep
                sock.connect(f"/proc/self/fd/{dfd}/attach")
            except OSError:
                raise AdoptFailed("no sandbox listens on the re-attach socket") from None
            finally:
                os.close(dfd)
            sock.setblocking(False)
            _size_control_socket(sock)
            control = _exec.Control(sock)
        except BaseException:
            sock.close()
            raise
        try:
            await control.send(initproto.encode_attach())
            with trio.fail_after(self.cfg.timeouts.attach_seconds):
                kind, fields = await control.recv()
            if kind != initproto.MSG_ATTACHED:
                raise AdoptFailed("unexpected answer to ATTACH")
        except (SandboxGone, trio.TooSlowError, initproto.InitProtocolError):
            control.close()
            raise AdoptFailed("the sandbox did not accept the re-attach") from None
        except BaseException:
            control.close()
            raise
        return control, fields

    async def _spawn(self, init_cfg: initproto.InitConfig, undo: CleanupStack,
                     make_cgroups: Callable[[], CgroupHandle],
                     prelude: Callable[[], object] | None, started: list) -> tuple:
        """Run nrx-init with the control socket on fd 3 and CONFIG, then start `prelude`
        (the proof reservation, appended to `started`: the caller awaits it) and
        `make_cgroups` (~5 cgroup mkdirs and limit writes: kernel work that would block
        the event loop, i.e. every other session) in two worker threads; nrx-init makes
        the mount point, mounts the tmpfs and binds the re-attach socket meanwhile.  Once
        the cgroups exist, their thread sends GO naming them and nrx-init joins them and
        clones PID 1.  When anything before GO fails, our end of the socket is shut,
        nrx-init undoes its part and exits (reaped here before the caller's undo runs),
        and the cgroups are removed by the undo.  Returns (pid, pidfd, control, cgroup,
        (PID 1's start time, its namespace inodes))."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        _size_control_socket(ours)
        control = _exec.Control(ours)
        undo.push("control", control.close)
        cg: CgroupHandle | None = None
        helper_fd = pid = pidfd = -1
        identity: tuple[int, dict[str, int]] = (0, {})

        def cgroups_then_go() -> tuple[CgroupHandle, bool]:
            """The cgroups, then GO straight from this thread (no trip through the event
            loop before nrx-init may clone); False when GO could not be sent here."""
            made = make_cgroups()
            try:
                ours.send(initproto.encode_go([str(p) for p in made.procs_files()]))
                return made, True
            except OSError:  # would block, or nrx-init already failed (its ERROR is read)
                return made, False

        def push_kill(pidfd: int) -> None:
            made = cg  # PID 1 is cloned only after GO, which follows the cgroups
            assert made is not None
            undo.push("init", lambda: _kill_and_reap(pidfd, made, control))

        try:
            try:
                ours.send(init_cfg.encode())  # CONFIG before the thread can send GO
                fd = theirs.fileno()
                if fd == 3:  # dup2(3, 3) would keep O_CLOEXEC
                    fd = os.dup(fd)
                    theirs.close()
                    theirs = socket.socket(fileno=fd)
                # spawned before the threads start: a thread running Python would hold the
                # GIL this thread needs back after the spawn (up to the 5 ms switch interval)
                helper_fd = os.pidfd_open(_spawn_helper(str(INIT_BIN), fd))
            finally:
                theirs.close()
            if prelude is not None:
                started.append(await _Background.start(prelude))
            cgs = await _Background.start(cgroups_then_go)
            # waited for whatever happens: what it made is undone
            cg, go_sent = await cgs.result()
            undo.push("cgroup", lambda: _remove_cgroup(cg))
            with trio.fail_after(self.cfg.timeouts.create_seconds):
                if not go_sent:
                    with contextlib.suppress(SandboxGone):  # it failed early: ERROR is read below
                        await control.send(initproto.encode_go([str(p)
                                                                for p in cg.procs_files()]))
                try:
                    while True:
                        kind, fields = await control.recv()
                        if kind == initproto.MSG_PID:
                            pid = fields[0]
                            pidfd = os.pidfd_open(pid)
                            push_kill(pidfd)
                            # while PID 1 sets up: what its clone fixed (an unreaped child's
                            # pid is not reused); it makes its cgroup namespace in setup.  A
                            # PID 1 that already failed has no namespaces left to read (its
                            # ERROR follows): read at READY then
                            with contextlib.suppress(OSError):
                                identity = _cloned_identity(pid)
                        elif kind == initproto.MSG_READY:
                            if not identity[1]:
                                identity = _cloned_identity(pid)
                            identity[1]["cgroup"] = namespaces_mod.inodes(pid, ("cgroup",))[
                                "cgroup"]
                            break
                        elif kind == initproto.MSG_ERROR:
                            raise SandboxError(f"sandbox creation failed: {fields[0]}")
                except SandboxGone:
                    raise SandboxError("sandbox creation failed: nrx-init exited early "
                                       "without a message") from None
        finally:
            if helper_fd >= 0:
                with trio.CancelScope(shield=True):
                    if pidfd < 0:  # no GO, or no PID yet: nrx-init waiting for GO stops on EOF
                        with contextlib.suppress(OSError):
                            ours.shutdown(socket.SHUT_WR)
                    with trio.move_on_after(self.cfg.timeouts.create_seconds):
                        await _reap(helper_fd)
                    os.close(helper_fd)
                    if pidfd < 0 and cg is not None:
                        # aborted before reading it: the helper sent the PID before exiting,
                        # so the child can still be found (to kill and reap it) in the socket
                        pid = _late_pid(ours)
                        if pid > 0:
                            pidfd = os.pidfd_open(pid)
                            push_kill(pidfd)
        return pid, pidfd, control, cg, identity

    def sweep_leftovers(self) -> dict:
        """Detach session mounts under our runtime dir and remove session cgroups under
        our prefix that no live sandbox owns (recovery after a crash)."""
        out: dict[str, Any] = {"mounts": 0, "cgroups": 0, "errors": []}
        sessions = self.runtime_dir / "sessions"
        if sessions.is_dir():
            for d in sessions.iterdir():
                if d.name in self.live:
                    continue
                try:
                    if mounts.detach(d / "root"):
                        out["mounts"] += 1
                    mounts.remove_session_dir(self.runtime_dir, d.name)
                except OSError as e:
                    out["errors"].append(f"{d.name}: {e}")
        for name in self.cgroups.leftovers():
            if name in self.live:
                continue
            h = self.cgroups.open(name)
            try:
                if not h.empty():
                    h.kill_all()
                    h.wait_empty()
                h.remove()
                out["cgroups"] += 1
            except Exception as e:
                out["errors"].append(f"{name}: {e}")
        return out

    async def aclose(self) -> None:
        """Tear down every live sandbox and remove the agent's cgroup tree if empty."""
        for sb in list(self.live.values()):
            with contextlib.suppress(Exception):
                await sb.teardown()
        with contextlib.suppress(Exception):
            self.cgroups.remove_root()
