"""Full session lifecycle against a real daemon on a real socket (SPEC 2, 4, 6, 8), spoken
with a bare msgpack client written from the spec: create, get, exec with input and
streamed output, destroy, the CDP verifies, proof.get/pending/ack, keys, ownership."""

from __future__ import annotations

import base64
import hashlib
import socket
import threading
import time

import msgpack
import pytest
from helpers_daemon import AgentDaemon

from agent.cdp.canonical import canonical_json
from agent.cdp.receipt import verify_receipt
from agent.cdp.verify import verify


class Raw:
    """Bare MessagePack-RPC client (no project code): requests, responses, notifications."""

    def __init__(self, path) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(60)
        self.s.connect(str(path))
        self.u = msgpack.Unpacker(raw=False)
        self.next_id = 1
        self.notes: list = []

    def recv(self):
        while True:
            try:
                return next(self.u)
            except StopIteration:
                pass
            data = self.s.recv(1 << 16)
            if not data:
                raise EOFError
            self.u.feed(data)

    def send(self, method, params) -> int:
        msgid = self.next_id
        self.next_id += 1
        self.s.sendall(msgpack.packb([0, msgid, method, [params]], use_bin_type=True))
        return msgid

    def call(self, method, params=None):
        """Returns (error, result); notifications seen meanwhile go to self.notes."""
        msgid = self.send(method, params or {})
        while True:
            msg = self.recv()
            if msg[0] == 2:
                self.notes.append(msg)
                continue
            assert msg[0] == 1 and msg[1] == msgid, msg
            return msg[2], msg[3]

    def ok(self, method, params=None):
        err, res = self.call(method, params)
        assert err is None, err
        return res

    def close(self):
        self.s.close()


@pytest.fixture
def daemon(tmp_path):
    # one daemon per test: its cgroup tree is created with the first session and removed
    # when it stops, so each test starts and ends with nothing of it on the host
    with AgentDaemon(tmp_path / "agent") as d:
        yield d


def _b64(s: str) -> bytes:
    assert s.startswith("base64:")
    return base64.b64decode(s[7:])


def test_full_lifecycle_raw_client(daemon):
    """create -> get -> exec (input, streamed, in order) -> destroy -> verify -> proof.get/ack."""
    r = Raw(daemon.socket)
    created = r.ok("session.create", {"customer_id": "cust-a", "tier": "free",
                                      "data_classification": "PHI", "jurisdiction": "EU",
                                      "ttl_seconds": 120})
    sid = created["session_id"]
    assert set(created) == {"session_id", "status", "ttl_seconds", "created_at", "receipt_key"}
    assert sid.startswith("sess_") and len(sid) == 21 and created["status"] == "active"
    assert created["ttl_seconds"] == 120 and created["created_at"].endswith("Z")
    rk = created["receipt_key"]
    assert rk["key_id"].startswith("nrx-receipt-") and len(_b64(rk["public_key"])) == 32

    got = r.ok("session.get", {"session_id": sid, "customer_id": "cust-a"})
    assert got == {"session_id": sid, "status": "active", "ttl_seconds": 120,
                   "created_at": created["created_at"], "data_classification": "PHI",
                   "expires_at": got["expires_at"]}
    assert sid in [s["session_id"] for s in r.ok("session.list", {"customer_id": "cust-a"})]

    # input replaces /input/data; ~390 KB of stdout arrives as ordered chunks <= 64 KiB
    res = r.ok("session.exec", {
        "session_id": sid, "stream": True, "input_data": b"secret-input\n",
        "command": "cat /input/data; seq 1 70000; echo oops >&2; exit 3"})
    assert res["exit_code"] == 3 and res["timed_out"] is False and res["signal"] is None
    expected = b"secret-input\n" + b"".join(b"%d\n" % i for i in range(1, 70001))
    assert res["output"] == expected and res["stderr"] == b"oops\n"
    chunks = [n[2][0] for n in r.notes]
    assert all(n[1] == "exec.output" for n in r.notes)
    assert all(c["msgid"] == r.next_id - 1 and len(c["data"]) <= 65536 for c in chunks)
    assert b"".join(c["data"] for c in chunks if c["stream"] == "stdout") == expected
    assert b"".join(c["data"] for c in chunks if c["stream"] == "stderr") == b"oops\n"
    assert len(chunks) >= 6
    for k in ("oom_killed", "output_truncated", "stderr_truncated", "duration_ms"):
        assert k in res
    receipt = res["receipt"]
    assert receipt["seq"] == 1 and receipt["key_id"] == rk["key_id"]
    assert receipt["output_sha256"] == hashlib.sha256(expected).hexdigest()
    assert verify_receipt(receipt, _b64(rk["public_key"]))

    # a second exec without streaming: no notifications, seq 2
    r.notes.clear()
    res2 = r.ok("session.exec", {"session_id": sid, "command": "echo hi", "env": {"X": "1"}})
    assert res2["output"] == b"hi\n" and res2["receipt"]["seq"] == 2 and not r.notes

    out = r.ok("session.destroy", {"session_id": sid, "customer_id": "cust-a"})
    assert {"session_id", "status", "cdp", "regulatory_context", "session_context",
            "auditproof"} <= set(out)
    assert out["status"] == "destroyed"  # a requested destroy with every step verified
    assert out["session_context"] == {"jurisdiction": "EU", "data_classification": "PHI"}
    assert verify(out["cdp"])["valid"] is True
    assert verify(out["auditproof"])["valid"] is True
    assert out["cdp"]["session_id"] == sid
    assert r.ok("proof.verify", {"cdp": out["cdp"]})["valid"] is True

    # the stored proof is the same document, byte for byte in canonical form
    stored = r.ok("proof.get", {"session_id": sid})
    assert canonical_json(stored["cdp"]) == canonical_json(out["cdp"])
    assert [p["session_id"] for p in r.ok("proof.pending")].count(sid) == 1

    # ended sessions stay queryable, refuse exec, and a repeated destroy returns the same proof
    assert r.ok("session.get", {"session_id": sid})["status"] == out["status"]
    err, _ = r.call("session.exec", {"session_id": sid, "command": "true"})
    assert err["error"] == "Conflict" and err["status"] == 409
    again = r.ok("session.destroy", {"session_id": sid})
    assert canonical_json(again["cdp"]) == canonical_json(out["cdp"])

    # keys: receipt key of a destroyed session and the attestation key
    assert r.ok("key.get", {"key_id": rk["key_id"]})["public_key"] == rk["public_key"]
    att = r.ok("key.get", {"key_id": out["cdp"]["attestation"]["key_id"]})
    assert att["algorithm"] == "Ed25519"
    assert att["public_key"] == out["cdp"]["attestation"]["public_key"]

    assert r.ok("proof.ack", {"session_id": sid}) == {"session_id": sid, "acked": True}
    assert sid not in [p["session_id"] for p in r.ok("proof.pending")]
    err, _ = r.call("proof.get", {"session_id": sid})
    assert err["error"] == "NotFound"
    r.close()


