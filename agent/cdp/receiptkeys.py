"""Receipt-key epochs of a session (spec extension, docs/proofs.md "Receipt keys").

A session signs its exec receipts with its own key (SPEC 4, 7), held only in the agent's
locked memory.  An agent crash destroys that private key; the agent that re-adopts the
session makes a new one.  So one session may have several receipt keys, used one after
the other: its *epochs*.  Each is listed as

    {"epoch": n, "key_id": "nrx-receipt-<16 hex>[-e<n>]", "public_key": "base64:<32 bytes>",
     "created_at": "…Z"[, "introduction": {…} for n >= 1]}

Epoch 0 is the key handed out by `session.create`.  Every later key is introduced by a
statement signed with the node's attestation key (the key that signs CDPs):

    introduction = {"previous_key_id", "exec_count", "receipts_root", "attestation_key_id",
                    "attestation_public_key", "signature"}
    signature = "base64:" + Ed25519(attestation key, 64 ASCII hex of SHA-256(C(
        {"purpose": "nanorix-agent/receipt-key-introduction/1", "session_id", "epoch",
         "key_id", "public_key", "created_at", "previous_key_id", "exec_count",
         "receipts_root", "attestation_key_id"})))

`exec_count` is the number of receipts signed before the new key took over (under the
earlier epochs) and `receipts_root` the SPEC 6 Merkle root of their leaves: key `n` signs
the receipts with `exec_count_n < seq <= exec_count_{n+1}` (the last one up to the
session's exec count), and a receipt names its key in `key_id`.  Step 8's evidence lists
every epoch under `receipt_keys`, so the CDP's signature (and the 2.1 rendition's,
through its evidence hashes) covers the list; each introduction is also checkable on its
own, before any proof exists (`key.get` answers it).

`check_receipt_keys` is the verifier's `receipt_keys` check; `verify_receipts` checks a
set of receipts against a proof.  Pure code, never raises out of the check functions.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.cdp.canonical import canonical_json
from agent.cdp.checks import Fail, Unverifiable, decode_b64, finish, run
from agent.cdp.document import Signer, b64
from agent.cdp.merkle import merkle_root
from agent.cdp.receipt import receipt_leaf, verify_receipt

__all__ = ["INTRO_PURPOSE", "add_receipt_keys_check", "check_receipt_keys", "epoch_entry", "introduce",
           "introduction_message", "key_for_seq", "receipt_keys_of", "verify_receipts"]

INTRO_PURPOSE = "nanorix-agent/receipt-key-introduction/1"
ENTRY_FIELDS = {"epoch", "key_id", "public_key", "created_at"}
INTRO_FIELDS = {"previous_key_id", "exec_count", "receipts_root", "attestation_key_id",
                "attestation_public_key", "signature"}
MAX_EPOCHS = 1000  # a hostile list is refused before any signature is checked
_ATT_KEY_ID = re.compile(r"^nrx-verify-[0-9]{8}T[0-9]{6}Z-([0-9a-f]{8})\Z")


def epoch_entry(epoch: int, record: Mapping) -> dict:
    """The list entry of a key from its public record (`SessionKey.public_record`)."""
    return {"epoch": int(epoch), "key_id": str(record["key_id"]),
            "public_key": str(record["public_key"]), "created_at": str(record["created_at"])}


def introduction_message(session_id: str, entry: Mapping, intro: Mapping) -> bytes:
    """The 64 ASCII hex the attestation key signs for one introduction."""
    view = {"purpose": INTRO_PURPOSE, "session_id": session_id,
            **{k: entry.get(k) for k in ("epoch", "key_id", "public_key", "created_at")},
            **{k: intro.get(k) for k in ("previous_key_id", "exec_count", "receipts_root",
                                         "attestation_key_id")}}
    return hashlib.sha256(canonical_json(view)).hexdigest().encode("ascii")


def introduce(signer: Signer, *, session_id: str, previous: Mapping, epoch: int,
              record: Mapping, exec_count: int, leaves: Sequence[bytes]) -> dict:
    """The entry of a new receipt key, introduced after `previous` (the last entry) by a
    statement signed with the node's attestation key: `exec_count` receipts (whose
    Merkle leaves are `leaves`) were signed before it."""
    if len(leaves) != exec_count:
        raise ValueError("the receipts so far must all be known to introduce a key")
    entry = epoch_entry(epoch, record)
    intro = {"previous_key_id": str(previous["key_id"]), "exec_count": int(exec_count),
             "receipts_root": merkle_root(list(leaves)),
             "attestation_key_id": signer.key_id,
             "attestation_public_key": b64(bytes(signer.public_key))}
    intro["signature"] = b64(bytes(signer.sign(introduction_message(session_id, entry,
                                                                    intro))))
    entry["introduction"] = intro
    return entry


def receipt_keys_of(doc: object) -> list | None:
    """Step 8's `receipt_keys` of a CDP or rendition with evidence (None when absent)."""
    ev = doc.get("evidence") if isinstance(doc, Mapping) else None
    if not isinstance(ev, list) or len(ev) != 8 or not isinstance(ev[-1], Mapping):
        return None
    keys = ev[-1].get("receipt_keys")
    return keys if keys is not None else None


