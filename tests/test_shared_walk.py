"""Destructions in flight share one host-wide /proc walk (agent/destroy/shared_walk.py),
and still each get their own session's count."""

from __future__ import annotations

import os

import trio

from agent.destroy import residue
from agent.destroy.shared_walk import SharedWalk


def _walk() -> SharedWalk:
    return SharedWalk(one=lambda q: residue.processes_in_namespaces(q),
                      union=lambda qs: tuple(i for q in qs for i in q),
                      zero=lambda a: a == (0, 0))


async def _ask_all(walk: SharedWalk, queries: list[tuple[int, ...]]) -> list:
    out: list = [None] * len(queries)

    async def one(i: int) -> None:
        out[i] = await walk.ask(queries[i])

    async with trio.open_nursery() as n:
        for i in range(len(queries)):
            n.start_soon(one, i)
    return out


async def test_questions_asked_together_share_one_walk_when_nothing_is_found():
    """Eight questions at once for namespaces nobody is in: every answer is (0, 0) and
    the first walk's waiters are all answered by one more walk."""
    walk = _walk()
    answers = await _ask_all(walk, [(1 + i,) for i in range(8)])
    assert all(a == ((0, 0), a[1]) for a in answers)
    assert walk.walks == 2 and sorted(a[1] for a in answers) == [1] + [7] * 7


async def test_a_hit_in_the_union_gives_each_question_its_own_walk():
    """When the union finds processes, each question of that batch is walked alone: the
    one asking for this process's own namespace finds it, the others still find none."""
    walk = _walk()
    mine = os.stat("/proc/self/ns/uts").st_ino
    answers = await _ask_all(walk, [(1,), (2,), (mine,), (3,)])
    assert answers[0][0] == answers[1][0] == answers[3][0] == (0, 0)
    assert answers[2][0][0] >= 1 and answers[2][1] == 1
