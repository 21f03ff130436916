"""After an agent crash (ops.recovery calls these per journaled live session): re-adopt a
sandbox that outlived the agent, or end what is left through the same Service.end()."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from agent.sandbox.engine import AdoptFailed
from agent.service.faults import fault_point
from agent.service.model import readopted_session, session_from_row

if TYPE_CHECKING:
    from agent.service.sessions import Service

__all__ = ["adopt_row", "recover_row"]

_log = structlog.get_logger("nanorix-agent.sessions")


async def adopt_row(svc: Service, row: dict) -> bool:
    """Re-adopt a journaled live session whose sandbox outlived the agent (issue 12):
    the same sandbox, verified (engine.adopt), becomes an active session again with
    a fresh receipt key (the old one lived only in the dead agent's locked memory), the
    next epoch of its receipt keys, introduced by the node's attestation key,
    its TTL and OOM watch re-armed (a TTL that passed while the agent was down ends
    it at once, ttl_expired); an exec the crash cut off gets its receipt
    (`interrupted: agent_restart`).  False when there is nothing to adopt (the caller
    then reclaims and proves it, agent_recovery).  The journal row stays live
    throughout, so a crash at any point here leaves it to the next start: adopted or
    proven, never both and never neither."""
    sid = row["session_id"]
    if svc.spool.get(sid) is not None:
        return False  # destroyed before the crash: recover_row adopts its proof
    try:
        sb = await svc.engine.adopt(row)
    except AdoptFailed as e:
        _log.info("session_not_adoptable", session_id=sid, why=str(e))
        return False
    fault_point("adopt.attached")
    try:
        s = readopted_session(row, svc.journal.events(sid), svc.journal.receipt_keys(sid), sb,
                              svc.key_store.current())
    except Exception:
        _log.exception("session_readopt_failed", session_id=sid)
        s = session_from_row(row, svc.journal.events(sid), svc.journal.receipt_keys(sid))
        s.sandbox = sb
        svc.sessions[sid] = s
        await svc.end(s, "agent_recovery")
        return True
    key = s.session_key
    assert key is not None
    svc.sessions[sid] = s
    try:
        # the new key is on record before it signs anything (a crash after this leaves
        # an introduced key with no receipts, which the next re-adoption follows)
        svc.journal.add_receipt_key(sid, s.record.receipt_keys[-1])
        fault_point("adopt.rekeyed")
        if sb.interrupted is not None:
            svc.receipts.close_out_crashed(s, *sb.interrupted)
        await sb.confirm_adopted()
        fault_point("adopt.confirmed")
        svc.journal.update_session(sid, status="active", exec_count=s.record.exec_count,
                                    receipt_key_id=key.key_id,
                                    receipt_public_key=s.receipt_key["public_key"])
    except Exception:
        _log.exception("session_adopt_journal_failed", session_id=sid)
        await svc.end(s, "agent_recovery")
        return True
    fault_point("adopt.journaled")
    if svc._nursery is not None:
        svc._arm(s)
    else:
        svc._adopted.append(s)
    svc._inc("sessions_adopted_total")
    _log.info("session_adopted", session_id=sid, exec_count=s.record.exec_count)
    return True

async def recover_row(svc: Service, row: dict, reason: str = "agent_recovery") -> str:
    """End a session found in the journal after a crash through the same end() as a
    live one (no sandbox left to hand it), and return the final status.  A session
    whose proof was already spooled (the agent died between spool and journal) is
    not destroyed twice: its proof is adopted."""
    sid = row["session_id"]
    stored = svc.spool.get(sid)
    if stored is not None:
        status = stored.get("status", "expired_unclean")
        svc.journal.update_session(sid, status=status, reason=stored.get("reason", reason))
        return status
    s = session_from_row(row, svc.journal.events(sid), svc.journal.receipt_keys(sid))
    await svc.end(s, reason)
    return s.status
