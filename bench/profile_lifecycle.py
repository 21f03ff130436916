"""Where a lifecycle's CPU goes in the daemon: py-spy samples grouped by layer and step.

    .venv/bin/pip install py-spy      # a profiling tool, not a dependency of the agent
    sudo .venv/bin/python bench/profile_lifecycle.py [--clients 1] [--idle 0] [--seconds 15]

Starts a bench daemon (bench/run.py's: temporary dirs, a random claimed uid range and
cgroup prefix), creates `--idle` idle sessions, then runs create/exec `true`/destroy
lifecycles from `--clients` connections while `py-spy record --threads` samples the
daemon.  Prints lifecycles/s, the daemon's CPU per lifecycle (all its threads plus the
reaped sandbox processes) and each group's share of the samples, split into the trio
thread and the worker threads.  A sample belongs to the innermost agent frame that
matches a group, so a /proc walk started by step 6 counts as a scan, not as step 6.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import peers
import run as benchrun

GROUPS = [
    ("host-wide /proc scans (destroy/residue.py)", "destroy/residue.py"),
    ("step 6 merkle_zero_verification (rest)", "destroy/merkle_zero_verification.py"),
    ("step 3 multipass_overwrite (memory)", "destroy/multipass_overwrite.py"),
    ("step 2 filesystem_destruction", "destroy/filesystem_destruction.py"),
    ("sysv shm wipe", "destroy/sysv_shm.py"),
    ("destroy: other steps, pipeline", "agent/destroy/"),
    ("proof spool + fsync", "service/spool.py"),
    ("proof spool + fsync", "agent/durable.py"),
    ("CDP build + sign", "agent/cdp/"),
    ("session keys", "agent/keys/"),
    ("journal (sqlite)", "service/journal.py"),
    ("create: sandbox engine", "sandbox/engine.py"),
    ("cgroups driver", "sandbox/cgroups/"),
    ("exec", "sandbox/exec.py"),
    ("service: sessions", "service/sessions.py"),
    ("RPC", "agent/rpc/"),
]


def group_of(frames: list[str]) -> str:
    for fr in reversed(frames):
        for name, pattern in GROUPS:
            if pattern in fr:
                return name
    if any("EpollIOManager.get_events" in fr for fr in frames):
        return "trio: waiting in epoll"
    return "trio / interpreter / other"


def shares(raw: Path) -> tuple[int, dict[str, collections.Counter]]:
    """(samples, {group: Counter(main=…, workers=…)}) from py-spy's raw (collapsed) output."""
    total, out = 0, collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        where = "main" if "MainThread" in frames[0] else "workers"
        out[group_of(frames[1:])][where] += int(count)
        total += int(count)
    return total, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--idle", type=int, default=0, help="idle sessions kept alive meanwhile")
    ap.add_argument("--seconds", type=int, default=15)
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    ident = peers.RunIdentity(benchrun.RUN_SPAN)
    with tempfile.TemporaryDirectory(prefix="nrx-profile-") as td:
        d = benchrun.Daemon(Path(td), ident=ident)
        try:
            c = benchrun.Client(d.sock)
            idle = [benchrun.create(c, customer=f"idle-{i % 50}") for i in range(args.idle)]
            for _ in range(5):
                benchrun.lifecycle(c)
            stop, done, lock = threading.Event(), [0], threading.Lock()

            def client() -> None:
                cc = benchrun.Client(d.sock)
                while not stop.is_set():
                    benchrun.lifecycle(cc)
                    with lock:
                        done[0] += 1
                cc.close()

            raw = Path(os.environ.get("NRX_PYSPY_RAW") or Path(td) / "pyspy.txt")
            rec = subprocess.Popen([spy, "record", "-p", str(d.proc.pid), "-d", str(args.seconds),
                                    "-r", "250", "--threads", "--nonblocking", "--format", "raw",
                                    "-o", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cpu, t = d.cpu_ms(), time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for th in threads:
                th.start()
            rec.wait()
            stop.set()
            for th in threads:
                th.join()
            wall, cpu = time.perf_counter() - t, d.cpu_ms() - cpu
            benchrun.destroy_all(d, idle)
            c.close()
        finally:
            d.stop()
            left = benchrun.leftovers(d)
        total, groups = shares(raw)
    n = done[0]
    print(f"{n} lifecycles in {wall:.1f} s = {n / wall:.1f}/s with {args.clients} clients and "
          f"{args.idle} idle sessions; daemon CPU {cpu / n:.1f} ms per lifecycle; {benchrun.load()}")
    print(f"{'share of samples':>16} {'trio thread':>12} {'workers':>8}  group ({total} samples)")
    for name, by in sorted(groups.items(), key=lambda kv: -sum(kv[1].values())):
        print(f"{sum(by.values()) / total:>15.1%} {by['main'] / total:>12.1%} "
              f"{by['workers'] / total:>8.1%}  {name}")
    print("left behind: " + ("; ".join(left) if left else "nothing"))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