def test_other_customers_session_is_not_found(daemon):
    """Another customer's session answers NotFound for get, exec and destroy."""
    owner = daemon.call("session.create", {"customer_id": "owner", "tier": "free"})
    sid = owner["session_id"]
    r = Raw(daemon.socket)
    try:
        for method, extra in (("session.get", {}), ("session.exec", {"command": "true"}),
                              ("session.destroy", {})):
            err, _ = r.call(method, {"session_id": sid, "customer_id": "intruder", **extra})
            assert err["error"] == "NotFound" and err["status"] == 404, method
        assert sid not in [s["session_id"] for s in
                           r.ok("session.list", {"customer_id": "intruder"})]
    finally:
        r.close()
        daemon.call("session.destroy", {"session_id": sid, "customer_id": "owner"})
        daemon.call("proof.ack", {"session_id": sid})


def test_supplied_session_id_and_conflict(daemon):
    """A supplied sess_ id is used; supplying it again is Conflict."""
    sid = "sess_00112233445566ff"
    r = Raw(daemon.socket)
    try:
        assert r.ok("session.create", {"customer_id": "c-sid", "tier": "free",
                                       "session_id": sid})["session_id"] == sid
        err, _ = r.call("session.create", {"customer_id": "c-sid", "tier": "free",
                                           "session_id": sid})
        assert err["error"] == "Conflict" and err["status"] == 409
    finally:
        r.ok("session.destroy", {"session_id": sid})
        r.ok("proof.ack", {"session_id": sid})
        r.close()


def test_busy_session_refuses_second_exec(daemon):
    """One exec at a time: a second exec while one runs is Conflict."""
    sid = daemon.call("session.create", {"customer_id": "c-busy", "tier": "free"})["session_id"]
    r1, r2 = Raw(daemon.socket), Raw(daemon.socket)
    try:
        msgid = r1.send("session.exec", {"session_id": sid, "command": "sleep 1"})
        for _ in range(100):
            if daemon.call("session.get", {"session_id": sid})["status"] == "executing":
                break
            time.sleep(0.02)
        err, _ = r2.call("session.exec", {"session_id": sid, "command": "true"})
        assert err["error"] == "Conflict"
        msg = r1.recv()
        assert msg[1] == msgid and msg[2] is None and msg[3]["exit_code"] == 0
    finally:
        r1.close()
        r2.close()
        daemon.call("session.destroy", {"session_id": sid})
        daemon.call("proof.ack", {"session_id": sid})


def test_disconnect_mid_exec_kills_the_command(daemon):
    """A client that hangs up mid-exec gets its command killed; the session is usable again."""
    sid = daemon.call("session.create", {"customer_id": "c-hup", "tier": "free"})["session_id"]
    try:
        r = Raw(daemon.socket)
        r.send("session.exec", {"session_id": sid, "stream": True,
                                "command": "echo started; sleep 60; echo never"})
        note = r.recv()
        assert note[0] == 2 and note[2][0]["data"] == b"started\n"
        r.close()
        t0 = time.monotonic()
        while daemon.call("session.get", {"session_id": sid})["status"] != "active":
            assert time.monotonic() - t0 < 10, "exec was not cancelled"
            time.sleep(0.05)
        res = daemon.call("session.exec", {
            "session_id": sid, "command": "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"})
        assert res["exit_code"] == 0 and b"sleep" not in res["output"]
    finally:
        daemon.call("session.destroy", {"session_id": sid})
        daemon.call("proof.ack", {"session_id": sid})


