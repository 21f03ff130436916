"""Step 8 (session_destroy / lifecycle_completion, method `lifecycle_completion`).

The identity and outcome of the session, bound by the signature: session id, creation and
destruction times (destroyed_at is the CDP's top-level value), reason, final status
(`destroyed` when steps 1–7 are all ok and the reason is `requested`, `expired` when they
are all ok for any other reason, `expired_unclean` otherwise), classification,
jurisdiction, tier, node id, agent version, exec count and the Merkle root (SPEC 6) of
the receipts' leaves (SHA-256("") when the session ran nothing; after agent recovery the
leaves are the journal's exec hashes, `receipts_source` says which), and `receipt_keys`:
every receipt key the session had, in order, later ones with their signed introduction
(agent/cdp/receiptkeys.py; absent for a session record without keys).
"""

from __future__ import annotations

from agent.cdp import merkle
from agent.destroy.chain_integrity_seal import receipt_leaves
from agent.destroy.context import DestroyContext, DestroyState

METHOD = "lifecycle_completion"


def final_status(evidence: list[dict], reason: str) -> str:
    if len(evidence) >= 7 and all(e.get("ok") is True for e in evidence[:7]):
        return "destroyed" if reason == "requested" else "expired"
    return "expired_unclean"


def base_fields(ctx: DestroyContext, st: DestroyState) -> dict:
    """Identity fields, present even when this step fails (the CDP binding needs them)."""
    s = ctx.session
    leaves, source = receipt_leaves(s)
    return {"session_id": s.session_id, "created_at": s.created_at,
            "destroyed_at": st.destroyed_at, "reason": ctx.reason, "status": "expired_unclean",
            "data_classification": s.classification, "jurisdiction": s.jurisdiction,
            "tier": s.tier, "node_id": ctx.node_id, "agent_version": ctx.agent_version,
            "exec_count": int(s.exec_count), "receipts_root": merkle.merkle_root(leaves),
            "receipts_source": source,
            **({"receipt_keys": list(s.receipt_keys)} if s.receipt_keys else {}),
            **_attempts(ctx)}


def _attempts(ctx: DestroyContext) -> dict:
    """`pipeline_attempts` (only when > 1): the destroy worker running this destruction
    died before it ended, and the daemon ran steps 1-8 again on what was left; the evidence
    of the lost attempt is gone, each step above says what it found the second time."""
    return {"pipeline_attempts": ctx.attempts} if ctx.attempts > 1 else {}


async def run(ctx: DestroyContext, st: DestroyState, ev: dict) -> None:
    ev["status"] = final_status(st.evidence, ctx.reason)
