"""Proofs that cannot be faked (issue 14), pure: binding_signature, the destroy result's
envelope, trust anchors and levels, on documents built with the vector's node key."""

from __future__ import annotations

import copy
import json

import pytest
from proof_forgery import foreign_signer, leaf_edits, resign, resign_rendition, swaps
from vectors.loader import load_vector, vector_signer

from agent.cdp.auditproof import build_auditproof, verify_auditproof
from agent.cdp.document import add_binding, build_cdp
from agent.cdp.envelope import destroy_result
from agent.cdp.trust import KeySet, LookupTrust, keyset, parse_keys
from agent.cdp.verify import verify
from agent.keys.attestation import AttestationKeyStore
from agent.regulatory import regulatory_context

VEC = load_vector()
NODE = vector_signer(VEC)
NODE_KEYS = KeySet(parse_keys({"key_id": NODE.key_id, "algorithm": "Ed25519",
                               "public_key": VEC["cdp"]["attestation"]["public_key"],
                               "created_at": "2026-03-01T00:00:00Z"}), "test node keys")


def _session(sid: str, *, reason: str, classification: str, jurisdiction: str,
             signer=NODE, created="2026-03-01T14:00:00Z",
             destroyed="2026-03-01T14:30:00Z") -> dict:
    """A destroy result as the service builds it, from the vector's evidence."""
    ev = copy.deepcopy(VEC["cdp"]["evidence"])
    ev[7].update(session_id=sid, created_at=created, destroyed_at=destroyed, reason=reason,
                 status="destroyed" if reason == "requested" else "expired",
                 data_classification=classification, jurisdiction=jurisdiction)
    cdp = build_cdp(session_id=sid, created_at=created, destroyed_at=destroyed, evidence=ev,
                    signer=signer)
    ap = build_auditproof(signer=signer, customer_id="cust-a", jurisdiction=jurisdiction,
                          authority_id="nrx-node:test", signing_key_version=1, exec_count=2,
                          cdp_v1=cdp)
    return destroy_result(signer=signer, session_id=sid, status=ev[7]["status"], reason=reason,
                          cdp=cdp, auditproof=ap,
                          regulatory_context=regulatory_context(classification, jurisdiction),
                          session_context={"jurisdiction": jurisdiction,
                                           "data_classification": classification})


A = _session("sess_a8f3e71c4b2d9f06", reason="requested", classification="PHI",
             jurisdiction="US")
B = _session("sess_0123456789abcdef", reason="ttl_expired", classification="PII",
             jurisdiction="EU", created="2026-03-01T15:00:00Z",
             destroyed="2026-03-01T15:05:00Z")


def _stripped(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "evidence"}


def test_real_result_is_provenance_and_complete():
    """A destroy result built like the service's verifies at provenance level against the
    node's keys, complete, with the envelope and every part checked."""
    res = verify(A, NODE_KEYS)
    assert res["valid"] and res["level"] == "provenance" and res["complete"], res
    assert res["checks"]["envelope"] is True and res["checks"]["signer"] is True
    assert res["auditproof"]["level"] == "provenance"
    assert res["checks"]["step_count"] == 8 and type(res["checks"]["step_count"]) is int


def test_result_key_order_is_canonical():
    """The result's keys are in canonical order at every level (what the spool stores),
    so the destroy response and proof.get encode to the same bytes."""
    assert json.dumps(A) == json.dumps(json.loads(json.dumps(A, sort_keys=True)))


def test_binding_keeps_the_vector():
    """build_cdp still reproduces the vector byte for byte; add_binding only adds one
    field, and the bound CDP is valid."""
    src = VEC["cdp"]
    doc = build_cdp(session_id=src["session_id"], created_at=src["created_at"],
                    destroyed_at=src["destroyed_at"], evidence=src["evidence"], signer=NODE)
    assert json.dumps(doc) == json.dumps(src)
    bound = add_binding(doc, NODE)
    assert set(bound) - set(doc) == {"binding_signature"}
    assert verify(bound)["valid"] is True


@pytest.mark.parametrize("edit", ["destruction_state", "session_id", "created_at",
                                  "destroyed_at"])
