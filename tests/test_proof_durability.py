"""A session's proof is spooled before the journal marks it ended, and recovery adopts a
proof that was spooled just before a crash instead of destroying the session twice."""

from __future__ import annotations

from service_fixtures import bare_service


async def test_recovery_adopts_a_proof_spooled_before_the_crash(tmp_path):
    """A journal row still `active` whose proof is already in the spool ends with the
    spooled status; the stored proof is kept byte for byte and no pipeline runs."""
    sid = "sess_00000000000000ab"
    with bare_service(tmp_path) as svc:
        journal = svc.journal
        journal.insert_session(session_id=sid, customer_id="c", tier="free",
                               classification="general", jurisdiction="US",
                               created_at="2026-01-01T00:00:00Z", ttl_seconds=60,
                               status="active", exec_count=0)
        proof = {"session_id": sid, "status": "destroyed", "reason": "requested",
                 "cdp": {"marker": "the spooled proof"}}
        svc.spool.put(sid, proof)
        before = svc.spool.get_bytes(sid)
        status = await svc.recover_row(journal.get(sid))
        assert status == "destroyed"
        assert journal.get(sid)["status"] == "destroyed"
        assert journal.get(sid)["reason"] == "requested"
        assert svc.spool.get_bytes(sid) == before
