"""AuditProof 2.1 renditions pass Nanorix's official verifier at stage 7, and tampering fails both verifiers."""

from __future__ import annotations

import copy

import pytest
from vectors.loader import SeedSigner, load_vector, vector_signer

from agent.cdp import auditproof
from agent.cdp.auditproof import build_auditproof, canonical_view_hash, verify_auditproof
from agent.cdp.verify import verify

nv = pytest.importorskip("nanorix.verifier")
nd = pytest.importorskip("nanorix.debug")

VEC = load_vector()


def _evidence(classification: str = "general", fail_step: int | None = None) -> list[dict]:
    ev = copy.deepcopy(VEC["cdp"]["evidence"])
    ev[7]["data_classification"] = classification
    if classification == "general":
        for i in (1, 2):
            ev[i]["passes"] = ["zeros"]
    if fail_step is not None:
        ev[fail_step - 1]["ok"] = False
        ev[fail_step - 1]["error"] = "readback_nonzero"
    return ev


def _rendition(classification="general", fail_step=None, region=None, signer=None) -> dict:
    ev = _evidence(classification, fail_step)
    return build_auditproof(evidence=ev, session_id=ev[7]["session_id"],
                            created_at=ev[7]["created_at"], destroyed_at=ev[7]["destroyed_at"],
                            customer_id="cust_0001", jurisdiction=ev[7]["jurisdiction"],
                            authority_id="nrx-node:node-example-1", signing_key_version=3,
                            region=region, exec_count=ev[7]["exec_count"],
                            signer=signer or vector_signer(VEC))


def _official_ok(doc) -> bool:
    return nv.verify(doc).ok and nd.verify_auditproof(doc).stage_reached >= 7


CASES = [("general", None), ("general", 3), ("PHI", None), ("PHI", 6)]


@pytest.mark.parametrize("classification,fail_step", CASES)
def test_official_verifier_accepts(classification, fail_step):
    """Clean and failed-step renditions, general and PHI, verify at stage 7 in the official SDK and in ours."""
    doc = _rendition(classification, fail_step)
    r = nv.verify(doc)
    assert r.ok, r.failure_reason
    assert nd.verify_auditproof(doc).stage_reached >= 7
    ours = verify(doc)
    assert ours["valid"] is True and ours["format"] == "auditproof-2.1", ours
    assert ours["checks"]["destruction_complete"] is (fail_step is None)
    if fail_step:
        assert doc["destruction_state"] == "incomplete"
        assert doc["destruction_failure_step"] == fail_step


def test_from_cdp_v1_and_region():
    """Built from the v1 CDP with a configured region, the region is what region pinning reads."""
    doc = build_auditproof(cdp_v1=VEC["cdp"], customer_id="c", jurisdiction="US",
                           authority_id="a", signing_key_version=1, exec_count=2,
                           region="eu-west-1", signer=vector_signer(VEC))
    assert _official_ok(doc)
    res = nd.verify_auditproof(doc, nd.VerifierPolicy(required_region="eu-west-1"))
    assert res.valid and res.stage_reached == 7
    started = doc["activity"][0]
    assert started == {"event": "capsule_started", "network": "sealed",
                       "timestamp": VEC["cdp"]["created_at"], "region": "eu-west-1"}


def test_no_region_when_unconfigured():
    """Without a configured region the capsule_started event has none."""
    doc = _rendition()
    assert "region" not in doc["activity"][0]
    assert [e["event"] for e in doc["activity"]] == ["capsule_started", "commands_executed",
                                                     "capsule_destroyed"]


def test_reserved_slots_absent_and_shape():
    """No reserved slot is emitted; fields and formats are what SPEC 14 lists."""
    doc = _rendition()
    for slot in auditproof.RESERVED_SLOTS:
        assert slot not in doc
    assert doc["signing_key_version"] == "3"
    assert doc["final_hash"] == doc["chain"][-1]["chain_hash"]
    assert all(len(e["chain_hash"]) == 7 + 128 for e in doc["chain"])
    assert doc["chain"][7]["subsystem"] == "capsule_destroy"


def test_jcs_golden():
    """The canonical view hash matches the reference verifier's published golden input."""
    golden = {"cdp_version": "2.1", "capsule_id": "cap_test_0001", "signing_key_version": "1",
              "activity": [], "chain": [], "signing_mode": "nanorix_only",
              "jurisdiction": "us", "authority_id": "us-kms-nanorix-v1",
              "org_id": "00000000-0000-0000-0000-000000000001",
              "destruction_state": "complete", "hash_algorithm": "SHA-512",
              "signature_algorithm": "Ed25519"}
    assert canonical_view_hash(golden) == (
        "402f533e81d78a05f386bee62a919436b8eacdea2c49397d54547bbd19dabce4"
        "7bc95143635ee6d487e35eee037fec31ebd1f8f88b2f3f36ae2908324c74aabe")


