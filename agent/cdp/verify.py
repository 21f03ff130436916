"""Offline verification of proofs (SPEC 6, and SPEC 14 renditions).  Never raises.

`verify(doc, trust=None)` accepts a bare CDP v1.0, anything wrapping one under `"cdp"` (a
destroy result, `proof.get`, the shared vector file), a bare AuditProof 2.1 rendition, or
a wrapper holding one under `"auditproof"`.  When a wrapper holds both, both are checked,
the rendition's result is nested under `"auditproof"`, and the wrapper itself gets the
`envelope` check (agent.cdp.envelope); `valid` is then true only when all of it is.

Result (agent.cdp.checks; docs/proofs.md): `{"valid", "level", "complete", "format",
"checks": {chain_integrity, final_hash, signature, step_count (int), evidence,
session_binding, destruction_complete, signer[, envelope]}, "errors": {check: reason},
"unverified": {check: reason}}`.  A check is true (checked, holds), false (checked,
fails) or null (could not be checked — never shown as passed).

Which check a structural fault fails: the document itself (not an object, unknown
`cdp_version`, a missing or unknown top-level field) fails `chain_integrity`; chain
entries `chain_integrity`; the attestation block and `binding_signature` `signature`;
evidence `evidence`; `session_id`/`created_at`/`destroyed_at` disagreeing with step 8
`session_binding`.  The attestation `key_id` must have the SPEC 7 form and its 8-hex
suffix must be the fingerprint of the embedded public key (else `signature`).

Stripped evidence (no `evidence` key, or null): `evidence` is unverifiable; the top-level
`session_id`/`created_at`/`destroyed_at`/`destruction_state` are bound only by a
`binding_signature` — without one, `session_binding` and `destruction_complete` are
unverifiable and the proof is not `complete`.  `signer` needs a trust source
(agent.cdp.trust): without one it is unverifiable and the level is at most
"self-consistent".
"""

from __future__ import annotations

import hashlib
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.cdp.canonical import CanonicalError
from agent.cdp.chain import GENESIS, PREFIX, STEPS, chain_step, evidence_hash, signed_message
from agent.cdp.checks import (
    CHECKS,
    Unverifiable,
    decode_b64,
    destruction_complete,
    evidence_matches_chain,
    finish,
    new_result,
    run,
    run_all,
    step_counter,
)
from agent.cdp.checks import Fail as _Fail
from agent.cdp.document import CDP_VERSION, binding_message
from agent.cdp.trust import TrustSource, check_signer

__all__ = ["CHECKS", "decode_b64", "verify", "verify_cdp"]

TOP_FIELDS = ("cdp_version", "session_id", "created_at", "destroyed_at", "chain", "final_hash",
              "attestation", "destruction_state", "evidence", "binding_signature")
OPTIONAL_TOP = {"evidence", "binding_signature"}
CHAIN_FIELDS = {"step", "subsystem", "operation", "evidence_hash", "chain_hash"}
ATTEST_FIELDS = {"algorithm", "public_key", "signature", "key_id"}
_HASH = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_KEY_ID = re.compile(r"^nrx-verify-[0-9]{8}T[0-9]{6}Z-([0-9a-f]{8})\Z")


