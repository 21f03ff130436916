"""Proofs that cannot be faked, against a real daemon (issue 14): proof.get answers the
destroy response's bytes and checks the owner; proof.verify trusts only the node's own
keys; `keys export` + `verify --trust` / `--agent` reach provenance; a key rotated out
still verifies its old proofs."""

from __future__ import annotations

import json
import socket

import msgpack
import pytest
from helpers_daemon import AgentDaemon
from proof_forgery import foreign_signer, leaf_edits, resign, swaps

from agent.errors import NotFound
from agent.keys.attestation import AttestationKeyStore


def _frame(d: AgentDaemon, method: str, params: dict) -> bytes:
    """The raw response frame of one request with msgid 7 on a fresh connection."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(120)
    s.connect(str(d.socket))
    try:
        s.sendall(msgpack.packb([0, 7, method, [params]], use_bin_type=True))
        buf = b""
        while True:
            data = s.recv(1 << 16)
            assert data, "connection closed"
            buf += data
            try:
                msg = msgpack.unpackb(buf, raw=False)
            except (msgpack.OutOfData, ValueError):
                continue
            assert msg[0] == 1 and msg[1] == 7 and msg[2] is None, msg
            return buf
    finally:
        s.close()


def _session(d: AgentDaemon, customer: str, classification: str, jurisdiction: str) -> str:
    sid = d.call("session.create", {"customer_id": customer, "tier": "free",
                                    "data_classification": classification,
                                    "jurisdiction": jurisdiction})["session_id"]
    d.call("session.exec", {"session_id": sid, "command": "echo secret > /work/f"})
    return sid


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One daemon for the module, two destroyed sessions of different customers."""
    base = tmp_path_factory.mktemp("proofs")
    with AgentDaemon(base / "agent") as d:
        a = _session(d, "cust-a", "PHI", "EU")
        b = _session(d, "cust-b", "general", "US")
        frames = {sid: _frame(d, "session.destroy", {"session_id": sid}) for sid in (a, b)}
        results = {sid: msgpack.unpackb(f, raw=False)[3] for sid, f in frames.items()}
        yield d, a, b, frames, results


def _write(d: AgentDaemon, name: str, obj) -> str:
    p = d.base / name
    p.write_text(json.dumps(obj))
    return str(p)


def test_proof_get_bytes_equal_destroy_response(node):
    """proof.get answers exactly the bytes of the destroy response (same msgid), with or
    without the owner's customer_id."""
    d, a, b, frames, _ = node
    for sid, owner in ((a, "cust-a"), (b, "cust-b")):
        assert _frame(d, "proof.get", {"session_id": sid}) == frames[sid]
        assert _frame(d, "proof.get", {"session_id": sid, "customer_id": owner}) == frames[sid]


def test_proof_get_wrong_customer_not_found(node):
    """proof.get with another customer's id is NotFound, as for an unknown session."""
    d, a, b, *_ = node
    for sid, other in ((a, "cust-b"), (b, "cust-a"), (a, "nobody")):
        with pytest.raises(NotFound):
            d.call("proof.get", {"session_id": sid, "customer_id": other})


def test_proof_verify_real_and_forged(node):
    """proof.verify: the real result, CDP and rendition reach provenance; a CDP re-signed
    with a foreign key (evidence edited to claim B's session) is invalid, signer false."""
    d, a, b, _, results = node
    res = results[a]
    for doc in (res, res["cdp"], res["auditproof"]):
        v = d.call("proof.verify", {"cdp": doc})
        assert v["valid"] is True and v["level"] == "provenance", v
        assert v["checks"]["signer"] is True and v["checks"]["step_count"] == 8
        assert {"chain_integrity", "final_hash", "signature"} <= {
            k for k, x in v["checks"].items() if x is True}
    forged = resign(res["cdp"], foreign_signer(), session_id=b)
    v = d.call("proof.verify", {"cdp": forged})
    assert v["valid"] is False and v["checks"]["signer"] is False
    assert v["checks"]["signature"] is True  # self-consistent, just not ours


