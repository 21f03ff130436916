"""State faults at larger counts than the tests (issue 15): for each fault, sessions are
created on a real daemon, the fault is applied, sessions are destroyed on request or by
their TTL, the daemon is restarted, and the table row counts

    fault | sessions | proofs lost | data kept past TTL | leaks

- proofs lost: sessions without exactly one verifying proof in `proof.pending` after the
  final restart;
- data kept past TTL: sessions whose tmpfs is still mounted on the host after their
  destroy returned or their TTL (+5 s) passed;
- leaks: mounts under the daemon's runtime dir and cgroup directories under its prefix
  after the final stop.

Run as root from the repository: `.venv/bin/python bench/state_faults.py [--sessions N]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from faults import (  # noqa: E402
    fill_inodes,
    fill_space,
    free,
    mounted,
    set_immutable,
    small_fs,
    verifies,
)
from helpers_daemon import AgentDaemon  # noqa: E402

CONFIG = {"node": {"max_sessions": 64},
          "tiers": {"starter": {"max_concurrent": 64, "memory_bytes": 64 * 1024 * 1024}}}
TTL = 4


def _create(d: AgentDaemon, i: int, **kw) -> str:
    return d.call("session.create", {"customer_id": f"cust-{i}", "tier": "starter",
                                     **kw})["session_id"]


def _root(d: AgentDaemon, sid: str) -> Path:
    return d.runtime_dir / "sessions" / sid / "root"


def _proofs_lost(d: AgentDaemon, sids: list[str]) -> int:
    found: dict[str, int] = {}
    statuses: dict[str, int] = {}
    for r in d.logs():
        if r.get("event") == "state_damaged":
            found[r["kind"]] = found.get(r["kind"], 0) + 1
    for sid in sids:
        st = d.call("session.get", {"session_id": sid})["status"]
        statuses[st] = statuses.get(st, 0) + 1
    print(f"  damage found at the last start: {found or 'none'}; end statuses: {statuses}")
    count: dict[str, int] = {}
    for p in d.call("proof.pending"):
        if verifies(p):
            count[p["session_id"]] = count.get(p["session_id"], 0) + 1
    return sum(1 for sid in sids if count.get(sid) != 1)


def _leaks(d: AgentDaemon) -> int:
    prefix = d.config["sandbox"]["cgroup_prefix"]
    with open("/proc/self/mountinfo") as f:
        mounts = sum(1 for line in f if line.split()[4].startswith(str(d.runtime_dir)))
    cgroups = 0
    for root, dirs, _ in os.walk("/sys/fs/cgroup"):
        cgroups += sum(1 for x in dirs if x.startswith(prefix))
        if root.count("/") > 5:
            dirs[:] = []
    return mounts + cgroups


def _ended_past_ttl(d: AgentDaemon, sids: list[str], deadline: float) -> int:
    while time.monotonic() < deadline and any(mounted(_root(d, s)) for s in sids):
        time.sleep(0.1)
    return sum(1 for s in sids if mounted(_root(d, s)))


def full_disk(base: Path, n: int) -> tuple[int, int, int, int]:
    with small_fs(base / "state", size="16m") as fs:
        d = AgentDaemon(base, config=CONFIG).start()
        sids = [_create(d, i) for i in range(n)]
        ttl_sids = [_create(d, i, ttl_seconds=TTL) for i in range(n // 2)]
        t0 = time.monotonic()
        filler = fill_space(fs)
        kept = 0
        for sid in sids:
            d.call("session.destroy", {"session_id": sid})
            kept += mounted(_root(d, sid))
        kept += _ended_past_ttl(d, ttl_sids, t0 + TTL + 5)
        free(filler)
        d.stop()
        d.start()
        lost = _proofs_lost(d, sids + ttl_sids)
        d.stop()
        return len(sids + ttl_sids), lost, kept, _leaks(d)


def no_inodes(base: Path, n: int) -> tuple[int, int, int, int]:
    with small_fs(base / "state", size="64m", inodes=n + 40) as fs:
        d = AgentDaemon(base, config=CONFIG).start()
        sids = [_create(d, i) for i in range(n)]
        inodes = fill_inodes(fs)
        kept = 0
        for sid in sids:
            d.call("session.destroy", {"session_id": sid})
            kept += mounted(_root(d, sid))
        d.stop()
        free(inodes)
        d.start()
        lost = _proofs_lost(d, sids)
        d.stop()
        return n, lost, kept, _leaks(d)


def immutable_spool(base: Path, n: int) -> tuple[int, int, int, int]:
    with small_fs(base / "state", size="64m"):
        d = AgentDaemon(base, config=CONFIG).start()
        sids = [_create(d, i) for i in range(n)]
        set_immutable(d.state_dir / "spool", True)
        kept = 0
        for sid in sids:
            d.call("session.destroy", {"session_id": sid})
            kept += mounted(_root(d, sid))
        d.stop()
        d.start()  # still immutable: the proofs come back from the fallback dir
        lost = _proofs_lost(d, sids)
        set_immutable(d.state_dir / "spool", False)
        d.stop()
        return n, lost, kept, _leaks(d)


def damaged_spool(base: Path, n: int) -> tuple[int, int, int, int]:
    d = AgentDaemon(base, config=CONFIG).start()
    sids = [_create(d, i) for i in range(n)]
    kept = 0
    for sid in sids:
        d.call("session.destroy", {"session_id": sid})
        kept += mounted(_root(d, sid))
    d.stop()
    for i, sid in enumerate(sids):
        p = d.state_dir / "spool" / f"{sid}.json"
        if i % 3 == 0:
            p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
        elif i % 3 == 1:
            p.write_bytes(os.urandom(4096))
        else:
            p.unlink()
    d.start()
    lost = _proofs_lost(d, sids)
    d.stop()
    return n, lost, kept, _leaks(d)


def journal_damage(kind: str):
    def run(base: Path, n: int) -> tuple[int, int, int, int]:
        d = AgentDaemon(base, config=CONFIG).start()
        sids = [_create(d, i) for i in range(n)]
        d.kill()
        journal = d.state_dir / "journal.sqlite3"
        wal = journal.with_name(journal.name + "-wal")
        if kind == "deleted":
            for p in (journal, wal, journal.with_name(journal.name + "-shm")):
                p.unlink(missing_ok=True)
        else:
            data = wal.read_bytes()
            cut = len(data) // 2
            wal.write_bytes(data[:cut] + (os.urandom(len(data) - cut) if kind == "garbage"
                                          else b""))
        d.start()
        for sid in sids:  # rows that survived the damage may be re-adopted (SPEC 12)
            if d.call("session.get", {"session_id": sid})["status"] == "active":
                d.call("session.destroy", {"session_id": sid})
        kept = sum(1 for sid in sids if mounted(_root(d, sid)))
        lost = _proofs_lost(d, sids)
        d.stop()
        return n, lost, kept, _leaks(d)
    return run


def killed_init(base: Path, n: int) -> tuple[int, int, int, int]:
    import sqlite3

    d = AgentDaemon(base, config=CONFIG).start()
    sids = [_create(d, i) for i in range(n)]
    db = sqlite3.connect(f"file:{d.state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
    pids = [db.execute("SELECT init_pid FROM sessions WHERE session_id = ?", (s,)).fetchone()[0]
            for s in sids]
    db.close()
    t0 = time.monotonic()
    for pid in pids:
        os.kill(pid, 9)
    kept = _ended_past_ttl(d, sids, t0 + 5)
    noticed = time.monotonic() - t0
    d.stop()
    d.start()
    lost = _proofs_lost(d, sids)
    d.stop()
    print(f"  (kill -9 of {n} nrx-init: every session's tmpfs gone after {noticed:.2f} s)")
    return n, lost, kept, _leaks(d)


FAULTS = {
    "state fs full (size=16m)": full_disk,
    "state fs out of inodes (nr_inodes)": no_inodes,
    "spool dir immutable (chattr +i), restart": immutable_spool,
    "spool files truncated/garbage/deleted": damaged_spool,
    "journal WAL tail truncated, crash": journal_damage("truncated"),
    "journal WAL tail garbage, crash": journal_damage("garbage"),
    "journal deleted, crash": journal_damage("deleted"),
    "kill -9 of nrx-init": killed_init,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=12)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nrx-state-bench-") as tmp:
        for i, (name, fn) in enumerate(FAULTS.items()):
            rows.append((name, *fn(Path(tmp) / str(i), args.sessions)))
            print(f"{name}: {rows[-1][1:]}", flush=True)
    print("\n| fault | sessions | proofs lost | data kept past TTL | leaks |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    return 0 if all(r[2] == r[3] == r[4] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
