"""The RPC listeners (SPEC 8, docs/remote.md): the local unix socket (mode and group from
config, SO_PEERCRED per connection) and the optional TCP listener with mutual TLS 1.3
(`[remote]`).  Both serve the same MessagePack-RPC through `_Connection` with the same
limits, all from `[rpc]` config:

- connections: one cap for both listeners together, lowered at start so the fd limit
  keeps headroom for sessions and destruction (`effective_max_connections`); a peer over
  the cap gets `Unavailable` (unix) or a closed socket (TCP) at once.  An accept that
  fails for lack of fds/memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) backs off (10 ms
  doubling to 1 s) and marks the gate `accept_starved` (agent.health turns degraded)
  until an accept succeeds again;
- per connection: an idle timeout (no request in flight and nothing received), at most
  `max_inflight_requests` requests and `max_inflight_bytes` of request frames plus
  answers waiting to be sent (beyond either the connection is not read), and a send
  timeout (a frame the peer does not take in time ends that connection);
- a refused unix peer gets `Unauthorized` (msgid 0) before any of its bytes is decoded;
  a refused TLS client fails the handshake (no/foreign/expired certificate) or gets
  `Unauthorized` right after it (name not in `allowed_clients`).  Both are logged with
  who the peer is, never with what it sent.

Every request on a connection runs in its own task of the connection's nursery; replies
are matched by msgid and written under a lock so frames never interleave.  A protocol
error (oversized frame, malformed msgpack, wrong envelope) closes that connection only.
When the peer disconnects, its in-flight requests are cancelled (a running exec is
killed); work that must finish (create, destroy) shields itself in the service.

Why an own accept loop instead of `trio.serve_listeners`: that one logs and sleeps 100 ms
on EMFILE with no way to tell health, and has no connection cap.
"""

from __future__ import annotations

import errno
import grp
import os
import resource
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from agent.errors import ApiError, BadRequest, InternalError, Unauthorized, Unavailable
from agent.rpc import framing

__all__ = ["CallContext", "ConnectionGate", "Limits", "Peer", "RemoteListener", "RpcServer",
           "TlsPeer", "bind_unix_socket", "effective_max_connections"]

_log = structlog.get_logger("nanorix-agent.rpc")  # lazy: resolved after log.setup()
READ_SIZE = 64 * 1024
REFUSE_DISCARD_BYTES = 64 * 1024  # a refused unix peer's bytes thrown away (never decoded)
REFUSE_DISCARD_SECONDS = 0.5  # so it reads our answer instead of a reset
ANSWER_RESERVE = 64 * 1024  # budget each request holds at least, for the answer it will get
CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX = 0.01, 1.0