def key_for_seq(keys: Sequence[Mapping], seq: int) -> Mapping | None:
    """The entry whose key signs receipt `seq` (keys as checked by check_receipt_keys)."""
    found = None
    for e in keys:
        start = 0 if e.get("epoch") == 0 else int(e["introduction"]["exec_count"])
        if seq > start:
            found = e
    return found


def _check_intro(session_id: str, prev: Mapping, entry: Mapping, last_count: int,
                 exec_count: int, signer_ok: Callable[[Mapping, str], None]) -> int:
    intro = entry.get("introduction")
    n = entry["epoch"]
    if not isinstance(intro, Mapping) or set(intro) != INTRO_FIELDS:
        raise Fail(f"receipt key epoch {n} has no introduction with exactly the fields "
                   f"{sorted(INTRO_FIELDS)}")
    if intro["previous_key_id"] != prev["key_id"]:
        raise Fail(f"receipt key epoch {n} does not follow epoch {n - 1}")
    count = intro["exec_count"]
    if type(count) is not int or not last_count <= count <= exec_count:
        raise Fail(f"receipt key epoch {n}: exec_count out of order")
    if not isinstance(intro["receipts_root"], str) or len(intro["receipts_root"]) != 64:
        raise Fail(f"receipt key epoch {n}: receipts_root is not 64 hex")
    apk = decode_b64(intro["attestation_public_key"], 32, f"epoch {n} attestation key")
    m = _ATT_KEY_ID.match(intro["attestation_key_id"]) \
        if isinstance(intro["attestation_key_id"], str) else None
    if m is None or m.group(1) != hashlib.sha256(apk).hexdigest()[:8]:
        raise Fail(f"receipt key epoch {n}: attestation_key_id does not name its key")
    sig = decode_b64(intro["signature"], 64, f"epoch {n} introduction signature")
    try:
        Ed25519PublicKey.from_public_bytes(apk).verify(
            sig, introduction_message(session_id, entry, intro))
    except (InvalidSignature, ValueError):
        raise Fail(f"receipt key epoch {n}: the introduction's signature does not "
                   f"verify") from None
    signer_ok(intro, str(entry["created_at"]))
    return count


