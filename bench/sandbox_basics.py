"""Sandbox basics benchmark: create + exec `true` + teardown, and idle memory per sandbox.

    sudo .venv/bin/python bench/sandbox_basics.py [--runs 100] [--alive 200]

Uses a throwaway runtime dir and cgroup prefix (`nanorix-agent-bench-<random>`); removes
everything it made.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import trio

from agent import log
from agent.config import Config
from agent.sandbox import SandboxEngine


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable")


def ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1000, 2)


async def main(runs: int, alive: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="nrx-bench-"))
    cfg = Config()
    cfg.paths.state_dir, cfg.paths.runtime_dir = tmp / "state", tmp / "run"
    cfg.paths.runtime_dir.mkdir(parents=True)
    cfg.sandbox.cgroup_prefix = f"nanorix-agent-bench-{secrets.token_hex(4)}"
    eng = SandboxEngine(cfg)
    total, create, exe, kill, teardown = [], [], [], [], []
    try:
        for i in range(runs + 5):  # 5 warm-up runs
            t0 = time.perf_counter()
            sb = await eng.create(f"sess_{i:016x}", tier="free", classification="general")
            t1 = time.perf_counter()
            r = await sb.exec("true", timeout=10)
            t2 = time.perf_counter()
            await sb.kill_init()
            t3 = time.perf_counter()
            await sb.teardown()
            t4 = time.perf_counter()
            assert r.exit_code == 0
            if i >= 5:
                total.append(t3 - t0)
                create.append(t1 - t0)
                exe.append(t2 - t1)
                kill.append(t3 - t2)
                teardown.append(t4 - t3)
        boxes = []
        before = mem_available()
        for i in range(alive):
            boxes.append(await eng.create(f"sess_{10**6 + i:016x}", tier="free",
                                          classification="general"))
        await trio.sleep(1)
        after = mem_available()
    finally:
        await eng.aclose()
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "runs": runs,
        "median_create_exec_true_kill_ms": ms(total),
        "median_create_ms": ms(create), "median_exec_true_ms": ms(exe),
        "median_kill_ms": ms(kill), "median_rest_of_teardown_ms": ms(teardown),
        "alive": alive,
        "idle_mib_per_sandbox": round((before - after) / alive / 2**20, 3),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--alive", type=int, default=200)
    ap.add_argument("--ballast-mib", type=int, default=0,
                    help="grow this process first (spawning must not depend on its size)")
    args = ap.parse_args()
    ballast = bytearray(b"x") * (args.ballast_mib * 2**20)
    log.setup("warning")
    print(json.dumps(trio.run(main, args.runs, args.alive), indent=2))
