"""Destruction in worker processes ([destroy] workers, agent/destroy/workers.py) on a real
daemon: the same proof as in-process, a worker killed mid-destruction loses nothing, no
worker with workers = 0, none left after the stop."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from helpers_daemon import AgentDaemon

from agent.destroy.workers import STOP_ENV


def _worker_pids(d: AgentDaemon) -> list[int]:
    """The worker pids the daemon logged as started, in order."""
    return [int(e["worker_pid"]) for e in d.logs() if e.get("event") == "destroy_worker_started"]


def _is_worker(pid: int) -> bool:
    try:
        return b"agent.destroy.worker_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _children_workers(daemon_pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{daemon_pid}/task"):
        try:
            kids = Path(f"/proc/{daemon_pid}/task/{tid}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids if _is_worker(int(k))]
    return out


def _lifecycle(d: AgentDaemon) -> dict:
    sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
    r = d.call("session.exec", {"session_id": sid,
                                "command": "head -c 65536 /dev/urandom > /work/f && "
                                           "mkdir /work/d && echo x > /work/d/g"})
    assert r["exit_code"] == 0
    return d.call("session.destroy", {"session_id": sid})


def _shape(result: dict) -> list[tuple[int, bool, list[str]]]:
    """(step, ok, sorted field names) of each step's evidence."""
    return [(ev["step"], ev["ok"], sorted(ev)) for ev in result["cdp"]["evidence"]]


def _run(tmp: Path, workers: int, env: dict | None = None) -> AgentDaemon:
    d = AgentDaemon(tmp, config={"destroy": {"workers": workers}})
    d.extra_env.update(env or {})
    return d.start()


def test_proof_from_workers_has_the_same_steps_and_fields_as_in_process(tmp_path):
    """The same lifecycle gives a proof of the same 8 steps with the same evidence fields,
    every step ok, whether destruction runs in the daemon (workers = 0, no worker process
    at all) or in a worker (whose pid the daemon logged as the one that ran the job)."""
    shapes = {}
    for n in (0, 2):
        d = _run(tmp_path / f"w{n}", n)
        try:
            result = _lifecycle(d)
            assert result["status"] == "destroyed"
            assert result["cdp"]["destruction_state"] == "complete"
            shapes[n] = _shape(result)
            jobs = [e for e in d.logs() if e.get("event") == "destroy_worker_job"]
            if n == 0:
                assert _children_workers(d.proc.pid) == [] and not _worker_pids(d)
                assert not jobs
            else:
                pids = _worker_pids(d)
                assert len(pids) == 2 and sorted(_children_workers(d.proc.pid)) == sorted(pids)
                assert [j["worker_pid"] for j in jobs] and jobs[-1]["worker_pid"] in pids
                assert not [e for e in d.logs() if e.get("event") == "destroy_worker_died"]
        finally:
            d.stop()
    assert [s[0] for s in shapes[2]] == list(range(1, 9))
    assert all(ok for _, ok, _ in shapes[2])
    assert shapes[2] == shapes[0]


def test_a_worker_killed_mid_destruction_loses_nothing_and_is_restarted(tmp_path):
    """A worker SIGKILLed while it holds a destruction (stopped by the test stop point
    before its steps: a real kernel kills nothing at a chosen place on demand): the daemon
    re-runs the steps itself, the proof is complete and says `pipeline_attempts: 2`, a new
    worker starts and takes the next destruction, and none is left after the stop."""
    d = _run(tmp_path, 1, {STOP_ENV: "destroy_worker.job"})
    try:
        first = _worker_pids(d)
        assert len(first) == 1
        sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
        d.call("session.exec", {"session_id": sid, "command": "echo secret > /work/f"})
        out: dict = {}
        t = threading.Thread(target=lambda: out.update(
            r=d.call("session.destroy", {"session_id": sid})))
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = Path(f"/proc/{first[0]}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "T":
                break
            time.sleep(0.02)
        assert state == "T"  # stopped holding the job
        os.kill(first[0], signal.SIGKILL)
        t.join(60)
        r = out["r"]
        assert r["status"] == "destroyed" and r["cdp"]["destruction_state"] == "complete"
        ev = r["cdp"]["evidence"]
        assert [e["step"] for e in ev] == list(range(1, 9)) and all(e["ok"] for e in ev)
        assert ev[7]["pipeline_attempts"] == 2
        assert ev[1]["files"] >= 1  # the files were wiped by the second attempt
        events = [e.get("event") for e in d.logs()]
        assert "destroy_worker_lost_job" in events and events.count("destroy_worker_died") == 1
        deadline = time.monotonic() + 30
        while len(_worker_pids(d)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        second = _worker_pids(d)[-1]
        assert second != first[0]
        r2 = _lifecycle(d)
        assert r2["cdp"]["destruction_state"] == "complete"
        assert "pipeline_attempts" not in r2["cdp"]["evidence"][7]
        jobs = [e for e in d.logs() if e.get("event") == "destroy_worker_job"]
        assert jobs[-1]["worker_pid"] == second
    finally:
        d.stop()
    assert d.proc.returncode == 0
    assert not _is_worker(second)


def test_no_worker_is_left_after_the_daemon_stops(tmp_path):
    """After a graceful stop that destroyed a live session through the workers, none of
    the worker processes the daemon started is running."""
    d = _run(tmp_path, 2)
    try:
        d.call("session.create", {"customer_id": "c", "tier": "free"})
        pids = _worker_pids(d)
        assert len(pids) == 2 and all(_is_worker(p) for p in pids)
    finally:
        d.stop()
    assert d.proc.returncode == 0
    ended = [e for e in d.logs() if e.get("event") == "session_destroyed"]
    assert len(ended) == 1
    assert not any(_is_worker(p) for p in pids)
