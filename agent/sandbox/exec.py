"""Exec (SPEC 4): one command at a time in a sandbox, through its PID 1.

The agent makes two pipes, sends their write ends to nrx-init with the EXEC request
and reads the read ends itself, each into one read buffer it reuses for the whole exec:
each chunk (<= 64 KiB) goes to the bounded head+tail capture and, in order, to
`on_output`.  When the exec ends (whatever way) the read buffers and the captures are
zeroed and counted in `Sandbox.buffers_zeroed` (step 4 evidence); the request messages
and results are immutable objects that the daemon's allocator overwrites when freed
(agent/memory_hygiene.py).  Reading never stops while the command runs, except while a
`PacedOutput` (a streaming client's queue) has no room: then the command's pipe fills.
When the leader exits, whatever is already in the pipes is drained and the result is
returned (a background process holding stdout open cannot hold the exec).  At the
timeout the process group gets SIGTERM, then SIGKILL after the grace.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import secrets
import signal as _signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from agent import timefmt
from agent.config import ENV_ENTRIES_MAX
from agent.fsops import openat2

from . import initproto
from .faults import ExecFailed, ExecRefused, InputDoesNotFit, SandboxGone
from .output import Capture, zero

if TYPE_CHECKING:  # engine imports this module
    from .engine import Sandbox

CHUNK = 64 * 1024
FIRST_READ = 4096  # a stream's read buffer starts here and grows to CHUNK once filled
CONTROL_BUF = 8192  # nrx-init's replies are at most 4 KiB (send_msg in native/init)
PIPE_SIZE = 1024 * 1024
DRAIN_LIMIT = 4 * 1024 * 1024  # per stream, after the leader exited
MAX_REQUEST = 512 * 1024  # command + environment, well inside one control message
F_SETPIPE_SZ = 1031


@dataclass
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int
    timed_out: bool
    signal: int | None
    oom_killed: bool
    output_truncated: bool
    stderr_truncated: bool
    duration_ms: int
    started_at: str
    finished_at: str


OnOutput = Callable[[str, bytes], Awaitable[None]]


class PacedOutput:
    """An `on_output` that may pace the command: before each read of a pipe the reader
    awaits `room()` (cancellable: nothing has been read yet, so the exec's timeout and a
    cancel lose nothing), and a command writing faster than the output is taken blocks
    on its full pipe instead.  Calling it (`put`) must never wait long: it also runs in
    the drain after the command ended."""

    async def __call__(self, stream: str, data: bytes) -> None:
        raise NotImplementedError

    async def room(self) -> None:
        """Return when a chunk of up to CHUNK bytes can be taken."""


class ExecProgress:
    """What an exec in flight has produced so far, for the session to close it out when
    the sandbox ends under it (TTL, OOM, operator: issue 12 "interrupted execs")."""

    def __init__(self, tag: bytes = b"") -> None:
        self.tag = tag  # kept by PID 1 while the command runs (see initproto.encode_exec)
        self.streams: list[_Stream] = []
        self.on_output: OnOutput | None = None
        self.started = time.time()
        self.t0 = time.monotonic()
        self.zeroed = 0  # bytes of stream buffers interrupted() wiped (step 4 evidence)

    async def interrupted(self, *, oom: bool) -> ExecResult:
        """The result as it stands: what is still in the pipes is drained first (the
        sandbox is frozen, so nothing more comes); the command is about to be killed by
        destruction (SIGKILL, exit code 137)."""
        for st in self.streams:
            if st.fd >= 0:
                with contextlib.suppress(OSError):
                    await _drain(st, self.on_output)
        caps = [st.capture for st in self.streams] or [Capture(0), Capture(0)]
        res = ExecResult(
            stdout=caps[0].result(), stderr=caps[1].result(), exit_code=128 + _signal.SIGKILL,
            timed_out=False, signal=int(_signal.SIGKILL), oom_killed=oom,
            output_truncated=caps[0].truncated, stderr_truncated=caps[1].truncated,
            duration_ms=int((time.monotonic() - self.t0) * 1000),
            started_at=timefmt.iso_seconds(self.started), finished_at=timefmt.iso_seconds())
        # the exec's own finally left the buffers for this read (the sandbox is ending)
        self.zeroed += sum(st.wipe() for st in self.streams)
        return res


def base_env(home: str = "/work") -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": home,
            "LANG": "C.UTF-8", "TMPDIR": "/tmp"}


# -- input ----------------------------------------------------------------------------

def write_input(root_fd: int, data: bytes, uid: int, gid: int) -> None:
    """Replace /input/data with `data`: a fresh file next to it (never following a link),
    owned by root inside, mode 0444, then renamed over `data` — a planted symlink is
    replaced, not followed."""
    indir = openat2(root_fd, "input", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = f".data.{secrets.token_hex(8)}"
        fd = openat2(indir, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
        try:
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fchown(fd, uid, gid)
                os.fchmod(fd, 0o444)
            finally:
                os.close(fd)
            os.rename(tmp, "data", src_dir_fd=indir, dst_dir_fd=indir)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=indir)
            raise
    finally:
        os.close(indir)


# -- running --------------------------------------------------------------------------

def decode_status(status: int) -> tuple[int, int | None]:
    """(exit_code, signal) from a wait status; 128+N for signal N."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, sig
    return os.WEXITSTATUS(status), None