def verify_cdp(cdp: object, trust: TrustSource | None = None) -> dict:
    """Verify one CDP v1.0 document (no unwrapping).  Never raises."""
    res = new_result("cdp-1.0")
    state: dict = {}

    def structure() -> None:
        if not isinstance(cdp, dict):
            raise _Fail(f"document is a {type(cdp).__name__}, not an object")
        if cdp.get("cdp_version") != CDP_VERSION:
            raise _Fail("cdp_version is not \"1.0\"")
        missing = [k for k in TOP_FIELDS if k not in cdp and k not in OPTIONAL_TOP]
        if missing:
            raise _Fail(f"missing field {missing[0]}")
        extra = sorted(k for k in cdp if k not in TOP_FIELDS)
        if extra:
            raise _Fail(f"unexpected field {str(extra[0])[:40]}")
        for k in ("session_id", "created_at", "destroyed_at", "destruction_state"):
            if not isinstance(cdp[k], str):
                raise _Fail(f"{k} is not a string")
        if cdp["destruction_state"] not in ("complete", "incomplete"):
            raise _Fail("destruction_state is neither complete nor incomplete")

    def chain_integrity() -> None:
        structure()
        assert isinstance(cdp, dict)  # structure() raised otherwise
        chain = cdp["chain"]
        if not isinstance(chain, list):
            raise _Fail("chain is not a list")
        if len(chain) != len(STEPS):
            raise _Fail(f"chain has {len(chain)} steps, expected {len(STEPS)}")
        prev = GENESIS
        for i, (entry, (step, subsystem, operation)) in enumerate(zip(chain, STEPS, strict=True)):
            if not isinstance(entry, dict) or set(entry) != CHAIN_FIELDS:
                raise _Fail(f"chain[{i}] does not have exactly the fields {sorted(CHAIN_FIELDS)}")
            if type(entry["step"]) is not int or entry["step"] != step:
                raise _Fail(f"chain[{i}].step is not {step}")
            if entry["subsystem"] != subsystem or entry["operation"] != operation:
                raise _Fail(f"chain[{i}] is not labelled {subsystem}/{operation}")
            eh, ch = entry["evidence_hash"], entry["chain_hash"]
            if not (isinstance(eh, str) and _HASH.match(eh)):
                raise _Fail(f"chain[{i}].evidence_hash is not sha256:<64 hex>")
            if not (isinstance(ch, str) and _HASH.match(ch)):
                raise _Fail(f"chain[{i}].chain_hash is not sha256:<64 hex>")
            prev = chain_step(prev, step, subsystem, operation, eh[len(PREFIX):])
            if ch != PREFIX + prev:
                raise _Fail(f"chain[{i}].chain_hash does not recompute")
        state["h8"] = PREFIX + prev

    def final_hash() -> None:
        if not isinstance(cdp, dict):
            raise _Fail("document is not an object")
        fh = cdp.get("final_hash")
        if not (isinstance(fh, str) and _HASH.match(fh)):
            raise _Fail("final_hash is not sha256:<64 hex>")
        chain = cdp.get("chain")
        if not isinstance(chain, list) or len(chain) != len(STEPS) or not isinstance(chain[-1], dict):
            raise _Fail("no step 8 to compare with")
        if fh != chain[-1].get("chain_hash"):
            raise _Fail("final_hash differs from step 8 chain_hash")

    def signature() -> None:
        if not isinstance(cdp, dict):
            raise _Fail("document is not an object")
        att = cdp.get("attestation")
        if not isinstance(att, dict):
            raise _Fail("attestation is missing or not an object")
        if set(att) != ATTEST_FIELDS:
            raise _Fail(f"attestation does not have exactly the fields {sorted(ATTEST_FIELDS)}")
        if att["algorithm"] != "Ed25519":
            raise _Fail("attestation.algorithm is not Ed25519")
        pk = decode_b64(att["public_key"], 32, "public_key")
        m = _KEY_ID.match(att["key_id"]) if isinstance(att["key_id"], str) else None
        if m is None:
            raise _Fail("attestation.key_id is not nrx-verify-<YYYYMMDDTHHMMSSZ>-<8 hex>")
        if m.group(1) != hashlib.sha256(pk).hexdigest()[:8]:
            raise _Fail("attestation.key_id does not name the embedded public key")
        sig = decode_b64(att["signature"], 64, "signature")
        fh = cdp.get("final_hash")
        if not (isinstance(fh, str) and _HASH.match(fh)):
            raise _Fail("final_hash is not sha256:<64 hex>")
        key = Ed25519PublicKey.from_public_bytes(pk)
        try:
            key.verify(sig, signed_message(fh))
        except (InvalidSignature, ValueError):
            raise _Fail("signature does not verify with the embedded public key") from None
        if cdp.get("binding_signature") is None:
            return
        bsig = decode_b64(cdp["binding_signature"], 64, "binding_signature")
        try:
            key.verify(bsig, binding_message(cdp))
        except (InvalidSignature, CanonicalError):
            raise _Fail("binding_signature does not verify: session_id, created_at, "
                        "destroyed_at or destruction_state was changed") from None
        state["bound"] = True

    def evidence() -> None:
        if not isinstance(cdp, dict):
            raise _Fail("document is not an object")
        evidence_matches_chain(cdp, len(STEPS), evidence_hash)

    def session_binding() -> str | None:
        if not isinstance(cdp, dict):
            raise _Fail("document is not an object")
        if not isinstance(cdp.get("session_id"), str):
            raise _Fail("session_id is not a string")
        ev = cdp.get("evidence")
        if ev is None:
            if state.get("bound"):
                return "signed by binding_signature; step 8 evidence stripped"
            raise Unverifiable("evidence stripped and no binding_signature: session_id, "
                               "created_at and destroyed_at are not bound")
        if not isinstance(ev, list) or len(ev) != len(STEPS) or not isinstance(ev[-1], dict):
            raise _Fail("no step 8 evidence to bind to")
        last = ev[-1]
        for k in ("session_id", "created_at", "destroyed_at"):
            if k not in last:
                raise _Fail(f"step 8 evidence lacks {k}")
            if last[k] != cdp.get(k):
                raise _Fail(f"{k} differs from step 8 evidence")
        return None

    from agent.cdp.receiptkeys import add_receipt_keys_check

    return add_receipt_keys_check(run_all(res, {
        "chain_integrity": chain_integrity, "final_hash": final_hash, "signature": signature,
        "step_count": step_counter(cdp), "evidence": evidence,
        "session_binding": session_binding,
        "destruction_complete": lambda: destruction_complete(
            cdp, signed_state=bool(state.get("bound"))),
        "signer": lambda: check_signer(trust, cdp.get("attestation") if isinstance(cdp, dict)
                                       else None,
                                       cdp.get("destroyed_at") if isinstance(cdp, dict) else None)}),
        cdp, trust)


