"""No customer bytes survive destroy in the agent process (issue 13, SPEC 13): markers in
input_data, an env value, the command text, stdout and stderr are searched in the real
daemon's memory through /proc/PID/mem after the session is destroyed."""

from __future__ import annotations

import secrets

import pytest
from helpers_daemon import AgentDaemon
from memscan import scan

INPUT_LINES = 2000


def markers() -> dict[str, bytes]:
    """One fresh marker per kind of customer data (never seen by the daemon before)."""
    return {k: f"NRX{k.upper()}{secrets.token_hex(12)}".encode()
            for k in ("input", "env", "command", "stdout", "stderr")}


def one_session(d: AgentDaemon, m: dict[str, bytes] | None, client=None,
                stream: bool = False) -> dict:
    """Create, exec once (carrying the markers when given; output streamed as
    notifications when `stream`), destroy; on `client` (one connection kept open) when
    given, else a fresh connection per call."""
    call = client.call if client is not None else d.call
    sid = call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
    if m is None:
        call("session.exec", {"session_id": sid, "command": "echo plain; echo err >&2",
                                "input_data": b"nothing\n" * 10, "env": {"A": "b"}})
    else:
        out, err = m["stdout"].decode(), m["stderr"].decode()
        # stdout/stderr markers are built by the shell from two halves, so they never
        # appear in the command text itself
        cmd = (f"wc -l /input/data; printf '%s%s\\n' {out[:8]} {out[8:]}; "
               f"printf '%s%s\\n' {err[:8]} {err[8:]} >&2; : {m['command'].decode()}")
        data = b"".join(b"%05d %s\n" % (i, m["input"]) for i in range(INPUT_LINES))
        chunks: list[bytes] = []
        res = call("session.exec", {"session_id": sid, "command": cmd, "input_data": data,
                                    "env": {"NRX_SECRET": m["env"].decode()}, "stream": stream},
                   **({"on_notify": lambda method, p: chunks.append(p["data"])} if stream else {}))
        if stream:
            assert any(m["stdout"] in c for c in chunks), chunks
        assert res["exit_code"] == 0, res
        assert m["stdout"] in res["output"] and m["stderr"] in res["stderr"]
    return call("session.destroy", {"session_id": sid})


def marker_counts(d: AgentDaemon, m: dict[str, bytes]) -> dict[str, int]:
    found = scan(d.proc.pid, list(m.values()))
    return {k: found.counts[v] for k, v in m.items()}


@pytest.mark.parametrize(("later_sessions", "stream"), [(0, False), (5, False), (0, True)])
def test_no_marker_in_agent_memory_after_destroy(tmp_path, later_sessions, stream):
    """After destroy (and after 5 unrelated sessions) the daemon's memory holds 0 copies of
    any marker the session's input, env, command, stdout or stderr carried, even while the
    connection that carried them stays open, also when the output was streamed."""
    with AgentDaemon(tmp_path / "agent") as d, d.client() as conn:
        one_session(d, None)  # warm-up: first-use allocations are not the session's
        m = markers()
        ev4 = one_session(d, m, conn, stream)["cdp"]["evidence"][3]["agent_memory"]
        for _ in range(later_sessions):
            one_session(d, None)
        counts = marker_counts(d, m)
    assert counts == dict.fromkeys(m, 0), counts
    # step 4 records what was measured about the agent's memory
    assert ev4["allocator"] == "malloc" and ev4["free_perturb_configured"], ev4
    assert ev4["freed_small_cleared"] and ev4["freed_large_cleared"], ev4
    assert ev4["exec_buffers_zeroed_bytes"] > 2 * 4096, ev4


def test_measure_tells_a_wiping_allocator_from_a_plain_one():
    """The step-4 measurement is honest both ways: under the plain interpreter a freed small
    object still holds its bytes (reported false), under the daemon's allocator settings
    it does not (reported true)."""
    import json
    import os
    import subprocess
    import sys

    from agent import memory_hygiene

    code = "import json; from agent import memory_hygiene as m; print(json.dumps(m.measure(0)))"
    plain = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "GLIBC_TUNABLES")}
    got = {}
    for name, env in (("plain", plain), ("wiping", memory_hygiene.wanted_env(plain))):
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           check=True, text=True)
        got[name] = json.loads(r.stdout)
    assert got["plain"]["allocator"] == "pymalloc" and not got["plain"]["freed_small_cleared"]
    assert not got["plain"]["free_perturb_configured"]
    assert got["wiping"]["allocator"] == "malloc" and got["wiping"]["free_perturb_configured"]
    assert got["wiping"]["freed_small_cleared"] and got["wiping"]["freed_large_cleared"]


def test_frozen_startup_heap_still_collects_what_comes_after():
    """After freeze_startup_heap() (the daemon calls it once it is ready) the objects alive
    at that moment are frozen, and a reference cycle made later (as a session's would be)
    is still freed by the young-generation collection step 4 runs."""
    import gc
    import weakref

    from agent import memory_hygiene

    class Holder:
        pass

    try:
        assert memory_hygiene.freeze_startup_heap() == gc.get_freeze_count() > 0
        a, b = Holder(), Holder()
        a.other, b.other = b, a
        a.data = secrets.token_bytes(32)
        gone = weakref.ref(a)
        del a, b
        assert gone() is not None  # only a collection frees a cycle
        gc.collect(memory_hygiene.GC_GENERATION)
        assert gone() is None
    finally:
        gc.unfreeze()