def _set(doc, path, value):
    t = doc
    for p in path[:-1]:
        t = t[p]
    t[path[-1]] = value


TAMPERS = {
    "evidence hash": (("chain", 2, "evidence_hash"), "sha512:" + "0" * 128),
    "session id": (("capsule_id",), "sess_ffffffffffffffff"),
    "jurisdiction": (("jurisdiction",), "EU"),
    "destruction state": (("destruction_state",), None),  # flipped below
    "reserved slot": (("witness_signatures",), [{"sig": "x"}]),
    "step relabelled": (("chain", 1, "subsystem"), "eee_memory"),
    "org id": (("org_id",), "someone-else"),
    "activity": (("activity", 1, "count"), 99),
    "key version": (("signing_key_version",), "4"),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
@pytest.mark.parametrize("classification,fail_step", [("general", None), ("PHI", 4)])
def test_tampering_fails_both(name, classification, fail_step):
    """Each tamper makes the official verifier fail, and ours with it."""
    doc = _rendition(classification, fail_step)
    path, value = TAMPERS[name]
    if name == "destruction state":
        value = "complete" if doc["destruction_state"] == "incomplete" else "incomplete"
    _set(doc, path, value)
    assert not nv.verify(doc).ok, name
    assert verify(doc)["valid"] is False, name
    assert verify_auditproof(doc)["valid"] is False


def test_evidence_tamper_caught_by_ours():
    """Changing a carried evidence object (outside the official view) fails our evidence check."""
    doc = _rendition()
    doc["evidence"][4]["processes_with_ids"] = 7
    res = verify(doc)
    assert res["valid"] is False and res["checks"]["evidence"] is False


def test_stripped_evidence_still_valid():
    """A rendition shared without evidence still verifies in both."""
    doc = _rendition()
    del doc["evidence"]
    assert _official_ok(doc)
    assert verify(doc)["valid"] is True


def test_other_key_signature_fails():
    """A rendition whose embedded key is swapped for another fails both verifiers."""
    doc = _rendition()
    other = _rendition(signer=SeedSigner(bytes(range(32))))
    doc["attestation"]["public_key"] = other["attestation"]["public_key"]
    assert not nv.verify(doc).ok
    assert verify(doc)["checks"]["signature"] is False


def test_wrapper_carries_both():
    """A wrapper with cdp and auditproof verifies both and nests the rendition's result
    (no status: a destroy result without its envelope would be invalid)."""
    wrapped = {"session_id": VEC["cdp"]["session_id"],
               "cdp": VEC["cdp"], "auditproof": build_auditproof(
                   cdp_v1=VEC["cdp"], customer_id="c", jurisdiction="US", authority_id="a",
                   signing_key_version=1, exec_count=2, signer=vector_signer(VEC))}
    res = verify(wrapped)
    assert res["valid"] is True and res["auditproof"]["valid"] is True
    wrapped["auditproof"]["jurisdiction"] = "EU"
    res = verify(wrapped)
    assert res["valid"] is False and res["auditproof"]["checks"]["signature"] is False


@pytest.mark.parametrize("doc", [None, [], {"cdp_version": "2.1"},
                                 {"cdp_version": "2.1", "chain": [{}] * 10_000}])
def test_hostile_renditions(doc):
    """Malformed renditions give valid false, never an exception."""
    res = verify_auditproof(doc)
    assert res["valid"] is False and res["checks"]["chain_integrity"] is False


def test_v1_vector_unchanged():
    """The v1.0 vector still verifies (the rendition is additive)."""
    assert verify(VEC["cdp"])["valid"] is True


def _leaf_paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaf_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaf_paths(v, (*prefix, i))
    else:
        yield prefix


def _mutated(v):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + 1
    return (v + "x") if isinstance(v, str) else "x"


BASE_RENDITION = _rendition("PHI", None, region="us-east-1")
RENDITION_PATHS = list(_leaf_paths(BASE_RENDITION))
SIGNED_TOP = {"cdp_version", "signing_mode", "hash_algorithm", "signature_algorithm",
              "capsule_id", "org_id", "jurisdiction", "authority_id", "signing_key_version",
              "activity", "chain", "destruction_state"}


def test_every_leaf_change_invalidates():
    """Changing any leaf of a rendition makes ours invalid; inside the signed view, the official one too."""
    for path in RENDITION_PATHS:
        doc = copy.deepcopy(BASE_RENDITION)
        t = doc
        for p in path[:-1]:
            t = t[p]
        t[path[-1]] = _mutated(t[path[-1]])
        assert verify(doc)["valid"] is False, path
        if path[0] in SIGNED_TOP or path[:2] == ("attestation", "signature"):
            assert not nv.verify(doc).ok, path