def _is_rendition(doc: object) -> bool:
    return isinstance(doc, dict) and doc.get("cdp_version") == "2.1"


def _verify_rendition(doc: object, trust: TrustSource | None) -> dict:
    from agent.cdp.auditproof import verify_auditproof

    return verify_auditproof(doc, trust)


def _is_wrapper(doc: object) -> bool:
    return isinstance(doc, dict) and "cdp_version" not in doc \
        and ("cdp" in doc or "auditproof" in doc)


def _verify_wrapper(doc: dict, trust: TrustSource | None) -> dict:
    from agent.cdp.envelope import check_envelope

    if "cdp" not in doc:
        return _verify_rendition(doc["auditproof"], trust)
    res = verify_cdp(doc["cdp"], trust)
    wrapper_sid = doc.get("session_id")
    if isinstance(wrapper_sid, str) and isinstance(doc["cdp"], dict) \
            and doc["cdp"].get("session_id") != wrapper_sid:
        res["checks"]["session_binding"] = False
        res["unverified"].pop("session_binding", None)
        res["notes"].pop("session_binding", None)
        res["errors"]["session_binding"] = "wrapper session_id differs from the CDP's"
    run(res, "envelope", lambda: check_envelope(doc))
    finish(res)
    if doc.get("auditproof") is not None:
        sub = _verify_rendition(doc["auditproof"], trust)
        res["auditproof"] = sub
        res["valid"] = bool(res["valid"] and sub["valid"])
        res["complete"] = bool(res["complete"] and sub["complete"])
        if not res["valid"]:
            res["level"] = "invalid"
        elif sub["level"] != res["level"]:
            res["level"] = "self-consistent"
    return res


def verify(doc: object, trust: TrustSource | None = None) -> dict:
    """Verify a CDP, an AuditProof 2.1 rendition, or a wrapper of either (a destroy
    result); `trust` is where trusted signer keys come from (None: signer not checked).
    Never raises."""
    try:
        if _is_wrapper(doc):
            assert isinstance(doc, dict)
            return _verify_wrapper(doc, trust)
        if _is_rendition(doc):
            return _verify_rendition(doc, trust)
        return verify_cdp(doc, trust)
    except Exception as e:  # belt and braces: the checks above already catch everything
        res = new_result("unknown")
        res["errors"]["chain_integrity"] = f"malformed: {type(e).__name__}"
        return res