@dataclass(frozen=True)
class Peer:
    """A unix-socket peer (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True)
class TlsPeer:
    """A TLS client: its address and the certificate name that admitted it."""

    address: str
    subject: str
    name: str


@dataclass
class CallContext:
    """What a method handler gets besides its params."""

    msgid: int | None
    peer: Peer | TlsPeer
    notify: Callable[[str, dict], Awaitable[None]]
    limits: Limits | None = None


Dispatch = Callable[[str, dict, CallContext], Awaitable[Any]]


@dataclass(frozen=True)
class Limits:
    """Per-connection bounds, the same on every listener (from `[rpc]`)."""

    max_frame_bytes: int = 16 * 1024 * 1024
    max_inflight_requests: int = 256
    max_inflight_bytes: int = 64 * 1024 * 1024
    idle_timeout: float = 300.0
    send_timeout: float = 30.0
    stream_queue_bytes: int = 4 * 1024 * 1024
    stream_stall_seconds: float = 5.0
    max_array_len: int = 65536
    max_map_len: int = 4096
    max_containers: int = 100_000

    @classmethod
    def from_config(cls, rpc) -> Limits:
        return cls(max_frame_bytes=rpc.max_frame_bytes,
                   max_inflight_requests=rpc.max_inflight_requests,
                   max_inflight_bytes=rpc.max_inflight_bytes,
                   idle_timeout=rpc.idle_timeout_seconds, send_timeout=rpc.send_timeout_seconds,
                   stream_queue_bytes=rpc.stream_queue_bytes,
                   stream_stall_seconds=rpc.stream_stall_seconds, max_array_len=rpc.max_array_len,
                   max_map_len=rpc.max_map_len, max_containers=rpc.max_containers)

    def decoder(self) -> framing.Decoder:
        return framing.Decoder(self.max_frame_bytes, max_array_len=self.max_array_len,
                               max_map_len=self.max_map_len,
                               max_containers=self.max_containers)


def effective_max_connections(rpc, max_sessions: int, nofile: int | None = None) -> int:
    """The connection cap actually used: `rpc.max_connections`, lowered so that the fds
    left under RLIMIT_NOFILE cover `fd_reserve + fd_reserve_per_session * max_sessions`
    (sessions, destruction, journal, spool) and never below 16."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            nofile = 1 << 20
    room = nofile - rpc.fd_reserve - rpc.fd_reserve_per_session * max_sessions
    cap = max(16, min(rpc.max_connections, room))
    if cap < rpc.max_connections:
        _log.warning("rpc_connection_cap_lowered", configured=rpc.max_connections,
                     effective=cap, nofile=nofile, max_sessions=max_sessions)
    return cap


class ConnectionGate:
    """The connection count and cap shared by every listener, and the accept health."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.connections = 0
        self.refused_at_cap = 0
        self.accept_starved = False
        self.accept_errors = 0
        self.idle_closed = 0
        # the health monitor's fault(): out of fds/memory flips an engine at once (the
        # daemon sets it once health runs); its self-test heals it when the condition clears
        self.on_starved: Callable[[str], None] | None = None

    def try_enter(self) -> bool:
        if self.connections >= self.max_connections:
            self.refused_at_cap += 1
            if self.refused_at_cap == 1 or self.refused_at_cap % 1000 == 0:
                _log.warning("rpc_connection_cap", max_connections=self.max_connections,
                             refused_total=self.refused_at_cap)
            return False
        self.connections += 1
        return True

    def leave(self) -> None:
        self.connections -= 1

    def starved(self, err: OSError) -> None:
        self.accept_errors += 1
        if not self.accept_starved:
            self.accept_starved = True
            code = err.errno or 0
            name = errno.errorcode.get(code, str(code))
            _log.error("rpc_accept_starved", errno=name, connections=self.connections)
            if self.on_starved is not None:
                self.on_starved(f"accepting connections fails with {name}")

    def fed(self) -> None:
        if self.accept_starved:
            self.accept_starved = False
            _log.warning("rpc_accept_recovered", connections=self.connections)

    def status(self) -> dict:
        return {"connections": self.connections, "max_connections": self.max_connections,
                "accept_starved": self.accept_starved, "refused_at_cap": self.refused_at_cap,
                "accept_errors": self.accept_errors, "idle_closed": self.idle_closed}


async def accept_loop(listen_sock: trio.socket.SocketType, gate: ConnectionGate,
                      handle: Callable[[trio.socket.SocketType, Any], Awaitable[None]],
                      refuse: Callable[[trio.socket.SocketType], None]) -> None:
    """Accept until cancelled: over-cap peers are refused at once, capacity errors back
    off and mark the gate starved, every other accepted socket runs `handle` in its task."""
    backoff = ACCEPT_BACKOFF_MIN
    async with trio.open_nursery() as nursery:
        while True:
            try:
                sock, addr = await listen_sock.accept()
            except OSError as e:
                if e.errno not in CAPACITY_ERRNOS:
                    raise
                gate.starved(e)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                continue
            backoff = ACCEPT_BACKOFF_MIN
            gate.fed()
            if not gate.try_enter():
                try:
                    refuse(sock)
                finally:
                    sock.close()
                continue
            nursery.start_soon(_guarded, gate, handle, sock, addr)


async def _guarded(gate: ConnectionGate, handle, sock, addr) -> None:
    try:
        await handle(sock, addr)
    finally:
        gate.leave()
        sock.close()


# -- unix socket -------------------------------------------------------------------------

def peer_credentials(sock) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def _supplementary_gids(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def socket_gid(group: str) -> int | None:
    """gid of the configured socket group, or None when the group does not exist."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


