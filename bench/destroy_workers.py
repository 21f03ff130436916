"""Lifecycles at 1/4/16 clients with the destruction in 0, 1, 2, 4 worker processes.

    sudo .venv/bin/python bench/destroy_workers.py [--workers 0,1,2,4] [--per-client 20]

For each `[destroy] workers` value a bench daemon (bench/run.py's: temporary dirs, a random
claimed uid range and cgroup prefix) runs create/exec `true`/destroy lifecycles from 1, 4
and 16 connections.  Each row gives the lifecycle latency, lifecycles/s and the CPU per
lifecycle: the daemon's own threads, its destroy workers, and its reaped children (nrx-init),
from /proc/<pid>/stat.  The C floor (bench/floor) runs k processes beside it as the peer:
every row prints our p50 and our rate as a multiple of the floor's.  `workers = 0` is the
in-process pipeline (the behaviour before the pool).  `--no-config` leaves the `[destroy]`
section out (for a tree that does not know it yet).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import peers
import run as benchrun

TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def worker_pids(daemon_pid: int) -> list[int]:
    """The daemon's children that are destroy workers (by their command line)."""
    out = []
    for tid in os.listdir(f"/proc/{daemon_pid}/task"):
        try:
            with open(f"/proc/{daemon_pid}/task/{tid}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        for k in kids:
            try:
                with open(f"/proc/{k}/cmdline", "rb") as f:
                    if b"agent.destroy.worker" in f.read():
                        out.append(k)
            except OSError:
                continue
    return out


def cpu_ms(daemon_pid: int) -> tuple[float, float, float]:
    """(daemon threads, live workers, reaped children) CPU in ms."""
    f = _stat_fields(daemon_pid)
    own = (int(f[11]) + int(f[12])) * TICK_MS
    reaped = (int(f[13]) + int(f[14])) * TICK_MS
    w = 0.0
    for pid in worker_pids(daemon_pid):
        try:
            g = _stat_fields(pid)
            w += (int(g[11]) + int(g[12])) * TICK_MS
        except OSError:
            continue
    return own, w, reaped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="0,1,2,4")
    ap.add_argument("--per-client", type=int, default=20)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--no-config", action="store_true")
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy each daemon's log here "
                    "(with NRX_BENCH_LOG=info: every destroy step's duration)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench needs root", file=sys.stderr)
        return 2
    counts = [int(x) for x in args.workers.split(",")]
    clients = [int(x) for x in args.clients.split(",")]
    ident = peers.RunIdentity(benchrun.RUN_SPAN)
    print(f"machine: {benchrun.machine()}")
    print(f"at start: {benchrun.load()}; os.cpu_count() = {os.cpu_count()}")
    rows = []
    left: list[str] = []
    with tempfile.TemporaryDirectory(prefix="nrx-bench-workers-") as td:
        floor = peers.Floor(Path(td), ident.uid_base + benchrun.UID_SPAN + peers.SLOT,
                            f"{ident.prefix}-floor")
        if args.no_floor:
            floor.missing = "--no-floor"
        floor_rows = {}
        try:
            for i, n in enumerate(counts):
                sub = Path(td) / f"run{i}-w{n}"
                sub.mkdir()
                extra = "" if args.no_config else f"\n[destroy]\nworkers = {n}\n"
                d = benchrun.Daemon(sub, extra, ident=ident)
                try:
                    c = benchrun.Client(d.sock)
                    for _ in range(5):
                        benchrun.lifecycle(c)
                    c.close()
                    for k in clients:
                        own0, w0, r0 = cpu_ms(d.proc.pid)
                        rate, lat = benchrun._concurrently(k, args.per_client, _runs(d))
                        own1, w1, r1 = cpu_ms(d.proc.pid)
                        n_l = len(lat)
                        cpu = ((own1 - own0) / n_l, (w1 - w0) / n_l, (r1 - r0) / n_l)
                        if k not in floor_rows and not floor.missing:
                            floor_rows[k] = floor.concurrently(k, args.per_client)
                        rows.append((n, k, benchrun.summary(lat), rate, cpu, floor_rows.get(k),
                                     benchrun.load()))
                        print(_fmt(rows[-1]), flush=True)
                finally:
                    d.stop()
                    left += benchrun.leftovers(d)
                    if args.keep_logs:
                        Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                        shutil.copy(sub / "agent.log", Path(args.keep_logs) / f"agent-{sub.name}.log")
        finally:
            floor.close()
    print(f"destroys: {benchrun.STATUSES}")
    print("left behind: " + ("; ".join(left) if left else "nothing"))
    print(f"at the end: {benchrun.load()}")
    return 1 if left else 0


def _runs(d):
    def agent_runs(n):
        c = benchrun.Client(d.sock)
        try:
            return [benchrun.timed(benchrun.lifecycle, c) for _ in range(n)]
        finally:
            c.close()
    return agent_runs


def _fmt(row) -> str:
    n, k, s, rate, (own, w, reaped), fl, ld = row
    out = (f"workers={n} clients={k:>2}: lifecycle p50 {s['p50']:6.1f} p99 {s['p99']:6.1f} ms, "
           f"{rate:5.1f}/s; CPU/lifecycle daemon {own:5.1f} + workers {w:5.1f} + nrx-init "
           f"{reaped:4.1f} = {own + w + reaped:5.1f} ms")
    if fl is not None:
        frate, flat = fl
        fs = benchrun.summary(flat)
        out += (f" | floor {k} procs p50 {fs['p50']:5.1f} ms {frate:5.0f}/s: ours "
                f"{s['p50'] / fs['p50']:.2f}x its p50, {rate / frate:.2f}x its rate")
    return out + f" | {ld}"


if __name__ == "__main__":
    sys.exit(main())
