"""Destroy workers (issue 18): the destruction pipeline's kernel work in worker processes.

One daemon process runs every destruction's Python on its one event-loop thread and
under its one GIL, so destructions cannot use a second core.  With `[destroy] workers = N`
(agent/config.py DestroyConfig) the daemon keeps N worker processes
(`python -m agent.destroy.worker_main`), each running steps 1-8 (`pipeline.run_steps`, the
very same code) for the destructions it is given, on its own event loop:

    daemon                                       worker
    run_pipeline(ctx) ── job (facts, root fd) ─▶ run_steps(WorkerContext)
        owner calls   ◀── call / ret ──────────▶  WorkerSandbox: kill PID 1 (the daemon's
                                                  child), detach the tmpfs, remove the
                                                  cgroup, release the slot, revoke;
                                                  step 4 (the session key)
    teardown, outcome ◀── done (evidence) ──────

What never leaves the daemon: the session key and step 4 (`memory_hygiene.measure` is
about the daemon's own memory), the signing and spooling of the proof (agent/service/
proofs.py, after the pipeline), the sandbox's cleanup stack (so `teardown()` and a later
`engine.aclose()` still know what is done), reaping nrx-init (only its parent can).  What a
worker opens itself: the cgroup directories (a handle rebuilt from the same paths), the
namespace pins of step 1 (/proc/<init>/ns/*, checked against the recorded inodes as in
the daemon), the SysV IPC namespace; the session tmpfs root fd is passed with SCM_RIGHTS
(an fd on the superblock cannot be reopened by path once detached).

Transport: one AF_UNIX stream socketpair per worker, frames of a 4-byte big-endian length
and a msgpack array (at most MAX_FRAME bytes), so a worker cannot make the daemon run code
(no pickle).  Messages: `["job", id, payload, nfds]`, `["call", id, call_id, name, args]`,
`["ret", id, call_id, ok, value]`, `["done", id, result]`, `["fail", id, error]`,
`["hello", pid]`.

Hygiene: a worker starts from the daemon's environment with the wiping allocator
(memory_hygiene.wanted_env), is non-dumpable with RLIMIT_CORE 0 and the daemon's
capability set (agent/hardening.harden), dies with the daemon (PR_SET_PDEATHSIG), ignores
SIGTERM/SIGINT/SIGHUP (a service stop signals the whole cgroup; the daemon's drain still
needs its workers) and logs through its own structlog to the same stderr.

Failure: a worker that exits is reaped, logged (`destroy_worker_died`, error) and started
again.  A destruction it had in flight is never lost: the daemon runs steps 1-8 again
in-process on what is left (step 4's result is kept from the first attempt when it
already ran, since the key is gone), and step 8 records `pipeline_attempts: 2`.  When no
worker is running or every one is at `max_jobs_per_worker`, the destruction runs
in-process.  Why not trio-parallel: its `run_sync` is one call and one pickled result,
with no file descriptors and no way for the job to call back into the daemon halfway
(kill and reap PID 1, the key, the cleanup stack); every step here needs one of those.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import msgpack
import structlog
import trio

from agent import log

if TYPE_CHECKING:
    from agent.destroy.context import SessionFacts

__all__ = ["MAX_FRAME", "DestroyPool", "WorkerDied", "current", "open_pool"]

MAX_FRAME = 64 << 20  # receipts of a long session travel with its job
_HDR = struct.Struct(">I")
MAX_FDS = 4
STOP_ENV = "NANORIX_AGENT_TEST_STOP_AT"  # tests: a worker stops itself (SIGSTOP) at a step
HELLO_SECONDS = 60.0
_log = structlog.get_logger("nanorix-agent.destroy_workers")


class WorkerDied(RuntimeError):
    """The worker running a destruction exited (or broke the protocol) before it ended."""


class OwnerCallFailed(RuntimeError):
    """The daemon could not do what a worker asked of it; the text is a short reason."""


# -- framing -------------------------------------------------------------------------------

def pack(msg: list) -> bytes:
    body = msgpack.packb(msg, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ValueError("destroy worker message too large")
    return _HDR.pack(len(body)) + body


class Frames:
    """Splits a byte stream into messages (a frame over MAX_FRAME is a protocol error)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[list]:
        self._buf += data
        out = []
        while len(self._buf) >= _HDR.size:
            (n,) = _HDR.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise WorkerDied("oversized frame")
            if len(self._buf) < _HDR.size + n:
                break
            body = bytes(self._buf[_HDR.size:_HDR.size + n])
            del self._buf[:_HDR.size + n]
            msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
            if not isinstance(msg, list) or not msg:
                raise WorkerDied("malformed frame")
            out.append(msg)
        return out