def check_receipt_keys(keys: object, *, session_id: object, exec_count: object,
                       signer_ok: Callable[[Mapping, str], None]) -> str | None:
    """The `receipt_keys` check of a proof whose step 8 lists its receipt keys: epochs
    0..n in order, distinct key ids, every later key introduced by a valid statement
    about the key before it, whose signer `signer_ok(introduction, introduced_at)`
    accepts (raises Fail or Unverifiable otherwise).  Returns a note or None."""
    if not isinstance(keys, list) or not keys:
        raise Fail("receipt_keys is not a non-empty list")
    if len(keys) > MAX_EPOCHS:
        raise Fail(f"receipt_keys lists more than {MAX_EPOCHS} keys")
    if not isinstance(session_id, str) or type(exec_count) is not int:
        raise Fail("step 8 lacks session_id or exec_count")
    seen: set[str] = set()
    last_count = 0
    for i, entry in enumerate(keys):
        if not isinstance(entry, Mapping):
            raise Fail(f"receipt_keys[{i}] is not an object")
        want = ENTRY_FIELDS | ({"introduction"} if i else set())
        if set(entry) != want:
            raise Fail(f"receipt_keys[{i}] does not have exactly the fields {sorted(want)}")
        if type(entry["epoch"]) is not int or entry["epoch"] != i:
            raise Fail(f"receipt_keys[{i}].epoch is not {i}")
        kid = entry["key_id"]
        if not isinstance(kid, str) or not kid.startswith("nrx-receipt-") or kid in seen:
            raise Fail(f"receipt_keys[{i}].key_id is not a new nrx-receipt- id")
        seen.add(kid)
        decode_b64(entry["public_key"], 32, f"receipt_keys[{i}].public_key")
        if i:
            last_count = _check_intro(session_id, keys[i - 1], entry, last_count, exec_count,
                                      signer_ok)
    if len(keys) == 1:
        return None
    return f"{len(keys)} receipt keys; {len(keys) - 1} introduced by the node's attestation key"


def add_receipt_keys_check(res: dict, doc: object, trust) -> dict:
    """Run the `receipt_keys` check on a verified CDP or rendition whose step 8 lists its
    receipt keys (the check is absent otherwise, like `envelope`) and re-derive the
    verdict.  An introduction signed by the proof's own attestation key rests on the
    proof's signer check; one signed by another key needs the trust source (else the
    check is null: not checked, never passed)."""
    keys = receipt_keys_of(doc)
    if keys is None:
        return res
    assert isinstance(doc, Mapping)
    found = doc.get("attestation")
    att: Mapping = found if isinstance(found, Mapping) else {}
    last = doc["evidence"][-1]

    def signer_ok(intro: Mapping, at: str) -> None:
        from agent.cdp.trust import check_signer

        if (intro["attestation_key_id"], intro["attestation_public_key"]) == \
                (att.get("key_id"), att.get("public_key")):
            return
        try:
            check_signer(trust, {"key_id": intro["attestation_key_id"],
                                 "public_key": intro["attestation_public_key"]}, at)
        except Unverifiable:
            raise Unverifiable("a receipt key was introduced by another attestation key "
                               "than the proof's: give a trust source to check it") from None

    run(res, "receipt_keys", lambda: check_receipt_keys(
        keys, session_id=last.get("session_id"), exec_count=last.get("exec_count"),
        signer_ok=signer_ok))
    return finish(res)


