"""The RPC wire against a real daemon (SPEC 8): envelope, error maps, bad input, peer
credentials.  Each misbehaving client gets its error or disconnect while the daemon keeps
serving others.  The client here is written from the spec with plain msgpack."""

from __future__ import annotations

import os
import socket
import struct

import msgpack
import pytest
from helpers_daemon import AgentDaemon


class Raw:
    """A bare MessagePack-RPC client: send frames, read messages (no project code)."""

    def __init__(self, path) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(30)
        self.s.connect(str(path))
        self.u = msgpack.Unpacker(raw=False)

    def send(self, obj) -> None:
        self.s.sendall(msgpack.packb(obj, use_bin_type=True))

    def recv(self):
        while True:
            try:
                return next(self.u)
            except StopIteration:
                pass
            data = self.s.recv(65536)
            if not data:
                raise EOFError
            self.u.feed(data)

    def request(self, msgid, method, params):
        self.send([0, msgid, method, [params]])
        return self.recv()

    def closed_by_peer(self) -> bool:
        try:
            self.recv()
        except (EOFError, ConnectionResetError):
            return True
        return False

    def close(self) -> None:
        self.s.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = AgentDaemon(tmp_path_factory.mktemp("rpc"), config={
        "rpc": {"max_frame_bytes": 256 * 1024}, "exec": {"max_input_bytes": 65536}})
    d.start()
    yield d
    d.stop()


def _still_serving(daemon) -> None:
    r = Raw(daemon.socket)
    try:
        msg = r.request(7, "agent.info", {})
        assert msg[0] == 1 and msg[1] == 7 and msg[2] is None
        assert msg[3]["node_id"] == "test-node"
    finally:
        r.close()


def test_socket_mode_and_response_shape(daemon):
    """The socket is 0660 and a response is [1, msgid, nil, result]."""
    assert (os.stat(daemon.socket).st_mode & 0o777) == 0o660
    assert (os.stat(daemon.runtime_dir).st_mode & 0o777) == 0o755
    _still_serving(daemon)


def test_unknown_method_is_bad_request(daemon):
    """An unknown method gets BadRequest 400 naming `method`."""
    r = Raw(daemon.socket)
    msg = r.request(3, "session.explode", {})
    assert msg[:2] == [1, 3] and msg[3] is None
    assert msg[2] == {"error": "BadRequest", "message": msg[2]["message"], "status": 400,
                      "field": "method"}
    r.close()


@pytest.mark.parametrize(("method", "params", "field"), [
    ("session.create", {"customer_id": 5, "tier": "free"}, "customer_id"),
    ("session.create", {"customer_id": "c", "tier": "free", "ttl_seconds": "60"}, "ttl_seconds"),
    ("session.create", {"customer_id": "c", "tier": "free", "ttl_seconds": -1}, "ttl_seconds"),
    ("session.create", {"customer_id": "c", "tier": "gold"}, "tier"),
    ("session.create", {"customer_id": "c", "tier": "free", "colour": "red"}, "colour"),
    ("session.create", {"tier": "free"}, "customer_id"),
    ("session.create", {"customer_id": "c", "tier": "free", "data_classification": "secret"},
     "data_classification"),
    ("session.create", {"customer_id": "c", "tier": "free", "jurisdiction": "FR"},
     "jurisdiction"),
    ("session.create", {"customer_id": "c", "tier": "free", "session_id": "sess_XYZ"},
     "session_id"),
    ("session.get", {"session_id": 12}, "session_id"),
    ("session.exec", {"session_id": "sess_0000000000000000", "command": ["ls"]}, "command"),
    ("session.exec", {"session_id": "sess_0000000000000000", "command": "true",
                      "timeout": "soon"}, "timeout"),
    ("session.exec", {"session_id": "sess_0000000000000000", "command": "true",
                      "env": {"A": 1}}, "env"),
    ("session.exec", {"session_id": "sess_0000000000000000", "command": "true",
                      "stream": "yes"}, "stream"),
    ("session.exec", {"session_id": "sess_0000000000000000", "command": "true",
                      "input_data": b"x" * 70000}, "input_data"),
    ("proof.verify", {"cdp": "not a map"}, "cdp"),
    ("key.get", {}, "key_id"),
])
def test_bad_params_name_the_field(daemon, method, params, field):
    """Wrong types, unknown fields, missing or out-of-range values are BadRequest naming the field."""
    r = Raw(daemon.socket)
    msg = r.request(11, method, params)
    assert msg[:2] == [1, 11]
    assert msg[2]["error"] == "BadRequest" and msg[2]["status"] == 400
    assert msg[2]["field"] == field, msg[2]
    # the connection stays usable after a BadRequest
    assert r.request(12, "agent.info", {})[2] is None
    r.close()


def test_params_not_a_single_map_is_bad_request(daemon):
    """params that is a list of something other than one map gets BadRequest `params`."""
    r = Raw(daemon.socket)
    r.send([0, 5, "agent.info", ["x", "y"]])
    msg = r.recv()
    assert msg[1] == 5 and msg[2]["error"] == "BadRequest" and msg[2]["field"] == "params"
    r.close()


def test_unknown_session_is_not_found(daemon):
    """A well-formed id that does not exist is NotFound 404 (get, exec, destroy, proof.get)."""
    r = Raw(daemon.socket)
    sid = "sess_00000000deadbeef"
    for i, (method, params) in enumerate([
            ("session.get", {"session_id": sid}),
            ("session.exec", {"session_id": sid, "command": "true"}),
            ("session.destroy", {"session_id": sid}),
            ("proof.get", {"session_id": sid}),
            ("key.get", {"key_id": "nrx-receipt-nothing"})]):
        msg = r.request(100 + i, method, params)
        assert msg[2]["error"] == "NotFound" and msg[2]["status"] == 404, (method, msg)
    r.close()


