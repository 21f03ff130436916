"""Trust anchors for proof signers (docs/proofs.md, "Levels"): which attestation keys a
verifier accepts, and the `signer` check.  Pure: no I/O (the CLI reads the files and the
agent's `key.get`; the node passes its own key registry).

A key set is what `nanorix-agent keys export` prints (format `nanorix-agent-keyset/1`):

    {"format": "nanorix-agent-keyset/1", "node_id": "…", "exported_at": "…Z",
     "keys": [{"key_id": "nrx-verify-…", "algorithm": "Ed25519",
               "public_key": "base64:…", "created_at": "…Z", "retired_at": "…Z" | null,
               "generation": 1}, …]}

`parse_keys` also takes a bare list of such records or one record (a `key.get` answer).

The signer of a proof is trusted when its `key_id` is in the set, the embedded public key
is the set's key for that id, and the key was in service at the proof's `destroyed_at`:
not retired before it, and created no later than `CLOCK_GRACE_SECONDS` after it (a proof
is signed after its destruction finished; a rotation in between makes the newer key sign
a slightly older destruction).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from agent.cdp.checks import Fail, Unverifiable
from agent.timefmt import parse_iso

__all__ = ["CLOCK_GRACE_SECONDS", "KEYSET_FORMAT", "KeySet", "LookupTrust", "TrustSource",
           "check_signer", "keyset", "parse_keys"]

KEYSET_FORMAT = "nanorix-agent-keyset/1"
CLOCK_GRACE_SECONDS = 600
ATTESTATION_KEY_ID = re.compile(r"^nrx-verify-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}\Z")
_B64_32 = re.compile(r"^base64:[A-Za-z0-9+/]{43}=\Z")
RECORD_FIELDS = ("key_id", "algorithm", "public_key", "created_at", "retired_at", "generation")


class TrustSource(Protocol):
    """Where trusted attestation keys come from: a key set, the agent's `key.get`, or the
    node's own registry.  `lookup` answers a record (key_id, public_key, created_at,
    retired_at?) or None; `source` names it in verdicts."""

    source: str

    def lookup(self, key_id: str) -> Mapping | None: ...


def keyset(records: Iterable[Mapping], *, node_id: str | None, exported_at: str) -> dict:
    """The exported key set document for public key records (oldest first)."""
    return {"format": KEYSET_FORMAT, "node_id": node_id, "exported_at": exported_at,
            "keys": [{k: r.get(k) for k in RECORD_FIELDS} for r in records]}


def _record(r: object, where: str) -> dict:
    if not isinstance(r, dict):
        raise ValueError(f"{where}: a key record must be an object")
    kid = r.get("key_id")
    if not isinstance(kid, str) or not ATTESTATION_KEY_ID.match(kid):
        raise ValueError(f"{where}: key_id is not nrx-verify-<time>-<8 hex>")
    if r.get("algorithm", "Ed25519") != "Ed25519":
        raise ValueError(f"{where}: {kid}: algorithm is not Ed25519")
    pk = r.get("public_key")
    if not isinstance(pk, str) or not _B64_32.match(pk):
        raise ValueError(f"{where}: {kid}: public_key is not base64:<32 bytes>")
    for k in ("created_at", "retired_at"):
        v = r.get(k)
        if v is None and k == "retired_at":
            continue
        try:
            parse_iso(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {kid}: {k} is not an ISO-8601 UTC time") from None
    return {"key_id": kid, "public_key": pk, "created_at": r["created_at"],
            "retired_at": r.get("retired_at")}


def parse_keys(doc: object, where: str = "key set") -> list[dict]:
    """The key records of a key set, a list of records, or one record; ValueError with a
    reason when anything in it is malformed (a trust file is never half-read)."""
    if isinstance(doc, dict) and "keys" in doc:
        if doc.get("format", KEYSET_FORMAT) != KEYSET_FORMAT:
            raise ValueError(f"{where}: format is not {KEYSET_FORMAT}")
        items = doc["keys"]
    elif isinstance(doc, dict):
        items = [doc]
    else:
        items = doc
    if not isinstance(items, list):
        raise ValueError(f"{where}: not a key set, a list of keys or a key record")
    return [_record(r, f"{where}[{i}]") for i, r in enumerate(items)]


class KeySet:
    """Trusted keys from one or more key set files (merged; an id with two different
    public keys is refused)."""

    def __init__(self, records: Iterable[Mapping], source: str) -> None:
        self.source = source
        self.keys: dict[str, dict] = {}
        for r in records:
            old = self.keys.get(r["key_id"])
            if old is not None and old["public_key"] != r["public_key"]:
                raise ValueError(f"{source}: {r['key_id']} appears with two public keys")
            self.keys[r["key_id"]] = dict(r)

    def lookup(self, key_id: str) -> dict | None:
        return self.keys.get(key_id)


class LookupTrust:
    """A trust source over a lookup function (the agent's `key.get`, the node's key
    store); only attestation key ids are ever looked up (a session receipt key is never
    a proof signer)."""

    def __init__(self, lookup: Callable[[str], Mapping | None], source: str) -> None:
        self._lookup = lookup
        self.source = source

    def lookup(self, key_id: str) -> Mapping | None:
        if not ATTESTATION_KEY_ID.match(key_id):
            return None
        return self._lookup(key_id)


def check_signer(trust: TrustSource | None, attestation: object, destroyed_at: object) -> None:
    """The `signer` check: raises Unverifiable without a trust source, Fail when the
    signing key is unknown to it, differs from it, or was not in service at
    `destroyed_at`."""
    if trust is None:
        raise Unverifiable("signer not checked: no trust source (--trust KEYS.json or "
                           "--agent)")
    if not isinstance(attestation, dict):
        raise Fail("no attestation block")
    kid, pk = attestation.get("key_id"), attestation.get("public_key")
    if not isinstance(kid, str) or not isinstance(pk, str):
        raise Fail("attestation key_id or public_key is not a string")
    try:
        rec = trust.lookup(kid)
    except Exception as e:  # an unreachable agent: not trusted, said why
        raise Fail(f"{trust.source}: key lookup failed ({type(e).__name__})") from None
    if rec is None:
        raise Fail(f"key {kid[:60]} is not a trusted key ({trust.source})")
    if rec.get("public_key") != pk:
        raise Fail(f"public key differs from the trusted key {kid[:60]} ({trust.source})")
    try:
        t = parse_iso(destroyed_at)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise Fail("destroyed_at is not an ISO-8601 UTC time") from None
    try:
        created = parse_iso(str(rec.get("created_at")))
        retired = rec.get("retired_at")
        retired_t = parse_iso(str(retired)) if retired is not None else None
    except ValueError:
        raise Fail(f"trusted record of {kid[:60]} has malformed times") from None
    if t + CLOCK_GRACE_SECONDS < created:
        raise Fail(f"key {kid[:60]} was created at {rec.get('created_at')}, after "
                   f"destroyed_at")
    if retired_t is not None and t > retired_t:
        raise Fail(f"key {kid[:60]} was retired at {retired}, before destroyed_at")
