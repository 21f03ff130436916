"""Test helpers for forging and editing proofs (issue 14): a foreign signer, re-signing
with edited evidence, every single-leaf edit of a document, and two sessions' parts
swapped.  Each yields (description, document) so tests can count tried vs detected."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator

from vectors.loader import SeedSigner

from agent.cdp.auditproof import build_auditproof
from agent.cdp.document import add_binding, build_cdp


def foreign_signer() -> SeedSigner:
    """A freshly generated key this node never had (key_id of the SPEC 7 form)."""
    return SeedSigner(os.urandom(32))


def resign(cdp: dict, signer, *, session_id: str | None = None, bind: bool = True) -> dict:
    """`cdp` rebuilt and signed by `signer`, its evidence edited to claim `session_id`
    (step 8 and top level) — a forgery every self-consistency check accepts."""
    ev = copy.deepcopy(cdp["evidence"])
    sid = session_id or cdp["session_id"]
    ev[7]["session_id"] = sid
    doc = build_cdp(session_id=sid, created_at=cdp["created_at"],
                    destroyed_at=cdp["destroyed_at"], evidence=ev, signer=signer)
    return add_binding(doc, signer) if bind else doc


def with_receipt_keys(cdp: dict, keys: list, signer) -> dict:
    """`cdp` rebuilt with step 8's `receipt_keys` replaced by `keys`, signed by `signer`
    (docs/proofs.md "Receipt keys"): isolates the receipt_keys check from the others."""
    ev = copy.deepcopy(cdp["evidence"])
    ev[7]["receipt_keys"] = keys
    return build_cdp(session_id=cdp["session_id"], created_at=cdp["created_at"],
                     destroyed_at=cdp["destroyed_at"], evidence=ev, signer=signer)


def resign_rendition(ap: dict, cdp: dict, signer) -> dict:
    """A 2.1 rendition of `cdp` built and signed by `signer` with `ap`'s metadata."""
    return build_auditproof(signer=signer, customer_id=ap["org_id"],
                            jurisdiction=ap["jurisdiction"], authority_id=ap["authority_id"],
                            signing_key_version=int(ap["signing_key_version"]),
                            exec_count=ap["activity"][1]["count"], cdp_v1=cdp)


def _mutate(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value[:-1] + ("y" if value[-1:] == "x" else "x") if value else "x"
    if value is None:
        return "x"
    return "changed"


def leaf_paths(obj, prefix=()) -> Iterator[tuple]:
    """Every leaf path of a JSON value (empty lists and maps count as leaves)."""
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            yield from leaf_paths(v, (*prefix, k))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            yield from leaf_paths(v, (*prefix, i))
    else:
        yield prefix


def leaf_edits(doc: dict) -> Iterator[tuple[str, dict]]:
    """`doc` with one leaf changed, for every leaf."""
    for path in leaf_paths(doc):
        if not path:
            continue
        edited = copy.deepcopy(doc)
        target = edited
        for p in path[:-1]:
            target = target[p]
        target[path[-1]] = _mutate(target[path[-1]])
        yield "/".join(map(str, path)), edited


def swaps(a: dict, b: dict) -> Iterator[tuple[str, dict]]:
    """Destroy result `a` with one or two of its parts taken from session `b`'s result,
    with and without the envelope (only parts that differ)."""
    keys = [k for k in a if k in b and a[k] != b[k] and k != "session_id"]
    for k in keys:
        doc = {**a, k: b[k]}
        yield f"{k} from the other session", doc
        if k != "envelope":
            yield f"{k} from the other session, envelope removed", {
                kk: v for kk, v in doc.items() if kk != "envelope"}
    if "cdp" in keys and "auditproof" in keys:
        yield "cdp and auditproof from the other session", {**a, "cdp": b["cdp"],
                                                            "auditproof": b["auditproof"]}
