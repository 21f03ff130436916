"""What the memory hygiene of issue 13 costs: daemons with and without it, interleaved.

    sudo .venv/bin/python bench/memory_hygiene_cost.py [--n 150] [--before DIR]

Daemons run at the same time (each with its own cgroup prefix and host uid range) and
every iteration takes one sample on each, in a shuffled order, so the load of a shared
machine hits all of them alike (blocks run one after another differed by ±40% here):

- `after`: `serve` as shipped (re-exec with PYTHONMALLOC=malloc and glibc perturb-on-free
  without tcache; agent/memory_hygiene.py);
- `no-wipe-alloc`: the same code started with the re-exec guard already set, so it keeps
  pymalloc and glibc's defaults (the exec buffers are still zeroed and the RPC decoder
  still drops its buffer: not switchable);
- `before` (with `--before DIR`): a checkout of an older commit with its nrx-init and
  agent/_native built in place, e.g. the commit before issue 13.

Rows: full lifecycle (create, exec `true`, destroy + CDP), exec `true` round trip, exec of
1 MiB input echoed back as stdout, 100 MB of streamed stdout.  Medians (p95); reported,
never asserted.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402

GUARD = "NANORIX_AGENT_WIPING_ALLOCATOR"  # agent/memory_hygiene.py's re-exec guard


class Daemon(R.Daemon):
    """bench/run.py's daemon, from any tree, with its own prefix, uid range and env."""

    def __init__(self, i: int, tree: Path, extra_env: dict[str, str]) -> None:
        # not super().__init__: that one has a fixed prefix and uid range per bench process
        self.tmp = Path(tempfile.mkdtemp(prefix="nrx-memcost-"))
        prefix = f"nanorix-agent-bench-mem-{os.getpid()}-{i}"
        cfg = self.tmp / "agent.toml"
        cfg.write_text(R.BENCH_CONFIG.format(prefix=prefix, uid_base=R.UID_BASE + i * 80_000_000,
                                             level="warning"))
        (self.tmp / "state").mkdir()
        (self.tmp / "run").mkdir()
        self.sock = str(self.tmp / "run" / "agent.sock")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "GLIBC_TUNABLES")}
        env.update(extra_env)
        self.log = open(self.tmp / "agent.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "serve", "--config", str(cfg), "--state-dir",
             str(self.tmp / "state"), "--runtime-dir", str(self.tmp / "run")],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=tree, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                c = R.Client(self.sock)
                c.call("agent.info")
                c.close()
                return
            except (OSError, RuntimeError):
                time.sleep(0.05)
        raise RuntimeError("daemon did not become ready: " + (self.tmp / "agent.log").read_text()[-2000:])

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=150, help="iterations (samples per daemon)")
    ap.add_argument("--before", type=Path, help="an older checkout, built in place")
    a = ap.parse_args()
    kinds = {}
    if a.before:
        kinds["before"] = (a.before, {})
    kinds["no-wipe-alloc"] = (ROOT, {GUARD: "1"})
    kinds["after"] = (ROOT, {})
    ds = {}
    try:
        for i, (k, (tree, env)) in enumerate(kinds.items()):
            ds[k] = Daemon(i, tree, env)
        cl = {k: R.Client(d.sock) for k, d in ds.items()}
        sids = {k: R.create(c) for k, c in cl.items()}
        data = os.urandom(1 << 20)

        def exec_mib(c, sid):
            r = c.call("session.exec", {"session_id": sid, "command": "cat /input/data",
                                        "input_data": data})
            if r["exit_code"] != 0 or len(r["output"]) != len(data):
                raise RuntimeError("exec with 1 MiB failed")

        res = {k: {"lifecycle": [], "exec": [], "exec_1mib": [], "stream": []} for k in ds}
        order = list(ds)
        for i in range(a.n):
            random.shuffle(order)
            for k in order:
                res[k]["lifecycle"].append(R.timed(R.lifecycle, cl[k]))
                res[k]["exec"] += [R.timed(R.exec_true, cl[k], sids[k]) for _ in range(2)]
                if i % 3 == 0:
                    res[k]["exec_1mib"].append(R.timed(exec_mib, cl[k], sids[k]))
        for _ in range(3):
            random.shuffle(order)
            for k in order:
                got = [0]
                t = time.perf_counter()
                cl[k].call("session.exec", {"session_id": sids[k], "stream": True,
                                            "command": "head -c 100000000 /dev/zero"},
                           on_note=lambda msg, got=got: got.__setitem__(
                               0, got[0] + len(msg[2][0]["data"])))
                res[k]["stream"].append(got[0] / (time.perf_counter() - t) / 1e6)
        for k in ds:
            R.count_status(R.destroy(cl[k], sids[k]))
            cl[k].close()
    finally:
        for d in ds.values():
            d.stop()

    def p95(xs):
        return sorted(xs)[int(len(xs) * 0.95)]

    print(f"{R.machine()}\n{a.n} interleaved iterations; median (p95)")
    print(f"{'what':34} | " + " | ".join(f"{k:>20}" for k in ds))
    for m, label in (("lifecycle", "full lifecycle (ms)"), ("exec", "exec `true` round trip (ms)"),
                     ("exec_1mib", "exec, 1 MiB in + out (ms)")):
        print(f"{label:34} | " + " | ".join(
            f"{statistics.median(res[k][m]):8.2f} ({p95(res[k][m]):8.2f})" for k in ds))
    print(f"{'stream 100 MB stdout (MB/s)':34} | " + " | ".join(
        f"{statistics.median(res[k]['stream']):20.0f}" for k in ds))
    print(f"{'lifecycles/s, execs/s (1 client)':34} | " + " | ".join(
        f"{1000 / statistics.median(res[k]['lifecycle']):9.1f} {1000 / statistics.median(res[k]['exec']):10.1f}"
        for k in ds))
    print("destroys:", R.STATUSES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
