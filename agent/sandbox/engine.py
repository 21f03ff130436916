"""The sandbox engine: the ordered plan that makes a session sandbox (SPEC 3) and the
Sandbox object the rest of the agent uses (docs/design.md).

create(): uid slot (userns) -> hostname (uts) -> cgroup (cgroups driver) -> seccomp BPF
-> mount point (mounts) -> nrx-init [joins the cgroup, mounts the tmpfs, clones PID 1 into
user/mnt/uts/ipc/pid/net/cgroup namespaces, maps ids] -> pidfd, root fd, namespace inodes,
OOM watcher.  Every step pushes its undo on a stack, so a failure undoes exactly what
was done, newest first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import trio

from agent import log
from agent.config import Config

from . import exec as _exec
from . import initproto, mounts, namespaces, userns, uts
from .cgroups import CgroupLimits, detect
from .exec import ExecBusy, ExecResult, SandboxGone

INIT_BIN = Path(__file__).resolve().parent.parent / "_bin" / "nrx-init"
CREATE_TIMEOUT = 10.0
O_PATH = 0o10000000
_SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _err_text(e: BaseException) -> str:
    """An error for the logs: type and errno name, never str() of an OSError (it carries a
    path, and logs never carry file names)."""
    if isinstance(e, OSError) and e.errno is not None:
        return f"{type(e).__name__} {errno.errorcode.get(e.errno, e.errno)}"
    return f"{type(e).__name__}: {e}"[:200]


class SandboxError(RuntimeError):
    """A sandbox could not be created; the message names the failing step."""


def _compile_seccomp(profile: str) -> bytes:
    """The profile's BPF; seccomp is required (without it a capability-less sandbox can
    still unshare a user namespace), so a missing or empty profile is an error."""
    from agent.sandbox import seccomp

    bpf = seccomp.compile_profile(profile)
    if not bpf:
        raise SandboxError(f"seccomp profile {profile!r} compiled to an empty filter")
    return bpf


async def _reap(pidfd: int) -> None:
    """Wait until the process behind `pidfd` (our child) exits, and reap it."""
    while True:
        try:
            if os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG) is not None:
                return
        except ChildProcessError:
            return
        await trio.lowlevel.wait_readable(pidfd)


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
        except initproto.ProtocolError:
            continue
        if kind == initproto.MSG_PID:
            return fields[0]


class Sandbox:
    """One live session sandbox.  See docs/design.md for the contract."""

    def __init__(self, *, session_id: str, hostname: str, ids: userns.IdRange,
                 init_pid: int, pidfd: int, control: _exec.Control, root_mount_path: Path,
                 root_fd: int, tmpfs_bytes: int, cgroup, engine: SandboxEngine) -> None:
        self.session_id = session_id
        self.hostname = hostname
        self.slot = ids.slot
        self.host_uid = self.host_gid = ids.sandbox_host_id
        self.slot_root_uid = self.slot_root_gid = ids.base
        self.ids = ids
        self.init_pid = init_pid
        self.pidfd = pidfd
        self.control = control
        self.init_starttime = namespaces.starttime(init_pid)
        self.root_fd = root_fd
        self.root_mount_path = root_mount_path
        self.tmpfs_bytes = tmpfs_bytes
        self.namespaces = namespaces.inodes(init_pid)
        self.cgroup = cgroup
        self.oom = trio.Event()
        self.buffers_zeroed = 0  # bytes of exec buffers zeroed (exec.py; step 4 evidence)
        self._engine = engine
        self._busy = False
        self._reaped = False
        self._slot_released = False
        self._oom_fd = -1
        self._closed = False

    # -- exec --------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self._reaped and not _exited(self.pidfd)

    async def exec(self, command: str, *, input_data: bytes | None = None,
                   env: dict[str, str] | None = None, timeout: float,
                   on_output: Callable | None = None) -> ExecResult:
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
                                   max_input=cfg.max_input_bytes)
        finally:
            self._busy = False

    # -- OOM ---------------------------------------------------------------------------
    def _watch_oom(self) -> None:
        try:
            self._oom_fd = self.cgroup.oom_fd()
        except OSError as e:
            log.get().warning("oom_fd_unavailable", session_id=self.session_id,
                              error=_err_text(e))
            return
        trio.lowlevel.spawn_system_task(self._oom_task, self._oom_fd,
                                        name=f"oom-watch-{self.session_id}")

    async def _oom_task(self, fd: int) -> None:
        try:
            await trio.lowlevel.wait_readable(fd)
        except (trio.ClosedResourceError, trio.Cancelled, OSError):
            return
        with contextlib.suppress(OSError):
            os.read(fd, 8)
        log.get().info("sandbox_oom", session_id=self.session_id)
        self.oom.set()

    def _stop_oom_watch(self) -> None:
        if self._oom_fd >= 0:
            trio.lowlevel.notify_closing(self._oom_fd)
            self._oom_fd = -1

    # -- lifetime (each idempotent) ------------------------------------------------------
    async def kill_init(self) -> None:
        """SIGKILL PID 1 through the pidfd (the whole PID namespace dies with it) and wait
        until it is reaped."""
        if self._reaped:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        # a frozen task cannot act on SIGKILL until thawed (v1 freezer): a sandbox left
        # frozen by an interrupted destruction would otherwise never be reaped
        with contextlib.suppress(Exception):
            if self.cgroup.frozen():
                self.cgroup.thaw()
        await _reap(self.pidfd)
        self._reaped = True
        self.control.close()

    def detach_root_mount(self) -> None:
        """Close the root fd and detach the session tmpfs from the host; remove its dir."""
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1
        mounts.detach(self.root_mount_path)
        mounts.remove_session_dir(self._engine.runtime_dir, self.session_id)

    def release_slot(self) -> None:
        if not self._slot_released:
            self._slot_released = True
            self._engine._forget(self)

    async def remove_cgroup(self) -> None:
        """Confirm the cgroup is empty (kill what is left), then remove it."""
        self._stop_oom_watch()
        if not self.cgroup.empty():
            self.cgroup.kill_all()
            await trio.to_thread.run_sync(self.cgroup.wait_empty)
        # rmdir of each cgroup directory (css offlining) off the event loop
        await trio.to_thread.run_sync(self.cgroup.remove)

    async def teardown(self) -> None:
        """Best effort: kill, remove the cgroup, detach the tmpfs, release the slot.
        Errors of one step do not stop the others; the first is raised at the end."""
        with trio.CancelScope(shield=True):  # cleanup must not stop halfway
            await self._teardown()

    async def _teardown(self) -> None:
        first: BaseException | None = None
        for step in (self.kill_init, self.remove_cgroup):
            try:
                await step()
            except Exception as e:
                first = first or e
                log.get().error("teardown_step_failed", session_id=self.session_id,
                                step=step.__name__, error=_err_text(e))
        for sync_step in (self.detach_root_mount, self.release_slot, self._close_pidfd):
            try:
                sync_step()
            except Exception as e:
                first = first or e
                log.get().error("teardown_step_failed", session_id=self.session_id,
                                step=sync_step.__name__, error=_err_text(e))
        if first is not None:
            raise first

    def _close_pidfd(self) -> None:
        if self._reaped and self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


try:  # native/ext/nrxspawn.c: the same posix_spawn, without holding the GIL
    from agent._native import lib as _native_lib

    _NATIVE_SPAWN = hasattr(_native_lib, "nrx_spawn_helper")
except Exception:  # any import failure means "use os.posix_spawn"
    _NATIVE_SPAWN = False


def _spawn_helper(path: str, control_fd: int) -> int:
    """Start nrx-init: stdio on /dev/null, the control socket on fd 3, empty signal mask,
    SIGPIPE/SIGXFSZ default, empty environment.  os.posix_spawn holds the GIL through
    the whole vfork+exec (~6% of the trio thread's time under 16 clients); the native
    call releases it."""
    if _NATIVE_SPAWN:
        pid = _native_lib.nrx_spawn_helper(os.fsencode(path), control_fd)
        if pid < 0:
            raise OSError(-pid, os.strerror(-pid))
        return pid
    return os.posix_spawn(path, ["nrx-init"], {}, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDWR, 0),
        (os.POSIX_SPAWN_DUP2, 0, 1),
        (os.POSIX_SPAWN_DUP2, 0, 2),
        (os.POSIX_SPAWN_DUP2, control_fd, 3),
    ], setsigmask=(), setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))


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
        self._log = log.get().bind(component="sandbox")
        self.binds, self.links = mounts.plan(sc)
        for cls in cfg.classes.values():  # once per profile, at start: fail early
            self.bpf(cls.seccomp_profile)

    def _forget(self, sb: Sandbox) -> None:
        if self.live.get(sb.session_id) is sb:
            del self.live[sb.session_id]
        self.slots.release(sb.slot)

    def bpf(self, profile: str) -> bytes:
        if profile not in self._bpf:
            self._bpf[profile] = self._compile(profile)
        return self._bpf[profile]

    async def create(self, session_id: str, *, tier: str, classification: str,
                     hostname: str | None = None) -> Sandbox:
        cfg, sc = self.cfg, self.cfg.sandbox
        if not _SESSION_ID_RE.match(session_id):
            raise SandboxError(f"invalid session id {session_id!r}: use [A-Za-z0-9_-], 1..64")
        if session_id in self.live:
            raise SandboxError(f"session {session_id} already has a sandbox")
        t = cfg.tiers[tier]
        tmpfs_bytes = cfg.tmpfs_bytes(tier)
        bpf = self.bpf(cfg.classes[classification].seccomp_profile)
        undo: list[Callable[[], object]] = []
        t0 = time.monotonic()
        try:
            ids = self.slots.allocate()
            undo.append(lambda: self.slots.release(ids.slot))
            hostname = hostname or uts.new_hostname(
                sc.hostname_prefix, {s.hostname for s in self.live.values()})
            # mkdir of ~6 cgroup directories, their limit writes and the mount point's
            # mkdir (which waits on the filesystem journal while proofs are fsynced):
            # kernel work that blocked the event loop, i.e. every other session
            root = mounts.mount_path(self.runtime_dir, session_id)
            cg = await trio.to_thread.run_sync(self._cgroup_and_root, session_id,
                                               CgroupLimits.from_tier(t), root)
            undo.append(cg.remove)
            undo.append(lambda: mounts.remove_session_dir(self.runtime_dir, session_id))
            undo.append(lambda: mounts.detach(root))
            init_cfg = initproto.InitConfig(
                hostname=hostname, root=str(root), tmpfs_size=tmpfs_bytes,
                tmpfs_inodes=t.tmpfs_inodes, uid_base=ids.base, gid_base=ids.base,
                map_size=ids.size, sandbox_id=userns.SANDBOX_ID, ro_binds=self.binds,
                links=self.links, cgroup_procs=[str(p) for p in cg.procs_files()],
                oom_score_adj=sc.sandbox_oom_score_adj, nofile=sc.rlimit_nofile,
                fsize=sc.rlimit_fsize_bytes or tmpfs_bytes, seccomp_bpf=bpf)
            pid, pidfd, control = await self._spawn(init_cfg, undo)
            root_fd = os.open(root, O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            undo.append(lambda: os.close(root_fd))
            sb = Sandbox(session_id=session_id, hostname=hostname, ids=ids, init_pid=pid,
                         pidfd=pidfd, control=control, root_mount_path=root, root_fd=root_fd,
                         tmpfs_bytes=tmpfs_bytes, cgroup=cg, engine=self)
            sb._watch_oom()
        except BaseException:
            with trio.CancelScope(shield=True):
                for step in reversed(undo):
                    try:
                        r = step()
                        if hasattr(r, "__await__"):
                            await r
                    except Exception as e:  # keep undoing; report each
                        self._log.error("create_undo_failed", session_id=session_id,
                                        error=_err_text(e))
            raise
        self.live[session_id] = sb
        self._log.info("sandbox_created", session_id=session_id, slot=ids.slot,
                       init_pid=pid, ms=round((time.monotonic() - t0) * 1000, 2))
        return sb

    def _cgroup_and_root(self, session_id: str, limits: CgroupLimits, root: Path):
        """Create the session cgroups, then the mount point; on failure of the latter
        the cgroups are removed again (the caller's undo list does not have them yet)."""
        cg = self.cgroups.create(session_id, limits)
        try:
            mounts.make_mount_point(root)
        except BaseException:
            with contextlib.suppress(Exception):
                cg.remove()
            raise
        return cg

    async def _spawn(self, init_cfg: initproto.InitConfig, undo: list) -> tuple:
        """Run nrx-init with the control socket on fd 3; returns (pid, pidfd, control)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        control = _exec.Control(ours)
        undo.append(control.close)
        try:
            ours.send(init_cfg.encode())
            fd = theirs.fileno()
            if fd == 3:  # dup2(3, 3) would keep O_CLOEXEC
                fd = os.dup(fd)
                theirs.close()
                theirs = socket.socket(fileno=fd)
            helper = _spawn_helper(str(INIT_BIN), fd)
        finally:
            theirs.close()
        helper_fd = os.pidfd_open(helper)
        pid = pidfd = -1

        async def kill_child() -> None:
            if pidfd >= 0:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                await _reap(pidfd)
                os.close(pidfd)

        try:
            with trio.fail_after(CREATE_TIMEOUT):
                try:
                    while True:
                        kind, fields = await control.recv()
                        if kind == initproto.MSG_PID:
                            pid = fields[0]
                            pidfd = os.pidfd_open(pid)
                            undo.append(kill_child)
                        elif kind == initproto.MSG_READY:
                            break
                        elif kind == initproto.MSG_ERROR:
                            raise SandboxError(f"sandbox creation failed: {fields[0]}")
                except SandboxGone:
                    raise SandboxError("sandbox creation failed: nrx-init exited early "
                                       "without a message") from None
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(CREATE_TIMEOUT):
                    await _reap(helper_fd)
                os.close(helper_fd)
                if pidfd < 0:
                    # aborted before reading it: the helper sent the PID before exiting, so
                    # the child can still be found (to kill and reap it) in the socket
                    pid = _late_pid(ours)
                    if pid > 0:
                        pidfd = os.pidfd_open(pid)
                        undo.append(kill_child)
        return pid, pidfd, control

    def sweep_leftovers(self) -> dict:
        """Detach session mounts under our runtime dir and remove session cgroups under
        our prefix that no live sandbox owns (recovery after a crash)."""
        out = {"mounts": 0, "cgroups": 0, "errors": []}
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
