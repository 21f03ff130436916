"""Assemble and sign a CDP v1.0 document (SPEC 6), keys in the SPEC's order."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Protocol

from agent.cdp.chain import build_chain, signed_message

__all__ = ["CDP_VERSION", "Signer", "b64", "build_cdp", "destruction_state"]

CDP_VERSION = "1.0"


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
              evidence: Sequence[dict], signer: Signer) -> dict:
    """A signed CDP v1.0 for the 8 evidence objects; raises CanonicalError on a float."""
    evidence = list(evidence)
    chain, final_hash = build_chain(evidence)
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