async def _send(sock, lock: trio.Lock, msg: list, fds: Sequence[int] = ()) -> None:
    data = pack(msg)
    async with lock:
        if fds:
            n = await sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                             array.array("i", fds))])
            data = data[n:]
        while data:
            n = await sock.send(data)
            data = data[n:]


# -- what crosses to the worker ------------------------------------------------------------

def _cgroup_spec(cg) -> dict:
    """The session cgroup as paths: the worker rebuilds the same driver's handle on them
    (it never removes or closes the daemon's: remove_cgroup is a call back)."""
    from agent.sandbox.cgroups.v1 import V1Handle, _PartialV1Handle
    from agent.sandbox.cgroups.v2 import V2Handle

    if isinstance(cg, V1Handle):
        return {"mode": "v1", "name": cg.name, "dirs": {k: str(v) for k, v in cg.dirs.items()},
                "unified": str(cg.unified) if cg.unified else None,
                "partial": isinstance(cg, _PartialV1Handle)}
    if isinstance(cg, V2Handle):
        # the OOM guard's headroom and cap decide what set_memory_limit writes
        return {"mode": "v2", "name": cg.name, "path": str(cg.path),
                "headroom": cg._headroom, "cap": cg._cap}
    raise TypeError("unknown cgroup handle")


def _cgroup_from_spec(spec: dict):
    from agent.sandbox.cgroups.v1 import V1Handle, _PartialV1Handle
    from agent.sandbox.cgroups.v2 import V2Handle

    if spec["mode"] == "v1":
        cls = _PartialV1Handle if spec["partial"] else V1Handle
        return cls(spec["name"], {k: Path(v) for k, v in spec["dirs"].items()},
                   Path(spec["unified"]) if spec["unified"] else None)
    h = V2Handle(spec["name"], Path(spec["path"]))
    h._headroom, h._cap = spec["headroom"], spec["cap"]
    return h


@dataclass
class _JobFacts:
    """The session facts a job carries to its worker (destroy.context.SessionFacts)."""

    session_id: str
    customer_id: str
    tier: str
    classification: str
    jurisdiction: str
    created_at: str
    receipts: list[dict]
    audit_events: list[dict]
    exec_count: int
    receipt_keys: list[dict]


def _session_facts(s: SessionFacts) -> dict:
    return {"session_id": s.session_id, "customer_id": s.customer_id, "tier": s.tier,
            "classification": s.classification, "jurisdiction": s.jurisdiction,
            "created_at": s.created_at, "receipts": list(s.receipts),
            "audit_events": list(s.audit_events or []), "exec_count": int(s.exec_count),
            "receipt_keys": list(s.receipt_keys)}


def _job(ctx) -> tuple[dict, list[int]]:
    sb = ctx.sandbox
    fds = [sb.root_fd] if sb.root_fd is not None and sb.root_fd >= 0 else []
    hooks = ctx.hooks
    return {"session": _session_facts(ctx.session),
            "sandbox": {"session_id": sb.session_id, "init_pid": sb.init_pid,
                        "host_uid": sb.host_uid, "host_gid": sb.host_gid,
                        "namespaces": dict(sb.namespaces), "tmpfs_bytes": sb.tmpfs_bytes,
                        "cgroup": _cgroup_spec(sb.cgroup), "root_fd": bool(fds),
                        # as the OOM watch left them (end() cancels it before destroying)
                        "oom": [sb.oom_guarded, sb.oom_contained, sb.oom_fallback,
                                sb.oom_contain_us, sb.oom_over_cap_bytes]},
            "passes": list(ctx.passes), "reason": ctx.reason, "node_id": ctx.node_id,
            "agent_version": ctx.agent_version, "timeout": ctx.timeout,
            "fail_step": hooks.fail_step if hooks is not None else None}, fds


# -- the daemon side -----------------------------------------------------------------------

