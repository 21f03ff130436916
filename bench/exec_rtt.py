"""Exec round trip in a live session, and the daemon's CPU per exec (issue 18).

    sudo .venv/bin/python bench/exec_rtt.py [-n 400] [--idle-ms 0,5,20] [--warm-pool N]

One bench daemon (bench/run.py's config, no pool, its own uid block and cgroup prefix),
one session, `exec true` n times per idle gap: the gap between execs makes the daemon,
nrx-init and the CPUs go cold between them as they do in bench/run.py (whose exec row
alternates with crun and runc execs).  CPU per exec is the daemon's utime+stime delta
(all its threads; not nrx-init or the command) over the n execs, so it includes what the
daemon did meanwhile (nothing else here).  `--warm-pool N`: N session.create + exec `true`
+ destroy from a warm pool (the pool refilled, off the clock, before each).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import run  # bench/run.py


def _cpu_ms(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def rtt_rows(td: Path, n: int, idles: list[float]) -> None:
    td.mkdir()
    d = run.Daemon(td, run.NO_POOL)
    try:
        c = run.Client(d.sock)
        sid = run.create(c)
        for _ in range(20):  # the first execs of a session are slower (fresh sandbox)
            run.exec_true(c, sid)
        for idle in idles:
            xs = []
            cpu0 = _cpu_ms(d.proc.pid)
            for _ in range(n):
                if idle:
                    time.sleep(idle / 1000)
                t = time.perf_counter()
                run.exec_true(c, sid)
                xs.append((time.perf_counter() - t) * 1000)
            cpu = (_cpu_ms(d.proc.pid) - cpu0) / n * 1000
            xs.sort()
            print(f"exec `true`, {idle:g} ms idle between: p50 {statistics.median(xs):.2f} "
                  f"p10 {xs[n // 10]:.2f} p90 {xs[n * 9 // 10]:.2f} ms; daemon CPU "
                  f"{cpu:.0f} us/exec", flush=True)
        run.destroy(c, sid)
        c.close()
    finally:
        d.stop()
    left = run.leftovers(d)
    if left:
        print("LEFT BEHIND: " + "; ".join(left))


def warm_rows(td: Path, n: int) -> None:
    td.mkdir()
    d = run.Daemon(td, run.WARM_POOL)
    try:
        c = run.Client(d.sock)
        creates, both = [], []
        for _ in range(n):
            run._pool_ready(c, run.POOL_SIZE)
            t = time.perf_counter()
            sid = run.create(c)
            creates.append((time.perf_counter() - t) * 1000)
            run.exec_true(c, sid)
            both.append((time.perf_counter() - t) * 1000)
            run.destroy(c, sid)
        c.close()
    finally:
        d.stop()
    print(f"warm pool: session.create p50 {statistics.median(creates):.2f} ms, create + "
          f"exec `true` p50 {statistics.median(both):.2f} ms (n={n})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=400)
    ap.add_argument("--idle-ms", default="0,5,20")
    ap.add_argument("--warm-pool", type=int, default=0, metavar="N")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces, cgroups)", file=sys.stderr)
        return 2
    print(f"machine: {run.machine()}; at start: {run.load()}")
    with tempfile.TemporaryDirectory(prefix="nrx-exec-rtt-") as td:
        rtt_rows(Path(td) / "rtt", args.n, [float(x) for x in args.idle_ms.split(",")])
        if args.warm_pool:
            warm_rows(Path(td) / "warm", args.warm_pool)
    print(f"at the end: {run.load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
