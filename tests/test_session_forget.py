"""Ended sessions leave the agent's memory once the journal holds their end (issue 18's
"bounded everything" on the request path): lookups then answer from the journal and the
spool exactly as they did from memory, and a session whose end the journal could not
take (its write failing) stays until it can."""

from __future__ import annotations

import sqlite3

import pytest
from service_fixtures import real_service

from agent.errors import Conflict


async def test_ended_sessions_are_forgotten_and_answer_the_same(agent_dirs):
    """After three lifecycles no session is held in memory, yet get, meta, list, a second
    destroy, exec and the receipt key lookup answer as they did while it was held."""
    state, runtime = agent_dirs
    async with real_service(state, runtime, "forget") as svc:
        for _ in range(3):
            res = await svc.create(customer_id="c", tier="free")
            sid = res["session_id"]
            await svc.exec(sid, "true")
            s = svc.sessions[sid]
            proof = await svc.destroy(sid)
            assert sid not in svc.sessions
            assert s.done.is_set() and s.status == "destroyed"
            held_view = {"session_id": sid, "status": "destroyed",
                         "ttl_seconds": s.ttl_seconds, "created_at": s.record.created_at,
                         "data_classification": s.record.classification,
                         "expires_at": s.expires_at}
            assert svc.get(sid, "c") == held_view
            meta = svc.get_meta(sid)
            assert meta is not None and meta["exec_count"] == 1
            assert meta["reason"] == "requested" and meta["tier"] == "free"
            assert held_view in svc.list("c")
            assert await svc.destroy(sid) == proof  # from the spool, as after a restart
            with pytest.raises(Conflict, match="has ended"):
                await svc.exec(sid, "true")
            key = svc.receipt_key(res["receipt_key"]["key_id"])
            assert key is not None and key["session_id"] == sid
        assert svc.sessions == {} and svc.live() == []
        assert svc.list_sessions() == []


async def test_an_end_the_journal_cannot_take_stays_until_it_can(agent_dirs, monkeypatch):
    """While the journal cannot write, the ended session stays in memory, where its end
    status lives while the journal keeps the update for replay; once the journal writes
    again the next end forgets both.  The failing write is a fake (SQLite's error raised
    from the journal's update): a real kernel does not fail it on demand here (a full
    tmpfs lets the WAL reuse its space after a checkpoint, a read-only remount is refused
    while the journal is open, chattr +i does not stop writes through open fds)."""
    state, runtime = agent_dirs
    async with real_service(state, runtime, "forgetro") as svc:
        first = (await svc.create(customer_id="c", tier="free"))["session_id"]
        second = (await svc.create(customer_id="c", tier="free"))["session_id"]
        journal = svc.journal

        def broken(session_id, fields):
            raise sqlite3.OperationalError("disk I/O error")

        with monkeypatch.context() as m:
            m.setattr(journal, "_write_update", broken)
            await svc.destroy(first)
            assert not journal.writable
            assert svc.sessions[first].status == "destroyed"  # held: the journal lacks it
            assert svc.get(first)["status"] == "destroyed"
        await svc.destroy(second)
        assert svc.sessions == {}
        assert svc.get(first)["status"] == "destroyed"
        assert journal.get(first)["status"] == "destroyed"