def test_proof_verify_stripped_edits_not_complete(node):
    """Stripped of evidence, with destruction_state flipped or session_id changed, the
    node's proof.verify reports nothing as complete or bound (with and without the
    binding signature)."""
    d, a, b, _, results = node
    cdp = {k: v for k, v in results[a]["cdp"].items() if k != "evidence"}
    for doc in (cdp, {k: v for k, v in cdp.items() if k != "binding_signature"}):
        for edit in ({"destruction_state": "incomplete" if doc["destruction_state"] == "complete"
                      else "complete"}, {"session_id": b}):
            v = d.call("proof.verify", {"cdp": {**doc, **edit}})
            assert v["complete"] is False and v["checks"]["session_binding"] is not True, v
            assert v["checks"]["destruction_complete"] is not True, v


def test_every_edit_and_swap_detected_by_the_node(node):
    """Every single-leaf edit of a real destroy result outside the evidence, and B's parts
    swapped into A's, are invalid under proof.verify."""
    d, a, b, _, results = node
    tried = missed = 0
    names = []
    for name, doc in [*leaf_edits(results[a]), *swaps(results[a], results[b])]:
        if "/evidence/" in name:
            continue  # the chain binds the evidence: covered by the property tests
        tried += 1
        if d.call("proof.verify", {"cdp": doc})["valid"]:
            missed += 1
            names.append(name)
    assert tried > 100 and missed == 0, names


def test_keys_export_and_verify_cli(node):
    """`keys export` (RPC and --state-dir) gives a key set with which `verify --trust`
    reaches provenance on the real result and rejects the forgery; `--agent` likewise."""
    d, a, b, _, results = node
    out = d.cli("keys", "export")
    assert out.returncode == 0, out.stderr
    ks = json.loads(out.stdout)
    assert ks["format"] == "nanorix-agent-keyset/1" and ks["node_id"] == "test-node"
    key = results[a]["cdp"]["attestation"]["key_id"]
    assert [k["key_id"] for k in ks["keys"]] == [key] and ks["keys"][0]["retired_at"] is None
    local = d.cli("keys", "export", "--state-dir", str(d.state_dir))
    assert local.returncode == 0 and json.loads(local.stdout)["keys"] == ks["keys"]
    keys = _write(d, "keys.json", ks)
    real = _write(d, "real.json", results[a])
    forged = _write(d, "forged.json", resign(results[a]["cdp"], foreign_signer(), session_id=b))
    ok = d.cli("verify", "--trust", keys, "--require-trust", real)
    assert ok.returncode == 0 and b"VALID \xe2\x80\x94 signer trusted (provenance)" in ok.stdout
    bad = d.cli("verify", "--trust", keys, forged)
    assert bad.returncode == 1 and b"INVALID" in bad.stdout
    assert d.cli("verify", real, "--agent", str(d.socket)).returncode == 0
    assert d.cli("verify", forged, "--agent", str(d.socket)).returncode == 1


def test_retired_key_still_verifies(tmp_path):
    """After the node's key is rotated out (daemon stopped, store rotated, restarted), the
    old proof still verifies under proof.verify and under the exported key set, where the
    old key shows its retirement time; a new proof is signed by the new key."""
    with AgentDaemon(tmp_path / "agent") as d:
        sid = _session(d, "c", "general", "US")
        old = d.call("session.destroy", {"session_id": sid})
        d.stop()
        store = AttestationKeyStore(d.state_dir, 24 * 3600, credentials_dir="")
        new_key = store.rotate()
        d.start()
        sid2 = _session(d, "c", "general", "US")
        new = d.call("session.destroy", {"session_id": sid2})
        assert new["cdp"]["attestation"]["key_id"] == new_key.key_id
        assert old["cdp"]["attestation"]["key_id"] != new_key.key_id
        for doc in (old, new):
            v = d.call("proof.verify", {"cdp": doc})
            assert v["valid"] and v["level"] == "provenance", v
        ks = json.loads(d.cli("keys", "export").stdout)
        assert [k["retired_at"] for k in ks["keys"]] == [new_key.created_at, None]
        keys = _write(d, "keys.json", ks)
        for doc in (old, new):
            out = d.cli("verify", "--trust", keys, "--require-trust", _write(d, "p.json", doc))
            assert out.returncode == 0, out.stdout
