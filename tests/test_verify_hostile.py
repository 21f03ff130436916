"""The verifier survives hostile input: valid false with the failing check, never an exception."""

from __future__ import annotations

import base64
import copy

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vectors.loader import load_vector, vector_signer

from agent.cdp.document import build_cdp
from agent.cdp.verify import CHECKS, verify
from agent.keys.attestation import make_key_id


@pytest.fixture
def cdp() -> dict:
    return copy.deepcopy(load_vector()["cdp"])


def _bad(doc, check: str) -> dict:
    res = verify(doc)
    assert res["valid"] is False and res["level"] == "invalid", res
    if check == "step_count":  # the seed's shape: the count found, an integer
        assert type(res["checks"][check]) is int and res["checks"][check] != 8, res
    else:
        assert res["checks"][check] is False, res
    assert isinstance(res["errors"][check], str) and 0 < len(res["errors"][check]) <= 200
    assert set(CHECKS) <= set(res["checks"])
    return res


@pytest.mark.parametrize("doc", [None, 1, "x", [], 1.5, True, {}])
def test_not_a_document(doc):
    """Anything that is not a CDP object fails chain_integrity (and step_count, counted 0)."""
    res = _bad(doc, "chain_integrity")
    assert res["checks"]["step_count"] == 0 and "step_count" in res["errors"]


@pytest.mark.parametrize("field", ["cdp_version", "session_id", "created_at", "destroyed_at",
                                   "chain", "final_hash", "destruction_state"])
def test_missing_top_field(cdp, field):
    """A missing required top-level field fails chain_integrity."""
    del cdp[field]
    _bad(cdp, "chain_integrity")


def test_missing_attestation(cdp):
    """A missing attestation block fails signature."""
    del cdp["attestation"]
    _bad(cdp, "signature")


def test_extra_top_field(cdp):
    """An unknown top-level field fails chain_integrity."""
    cdp["hello"] = 1
    _bad(cdp, "chain_integrity")


def test_extra_chain_field(cdp):
    """An unknown field in a chain entry fails chain_integrity."""
    cdp["chain"][4]["note"] = "x"
    _bad(cdp, "chain_integrity")


def test_extra_attestation_field(cdp):
    """An unknown field in the attestation fails signature."""
    cdp["attestation"]["extra"] = "x"
    _bad(cdp, "signature")


@pytest.mark.parametrize("path,value,check", [
    (("chain", 0, "step"), "1", "chain_integrity"),
    (("chain", 0, "step"), True, "chain_integrity"),
    (("chain", 2, "evidence_hash"), 5, "chain_integrity"),
    (("chain",), {"a": 1}, "step_count"),
    (("final_hash",), None, "final_hash"),
    (("session_id",), 7, "session_binding"),
    (("evidence",), "stripped", "evidence"),
    (("evidence", 3), [1, 2], "evidence"),
    (("attestation",), [], "signature"),
    (("attestation", "public_key"), 42, "signature"),
    (("attestation", "algorithm"), "RSA", "signature"),
    (("destruction_state",), "done", "chain_integrity"),
])
def test_wrong_types(cdp, path, value, check):
    """Wrong types at any level fail the check that owns the field."""
    target = cdp
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    _bad(cdp, check)


@pytest.mark.parametrize("value", ["base64:!!!not base64!!!", "X8DybyfkCFuPG8xGHbF2I3n3PU8NK9GuLmIgiNPQl14=",
                                   "base64:", "base64:AAAA", "base64:" + "A" * 10000])
def test_bad_public_key(cdp, value):
    """Non-base64, unprefixed, empty, short or huge public keys fail signature."""
    cdp["attestation"]["public_key"] = value
    _bad(cdp, "signature")


@pytest.mark.parametrize("nbytes", [0, 32, 63, 65, 128])
def test_wrong_length_signature(cdp, nbytes):
    """Signatures that are not 64 bytes fail signature."""
    cdp["attestation"]["signature"] = "base64:" + base64.b64encode(bytes(nbytes)).decode()
    _bad(cdp, "signature")


def test_der_wrapped_public_key(cdp):
    """A SubjectPublicKeyInfo (DER) public key is refused: the format is raw 32 bytes."""
    raw = base64.b64decode(cdp["attestation"]["public_key"][7:])
    der = Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    cdp["attestation"]["public_key"] = "base64:" + base64.b64encode(der).decode()
    res = _bad(cdp, "signature")
    assert "44 bytes" in res["errors"]["signature"]


def test_other_key_signature(cdp):
    """A signature by another key (embedded key swapped) fails signature."""
    other = build_cdp(session_id="sess_0000000000000000", created_at="x", destroyed_at="y",
                      evidence=cdp["evidence"], signer=_OtherSigner())
    cdp["attestation"]["public_key"] = other["attestation"]["public_key"]
    _bad(cdp, "signature")


