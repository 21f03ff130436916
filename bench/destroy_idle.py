"""Destroy p50 against the number of live idle sessions, with the per-step medians:

    .venv/bin/python bench/destroy_idle.py [--sizes 0,50,200] [--runs 40] [--root DIR]

The same measurement as bench/run.py's "destroy with N live idle sessions" row (a fresh
session is created, runs `true`, and its `session.destroy` round trip is timed while N
idle sessions stay alive), on one real daemon, plus each step's `duration_us` from the
proof's evidence, so what grows with the number of sessions shows up by step.  `--root`
runs the daemon (and this bench's helpers) of another checkout with the running Python
(`/work/wt3/before/.venv/bin/python bench/destroy_idle.py --root /work/wt3/before`),
for before/after pairs.  Prints the load average at start and end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0,50,200")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    args = ap.parse_args()
    root = Path(args.root).resolve()
    sys.path.insert(0, str(root / "bench"))
    import run  # the checkout's own bench helpers
    run.ROOT = root
    print(f"root {root}; at start: {run.load()}", flush=True)
    base = None
    with tempfile.TemporaryDirectory(prefix="nrx-bench-") as td:
        d = run.Daemon(Path(td), run.NO_POOL if hasattr(run, "NO_POOL") else "")
        try:
            c = run.Client(d.sock)
            for size in [int(x) for x in args.sizes.split(",")]:
                idle = [run.create(c, customer=f"idle-{i % 50}") for i in range(size)]
                xs, steps = [], [[] for _ in range(8)]
                for _ in range(args.runs):
                    sid = run.create(c)
                    run.exec_true(c, sid)
                    t = time.perf_counter()
                    r = run.count_status(run.destroy(c, sid))
                    xs.append((time.perf_counter() - t) * 1000)
                    for i, ev in enumerate(r["cdp"]["evidence"]):
                        steps[i].append(ev["duration_us"] / 1000)
                run.destroy_all(d, idle)
                p50 = statistics.median(xs)
                base = base or p50
                per = " ".join(f"{i + 1}:{statistics.median(s):.2f}" for i, s in enumerate(steps))
                print(f"{size:>4} idle: destroy p50 {p50:.2f} ms ({p50 / base:.2f}x), "
                      f"min {min(xs):.2f}; steps p50 ms {per}", flush=True)
            c.close()
        finally:
            d.stop()
    print(f"statuses {run.STATUSES}; at the end: {run.load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
