"""session.create's body after admission (SPEC 2): the proof's spool reservation (a
session that could not be proven never starts: it is made, fsynced, before the answer),
the sandbox, the session key and the journal row; a failure at any point leaves nothing
half-made."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import structlog
import trio

from agent.cdp.receiptkeys import epoch_entry
from agent.errors import InternalError, Unavailable
from agent.keys.session import SessionKey
from agent.sandbox.userns import SlotsExhausted
from agent.service.journal import JournalUnwritable
from agent.service.model import Session, SessionRecord
from agent.service.pool import Member, bind_or_create, reserve_proof
from agent.service.spool import SpoolUnavailable
from agent.timefmt import iso_seconds

if TYPE_CHECKING:
    from agent.service.sessions import Service

__all__ = ["build_session"]

_log = structlog.get_logger("nanorix-agent.sessions")


def _unreservable(svc: Service, session_id: str, e: SpoolUnavailable) -> Unavailable:
    """The create is refused: its proof could not be reserved (logged, rzl at fault)."""
    _log.error("spool_reservation_failed", session_id=session_id, error=str(e))
    svc._health_fault("rzl", str(e))
    return Unavailable(f"{e}; new sessions are refused until the state directory has room")


async def build_session(svc: Service, session_id: str, customer_id: str, tier: str,
                        classification: str, jurisdiction: str, ttl: int,
                        member: Member | None = None) -> Session:
    """Reserve the proof's space, build the sandbox (or bind the warm-pool `member`) and
    the session key, journal the session and arm its watcher; anything half-made is
    destroyed through Service.end()."""
    now = time.time()
    start = trio.current_time()  # the TTL runs from created_at, not from sandbox ready
    created_at = iso_seconds(now)
    # the proof's space and inode: a session that could not be proven never starts.  A
    # warm member's was made ahead (no fsync, no thread here); a cold create's is the
    # engine's prelude: made in a worker thread alongside the sandbox's build (its two
    # fsyncs wait on the disk), done before create returns, i.e. before the answer and so
    # before anything runs in the sandbox; when it fails, the sandbox is undone
    header = {"customer_id": customer_id, "tier": tier, "classification": classification,
              "jurisdiction": jurisdiction, "created_at": created_at, "ttl_seconds": ttl}
    prelude = None
    keys: list[SessionKey] = []  # the session key, once made
    try:
        if member is not None:
            await reserve_proof(svc.spool, member, session_id, header)
            keys.append(SessionKey.generate(session_id))
        else:
            def prelude() -> None:
                svc.spool.reserve(session_id, header)
                # the session key too, off the event loop while the sandbox is built
                keys.append(SessionKey.generate(session_id))
    except SpoolUnavailable as e:
        raise _unreservable(svc, session_id, e) from None

    def forget_key() -> None:
        for k in keys:
            k.zeroize()

    try:
        sandbox = await bind_or_create(svc.pool, member, session_id, tier=tier,
                                       classification=classification, prelude=prelude)
    except SpoolUnavailable as e:  # the cold reservation (what was built is undone)
        forget_key()
        raise _unreservable(svc, session_id, e) from None
    except SlotsExhausted:  # e.g. a health canary holds a slot
        svc.spool.release(session_id)
        forget_key()
        raise Unavailable("node is at capacity (no free uid slot)") from None
    except Exception as e:
        svc.spool.release(session_id)
        forget_key()
        svc._health_fault("eee", f"sandbox creation failed ({type(e).__name__}: {e})")
        _log.exception("sandbox_create_failed", session_id=session_id)
        raise InternalError(f"sandbox creation failed ({type(e).__name__})") from None
    key = keys[0]
    record = SessionRecord(session_id=session_id, customer_id=customer_id, tier=tier,
                           classification=classification, jurisdiction=jurisdiction,
                           created_at=created_at)
    deadline = start + ttl if ttl else math.inf  # from the exact creation time
    s = Session(record=record, ttl_seconds=ttl, created_ts=now, deadline=deadline,
                sandbox=sandbox, session_key=key, receipt_key=key.public_record(created_at))
    record.receipt_keys.append(epoch_entry(0, s.receipt_key))
    svc.sessions[session_id] = s
    try:
        svc.journal.insert_session(
            session_id=session_id, customer_id=customer_id, tier=tier,
            classification=classification, jurisdiction=jurisdiction,
            created_at=created_at, ttl_seconds=ttl, status="active",
            hostname=sandbox.hostname, slot=sandbox.slot, host_uid=sandbox.host_uid,
            init_pid=sandbox.init_pid, init_starttime=sandbox.init_starttime,
            cgroup_paths=[str(p) for p in sandbox.cgroup.paths],
            mount_path=str(sandbox.root_mount_path),
            namespaces=dict(sandbox.namespaces),
            receipt_key_id=key.key_id, receipt_public_key=s.receipt_key["public_key"])
        svc.audit.created(record, ttl)
    except Exception as e:
        # nothing half-made survives: run the real destruction on what exists
        _log.exception("session_journal_failed", session_id=session_id)
        await svc.end(s, "operator")
        if isinstance(e, JournalUnwritable):
            raise Unavailable(f"{e}; new sessions are refused until it can") from None
        raise InternalError("could not record the session") from None
    svc._arm(s)
    _log.info("session_created", session_id=session_id, tier=tier,
              classification=classification, ttl_seconds=ttl)
    return s