def test_stripped_bound_cdp_edit_detected(edit):
    """Without evidence, flipping destruction_state or changing session_id / times of a
    bound CDP breaks its binding_signature: invalid, never complete or bound."""
    doc = _stripped(A["cdp"])
    assert verify(doc)["complete"] is True  # the signed claim stands for the evidence
    doc[edit] = {"destruction_state": "incomplete", "session_id": "sess_ffffffffffffffff",
                 "created_at": "2026-03-01T13:00:00Z",
                 "destroyed_at": "2026-03-01T16:00:00Z"}[edit]
    res = verify(doc, NODE_KEYS)
    assert res["valid"] is False and res["complete"] is False
    assert res["checks"]["signature"] is False and "binding_signature" in res["errors"]["signature"]
    assert res["checks"]["session_binding"] is not True


@pytest.mark.parametrize("edit", ["destruction_state", "session_id"])
def test_stripped_unbound_cdp_is_unverifiable_not_complete(edit):
    """A stripped CDP without binding_signature (the v1.0 vector) with destruction_state
    flipped or session_id changed: session_binding and destruction_complete are
    unverifiable (null), not ticked, and the proof is not complete."""
    doc = _stripped(VEC["cdp"])
    if edit == "destruction_state":
        doc["destruction_state"] = "complete"  # already complete: flip to make a point
        doc2 = _stripped(build_cdp(session_id=doc["session_id"], created_at=doc["created_at"],
                                   destroyed_at=doc["destroyed_at"],
                                   evidence=[{**e, "ok": i != 2} for i, e in
                                             enumerate(VEC["cdp"]["evidence"])],
                                   signer=NODE))
        doc2["destruction_state"] = "complete"  # the lie
        doc = doc2
    else:
        doc["session_id"] = "sess_ffffffffffffffff"
    for trust in (None, NODE_KEYS):
        res = verify(doc, trust)
        c = res["checks"]
        assert c["session_binding"] is None and c["destruction_complete"] is None, res
        assert c["evidence"] is None and res["complete"] is False
        assert "session_binding" in res["unverified"]


def test_stripped_rendition_edits_detected():
    """A stripped 2.1 rendition signs capsule_id and destruction_state: editing either is
    a failed signature, in our verifier and in the official one."""
    from nanorix import verifier as nv

    ap = _stripped(A["auditproof"])
    assert verify_auditproof(ap, NODE_KEYS)["complete"] is True
    for k, v in (("destruction_state", "incomplete"), ("capsule_id", "sess_ffffffffffffffff")):
        doc = {**ap, k: v}
        res = verify_auditproof(doc, NODE_KEYS)
        assert res["valid"] is False and res["complete"] is False
        assert res["checks"]["session_binding"] is not True or res["checks"]["signature"] is False
        assert nv.verify(doc).ok is False


def test_official_verifier_accepts_the_service_rendition():
    """The rendition inside a destroy result still passes the official 2.1 verifier."""
    from nanorix import debug as nd
    from nanorix import verifier as nv

    assert nv.verify(A["auditproof"]).ok and nd.verify_auditproof(A["auditproof"]).stage_reached >= 7


def test_foreign_resigned_cdp_invalid_under_trust():
    """Re-signed with a fresh key, evidence edited to claim another session: valid only as
    self-consistent without trust (and said so), invalid against the node's keys."""
    forged = resign(A["cdp"], foreign_signer(), session_id="sess_ffffffffffffffff")
    res = verify(forged)
    assert res["valid"] is True and res["level"] == "self-consistent"
    assert res["checks"]["signer"] is None and "signer" in res["unverified"]
    res = verify(forged, NODE_KEYS)
    assert res["valid"] is False and res["level"] == "invalid"
    assert res["checks"]["signer"] is False and "not a trusted key" in res["errors"]["signer"]


def test_same_key_id_other_public_key():
    """A forged proof reusing the trusted key_id with another public key fails (the id's
    fingerprint does not match, and the trusted key differs)."""
    forged = resign(A["cdp"], foreign_signer())
    forged["attestation"]["key_id"] = NODE.key_id
    res = verify(forged, NODE_KEYS)
    assert res["valid"] is False and res["checks"]["signature"] is False
    assert res["checks"]["signer"] is False


def test_every_leaf_edit_of_the_destroy_result_detected():
    """Changing any single leaf of a destroy result (status, reason, contexts, every
    field of the CDP, the rendition and the envelope) makes it invalid."""
    tried = detected = 0
    missed = []
    for name, doc in leaf_edits(A):
        tried += 1
        if verify(doc, NODE_KEYS)["valid"] is False:
            detected += 1
        else:
            missed.append(name)
    assert tried > 300 and not missed, missed


