"""The `[remote]` listener: MessagePack-RPC over TCP with mutual TLS 1.3 (issue 17).

Every certificate is made here with `cryptography`: a CA, the node's certificate, a listed
client, an unlisted one, a client of a foreign CA, an expired client, one listed by its
URI SAN.  Each is served or refused as docs/remote.md says, on a real daemon on loopback."""

from __future__ import annotations

import signal
import socket
import ssl
import time

import pytest
from helpers_daemon import AgentDaemon
from pki import Pki

from agent.cdp.verify import verify
from agent.errors import Unauthorized, Unavailable
from agent.rpc.client import Client


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    p = Pki(tmp_path_factory.mktemp("pki"))
    p.issue("node", "node-1", server=True)
    p.issue("listed", "control-plane")
    p.issue("unlisted", "intruder")
    p.issue("foreign", "control-plane", foreign=True)
    p.issue("expired", "control-plane", expired=True)
    p.issue("spiffe", "worker-7", uri="spiffe://fleet/control-plane")
    return p


def remote_config(pki: Pki) -> dict:
    return {"remote": {"listen": "127.0.0.1:0", "cert": str(pki.base / "node.crt"),
                       "key": str(pki.base / "node.key"), "client_ca": str(pki.base / "ca.crt"),
                       "allowed_clients": ["control-plane", "spiffe://fleet/control-plane"],
                       "handshake_timeout_seconds": 2.0}}


def remote_port(d: AgentDaemon) -> int:
    line = next(x for x in d.logs() if x.get("event") == "rpc_remote_listening")
    return int(line["address"].rsplit(":", 1)[1])