def bind_unix_socket(path: Path, *, mode: int, group: str | None) -> socket.socket:
    """Create the listening socket: parent dir 0755, stale socket replaced, mode/group set
    before listen() so no client ever sees a wider mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)  # stale socket of a dead agent
        else:
            raise RuntimeError(f"another agent is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    gid = socket_gid(group) if group else None
    os.chown(path, -1, gid if gid is not None else -1)
    os.chmod(path, mode)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _send_nowait(sock, data: bytes) -> None:
    try:
        os.write(sock.fileno(), data)  # a fresh non-blocking socket takes a small frame
    except OSError:
        pass


class RpcServer:
    """The unix-socket listener and the owner of the shared gate and limits."""

    def __init__(self, dispatch: Dispatch, *, max_frame_bytes: int | None = None,
                 allowed_uids: list[int], allowed_gids: list[int],
                 limits: Limits | None = None, gate: ConnectionGate | None = None) -> None:
        self.dispatch = dispatch
        if limits is None:
            limits = Limits(max_frame_bytes=max_frame_bytes or Limits.max_frame_bytes)
        self.limits = limits
        self.gate = gate or ConnectionGate(512)
        self.allowed_uids = set(allowed_uids)
        self.allowed_gids = set(allowed_gids)

    @property
    def connections(self) -> int:
        return self.gate.connections

    def allowed(self, peer: Peer) -> bool:
        if peer.uid in self.allowed_uids or peer.gid in self.allowed_gids:
            return True
        # SO_PEERCRED carries only the primary gid: a control-plane user that is in the
        # socket group as a supplementary group is found through /proc/PID/status
        return bool(self.allowed_gids) and bool(_supplementary_gids(peer.pid)
                                                 & self.allowed_gids)

    async def serve(self, sock: socket.socket, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listen_sock = trio.socket.from_stdlib_socket(sock)
        task_status.started()
        await accept_loop(listen_sock, self.gate, self._handle, self._refuse_over_cap)

    def _refuse_over_cap(self, sock) -> None:
        err = Unavailable(f"too many connections (max {self.gate.max_connections})")
        _send_nowait(sock, framing.response(0, err.to_wire(), None))

    async def _handle(self, sock, addr) -> None:
        stream = trio.SocketStream(sock)
        try:
            try:
                peer = peer_credentials(sock)
            except OSError:
                return
            if not self.allowed(peer):
                _log.warning("rpc_peer_refused", uid=peer.uid, gid=peer.gid, pid=peer.pid)
                await self._refuse(stream)
                return
            await _Connection(self, stream, peer, _log.bind(peer_uid=peer.uid,
                                                            peer_pid=peer.pid)).run()
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """Answer Unauthorized (msgid 0) before decoding anything the peer sent, then
        discard at most REFUSE_DISCARD_BYTES for REFUSE_DISCARD_SECONDS so that closing
        does not turn into a reset that hides the answer from the peer."""
        err = Unauthorized("peer uid/gid is not allowed on this socket").to_wire()
        try:
            with trio.move_on_after(REFUSE_DISCARD_SECONDS):
                await stream.send_all(framing.response(0, err, None))
                await stream.send_eof()
                taken = 0
                while taken < REFUSE_DISCARD_BYTES:
                    data = await stream.receive_some(REFUSE_DISCARD_BYTES - taken)
                    if not data:
                        break
                    taken += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


# -- TCP + mutual TLS -------------------------------------------------------------------

def _subject_name(cert: dict) -> str:
    parts = []
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            parts.append(f"{ {'commonName': 'CN', 'organizationName': 'O'}.get(k, k)}={v}")
    return ",".join(parts)


def cert_names(cert: dict) -> list[str]:
    """The names a client certificate can be listed by: subject CN, DNS and URI SANs."""
    names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    names += [v for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "URI")]
    return names


def _tls_refusal_reason(exc: BaseException) -> str:
    """The OpenSSL reason for a failed handshake, without any request data."""
    cur: BaseException | None = exc
    while cur is not None:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return cur.verify_message or cur.reason or "certificate verify failed"
        if isinstance(cur, ssl.SSLError):  # e.g. PEER_DID_NOT_RETURN_A_CERTIFICATE
            return (cur.reason or type(cur).__name__).replace("_", " ").lower()
        cur = cur.__cause__ or cur.__context__
    return type(exc).__name__


class RemoteListener:
    """The `[remote]` listener: TCP with TLS 1.3 and mandatory client certificates,
    serving the same RPC as the unix socket.  `reload()` re-reads cert, key and client CA
    for new connections (live ones keep the context they were accepted with)."""

    def __init__(self, server: RpcServer, remote_cfg) -> None:
        self.server = server
        self.cfg = remote_cfg
        self.allowed = set(remote_cfg.allowed_clients)
        self.context = self._build_context()
        self.sock: socket.socket | None = None
        self.reloads = 0

    # -- certificates ------------------------------------------------------------------
    def _key_path(self) -> Path:
        if self.cfg.key_credential:
            creds = os.environ.get("CREDENTIALS_DIRECTORY")
            if not creds:
                raise RuntimeError("remote.key_credential is set but $CREDENTIALS_DIRECTORY "
                                   "is not")
            return Path(creds) / self.cfg.key_credential
        return Path(self.cfg.key)

    def _build_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(str(self.cfg.cert), str(self._key_path()))
        ctx.load_verify_locations(cafile=str(self.cfg.client_ca))
        ctx.options |= ssl.OP_NO_TICKET  # every connection shows its certificate again
        return ctx

    def reload(self) -> bool:
        """Re-read cert, key and client CA (SIGHUP).  On an error the old context stays
        and the error is logged; live connections are never touched."""
        try:
            ctx = self._build_context()
        except (OSError, ssl.SSLError, RuntimeError) as e:
            _log.error("rpc_remote_reload_failed", error=type(e).__name__,
                       reason=getattr(e, "reason", None) or getattr(e, "strerror", None))
            return False
        self.context = ctx
        self.reloads += 1
        _log.info("rpc_remote_reloaded", reloads=self.reloads)
        return True

    # -- listening ---------------------------------------------------------------------
    def bind(self) -> socket.socket:
        from agent.config import parse_listen

        host, port = parse_listen(self.cfg.listen)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
        self.sock = sock
        return sock

    @property
    def address(self) -> tuple[str, int]:
        assert self.sock is not None, "bind() first"
        return self.sock.getsockname()[:2]

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = self.sock or self.bind()
        listen_sock = trio.socket.from_stdlib_socket(sock)
        _log.info("rpc_remote_listening", address=f"{self.address[0]}:{self.address[1]}",
                  allowed_clients=len(self.allowed))
        task_status.started()
        await accept_loop(listen_sock, self.server.gate, self._handle, lambda s: None)

    def _keepalive(self, sock) -> None:
        c = self.cfg
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, c.keepalive_idle_seconds)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, c.keepalive_interval_seconds)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, c.keepalive_probes)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def _handle(self, sock, addr) -> None:
        address = f"{addr[0]}:{addr[1]}"
        try:
            self._keepalive(sock)
        except OSError:
            return
        stream = trio.SSLStream(trio.SocketStream(sock), self.context, server_side=True)
        try:
            await self._serve_tls(stream, address)
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    await stream.aclose()

    async def _serve_tls(self, stream: trio.SSLStream, address: str) -> None:
        try:
            with trio.fail_after(self.cfg.handshake_timeout_seconds):
                await stream.do_handshake()
        except trio.TooSlowError:
            _log.warning("rpc_remote_refused", peer=address, subject=None,
                         reason="handshake timed out")
            return
        except (trio.BrokenResourceError, OSError) as e:
            # no certificate, another CA, expired, not a TLS 1.3 client: OpenSSL stopped it
            # before any request; the certificate is not available to Python after a
            # failed verification, so the log has the reason instead of the subject
            _log.warning("rpc_remote_refused", peer=address, subject=None,
                         reason=_tls_refusal_reason(e))
            return
        cert = stream.getpeercert() or {}
        subject = _subject_name(cert)
        names = cert_names(cert)
        matched = next((n for n in names if n in self.allowed), None)
        if self.allowed and matched is None:
            _log.warning("rpc_remote_refused", peer=address, subject=subject,
                         reason="certificate name not in remote.allowed_clients")
            err = Unauthorized("client certificate is not in remote.allowed_clients")
            with trio.move_on_after(REFUSE_DISCARD_SECONDS):
                try:
                    await stream.send_all(framing.response(0, err.to_wire(), None))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            return
        peer = TlsPeer(address, subject, matched or (names[0] if names else subject))
        log = _log.bind(peer=address, subject=subject)
        log.info("rpc_remote_accepted")
        await _Connection(self.server, stream, peer, log).run()
        log.info("rpc_remote_closed")


# -- one connection, either listener -----------------------------------------------------

class _ByteBudget:
    """Bytes a connection holds: each request from when it is read until its answer is
    sent.  Only the reader waits for room (so nothing can wait on itself); an answer that
    turns out larger than its request's share is charged at once (it exists already), and
    the reader stops until it is sent.  An amount larger than the whole budget is taken
    when nothing else is held."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self._changed = trio.Event()

    async def acquire(self, n: int) -> int:
        n = min(n, self.cap)
        while self.used + n > self.cap:
            await self._changed.wait()
        self.used += n
        return n

    def charge(self, n: int) -> int:
        self.used += n
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self._changed.set()
        self._changed = trio.Event()


