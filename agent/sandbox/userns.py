"""User namespace layer (SPEC 3.1): one host uid/gid range per live session.

Slot `n` owns host ids `[base + n*size, base + (n+1)*size)`; inside, 0..size-1 map onto
it, so the sandbox user (1000 inside) is `base + n*size + 1000` on the host and root
inside is not root outside.  The helper (the parent) writes the maps; see nrx-init.c.
"""

from __future__ import annotations

from dataclasses import dataclass

SANDBOX_ID = 1000  # uid/gid of the sandbox user inside


class SlotsExhausted(RuntimeError):
    """Every uid slot is held by a live session."""


@dataclass(frozen=True)
class IdRange:
    slot: int
    base: int  # host id of 0 inside
    size: int

    @property
    def sandbox_host_id(self) -> int:
        return self.base + SANDBOX_ID


class SlotAllocator:
    """Hands out the lowest free slot; a slot is unique among live sessions."""

    def __init__(self, base: int, size: int, count: int) -> None:
        self.base, self.size, self.count = base, size, count
        self._used: set[int] = set()

    def allocate(self) -> IdRange:
        for slot in range(self.count):
            if slot not in self._used:
                return self.reserve(slot)
        raise SlotsExhausted(f"all {self.count} uid slots are in use")

    def reserve(self, slot: int) -> IdRange:
        """Mark a slot used (allocation, or recovery of a session found after a restart)."""
        if not 0 <= slot < self.count or slot in self._used:
            raise ValueError(f"uid slot {slot} is not free")
        self._used.add(slot)
        return IdRange(slot, self.base + slot * self.size, self.size)

    def release(self, slot: int) -> None:
        self._used.discard(slot)

    def in_use(self) -> set[int]:
        return set(self._used)


def read_map(pid: int, which: str = "uid") -> list[tuple[int, int, int]]:
    """The (inside, outside, count) lines of /proc/PID/{uid,gid}_map."""
    with open(f"/proc/{pid}/{which}_map") as f:
        rows = []
        for line in f:
            if line.strip():
                inside, outside, count = (int(x) for x in line.split())
                rows.append((inside, outside, count))
        return rows
