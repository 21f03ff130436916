"""The CDP v1.0 hash chain of SPEC 6: evidence hashes, genesis, per-step chain hashes
and `final_hash`.  Pure functions; hashes are written `sha256:` + 64 lowercase hex."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from agent.cdp.canonical import canonical_json

__all__ = ["GENESIS", "PREFIX", "STEPS", "build_chain", "chain_step", "evidence_hash",
           "encodings", "hash_encoded", "signed_message"]

PREFIX = "sha256:"
GENESIS = hashlib.sha256(b"").hexdigest()

# (step, subsystem, operation) of SPEC 5, in order.
STEPS: tuple[tuple[int, str, str], ...] = (
    (1, "eee_namespace", "environment_isolation"),
    (2, "eee_tmpfs", "filesystem_destruction"),
    (3, "eee_memory", "multipass_overwrite"),
    (4, "dire_keys", "key_zeroization"),
    (5, "dire_identity", "credential_incineration"),
    (6, "fgx_forensic", "merkle_zero_verification"),
    (7, "rzl_audit", "chain_integrity_seal"),
    (8, "session_destroy", "lifecycle_completion"),
)


def evidence_hash(evidence: object) -> str:
    """`sha256:` + hex SHA-256 of the canonical JSON of one evidence object."""
    return hash_encoded(canonical_json(evidence))


def encodings(evidence: Sequence[object], encoded: Sequence[bytes] | None) -> Sequence[bytes]:
    """`encoded` (each evidence object already in canonical JSON, as the pipeline sealed
    it), checked to be one per object; or the objects serialised now when None."""
    if encoded is None:
        return [canonical_json(ev) for ev in evidence]
    if len(encoded) != len(evidence):
        raise ValueError("one canonical encoding per evidence object")
    return encoded


def hash_encoded(encoded: bytes) -> str:
    """`evidence_hash` of an evidence object already in canonical JSON (the pipeline
    encodes each step's evidence once, when the step is sealed)."""
    return PREFIX + hashlib.sha256(encoded).hexdigest()


def chain_step(prev_hex: str, step: int, subsystem: str, operation: str,
               evidence_hash_hex: str) -> str:
    """h_i (64 hex, no prefix) from h_{i-1} and the step's fields; all operands are ASCII
    text joined by NUL bytes.  `evidence_hash_hex` is without its `sha256:` prefix."""
    msg = b"\x00".join(s.encode("utf-8") for s in (prev_hex, str(step), subsystem, operation,
                                                    evidence_hash_hex))
    return hashlib.sha256(msg).hexdigest()


def build_chain(evidence: Sequence[object],
                encoded: Sequence[bytes] | None = None) -> tuple[list[dict], str]:
    """The 8 chain entries for the 8 evidence objects (in step order) and `final_hash`.
    `encoded`: the same objects already in canonical JSON (DestroyOutcome.evidence_json),
    so they are not serialised again."""
    if len(evidence) != len(STEPS):
        raise ValueError(f"expected {len(STEPS)} evidence objects, got {len(evidence)}")
    encoded = encodings(evidence, encoded)
    prev = GENESIS
    chain = []
    for (step, subsystem, operation), data in zip(STEPS, encoded, strict=True):
        eh = hash_encoded(data)
        prev = chain_step(prev, step, subsystem, operation, eh[len(PREFIX):])
        chain.append({"step": step, "subsystem": subsystem, "operation": operation,
                      "evidence_hash": eh, "chain_hash": PREFIX + prev})
    return chain, PREFIX + prev


def signed_message(final_hash: str) -> bytes:
    """The bytes the attestation signature covers: the 64 ASCII hex of h_8."""
    h = final_hash[len(PREFIX):] if final_hash.startswith(PREFIX) else final_hash
    return h.encode("ascii")