def verify_receipts(doc: object, receipts: object, trust=None) -> dict:
    """Check a session's receipts against its proof (a CDP, a destroy result or another
    wrapper of a CDP, with evidence): the proof is valid, every receipt is signed by the
    key its `seq` falls under and names it, each introduction's `receipts_root` is the
    root of the receipts before it, and all of them are the step-8 `receipts_root` and
    `exec_count`.  Result `{valid, complete, checks: {proof, receipt_keys, sequence,
    signatures, introductions_root, receipts_root}, errors, unverified, notes}`: `valid`
    when nothing failed and every given receipt's signature was checked under its
    epoch's key; `complete` when also every check was made (all receipts given, roots
    recomputed).  Never raises."""
    from agent.cdp.verify import verify

    res: dict = {"valid": False, "checks": {}, "errors": {}, "unverified": {}, "notes": {}}
    state: dict = {}

    def proof() -> str | None:
        v = verify(doc, trust)
        state["verdict"] = v
        if not v["valid"]:
            raise Fail("the proof is not valid: " + "; ".join(
                f"{k}: {e}" for k, e in v["errors"].items())[:150])
        if v["checks"].get("signer") is not True:
            return "self-consistent only: the proof's signer was not checked"
        return None

    def cdp() -> Mapping:
        c = doc.get("cdp") if isinstance(doc, Mapping) and "cdp" in doc else doc
        ev = c.get("evidence") if isinstance(c, Mapping) else None
        if not isinstance(c, Mapping) or not isinstance(ev, list) or len(ev) != 8 \
                or not isinstance(ev[-1], Mapping):
            raise Unverifiable("the proof's evidence is stripped: no step 8 to check against")
        return c

    def receipt_keys() -> None:
        v = state.get("verdict") or {}
        if v.get("checks", {}).get("receipt_keys") is False:
            raise Fail("the proof's receipt keys do not check out")
        keys = receipt_keys_of(cdp())
        if keys is None:
            raise Unverifiable("the proof lists no receipt keys (made before this extension)")
        state["keys"] = keys
        if v.get("checks", {}).get("receipt_keys") is None:
            raise Unverifiable(v.get("unverified", {}).get("receipt_keys", "not checked"))

    def ordered() -> list:
        if not isinstance(receipts, list) or not all(isinstance(r, Mapping) for r in receipts):
            raise Fail("receipts is not a list of objects")
        return sorted(receipts, key=lambda r: r.get("seq") if type(r.get("seq")) is int
                      else -1)

    def sequence() -> str | None:
        rs = ordered()
        last = cdp()["evidence"][-1]
        n = last.get("exec_count")
        seqs = [r.get("seq") for r in rs]
        if type(n) is not int or any(type(q) is not int or not 0 < q <= n for q in seqs):
            raise Fail(f"a receipt seq is outside 1..{n}, the proof's exec_count")
        if len(set(seqs)) != len(seqs):
            raise Fail("two receipts have the same seq")
        if any(r.get("session_id") != last.get("session_id") for r in rs):
            raise Fail("a receipt belongs to another session")
        state["complete"] = len(rs) == n
        if not state["complete"]:
            return f"{len(rs)} of {n} receipts given"
        return None

    def signatures() -> None:
        keys = state.get("keys")
        if keys is None:
            raise Unverifiable("no checked receipt keys to verify against")
        for r in ordered():
            seq = r.get("seq")
            key = key_for_seq(keys, seq) if type(seq) is int else None
            if key is None:
                raise Fail(f"no receipt key covers seq {seq}")
            if r.get("key_id") != key["key_id"]:
                raise Fail(f"receipt {seq} names {str(r.get('key_id'))[:60]}, the key of its "
                           f"epoch is {key['key_id']}")
            if not verify_receipt(r, decode_b64(key["public_key"], 32, "public_key")):
                raise Fail(f"receipt {seq} does not verify under {key['key_id']}")

    def leaves_upto(n: int) -> list[bytes]:
        rs = [r for r in ordered() if r.get("seq") <= n]
        if len(rs) != n:
            raise Unverifiable(f"receipts 1..{n} are not all given")
        return [receipt_leaf(r) for r in rs]

    def introductions_root() -> None:
        keys = state.get("keys")
        if keys is None:
            raise Unverifiable("no checked receipt keys")
        for e in keys[1:]:
            intro = e["introduction"]
            if merkle_root(leaves_upto(intro["exec_count"])) != intro["receipts_root"]:
                raise Fail(f"epoch {e['epoch']}: the receipts before it are not the ones "
                           f"its introduction names")

    def receipts_root() -> None:
        last = cdp()["evidence"][-1]
        if merkle_root(leaves_upto(last["exec_count"])) != last.get("receipts_root"):
            raise Fail("the receipts' Merkle root is not step 8's receipts_root")

    for name, fn in (("proof", proof), ("receipt_keys", receipt_keys), ("sequence", sequence),
                     ("signatures", signatures), ("introductions_root", introductions_root),
                     ("receipts_root", receipts_root)):
        run(res, name, fn)
    # valid: nothing failed and the signatures were checked; a partial set (receipts the
    # holder never got, e.g. the interrupted one of an agent crash) leaves the roots null
    res["valid"] = (all(v is not False for v in res["checks"].values())
                    and res["checks"].get("proof") is True
                    and res["checks"].get("signatures") is True)
    res["complete"] = res["valid"] and all(v is True for v in res["checks"].values())
    return res
