"""A small blocking MessagePack-RPC client over the agent's unix socket (used by the CLI),
or over TCP with mutual TLS to a `[remote]` listener (`Client.tls`, docs/remote.md).

`call(method, params, on_notify=None)` sends one request and reads until the response
with the same msgid, handing every notification (e.g. `exec.output`) to `on_notify`.
An error response raises the matching `agent.errors` class.
"""

from __future__ import annotations

import itertools
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from agent.errors import BY_NAME, ApiError
from agent.rpc import framing

__all__ = ["Client", "ConnectionLost", "default_socket"]

DEFAULT_SOCKET = Path("/run/nanorix-agent/agent.sock")


class ConnectionLost(ConnectionError):
    """The agent closed the connection before answering."""


def default_socket() -> Path:
    return Path(os.environ.get("NANORIX_AGENT_SOCKET") or DEFAULT_SOCKET)


def error_from_wire(err: Any) -> ApiError:
    if isinstance(err, dict):
        cls: type[ApiError] = BY_NAME.get(str(err.get("error")), ApiError)
        e = cls(str(err.get("message", "")), field=err.get("field"))
        return e
    return ApiError(f"malformed error: {err!r}")


class Client:
    def __init__(self, path: Path | str | None = None, *, timeout: float | None = None,
                 max_buffer: int = 64 * 1024 * 1024, sock: socket.socket | None = None) -> None:
        if sock is None:
            self.path = str(path or default_socket())
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
        self.sock = sock
        self.unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max_buffer)
        self._ids = itertools.count(1)

    @classmethod
    def tls(cls, host: str, port: int, *, cert: Path | str, key: Path | str,
            ca: Path | str, server_name: str | None = None,
            timeout: float | None = None) -> Client:
        """Connect to a `[remote]` listener: TLS 1.3, our certificate `cert`/`key`, the
        agent's certificate checked against `ca` and `server_name` (default `host`)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(str(cert), str(key))
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            sock = ctx.wrap_socket(raw, server_hostname=server_name or host)
        except BaseException:
            raw.close()
            raise
        return cls(sock=sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method: str, params: dict | None = None,
             on_notify: Callable[[str, dict], None] | None = None) -> Any:
        msgid = next(self._ids)
        self.sock.sendall(framing.request(msgid, method, params or {}))
        while True:
            msg = self._next()
            if msg[0] == framing.NOTIFICATION:
                if on_notify is not None:
                    args = msg[2]
                    on_notify(msg[1], args[0] if args else {})
                continue
            if msg[0] == framing.RESPONSE and msg[1] in (msgid, 0):
                if msg[2] is not None:
                    raise error_from_wire(msg[2])
                return msg[3]

    def _next(self) -> list:
        while True:
            try:
                return next(self.unpacker)
            except StopIteration:
                pass
            data = self.sock.recv(256 * 1024)
            if not data:
                raise ConnectionLost("the agent closed the connection")
            self.unpacker.feed(data)
