"""Receipt-key epochs (docs/proofs.md "Receipt keys"), pure and journal: the introduction
statement, the verifier's `receipt_keys` check on hostile lists, a rotation between
re-adoption and destroy, and the journal's `receipt_keys` table."""

from __future__ import annotations

import base64
import copy

import pytest
from proof_forgery import with_receipt_keys
from vectors.loader import SeedSigner

from agent.cdp.checks import Fail, Unverifiable
from agent.cdp.merkle import merkle_root
from agent.cdp.receiptkeys import (
    MAX_EPOCHS,
    check_receipt_keys,
    epoch_entry,
    introduce,
    key_for_seq,
)
from agent.cdp.trust import KeySet
from agent.cdp.verify import verify
from agent.keys.session import SessionKey, receipt_key_id
from agent.service.journal import Journal

SID = "sess_0123456789abcdef"
NODE = SeedSigner(bytes(range(32)))
OTHER = SeedSigner(bytes(range(2, 34)))


def _rec(signer) -> dict:
    return {"key_id": signer.key_id, "algorithm": "Ed25519",
            "public_key": "base64:" + base64.b64encode(signer.public_key).decode(),
            "created_at": "2026-01-01T00:00:00Z"}


def _keys(signer=NODE, counts=(2, 3)) -> list:
    keys = [epoch_entry(0, SessionKey.generate(SID).public_record("2026-03-01T00:00:00Z"))]
    for n, count in enumerate(counts, start=1):
        rec = SessionKey.generate(SID, n).public_record(f"2026-03-01T00:0{n}:00Z")
        keys.append(introduce(signer, session_id=SID, previous=keys[-1], epoch=n, record=rec,
                              exec_count=count, leaves=[bytes([i]) * 32 for i in range(count)]))
    return keys


def _same_signer(intro, at) -> None:
    if intro["attestation_key_id"] != NODE.key_id:
        raise Unverifiable("other signer")


def test_epoch_key_ids_are_distinct_and_epoch_zero_unchanged():
    """Epoch 0 keeps the SPEC 7 receipt key id; later epochs add -e<n>."""
    assert receipt_key_id(SID) == "nrx-receipt-0123456789abcdef"
    assert receipt_key_id(SID, 2) == "nrx-receipt-0123456789abcdef-e2"
    assert SessionKey.generate(SID, 1).key_id.endswith("-e1")


def test_a_valid_chain_passes_and_maps_seqs_to_epochs():
    """Two introductions in order pass the check; seq 1-2 fall to epoch 0, 3 to epoch 1,
    4 and later to epoch 2, and each introduction's root is over the receipts before it."""
    keys = _keys()
    note = check_receipt_keys(keys, session_id=SID, exec_count=5, signer_ok=_same_signer)
    assert note and "3 receipt keys" in note
    assert [key_for_seq(keys, q)["epoch"] for q in (1, 2, 3, 4, 9)] == [0, 0, 1, 2, 2]
    assert keys[2]["introduction"]["receipts_root"] == merkle_root(
        [bytes([i]) * 32 for i in range(3)])
    assert check_receipt_keys(keys[:1], session_id=SID, exec_count=0,
                              signer_ok=_same_signer) is None


def _mutations():
    def edit(fn):
        keys = _keys()
        fn(keys)
        return keys

    yield "empty", []
    yield "not a list", {"epoch": 0}
    yield "epoch skipped", edit(lambda k: k.__setitem__(1, dict(k[1], epoch=2)))
    yield "id reused", edit(lambda k: k[1].__setitem__("key_id", k[0]["key_id"]))
    yield "intro on epoch 0", edit(lambda k: k[0].__setitem__("introduction",
                                                             k[1]["introduction"]))
    yield "no intro", edit(lambda k: k[1].pop("introduction"))
    yield "wrong previous", edit(lambda k: k[2]["introduction"].__setitem__(
        "previous_key_id", k[0]["key_id"]))
    yield "count backwards", edit(lambda k: k[2]["introduction"].__setitem__("exec_count", 1))
    yield "count past the end", edit(lambda k: k[2]["introduction"].__setitem__(
        "exec_count", 99))
    yield "root edited", edit(lambda k: k[1]["introduction"].__setitem__("receipts_root",
                                                                        "0" * 64))
    yield "key swapped", edit(lambda k: k[1].__setitem__("public_key", k[2]["public_key"]))
    yield "attestation id of another key", edit(lambda k: k[1]["introduction"].__setitem__(
        "attestation_key_id", OTHER.key_id))
    yield "bad base64", edit(lambda k: k[1].__setitem__("public_key", "base64:!!"))
    yield "float count", edit(lambda k: k[1]["introduction"].__setitem__("exec_count", 2.0))
    yield "too many", [_keys()[0]] * (MAX_EPOCHS + 1)


