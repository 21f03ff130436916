"""Receipt keys across a re-adoption (issue 12, docs/proofs.md "Receipt keys"): a session
re-adopted after an agent crash signs its later receipts with a new key, introduced by
the node's attestation key; the proof lists every key, the verifiers accept receipts
under any listed key in order, and reject a key not introduced that way."""

from __future__ import annotations

import base64
import copy

import pytest
from helpers_daemon import AgentDaemon, start_long_exec
from nanorix.debug import verify_auditproof as official_staged
from nanorix.verifier import verify as official_verify
from proof_forgery import with_receipt_keys
from vectors.loader import SeedSigner

from agent.cdp.receipt import build_receipt
from agent.cdp.receiptkeys import introduce, verify_receipts
from agent.cdp.trust import KeySet
from agent.cdp.verify import verify
from agent.keys.session import SessionKey

CFG = {"sandbox": {"orphan_grace_seconds": 30}}
NODE = SeedSigner(bytes(range(32)))
FORGER = SeedSigner(bytes(range(1, 33)))


@pytest.fixture(scope="module")
def readopted(tmp_path_factory):
    """One session: a receipt under the first key, an agent crash mid-exec, re-adoption,
    a receipt under the new key, destroy; with the node's exported key set, the key
    records as answered live and after a restart, and a session never re-adopted."""
    d = AgentDaemon(tmp_path_factory.mktemp("rekey"), config=CFG)
    d.start()
    try:
        plain = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        d.call("session.exec", {"session_id": plain, "command": "true"})
        plain = d.call("session.destroy", {"session_id": plain})
        created = d.call("session.create", {"customer_id": "c", "tier": "free"})
        sid = created["session_id"]
        r1 = d.call("session.exec", {"session_id": sid, "command": "echo one"})["receipt"]
        t = start_long_exec(d, sid)
        d.kill()
        d.start()
        t.join(30)
        r3 = d.call("session.exec", {"session_id": sid, "command": "echo three"})["receipt"]
        keys = {k: d.call("key.get", {"key_id": k}) for k in (r1["key_id"], r3["key_id"])}
        result = d.call("session.destroy", {"session_id": sid})
        keyset = d.call("key.export")
        assert d.stop() == 0
        d.start()  # the ended session is known from the journal only
        after = {k: d.call("key.get", {"key_id": k}) for k in keys}
    finally:
        assert d.stop() == 0
    return {"created": created, "receipts": [r1, r3], "keys": keys, "after": after,
            "result": result, "keyset": keyset, "plain": plain}


def test_readopted_proof_lists_both_keys_and_verifies_every_receipt(readopted):
    """Re-adopt, exec, destroy: step 8 lists the creation key and the re-adoption key
    (introduced by the node's attestation key over the receipts before it); the proof is
    provenance-valid and complete with the `receipt_keys` check true, both receipts the
    client got verify under their listed keys, and the official SDK accepts the 2.1
    rendition."""
    result, (r1, r3) = readopted["result"], readopted["receipts"]
    ev8 = result["cdp"]["evidence"][7]
    keys = ev8["receipt_keys"]
    assert [k["epoch"] for k in keys] == [0, 1]
    assert keys[0]["key_id"] == readopted["created"]["receipt_key"]["key_id"] == r1["key_id"]
    assert keys[1]["key_id"] == r3["key_id"] == keys[0]["key_id"] + "-e1"
    intro = keys[1]["introduction"]
    assert intro["previous_key_id"] == keys[0]["key_id"] and intro["exec_count"] == 1
    assert intro["attestation_key_id"] == result["cdp"]["attestation"]["key_id"]
    assert ev8["exec_count"] == 3 and r3["seq"] == 3  # seq 2: the interrupted exec
    trust = KeySet(readopted["keyset"]["keys"], "node keys")
    v = verify(result, trust)
    assert v["valid"] and v["complete"] and v["level"] == "provenance", v
    assert v["checks"]["receipt_keys"] is True
    assert v["auditproof"]["checks"]["receipt_keys"] is True
    rv = verify_receipts(result, [r1, r3], trust)
    assert rv["valid"] is True and rv["checks"]["signatures"] is True, rv
    # the interrupted exec's receipt never reached the client: the roots stay unchecked
    assert rv["complete"] is False and rv["checks"]["receipts_root"] is None
    assert rv["checks"]["introductions_root"] is True  # receipt 1 is all epoch 1 follows
    assert official_verify(result["auditproof"]).ok is True
    assert official_staged(result["auditproof"]).stage_reached >= 7


def test_never_readopted_proof_lists_its_one_key(readopted):
    """A session never re-adopted lists its one creation key (no introduction); its proof
    verifies with `receipt_keys` true and the official SDK accepts its rendition."""
    plain = readopted["plain"]
    keys = plain["cdp"]["evidence"][7]["receipt_keys"]
    assert [set(k) for k in keys] == [{"epoch", "key_id", "public_key", "created_at"}]
    v = verify(plain, KeySet(readopted["keyset"]["keys"], "node keys"))
    assert v["valid"] and v["complete"] and v["checks"]["receipt_keys"] is True
    assert official_verify(plain["auditproof"]).ok is True
    assert official_staged(plain["auditproof"]).stage_reached >= 7


