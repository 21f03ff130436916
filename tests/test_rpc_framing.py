"""MessagePack-RPC framing (SPEC 8) without a daemon: incremental decoding, the frame cap,
and envelope checks."""

from __future__ import annotations

import msgpack
import pytest

from agent.rpc import framing


def test_decoder_reassembles_byte_by_byte():
    """Messages split at every byte boundary come out whole and in order."""
    data = framing.request(1, "a", {"x": b"\x00" * 100}) + framing.request(2, "b", {})
    d = framing.Decoder(1 << 20)
    out = []
    for i in range(len(data)):
        out += d.feed(data[i:i + 1])
    assert [m[1] for m in out] == [1, 2] and out[0][3][0]["x"] == b"\x00" * 100


def test_decoder_refuses_frames_over_the_cap():
    """A frame larger than the cap is a ProtocolError, even when it arrives in pieces."""
    d = framing.Decoder(4096)
    big = framing.request(1, "a", {"x": b"y" * 10000})
    with pytest.raises(framing.ProtocolError):
        for i in range(0, len(big), 1000):
            d.feed(big[i:i + 1000])


def test_many_small_frames_within_cap_are_fine():
    """The cap bounds one frame, not the total bytes of a connection."""
    d = framing.Decoder(4096)
    n = 0
    for i in range(1000):
        n += len(d.feed(framing.request(i, "m", {"p": b"z" * 1000})))
    assert n == 1000


@pytest.mark.parametrize("msg", [
    {"a": 1}, [], [0, 1, "m"], [0, True, "m", []], [0, 2**32, "m", []], [0, 1, b"m", []],
    [0, 1, "m", {}], [1, 1, None, None], [3, "x", []], [2, "m"],
])
def test_bad_envelopes_are_protocol_errors(msg):
    """Anything but [0, u32, str, list] or [2, str, list] is a ProtocolError."""
    with pytest.raises(framing.ProtocolError):
        framing.parse_request(msg)


def test_good_envelopes_parse():
    """A request and a notification parse; the notification has no msgid."""
    assert framing.parse_request([0, 5, "m", [{}]]).msgid == 5
    assert framing.parse_request([2, "m", []]).msgid is None


def test_malformed_bytes_are_protocol_errors():
    """Bytes that are not msgpack raise ProtocolError, not something else."""
    with pytest.raises(framing.ProtocolError):
        framing.Decoder(4096).feed(b"\xc1")


def test_response_and_notification_shapes():
    """Responses are [1, msgid, error, result]; notifications [2, method, [params]]."""
    assert msgpack.unpackb(framing.response(3, None, {"ok": True})) == [1, 3, None, {"ok": True}]
    assert msgpack.unpackb(framing.notification("exec.output", {"msgid": 3})) == [
        2, "exec.output", [{"msgid": 3}]]