@dataclass
class _Owner:
    """Answers one destruction's calls from its worker with the daemon's own objects;
    keeps step 4's result so a re-run after a worker died does not zeroize twice."""

    ctx: Any
    key_ev: dict | None = None
    key_error: str | None = None

    async def key_step(self, ev: dict) -> None:
        from agent.destroy import key_zeroization
        from agent.destroy.context import DestroyState, StepError
        from agent.destroy.pipeline import reason_text

        if self.key_ev is None:
            got: dict = {}
            try:
                await key_zeroization.run(self.ctx, DestroyState(), got)
            except Exception as e:
                self.key_error = reason_text(e)
            self.key_ev = got
        ev.update(self.key_ev)
        if self.key_error is not None:
            raise StepError(self.key_error)

    async def answer(self, name: str, args: list) -> Any:
        from agent.destroy.context import StepError

        sb, ctx = self.ctx.sandbox, self.ctx
        if name == "key_step":
            ev: dict = {}
            with contextlib.suppress(StepError):  # its text is self.key_error
                await self.key_step(ev)
            return [ev, self.key_error]
        if name == "detach_root_mount":
            await trio.to_thread.run_sync(sb.detach_root_mount)
            return None
        if name == "kill_init":
            with trio.move_on_after(float(args[0])) as cs:
                await sb.kill_init()
            return not cs.cancelled_caught
        if name == "remove_cgroup":
            await sb.remove_cgroup()
            return None
        if name == "release_slot":
            sb.release_slot()
            return None
        if name == "retire_hostname":
            sb.retire_hostname()
            return None
        if name == "revoke":
            ctx.revoke()
            return None
        raise OwnerCallFailed("unknown call")


@dataclass
class _Worker:
    slot: int
    proc: Any = None
    sock: Any = None
    pid: int = -1
    ready: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)
    jobs: dict[int, trio.MemorySendChannel] = field(default_factory=dict)
    started: int = 0
    first_up: trio.Event = field(default_factory=trio.Event)  # ready, or failed to start


