"""MessagePack-RPC wire shapes (SPEC 8): request `[0, msgid, method, [params]]`, response
`[1, msgid, error, result]`, notification `[2, method, [params]]`.

`Decoder` turns a byte stream into messages with a hard cap on the buffered size (a frame
over `max_frame_bytes` is a `ProtocolError`); `parse_request` checks a message's shape.
Anything that is not well-formed is a `ProtocolError`: the server closes that connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
MAX_MSGID = 2**32 - 1
FIRST_BUFFER = 64 * 1024
PACK_BUFFER = 4096

__all__ = ["MAX_MSGID", "NOTIFICATION", "REQUEST", "RESPONSE", "Decoder", "ProtocolError",
           "Request", "pack", "parse_request", "request", "response", "notification"]


class ProtocolError(Exception):
    """The peer sent bytes that are not valid MessagePack-RPC; the connection is closed."""


def pack(obj: Any, size_hint: int = 0) -> bytes:
    """msgpack's Packer starts with a 256 KiB buffer per call; with the daemon's wiping
    allocator every fresh buffer is filled on malloc and again on free, and every move of
    a growing one too.  So the buffer starts at the frame's likely size: `size_hint`
    (the bytes/str payload of the frame, see `_payload`) plus room for the envelope."""
    return msgpack.packb(obj, use_bin_type=True, buf_size=PACK_BUFFER + size_hint)


def _payload(obj: Any, depth: int = 2) -> int:
    """Bytes of the bytes/str values in `obj`, looking `depth` levels into maps and lists
    (an exec result's output, a notification's chunk): a size hint, never exact."""
    if isinstance(obj, (bytes, bytearray, memoryview, str)):
        return len(obj)
    if depth and isinstance(obj, dict):
        return sum(_payload(v, depth - 1) for v in obj.values())
    if depth and isinstance(obj, (list, tuple)):
        return sum(_payload(v, depth - 1) for v in obj)
    return 0


def request(msgid: int, method: str, params: dict) -> bytes:
    return pack([REQUEST, msgid, method, [params]], _payload(params))


def response(msgid: int, error: dict | None, result: Any) -> bytes:
    return pack([RESPONSE, msgid, error, result], _payload(result))


def notification(method: str, params: dict) -> bytes:
    return pack([NOTIFICATION, method, [params]], _payload(params))


class Decoder:
    """Incremental decoder.  `feed(data)` returns the complete messages now available.

    The Unpacker keeps every byte it was fed in its own buffer until it happens to be
    overwritten (consumed frames are not cleared), so a long-lived connection would keep
    old requests, customer input included, in memory.  Whenever all that was fed has been
    decoded, the Unpacker is replaced by a fresh one: the old buffer is freed, and the
    daemon's allocator overwrites freed memory (agent/memory_hygiene.py)."""

    def __init__(self, max_frame_bytes: int) -> None:
        self._max = max_frame_bytes
        self._unpacker = self._new()
        self._fed = 0  # bytes fed to the current Unpacker
        self._end = 0  # stream offset where its last complete message ended

    def _new(self) -> msgpack.Unpacker:
        # read_size is the first buffer's size (msgpack's default is 1 MiB, allocated and
        # overwritten twice per fresh Unpacker); it grows by doubling for larger frames
        return msgpack.Unpacker(raw=False, max_buffer_size=self._max, strict_map_key=True,
                                read_size=min(self._max, FIRST_BUFFER))

    def feed(self, data: bytes) -> list[Any]:
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull:
            raise ProtocolError("frame larger than the limit") from None
        self._fed += len(data)
        out = self._decode()
        # tell() alone is not enough: a partly parsed message advances it too
        if self._end == self._fed:  # nothing pending: drop the old buffer
            self._unpacker = self._new()
            self._fed = self._end = 0
        return out

    def _decode(self) -> list[Any]:
        out = []
        try:
            for msg in self._unpacker:
                out.append(msg)
                self._end = self._unpacker.tell()
        except msgpack.OutOfData:  # pragma: no cover - iteration stops on its own
            pass
        except Exception as e:  # FormatError, StackError, ValueError, TypeError …
            raise ProtocolError(f"malformed msgpack ({type(e).__name__})") from None
        return out


@dataclass
class Request:
    msgid: int | None  # None for a client notification
    method: str
    params: list


def parse_request(msg: Any) -> Request:
    """Check the envelope of an incoming message; the params list is checked later."""
    if not isinstance(msg, (list, tuple)) or not msg:
        raise ProtocolError("message is not an array")
    kind = msg[0]
    if kind == REQUEST:
        if len(msg) != 4:
            raise ProtocolError("request must have 4 elements")
        _, msgid, method, params = msg
        if isinstance(msgid, bool) or not isinstance(msgid, int) or not 0 <= msgid <= MAX_MSGID:
            raise ProtocolError("msgid must be an unsigned 32-bit integer")
    elif kind == NOTIFICATION:
        if len(msg) != 3:
            raise ProtocolError("notification must have 3 elements")
        msgid = None
        _, method, params = msg
    else:
        raise ProtocolError("only requests and notifications are accepted")
    if not isinstance(method, str):
        raise ProtocolError("method must be a string")
    if not isinstance(params, (list, tuple)):
        raise ProtocolError("params must be an array")
    return Request(msgid, method, list(params))
