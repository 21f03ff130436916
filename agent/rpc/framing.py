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
FIRST_BUFFER = 16 * 1024
PACK_BUFFER = 4096

__all__ = ["MAX_MSGID", "NOTIFICATION", "REQUEST", "RESPONSE", "Decoder", "ProtocolError",
           "Request", "pack", "parse_request", "request", "response", "notification"]


class ProtocolError(Exception):
    """The peer sent bytes that are not valid MessagePack-RPC; the connection is closed."""


def pack(obj: Any) -> bytes:
    """msgpack's Packer starts with a 256 KiB buffer per call; with the daemon's wiping
    allocator every fresh buffer is filled on malloc and again on free, and every move of
    a growing one too.  So the buffer starts at the frame's likely size: its bytes/str
    payload (`_payload`) plus room for the envelope."""
    return msgpack.packb(obj, use_bin_type=True, buf_size=PACK_BUFFER + _payload(obj))


def _payload(obj: Any, depth: int = 4) -> int:
    """Bytes of the bytes/str values in `obj`, looking `depth` levels into maps and lists
    (a frame's params or result, an exec's output, a notification's chunk): a size hint,
    never exact."""
    if isinstance(obj, (bytes, bytearray, memoryview, str)):
        return len(obj)
    if depth and isinstance(obj, dict):
        return sum(_payload(v, depth - 1) for v in obj.values())
    if depth and isinstance(obj, (list, tuple)):
        return sum(_payload(v, depth - 1) for v in obj)
    return 0


def request(msgid: int, method: str, params: dict) -> bytes:
    return pack([REQUEST, msgid, method, [params]])


def response(msgid: int, error: dict | None, result: Any) -> bytes:
    return pack([RESPONSE, msgid, error, result])


def notification(method: str, params: dict) -> bytes:
    return pack([NOTIFICATION, method, [params]])


class Decoder:
    """Incremental decoder.  `feed(data)` returns the complete messages now available.

    The Unpacker keeps every byte it was fed in its own buffer until it happens to be
    overwritten (consumed frames are not cleared), so a decoder kept for a long-lived
    connection would keep old requests, customer input included, in memory.  Its owner
    drops it whenever `empty` (the server does, agent/rpc/server.py): the buffer is freed,
    and the daemon's allocator overwrites freed memory (agent/memory_hygiene.py)."""

    def __init__(self, max_frame_bytes: int, *, max_array_len: int = 65536,
                 max_map_len: int = 4096, max_containers: int = 100_000) -> None:
        # the limits are checked while decoding: an array or map header over its length
        # limit fails at once, and a message holding more than `max_containers` arrays and
        # maps in all (16 MiB of empty maps would be 16 M dicts, ~1.2 GiB) fails at the
        # first one too many, before the rest is built
        self._containers, self._max_containers = 0, max_containers
        # read_size is the first buffer's size (msgpack's default is 1 MiB, allocated and
        # filled on malloc and on free under the wiping allocator); it doubles as needed
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max_frame_bytes,
                                          strict_map_key=True, max_array_len=max_array_len,
                                          max_map_len=max_map_len, object_hook=self._count,
                                          list_hook=self._count,
                                          read_size=min(max_frame_bytes, FIRST_BUFFER))
        self._fed = self._boundary = 0  # bytes fed; stream offset after the last message
        self.sizes: list[int] = []  # wire bytes of each message the last feed() returned

    def _count(self, obj: Any) -> Any:
        self._containers += 1
        if self._containers > self._max_containers:
            raise ValueError("too many arrays and maps in one message")
        return obj

    @property
    def empty(self) -> bool:
        """Every byte fed belongs to a complete message (the Unpacker parses partial data
        into its own state, so its buffer alone cannot say): the owner may drop this
        decoder until more bytes come (an Unpacker costs ~40 KiB)."""
        return self._boundary == self._fed

    def feed(self, data: bytes) -> list[Any]:
        try:
            self._unpacker.feed(data)
            self._fed += len(data)
        except msgpack.BufferFull:
            raise ProtocolError("frame larger than the limit") from None
        out = []
        self.sizes = []
        try:
            for msg in self._unpacker:
                out.append(msg)
                end = self._unpacker.tell()
                self.sizes.append(end - self._boundary)
                self._boundary = end
                self._containers = 0
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
