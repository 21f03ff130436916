"""Evidence serialised once (issue 18): the fast canonical JSON gives the same bytes as the
copy-and-sort form, and proofs built from the pipeline's encodings equal proofs built from
the evidence objects, byte for byte (pure; the vector's node key)."""

from __future__ import annotations

import copy
import enum
import json

import pytest
from vectors.loader import load_vector, vector_signer

from agent.cdp import canonical
from agent.cdp.auditproof import build_auditproof, chain_512
from agent.cdp.canonical import CanonicalError, canonical_json, normalize
from agent.cdp.chain import build_chain
from agent.cdp.document import build_cdp
from agent.cdp.envelope import destroy_result, encoded_destroy_result
from agent.cdp.verify import verify
from agent.regulatory import regulatory_context

VEC = load_vector()
NODE = vector_signer(VEC)


class Level(enum.IntEnum):
    HIGH = 3


class Tag(str):
    pass


def _slow(obj: object) -> bytes:
    """The reference form: every dict copied with its keys in UTF-16 order, then encoded."""
    return canonical._ENCODER.encode(normalize(obj)).encode("utf-8")


@pytest.mark.parametrize("value", [
    {"b": 1, "a": [True, None, "x"], "é": {"z": -5, "y": 10**30}},
    {"\ue000": 1, "\U0001f600": 2, "a": 3},   # code-point and UTF-16 orders differ here
    {"k": {"\U00010000": [], "\uffff": {}}},
    {"n": Level.HIGH, "s": Tag("t"), "t": (1, 2)},  # subclasses and tuples
    [{"a": 1}, [], {}, "", 0],
])
def test_fast_canonical_equals_copy_and_sort(value):
    """canonical_json gives the bytes of the copy-and-sort form, keys beyond U+FFFF included."""
    assert canonical_json(value) == _slow(value)


def test_orders_differ_only_beyond_bmp():
    """The fallback is needed: Python's key order puts U+E000 before U+1F600, UTF-16 does not."""
    value = {"\ue000": 1, "\U0001f600": 2}
    assert json.dumps(value, sort_keys=True, ensure_ascii=False) != canonical_json(value).decode()
    assert canonical_json(value).decode() == '{"\U0001f600":2,"\ue000":1}'


@pytest.mark.parametrize("bad", [1.5, {"a": [float("nan")]}, {1: "x"}, {"a": object()},
                                 "\ud800", {"\ud800": 1}])
def test_fast_canonical_refuses_what_it_always_refused(bad):
    """Floats, non-string keys, other types and lone surrogates still raise CanonicalError."""
    with pytest.raises(CanonicalError):
        canonical_json(bad)


def test_too_deep_is_a_canonical_error():
    """Nesting beyond 512 levels is refused as CanonicalError, not a RecursionError."""
    deep: list = []
    cur = deep
    for _ in range(600):
        cur.append([])
        cur = cur[0]
    with pytest.raises(CanonicalError):
        canonical_json(deep)


def test_proof_from_sealed_encodings_is_the_same_proof():
    """The CDP and the AuditProof built from the pipeline's encodings equal those built from
    the evidence objects, and the result's spool bytes are its canonical JSON."""
    ev = copy.deepcopy(VEC["cdp"]["evidence"])
    encoded = [canonical_json(e) for e in ev]
    args = dict(session_id=VEC["cdp"]["session_id"], created_at=VEC["cdp"]["created_at"],
                destroyed_at=VEC["cdp"]["destroyed_at"], evidence=ev, signer=NODE)
    cdp, cdp_enc = build_cdp(**args), build_cdp(**args, encoded=encoded)
    assert cdp == cdp_enc == VEC["cdp"]
    assert build_chain(ev, encoded) == build_chain(ev)
    assert chain_512(ev, cdp["destroyed_at"], encoded) == chain_512(ev, cdp["destroyed_at"])
    ap_args = dict(signer=NODE, customer_id="cust-a", jurisdiction="US",
                   authority_id="nrx-node:test", signing_key_version=1, exec_count=2,
                   cdp_v1=cdp)
    ap = build_auditproof(**ap_args)
    assert build_auditproof(**ap_args, encoded=encoded) == ap
    parts = dict(signer=NODE, session_id=cdp["session_id"], status="destroyed",
                 reason="requested", cdp=cdp, auditproof=ap,
                 regulatory_context=regulatory_context("PHI", "US"),
                 session_context={"jurisdiction": "US", "data_classification": "PHI"})
    result, data = encoded_destroy_result(**parts)
    assert data == canonical_json(result)
    assert json.dumps(result) == json.dumps(normalize(destroy_result(**parts)))
    assert list(result) == sorted(result) and list(result["cdp"]) == sorted(result["cdp"])
    assert verify(result["cdp"])["valid"] is True


def test_encodings_must_match_the_evidence_count():
    """A chain is never built from fewer encodings than evidence objects."""
    ev = VEC["cdp"]["evidence"]
    with pytest.raises(ValueError):
        build_chain(ev, [canonical_json(e) for e in ev[:7]])
    with pytest.raises(ValueError):
        chain_512(ev, "2026-03-01T14:30:00Z", [canonical_json(e) for e in ev[:7]])


def test_canonical_pair_is_normalize_and_canonical_json():
    """canonical_pair gives normalize()'s value (same key order) and canonical_json's bytes,
    on plain values and on the ones that need the UTF-16 order or plain types first."""
    for value in ({"b": [1, (2, 3)], "a": {"z": None, "é": True}},
                  {"\ue000": 1, "\U0001f600": {"y": 1, "x": 2}},
                  {"n": Level.HIGH, "s": Tag("t")}):
        norm, data = canonical.canonical_pair(value)
        assert json.dumps(norm) == json.dumps(normalize(value))
        assert data == canonical_json(value)
    with pytest.raises(CanonicalError):
        canonical.canonical_pair({"a": 0.5})