class _Connection:
    def __init__(self, server: RpcServer, stream, peer: Peer | TlsPeer, log) -> None:
        self.server = server
        self.limits = server.limits
        self.stream = stream
        self.peer = peer
        self.lock = trio.Lock()
        self.inflight = trio.Semaphore(self.limits.max_inflight_requests)
        self.budget = _ByteBudget(self.limits.max_inflight_bytes)
        self.active = 0
        self.log = log
        self.scope: trio.CancelScope | None = None

    async def send(self, data: bytes) -> None:
        """One frame, whole, within the send timeout; a peer that does not take it in
        time (or a cancelled partial write) ends the connection."""
        rest = self._send_now(data)
        if not rest:
            return
        async with self.lock:
            with trio.move_on_after(self.limits.send_timeout) as cs:
                try:
                    await self.stream.send_all(rest)
                except trio.Cancelled:
                    # part of the frame may be out: the stream is unusable either way.
                    # (Once _abort cancels the connection's scope, that outer scope is the
                    # one that catches this, so the timeout is logged here.)
                    if cs.cancel_called:
                        self.log.warning("rpc_send_timeout", seconds=self.limits.send_timeout)
                    self._abort()
                    raise
            if cs.cancelled_caught:  # not reached while _abort has a scope to cancel
                raise trio.BrokenResourceError("peer did not read in time")

    def _send_now(self, data: bytes) -> bytes | memoryview:
        """Write what the socket takes at once, without a trip through the scheduler (a
        reply usually fits the socket buffer whole); returns what is left for send().
        Only on a plain socket and while no other frame is being sent (no await between
        the check and the write, so frames never interleave)."""
        stream = self.stream
        if self.lock.locked() or not isinstance(stream, trio.SocketStream):
            return data
        fd = stream.socket.fileno()
        if fd < 0:
            return data  # closed: send() raises as before
        try:
            n = os.write(fd, data)
        except BlockingIOError:
            return data
        except OSError as e:
            raise trio.BrokenResourceError(f"peer gone: {e}") from None
        return memoryview(data)[n:] if n < len(data) else b""

    def _abort(self) -> None:
        if self.scope is not None:
            self.scope.cancel()

    async def run(self) -> None:
        decoder = None  # made when bytes come, dropped between frames (memory per idle peer)
        idle = self.limits.idle_timeout
        async with trio.open_nursery() as nursery:
            self.scope = nursery.cancel_scope
            try:
                while True:
                    with trio.move_on_after(idle) as cs:
                        try:
                            data = await self.stream.receive_some(READ_SIZE)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            data = b""
                    if cs.cancelled_caught:
                        if self.active:
                            continue
                        self.server.gate.idle_closed += 1
                        self.log.info("rpc_idle_closed", seconds=idle)
                        break
                    if not data:
                        break
                    if decoder is None:
                        decoder = self.limits.decoder()
                    msgs = decoder.feed(data)
                    sizes = decoder.sizes
                    del data
                    if decoder.empty:
                        decoder = None
                    for msg, size in zip(msgs, sizes, strict=True):
                        req = framing.parse_request(msg)
                        if req.msgid is None:
                            self.log.info("rpc_notification_ignored")
                            continue
                        # bounded in-flight requests and bytes: a flooding client stops
                        # being read
                        try:  # no trip through the scheduler when there is room
                            self.inflight.acquire_nowait()
                        except trio.WouldBlock:
                            await self.inflight.acquire()
                        # the frame's own size as read (re-packing the params to size it
                        # cost a full copy of every request's input)
                        held = await self.budget.acquire(max(size, ANSWER_RESERVE))
                        self.active += 1
                        nursery.start_soon(self.call, req, held)
            except framing.ProtocolError as e:
                self.log.warning("rpc_protocol_error", reason=str(e))
            except OSError as e:
                if e.errno not in (errno.ECONNRESET, errno.EPIPE):
                    raise
            # peer gone or misbehaving: cancel its in-flight requests (kills its execs)
            nursery.cancel_scope.cancel()

    async def call(self, req: framing.Request, held: int) -> None:
        try:
            await self._call(req, held)
        finally:
            self.active -= 1
            self.inflight.release()

    async def _call(self, req: framing.Request, held: int) -> None:
        try:
            await self._answer(req, held)
        finally:
            self.budget.release(held)

    async def _answer(self, req: framing.Request, held: int) -> None:
        msgid = req.msgid
        assert msgid is not None  # the read loop drops notifications before they get here
        try:
            params = _single_map(req.params)
            req.params = []  # the handler's copy is the only one kept
            ctx = CallContext(msgid, self.peer, self._notifier(), self.limits)
            result = await self.server.dispatch(req.method, params, ctx)
            frame = framing.response(msgid, None, result)
        except ApiError as e:
            frame = framing.response(msgid, e.to_wire(), None)
        except trio.Cancelled:
            raise
        except Exception:
            self.log.exception("rpc_internal_error", method=req.method)
            frame = framing.response(msgid, InternalError("internal error").to_wire(), None)
        extra = self.budget.charge(max(0, len(frame) - held))
        try:
            await self.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.budget.release(extra)

    def _notifier(self):
        async def notify(method: str, params: dict) -> None:
            # a vanished peer is noticed by the reader, which cancels this request
            try:
                # bounded by the exec's stream queue (`stream_queue_bytes`), not the budget
                await self.send(framing.notification(method, params))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return notify


def _single_map(params: list) -> dict:
    if not params:
        return {}
    if len(params) != 1 or not isinstance(params[0], dict):
        raise BadRequest("params must be a list holding one map", field="params")
    return params[0]
