"""Issue 12 measurements: crash re-adoption over N repetitions, the time a restart takes to
re-adopt M live sessions, and what the agent-handled OOM costs.

    sudo .venv/bin/python bench/readopt_oom.py [--reps 20] [--sessions 50] [--bombs 10]

Uses the test suite's daemon helper (temporary dirs, its own cgroup prefix and uid range).
Reports, never asserts; the exit status is 1 unless every repetition re-adopted 3/3 with
complete proofs (leftovers are the test suite's business: tests/conftest.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers_daemon import AgentDaemon, start_long_exec  # noqa: E402

MiB = 1 << 20


def _complete(proof: dict) -> bool:
    return proof["status"] == "destroyed" and all(ev["ok"] for ev in proof["cdp"]["evidence"])


def crash_reps(base: Path, reps: int) -> tuple[int, list[str]]:
    """`reps` times: 3 live sessions (mid-exec, file in /work, idle), SIGKILL, restart; ok
    when 3/3 are active, /work intact, exec works and the 3 proofs are complete with the
    cut-off exec counted."""
    ok, problems = 0, []
    d = AgentDaemon(base, config={"sandbox": {"orphan_grace_seconds": 30}})
    d.start()
    try:
        for rep in range(reps):
            busy, files, idle = (d.call("session.create", {"customer_id": f"r{rep}-{i}",
                                                           "tier": "free"})["session_id"]
                                 for i in range(3))
            d.call("session.exec", {"session_id": files, "command": "echo kept > /work/f"})
            t = start_long_exec(d, busy)
            d.kill()
            t.join(30)
            d.start()
            good = all(d.call("session.get", {"session_id": s})["status"] == "active"
                       for s in (busy, files, idle))
            good &= d.call("session.exec", {"session_id": files,
                                            "command": "cat /work/f"})["output"] == b"kept\n"
            good &= d.call("session.exec", {"session_id": idle,
                                            "command": "true"})["exit_code"] == 0
            for sid, execs in ((busy, 1), (files, 2), (idle, 1)):
                p = d.call("session.destroy", {"session_id": sid})
                good &= _complete(p) and p["cdp"]["evidence"][7]["exec_count"] == execs
            ok += good
            if not good:
                problems.append(f"rep {rep}")
    finally:
        d.stop()
    return ok, problems


def readopt_time(base: Path, n: int) -> dict:
    """Create n live sessions, SIGKILL, restart: how long recovery (re-adoption) took."""
    d = AgentDaemon(base, config={"sandbox": {"orphan_grace_seconds": 60},
                                  "node": {"max_sessions": max(64, n + 8)},
                                  "tiers": {"free": {"max_concurrent": 0}}})
    d.start()
    try:
        sids = [d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
                for _ in range(n)]
        d.kill()
        t0 = time.monotonic()
        d.start()
        ready = time.monotonic() - t0
        done = next(e for e in d.logs() if e.get("event") == "recovery_done")
        adopted = sum(d.call("session.get", {"session_id": s})["status"] == "active"
                      for s in sids)
        for s in sids:
            d.call("session.destroy", {"session_id": s})
    finally:
        d.stop()
    return {"sessions": n, "adopted": adopted, "recovery_ms": done["duration_ms"],
            "start_to_ready_ms": round(ready * 1000)}


def oom_cost(base: Path, bombs: int) -> dict:
    """Memory bombs in 64 MiB sessions: complete endings, how far over the cap the
    session got before it was frozen, and how long containment took (from the step 3
    evidence the agent records)."""
    cfg = {"tiers": {"free": {"memory_bytes": 64 * MiB, "tmpfs_bytes": 16 * MiB,
                              "max_concurrent": 0}}}
    kinds = ["python3 -c 'b = bytearray(2 << 30)'",
             "python3 -c 'x = []\nwhile True: x.append(bytearray(1 << 20))'",
             "python3 -c 'x = []\nwhile True: x.append(b\"y\" * (1 << 20))' & sleep 60"]
    complete, over, contain = 0, [], []
    d = AgentDaemon(base, config=cfg)
    d.start()
    try:
        for i in range(bombs):
            sid = d.call("session.create", {"customer_id": "c", "tier": "free"})["session_id"]
            res = d.call("session.exec", {"session_id": sid, "command": kinds[i % 3]})
            while d.call("session.get", {"session_id": sid})["status"] in ("active",
                                                                            "executing"):
                time.sleep(0.02)
            p = d.call("proof.get", {"session_id": sid})
            ev3 = p["cdp"]["evidence"][2]
            complete += (p["status"] == "expired" and res["oom_killed"]
                         and all(ev["ok"] for ev in p["cdp"]["evidence"]))
            if "oom_over_cap_bytes" in ev3:
                over.append(ev3["oom_over_cap_bytes"])
            if "oom_contain_us" in ev3:
                contain.append(ev3["oom_contain_us"])
    finally:
        d.stop()

    def med(xs: list[int]) -> float | None:
        return statistics.median(xs) if xs else None

    return {"bombs": bombs, "complete": complete,
            "over_cap_bytes_median": med(over), "over_cap_bytes_max": max(over, default=None),
            "contain_ms_median": (med(contain) or 0) / 1000,
            "contain_ms_max": max(contain, default=0) / 1000}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--bombs", type=int, default=10)
    a = ap.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="nrx-bench-") as tmp:
        t0 = time.monotonic()
        ok, problems = crash_reps(Path(tmp) / "reps", a.reps)
        out["crash_readoption"] = {"reps": a.reps, "ok": ok, "problems": problems,
                                   "seconds": round(time.monotonic() - t0, 1)}
        out["readopt_time"] = readopt_time(Path(tmp) / "many", a.sessions)
        out["oom"] = oom_cost(Path(tmp) / "oom", a.bombs)
    print(json.dumps(out, indent=2))
    return 0 if ok == a.reps else 1


if __name__ == "__main__":
    sys.exit(main())
