"""Bounded capture of one output stream (SPEC 4): the head and the tail are kept, the
middle is counted and replaced by a marker.  Memory stays below the cap whatever the
command prints.

The capture owns its buffers and overwrites them (`wipe`) when the exec is over: the head
only grows at its end, and the tail is a ring of fixed size allocated once, so no byte of
the output is ever left behind in a part of a buffer that Python no longer shows (as
deleting from the front of a bytearray would, which only moves its start).
"""

from __future__ import annotations


def zero(buf: bytearray) -> int:
    """Overwrite `buf` with zeros in place; returns its length."""
    n = len(buf)
    if n:
        memoryview(buf)[:] = bytes(n)
    return n


class Capture:
    """Keeps the first `cap // 2` bytes and the last `cap - cap // 2` bytes."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.ring = bytearray()  # tail_cap bytes once the head is full and more came
        self.ring_pos = 0  # where the next tail byte goes
        self.ring_len = 0  # tail bytes held (<= tail_cap)
        self.total = 0

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.total += len(view)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += view[:room]
            view = view[room:]
        if not view or not self.tail_cap:
            return
        if not self.ring:
            self.ring = bytearray(self.tail_cap)
        if len(view) >= self.tail_cap:
            self.ring[:] = view[-self.tail_cap:]
            self.ring_pos, self.ring_len = 0, self.tail_cap
            return
        first = min(len(view), self.tail_cap - self.ring_pos)
        self.ring[self.ring_pos:self.ring_pos + first] = view[:first]
        rest = len(view) - first
        if rest:
            self.ring[:rest] = view[first:]
        self.ring_pos = (self.ring_pos + len(view)) % self.tail_cap
        self.ring_len = min(self.tail_cap, self.ring_len + len(view))

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def _tail(self) -> bytes:
        if self.ring_len < self.tail_cap:
            return bytes(self.ring[:self.ring_len])
        return bytes(self.ring[self.ring_pos:]) + bytes(self.ring[:self.ring_pos])

    def result(self) -> bytes:
        if not self.truncated:
            return bytes(self.head) + self._tail()
        dropped = self.total - len(self.head) - self.ring_len
        marker = f"\n[... {dropped} bytes truncated ...]\n".encode()
        return bytes(self.head) + marker + self._tail()

    def wipe(self) -> int:
        """Overwrite both buffers with zeros; returns the bytes overwritten."""
        n = zero(self.head) + zero(self.ring)
        self.ring_pos = self.ring_len = 0
        return n
