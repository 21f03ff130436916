"""The session record and its runtime state (SPEC 2): what a session *is*, no behaviour.

`SessionRecord` is the metadata the destruction pipeline reads (it satisfies
`agent.destroy.context.SessionFacts`); `Session` adds what only a running agent has (the
sandbox handle, the receipt key, the deadline, the exec in flight).  Statuses:
`active` <-> `executing` -> `destroyed` (requested) | `expired` (TTL, OOM, operator,
recovery) | `expired_unclean` (a destruction step could not be verified).
"""

from __future__ import annotations

import math
import re
import secrets
import time
from dataclasses import dataclass, field

import trio

from agent.keys.session import SessionKey
from agent.sandbox.engine import Sandbox
from agent.sandbox.exec import ExecProgress
from agent.service.journal import LIVE_STATUSES
from agent.timefmt import iso_seconds, parse_iso

__all__ = ["ENDED_STATUSES", "LIVE_STATUSES", "SESSION_ID_RE", "InFlight", "Session",
           "SessionRecord", "new_session_id", "readopted_session", "row_receipt_key",
           "session_from_row"]

SESSION_ID_RE = re.compile(r"^sess_[0-9a-f]{16}$")
ENDED_STATUSES = ("destroyed", "expired", "expired_unclean")


def new_session_id() -> str:
    return "sess_" + secrets.token_hex(8)


@dataclass
class SessionRecord:
    """The session's metadata as the daemon knows it (SPEC 2): never commands or data.

    `receipts` are the signed exec receipts (SPEC 4) in seq order.  `audit_events` are the
    audit log entries `{"seq": int, "kind": str, "hash": str, "at": str}` with kinds
    `created`, `exec` (hash = hex of receipt_leaf(receipt)) and `destroy_requested`; see
    chain_integrity_seal for the hash chain over them.
    """

    session_id: str
    customer_id: str = ""
    tier: str = "free"
    classification: str = "general"
    jurisdiction: str = "US"
    created_at: str = ""
    receipts: list[dict] = field(default_factory=list)
    audit_events: list[dict] = field(default_factory=list)
    exec_count: int = 0
    # False once the agent restarted under the session: the receipts signed before it
    # died are known only as the audit log's exec hashes (the same Merkle leaves), so
    # the pipeline roots and checks those instead of a partial receipt list
    receipts_complete: bool = True


@dataclass
class InFlight:
    """The exec running now: enough to give it a receipt if the session ends under it."""

    command: str
    input_data: bytes | None
    progress: ExecProgress
    result: object | None = None  # (ExecResult, receipt) once closed out by end()
    # set when end()'s close-out is over (result set or not): an exec that returns while
    # its session is ending waits for it instead of racing it
    closed: trio.Event = field(default_factory=trio.Event)


@dataclass
class Session:
    """Runtime state of one session (the metadata lives in `record`)."""

    record: SessionRecord
    ttl_seconds: int
    created_ts: float  # wall clock
    deadline: float  # trio clock; inf = no TTL
    status: str = "active"
    sandbox: Sandbox | None = None
    session_key: SessionKey | None = None
    receipt_key: dict = field(default_factory=dict)
    previous_receipt_keys: list[dict] = field(default_factory=list)  # before a re-adoption
    ending: bool = False
    reason: str | None = None
    inflight: InFlight | None = None
    exec_scope: trio.CancelScope | None = None
    watch_scope: trio.CancelScope | None = None
    done: trio.Event = field(default_factory=trio.Event)
    result: dict | None = None

    @property
    def session_id(self) -> str:
        return self.record.session_id

    @property
    def expires_at(self) -> str | None:
        return iso_seconds(self.created_ts + self.ttl_seconds) if self.ttl_seconds else None

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES


def row_receipt_key(row: dict) -> dict | None:
    """The public record of the receipt key a journal row names (None without one)."""
    if not row.get("receipt_key_id") or not row.get("receipt_public_key"):
        return None
    return {"key_id": row["receipt_key_id"], "algorithm": "Ed25519",
            "public_key": row["receipt_public_key"], "created_at": row["created_at"]}


def readopted_session(row: dict, events: list[dict], sandbox: Sandbox) -> Session:
    """The active Session of a re-adopted sandbox: a fresh receipt key (the old private
    key lived only in the dead agent's locked memory; its public record stays findable),
    and the audit log as the record of execs (an interrupted receipt of a crashed earlier
    re-adoption may be in it before the row's count was updated)."""
    s = session_from_row(row, events)
    s.record.exec_count = sum(1 for e in events if e["kind"] == "exec")
    key = SessionKey.generate(row["session_id"])
    s.sandbox, s.session_key = sandbox, key
    s.receipt_key = key.public_record(iso_seconds())
    s.previous_receipt_keys = [k for k in [row_receipt_key(row)] if k]
    s.status = "active"
    return s


def session_from_row(row: dict, events: list[dict]) -> Session:
    """A Session rebuilt from its journal row and audit events (no sandbox, no key); the
    deadline is the one the row implies, so a TTL that passed while the agent was down
    has passed here too."""
    record = SessionRecord(session_id=row["session_id"], customer_id=row["customer_id"],
                           tier=row["tier"], classification=row["classification"],
                           jurisdiction=row["jurisdiction"], created_at=row["created_at"],
                           audit_events=events, exec_count=row["exec_count"] or 0,
                           receipts_complete=False)
    ttl = row["ttl_seconds"] or 0
    created = parse_iso(row["created_at"])
    deadline = (trio.current_time() + (created + ttl - time.time())) if ttl else math.inf
    return Session(record=record, ttl_seconds=ttl, created_ts=float(created),
                   deadline=deadline, status=row["status"])
