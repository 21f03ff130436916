"""The shared CDP v1.0 vector reproduces byte for byte (SPEC 6)."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from vectors.loader import LOCAL, SHARED, load_vector, vector_signer

from agent.cdp import chain, merkle
from agent.cdp.canonical import CanonicalError, canonical_json
from agent.cdp.document import build_cdp, destruction_state
from agent.cdp.verify import verify


@pytest.fixture(scope="module")
def vec() -> dict:
    return load_vector()


def test_local_copy_matches_shared():
    """The fallback copy under tests/vectors is identical to the shared vector when both exist."""
    if not SHARED.is_file():
        pytest.skip("shared/vectors not beside the clone")
    assert LOCAL.read_bytes() == SHARED.read_bytes()


def test_canonical_evidence_1(vec):
    """Canonical JSON of evidence 1 equals the vector's bytes."""
    assert canonical_json(vec["cdp"]["evidence"][0]) == vec["canonical_evidence_1"].encode()


def test_genesis(vec):
    """The chain genesis is SHA-256 of the empty string."""
    assert chain.GENESIS == vec["genesis"]


def test_evidence_and_chain_hashes(vec):
    """Every evidence hash and chain hash recomputes from the evidence."""
    entries, final = chain.build_chain(vec["cdp"]["evidence"])
    assert [e["evidence_hash"] for e in entries] == vec["evidence_hashes"]
    assert [e["chain_hash"] for e in entries] == vec["chain_hashes"]
    assert final == vec["cdp"]["final_hash"] == vec["chain_hashes"][-1]
    assert entries == vec["cdp"]["chain"]


def test_zero_merkle_root_683(vec):
    """The zero-block Merkle root for 683 blocks matches the vector and step 6 evidence."""
    assert merkle.zero_root(683) == vec["zero_merkle_root_683_blocks"]
    assert vec["cdp"]["evidence"][5]["expected_root"] == merkle.zero_root(683)


def test_whole_document_from_seed(vec):
    """build_cdp with the vector's seed gives the vector's CDP, same bytes and key order."""
    src = vec["cdp"]
    doc = build_cdp(session_id=src["session_id"], created_at=src["created_at"],
                    destroyed_at=src["destroyed_at"], evidence=src["evidence"],
                    signer=vector_signer(vec))
    assert json.dumps(doc, ensure_ascii=False) == json.dumps(src, ensure_ascii=False)
    assert list(doc) == ["cdp_version", "session_id", "created_at", "destroyed_at", "chain",
                         "final_hash", "attestation", "destruction_state", "evidence"]
    assert list(doc["attestation"]) == ["algorithm", "public_key", "signature", "key_id"]
    assert doc["attestation"]["signature"] == src["attestation"]["signature"]


def test_vector_verifies(vec):
    """The vector's CDP, and the vector file itself (a wrapper with a cdp key), verify valid:
    every check passes except the two that need what the vector does not carry (a trust
    source; an envelope), which say so as null."""
    for doc in (vec["cdp"], vec):
        res = verify(doc)
        assert res["valid"] is True and res["complete"] is True, res
        assert res["level"] == "self-consistent"
        assert res["checks"]["step_count"] == 8
        nulls = {k for k, v in res["checks"].items() if v is None}
        assert nulls == ({"signer", "envelope"} if doc is vec else {"signer"}), res
        assert all(v for k, v in res["checks"].items() if k not in nulls)


@pytest.mark.parametrize("idx", range(6))
def test_invalid_variants(vec, idx):
    """Every invalid variant is invalid with its named checks false and a reason given."""
    variant = vec["invalid_variants"][idx]
    res = verify(variant["cdp"])
    assert res["valid"] is variant["expect_valid"] is False
    for check in variant["failing_checks"]:
        assert res["checks"][check] is False, (variant["name"], res)
        assert res["errors"][check]


def test_invalid_variant_count(vec):
    """The vector carries the six invalid variants this suite parametrises over."""
    assert len(vec["invalid_variants"]) == 6


