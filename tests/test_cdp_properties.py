"""Property tests: tampering with anything hashed or signed breaks a proof; canonical JSON is stable."""

from __future__ import annotations

import copy
import hashlib
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vectors.loader import load_vector, vector_signer

from agent.cdp.canonical import canonical_json
from agent.cdp.chain import build_chain, evidence_hash
from agent.cdp.document import build_cdp
from agent.cdp.verify import verify

VEC = load_vector()
BASE = VEC["cdp"]
SIGNER = vector_signer(VEC)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
evidence_objs = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


def _paths(obj, prefix=()):
    """Every leaf path of a JSON value."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))
    else:
        yield prefix


HASHED_PATHS = [p for p in _paths(BASE) if p]


def _mutate(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x" if value else "x"
    return "changed"


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(HASHED_PATHS))
def test_any_field_change_invalidates(path):
    """Changing any leaf of the vector CDP (all of it is hashed, signed or bound) makes it invalid."""
    doc = copy.deepcopy(BASE)
    target = doc
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = _mutate(target[path[-1]])
    res = verify(doc)
    # `destruction_state` and evidence `ok` changes may still be self-consistent only if both move
    assert res["valid"] is False, (path, res)


@settings(max_examples=200)
@given(evidence_objs)
def test_canonical_roundtrip_same_hash(ev):
    """Any allowed evidence object hashes the same after a JSON round trip and key reordering."""
    h = evidence_hash(ev)
    back = json.loads(canonical_json(ev).decode("utf-8"))
    assert evidence_hash(back) == h
    reordered = dict(reversed(list(ev.items())))
    assert evidence_hash(reordered) == h
    assert h == "sha256:" + hashlib.sha256(canonical_json(ev)).hexdigest()


@settings(max_examples=100, deadline=None)
@given(st.lists(evidence_objs, min_size=8, max_size=8), st.integers(0, 6), st.integers(1, 7))
def test_evidence_order_matters(evs, i, d):
    """Swapping two different evidence objects changes final_hash."""
    for k, e in enumerate(evs):
        e["step"] = k + 1  # makes every object distinct
    j = min(7, i + d)
    _, f1 = build_chain(evs)
    swapped = list(evs)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    _, f2 = build_chain(swapped)
    assert f1 != f2


@settings(max_examples=50, deadline=None)
@given(st.lists(evidence_objs, min_size=8, max_size=8), st.integers(0, 7))
def test_built_proofs_verify_and_tamper(evs, i):
    """A proof built from arbitrary evidence verifies; changing one evidence object breaks it."""
    for k, e in enumerate(evs):
        e["step"] = k + 1
        e["ok"] = True
    evs[7].update(session_id="sess_0123456789abcdef", created_at="a", destroyed_at="b")
    doc = build_cdp(session_id="sess_0123456789abcdef", created_at="a", destroyed_at="b",
                    evidence=evs, signer=SIGNER)
    assert verify(doc)["valid"] is True
    doc["evidence"][i]["tampered"] = 1
    res = verify(doc)
    assert res["valid"] is False and res["checks"]["evidence"] is False
