"""The AuditProof 2.1 rendition of a CDP (SPEC 14): what Nanorix's official verifier
(`nanorix.verifier.verify`) accepts, derived from the same eight evidence objects as the
v1.0 CDP and signed by the same attestation key.

- chain: SHA-512, genesis SHA-512(""); entry i hashes `prev ‖ 0 ‖ subsystem ‖ 0 ‖
  "destroy" ‖ 0 ‖ method ‖ 0 ‖ destroyed_at` with the format's fixed (subsystem, method)
  per position; `evidence_hash` = `sha512:` + SHA-512(C(our evidence i)); `operation` is
  our SPEC 5 operation name (descriptive; the format does not hash it).
- signature: Ed25519 over the 128 ASCII hex of SHA-512(JCS(canonical view)); JCS is the
  `rfc8785` library (a maintained RFC 8785 implementation), not hand-written.  The chain,
  and with it every evidence hash, is inside the canonical view, so the signature binds
  our evidence.
- reserved slots are never emitted; `activity` holds only facts the agent knows:
  `capsule_started` (network "sealed": loopback only; `region` only when configured),
  `commands_executed` (the exec count) and `capsule_destroyed`.
- the eight evidence objects ride along under `evidence` (outside the canonical view, but
  bound through the evidence hashes); a rendition may be shared without them.

`verify_auditproof(doc)` returns the same result shape as `verify.verify` and never raises.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.cdp.canonical import canonical_json
from agent.cdp.chain import STEPS, encodings
from agent.cdp.checks import Fail as _Fail
from agent.cdp.checks import (
    Unverifiable,
    destruction_complete,
    evidence_matches_chain,
    new_result,
    run_all,
    step_counter,
)
from agent.cdp.checks import decode_b64 as _b64
from agent.cdp.document import Signer, b64, destruction_state
from agent.cdp.trust import TrustSource, check_signer

__all__ = ["AUDITPROOF_VERSION", "GENESIS_512", "RESERVED_SLOTS", "STEPS_21",
           "build_auditproof", "canonical_view", "canonical_view_hash", "chain_512",
           "evidence_hash_512", "verify_auditproof"]

AUDITPROOF_VERSION = "2.1"
PREFIX = "sha512:"
GENESIS_512 = hashlib.sha512(b"").hexdigest()

# (subsystem, method) fixed per position by the 2.1 format.
STEPS_21: tuple[tuple[str, str], ...] = (
    ("eee_namespace", "procfs_verification"),
    ("eee_tmpfs", "mountinfo_verification"),
    ("eee_memory", "dod_5220_multipass_wipe"),
    ("dire_keys", "ed25519_key_destruction"),
    ("dire_identity", "credential_incineration"),
    ("fgx_forensic", "merkle_tree_verification"),
    ("rzl_audit", "hash_chain_validation"),
    ("capsule_destroy", "capsule_lifecycle_verification"),
)
RESERVED_SLOTS = ("customer_attestation", "policy_attestation", "third_party_attestation",
                  "retention_policy_attestation", "witness_signatures", "pqc_attestation",
                  "customer_pqc_attestation")
OPTIONAL_SIGNED = ("parent_audit_proof_id", "cdp_kind", "parent_proofs_merkle_root",
                   "record_receipts_merkle_root")
REQUIRED = ("cdp_version", "signing_mode", "hash_algorithm", "signature_algorithm",
            "capsule_id", "org_id", "jurisdiction", "authority_id", "signing_key_version",
            "activity", "chain", "destroyed_at", "destruction_state", "final_hash",
            "attestation")
OPTIONAL = ("destruction_failure_step", "runtime_attestation", "timestamp_attestation",
            "attestation_chain_fingerprint", "evidence", *RESERVED_SLOTS)
CHAIN_FIELDS = {"step", "subsystem", "operation", "evidence_hash", "chain_hash"}
ATTEST_FIELDS = {"algorithm", "key_id", "public_key", "signature"}
_H512 = re.compile(r"^sha512:[0-9a-f]{128}\Z")
_KEY_ID = re.compile(r"^nrx-verify-[0-9]{8}T[0-9]{6}Z-([0-9a-f]{8})\Z")


def evidence_hash_512(evidence: object) -> str:
    """`sha512:` + hex SHA-512 of the canonical JSON (SPEC 6) of one evidence object."""
    return PREFIX + hashlib.sha512(canonical_json(evidence)).hexdigest()


def _hash_512(encoded: bytes) -> str:
    return PREFIX + hashlib.sha512(encoded).hexdigest()


def _step_512(prev_hex: str, subsystem: str, method: str, destroyed_at: str) -> str:
    msg = b"\x00".join(s.encode("utf-8") for s in (prev_hex, subsystem, "destroy", method,
                                                    destroyed_at))
    return hashlib.sha512(msg).hexdigest()


def chain_512(evidence: Sequence[object], destroyed_at: str,
              encoded: Sequence[bytes] | None = None) -> tuple[list[dict], str]:
    """The 8 rendition chain entries and `final_hash` for our 8 evidence objects
    (`encoded`: the same already in canonical JSON, as for chain.build_chain)."""
    if len(evidence) != len(STEPS_21):
        raise ValueError(f"expected {len(STEPS_21)} evidence objects, got {len(evidence)}")
    encoded = encodings(evidence, encoded)
    prev = GENESIS_512
    out = []
    for (step, _sub, operation), (subsystem, method), data in zip(STEPS, STEPS_21, encoded,
                                                                  strict=True):
        prev = _step_512(prev, subsystem, method, destroyed_at)
        out.append({"step": step, "subsystem": subsystem, "operation": operation,
                    "evidence_hash": _hash_512(data), "chain_hash": PREFIX + prev})
    return out, PREFIX + prev


def canonical_view(doc: Mapping) -> dict:
    """The fixed canonical view the 2.1 signature covers (absent values read as null)."""
    skv = doc.get("signing_key_version")
    try:
        skv_int = int(skv) if isinstance(skv, str) else 0
    except ValueError:
        skv_int = 0
    fp = doc.get("attestation_chain_fingerprint")
    view: dict[str, object] = {
        "version": doc.get("cdp_version"),
        "signing_mode": doc.get("signing_mode"),
        "jurisdiction": doc.get("jurisdiction"),
        "authority_id": doc.get("authority_id"),
        "signing_key_version": skv_int,
        "capsule_id": doc.get("capsule_id"),
        "org_id": doc.get("org_id") if doc.get("org_id") is not None else "",
        "activity_trail": doc.get("activity") if doc.get("activity") is not None else [],
        "destruction_chain": doc.get("chain") if doc.get("chain") is not None else [],
        "destruction_state": doc.get("destruction_state"),
        "destruction_failure_step": doc.get("destruction_failure_step"),
        "runtime_attestation": doc.get("runtime_attestation"),
        "attestation": {
            "timestamp_attestation": doc.get("timestamp_attestation"),
            "attestation_chain_fingerprint": fp if isinstance(fp, str) and fp else None,
        },
        "hash_algorithm": doc.get("hash_algorithm"),
        "signature_algorithm": doc.get("signature_algorithm"),
    }
    for k in OPTIONAL_SIGNED:
        if doc.get(k) is not None:
            view[k] = doc[k]
    return view


def canonical_view_hash(doc: Mapping) -> str:
    """128 lowercase hex of SHA-512(JCS(canonical view)); the signed message is its ASCII."""
    return hashlib.sha512(rfc8785.dumps(canonical_view(doc))).hexdigest()


def _activity(created_at: str, destroyed_at: str, exec_count: int, region: str | None,
              state: str) -> list[dict]:
    started: dict = {"event": "capsule_started", "network": "sealed", "timestamp": created_at}
    if region:
        started["region"] = region
    return [started,
            {"event": "commands_executed", "count": int(exec_count)},
            {"event": "capsule_destroyed", "destruction_state": state,
             "timestamp": destroyed_at}]


def build_auditproof(*, signer: Signer, customer_id: str, jurisdiction: str,
                     authority_id: str, signing_key_version: int, exec_count: int,
                     region: str | None = None, cdp_v1: Mapping | None = None,
                     evidence: Sequence[dict] | None = None, session_id: str | None = None,
                     created_at: str | None = None, destroyed_at: str | None = None,
                     include_evidence: bool = True,
                     encoded: Sequence[bytes] | None = None) -> dict:
    """A signed AuditProof 2.1 rendition, from a v1.0 CDP (`cdp_v1`, evidence included)
    or from `evidence` + `session_id` + `created_at` + `destroyed_at`.  `encoded`: the
    evidence already in canonical JSON (chain_512)."""
    if cdp_v1 is not None:
        evidence = cdp_v1["evidence"] if evidence is None else evidence
        session_id = session_id or cdp_v1["session_id"]
        created_at = created_at or cdp_v1["created_at"]
        destroyed_at = destroyed_at or cdp_v1["destroyed_at"]
    if evidence is None or session_id is None or created_at is None or destroyed_at is None:
        raise ValueError("build_auditproof needs cdp_v1 with evidence, or evidence, "
                         "session_id, created_at and destroyed_at")
    if type(signing_key_version) is not int or signing_key_version < 0:
        raise ValueError("signing_key_version must be a non-negative int")
    evidence = list(evidence)
    chain, final_hash = chain_512(evidence, destroyed_at, encoded)
    state = destruction_state(evidence)
    doc: dict = {
        "cdp_version": AUDITPROOF_VERSION,
        "signing_mode": "nanorix_only",
        "hash_algorithm": "SHA-512",
        "signature_algorithm": "Ed25519",
        "capsule_id": session_id,
        "org_id": customer_id,
        "jurisdiction": jurisdiction,
        "authority_id": authority_id,
        "signing_key_version": str(signing_key_version),
        "activity": _activity(created_at, destroyed_at, exec_count, region, state),
        "chain": chain,
        "destroyed_at": destroyed_at,
        "destruction_state": state,
    }
    if state != "complete":
        doc["destruction_failure_step"] = next(
            i + 1 for i, ev in enumerate(evidence) if not (isinstance(ev, dict)
                                                           and ev.get("ok") is True))
    doc["final_hash"] = final_hash
    sig = signer.sign(canonical_view_hash(doc).encode("ascii"))
    doc["attestation"] = {"algorithm": "Ed25519", "key_id": signer.key_id,
                          "public_key": b64(bytes(signer.public_key)), "signature": b64(sig)}
    if include_evidence:
        doc["evidence"] = evidence
    return doc


# -- verification -------------------------------------------------------------------


def verify_auditproof(doc: object, trust: TrustSource | None = None) -> dict:
    """Verify a 2.1 rendition; the result shape of `verify.verify`.  Never raises.
    Structural faults (version, modes, reserved slots, missing or unknown fields) fail
    `chain_integrity`.  The signature covers `capsule_id`, `destroyed_at` (through the
    chain) and `destruction_state`, so a stripped rendition still binds them."""
    res: dict = new_result("auditproof-2.1")
    d = doc if isinstance(doc, dict) else None
    signed: dict = {}

    def need_doc() -> dict:
        if d is None:
            raise _Fail(f"document is a {type(doc).__name__}, not an object")
        return d

    def structure() -> None:
        x = need_doc()
        if x.get("cdp_version") != AUDITPROOF_VERSION:
            raise _Fail("cdp_version is not \"2.1\"")
        for k, want in (("signing_mode", "nanorix_only"), ("hash_algorithm", "SHA-512"),
                        ("signature_algorithm", "Ed25519")):
            if x.get(k) != want:
                raise _Fail(f"{k} is not {want}")
        for slot in RESERVED_SLOTS:
            if x.get(slot) is not None:
                raise _Fail(f"reserved slot {slot} is populated")
        missing = [k for k in REQUIRED if k not in x]
        if missing:
            raise _Fail(f"missing field {missing[0]}")
        extra = sorted(str(k) for k in x if k not in REQUIRED and k not in OPTIONAL
                       and k not in OPTIONAL_SIGNED)
        if extra:
            raise _Fail(f"unexpected field {extra[0][:40]}")
        for k in ("capsule_id", "org_id", "jurisdiction", "authority_id", "destroyed_at",
                  "signing_key_version"):
            if not isinstance(x[k], str):
                raise _Fail(f"{k} is not a string")
        if not x["signing_key_version"].isdigit():
            raise _Fail("signing_key_version is not a decimal integer")
        if x["destruction_state"] not in ("complete", "incomplete"):
            raise _Fail("destruction_state is neither complete nor incomplete")
        if not isinstance(x["activity"], list):
            raise _Fail("activity is not a list")

    def chain_integrity() -> None:
        structure()
        x = need_doc()
        ch = x.get("chain")
        if not isinstance(ch, list) or len(ch) != len(STEPS_21):
            raise _Fail(f"chain is not a list of {len(STEPS_21)} steps")
        prev = GENESIS_512
        for i, (entry, (subsystem, method), (step, _s, operation)) in enumerate(
                zip(x["chain"], STEPS_21, STEPS, strict=True)):
            if not isinstance(entry, dict) or set(entry) != CHAIN_FIELDS:
                raise _Fail(f"chain[{i}] does not have exactly the fields {sorted(CHAIN_FIELDS)}")
            if type(entry["step"]) is not int or entry["step"] != step:
                raise _Fail(f"chain[{i}].step is not {step}")
            if entry["subsystem"] != subsystem or entry["operation"] != operation:
                raise _Fail(f"chain[{i}] is not labelled {subsystem}/{operation}")
            if not (isinstance(entry["evidence_hash"], str) and _H512.match(entry["evidence_hash"])):
                raise _Fail(f"chain[{i}].evidence_hash is not sha512:<128 hex>")
            prev = _step_512(prev, subsystem, method, x["destroyed_at"])
            if entry["chain_hash"] != PREFIX + prev:
                raise _Fail(f"chain[{i}].chain_hash does not recompute")

    def final_hash() -> None:
        x = need_doc()
        fh, ch = x.get("final_hash"), x.get("chain")
        if not (isinstance(fh, str) and _H512.match(fh)):
            raise _Fail("final_hash is not sha512:<128 hex>")
        if not isinstance(ch, list) or len(ch) != len(STEPS_21) or not isinstance(ch[-1], dict):
            raise _Fail("no step 8 to compare with")
        if fh != ch[-1].get("chain_hash"):
            raise _Fail("final_hash differs from step 8 chain_hash")

    def signature() -> None:
        x = need_doc()
        att = x.get("attestation")
        if not isinstance(att, dict) or set(att) != ATTEST_FIELDS:
            raise _Fail(f"attestation does not have exactly the fields {sorted(ATTEST_FIELDS)}")
        if att["algorithm"] != "Ed25519":
            raise _Fail("attestation.algorithm is not Ed25519")
        pk = _b64(att["public_key"], 32, "public_key")
        sig = _b64(att["signature"], 64, "signature")
        m = _KEY_ID.match(att["key_id"]) if isinstance(att["key_id"], str) else None
        if m is None:
            raise _Fail("attestation.key_id is not nrx-verify-<YYYYMMDDTHHMMSSZ>-<8 hex>")
        if m.group(1) != hashlib.sha256(pk).hexdigest()[:8]:
            raise _Fail("attestation.key_id does not name the embedded public key")
        try:
            msg = canonical_view_hash(x).encode("ascii")
        except (rfc8785.CanonicalizationError, TypeError, ValueError) as e:
            raise _Fail(f"canonical view cannot be serialised: {type(e).__name__}") from None
        try:
            Ed25519PublicKey.from_public_bytes(pk).verify(sig, msg)
        except (InvalidSignature, ValueError):
            raise _Fail("signature does not verify with the embedded public key") from None
        signed["view"] = True

    def evidence() -> None:
        x = need_doc()
        ev = evidence_matches_chain(x, len(STEPS_21), evidence_hash_512) or []
        bad = [i + 1 for i, o in enumerate(ev) if o.get("ok") is not True]
        if x.get("destruction_failure_step") != (bad[0] if bad else None):
            raise _Fail("destruction_failure_step disagrees with the evidence")

    def session_binding() -> str | None:
        x = need_doc()
        if not isinstance(x.get("capsule_id"), str):
            raise _Fail("capsule_id is not a string")
        ev = x.get("evidence")
        if ev is None:
            if signed.get("view"):
                return "capsule_id and destroyed_at are signed; step 8 evidence stripped"
            raise Unverifiable("evidence stripped and the signature did not verify: "
                               "capsule_id is not bound")
        if not isinstance(ev, list) or len(ev) != len(STEPS_21) or not isinstance(ev[-1], dict):
            raise _Fail("no step 8 evidence to bind to")
        last = ev[-1]
        if last.get("session_id") != x.get("capsule_id"):
            raise _Fail("capsule_id differs from step 8 session_id")
        if last.get("destroyed_at") != x.get("destroyed_at"):
            raise _Fail("destroyed_at differs from step 8 evidence")
        if "jurisdiction" in last and last["jurisdiction"] != x.get("jurisdiction"):
            raise _Fail("jurisdiction differs from step 8 evidence")
        act = x.get("activity")
        started = next((e for e in act if isinstance(e, dict)
                        and e.get("event") == "capsule_started"), None) \
            if isinstance(act, list) else None
        if started is not None and "timestamp" in started \
                and started["timestamp"] != last.get("created_at"):
            raise _Fail("capsule_started timestamp differs from step 8 created_at")
        return None

    from agent.cdp.receiptkeys import add_receipt_keys_check

    return add_receipt_keys_check(run_all(res, {
        "chain_integrity": chain_integrity, "final_hash": final_hash, "signature": signature,
        "step_count": step_counter(doc, len(STEPS_21)), "evidence": evidence,
        "session_binding": session_binding,
        "destruction_complete": lambda: destruction_complete(
            doc, signed_state=bool(signed.get("view"))),
        "signer": lambda: check_signer(trust, d.get("attestation") if d is not None else None,
                                       d.get("destroyed_at") if d is not None else None)}),
        doc, trust)
