"""Destroying a re-adopted session does not wait for the old PID 1 to be reaped (issue
12): it is not the restarted agent's child, and whoever inherited it (the host's init,
or a subreaper) reaps it when it likes or never.  Steps 5 and 6 record it as unreaped."""

from __future__ import annotations

import ctypes
import os

from helpers_daemon import AgentDaemon

PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def _subreaper(on: bool) -> None:
    assert _libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


def _our_orphans() -> list[int]:
    """Processes re-parented to this test process (it is their subreaper)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    text = f.read()
            except OSError:
                continue
            if f"\nPPid:\t{os.getpid()}\n" in text and "Name:\tnrx-init" in text:
                out.append(int(name))
    return out


def test_readopted_pid1_that_nobody_reaps_is_recorded_unreaped(tmp_path):
    """The test process is the subreaper that inherits the sandbox's PID 1 when the agent
    is SIGKILLed, and it does not reap it until the destroy returned: the restarted
    agent destroys the re-adopted session with every step ok, status destroyed, and
    steps 5 and 6 each count exactly one unreaped process (the zombie PID 1), instead
    of waiting for a reap that only this test can do."""
    d = AgentDaemon(tmp_path, config={"sandbox": {"orphan_grace_seconds": 30}})
    d.start()
    orphans: list[int] = []
    try:
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        _subreaper(True)
        try:
            d.kill()
        finally:
            _subreaper(False)  # only the PID 1 orphaned by this kill comes to us
        orphans = _our_orphans()
        assert len(orphans) == 1
        d.start()
        assert d.call("session.get", {"session_id": sid})["status"] == "active"
        proof = d.call("session.destroy", {"session_id": sid})
        ev = proof["cdp"]["evidence"]
        assert proof["status"] == "destroyed" and all(e["ok"] for e in ev), ev
        with open(f"/proc/{orphans[0]}/status") as f:
            assert "State:\tZ" in f.read()  # still not reaped: nobody but us can
        assert ev[4]["processes_with_ids_unreaped"] == 1
        assert ev[5]["processes_unreaped"] == 1
    finally:
        for pid in orphans:
            os.waitpid(pid, 0)
        assert d.stop() == 0
