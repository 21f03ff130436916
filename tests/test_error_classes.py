"""Customer-caused conditions get the right error class (issue 15): BadRequest naming the
field for what could never run, Conflict for a session the customer filled, never
InternalError — on a real daemon."""

from __future__ import annotations

import pytest
from helpers_daemon import agent_daemon  # noqa: F401 (fixture)

from agent.errors import BadRequest, Conflict
from agent.rpc.methods import MAX_COMMAND_BYTES


def _session(d) -> str:
    return d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]


def test_command_limit_is_what_the_sandbox_can_start(agent_daemon):  # noqa: F811
    """A command of exactly MAX_COMMAND_BYTES (the kernel's 128 KiB argv-string cap minus
    its NUL) runs; one byte more is BadRequest naming `command`."""
    d = agent_daemon
    sid = _session(d)
    assert MAX_COMMAND_BYTES == 128 * 1024 - 1
    ok = "true #" + "x" * (MAX_COMMAND_BYTES - 6)
    assert d.call("session.exec", {"session_id": sid, "command": ok})["exit_code"] == 0
    with pytest.raises(BadRequest) as e:
        d.call("session.exec", {"session_id": sid, "command": ok + "x"})
    assert e.value.field == "command"


def test_large_env_runs_and_oversized_entry_is_bad_request(agent_daemon):  # noqa: F811
    """Three 120,000-byte env values (360 KB, beyond the default socket buffer) reach the
    command; a single NAME=value over the argv-string cap is BadRequest naming `env`."""
    d = agent_daemon
    sid = _session(d)
    env = {f"V{i}": "y" * 120_000 for i in range(3)}
    res = d.call("session.exec", {"session_id": sid, "command": 'printf %s "$V2" | wc -c',
                                  "env": env})
    assert res["output"].strip() == b"120000"
    with pytest.raises(BadRequest) as e:
        d.call("session.exec", {"session_id": sid, "command": "true",
                                "env": {"V": "y" * MAX_COMMAND_BYTES}})
    assert e.value.field == "env"


def test_env_entries_over_the_configured_limit_are_bad_request(agent_daemon):  # noqa: F811
    """exec.max_env_entries (200) variables run; one more is BadRequest naming `env` at the RPC edge."""
    d = agent_daemon
    sid = _session(d)
    env = {f"V{i}": str(i) for i in range(200)}
    assert d.call("session.exec", {"session_id": sid, "command": "echo $V199",
                                   "env": env})["output"].strip() == b"199"
    with pytest.raises(BadRequest) as e:
        d.call("session.exec", {"session_id": sid, "command": "true", "env": {**env, "X": "1"}})
    assert e.value.field == "env"


@pytest.mark.parametrize("bad", ["a/b", "../x", "a\nb", "a\0b", "", "-x", "a b", "é"])
def test_customer_id_outside_the_safe_alphabet_is_bad_request(agent_daemon, bad):  # noqa: F811
    """customer_id must be 1..256 of A-Z a-z 0-9 . _ : @ - (starting alphanumeric)."""
    with pytest.raises(BadRequest) as e:
        agent_daemon.call("session.create", {"customer_id": bad, "tier": "free"})
    assert e.value.field == "customer_id"


def test_customer_id_alphabet_admits_usual_ids(agent_daemon):  # noqa: F811
    """Emails, UUIDs and prefixed ids are accepted."""
    for good in ("ops@example.com", "6f1c2d3e-0000-4000-8000-123456789abc", "org:42_a.b"):
        sid = agent_daemon.call("session.create", {"customer_id": good, "tier": "free"})
        agent_daemon.call("session.destroy", {"session_id": sid["session_id"]})


def test_input_into_a_full_session_is_conflict(agent_daemon):  # noqa: F811
    """input_data into a session whose tmpfs the customer filled is Conflict naming
    `input_data`, and the session keeps working."""
    d = agent_daemon
    sid = _session(d)
    d.call("session.exec", {"session_id": sid, "command": "cat /dev/zero > /work/fill"})
    with pytest.raises(Conflict) as e:
        d.call("session.exec", {"session_id": sid, "command": "true",
                                "input_data": b"z" * (1 << 20)})
    assert e.value.field == "input_data" and "full" in e.value.message
    d.call("session.exec", {"session_id": sid, "command": "rm /work/fill"})
    res = d.call("session.exec", {"session_id": sid, "command": "wc -c < /input/data",
                                  "input_data": b"z" * 10})
    assert res["output"].strip() == b"10"
