"""What callers see of a session (SPEC 8 session.get/list, and the ops' metadata view),
from a live Session or from its journal row after it ended or the agent restarted."""

from __future__ import annotations

from agent.errors import NotFound
from agent.service.journal import Journal
from agent.service.model import LIVE_STATUSES, Session
from agent.timefmt import iso_seconds, parse_iso

__all__ = ["listing", "lookup", "lookup_meta", "meta", "receipt_key", "row_meta", "row_view",
           "view"]


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


def lookup(sessions: dict[str, Session], journal: Journal, session_id: str,
           customer_id: str | None) -> tuple[Session | None, dict]:
    """(live record or None, public view); NotFound for unknown or foreign sessions (a
    foreign session is indistinguishable from an unknown one)."""
    s = sessions.get(session_id)
    if s is not None:
        if customer_id is not None and customer_id != s.record.customer_id:
            raise NotFound(f"session {session_id} not found", field="session_id")
        return s, view(s)
    row = journal.get(session_id)
    if row is None or (customer_id is not None and customer_id != row["customer_id"]):
        raise NotFound(f"session {session_id} not found", field="session_id")
    return None, row_view(row)


def listing(sessions: dict[str, Session], journal: Journal, customer_id: str | None) -> list[dict]:
    """session.list: journaled and live sessions (the live view wins), oldest first."""
    out = {}
    for row in journal.all(customer_id):
        out[row["session_id"]] = row_view(row)
    for s in sessions.values():
        if customer_id is None or s.record.customer_id == customer_id:
            out[s.session_id] = view(s)
    return sorted(out.values(), key=lambda v: (v["created_at"], v["session_id"]))


def lookup_meta(sessions: dict[str, Session], journal: Journal, session_id: str) -> dict | None:
    s = sessions.get(session_id)
    if s is not None:
        return meta(s)
    row = journal.get(session_id)
    return row_meta(row) if row is not None else None


def receipt_key(sessions: dict[str, Session], journal: Journal, key_id: str) -> dict | None:
    """Public record of a session receipt key, any epoch (live or destroyed session):
    `{key_id, algorithm, public_key, created_at, session_id, epoch[, introduction]}`
    (agent/cdp/receiptkeys.py)."""
    for s in sessions.values():
        for k in s.record.receipt_keys:
            if k.get("key_id") == key_id:
                return _key_record(s.session_id, k)
    found = journal.receipt_key(key_id)
    return None if found is None else _key_record(*found)


def _key_record(session_id: str, entry: dict) -> dict:
    out = {"key_id": entry["key_id"], "algorithm": "Ed25519",
           "public_key": entry["public_key"], "created_at": entry["created_at"],
           "session_id": session_id, "epoch": entry["epoch"]}
    if "introduction" in entry:
        out["introduction"] = entry["introduction"]
    return out