class _OtherSigner:
    def __init__(self) -> None:
        self._k = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
        self.public_key = self._k.public_key().public_bytes_raw()
        self.key_id = make_key_id(0, self.public_key)

    def sign(self, msg: bytes) -> bytes:
        return self._k.sign(msg)


def test_ten_thousand_steps(cdp):
    """A chain of 10,000 steps fails step_count and chain_integrity quickly."""
    cdp["chain"] = [copy.deepcopy(cdp["chain"][0]) for _ in range(10_000)]
    res = _bad(cdp, "step_count")
    assert res["checks"]["step_count"] == 10_000
    assert res["checks"]["chain_integrity"] is False


def test_fifty_megabyte_document(cdp):
    """A 50 MB evidence field is hashed, found not to match, and reported, not crashed on."""
    cdp["evidence"][1]["padding"] = "A" * (50 * 1024 * 1024)
    _bad(cdp, "evidence")


def test_deeply_nested_evidence(cdp):
    """Evidence nested 100,000 levels deep fails evidence without a RecursionError."""
    deep: list = []
    cur = deep
    for _ in range(100_000):
        nxt: list = []
        cur.append(nxt)
        cur = nxt
    cdp["evidence"][0]["deep"] = deep
    _bad(cdp, "evidence")


def test_float_in_evidence(cdp):
    """A float in evidence fails evidence with a reason naming it."""
    cdp["evidence"][2]["bytes"] = 1.0
    res = _bad(cdp, "evidence")
    assert "float" in res["errors"]["evidence"]


def test_destruction_state_lie(cdp):
    """destruction_state "complete" over evidence with ok false is caught by evidence."""
    ev = copy.deepcopy(cdp["evidence"])
    ev[3]["ok"] = False
    doc = build_cdp(session_id=cdp["session_id"], created_at=cdp["created_at"],
                    destroyed_at=cdp["destroyed_at"], evidence=ev, signer=vector_signer())
    doc["destruction_state"] = "complete"
    _bad(doc, "evidence")


def test_stripped_evidence_still_valid(cdp):
    """Without evidence the chain and signature still verify (SPEC 6)."""
    del cdp["evidence"]
    res = verify(cdp)
    assert res["valid"] is True, res


def test_step8_binding_fields(cdp):
    """created_at or destroyed_at differing from step 8 evidence fails session_binding."""
    for k in ("created_at", "destroyed_at"):
        doc = copy.deepcopy(cdp)
        doc[k] = "2030-01-01T00:00:00Z"
        _bad(doc, "session_binding")


def test_wrapper_session_mismatch(cdp):
    """A destroy result whose session_id differs from its CDP's fails session_binding."""
    _bad({"session_id": "sess_ffffffffffffffff", "status": "destroyed", "cdp": cdp},
         "session_binding")


def test_wrapper_with_non_dict_cdp():
    """A wrapper whose cdp is not an object is invalid, not an exception."""
    _bad({"cdp": [1, 2, 3]}, "chain_integrity")


def test_uppercase_hash(cdp):
    """An uppercase hex chain hash is not the canonical form and fails chain_integrity."""
    cdp["chain"][0]["chain_hash"] = "sha256:" + cdp["chain"][0]["chain_hash"][7:].upper()
    _bad(cdp, "chain_integrity")


@pytest.mark.parametrize("key_id", ["nrx-verify-20260301T000000Z-00000000", "nrx-verify-x",
                                    "", 5, "nrx-receipt-a8f3e71c4b2d9f06"])
def test_key_id_must_name_the_key(cdp, key_id):
    """A key_id whose form or fingerprint does not match the embedded key fails signature."""
    cdp["attestation"]["key_id"] = key_id
    _bad(cdp, "signature")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["session_id", "status", "reason", "cdp", "auditproof",
                                        "regulatory_context", "session_context", "envelope",
                                        "extra"]), _json, min_size=1))
def test_hostile_destroy_results_never_raise(doc):
    """Random destroy-result-shaped wrappers (with a trust source too) give an invalid
    verdict in the documented shape, never an exception."""
    from agent.cdp.trust import KeySet

    # with a status it is a destroy result: a real CDP in it, but no real envelope
    doc.setdefault("cdp", copy.deepcopy(load_vector()["cdp"]) if "status" in doc else None)
    for trust in (None, KeySet([], "none")):
        res = verify(doc, trust)
        assert res["valid"] is False and res["level"] == "invalid"
        assert type(res["checks"]["step_count"]) is int