def test_every_key_id_is_answered_by_key_get(readopted):
    """`key.get` answers both key ids with their own public key, epoch and (for the
    re-adoption key) its signed introduction, while the session lives and, from the
    journal, after the session ended and the agent restarted."""
    for kid, rec in readopted["keys"].items():
        assert readopted["after"][kid] == rec
    recs = sorted(readopted["keys"].values(), key=lambda r: r["epoch"])
    assert [r["epoch"] for r in recs] == [0, 1]
    assert recs[0]["public_key"] != recs[1]["public_key"]
    assert "introduction" not in recs[0]
    listed = readopted["result"]["cdp"]["evidence"][7]["receipt_keys"]
    assert recs[1]["introduction"] == listed[1]["introduction"]
    assert recs[0]["public_key"] == readopted["created"]["receipt_key"]["public_key"]


def _resigned(result: dict, keys: list, signer=NODE) -> dict:
    """A stand-in node key re-signs the CDP with other receipt keys (a forger who could
    not sign as the node is caught by the trust check already)."""
    return with_receipt_keys(result["cdp"], keys, signer)


def _forged_key(result: dict, intro_signer) -> list:
    keys = copy.deepcopy(result["cdp"]["evidence"][7]["receipt_keys"])
    sid = result["session_id"]
    forged = SessionKey.generate(sid, 1).public_record(keys[1]["created_at"])
    keys[1] = introduce(intro_signer, session_id=sid, previous=keys[0], epoch=1,
                        record=forged, exec_count=1, leaves=[bytes(32)])
    return keys


def test_forged_key_introduction_is_rejected(readopted):
    """A re-adoption key the node did not introduce is rejected: a swapped public key
    under the real introduction fails its signature, an introduction signed by a key
    outside the trusted set fails (and is only `null`, never passed, without a trust
    source), a later key without introduction fails — each although the CDP itself is
    validly signed — and a receipt signed by an unlisted key fails verify_receipts."""
    result = readopted["result"]
    trust = KeySet([*readopted["keyset"]["keys"], {
        "key_id": NODE.key_id, "algorithm": "Ed25519",
        "public_key": "base64:" + base64.b64encode(NODE.public_key).decode(),
        "created_at": "2026-01-01T00:00:00Z"}], "node keys and the stand-in")
    keys = result["cdp"]["evidence"][7]["receipt_keys"]
    v = verify(_resigned(result, keys), trust)
    assert v["valid"] is True and v["checks"]["receipt_keys"] is True, v

    swapped = copy.deepcopy(keys)
    swapped[1]["public_key"] = _forged_key(result, NODE)[1]["public_key"]
    v = verify(_resigned(result, swapped), trust)
    assert v["valid"] is False and v["checks"]["receipt_keys"] is False
    assert "signature does not verify" in v["errors"]["receipt_keys"]

    by_forger = _forged_key(result, FORGER)
    v = verify(_resigned(result, by_forger), trust)
    assert v["valid"] is False and "not a trusted key" in v["errors"]["receipt_keys"]
    v = verify(_resigned(result, by_forger))
    assert v["checks"]["receipt_keys"] is None and "receipt_keys" in v["unverified"]

    bare = copy.deepcopy(keys)
    del bare[1]["introduction"]
    v = verify(_resigned(result, bare), trust)
    assert v["valid"] is False and v["checks"]["receipt_keys"] is False

    r1, r3 = readopted["receipts"]
    outsider = SessionKey.generate(result["session_id"], 1)
    fake = build_receipt({k: v for k, v in r3.items() if k != "signature"}, outsider)
    rv = verify_receipts(result, [r1, fake])
    assert rv["valid"] is False and rv["checks"]["signatures"] is False
    rv = verify_receipts(result, [r1, dict(r3, key_id=r1["key_id"])])
    assert rv["valid"] is False and "the key of its epoch" in rv["errors"]["signatures"]


def test_verify_cli_checks_receipts_against_the_proof(readopted, tmp_path, capsys):
    """`verify PROOF --receipts R.json --trust KEYS` exits 0 for the re-adopted session's
    receipts (valid, not complete: the interrupted receipt never reached a client) and 1
    when one receipt is altered."""
    import json

    from agent.verify_cli import main

    proof, keys, rs = (tmp_path / "p.json", tmp_path / "k.json", tmp_path / "r.json")
    proof.write_text(json.dumps(readopted["result"]))
    keys.write_text(json.dumps(readopted["keyset"]))
    rs.write_text(json.dumps([{"receipt": r} for r in readopted["receipts"]]))
    assert main([str(proof), "--receipts", str(rs), "--trust", str(keys)]) == 0
    assert "Receipts: valid, not complete" in capsys.readouterr().out
    r1, r3 = readopted["receipts"]
    rs.write_text(json.dumps([r1, dict(r3, exit_code=1)]))
    assert main([str(proof), "--receipts", str(rs), "--trust", str(keys), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out[0]["receipts"]["checks"]["signatures"] is False
