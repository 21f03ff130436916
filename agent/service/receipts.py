"""Exec receipts of a session (SPEC 4): signed by the session key, counted in exec_count,
audited as `exec` events, and given also to an exec the session's end cut off
(`interrupted: <reason>`, issue 12) before destruction zeroizes the key."""

from __future__ import annotations

import json

import structlog
import trio

from agent.cdp.receipt import build_receipt, receipt_leaf
from agent.sandbox.exec import ExecResult, decode_status
from agent.service.audit import AuditLog, sha256_hex
from agent.service.model import Session
from agent.timefmt import iso_seconds

__all__ = ["Receipts", "exec_result", "exec_tag"]

_log = structlog.get_logger("nanorix-agent.sessions")
AGENT_RESTART = "agent_restart"  # `interrupted` of an exec cut off by the agent's death


def exec_result(res: ExecResult, receipt: dict) -> dict:
    """The session.exec answer."""
    return {"output": res.stdout, "stderr": res.stderr, "exit_code": res.exit_code,
            "timed_out": res.timed_out, "signal": res.signal, "oom_killed": res.oom_killed,
            "output_truncated": res.output_truncated,
            "stderr_truncated": res.stderr_truncated, "duration_ms": res.duration_ms,
            "interrupted": receipt.get("interrupted"), "receipt": receipt}


def exec_tag(command: str, input_data: bytes | None) -> bytes:
    """What PID 1 keeps while the command runs, so that a restarted agent can still give
    an exec cut off by the agent's death its receipt: hashes and the start time only."""
    # canonical JSON of {command_sha256, input_sha256, started_at}, written out: keys in
    # canonical order, every value ASCII without characters to escape
    return (f'{{"command_sha256":"{sha256_hex(command.encode("utf-8"))}",'
            f'"input_sha256":"{sha256_hex(input_data or b"")}",'
            f'"started_at":"{iso_seconds()}"}}').encode("ascii")


def receipt_fields(s: Session, command_sha256: str, input_sha256: str, res: ExecResult,
                   interrupted: str | None) -> dict:
    fields = {
        "session_id": s.session_id, "seq": s.record.exec_count + 1,
        "command_sha256": command_sha256, "input_sha256": input_sha256,
        "output_sha256": sha256_hex(res.stdout), "stderr_sha256": sha256_hex(res.stderr),
        "exit_code": res.exit_code, "timed_out": bool(res.timed_out),
        "started_at": res.started_at, "finished_at": res.finished_at,
    }
    if interrupted is not None:
        fields["interrupted"] = interrupted
    return fields


class Receipts:
    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def sign(self, s: Session, command: str, input_data: bytes | None, res: ExecResult,
             interrupted: str | None = None) -> dict:
        return self.sign_hashed(s, sha256_hex(command.encode("utf-8")),
                                sha256_hex(input_data or b""), res, interrupted)

    def sign_hashed(self, s: Session, command_sha256: str, input_sha256: str,
                    res: ExecResult, interrupted: str | None = None) -> dict:
        """Sign the next receipt, append it to the record and the audit log."""
        assert s.session_key is not None
        receipt = build_receipt(receipt_fields(s, command_sha256, input_sha256, res,
                                               interrupted), s.session_key)
        if s.record.receipts_complete:
            s.record.receipts.append(receipt)
        s.record.exec_count = receipt["seq"]
        self.audit.exec(s.record, receipt_leaf(receipt).hex())
        return receipt

    def close_out_crashed(self, s: Session, status: int, tag: bytes) -> dict | None:
        """The receipt of an exec the agent's death cut off (PID 1 killed it and kept its
        tag, see initproto.encode_exec): `interrupted: agent_restart`, no output (none
        reached the client), the exit status PID 1 saw."""
        try:
            meta = json.loads(tag)
            cmd, inp, started = meta["command_sha256"], meta["input_sha256"], meta["started_at"]
        except (ValueError, KeyError, TypeError):
            _log.error("interrupted_exec_tag_unreadable", session_id=s.session_id)
            return None
        code, sig = decode_status(status)
        res = ExecResult(stdout=b"", stderr=b"", exit_code=code, timed_out=False, signal=sig,
                         oom_killed=False, output_truncated=False, stderr_truncated=False,
                         duration_ms=0, started_at=started, finished_at=iso_seconds())
        return self.sign_hashed(s, cmd, inp, res, interrupted=AGENT_RESTART)

    async def close_out(self, s: Session, reason: str) -> None:
        """An exec in flight when the session ends gets its receipt now, marked
        `interrupted: <reason>`, before destruction zeroizes the key and seals the chain:
        the sandbox is frozen first, so its output so far is all there is."""
        inflight, sb = s.inflight, s.sandbox
        if inflight is None:
            return
        try:
            if sb is None or s.session_key is None:
                return
            try:
                with trio.move_on_after(5):
                    await trio.to_thread.run_sync(sb.cgroup.freeze, 5.0)
            except Exception:
                _log.warning("interrupted_exec_freeze_failed", session_id=s.session_id)
            try:
                res = await inflight.progress.interrupted(oom=reason == "oom")
                sb.buffers_zeroed += inflight.progress.zeroed
                receipt = self.sign(s, inflight.command, inflight.input_data, res,
                                    interrupted=reason)
                inflight.result = (res, receipt)
            except Exception:
                _log.exception("interrupted_exec_receipt_failed", session_id=s.session_id)
        finally:
            inflight.closed.set()