def test_destruction_state_incomplete(vec):
    """One evidence with ok false makes the document incomplete; still signed and valid."""
    ev = json.loads(json.dumps(vec["cdp"]["evidence"]))
    ev[2]["ok"] = False
    ev[2]["error"] = "readback_nonzero"
    assert destruction_state(ev) == "incomplete"
    src = vec["cdp"]
    doc = build_cdp(session_id=src["session_id"], created_at=src["created_at"],
                    destroyed_at=src["destroyed_at"], evidence=ev, signer=vector_signer(vec))
    assert doc["destruction_state"] == "incomplete"
    res = verify(doc)
    assert res["valid"] is True and res["checks"]["destruction_complete"] is False


def test_canonical_rejects_float():
    """A float anywhere is refused with a CanonicalError naming the problem."""
    with pytest.raises(CanonicalError, match="float"):
        canonical_json({"a": [1, {"b": 1.5}]})


def test_canonical_rejects_bad_types():
    """Non-str keys, bytes and sets are refused."""
    for bad in ({1: "x"}, {"a": b"x"}, {"a": {1, 2}}):
        with pytest.raises(CanonicalError):
            canonical_json(bad)


def test_canonical_huge_int_is_canonical_error():
    """An int too long to print is a CanonicalError, not a bare ValueError."""
    with pytest.raises(CanonicalError):
        canonical_json({"n": 10**5000})


def test_canonical_form_details():
    """Sorted keys, no whitespace, non-ASCII kept, bools/None/ints as JSON, controls escaped."""
    out = canonical_json({"b": [True, None, -3], "a": "é\n", "é": 0})
    assert out == '{"a":"é\\n","b":[true,null,-3],"é":0}'.encode()


def test_canonical_utf16_key_order():
    """Keys sort by UTF-16 code units as RFC 8785 says (U+10000 sorts before U+FFFD)."""
    out = canonical_json({"\ufffd": 1, "\U00010000": 2})
    assert out == '{"\U00010000":2,"\ufffd":1}'.encode()


def test_merkle_small_trees():
    """Merkle roots match the definition: pairs hashed, odd node promoted, empty = SHA-256("")."""
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    h = lambda a, b: hashlib.sha256(a + b).digest()  # noqa: E731
    assert merkle.merkle_root([]) == hashlib.sha256(b"").hexdigest()
    assert merkle.merkle_root(leaves[:1]) == leaves[0].hex()
    assert merkle.merkle_root(leaves) == h(h(leaves[0], leaves[1]), leaves[2]).hex()


def test_zero_root_matches_full_tree():
    """zero_root(n) equals the root of n explicit zero-block leaves for n in 0..300."""
    for n in range(301):
        assert merkle.zero_root(n) == merkle.merkle_root([merkle.ZERO_BLOCK_LEAF] * n), n


def test_zero_root_is_logarithmic():
    """zero_root of 2**40 blocks returns at once (it never hashes n blocks)."""
    t = time.perf_counter()
    merkle.zero_root(2**40 + 12345)
    assert time.perf_counter() - t < 0.05


def test_merkle_100k_leaves_fast():
    """A Merkle root over 100,000 leaves takes well under a second."""
    leaves = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(100_000)]
    t = time.perf_counter()
    merkle.merkle_root(leaves)
    assert time.perf_counter() - t < 1.0


def test_merkle_rejects_bad_leaves():
    """A leaf that is not a 32-byte digest is refused."""
    with pytest.raises(ValueError):
        merkle.merkle_root([b"short"])


def test_selftests_pass():
    """The health self-tests (embedded vector constants) pass and agree with the vector file."""
    from agent.cdp import selftest

    vec = load_vector()
    assert selftest.chain_vector_ok() and selftest.zero_merkle_ok()
    assert selftest._EVIDENCE_1 == vec["cdp"]["evidence"][0]
    assert selftest._ZERO_683 == vec["zero_merkle_root_683_blocks"]
