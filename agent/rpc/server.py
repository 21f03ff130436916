"""The RPC listener (SPEC 8): a unix socket (mode and group from config), a SO_PEERCRED
check per connection, and per-connection concurrency.

Every request on a connection runs in its own task of the connection's nursery; replies
are matched by msgid and written under a lock so frames never interleave.  A protocol
error (oversized frame, malformed msgpack, wrong envelope) closes that connection only.
When the peer disconnects, its in-flight requests are cancelled (a running exec is
killed); work that must finish (create, destroy) shields itself in the service.
"""

from __future__ import annotations

import errno
import grp
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from agent.errors import ApiError, BadRequest, InternalError, Unauthorized
from agent.rpc import framing

__all__ = ["CallContext", "Peer", "RpcServer", "bind_unix_socket"]

_log = structlog.get_logger("nanorix-agent.rpc")  # lazy: resolved after log.setup()
READ_SIZE = 256 * 1024
FIRST_REQUEST_WAIT = 2.0
MAX_INFLIGHT = 256  # concurrent requests per connection before the server stops reading  # how long a refused peer gets to send the msgid we answer


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


@dataclass
class CallContext:
    """What a method handler gets besides its params."""

    msgid: int | None
    peer: Peer
    notify: Callable[[str, dict], Awaitable[None]]


Dispatch = Callable[[str, dict, CallContext], Awaitable[Any]]


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


class RpcServer:
    def __init__(self, dispatch: Dispatch, *, max_frame_bytes: int, allowed_uids: list[int],
                 allowed_gids: list[int]) -> None:
        self.dispatch = dispatch
        self.max_frame_bytes = max_frame_bytes
        self.allowed_uids = set(allowed_uids)
        self.allowed_gids = set(allowed_gids)
        self.connections = 0

    def allowed(self, peer: Peer) -> bool:
        if peer.uid in self.allowed_uids or peer.gid in self.allowed_gids:
            return True
        # SO_PEERCRED carries only the primary gid: a control-plane user that is in the
        # socket group as a supplementary group is found through /proc/PID/status
        return bool(self.allowed_gids) and bool(_supplementary_gids(peer.pid)
                                                 & self.allowed_gids)

    async def serve(self, sock: socket.socket, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        await trio.serve_listeners(self.handle_stream, [listener], task_status=task_status)

    # -- one connection ----------------------------------------------------------------
    async def handle_stream(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            try:
                peer = peer_credentials(stream.socket)
            except OSError:
                return
            if not self.allowed(peer):
                _log.warning("rpc_peer_refused", uid=peer.uid, gid=peer.gid, pid=peer.pid)
                await self._refuse(stream)
                return
            await _Connection(self, stream, peer).run()
        finally:
            self.connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """Answer Unauthorized to the first request (msgid 0 if none comes), then close."""
        msgid = 0
        decoder = framing.Decoder(self.max_frame_bytes)
        with trio.move_on_after(FIRST_REQUEST_WAIT):
            try:
                while True:
                    data = await stream.receive_some(READ_SIZE)
                    if not data:
                        break
                    msgs = decoder.feed(data)
                    if msgs:
                        try:
                            req = framing.parse_request(msgs[0])
                            msgid = req.msgid or 0
                        except framing.ProtocolError:
                            pass
                        break
            except (framing.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        err = Unauthorized("peer uid/gid is not allowed on this socket").to_wire()
        try:
            await stream.send_all(framing.response(msgid, err, None))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class _Connection:
    def __init__(self, server: RpcServer, stream: trio.SocketStream, peer: Peer) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.lock = trio.Lock()
        self.inflight = trio.Semaphore(MAX_INFLIGHT)
        self.log = _log.bind(peer_uid=peer.uid, peer_pid=peer.pid)

    async def send(self, data: bytes) -> None:
        async with self.lock:
            await self.stream.send_all(data)

    async def run(self) -> None:
        decoder = framing.Decoder(self.server.max_frame_bytes)
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    try:
                        data = await self.stream.receive_some(READ_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        break
                    for msg in decoder.feed(data):
                        req = framing.parse_request(msg)
                        if req.msgid is None:
                            self.log.info("rpc_notification_ignored")
                            continue
                        # bounded in-flight requests: a flooding client stops being read
                        await self.inflight.acquire()
                        nursery.start_soon(self.call, req)
            except framing.ProtocolError as e:
                self.log.warning("rpc_protocol_error", reason=str(e))
            except OSError as e:
                if e.errno not in (errno.ECONNRESET, errno.EPIPE):
                    raise
            # peer gone or misbehaving: cancel its in-flight requests (kills its execs)
            nursery.cancel_scope.cancel()

    async def call(self, req: framing.Request) -> None:
        try:
            await self._call(req)
        finally:
            self.inflight.release()

    async def _call(self, req: framing.Request) -> None:
        try:
            params = _single_map(req.params)
            ctx = CallContext(req.msgid, self.peer, self._notifier())
            result = await self.server.dispatch(req.method, params, ctx)
            frame = framing.response(req.msgid, None, result)
        except ApiError as e:
            frame = framing.response(req.msgid, e.to_wire(), None)
        except trio.Cancelled:
            raise
        except Exception:
            self.log.exception("rpc_internal_error", method=req.method)
            frame = framing.response(req.msgid, InternalError("internal error").to_wire(), None)
        try:
            await self.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _notifier(self):
        async def notify(method: str, params: dict) -> None:
            # a vanished peer is noticed by the reader, which cancels this request
            try:
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
