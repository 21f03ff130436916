"""exec (SPEC 4): one command at a time per session, its timeout clamped to the remaining
TTL, its result signed as a receipt; hanging up kills it (exec is not shielded)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import trio

from agent.errors import Conflict
from agent.sandbox.exec import ExecProgress
from agent.sandbox.faults import ExecBusy
from agent.service.model import ENDED_STATUSES, InFlight, Session
from agent.service.receipts import exec_result, exec_tag

if TYPE_CHECKING:
    from agent.service.sessions import Service

__all__ = ["UNLIMITED_EXEC_TIMEOUT", "run_exec"]

UNLIMITED_EXEC_TIMEOUT = 365 * 24 * 3600.0  # an enterprise session with TTL 0


async def run_exec(svc: Service, s: Session | None, session_id: str, command: str, *,
                   input_data: bytes | None, timeout: float | None,
                   env: dict[str, str] | None, on_output) -> dict:
    """Run `command` in session `s` (None: not live) and return its result with a signed
    receipt; an exec the session's ending cut off returns the interrupted result that
    end() receipted."""
    if s is None or s.ending or s.status in ENDED_STATUSES:
        status = s.status if s is not None else (svc.journal.get(session_id) or {}).get(
            "status")
        raise Conflict(f"session {session_id} has ended ({status})", field="session_id")
    if s.status == "executing":
        raise Conflict(f"session {session_id} is already executing a command",
                       field="session_id")
    assert s.sandbox is not None
    remaining = s.deadline - trio.current_time()
    if remaining <= 0:
        raise Conflict(f"session {session_id} is expiring", field="session_id")
    limit = remaining if math.isfinite(remaining) else UNLIMITED_EXEC_TIMEOUT
    timeout = limit if timeout is None else min(float(timeout), limit)
    # in memory only (session.get, metrics): the journal row stays `active` while a command
    # runs (nothing reads `executing` back from it; re-adoption writes `active` anyway),
    # which saves a SQLite commit per exec; exec_count and the receipt's audit hash are
    # written before the answer, as before
    s.status = "executing"
    t0 = time.monotonic()
    inflight = InFlight(command=command, input_data=input_data,
                        progress=ExecProgress(tag=exec_tag(command, input_data)))
    s.inflight = inflight
    try:
        res = None
        try:
            with trio.CancelScope() as scope:
                s.exec_scope = scope
                res = await s.sandbox.exec(command, input_data=input_data, env=env,
                                           timeout=timeout, on_output=on_output,
                                           progress=inflight.progress)
        except ExecBusy:
            raise Conflict(f"session {session_id} is already executing a command",
                           field="session_id") from None
        except Exception:
            if not s.ending:
                raise
        finally:
            s.exec_scope = None
        if s.ending:
            # the session ended under the exec (TTL, OOM, operator): end() gives it a
            # receipt marked interrupted before destruction begins.  The exec may have
            # returned (e.g. its own timeout, at the TTL) while that close-out still
            # runs: wait for it rather than race it.
            with trio.move_on_after(svc.config.timeouts.close_out_seconds):
                await inflight.closed.wait()
            if inflight.result is None:
                raise Conflict(f"session {session_id} ended during the exec "
                               f"({s.reason})", field="session_id")
            res, receipt = inflight.result
        else:
            assert res is not None
            receipt = svc.receipts.sign(s, command, input_data, res)
    finally:
        if s.inflight is inflight:
            s.inflight = None
        if not s.ending and s.status == "executing":
            s.status = "active"
            svc.journal.update_session(session_id, status="active",
                                        exec_count=s.record.exec_count)
    svc._inc("execs_total")
    svc._observe("exec_seconds", time.monotonic() - t0)
    return exec_result(res, receipt)