class _Stream:
    def __init__(self, name: str, fd: int, cap: int) -> None:
        self.name, self.fd = name, fd
        self.capture = Capture(cap)
        self.buf = bytearray(FIRST_READ)  # every read lands here: no bytes per chunk
        self.zeroed = 0
        self._filled = False  # the last read filled the buffer: grow it
        self.eof = False

    def read(self) -> memoryview | None:
        """The next chunk (a view of `buf`, valid until the next read), None at EOF;
        raises BlockingIOError when the pipe is empty."""
        if len(self.buf) < CHUNK and self._filled:
            self.zeroed += zero(self.buf)  # the small buffer is done with: clear it
            self.buf = bytearray(CHUNK)
        n = os.readv(self.fd, [self.buf])
        self._filled = n == len(self.buf)
        if not n:
            self.eof = True
            return None
        return memoryview(self.buf)[:n]

    def wipe(self) -> int:
        return self.zeroed + zero(self.buf) + self.capture.wipe()



async def _deliver(stream: _Stream, data: memoryview, on_output: OnOutput | None) -> None:
    stream.capture.feed(data)
    if on_output is not None:
        with trio.CancelScope(shield=True):  # a chunk is delivered whole or not read
            await on_output(stream.name, bytes(data))


async def _pump(stream: _Stream, on_output: OnOutput | None,
                scope: trio.CancelScope) -> None:
    """Read `stream` until EOF, or until `scope` is cancelled (the leader exited: the rest
    is drained)."""
    paced = on_output if isinstance(on_output, PacedOutput) else None
    with scope:
        while not stream.eof:
            if paced is not None:
                await paced.room()
            try:
                data = stream.read()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(stream.fd)
                continue
            if data is None:
                return
            await _deliver(stream, data, on_output)
            await trio.lowlevel.checkpoint()


async def _drain(stream: _Stream, on_output: OnOutput | None, *, paced: bool = False) -> None:
    """What the pipe still holds (at most DRAIN_LIMIT), after the leader exited; `paced`:
    waiting for a PacedOutput's room first, as _pump does (not when the sandbox is
    ending: destruction does not wait for a client)."""
    room = on_output.room if paced and isinstance(on_output, PacedOutput) else None
    taken = 0
    while not stream.eof and taken < DRAIN_LIMIT:
        if room is not None:
            await room()
        try:
            data = stream.read()
        except BlockingIOError:
            return
        if data is None:
            return
        taken += len(data)
        await _deliver(stream, data, on_output)


