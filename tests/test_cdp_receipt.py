"""Exec receipts (SPEC 4): signed over the hex SHA-256 of their canonical JSON, Merkle-bound in step 8."""

from __future__ import annotations

import base64
import copy
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.cdp import merkle
from agent.cdp.canonical import canonical_json
from agent.cdp.receipt import (
    FIELDS,
    build_receipt,
    receipt_digest,
    receipt_leaf,
    receipts_root,
    verify_receipt,
)
from agent.keys.session import SessionKey

SID = "sess_0123456789abcdef"


def _fields(seq: int = 1) -> dict:
    h = hashlib.sha256(b"").hexdigest()
    return {"session_id": SID, "seq": seq, "command_sha256": h, "input_sha256": h,
            "output_sha256": h, "stderr_sha256": h, "exit_code": 0, "timed_out": False,
            "started_at": "2026-03-01T14:00:01Z", "finished_at": "2026-03-01T14:00:02Z"}


@pytest.fixture
def key() -> SessionKey:
    return SessionKey.generate(SID)


def test_build_and_verify(key):
    """A receipt signed by the session key verifies with its public key; fields in SPEC order."""
    r = build_receipt(_fields(), key)
    assert list(r) == list(FIELDS)
    assert r["key_id"] == key.key_id and r["signature"].startswith("base64:")
    assert verify_receipt(r, key.public_key)


def test_signature_over_hex_digest(key):
    """The signature covers the 64 ASCII hex of SHA-256(C(receipt without signature))."""
    r = build_receipt(_fields(), key)
    body = {k: v for k, v in r.items() if k != "signature"}
    msg = hashlib.sha256(canonical_json(body)).hexdigest().encode()
    assert receipt_digest(r).encode() == msg
    Ed25519PublicKey.from_public_bytes(key.public_key).verify(
        base64.b64decode(r["signature"][7:]), msg)


@pytest.mark.parametrize("field", [f for f in FIELDS if f != "signature"])
def test_any_field_change_breaks(key, field):
    """Changing any signed field makes the receipt fail verification."""
    r = build_receipt(_fields(), key)
    t = copy.deepcopy(r)
    v = t[field]
    t[field] = (not v) if isinstance(v, bool) else (v + 1 if isinstance(v, int) else v + "0")
    assert not verify_receipt(t, key.public_key)


@pytest.mark.parametrize("bad", [None, [], {}, {"signature": "x"}, "receipt"])
def test_verify_never_raises(key, bad):
    """Malformed receipts verify False without raising."""
    assert verify_receipt(bad, key.public_key) is False


def test_wrong_key(key):
    """Another session's key does not verify the receipt."""
    r = build_receipt(_fields(), key)
    assert not verify_receipt(r, SessionKey.generate(SID).public_key)


def test_fields_checked(key):
    """Missing or extra fields are refused when building."""
    f = _fields()
    del f["seq"]
    with pytest.raises(ValueError):
        build_receipt(f, key)
    with pytest.raises(ValueError):
        build_receipt({**_fields(), "command": "ls"}, key)


def test_leaf_and_root(key):
    """The leaf is SHA-256(C(full receipt)); the root is the SPEC 6 Merkle root of the leaves."""
    rs = [build_receipt(_fields(i), key) for i in range(1, 4)]
    leaves = [hashlib.sha256(canonical_json(r)).digest() for r in rs]
    assert [receipt_leaf(r) for r in rs] == leaves
    assert receipts_root(rs) == merkle.merkle_root(leaves)
    assert receipts_root([]) == hashlib.sha256(b"").hexdigest()


def test_zeroized_key_cannot_sign(key):
    """After step 4 zeroizes the key, no receipt can be signed."""
    key.zeroize()
    with pytest.raises(RuntimeError):
        build_receipt(_fields(), key)