def test_two_sessions_parts_swapped_detected():
    """Any part of session B's result put into A's (with or without the envelope) is
    detected."""
    tried = [name for name, _ in swaps(A, B)]
    missed = [name for name, doc in swaps(A, B) if verify(doc, NODE_KEYS)["valid"]]
    assert len(tried) >= 11 and not missed, missed


def test_rendition_of_another_session_under_a_same_key_envelope_detected():
    """Even a forger holding the node key's outputs cannot pair A's CDP with B's
    rendition: the cross-checks catch it without the envelope."""
    doc = {k: v for k, v in A.items() if k != "envelope"}
    doc["auditproof"] = B["auditproof"]
    res = verify(doc)
    assert res["valid"] is False and res["checks"]["envelope"] is False


def test_foreign_rendition_detected():
    """A rendition re-signed with a foreign key in an otherwise real result is invalid."""
    fs = foreign_signer()
    doc = {**A, "auditproof": resign_rendition(A["auditproof"], A["cdp"], fs)}
    res = verify(doc, NODE_KEYS)
    assert res["valid"] is False


def test_retired_key_still_valid(tmp_path):
    """A proof signed by a key that was later rotated out stays valid at provenance level
    (registry and exported key set); one claiming a destruction after the key retired
    does not."""
    clock = [1_772_323_200.0]  # 2026-03-01T00:00:00Z
    store = AttestationKeyStore(tmp_path, 3600, clock=lambda: clock[0])
    old = store.current()
    clock[0] += 600
    doc = _session("sess_1111111111111111", reason="requested", classification="general",
                   jurisdiction="US", signer=old, created="2026-03-01T00:05:00Z",
                   destroyed="2026-03-01T00:09:00Z")
    clock[0] += 3600
    new = store.rotate()
    assert new.key_id != old.key_id
    exported = store.export("node-x")
    assert [k["retired_at"] for k in exported["keys"]] == [new.created_at, None]
    for trust in (LookupTrust(store.get, "registry"),
                  KeySet(parse_keys(json.loads(json.dumps(exported))), "export")):
        assert verify(doc, trust)["level"] == "provenance"
        late = _session("sess_2222222222222222", reason="requested", classification="general",
                        jurisdiction="US", signer=old, created="2026-03-01T01:00:00Z",
                        destroyed="2026-03-01T02:00:00Z")
        res = verify(late, trust)
        assert res["valid"] is False and "retired" in res["errors"]["signer"]


def test_key_created_long_after_destruction_refused():
    """A trusted key created more than the clock grace after destroyed_at did not sign
    that destruction."""
    ks = KeySet([{**NODE_KEYS.keys[NODE.key_id], "created_at": "2026-03-02T00:00:00Z"}], "k")
    res = verify(A["cdp"], ks)
    assert res["valid"] is False and "created" in res["errors"]["signer"]


@pytest.mark.parametrize("doc,msg", [
    ({"keys": [{"key_id": "nrx-receipt-00", "public_key": "base64:x"}]}, "key_id"),
    ({"format": "other", "keys": []}, "format"),
    ([{"key_id": "nrx-verify-20260301T000000Z-0000000a", "public_key": "base64:AAAA",
       "created_at": "2026-03-01T00:00:00Z"}], "public_key"),
    ("nope", "not a key set")])
def test_malformed_key_sets_refused(doc, msg):
    """A malformed trust file is refused as a whole with a reason."""
    with pytest.raises(ValueError, match=msg):
        parse_keys(doc)


def test_keyset_shape():
    """keyset() gives the documented format with every field."""
    ks = keyset([{"key_id": "k", "public_key": "p", "created_at": "c", "retired_at": None,
                  "generation": 1, "live": True}], node_id="n", exported_at="t")
    assert ks == {"format": "nanorix-agent-keyset/1", "node_id": "n", "exported_at": "t",
                  "keys": [{"key_id": "k", "algorithm": None, "public_key": "p",
                            "created_at": "c", "retired_at": None, "generation": 1}]}


def test_whole_result_forged_with_foreign_key():
    """A complete destroy result built and sealed with a foreign key (CDP, rendition,
    envelope all consistent) is self-consistent at best, and invalid against the node's
    keys in every part."""
    fs = foreign_signer()
    forged = _session("sess_a8f3e71c4b2d9f06", reason="requested", classification="PHI",
                      jurisdiction="US", signer=fs)
    res = verify(forged)
    assert res["valid"] is True and res["level"] == "self-consistent"
    res = verify(forged, NODE_KEYS)
    assert res["valid"] is False and res["checks"]["signer"] is False
    assert res["auditproof"]["checks"]["signer"] is False
