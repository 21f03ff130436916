"""Memory of the daemon under connection floods: RSS before, during and after cycles of
thousands of concurrent idle unix-socket connections (issue 15: memory must return to
baseline after the load ends).

    .venv/bin/python bench/connections.py [--cycles 10] [--conns 3000] [--cap 4000]

Starts a real daemon (bench/run.py's, temporary dirs, its own cgroup prefix) with
`rpc.max_connections = --cap`; each cycle opens `--conns` connections, sends one
`agent.info` on every tenth, waits until the daemon has accepted them all, closes them,
waits until its connection count is back to one (ours), and reads VmRSS.
"""

from __future__ import annotations

import argparse
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run


def connections(c: run.Client) -> int:
    return c.call("agent.health")["rpc"]["connections"]


def wait_for(c: run.Client, pred, seconds: float = 120) -> int:
    deadline = time.monotonic() + seconds
    while True:
        n = connections(c)
        if pred(n) or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--conns", type=int, default=3000)
    ap.add_argument("--cap", type=int, default=4000)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="nrx-conns-") as td:
        d = run.Daemon(Path(td), f"\n[rpc]\nmax_connections = {args.cap}\n")
        try:
            c = run.Client(d.sock)
            base = d.rss_kib()
            print(f"cap {c.call('agent.health')['rpc']['max_connections']}, "
                  f"baseline RSS {base / 1024:.1f} MiB", flush=True)
            for cycle in range(1, args.cycles + 1):
                socks = []
                for i in range(args.conns):
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(d.sock)
                    if i % 10 == 0:
                        s.sendall(b"\x94\x00\x01\xaaagent.info\x91\x80")
                    socks.append(s)
                held = wait_for(c, lambda n: n >= min(args.conns, args.cap - 1) + 1)
                peak = d.rss_kib()
                for s in socks:
                    s.close()
                wait_for(c, lambda n: n <= 1)
                time.sleep(0.5)
                after = d.rss_kib()
                print(f"cycle {cycle:2}: {held - 1} held, RSS at load {peak / 1024:.1f} MiB, "
                      f"after {after / 1024:.1f} MiB", flush=True)
            end = d.rss_kib()
            print(f"RSS before {base / 1024:.1f} MiB, after {args.cycles} cycles "
                  f"{end / 1024:.1f} MiB ({(end - base) / 1024:+.1f} MiB)")
            c.close()
        finally:
            d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
