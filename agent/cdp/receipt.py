"""Exec receipts (SPEC 4): signed by the session key, bound into step 8 by a Merkle root.

signature = Ed25519 over the 64 ASCII hex characters of SHA-256(C(receipt without
`signature`)), written like attestation signatures: `base64:` + standard base64 of the
64 raw bytes.  The Merkle leaf of a receipt is SHA-256(C(full receipt, signature
included)) as raw 32 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.cdp.canonical import CanonicalError, canonical_json
from agent.cdp.document import Signer, b64
from agent.cdp.merkle import merkle_root

__all__ = ["FIELDS", "build_receipt", "receipt_digest", "receipt_leaf", "receipts_root",
           "verify_receipt"]

# Field order of a receipt, `signature` last.
FIELDS = ("session_id", "seq", "command_sha256", "input_sha256", "output_sha256",
          "stderr_sha256", "exit_code", "timed_out", "started_at", "finished_at", "key_id",
          "signature")
# An exec cut off by the end of its session (TTL, OOM, operator, agent crash) carries
# `interrupted: <reason>` after `timed_out` (issue 12); every other receipt has FIELDS.
INTERRUPTED_FIELDS = (*FIELDS[:8], "interrupted", *FIELDS[8:])


def _fields_of(body: Mapping) -> tuple[str, ...]:
    return INTERRUPTED_FIELDS if "interrupted" in body else FIELDS


def receipt_digest(fields: Mapping) -> str:
    """Hex SHA-256 of the canonical JSON of the receipt without its signature."""
    body = {k: v for k, v in fields.items() if k != "signature"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def build_receipt(fields: Mapping, signer: Signer) -> dict:
    """A signed receipt from the 11 unsigned fields (FIELDS minus signature; `key_id`
    defaults to the signer's).  Extra or missing fields raise ValueError."""
    body = dict(fields)
    body.setdefault("key_id", signer.key_id)
    body.pop("signature", None)
    order = _fields_of(body)
    want = set(order) - {"signature"}
    if set(body) != want:
        raise ValueError(f"receipt fields must be exactly {sorted(want)}")
    sig = signer.sign(receipt_digest(body).encode("ascii"))
    out = {k: body[k] for k in order if k != "signature"}
    out["signature"] = b64(sig)
    return out


def receipt_leaf(receipt: Mapping) -> bytes:
    """Raw 32-byte Merkle leaf: SHA-256 of the canonical JSON of the whole receipt."""
    return hashlib.sha256(canonical_json(dict(receipt))).digest()


def receipts_root(receipts: Sequence[Mapping]) -> str:
    """Hex Merkle root over the receipts in `seq` order as given (step 8 `receipts_root`)."""
    return merkle_root([receipt_leaf(r) for r in receipts])


def verify_receipt(receipt: object, public_key: bytes) -> bool:
    """True when `receipt` is well formed and its signature verifies under `public_key`
    (raw 32 bytes).  Never raises."""
    try:
        if not isinstance(receipt, Mapping) or set(receipt) != set(_fields_of(receipt)):
            return False
        if "interrupted" in receipt and not isinstance(receipt["interrupted"], str):
            return False
        sig = receipt["signature"]
        if not isinstance(sig, str) or not sig.startswith("base64:"):
            return False
        raw = base64.b64decode(sig[7:], validate=True)
        if len(raw) != 64 or len(public_key) != 32:
            return False
        msg = receipt_digest(receipt).encode("ascii")
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(raw, msg)
        return True
    except (InvalidSignature, CanonicalError, binascii.Error, ValueError, TypeError):
        return False
