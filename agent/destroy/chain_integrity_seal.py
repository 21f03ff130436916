"""Step 7 (rzl_audit / chain_integrity_seal, method `hash_chain_validation`).

1. Chain re-check.  When each of steps 1–6 ended, the pipeline sealed h_i (SPEC 6 chain
   hash over that step's evidence as it was then).  Here the chain is recomputed from the
   evidence objects as they are now; `steps_verified` counts the steps, from 1, whose
   recomputed h_i equals the sealed one (6 = nothing changed after it was measured).

2. Audit log seal.  The session's audit log is the ordered list of events
   `{seq, kind, hash, at}`: `created` (hash ""), one `exec` per command (hash = lowercase
   hex of receipt_leaf(receipt) = SHA-256 of the receipt's canonical JSON), and
   `destroy_requested` (hash "", appended here when the log does not end with one; at =
   when destruction started).  Its hash chain:

       a_0 = SHA-256("")                                   (lowercase hex)
       a_k = SHA-256(a_{k-1} ‖ 0x00 ‖ str(seq_k) ‖ 0x00 ‖ kind_k ‖ 0x00 ‖ hash_k ‖ 0x00 ‖ at_k)

   over the UTF-8 of the operands (hex as 64 ASCII characters, seq in decimal).
   `audit_events` = number of events, `audit_head` = a_n.  A log without events (a daemon
   that keeps none) is rebuilt from the session record: created at `created_at`, one
   exec per receipt (at = its `finished_at`), then destroy_requested.  When the receipts
   are at hand, the exec events' hashes must equal their leaves in order
   (`receipts_consistent`); the number of exec events must equal the exec count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from agent import timefmt
from agent.cdp import chain
from agent.destroy.context import DestroyContext, DestroyState, StepError

METHOD = "hash_chain_validation"
AUDIT_GENESIS = hashlib.sha256(b"").hexdigest()


def receipt_leaf(receipt: dict) -> bytes:
    """SHA-256 of C(receipt): the receipt's Merkle leaf (SPEC 6)."""
    try:
        from agent.cdp.receipt import receipt_leaf as leaf
    except ImportError:
        from agent.cdp.canonical import canonical_json

        return hashlib.sha256(canonical_json(receipt)).digest()
    return leaf(receipt)


def audit_step(prev_hex: str, event: dict) -> str:
    """a_k from a_{k-1} and one event (see module doc)."""
    parts = (prev_hex, str(int(event["seq"])), str(event["kind"]), str(event.get("hash") or ""),
             str(event.get("at") or ""))
    return hashlib.sha256(b"\x00".join(p.encode("utf-8") for p in parts)).hexdigest()


def audit_head(events: Sequence[dict]) -> str:
    head = AUDIT_GENESIS
    for e in events:
        head = audit_step(head, e)
    return head


def session_events(ctx: DestroyContext, st: DestroyState) -> list[dict]:
    """The audit log to seal (the session's, else rebuilt), ending in destroy_requested."""
    s = ctx.session
    events = [dict(e) for e in (s.audit_events or [])]
    if not events:
        events.append({"seq": 1, "kind": "created", "hash": "", "at": s.created_at})
        for r in s.receipts:
            events.append({"seq": len(events) + 1, "kind": "exec",
                           "hash": receipt_leaf(r).hex(), "at": str(r.get("finished_at", ""))})
    if events[-1].get("kind") != "destroy_requested":
        last = max(int(e["seq"]) for e in events)
        events.append({"seq": last + 1, "kind": "destroy_requested", "hash": "",
                       "at": timefmt.iso_seconds(st.destroy_started or None)})
    return events


def verify_chain(evidence: Sequence[dict], sealed: dict[int, str]) -> int:
    prev = chain.GENESIS
    n = 0
    for (step, subsystem, operation), ev in zip(chain.STEPS[:6], evidence[:6], strict=False):
        eh = chain.evidence_hash(ev)[len(chain.PREFIX):]
        prev = chain.chain_step(prev, step, subsystem, operation, eh)
        if sealed.get(step) != prev:
            break
        n += 1
    return n


def receipt_leaves(session) -> tuple[list[bytes], str]:
    """The receipts' Merkle leaves and where they came from: the receipts themselves, or
    (agent recovery: only the journal survived) the audit log's exec hashes, which are
    the same leaves by definition."""
    if session.receipts:
        return [receipt_leaf(r) for r in session.receipts], "receipts"
    execs = [e for e in (session.audit_events or []) if e.get("kind") == "exec"]
    try:
        leaves = [bytes.fromhex(str(e.get("hash", ""))) for e in execs]
    except ValueError:
        return [], "none"
    if execs and all(len(x) == 32 for x in leaves):
        return leaves, "audit_log"
    return [], "none"


async def run(ctx: DestroyContext, st: DestroyState, ev: dict) -> None:
    errors: list[str] = []
    verified = verify_chain(st.evidence, st.chain_at_step)
    events = session_events(ctx, st)
    execs = [e.get("hash") for e in events if e.get("kind") == "exec"]
    ev.update({"steps_verified": verified, "audit_events": len(events),
               "audit_head": audit_head(events)})
    if verified != 6:
        errors.append("evidence changed after it was sealed")
    if ctx.session.receipts:  # both sides known: they must agree
        leaves = [receipt_leaf(r).hex() for r in ctx.session.receipts]
        ev["receipts_consistent"] = execs == leaves
        if execs != leaves:
            errors.append("audit log and receipts disagree")
    if len(execs) != int(ctx.session.exec_count):
        errors.append("audit log and exec count disagree")
    if errors:
        raise StepError("; ".join(errors))
