"""The destroy result as one signed whole (docs/proofs.md, "envelope").

A destroy result is `{session_id, status, reason, cdp, auditproof, regulatory_context,
session_context, envelope}`.  The CDP and the rendition are signed on their own; the
envelope ties everything else to them and to the node key:

    "envelope": {"key_id": <the CDP's attestation key_id>,
                 "cdp_sha256": "sha256:" + hex SHA-256(C(cdp without "evidence")),
                 "auditproof_sha256": "sha256:" + hex SHA-256(C(auditproof without "evidence")),
                 "signature": "base64:" + Ed25519 over the 64 ASCII hex of SHA-256(C(view))}

    view = {"purpose": "nanorix-agent/destroy-result/1", session_id, status, reason,
            regulatory_context, session_context, cdp_sha256, auditproof_sha256, key_id}

signed by the CDP's attestation key (so whoever trusts the CDP's signer trusts the
envelope).  Evidence is left out of the hashes so a result may be shared without it (the
chains bind the evidence).  A destroy result without an envelope is invalid (removing it
is an edit).  `check_envelope` also cross-checks the parts, so two sessions' parts
cannot be paired even in a wrapper that is not a destroy result: the rendition's
`capsule_id`, `destroyed_at`, `destruction_state`, signing key and per-step evidence
hashes must match the CDP's, and `status`, `reason`, `session_context` must match the
CDP's step 8 evidence when it is present.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.cdp.canonical import canonical_json, canonical_pair
from agent.cdp.checks import Fail, Unverifiable, decode_b64
from agent.cdp.document import Signer, add_binding, b64

__all__ = ["ENVELOPE_PURPOSE", "RESULT_FIELDS", "check_envelope", "destroy_result",
           "encoded_destroy_result"]

ENVELOPE_PURPOSE = "nanorix-agent/destroy-result/1"
RESULT_FIELDS = ("session_id", "status", "reason", "cdp", "auditproof", "regulatory_context",
                 "session_context", "envelope")
UNSIGNED_WITHOUT_ENVELOPE = ("status", "reason", "regulatory_context", "session_context")
ENVELOPE_FIELDS = {"key_id", "cdp_sha256", "auditproof_sha256", "signature"}
ENDED = {"destroyed": "complete", "expired": "complete", "expired_unclean": "incomplete"}


def part_hash(part: object) -> str | None:
    """`sha256:` + hex SHA-256 of C(part without its evidence); None for no part."""
    if part is None:
        return None
    if not isinstance(part, Mapping):
        raise Fail("a signed part is not an object")
    return "sha256:" + hashlib.sha256(canonical_json(
        {k: v for k, v in part.items() if k != "evidence"})).hexdigest()


def envelope_message(result: Mapping, env: Mapping) -> bytes:
    view = {"purpose": ENVELOPE_PURPOSE,
            **{k: result.get(k) for k in ("session_id", "status", "reason",
                                          "regulatory_context", "session_context")},
            "cdp_sha256": env.get("cdp_sha256"), "auditproof_sha256": env.get("auditproof_sha256"),
            "key_id": env.get("key_id")}
    return hashlib.sha256(canonical_json(view)).hexdigest().encode("ascii")


def destroy_result(*, signer: Signer, session_id: str, status: str, reason: str, cdp: dict,
                   auditproof: dict | None, regulatory_context: object,
                   session_context: dict) -> dict:
    """The signed destroy result: the CDP gets its `binding_signature`, the whole gets its
    `envelope`; keys in canonical order, the order the spool stores and `proof.get`
    answers, so both send the same bytes."""
    return encoded_destroy_result(
        signer=signer, session_id=session_id, status=status, reason=reason, cdp=cdp,
        auditproof=auditproof, regulatory_context=regulatory_context,
        session_context=session_context)[0]


def encoded_destroy_result(*, signer: Signer, session_id: str, status: str, reason: str,
                           cdp: dict, auditproof: dict | None, regulatory_context: object,
                           session_context: dict) -> tuple[dict, bytes]:
    """destroy_result() and its canonical JSON, the bytes the spool stores: the value is
    checked once, copied once in canonical key order (sharing its strings: a live
    session keeps its result) and serialised once, instead of being normalised and then
    serialised again by the spool."""
    cdp = add_binding(cdp, signer)
    result = {"session_id": session_id, "status": status, "reason": reason, "cdp": cdp,
              "auditproof": auditproof, "regulatory_context": regulatory_context,
              "session_context": session_context}
    env = {"key_id": signer.key_id, "cdp_sha256": part_hash(cdp),
           "auditproof_sha256": part_hash(auditproof)}
    env["signature"] = b64(bytes(signer.sign(envelope_message(result, env))))
    result["envelope"] = env
    out, data = canonical_pair(result)
    assert isinstance(out, dict)
    return out, data


def _cross_check(doc: Mapping) -> None:
    """The parts agree with each other (pairing of two sessions' parts); Fail otherwise."""
    from agent.cdp.auditproof import evidence_hash_512

    cdp, ap = doc.get("cdp"), doc.get("auditproof")
    if not isinstance(cdp, Mapping):
        raise Fail("cdp is not an object")
    ev = cdp.get("evidence")
    last = ev[-1] if isinstance(ev, list) and ev and isinstance(ev[-1], Mapping) else None
    status = doc.get("status")
    if "status" in doc:
        if not isinstance(status, str) or status not in ENDED:
            raise Fail("status is not destroyed, expired or expired_unclean")
        if ENDED[status] != cdp.get("destruction_state"):
            raise Fail(f"status {status} contradicts destruction_state")
    if last is not None:
        # a failed step 8 may not have written its final status; its reason is set first
        for k in ("status", "reason") if last.get("ok") is True else ("reason",):
            if k in doc and k in last and doc[k] != last[k]:
                raise Fail(f"{k} differs from the CDP's step 8 evidence")
        sc = doc.get("session_context")
        if isinstance(sc, Mapping):
            for k in ("jurisdiction", "data_classification"):
                if k in last and sc.get(k) != last[k]:
                    raise Fail(f"session_context.{k} differs from the CDP's step 8 evidence")
    if ap is None:
        return
    if not isinstance(ap, Mapping):
        raise Fail("auditproof is not an object")
    if ap.get("capsule_id") != cdp.get("session_id"):
        raise Fail("auditproof capsule_id differs from the CDP's session_id")
    for k in ("destroyed_at", "destruction_state"):
        if ap.get(k) != cdp.get(k):
            raise Fail(f"auditproof {k} differs from the CDP's")
    a1, a2 = cdp.get("attestation"), ap.get("attestation")
    if not (isinstance(a1, Mapping) and isinstance(a2, Mapping)
            and a1.get("public_key") == a2.get("public_key")):
        raise Fail("the CDP and the rendition are signed by different keys")
    sc = doc.get("session_context")
    if isinstance(sc, Mapping) and sc.get("jurisdiction") != ap.get("jurisdiction"):
        raise Fail("session_context.jurisdiction differs from the rendition's")
    chain = ap.get("chain")
    if isinstance(ev, list) and isinstance(chain, list) and len(ev) == len(chain):
        for i, (obj, entry) in enumerate(zip(ev, chain, strict=True)):
            try:
                h = evidence_hash_512(obj)
            except ValueError:
                raise Fail(f"cdp evidence[{i}] is not canonical JSON") from None
            if not isinstance(entry, Mapping) or entry.get("evidence_hash") != h:
                raise Fail(f"the rendition's step {i + 1} is not the CDP's evidence")


def check_envelope(doc: Mapping) -> None:
    """The `envelope` check of a destroy result: Fail on any edit, on pairing, and on a
    destroy result (it has status, reason or a context) without its envelope;
    Unverifiable for other wrappers (e.g. `{cdp, auditproof}`), which get the
    cross-checks only."""
    _cross_check(doc)
    env = doc.get("envelope")
    if env is None:
        unsigned = [k for k in UNSIGNED_WITHOUT_ENVELOPE if k in doc]
        if unsigned:  # a destroy result always carries one: removing it is an edit
            raise Fail(f"destroy result without envelope: {', '.join(unsigned)} not signed")
        raise Unverifiable("no envelope (not a destroy result): only the proofs are checked")
    if not isinstance(env, Mapping) or set(env) != ENVELOPE_FIELDS:
        raise Fail(f"envelope does not have exactly the fields {sorted(ENVELOPE_FIELDS)}")
    extra = sorted(str(k) for k in doc if k not in RESULT_FIELDS)
    if extra:
        raise Fail(f"field {extra[0][:40]} is not covered by the envelope")
    cdp = doc["cdp"]
    att = cdp.get("attestation") if isinstance(cdp, Mapping) else None
    if not isinstance(att, Mapping) or env["key_id"] != att.get("key_id"):
        raise Fail("envelope key_id is not the CDP's signing key")
    pk = decode_b64(att.get("public_key"), 32, "public_key")
    if env["cdp_sha256"] != part_hash(cdp):
        raise Fail("cdp is not the one the envelope signed")
    if env["auditproof_sha256"] != part_hash(doc.get("auditproof")):
        raise Fail("auditproof is not the one the envelope signed")
    sig = decode_b64(env["signature"], 64, "envelope signature")
    try:
        Ed25519PublicKey.from_public_bytes(pk).verify(sig, envelope_message(doc, env))
    except (InvalidSignature, ValueError):
        raise Fail("envelope signature does not verify: status, reason, session_id, "
                   "regulatory_context or session_context was changed") from None
