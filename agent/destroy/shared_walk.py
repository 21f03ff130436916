"""One host-wide /proc walk answers every destruction in flight (steps 5 and 6).

Each walk of every thread on the host costs the same whatever it looks for, and several
destructions at once each asked for their own.  `SharedWalk.ask(query)` queues the
question; whoever finds no walk running takes every question queued so far and answers
them with ONE walk for their union (the session uid/gid ranges and namespace inodes of
all of them together).  A union count of 0 is a 0 for each of them (a subset of nothing
is nothing).  When the union finds something, each question of that batch gets its own
walk, so a count is always that session's own.  The walk starts after every question of
its batch was asked, so each answer is a look taken after its step asked.  Errors reach
every caller of the batch.  The queue is bounded by the destructions in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from agent.destroy import residue

__all__ = ["IDS", "IN_NAMESPACES", "SharedWalk"]

Q = TypeVar("Q")
A = TypeVar("A")


@dataclass
class _Slot(Generic[Q, A]):
    query: Q
    answer: A | None = None
    error: BaseException | None = None
    done: bool = False
    served: int = 1  # questions the walk that answered this one served


@dataclass
class SharedWalk(Generic[Q, A]):
    """`one(query)` walks for one question; `union(queries)` is the query for all of them;
    `zero(answer)` says an answer found nothing (then it is every question's answer)."""

    one: Callable[[Q], A]
    union: Callable[[Sequence[Q]], Q]
    zero: Callable[[A], bool]
    walks: int = 0          # walks done (for tests and the evidence)
    _pending: list[_Slot] = field(default_factory=list)
    _running: bool = False
    _idle: trio.Event = field(default_factory=trio.Event)

    async def ask(self, query: Q) -> tuple[A, int]:
        """(the answer for `query`, how many questions the walk that answered it served)."""
        slot: _Slot[Q, A] = _Slot(query)
        self._pending.append(slot)
        while not slot.done:
            if self._running:
                await self._idle.wait()
                continue
            batch, self._pending = self._pending, []
            self._running = True
            try:
                await trio.to_thread.run_sync(self._answer, batch)
            finally:
                self._pending[:0] = [s for s in batch if not s.done]  # a cancelled walk
                self._running = False
                self._idle.set()
                self._idle = trio.Event()
        if slot.error is not None:
            raise slot.error
        assert slot.answer is not None
        return slot.answer, slot.served

    def _answer(self, batch: list[_Slot]) -> None:
        """In a worker thread: one walk for the batch, or one per question when the
        union found something."""
        try:
            if len(batch) > 1:
                self.walks += 1
                both = self.one(self.union([s.query for s in batch]))
                if self.zero(both):
                    for s in batch:
                        s.answer, s.served, s.done = both, len(batch), True
                    return
            for s in batch:
                self.walks += 1
                s.answer, s.done = self.one(s.query), True
        except Exception as e:
            for s in batch:
                if not s.done:
                    s.error, s.done = e, True


# -- the two walks the steps share ---------------------------------------------------------

IdsQuery = tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]


def _ids_union(qs: Sequence[IdsQuery]) -> IdsQuery:
    return (tuple(r for q in qs for r in q[0]), tuple(r for q in qs for r in q[1]))


# step 5: (processes with the ids, how the ids were read)
IDS: SharedWalk[IdsQuery, tuple[int, str]] = SharedWalk(
    one=lambda q: residue.processes_with_ids_fast(list(q[0]), list(q[1])),
    union=_ids_union, zero=lambda a: a[0] == 0)

# step 6, for the namespaces the kernel does not already say are empty: (processes,
# threads) with one of the names' links pointing at one of the inodes
NsQuery = tuple[tuple[str, ...], tuple[int, ...]]
IN_NAMESPACES: SharedWalk[NsQuery, tuple[int, int]] = SharedWalk(
    one=lambda q: residue.processes_in_namespaces(q[1], q[0]),
    union=lambda qs: (tuple(sorted({n for q in qs for n in q[0]})),
                      tuple(i for q in qs for i in q[1])),
    zero=lambda a: a == (0, 0))