def tls_client(pki: Pki, port: int, who: str | None, *, timeout: float = 30) -> Client:
    """A client presenting WHO.crt (None: no certificate)."""
    if who is None:
        ctx = ssl.create_default_context(cafile=str(pki.base / "ca.crt"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        return Client(sock=ctx.wrap_socket(raw, server_hostname="localhost"))
    return Client.tls("127.0.0.1", port, cert=pki.base / f"{who}.crt",
                      key=pki.base / f"{who}.key", ca=pki.base / "ca.crt",
                      server_name="localhost", timeout=timeout)


@pytest.fixture(scope="module")
def remote(pki, tmp_path_factory):
    d = AgentDaemon(tmp_path_factory.mktemp("remote"), config=remote_config(pki))
    d.start()
    try:
        yield d
    finally:
        d.stop()


def _refusals(d: AgentDaemon) -> list[dict]:
    return [x for x in d.logs() if x.get("event") == "rpc_remote_refused"]


def test_listed_clients_are_served_by_cn_or_uri_san(remote, pki):
    """A client of the CA named in allowed_clients by its CN or its URI SAN is served."""
    port = remote_port(remote)
    for who in ("listed", "spiffe"):
        with tls_client(pki, port, who) as c:
            info = c.call("agent.info")
            assert info["node_id"] == "test-node" and info["draining"] is False
    accepted = [x for x in remote.logs() if x.get("event") == "rpc_remote_accepted"]
    assert {x["subject"] for x in accepted} >= {"CN=control-plane", "CN=worker-7"}


def test_unlisted_name_gets_unauthorized_and_is_logged_without_request_data(remote, pki):
    """A valid certificate whose names are not listed gets Unauthorized; the log names the
    peer and subject but holds nothing of the request."""
    with tls_client(pki, remote_port(remote), "unlisted") as c:
        with pytest.raises(Unauthorized):
            c.call("session.create", {"customer_id": "MARKER-not-logged", "tier": "free"})
    refused = [x for x in _refusals(remote) if x["subject"] == "CN=intruder"]
    assert refused and refused[-1]["peer"].startswith("127.0.0.1:")
    assert "allowed_clients" in refused[-1]["reason"]
    assert "MARKER-not-logged" not in remote.log_text()


@pytest.mark.parametrize("who, reason", [
    ("foreign", "unable to get local issuer certificate"),
    ("expired", "certificate has expired"),
    (None, "certificate"),
])
def test_bad_certificates_are_refused_at_the_handshake(remote, pki, who, reason):
    """No certificate, a foreign CA or an expired certificate: the handshake fails, no
    request is answered, and the refusal is logged with the peer and the reason."""
    before = len(_refusals(remote))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with tls_client(pki, remote_port(remote), who) as c:
            c.call("agent.info")  # TLS 1.3: the server's verdict arrives at the first read
    deadline = time.monotonic() + 10
    while len(_refusals(remote)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    last = _refusals(remote)[-1]
    assert last["peer"].startswith("127.0.0.1:") and reason in last["reason"]


def test_plain_tcp_and_old_tls_are_refused(remote, pki):
    """A client speaking msgpack without TLS, or TLS 1.2, gets no answer."""
    port = remote_port(remote)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"\x94\x00\x01\xaaagent.info\x91\x80")
        try:
            data = s.recv(4096)
        except ConnectionResetError:
            data = b""
        assert b"node_id" not in data
    ctx = ssl.create_default_context(cafile=str(pki.base / "ca.crt"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pki.base / "listed.crt", pki.base / "listed.key")
    with pytest.raises(ssl.SSLError):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            ctx.wrap_socket(raw, server_hostname="localhost")


def test_full_lifecycle_over_tls_with_streamed_output_and_a_verifying_proof(remote, pki):
    """create -> streamed exec -> destroy -> proof.pending/ack over mTLS; the CDP verifies."""
    with tls_client(pki, remote_port(remote), "listed") as c:
        sid = c.call("session.create", {"customer_id": "remote", "tier": "free"})["session_id"]
        chunks: list[dict] = []
        res = c.call("session.exec", {"session_id": sid, "stream": True,
                                      "command": "seq 1 20000; echo oops >&2"},
                     on_notify=lambda m, p: chunks.append(p))
        expected = "".join(f"{i}\n" for i in range(1, 20001)).encode()
        assert res["exit_code"] == 0 and res["stream_dropped"] is False
        assert b"".join(x["data"] for x in chunks if x["stream"] == "stdout") == expected
        assert b"".join(x["data"] for x in chunks if x["stream"] == "stderr") == b"oops\n"
        out = c.call("session.destroy", {"session_id": sid})
        assert verify(out["cdp"])["valid"] is True
        assert c.call("proof.verify", {"cdp": out["cdp"]})["valid"] is True
        pending = c.call("proof.pending", {"limit": 1000})
        assert [p["session_id"] for p in pending].count(sid) == 1
        assert c.call("proof.ack", {"session_id": sid})["acked"] is True


def test_drain_over_tls_refuses_creates_while_live_sessions_work(remote, pki):
    """agent.drain over mTLS: creates are Unavailable, the live session still execs."""
    with tls_client(pki, remote_port(remote), "listed") as c:
        sid = c.call("session.create", {"customer_id": "drain", "tier": "free"})["session_id"]
        try:
            assert c.call("agent.drain", {"drain": True}) == {"draining": True,
                                                               "sessions_live": 1}
            with pytest.raises(Unavailable, match="draining"):
                c.call("session.create", {"customer_id": "drain", "tier": "free"})
            assert c.call("session.exec", {"session_id": sid, "command": "echo hi"}
                          )["output"] == b"hi\n"
            health = c.call("agent.health")
            assert health["draining"] is True and health["sessions_live"] == 1
            info = c.call("agent.info")
            assert info["draining"] is True and info["capacity"]["sessions_live"] == 1
            assert all(t["free_slots"] == 0 for t in info["tiers"].values())
        finally:
            c.call("agent.drain", {"drain": False})
            c.call("session.destroy", {"session_id": sid})
        assert c.call("agent.info")["tiers"]["free"]["free_slots"] > 0


def test_sighup_reloads_the_certificate_and_keeps_live_connections(tmp_path):
    """After the node certificate, key and client CA are replaced and SIGHUP sent, new
    connections see the new ones while a connection opened before keeps working."""
    pki = Pki(tmp_path / "pki")
    pki.issue("node", "node-1", server=True)
    pki.issue("listed", "control-plane")
    with AgentDaemon(tmp_path / "a", config=remote_config(pki)) as d:
        port = remote_port(d)
        old = tls_client(pki, port, "listed")
        try:
            old_cert = old.sock.getpeercert(binary_form=True)
            assert old.call("agent.info")["node_id"] == "test-node"
            new = Pki(tmp_path / "new")  # a new CA for both sides: reload covers client_ca
            new.issue("node", "node-2", server=True)
            new.issue("listed", "control-plane")
            for name in ("node.crt", "node.key", "ca.crt"):
                (pki.base / name).write_bytes((new.base / name).read_bytes())
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while not any(x.get("event") == "rpc_remote_reloaded" for x in d.logs()):
                assert time.monotonic() < deadline, d.log_text()[-2000:]
                time.sleep(0.05)
            with tls_client(new, port, "listed") as c:
                assert c.sock.getpeercert(binary_form=True) != old_cert
                assert c.call("agent.info")["node_id"] == "test-node"
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                with tls_client(pki, port, "listed") as c:  # its CA is no longer trusted
                    c.call("agent.info")
            assert old.call("agent.health")["sessions_live"] == 0  # the live one was kept
            assert d.proc.poll() is None
        finally:
            old.close()


def test_remote_config_is_checked(tmp_path):
    """A [remote] without a client CA, or a malformed listen address, is refused at start."""
    from agent.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="client_ca"):
        from_dict({"remote": {"listen": "127.0.0.1:7443", "cert": "/c", "key": "/k"}}).validate()
    with pytest.raises(ConfigError, match="HOST:PORT"):
        from_dict({"remote": {"listen": "7443", "cert": "/c", "key": "/k",
                              "client_ca": "/a"}}).validate()
    assert from_dict({}).validate().remote.listen == ""


def test_key_from_a_systemd_credential(pki, tmp_path):
    """With remote.key_credential the node key is read from $CREDENTIALS_DIRECTORY, as
    systemd's LoadCredential= provides it, and clients are served."""
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    (creds / "nanorix-tls-key").write_bytes((pki.base / "node.key").read_bytes())
    cfg = remote_config(pki)
    del cfg["remote"]["key"]
    cfg["remote"]["key_credential"] = "nanorix-tls-key"
    d = AgentDaemon(tmp_path / "a", config=cfg)
    d.extra_env["CREDENTIALS_DIRECTORY"] = str(creds)
    with d:
        with tls_client(pki, remote_port(d), "listed") as c:
            assert c.call("agent.info")["node_id"] == "test-node"
