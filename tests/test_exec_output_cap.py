"""Output capping (SPEC 4): a chatty command cannot exhaust the agent; head and tail are
kept with a marker between."""

from __future__ import annotations

import test_sandbox_fixtures as fx

from agent.sandbox.output import Capture

sandbox_cfg, engine, sandbox = fx.sandbox_cfg, fx.engine, fx.sandbox  # fixtures


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def test_capture_keeps_everything_up_to_the_cap():
    """Below the cap the capture is the exact output, however it was chunked."""
    c = Capture(10)
    for piece in (b"abc", b"defg", b"hij"):
        c.feed(piece)
    assert not c.truncated and c.result() == b"abcdefghij"


def test_capture_keeps_head_and_tail_with_a_marker():
    """Beyond the cap: first cap/2 bytes, a marker naming the dropped count, last cap/2 bytes."""
    c = Capture(10)
    data = bytes(range(100))
    for i in range(0, 100, 7):
        c.feed(data[i:i + 7])
    assert c.truncated and c.total == 100
    out = c.result()
    assert out.startswith(data[:5]) and out.endswith(data[-5:])
    assert b"[... 90 bytes truncated ...]" in out


async def test_200mb_of_output_is_capped_and_agent_memory_stays_flat(sandbox):
    """200 MB on stdout: result is head + marker + tail of the 1 MiB cap and the agent's
    peak RSS grows by far less than the output."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _status("VmRSS")
    r = await sandbox.exec("head -c 200000000 /dev/zero | tr '\\0' a; echo tail-end",
                           timeout=120)
    peak = _status("VmHWM")
    cap = sandbox._engine.cfg.exec.output_cap_bytes
    assert r.exit_code == 0 and r.output_truncated and not r.stderr_truncated
    assert r.stdout.startswith(b"a" * (cap // 2))
    assert r.stdout.endswith(b"a" * 1000 + b"tail-end\n")
    dropped = int(r.stdout.split(b"[... ", 1)[1].split(b" ", 1)[0])
    assert dropped == 200_000_009 - cap  # every byte was read: head + dropped + tail
    assert cap < len(r.stdout) < cap + 100
    assert peak - before < 32 * 1024 * 1024, (before, peak)
