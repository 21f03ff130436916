"""Destroy times of the SPEC 5 pipeline on real sessions (median of N runs each):

    .venv/bin/python bench/destroy_times.py [--runs 9]

* empty session (nothing but the generated layout and an idle nrx-init), and
* a session holding 64 MiB in a tmpfs file plus 64 MiB resident in a process's memory,

each with one pass (zeros, class `general`) and three passes (random, ones, zeros).  The
time is run_pipeline() from start to end (steps 1-8 and the final teardown).  Prints
one line per case with median, min and max in ms and the per-step medians (the wipe is
always the native agent.fsops: the Python twin lives in tests/oracles.py).  Temporary state/runtime dirs,
its own cgroup prefix and uid range; everything is destroyed before it exits.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
from pathlib import Path

import trio

from agent.config import Config
from agent.destroy import DestroyContext, run_pipeline
from agent.keys.session import SessionKey
from agent.sandbox.engine import SandboxEngine
from agent.service.model import SessionRecord

FILL = """
head -c 64M /dev/urandom > /work/big
python3 -c "
import os, time
b = bytearray(os.urandom(64 << 20)); open('/tmp/ready', 'w').close(); time.sleep(1e6)
" </dev/null >/dev/null 2>&1 &
while [ ! -e /tmp/ready ]; do sleep 0.01; done
"""


async def one(engine: SandboxEngine, passes: list[str], full: bool) -> tuple[int, list[int]]:
    sid = "sess_" + secrets.token_hex(8)
    sb = await engine.create(sid, tier="free", classification="general")
    if full:
        r = await sb.exec(FILL, timeout=60)
        assert r.exit_code == 0, r.stderr
    ctx = DestroyContext(sandbox=sb, session=SessionRecord(session_id=sid, created_at="x"),
                         session_key=SessionKey.generate(sid), passes=passes,
                         reason="requested", node_id="bench", agent_version="bench",
                         revoke=lambda: None)
    out = await run_pipeline(ctx)
    bad = [e["step"] for e in out.evidence if not e["ok"]]
    if bad:
        raise SystemExit(f"steps failed: {bad}: {[out.evidence[i - 1] for i in bad]}")
    if full:
        assert out.evidence[1]["bytes"] >= 64 << 20 and out.evidence[2]["bytes"] >= 64 << 20
    return out.duration_us, [e["duration_us"] for e in out.evidence]


async def main(runs: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        cfg = Config()
        cfg.paths.state_dir = Path(d) / "state"
        cfg.paths.runtime_dir = Path(d) / "run"
        cfg.node.max_sessions = 4
        cfg.sandbox.uid_base = (1 << 24) + secrets.randbelow(8000) * 4 * cfg.sandbox.uid_slot_size
        engine = SandboxEngine(cfg, cgroup_prefix=f"nanorix-agent-bench-destroy-{os.getpid()}")
        print(f"wipe engine: native; runs per case: {runs}")
        try:
            for full in (False, True):
                for passes in (["zeros"], ["random", "ones", "zeros"]):
                    totals, steps = [], []
                    for _ in range(runs):
                        t, s = await one(engine, passes, full)
                        totals.append(t)
                        steps.append(s)
                    per_step = [statistics.median(s[i] for s in steps) / 1000 for i in range(8)]
                    name = "64MiB files + 64MiB memory" if full else "empty session"
                    print(f"{name:28s} {len(passes)} pass(es): median "
                          f"{statistics.median(totals) / 1000:8.1f} ms  (min "
                          f"{min(totals) / 1000:.1f}, max {max(totals) / 1000:.1f})  steps ms: "
                          + " ".join(f"{x:.1f}" for x in per_step))
        finally:
            await engine.aclose()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    trio.run(main, ap.parse_args().runs)
