"""Bounded capture of one output stream (SPEC 4): the head and the tail are kept, the
middle is counted and replaced by a marker.  Memory stays below the cap whatever the
command prints."""

from __future__ import annotations


class Capture:
    """Keeps the first `cap // 2` bytes and the last `cap - cap // 2` bytes."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            if len(data) >= self.tail_cap:
                self.tail[:] = data[-self.tail_cap:]
            else:
                self.tail += data
                extra = len(self.tail) - self.tail_cap
                if extra > 0:
                    del self.tail[:extra]

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def result(self) -> bytes:
        if not self.truncated:
            return bytes(self.head + self.tail)
        dropped = self.total - len(self.head) - len(self.tail)
        marker = f"\n[... {dropped} bytes truncated ...]\n".encode()
        return bytes(self.head) + marker + bytes(self.tail)
