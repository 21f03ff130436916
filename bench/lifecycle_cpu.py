"""The daemon's CPU per lifecycle, split by thread and user/system, and its syscalls.

    sudo .venv/bin/python bench/lifecycle_cpu.py [--clients 1,16] [--per-client 20]
    sudo .venv/bin/python bench/lifecycle_cpu.py --strace [--clients 4]

Starts a bench daemon (bench/run.py's: temporary dirs, a random claimed uid range and
cgroup prefix) and runs create/exec `true`/destroy lifecycles from each number of
connections.  Each row gives lifecycles/s, p50/p99 and the CPU per lifecycle from
/proc (user and system apart): the trio thread, the other threads of the daemon (live
and exited: trio's worker threads), and the reaped children (nrx-init, `sh`).  The trio
thread is what caps one daemon: the rate it allows alone is 1000 / its ms per lifecycle.
`--strace` attaches `strace -c -f` to the daemon for the last row and prints the
syscalls per lifecycle (strace slows every syscall: read the counts, not the rate).
`--perf FILE` records the daemon's threads with `perf record -g` instead (read it with
`perf report -i FILE --no-children --sort sym`).
`--against DIR` runs this tree's daemon and DIR's side by side, one lifecycle each in turn.
`--tree DIR` runs the daemon of another checkout (its own .venv) for a before/after pair.
`--config` appends a TOML fragment to the bench config (e.g. "[destroy]\\nworkers = 1").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import peers
import run as benchrun
from destroy_workers import _runs

TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def _times(path: str) -> tuple[float, float, float, float]:
    """(utime, stime, cutime, cstime) in ms from a /proc stat file."""
    with open(path) as f:
        x = f.read().rsplit(")", 1)[1].split()
    return tuple(int(v) * TICK_MS for v in x[11:15])  # type: ignore[return-value]


def snapshot(pid: int) -> dict[str, float]:
    pu, ps, cu, cs = _times(f"/proc/{pid}/stat")
    mu, ms, _, _ = _times(f"/proc/{pid}/task/{pid}/stat")
    return {"trio_user": mu, "trio_sys": ms, "threads_user": pu - mu, "threads_sys": ps - ms,
            "children_user": cu, "children_sys": cs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--per-client", type=int, default=20)
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("--perf", metavar="FILE", help="perf record -g the daemon's threads over "
                    "the last row into FILE (kernel stacks: where the system time goes)")
    ap.add_argument("--config", default="")
    ap.add_argument("--against", metavar="DIR", help="A/B: this tree's daemon and DIR's "
                    "(its own .venv), one lifecycle each in turn from one client, so a "
                    "load burst from other work hits both")
    ap.add_argument("--tree", metavar="DIR", help="run the daemon of another checkout with "
                    "its own .venv (a before/after pair from one script)")
    args = ap.parse_args()
    if args.against:
        return against(Path(args.against).resolve(), args.per_client, args.config)
    if args.tree:
        benchrun.ROOT = Path(args.tree).resolve()
        sys.executable = str(benchrun.ROOT / ".venv" / "bin" / "python")
    if os.geteuid() != 0:
        print("bench needs root", file=sys.stderr)
        return 2
    clients = [int(x) for x in args.clients.split(",")]
    print(f"machine: {benchrun.machine()}")
    ident = peers.RunIdentity(benchrun.RUN_SPAN)
    with tempfile.TemporaryDirectory(prefix="nrx-bench-cpu-") as td:
        d = benchrun.Daemon(Path(td), args.config.replace("\\n", "\n"), ident=ident)
        try:
            c = benchrun.Client(d.sock)
            for _ in range(5):
                benchrun.lifecycle(c)
            c.close()
            for i, k in enumerate(clients):
                tracer = None
                if args.strace and i == len(clients) - 1:
                    out = Path(td) / "strace.txt"
                    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p",
                                               str(d.proc.pid)], stderr=subprocess.DEVNULL)
                    benchrun.time.sleep(0.5)
                if args.perf and i == len(clients) - 1:
                    tracer = subprocess.Popen(["perf", "record", "-g", "-o", args.perf, "-p",
                                               str(d.proc.pid)], stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL)
                    benchrun.time.sleep(0.5)
                before = snapshot(d.proc.pid)
                rate, lat = benchrun._concurrently(k, args.per_client, _runs(d))
                after = snapshot(d.proc.pid)
                n = len(lat)
                cpu = {key: (after[key] - before[key]) / n for key in after}
                s = benchrun.summary(lat)
                trio = cpu["trio_user"] + cpu["trio_sys"]
                total = sum(cpu.values())
                print(f"clients={k:>2}: {rate:5.1f}/s p50 {s['p50']:6.1f} p99 {s['p99']:6.1f} ms | "
                      f"CPU/lifecycle {total:5.1f} ms: trio {cpu['trio_user']:4.1f}u+"
                      f"{cpu['trio_sys']:4.1f}s, threads {cpu['threads_user']:4.1f}u+"
                      f"{cpu['threads_sys']:4.1f}s, children {cpu['children_user']:4.1f}u+"
                      f"{cpu['children_sys']:4.1f}s (trio alone allows "
                      f"{1000 / trio if trio else float('inf'):.0f}/s) | {benchrun.load()}",
                      flush=True)
                if tracer is not None:
                    tracer.send_signal(2 if args.perf else 15)
                    tracer.wait()
                if args.strace and tracer is not None:
                    print(f"strace -c -f over {n} lifecycles (calls per lifecycle):")
                    for line in out.read_text().splitlines():
                        parts = line.split()
                        if len(parts) >= 5 and parts[0][0].isdigit() and parts[3].isdigit():
                            errs = parts[4] if len(parts) == 6 else ""
                            print(f"  {parts[-1]:<22} {int(parts[3]) / n:7.1f} calls "
                                  f"{float(parts[1]) / n * 1000:8.1f} us"
                                  + (f"  ({int(errs) / n:.1f} errors)" if errs else ""))
        finally:
            d.stop()
            left = benchrun.leftovers(d)
    print(f"destroys: {benchrun.STATUSES}")
    print("left behind: " + ("; ".join(left) if left else "nothing"))
    return 1 if left else 0


def against(other: Path, n: int, config: str) -> int:
    """Both daemons side by side, lifecycles alternating: per side the p50 of create, exec,
    destroy and the whole lifecycle, and the CPU per lifecycle (split as above)."""
    print(f"machine: {benchrun.machine()}; {benchrun.load()}")
    sides = {"this tree": (benchrun.ROOT, sys.executable),
             str(other): (other, str(other / ".venv" / "bin" / "python"))}
    left: list[str] = []
    with tempfile.TemporaryDirectory(prefix="nrx-bench-ab-") as td:
        daemons = {}
        try:
            for i, (label, (root, py)) in enumerate(sides.items()):
                benchrun.ROOT, sys.executable = root, py
                sub = Path(td) / f"side{i}"
                sub.mkdir()
                daemons[label] = benchrun.Daemon(sub, config.replace("\\n", "\n"))
            clients = {k: benchrun.Client(d.sock) for k, d in daemons.items()}
            for c in clients.values():
                for _ in range(5):
                    benchrun.lifecycle(c)
            times = {k: {"create": [], "exec": [], "destroy": [], "lifecycle": []}
                     for k in daemons}
            before = {k: snapshot(d.proc.pid) for k, d in daemons.items()}
            for _ in range(n):
                for k, c in clients.items():
                    t0 = benchrun.time.perf_counter()
                    sid = benchrun.create(c)
                    t1 = benchrun.time.perf_counter()
                    benchrun.exec_true(c, sid)
                    t2 = benchrun.time.perf_counter()
                    r = benchrun.count_status(benchrun.destroy(c, sid))
                    t3 = benchrun.time.perf_counter()
                    for ev in r["cdp"]["evidence"]:
                        times[k].setdefault(f"step {ev['step']}", []).append(
                            ev["duration_us"] / 1000)
                    for what, dt in (("create", t1 - t0), ("exec", t2 - t1),
                                     ("destroy", t3 - t2), ("lifecycle", t3 - t0)):
                        times[k][what].append(dt * 1000)
            for k, d in daemons.items():
                after = snapshot(d.proc.pid)
                cpu = {x: (after[x] - before[k][x]) / n for x in after}
                p50 = {w: benchrun.summary(v)["p50"] for w, v in times[k].items()}
                print(f"{k}: lifecycle p50 {p50['lifecycle']:.2f} ms (create {p50['create']:.2f}, "
                      f"exec {p50['exec']:.2f}, destroy {p50['destroy']:.2f}) | CPU/lifecycle "
                      f"{sum(cpu.values()):.1f} ms: trio {cpu['trio_user']:.1f}u+"
                      f"{cpu['trio_sys']:.1f}s, threads {cpu['threads_user']:.1f}u+"
                      f"{cpu['threads_sys']:.1f}s, children {cpu['children_user']:.1f}u+"
                      f"{cpu['children_sys']:.1f}s")
                print("  steps p50 (ms): " + ", ".join(
                    f"{w[5:]} {p50[w]:.2f}" for w in p50 if w.startswith("step ")))
            for c in clients.values():
                c.close()
        finally:
            for d in daemons.values():
                d.stop()
                left += benchrun.leftovers(d)
    print(f"{benchrun.load()}; destroys: {benchrun.STATUSES}")
    print("left behind: " + ("; ".join(left) if left else "nothing"))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
