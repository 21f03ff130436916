"""Assemble and sign a CDP v1.0 document (SPEC 6), keys in the SPEC's order, and its
optional binding signature (docs/proofs.md, "binding_signature").

The SPEC 6 signature covers only `final_hash` (and through it the evidence), so without
evidence nothing signs `session_id`, `created_at`, `destroyed_at` or `destruction_state`.
`add_binding` adds `binding_signature`: Ed25519 by the same attestation key over the 64
ASCII hex of SHA-256(C(binding view)), where the binding view is `{"purpose":
"nanorix-agent/cdp-binding/1", cdp_version, session_id, created_at, destroyed_at,
destruction_state, final_hash, key_id}`.  `build_cdp` itself does not add it, so the
shared v1.0 vector still reproduces byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Protocol

from agent.cdp.canonical import canonical_json
from agent.cdp.chain import build_chain, signed_message

__all__ = ["BINDING_PURPOSE", "CDP_VERSION", "Signer", "add_binding", "b64", "binding_message",
           "build_cdp", "destruction_state"]

CDP_VERSION = "1.0"
BINDING_PURPOSE = "nanorix-agent/cdp-binding/1"
BOUND_FIELDS = ("cdp_version", "session_id", "created_at", "destroyed_at", "destruction_state",
                "final_hash")


class Signer(Protocol):
    """What signs a proof: an attestation key (agent.keys.attestation) or a test key."""

    key_id: str
    public_key: bytes  # raw 32-byte Ed25519 public key

    def sign(self, msg: bytes) -> bytes: ...  # 64-byte Ed25519 signature


def b64(raw: bytes) -> str:
    """`base64:` + standard base64 (with padding) of raw bytes."""
    return "base64:" + base64.b64encode(raw).decode("ascii")


def destruction_state(evidence: Sequence[object]) -> str:
    """"complete" iff every evidence object is a dict with `ok` exactly true."""
    ok = all(isinstance(ev, dict) and ev.get("ok") is True for ev in evidence)
    return "complete" if ok else "incomplete"


def build_cdp(*, session_id: str, created_at: str, destroyed_at: str,
              evidence: Sequence[dict], signer: Signer,
              encoded: Sequence[bytes] | None = None) -> dict:
    """A signed CDP v1.0 for the 8 evidence objects; raises CanonicalError on a float.
    `encoded`: the evidence objects already in canonical JSON (chain.build_chain)."""
    evidence = list(evidence)
    chain, final_hash = build_chain(evidence, encoded)
    signature = signer.sign(signed_message(final_hash))
    if len(signature) != 64:
        raise ValueError("signer returned a signature that is not 64 bytes")
    return {
        "cdp_version": CDP_VERSION,
        "session_id": session_id,
        "created_at": created_at,
        "destroyed_at": destroyed_at,
        "chain": chain,
        "final_hash": final_hash,
        "attestation": {
            "algorithm": "Ed25519",
            "public_key": b64(bytes(signer.public_key)),
            "signature": b64(bytes(signature)),
            "key_id": signer.key_id,
        },
        "destruction_state": destruction_state(evidence),
        "evidence": evidence,
    }


def binding_message(cdp: dict) -> bytes:
    """The bytes `binding_signature` covers: 64 ASCII hex of SHA-256(C(binding view)).
    Raises CanonicalError (a ValueError) when a bound field is not canonical JSON."""
    att = cdp.get("attestation")
    view = {"purpose": BINDING_PURPOSE, **{k: cdp.get(k) for k in BOUND_FIELDS},
            "key_id": att.get("key_id") if isinstance(att, dict) else None}
    return hashlib.sha256(canonical_json(view)).hexdigest().encode("ascii")


def add_binding(cdp: dict, signer: Signer) -> dict:
    """A copy of a signed CDP with `binding_signature` by `signer` (the key that signed
    it: the verifier checks it with the embedded public key)."""
    if cdp["attestation"]["key_id"] != signer.key_id:
        raise ValueError("binding_signature must come from the key that signed the CDP")
    sig = signer.sign(binding_message(cdp))
    return {**cdp, "binding_signature": b64(bytes(sig))}
