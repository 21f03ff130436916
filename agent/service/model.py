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

from agent.cdp.document import Signer
from agent.cdp.receiptkeys import introduce
from agent.keys.session import SessionKey
from agent.sandbox.engine import Sandbox
from agent.sandbox.exec import ExecProgress
from agent.service.journal import LIVE_STATUSES
from agent.timefmt import iso_seconds, parse_iso

__all__ = ["ENDED_STATUSES", "LIVE_STATUSES", "SESSION_ID_RE", "InFlight", "Session",
           "SessionRecord", "new_session_id", "readopted_session", "session_from_row"]

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
    # every receipt key of the session in epoch order (agent/cdp/receiptkeys.py entries):
    # one per agent that held the session; step 8 lists them
    receipt_keys: list[dict] = field(default_factory=list)


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


def readopted_session(row: dict, events: list[dict], keys: list[dict], sandbox: Sandbox,
                      signer: Signer) -> Session:
    """The active Session of a re-adopted sandbox.  Its receipt key is a new epoch (the old
    private key lived only in the dead agent's locked memory): introduced after the last
    journaled key by a statement `signer` (the node's attestation key) signs over the
    receipts so far, which the audit log's exec hashes are (an interrupted receipt of a
    crashed earlier re-adoption may be among them before the row's count was updated).
    The caller journals the new entry (`record.receipt_keys[-1]`) before signing with it."""
    s = session_from_row(row, events, keys)
    leaves = [bytes.fromhex(e["hash"]) for e in events if e["kind"] == "exec"]
    s.record.exec_count = len(leaves)
    if not s.record.receipt_keys:  # a row without a key: nothing to follow, start afresh
        raise ValueError("journal row lacks its receipt key")
    epoch = len(s.record.receipt_keys)
    key = SessionKey.generate(row["session_id"], epoch)
    s.sandbox, s.session_key = sandbox, key
    s.receipt_key = key.public_record(iso_seconds())
    s.record.receipt_keys.append(introduce(
        signer, session_id=row["session_id"], previous=s.record.receipt_keys[-1],
        epoch=epoch, record=s.receipt_key, exec_count=len(leaves), leaves=leaves))
    s.status = "active"
    return s


def session_from_row(row: dict, events: list[dict], keys: list[dict] | None = None) -> Session:
    """A Session rebuilt from its journal row and audit events (no sandbox, no key); the
    deadline is the one the row implies, so a TTL that passed while the agent was down
    has passed here too."""
    record = SessionRecord(session_id=row["session_id"], customer_id=row["customer_id"],
                           tier=row["tier"], classification=row["classification"],
                           jurisdiction=row["jurisdiction"], created_at=row["created_at"],
                           audit_events=events, exec_count=row["exec_count"] or 0,
                           receipts_complete=False,
                           receipt_keys=[dict(k) for k in keys or []])
    ttl = row["ttl_seconds"] or 0
    created = parse_iso(row["created_at"])
    deadline = (trio.current_time() + (created + ttl - time.time())) if ttl else math.inf
    return Session(record=record, ttl_seconds=ttl, created_ts=float(created),
                   deadline=deadline, status=row["status"])