@pytest.mark.parametrize(("what", "keys"), list(_mutations()))
def test_hostile_lists_fail_the_check_without_raising(what, keys):
    """Every malformed or forged list raises Fail (a failed check), never anything else."""
    with pytest.raises(Fail):
        check_receipt_keys(keys, session_id=SID, exec_count=5, signer_ok=_same_signer)


def _cdp_with(keys, signer=NODE) -> dict:
    created, destroyed = "2026-03-01T00:00:00Z", "2026-03-01T01:00:00Z"
    last = {"ok": True, "session_id": SID, "created_at": created, "destroyed_at": destroyed,
            "exec_count": 5}
    return with_receipt_keys({"session_id": SID, "created_at": created,
                              "destroyed_at": destroyed,
                              "evidence": [{"ok": True} for _ in range(7)] + [last]},
                             keys, signer)


def test_introduction_by_a_rotated_key_needs_the_trust_source():
    """Keys introduced by an attestation key other than the proof's signer (a rotation
    between re-adoption and destroy) leave `receipt_keys` null without a trust source,
    pass with one that has both keys, and fail with one that lacks the introducer."""
    cdp = _cdp_with(_keys(OTHER))
    v = verify(cdp)
    assert v["valid"] is True and v["checks"]["receipt_keys"] is None
    assert "trust source" in v["unverified"]["receipt_keys"]
    assert verify(cdp, KeySet([_rec(NODE), _rec(OTHER)], "both"))["checks"]["receipt_keys"]
    v = verify(cdp, KeySet([_rec(NODE)], "node only"))
    assert v["valid"] is False and v["checks"]["receipt_keys"] is False


def test_a_proof_without_receipt_keys_has_no_such_check():
    """Proofs made before the extension (and the shared vector) get no `receipt_keys`
    check at all: nothing is reported as verified that was not there to check."""
    from vectors.loader import load_vector

    v = verify(load_vector()["cdp"])
    assert v["valid"] is True and "receipt_keys" not in v["checks"]
    stripped = copy.deepcopy(_cdp_with(_keys()))
    del stripped["evidence"]
    assert "receipt_keys" not in verify(stripped)["checks"]


def test_journal_keeps_every_epoch_and_answers_each_id(tmp_path):
    """insert_session records epoch 0, add_receipt_key the later ones; receipt_keys lists
    them in order (introductions included) across a reopen, receipt_key finds any id, a
    row journaled before the table existed gives its one key, and prune forgets them."""
    keys = _keys()
    j = Journal(tmp_path)
    j.insert_session(session_id=SID, customer_id="c", tier="free", classification="general",
                     jurisdiction="US", created_at=keys[0]["created_at"], ttl_seconds=60,
                     status="active", receipt_key_id=keys[0]["key_id"],
                     receipt_public_key=keys[0]["public_key"])
    for k in keys[1:]:
        assert j.add_receipt_key(SID, k) is True
    j.close()
    j = Journal(tmp_path)
    assert j.receipt_keys(SID) == keys
    assert j.receipt_key(keys[1]["key_id"]) == (SID, keys[1])
    assert j.receipt_key("nrx-receipt-ffffffffffffffff") is None
    j.db.execute("DELETE FROM receipt_keys")
    assert j.receipt_keys(SID) == [keys[0]]  # the row's own key, as epoch 0
    j.add_receipt_key(SID, keys[1])
    j.update_session(SID, status="destroyed")
    assert j.prune("9999-01-01T00:00:00Z") == 1
    assert j.receipt_keys(SID) == [] and j.receipt_key(keys[1]["key_id"]) is None
    j.close()


def test_a_key_the_journal_cannot_take_is_kept_and_replayed(tmp_path):
    """On a full file system add_receipt_key keeps the key (no exception, `writable`
    false); once space is back `check()` writes it."""
    from faults import fill_space, free, small_fs

    keys = _keys()
    with small_fs(tmp_path / "st", size="1m") as fs:
        j = Journal(fs)
        j.insert_session(session_id=SID, customer_id="c", tier="free",
                         classification="general", jurisdiction="US",
                         created_at=keys[0]["created_at"], ttl_seconds=60, status="active",
                         receipt_key_id=keys[0]["key_id"],
                         receipt_public_key=keys[0]["public_key"])
        filler = fill_space(fs)
        for _ in range(200):
            j.update_session(SID, status="active")
        assert j.add_receipt_key(SID, keys[1]) is False and not j.writable
        free(filler)
        j.check()
        assert j.writable and j.receipt_keys(SID) == keys[:2]
        j.close()
