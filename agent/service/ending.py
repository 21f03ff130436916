"""The one destruction path's body (Service.end calls it for every ending: destroy, drain,
TTL, OOM, sandbox_failed, re-adoption failures and recovery): steps 1-8 on whatever sandbox
is left, the proof signed and spooled before the status turns."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
import trio

from agent.destroy.context import DestroyContext
from agent.destroy.pipeline import run_pipeline
from agent.errors import InternalError
from agent.service.model import Session

if TYPE_CHECKING:
    from agent.service.sessions import Service

__all__ = ["destroy_session", "wipe_passes"]

_log = structlog.get_logger("nanorix-agent.sessions")


def wipe_passes(svc: Service, classification: str) -> list[str]:
    cls = svc.config.classes.get(classification) or svc.config.classes["general"]
    return list(cls.wipe_passes)

async def destroy_session(svc: Service, s: Session, reason: str) -> dict:
    """The body of Service.end(): close out the exec in flight, audit destroy_requested,
    run steps 1-8, sign and spool the proof, then turn the journal and the live view to
    the end status."""
    sid = s.session_id
    await svc.receipts.close_out(s, reason)
    svc.audit.destroy_requested(s.record, reason)

    def revoke() -> None:
        s.ending = True

    ctx = DestroyContext(
        sandbox=s.sandbox, session=s.record, session_key=s.session_key,
        passes=wipe_passes(svc, s.record.classification), reason=reason,
        node_id=svc.config.node.node_id, agent_version=svc.version, revoke=revoke)
    try:
        outcome = await run_pipeline(ctx)
    except Exception:
        _log.exception("destroy_pipeline_crashed", session_id=sid, reason=reason)
        svc._health_fault("eee", f"the destruction pipeline of {sid} crashed")
        s.status = "expired_unclean"
        svc.journal.update_session(sid, status=s.status, reason=reason)
        if s.sandbox is not None:
            with trio.move_on_after(10):
                await s.sandbox.teardown()
        svc._inc("destroys_total", reason=reason, status=s.status)
        raise InternalError("the destruction pipeline failed") from None
    failed = [str(n) for n, ev in enumerate(outcome.evidence, start=1)
              if ev.get("ok") is not True]
    for step in failed:
        svc._inc("destroy_step_failures_total", step=step)
    if failed and ctx.sandbox is not None:  # a live sandbox not destroyed cleanly
        svc._health_fault("eee", f"destruction of {sid} could not verify step(s) "
                                  f"{', '.join(failed)}")
    # the live view and the journal turn to the end status only once the proof is
    # spooled: a control plane that sees `expired` (TTL, OOM) and calls proof.get must
    # find the proof, and a crash in between leaves a live journal row whose spooled
    # proof recovery adopts (recover_row) instead of a proof lost for good
    try:
        result = await svc.proofs.write(s.record, outcome)
    except Exception:
        s.status = outcome.status
        _log.exception("proof_failed", session_id=sid, reason=reason)
        svc._inc("destroys_total", reason=reason, status=s.status)
        raise InternalError("the session was destroyed but its proof could not be "
                            "built or spooled") from None
    finally:
        svc.journal.update_session(sid, status=outcome.status, reason=reason,
                                    exec_count=s.record.exec_count)
        s.status = outcome.status
    svc._inc("destroys_total", reason=reason, status=s.status)
    _log.info("session_destroyed", session_id=sid, reason=reason, status=s.status)
    return result
