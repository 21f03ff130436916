"""The session audit log (SPEC 4, 5 step 7): one append for every event kind, live or
recovered, in memory (the record the pipeline seals) and in the journal (hashes only)."""

from __future__ import annotations

import hashlib

from agent.cdp.canonical import canonical_json
from agent.service.journal import Journal
from agent.service.model import SessionRecord
from agent.timefmt import iso_seconds

__all__ = ["AuditLog"]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class AuditLog:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def append(self, record: SessionRecord, kind: str, *, payload: bytes | None = None,
               hash_hex: str | None = None) -> dict:
        """Add event `kind` (hash of `payload`, or `hash_hex` as given) as the next seq."""
        seq = len(record.audit_events) + 1
        h = hash_hex if hash_hex is not None else sha256_hex(payload or b"")
        at = iso_seconds()
        ev = {"seq": seq, "kind": kind, "hash": h, "at": at}
        record.audit_events.append(ev)
        self.journal.add_event(record.session_id, seq, kind, h, at)
        return ev

    def created(self, record: SessionRecord, ttl_seconds: int) -> dict:
        return self.append(record, "created", payload=canonical_json(
            {"kind": "created", "session_id": record.session_id,
             "created_at": record.created_at, "tier": record.tier,
             "data_classification": record.classification,
             "jurisdiction": record.jurisdiction, "ttl_seconds": ttl_seconds}))

    def exec(self, record: SessionRecord, leaf_hex: str) -> dict:
        return self.append(record, "exec", hash_hex=leaf_hex)

    def destroy_requested(self, record: SessionRecord, reason: str) -> dict:
        return self.append(record, "destroy_requested", payload=canonical_json(
            {"kind": "destroy_requested", "session_id": record.session_id,
             "reason": reason}))