class DestroyPool:
    """N destroy workers, each restarted when it exits; `run_steps(ctx)` runs one
    destruction's steps 1-8 in the least busy one."""

    def __init__(self, size: int, *, max_jobs: int = 32, log_level: str = "info") -> None:
        self.size = size
        self.max_jobs = max_jobs
        self.log_level = log_level
        self.workers = [_Worker(i) for i in range(size)]
        self.closing = False
        self.deaths = 0  # workers that exited while the pool was open
        self.retries = 0  # destructions re-run in the daemon after their worker died
        self._ids = itertools.count(1)

    def pids(self) -> list[int]:
        """The pids of the workers running now (tests, ops)."""
        return [w.pid for w in self.workers if w.ready]

    # -- running a destruction --------------------------------------------------------------
    async def run_steps(self, ctx):
        """Steps 1-8 of `ctx` in a worker: the DestroyState with the evidence, or None when
        no worker can take it (the caller runs it in-process).  A worker dying midway
        re-runs the steps here (WorkerDied never reaches the caller)."""
        from agent.destroy.context import DestroyState
        from agent.destroy.pipeline import run_steps

        live = [w for w in self.workers if w.ready and len(w.jobs) < self.max_jobs]
        if not live:
            return None
        w = min(live, key=lambda x: len(x.jobs))
        owner = _Owner(ctx)
        try:
            result = await self._run_in(w, ctx, owner)
        except WorkerDied as e:
            self.retries += 1
            _log.error("destroy_worker_lost_job", session_id=ctx.session.session_id,
                       worker_pid=w.pid, error=str(e), rerun="in_process")
            ctx.attempts += 1
            if owner.key_ev is not None:  # step 4 already ran in the daemon: keep it
                ctx.key_owner = owner
            st, _ = await run_steps(ctx)
            return st
        st = DestroyState(destroy_started=result["destroy_started"])
        st.destroyed_at = result["destroyed_at"]
        st.evidence = result["evidence"]
        # the canonical JSON the worker sealed the chain with, so the daemon (which signs)
        # does not serialise the evidence again; bytes, checked to be one per object
        enc = result.get("evidence_json")
        if (isinstance(enc, list) and len(enc) == len(st.evidence)
                and all(isinstance(b, bytes) for b in enc)):
            st.evidence_json = enc
        return st

    async def _run_in(self, w: _Worker, ctx, owner: _Owner) -> dict:
        job_id = next(self._ids)
        send, recv = trio.open_memory_channel[list](4)
        w.jobs[job_id] = send
        payload, fds = _job(ctx)
        _log.debug("destroy_worker_job", session_id=ctx.session.session_id, worker_pid=w.pid)
        try:
            try:
                await _send(w.sock, w.lock, ["job", job_id, payload, len(fds)], fds)
            except (OSError, trio.ClosedResourceError, trio.BrokenResourceError):
                raise WorkerDied("send failed") from None
            async with recv:
                async for msg in recv:
                    kind = msg[0]
                    if kind == "done":
                        return msg[2]
                    if kind == "fail":
                        raise RuntimeError(f"destroy worker pipeline crashed: {msg[2]}")
                    if kind == "call":
                        await self._answer(w, job_id, owner, msg)
            raise WorkerDied("worker exited")
        finally:
            w.jobs.pop(job_id, None)

    async def _answer(self, w: _Worker, job_id: int, owner: _Owner, msg: list) -> None:
        from agent.destroy.pipeline import reason_text

        _, _, call_id, name, args = msg
        try:
            value, ok = await owner.answer(str(name), list(args or [])), True
        except Exception as e:
            value, ok = reason_text(e), False
        try:
            await _send(w.sock, w.lock, ["ret", job_id, call_id, ok, value])
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the reader sees the worker gone and ends the job

    # -- keeping the workers ------------------------------------------------------------------
    async def _keep(self, w: _Worker) -> None:
        """Start worker `w`, serve it until it exits, start it again (backing off when it
        keeps dying); runs until the pool closes."""
        backoff = 0.1
        first = True
        while not self.closing:
            t0 = time.monotonic()
            try:
                await self._serve_one(w, first)
            except Exception:
                _log.exception("destroy_worker_failed", slot=w.slot)
            w.first_up.set()
            first = False
            if self.closing:
                return
            self.deaths += 1
            backoff = 0.1 if time.monotonic() - t0 > 10 else min(backoff * 2, 5.0)
            await trio.sleep(backoff)

    async def _serve_one(self, w: _Worker, first: bool) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = _worker_env(first)
        try:
            # spawned from the event-loop thread, not through trio.lowlevel.open_process
            # (a cache thread): PR_SET_PDEATHSIG fires when the spawning THREAD exits, and
            # trio retires idle cache threads after seconds
            proc = _Proc(subprocess.Popen(
                [sys.executable, "-m", "agent.destroy.worker_main", "--fd", str(theirs.fileno()),
                 "--log-level", self.log_level, "--parent", str(os.getpid())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL))
        finally:
            theirs.close()
        w.proc, w.pid, w.started = proc, proc.pid, w.started + 1
        w.sock = trio.socket.from_stdlib_socket(ours)
        frames = Frames()
        try:
            with trio.move_on_after(HELLO_SECONDS):
                while not w.ready:
                    data = await w.sock.recv(1 << 16)
                    if not data:
                        break
                    for msg in frames.feed(data):
                        if msg[0] == "hello":
                            w.ready = True
            if w.ready:
                _log.info("destroy_worker_started", worker_pid=w.pid, slot=w.slot)
                w.first_up.set()
                await self._read(w, frames)
        except (OSError, WorkerDied) as e:
            _log.error("destroy_worker_protocol_error", worker_pid=w.pid,
                       error=type(e).__name__)
        finally:
            w.ready = False
            w.sock.close()
            with trio.CancelScope(shield=True):
                await _end_process(proc, grace=0 if not self.closing else 5.0)
            # only once it is gone: a job re-run in the daemon must not race the worker
            for ch in list(w.jobs.values()):
                ch.close()  # every job in flight sees the end: WorkerDied
            if not self.closing:
                _log.error("destroy_worker_died", worker_pid=w.pid, slot=w.slot,
                           status=proc.returncode)

    async def _read(self, w: _Worker, frames: Frames) -> None:
        while True:
            data = await w.sock.recv(1 << 16)
            if not data:
                return
            for msg in frames.feed(data):
                ch = w.jobs.get(msg[1]) if len(msg) > 1 else None
                if ch is None:
                    continue  # a job that already ended (cancelled on our side)
                try:
                    ch.send_nowait(msg)
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    raise WorkerDied("job queue full") from None

    async def aclose(self) -> None:
        """Wait (bounded) for the destructions in flight, then end every worker."""
        with trio.move_on_after(60):
            while any(w.jobs for w in self.workers):
                await trio.sleep(0.01)
        self.closing = True
        for w in self.workers:
            if w.sock is not None:
                with contextlib.suppress(OSError):
                    w.sock.shutdown(socket.SHUT_WR)  # EOF: the worker exits


def _worker_env(first: bool) -> dict[str, str]:
    from agent import memory_hygiene

    env = memory_hygiene.wanted_env(dict(os.environ))
    if not first:
        env.pop(STOP_ENV, None)  # a test's stop point stops the first worker only
    return env


class _Proc:
    """A worker process, waited for through its pidfd on the event loop."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.pidfd = os.pidfd_open(popen.pid)
        self.returncode: int | None = None

    async def wait(self) -> int:
        while self.returncode is None:
            await trio.lowlevel.wait_readable(self.pidfd)
            rc = self.popen.poll()
            if rc is not None:
                self.returncode = rc
                trio.lowlevel.notify_closing(self.pidfd)  # out of trio's epoll set too
                os.close(self.pidfd)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)


async def _end_process(proc: _Proc, grace: float) -> None:
    """Wait `grace` seconds for the worker to exit, then SIGKILL it; reap it."""
    with trio.move_on_after(grace):
        await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


_current: DestroyPool | None = None


def current() -> DestroyPool | None:
    """The daemon's pool (None: destructions run in-process)."""
    return _current


@contextlib.asynccontextmanager
async def open_pool(size: int, *, max_jobs: int = 32,
                    log_level: str = "info") -> AsyncIterator[DestroyPool | None]:
    """Run `size` destroy workers for the duration of the block (0: none, None yielded);
    on exit wait for the destructions in flight, end the workers and reap them."""
    global _current
    if size <= 0:
        yield None
        return
    pool = DestroyPool(size, max_jobs=max_jobs, log_level=log_level)
    async with trio.open_nursery() as nursery:
        for w in pool.workers:
            nursery.start_soon(pool._keep, w)
        with trio.move_on_after(HELLO_SECONDS):
            for w in pool.workers:
                await w.first_up.wait()
        _current = pool
        try:
            yield pool
        finally:
            _current = None
            with trio.CancelScope(shield=True):
                await pool.aclose()
                with trio.move_on_after(10):
                    while any(w.proc is not None and w.proc.returncode is None
                              for w in pool.workers):
                        await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


# -- the worker side -----------------------------------------------------------------------

class _Link:
    """The worker's end of the socket: sends, and routes `ret` answers to their callers."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self.lock = trio.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[tuple[int, int], list] = {}

    async def call(self, job_id: int, name: str, *args) -> Any:
        call_id = next(self._ids)
        ev = trio.Event()
        slot: list = [ev]
        self._waiting[(job_id, call_id)] = slot
        try:
            await _send(self.sock, self.lock, ["call", job_id, call_id, name, list(args)])
            await ev.wait()
        finally:
            self._waiting.pop((job_id, call_id), None)
        _, ok, value = slot
        if not ok:
            raise OwnerCallFailed(str(value))
        return value

    def answered(self, msg: list) -> None:
        _, job_id, call_id, ok, value = msg
        slot = self._waiting.get((job_id, call_id))
        if slot is not None:
            slot += [ok, value]
            slot[0].set()


class WorkerSandbox:
    """What the steps use of a Sandbox, in a worker: the facts, a cgroup handle on the same
    directories, the passed root fd; everything the daemon owns is a call back to it."""

    def __init__(self, link: _Link, job_id: int, spec: dict, root_fd: int,
                 timeout: float) -> None:
        self._link, self._job = link, job_id
        self.session_id = spec["session_id"]
        self.init_pid = int(spec["init_pid"])
        self.host_uid = spec["host_uid"]
        self.host_gid = spec["host_gid"]
        self.namespaces = {k: int(v) for k, v in spec["namespaces"].items()}
        self.tmpfs_bytes = int(spec["tmpfs_bytes"])
        self.cgroup = _cgroup_from_spec(spec["cgroup"])
        self.root_fd = root_fd
        self.timeout = float(timeout)
        (self.oom_guarded, self.oom_contained, self.oom_fallback, self.oom_contain_us,
         self.oom_over_cap_bytes) = spec["oom"]

    def oom_evidence(self) -> dict:
        """The daemon's OOM facts (sent with the job) and the kill count read now, by the
        daemon's own code (Sandbox.oom_evidence) on this object."""
        from agent.sandbox.engine import Sandbox

        return Sandbox.oom_evidence(self)  # type: ignore[arg-type]

    def detach_root_mount(self) -> None:
        """Called from step 2's worker thread: the daemon detaches (its cleanup stack),
        then our copy of the root fd is closed too."""
        trio.from_thread.run(self._link.call, self._job, "detach_root_mount")
        self.close_root()

    def close_root(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    async def kill_init(self) -> None:
        """SIGKILL and reap PID 1: the daemon's child, so the daemon does it (bounded by
        the context's timeout there; step 3 bounds its wait here by the same)."""
        if not await self._link.call(self._job, "kill_init", self.timeout):
            raise OwnerCallFailed("init not reaped in time")

    async def remove_cgroup(self) -> None:
        await self._link.call(self._job, "remove_cgroup")

    async def release_slot(self) -> None:
        await self._link.call(self._job, "release_slot")

    async def retire_hostname(self) -> None:
        await self._link.call(self._job, "retire_hostname")


@dataclass
class _RemoteKey:
    link: _Link
    job: int

    async def key_step(self, ev: dict) -> None:
        from agent.destroy.context import StepError

        got, error = await self.link.call(self.job, "key_step")
        ev.update(got)
        if error is not None:
            raise StepError(str(error))


async def _run_job(link: _Link, job_id: int, payload: dict, fds: list[int]) -> None:
    from agent.destroy.context import DestroyContext, DestroyHooks
    from agent.destroy.pipeline import run_steps
    from agent.sandbox.engine import Sandbox

    sb = WorkerSandbox(link, job_id, payload["sandbox"], fds[0] if fds else -1,
                       payload["timeout"])
    for extra in fds[1:]:
        os.close(extra)
    fail = payload.get("fail_step")
    ctx = DestroyContext(
        # the same surface the steps use of a Sandbox (duck-typed: its methods that the
        # daemon owns are calls back, awaited through context.settle())
        sandbox=cast(Sandbox, sb), session=_JobFacts(**payload["session"]), session_key=None,
        passes=list(payload["passes"]), reason=payload["reason"], node_id=payload["node_id"],
        agent_version=payload["agent_version"],
        revoke=lambda: link.call(job_id, "revoke"),
        hooks=DestroyHooks(fail_step=fail) if fail is not None else None,
        timeout=float(payload["timeout"]), key_owner=_RemoteKey(link, job_id))
    _stop_point()
    try:
        st, _ = await run_steps(ctx)
        msg = ["done", job_id, {"evidence": st.evidence, "destroyed_at": st.destroyed_at,
                                "destroy_started": st.destroy_started,
                                "evidence_json": st.evidence_json}]
    except Exception as e:
        log.get().exception("destroy_worker_job_crashed", session_id=sb.session_id)
        msg = ["fail", job_id, type(e).__name__]
    finally:
        sb.close_root()
    await _send(link.sock, link.lock, msg)


def _stop_point() -> None:
    """Tests only (STOP_ENV=`destroy_worker.job`): the worker stops itself before its first
    job's steps, so a test can SIGKILL it mid-destruction at a known place (no real kernel
    kills a process at a chosen instruction)."""
    if os.environ.get(STOP_ENV) == "destroy_worker.job":
        os.kill(os.getpid(), signal.SIGSTOP)


async def _serve(fd: int) -> None:
    raw = socket.socket(fileno=fd)
    sock = trio.socket.from_stdlib_socket(raw)
    link = _Link(sock)
    frames = Frames()
    pending_fds: deque[int] = deque()
    await _send(sock, link.lock, ["hello", os.getpid()])
    async with trio.open_nursery() as nursery:
        while True:
            data, anc, _flags, _addr = await sock.recvmsg(
                1 << 16, socket.CMSG_SPACE(MAX_FDS * 4))
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(blob[:len(blob) - len(blob) % 4])
                    pending_fds.extend(a)
            if not data:
                break  # the daemon closed: finish the jobs in flight, then exit
            for msg in frames.feed(data):
                if msg[0] == "job":
                    fds = [pending_fds.popleft() for _ in range(int(msg[3]))]
                    nursery.start_soon(_run_job, link, msg[1], msg[2], fds)
                elif msg[0] == "ret":
                    link.answered(msg)


def _harden_worker() -> None:
    import resource

    import prctl

    from agent import hardening

    prctl.set_pdeathsig(signal.SIGKILL)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    hardening.harden()
    prctl.set_dumpable(False)
    prctl.set_name("nrx-destroy-w")


def main(argv: list[str]) -> int:
    args = dict(zip(argv[::2], argv[1::2], strict=False))
    fd = int(args["--fd"])
    parent = int(args.get("--parent", "0"))
    log.setup(args.get("--log-level", "info"))
    if os.geteuid() == 0:
        _harden_worker()
    if parent and os.getppid() != parent:
        return 1  # the daemon died before the death signal was armed
    trio.run(_serve, fd)
    return 0