class Control:
    """The agent's end of the control socket, for one sandbox.

    A message is sent or received straight on the non-blocking socket, and the task waits
    for the socket only when it would block: an exec exchanges three messages with PID 1,
    and trio's socket methods add a trip through the scheduler after each one that
    succeeds at once.  One task at a time uses it (Sandbox.exec is exclusive)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = trio.socket.from_stdlib_socket(sock)  # sets it non-blocking
        self.raw = sock
        # one receive buffer for the sandbox's life: recv(MAX_MSG) would allocate (and the
        # wiping allocator fill and clear) 1 MiB per reply
        self.buf = bytearray(CONTROL_BUF)

    async def recv(self) -> tuple[int, tuple]:
        while True:
            try:
                n = self.raw.recv_into(self.buf)
                break
            except BlockingIOError:
                pass
            except OSError as e:
                raise SandboxGone("the sandbox was killed") from e
            try:
                await trio.lowlevel.wait_readable(self.raw)
            except (trio.ClosedResourceError, OSError) as e:
                raise SandboxGone("the sandbox was killed") from e
        if not n:
            raise SandboxGone("the sandbox's init exited")
        return initproto.decode(bytes(self.buf[:n]))

    async def send(self, msg: bytes, fds: list[int] | None = None) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while True:
            try:
                self.raw.sendmsg([msg], anc)  # SOCK_SEQPACKET: the whole message or nothing
                return
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno == errno.EMSGSIZE:  # nothing was sent; the sandbox is fine
                    raise ExecRefused(f"command and env together ({len(msg)} bytes) exceed "
                                      f"what this host's control socket takes "
                                      f"(net.core.wmem_max)", field="command") from None
                raise SandboxGone("the sandbox's init exited") from e
            try:
                await trio.lowlevel.wait_writable(self.raw)
            except (trio.ClosedResourceError, OSError) as e:
                raise SandboxGone("the sandbox's init exited") from e

    def close(self) -> None:
        self.sock.close()


async def run(sb: Sandbox, command: str, *, input_data: bytes | None, env: dict[str, str] | None,
              timeout: float, on_output: OnOutput | None, output_cap: int,
              kill_grace: float, max_input: int = 8 * 1024 * 1024,
              progress: ExecProgress | None = None) -> ExecResult:
    """Run `command` in sandbox `sb` (see Sandbox.exec)."""
    full_env = base_env()
    # the RPC layer refused more than exec.max_env_entries (<= ENV_ENTRIES_MAX)
    assert env is None or len(env) <= ENV_ENTRIES_MAX, "env entries are checked at the RPC edge"
    if env:
        for k, v in env.items():
            if not k or "=" in k or "\0" in k or "\0" in v:
                raise ExecRefused(f"invalid environment variable {k!r}", field="env")
            full_env[k] = v
    if input_data is not None and len(input_data) > max_input:
        raise ExecRefused(f"input_data is larger than {max_input} bytes", field="input_data")
    if "\0" in command:
        raise ExecRefused("command contains a NUL byte", field="command")
    size = len(command.encode()) + sum(len(k.encode()) + len(v.encode()) + 9
                                       for k, v in full_env.items())
    if size > MAX_REQUEST:
        raise ExecRefused(f"command and env together exceed {MAX_REQUEST} bytes",
                          field="command")
    if input_data is not None:
        try:
            write_input(sb.root_fd, input_data, sb.slot_root_uid, sb.slot_root_gid)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # the customer filled their own session: their condition, not a server fault
            raise InputDoesNotFit(f"input_data ({len(input_data)} bytes) does not fit: the "
                                  f"session's file system is full (space or inodes)",
                                  field="input_data") from None

    oom_before = _oom_kills(sb)
    started = time.time()
    t0 = time.monotonic()
    streams: list[_Stream] = []
    if progress is not None:
        progress.streams, progress.on_output = streams, on_output
        progress.started, progress.t0 = started, t0
    wends: list[int] = []
    try:
        for name in ("stdout", "stderr"):
            r, w = os.pipe2(os.O_CLOEXEC)
            wends.append(w)
            with contextlib.suppress(OSError):
                fcntl.fcntl(r, F_SETPIPE_SZ, PIPE_SIZE)
            os.set_blocking(r, False)
            streams.append(_Stream(name, r, output_cap))
        await sb.control.send(initproto.encode_exec(
            ["/bin/sh", "-c", command], full_env, "/work",
            progress.tag if progress is not None else b""), wends)
        for w in wends:
            os.close(w)
        wends.clear()
        pgid: int | None = None
        status: int | None = None
        timed_out = False
        try:
            # the readers are set up while PID 1 starts the command (on another CPU when
            # one is free), not after STARTED: they need no pgid, and a command that could
            # not start closes its pipes (EOF)
            async with _single_errors(), trio.open_nursery() as nursery:
                readers = [trio.CancelScope() for _ in streams]
                for st, scope in zip(streams, readers, strict=True):
                    nursery.start_soon(_pump, st, on_output, scope)
                pgid = await _wait_started(sb.control)
                with trio.move_on_after(max(timeout, 0)):
                    status = await _wait_exit(sb.control, pgid)
                if status is None:
                    timed_out = True
                    await sb.control.send(initproto.encode_signal(pgid, _signal.SIGTERM))
                    with trio.move_on_after(kill_grace):
                        status = await _wait_exit(sb.control, pgid)
                    if status is None:
                        await sb.control.send(initproto.encode_signal(pgid, _signal.SIGKILL))
                        with trio.move_on_after(10):
                            status = await _wait_exit(sb.control, pgid)
                        if status is None:
                            raise SandboxGone("the command survived SIGKILL")
                for scope in readers:
                    scope.cancel()
        except ExecFailed:
            raise  # PID 1 started nothing: there is nothing to kill or wait for
        except BaseException:
            # cancelled or failed while the command runs: it must not outlive the exec
            # (unless the sandbox is being destroyed: destruction kills it, frozen)
            if status is None and not sb.ending:
                with trio.CancelScope(shield=True):
                    await _abort(sb.control, pgid)
            raise
        for s in streams:
            await _drain(s, on_output, paced=True)
        finished = time.time()
        exit_code, sig = decode_status(status)
        out, err = streams
        return ExecResult(
            stdout=out.capture.result(), stderr=err.capture.result(), exit_code=exit_code,
            timed_out=timed_out, signal=sig, oom_killed=_oom_kills(sb) > oom_before,
            output_truncated=out.capture.truncated, stderr_truncated=err.capture.truncated,
            duration_ms=int((time.monotonic() - t0) * 1000),
            started_at=timefmt.iso_seconds(started), finished_at=timefmt.iso_seconds(finished))
    finally:
        for w in wends:
            os.close(w)
        for s in streams:
            os.close(s.fd)
            s.fd = -1
            if not sb.ending:  # ending: the session's close-out reads them, then wipes them
                sb.buffers_zeroed += s.wipe()


@contextlib.asynccontextmanager
async def _single_errors():
    """Re-raise a lone exception out of a nursery's ExceptionGroup, so callers can catch
    ExecBusy/SandboxGone/Cancelled as themselves."""
    try:
        yield
    except BaseExceptionGroup as eg:
        leaves = list(_leaves(eg))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(eg: BaseExceptionGroup):
    for e in eg.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


async def _wait_started(control: Control) -> int:
    """The pgid of the command just requested (stale EXITED replies of an aborted exec are
    skipped)."""
    while True:
        kind, fields = await control.recv()
        if kind == initproto.MSG_STARTED:
            return fields[0]
        if kind == initproto.MSG_EXEC_FAIL:
            raise ExecFailed(f"the command could not be started: {fields[0]}")
        if kind != initproto.MSG_EXITED:
            raise initproto.InitProtocolError(f"unexpected reply {kind} to EXEC")


async def _wait_exit(control: Control, pgid: int) -> int:
    while True:
        kind, fields = await control.recv()
        if kind == initproto.MSG_EXITED and fields[0] == pgid:
            return fields[1]


async def _abort(control: Control, pgid: int | None) -> None:
    """SIGKILL the command's process group and wait (bounded) for its exit report."""
    with contextlib.suppress(SandboxGone, initproto.InitProtocolError, ExecFailed, OSError):
        with trio.move_on_after(5):
            if pgid is None:
                pgid = await _wait_started(control)
            await control.send(initproto.encode_signal(pgid, _signal.SIGKILL))
            await _wait_exit(control, pgid)


def _oom_kills(sb: Sandbox) -> int:
    try:
        return sb.cgroup.oom_kills()
    except OSError as e:
        if e.errno == errno.ENOENT:
            return 0
        raise
