"""What callers see of a session (SPEC 8 session.get/list, and the ops' metadata view),
from a live Session or from its journal row after it ended or the agent restarted."""

from __future__ import annotations

from agent.service.model import LIVE_STATUSES, Session
from agent.timefmt import iso_seconds, parse_iso

__all__ = ["meta", "row_meta", "row_view", "view"]


def view(s: Session) -> dict:
    out = {"session_id": s.session_id, "status": s.status, "ttl_seconds": s.ttl_seconds,
           "created_at": s.record.created_at,
           "data_classification": s.record.classification, "expires_at": s.expires_at}
    if s.ending and s.status in LIVE_STATUSES:
        out["destroying"] = True  # the pipeline runs; the end status follows the proof
    return out


def row_view(row: dict) -> dict:
    ttl = row["ttl_seconds"]
    expires = iso_seconds(parse_iso(row["created_at"]) + ttl) if ttl else None
    return {"session_id": row["session_id"], "status": row["status"], "ttl_seconds": ttl,
            "created_at": row["created_at"], "data_classification": row["classification"],
            "expires_at": expires}


def meta(s: Session) -> dict:
    return {**view(s), "customer_id": s.record.customer_id, "tier": s.record.tier,
            "jurisdiction": s.record.jurisdiction, "exec_count": s.record.exec_count,
            "reason": s.reason}


def row_meta(row: dict) -> dict:
    return {**row_view(row), "customer_id": row["customer_id"], "tier": row["tier"],
            "jurisdiction": row["jurisdiction"], "exec_count": row["exec_count"],
            "reason": row.get("reason")}
