"""Crash recovery end to end (SPEC 12): SIGKILL a real daemon with live sessions, start it again."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

from helpers_daemon import AgentDaemon, start_long_exec

from agent.cdp.verify import verify
from agent.ops import debug, recovery


def _journal_rows(state_dir: Path) -> dict[str, dict]:
    db = sqlite3.connect(f"file:{state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        rows = {r["session_id"]: dict(r) for r in db.execute("SELECT * FROM sessions")}
    finally:
        db.close()
    for r in rows.values():
        r["cgroup_paths"] = json.loads(r["cgroup_paths"] or "[]")
    return rows


def _uids_in_use(lo: int, hi: int) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and recovery.alive(int(pid)):
            if any(lo <= u < hi for u in recovery._uids(int(pid))):
                out.append(int(pid))
    return out


def test_sigkilled_agent_leaves_nothing_after_restart(tmp_path):
    """5 live sessions (idle, with files, mid-exec, ...), SIGKILL, down longer than the
    orphan grace (1 s) so the sandboxes end themselves, restart: 0 leftovers, 5 verifying
    CDPs (agent_recovery)."""
    d = AgentDaemon(tmp_path / "agent", config={"sandbox": {"orphan_grace_seconds": 1}})
    d.start()
    try:
        sids = [d.call("session.create", {"customer_id": f"c{i}", "tier": "starter",
                                          "data_classification": cls})["session_id"]
                for i, cls in enumerate(["general", "PHI", "general", "PII", "general"])]
        idle, with_files, busy, with_input, fresh = sids
        d.call("session.exec", {"session_id": with_files,
                                "command": "mkdir -p /work/d && head -c 300000 /dev/urandom "
                                           "> /work/d/blob && echo hi > /tmp/t"})
        d.call("session.exec", {"session_id": with_input, "command": "cp /input/data /work/x",
                                "input_data": b"secret" * 1000})
        d.call("session.exec", {"session_id": idle, "command": "true"})

        t = start_long_exec(d, busy)
        rows = _journal_rows(d.state_dir)
        assert all(rows[s]["init_pid"] and rows[s]["cgroup_paths"] for s in sids)
        assert all(recovery.alive(rows[s]["init_pid"]) for s in sids)

        d.kill()  # crash
        t.join(30)
        time.sleep(1.5)  # past the grace: nobody re-attached
        d.start()  # recovery runs before the socket is served

        cfg_sb = d.config["sandbox"]
        size = 65536
        mounts = set(recovery._mount_points())
        for s in sids:
            r = rows[s]
            assert not (recovery.alive(r["init_pid"])
                        and recovery.starttime(r["init_pid"]) == r["init_starttime"]), s
            assert r["mount_path"] not in mounts, s
            assert not any(Path(p).exists() for p in r["cgroup_paths"]), s
            lo = cfg_sb["uid_base"] + r["slot"] * size
            assert _uids_in_use(lo, lo + size) == [], s
        assert not [m for m in mounts if m.startswith(str(d.runtime_dir) + "/")]

        pending = d.call("proof.pending")
        by_sid = {p["session_id"]: p for p in pending}
        assert set(sids) <= set(by_sid)
        for s in sids:
            p = by_sid[s]
            assert p["reason"] == "agent_recovery", s
            assert p["status"] in ("expired", "expired_unclean")
            v = verify(p["cdp"])
            assert v["valid"], (s, v)
            ev8 = p["cdp"]["evidence"][7]
            assert ev8["reason"] == "agent_recovery" and ev8["session_id"] == s
            assert d.call("session.get", {"session_id": s})["status"] == p["status"]
        events = [e for e in d.logs() if e.get("event") == "recovery_done"]
        assert events and events[0]["sessions"] == 5
        # the session mounts lived in the dead agent's own mount namespace and went with it
        # (issue 13): none is left for the new agent to detach
        assert events[0]["reclaimed_cgroups"] == 5 and events[0]["reclaimed_mounts"] == 0
        status = json.loads(debug.request(d.runtime_dir / "debug.sock", "status"))
        assert status["recovery"]["reclaimed"]["slots"] == 5
        assert set(status["recovery"]["sessions"]) == set(sids)
    finally:
        d.stop()
