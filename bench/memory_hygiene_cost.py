"""What the wiping allocator costs (issue 13): the same daemon code with and without it,
alternated in blocks in one run on one machine.

    sudo .venv/bin/python bench/memory_hygiene_cost.py [--rounds 3] [--n 40]

"with": `serve` as shipped (re-exec with PYTHONMALLOC=malloc and glibc perturb-on-free,
no tcache, 32 MiB mmap threshold; agent/ops/memory_hygiene.py).  "without": the same
daemon started with the re-exec guard already set, so it keeps pymalloc and glibc's
defaults (exec buffers are still zeroed, the RPC decoder still drops its buffer: those
are not switchable and cost little).  Rows: full lifecycle (create, exec `true`,
destroy + CDP), exec `true` round trip, exec with 1 MiB input echoed back as stdout, and
100 MB of streamed stdout.  Medians over all blocks; reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Client, Daemon, count_status, create, destroy, exec_true, lifecycle, timed

GUARD = "NANORIX_AGENT_WIPING_ALLOCATOR"  # agent/ops/memory_hygiene.py's re-exec guard


def exec_mib(c: Client, sid: str, data: bytes) -> None:
    r = c.call("session.exec", {"session_id": sid, "command": "cat /input/data",
                                "input_data": data})
    if r["exit_code"] != 0 or len(r["output"]) != len(data):
        raise RuntimeError("exec with 1 MiB failed")


def stream_100mb(c: Client, sid: str) -> float:
    got = [0]
    t = time.perf_counter()
    c.call("session.exec", {"session_id": sid, "command": "head -c 100000000 /dev/zero",
                            "stream": True},
           on_note=lambda msg: got.__setitem__(0, got[0] + len(msg[2][0]["data"])))
    return got[0] / (time.perf_counter() - t) / 1e6


def block(wiping: bool, n: int, out: dict) -> None:
    if wiping:
        os.environ.pop(GUARD, None)
    else:
        os.environ[GUARD] = "1"
    try:
        with tempfile.TemporaryDirectory(prefix="nrx-memcost-") as tmp:
            d = Daemon(Path(tmp))
            try:
                c = Client(d.sock)
                info = c.call("agent.info")
                del info
                out["lifecycle"] += [timed(lifecycle, c) for _ in range(n)]
                sid = create(c)
                out["exec"] += [timed(exec_true, c, sid) for _ in range(n)]
                data = os.urandom(1 << 20)
                out["exec_1mib"] += [timed(exec_mib, c, sid, data) for _ in range(n // 2)]
                out["stream"].append(stream_100mb(c, sid))
                count_status(destroy(c, sid))
                c.close()
            finally:
                d.stop()
    finally:
        os.environ.pop(GUARD, None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=40)
    a = ap.parse_args()
    kinds = ("lifecycle", "exec", "exec_1mib", "stream")
    res = {w: {k: [] for k in kinds} for w in (False, True)}
    for _ in range(a.rounds):
        for w in (False, True):
            block(w, a.n, res[w])
    med = {w: {k: statistics.median(v) for k, v in r.items()} for w, r in res.items()}
    print(f"{'what':40} | {'without':>10} | {'with':>10} | change")
    for k, label, unit in (("lifecycle", "full lifecycle create/exec/destroy", "ms"),
                           ("exec", "exec `true` round trip", "ms"),
                           ("exec_1mib", "exec, 1 MiB in, 1 MiB out", "ms"),
                           ("stream", "stream 100 MB stdout", "MB/s")):
        b, w = med[False][k], med[True][k]
        print(f"{label + ' (' + unit + ')':40} | {b:10.2f} | {w:10.2f} | {(w / b - 1) * 100:+.1f}%")
    print(f"lifecycles/s (1 client, from the median): {1000 / med[False]['lifecycle']:.1f} -> "
          f"{1000 / med[True]['lifecycle']:.1f}; execs/s: {1000 / med[False]['exec']:.1f} -> "
          f"{1000 / med[True]['exec']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