def test_twenty_sessions_in_parallel(daemon):
    """20 clients create, exec and destroy at once; every result and proof is right."""
    errors: list = []
    sids: list = []

    def one(i: int) -> None:
        try:
            r = Raw(daemon.socket)
            sid = r.ok("session.create", {"customer_id": f"par-{i % 4}", "tier": "starter"})[
                "session_id"]
            sids.append(sid)
            res = r.ok("session.exec", {"session_id": sid, "command": f"echo {i}",
                                        "stream": True})
            assert res["output"] == f"{i}\n".encode()
            out = r.ok("session.destroy", {"session_id": sid})
            assert verify(out["cdp"])["valid"] is True
            r.ok("proof.ack", {"session_id": sid})
            r.close()
        except Exception as e:  # collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len(set(sids)) == 20
    assert daemon.call("agent.info")["capacity"]["sessions_live"] == 0


def test_concurrency_limit_per_customer(daemon):
    """The free tier's per-customer limit (3) gives RateLimited 429; another customer is fine."""
    made = []
    try:
        for _ in range(3):
            made.append(daemon.call("session.create", {"customer_id": "lim", "tier": "free"})[
                "session_id"])
        r = Raw(daemon.socket)
        err, _ = r.call("session.create", {"customer_id": "lim", "tier": "free"})
        assert err["error"] == "RateLimited" and err["status"] == 429
        made.append(r.ok("session.create", {"customer_id": "other", "tier": "free"})[
            "session_id"])
        r.close()
    finally:
        for sid in made:
            daemon.call("session.destroy", {"session_id": sid})
            daemon.call("proof.ack", {"session_id": sid})


def test_info_and_health(daemon):
    """agent.info reports version, node, capacity, cgroup mode, tiers; health has its fields."""
    info = daemon.call("agent.info")
    assert info["node_id"] == "test-node" and info["cgroup_mode"] in ("v1", "v2")
    assert info["capacity"]["sessions_max"] == 32
    assert info["tiers"]["free"]["memory_bytes"] == 128 * 1024 * 1024
    h = daemon.call("agent.health")
    assert h["status"] in ("healthy", "degraded", "unhealthy")
    assert set(h["engines"]) == {"eee", "dire", "rzl", "fgx", "ave"}
    assert h["database"] is True and h["timestamp"].endswith("Z")


def test_capacity_limit_is_unavailable(tmp_path):
    """A node at node.max_sessions answers Unavailable 503 whoever asks."""
    with AgentDaemon(tmp_path, config={"node": {"max_sessions": 2}}) as d:
        a = d.call("session.create", {"customer_id": "x", "tier": "free"})["session_id"]
        b = d.call("session.create", {"customer_id": "y", "tier": "free"})["session_id"]
        r = Raw(d.socket)
        err, _ = r.call("session.create", {"customer_id": "z", "tier": "free"})
        assert err["error"] == "Unavailable" and err["status"] == 503
        r.close()
        d.call("session.destroy", {"session_id": a})
        d.call("session.create", {"customer_id": "z", "tier": "free"})
        del b  # the rest is destroyed by the graceful stop (reason operator)


def test_logs_never_carry_commands_input_or_output(daemon):
    """A marker in the command, env, input and output never appears in the daemon's logs."""
    marker = "MARKER-7f3a9c-do-not-log"
    sid = daemon.call("session.create", {"customer_id": "c-log", "tier": "free"})["session_id"]
    daemon.call("session.exec", {"session_id": sid, "command": f"echo {marker}; echo {marker} >&2",
                                 "input_data": marker.encode(), "env": {"M": marker},
                                 "stream": True})
    res = daemon.call("session.exec", {"session_id": sid, "command": f"exit 1 # {marker}",
                                       "env": {marker: "x"}})
    assert res["exit_code"] == 1
    daemon.call("session.destroy", {"session_id": sid})
    text = daemon.log_text()
    assert "session_created" in text and marker not in text


def test_responses_out_of_order_match_by_msgid(daemon):
    """On one connection a quick request answers before an earlier slow exec; msgids match."""
    sid = daemon.call("session.create", {"customer_id": "c-ooo", "tier": "free"})["session_id"]
    r = Raw(daemon.socket)
    try:
        slow = r.send("session.exec", {"session_id": sid, "command": "sleep 0.5; echo done"})
        quick = r.send("agent.info", {})
        first, second = r.recv(), r.recv()
        assert first[1] == quick and first[2] is None and "node_id" in first[3]
        assert second[1] == slow and second[3]["output"] == b"done\n"
    finally:
        r.close()
        daemon.call("session.destroy", {"session_id": sid})