@pytest.mark.parametrize("payload", [
    b"\xc1",                                   # never-used msgpack byte
    msgpack.packb({"not": "an array"}),        # request that is not an array
    msgpack.packb([0, 1, "agent.info"]),       # wrong arity
    msgpack.packb([0, -1, "agent.info", [{}]]),  # msgid out of range
    msgpack.packb([1, 1, None, None]),         # a response sent to the server
    msgpack.packb([0, 1, 42, [{}]]),           # method not a string
    msgpack.packb([0, 1, "agent.info", {}]),   # params not an array
])
def test_malformed_input_closes_only_that_connection(daemon, payload):
    """Malformed msgpack or a wrong envelope closes that connection; others keep working."""
    bystander = Raw(daemon.socket)
    r = Raw(daemon.socket)
    r.s.sendall(payload)
    assert r.closed_by_peer()
    r.close()
    assert bystander.request(1, "agent.info", {})[2] is None
    bystander.close()
    _still_serving(daemon)


def test_oversized_frame_closes_connection(daemon):
    """A frame over max_frame_bytes (256 KiB in this test config) closes the connection."""
    r = Raw(daemon.socket)
    big = msgpack.packb([0, 1, "proof.verify", [{"cdp": {"x": b"\0" * 400_000}}]],
                        use_bin_type=True)
    try:
        r.s.sendall(big)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert r.closed_by_peer()
    r.close()
    _still_serving(daemon)
    assert any(e.get("event") == "rpc_protocol_error" for e in daemon.logs())


def test_concurrent_requests_on_one_connection(daemon):
    """600 pipelined requests on one connection (over the in-flight bound of 256) are all
    answered, matched by msgid."""
    import threading

    r = Raw(daemon.socket)
    n = 600

    def sender():  # a pipelining client sends while it reads
        for i in range(n):
            r.send([0, 1000 + i, "agent.info" if i % 2 else "proof.pending", [{}]])

    t = threading.Thread(target=sender)
    t.start()
    got = {}
    for _ in range(n):
        msg = r.recv()
        got[msg[1]] = msg
    t.join()
    assert set(got) == {1000 + i for i in range(n)}
    assert all(m[2] is None for m in got.values())
    r.close()


def _as_other_uid(path, uid: int, gid: int = 0, groups: tuple[int, ...] = ()) -> bytes:
    """Connect from a forked child running as `uid`/`gid` with supplementary `groups`."""
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no Python-level cleanup, report through the pipe
        code = 1
        try:
            os.close(rd)
            # pytest's tmp dirs are 0700: reach the (0755) runtime dir through an fd
            dirfd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(20)
            s.connect(f"/proc/self/fd/{dirfd}/{os.path.basename(path)}")
            s.sendall(msgpack.packb([0, 77, "agent.info", [{}]]))
            buf = b""
            u = msgpack.Unpacker(raw=False)
            while True:  # until one whole message, then until EOF or a short wait
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                u.feed(chunk)
                if any(True for _ in u):
                    s.settimeout(1.0)
                    try:
                        while chunk := s.recv(65536):
                            buf += chunk
                    except TimeoutError:
                        pass
                    break
            os.write(wr, struct.pack("I", len(buf)) + buf)
            code = 0
        finally:
            os._exit(code)
    os.close(wr)
    data = b""
    while chunk := os.read(rd, 65536):
        data += chunk
    os.close(rd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    (n,) = struct.unpack("I", data[:4])
    return data[4:4 + n]


def test_peer_uid_not_allowed_gets_unauthorized_then_close(daemon):
    """A peer whose uid/gid is not allowed gets Unauthorized (msgid 0: its request is
    never decoded), then EOF."""
    data = _as_other_uid(daemon.socket, 65534)
    u = msgpack.Unpacker(raw=False)
    u.feed(data)
    msgs = list(u)
    assert len(msgs) == 1
    assert msgs[0][:2] == [1, 0] and msgs[0][3] is None
    assert msgs[0][2]["error"] == "Unauthorized" and msgs[0][2]["status"] == 401
    _still_serving(daemon)


def test_allowed_gid_admits_peer(tmp_path):
    """A peer whose gid is in rpc.allowed_gids is served even though its uid is not listed."""
    with AgentDaemon(tmp_path, config={"rpc": {"allowed_uids": [0], "allowed_gids": [0]}}) as d:
        data = _as_other_uid(d.socket, 65534)
        u = msgpack.Unpacker(raw=False)
        u.feed(data)
        msg = next(u)
        assert msg[1] == 77 and msg[2] is None and msg[3]["node_id"] == "test-node"


def test_supplementary_group_admits_peer(tmp_path):
    """A peer in an allowed gid only as a supplementary group is admitted (via /proc status)."""
    with AgentDaemon(tmp_path, config={"rpc": {"allowed_uids": [0], "allowed_gids": [4242]}}) as d:
        os.chmod(d.socket, 0o666)  # file permission is not what this test is about
        u = msgpack.Unpacker(raw=False)
        u.feed(_as_other_uid(d.socket, 65534, gid=65534, groups=(4242,)))
        msg = next(u)
        assert msg[1] == 77 and msg[2] is None
        u = msgpack.Unpacker(raw=False)
        u.feed(_as_other_uid(d.socket, 65534, gid=65534))
        assert next(u)[2]["error"] == "Unauthorized"
