"""Test helpers for proofs: the shared CDP vector and a deterministic signer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.keys.attestation import make_key_id

HERE = Path(__file__).resolve().parent
SHARED = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "cdp-v1.json"
LOCAL = HERE / "cdp-v1.json"


def vector_path() -> Path:
    """`../shared/vectors/cdp-v1.json` beside the clone when present, else the local copy."""
    return SHARED if SHARED.is_file() else LOCAL


def load_vector() -> dict:
    with open(vector_path(), encoding="utf-8") as f:
        return json.load(f)


class SeedSigner:
    """A Signer from a known seed (test keys only)."""

    def __init__(self, seed: bytes, key_id: str | None = None) -> None:
        self._k = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_key = self._k.public_key().public_bytes_raw()
        self.key_id = key_id or make_key_id(1772323200, self.public_key)

    def sign(self, msg: bytes) -> bytes:
        return self._k.sign(msg)


def vector_signer(v: dict | None = None) -> SeedSigner:
    v = v or load_vector()
    return SeedSigner(bytes.fromhex(v["ed25519_private_seed_hex"]),
                      v["cdp"]["attestation"]["key_id"])


def vector_evidence() -> list[dict]:
    return copy.deepcopy(load_vector()["cdp"]["evidence"])
