"""Health self-tests (SPEC 10): every engine flag is the result of a real test, run at start
and every `health.interval_seconds`, cached with the time it ran.

- eee:  a canary sandbox is created through the real engine, runs `true`, is torn down;
- dire: a session key in locked memory signs, is zeroized and read back as zero, then
        refuses to sign;
- rzl:  the journal does a write+read round trip, the CDP spool directory takes an fsynced
        write, and the CDP chain of the embedded test vector recomputes;
- fgx:  procfs, mountinfo and cgroupfs are readable and the O(log n) zero-Merkle root equals
        the naive root and the vector's 683-block root;
- ave:  the current attestation key signs, the signature verifies with its public key, and a
        changed message does not.

One failing engine makes the status `degraded` (its reason is in `reasons` and in the debug
socket's `status`); a failing journal makes it `unhealthy`.  The daemon keeps running either
way.  `faults` (tests only) forces named engines to fail, to test the degraded path.

Health is live, not only periodic: the code that sees a failure reports it at once with
`fault(engine, reason)` (a failed journal or spool write -> rzl and `database`; EMFILE at
accept, a failed destruction -> eee); the engine is false from that moment and its
self-test is re-run every `health.recheck_seconds` until it passes again (so is any engine whose
periodic self-test failed).  rzl also fails while a
proof is kept only in memory/fallback (each re-run retries writing it into the spool).
State damage found at start (`agent.service.integrity`) is shown as the extension
`state_damage: {kind: count}` in the snapshot (present only when something was found).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from agent import log, timefmt
from agent.config import Config
from agent.ops.view import ServiceView
from agent.service.spool import Spool

ENGINES = ("eee", "dire", "rzl", "fgx", "ave")
SELFTEST = Path(__file__).resolve().parent.parent / "data" / "selftest.json"


class SelfTestFailed(Exception):
    """A self-test found something wrong; the message is the reason shown to operators."""


class SelfTestSkipped(Exception):
    """The self-test could not run now for a reason that says nothing about the engine (the
    node is full); the previous result is kept and the reason says so."""


def _need(cond: bool, reason: str) -> None:
    if not cond:
        raise SelfTestFailed(reason)


def _selftest_data() -> dict:
    return json.loads(SELFTEST.read_text())


# -- the five engines --------------------------------------------------------------------------

async def check_eee(service: ServiceView, cfg: Config) -> None:
    engine = service.engine
    try:
        cap = service.capacity()
        full = cap.get("sessions_live", 0) >= cap.get("sessions_max", 1 << 30)
    except Exception:
        full = False
    if full:
        raise SelfTestSkipped("node at capacity: canary skipped, last result kept")
    tier = min(cfg.tiers, key=lambda t: cfg.tiers[t].memory_bytes)
    sid = "nrx-health-" + secrets.token_hex(4)
    sb = await engine.create(sid, tier=tier, classification="general")
    try:
        res = await sb.exec("true", timeout=10.0)
        _need(res.exit_code == 0 and not res.timed_out,
              f"canary `true` exited {res.exit_code} (timed_out={res.timed_out})")
    finally:
        with trio.CancelScope(shield=True):
            await sb.teardown()


async def check_dire(service: ServiceView, cfg: Config) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from agent.keys.session import KeyZeroized, SessionKey

    key = SessionKey.generate("nrx-health-" + secrets.token_hex(4))
    msg = b"nanorix-agent dire self-test " + os.urandom(16)
    Ed25519PublicKey.from_public_bytes(key.public_key).verify(key.sign(msg), msg)
    rep = key.zeroize()
    _need(rep.get("zeroized") is True and rep.get("readback_zero") is True,
          "session key memory did not read back as zero after zeroization")
    _need(rep.get("bytes", 0) > 0, "zeroization wiped no bytes")
    try:
        key.sign(msg)
    except KeyZeroized:
        return
    raise SelfTestFailed("a zeroized session key still signs")


def _check_spool_writable(spool: Spool) -> None:
    d = Path(spool.dir)
    p = d / f".health-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    data = b"nanorix-agent rzl self-test " + os.urandom(8)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        _need(p.read_bytes() == data, "spool read-back differs")
    finally:
        os.unlink(p)


def _check_chain_vector() -> None:
    from agent.cdp.chain import build_chain, evidence_hash

    v = _selftest_data()
    _need([evidence_hash(e) for e in v["evidence"]] == v["evidence_hashes"],
          "evidence hashes of the test vector do not recompute")
    chain, final = build_chain(v["evidence"])
    _need([c["chain_hash"] for c in chain] == v["chain_hashes"] and final == v["final_hash"],
          "chain hashes of the test vector do not recompute")


def check_rzl(service: ServiceView, cfg: Config) -> None:
    service.journal.check()
    spool = service.spool
    _check_spool_writable(spool)
    left = spool.retry()
    _need(left == 0, f"{left} proof(s) not durably spooled, kept in memory and "
                     f"{spool.fallback_dir or 'no fallback dir'}: {spool.last_error}")
    _check_chain_vector()


def check_fgx(service: ServiceView, cfg: Config) -> None:
    from agent.cdp.merkle import ZERO_BLOCK_LEAF, merkle_root, zero_root

    stat = Path("/proc/self/stat").read_text()
    _need(stat.startswith(f"{os.getpid()} "), "procfs does not describe this process")
    mi = Path("/proc/self/mountinfo").read_text().splitlines()
    _need(any(line.split()[4] == "/" for line in mi), "mountinfo lists no root mount")
    cg = Path("/proc/self/cgroup").read_text()
    _need(bool(cg.strip()), "/proc/self/cgroup is empty")
    _need(bool(os.listdir("/sys/fs/cgroup")), "cgroupfs is not readable")
    for n in (1, 2, 3, 5, 8, 13, 64, 100):
        _need(zero_root(n) == merkle_root([ZERO_BLOCK_LEAF] * n), f"zero-Merkle root of {n} blocks")
    _need(zero_root(1) == hashlib.sha256(bytes(4096)).hexdigest(), "zero-Merkle single leaf")
    _need(zero_root(683) == _selftest_data()["zero_merkle_root_683_blocks"],
          "zero-Merkle root of 683 blocks differs from the test vector")


def check_ave(service: ServiceView, cfg: Config) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    signer = service.key_store.current()
    msg = hashlib.sha256(b"nanorix-agent ave self-test " + os.urandom(16)).hexdigest().encode()
    sig = signer.sign(msg)
    pub = Ed25519PublicKey.from_public_bytes(bytes(signer.public_key))
    pub.verify(sig, msg)
    try:
        pub.verify(sig, msg + b"x")
    except InvalidSignature:
        return
    raise SelfTestFailed("attestation signature verifies for a different message")


CHECKS: dict[str, Callable] = {"eee": check_eee, "dire": check_dire, "rzl": check_rzl,
                               "fgx": check_fgx, "ave": check_ave}


class HealthMonitor:
    """Runs the self-tests and caches their results (`snapshot()` is what `agent.health` returns)."""

    def __init__(self, service: ServiceView, cfg: Config, *, checks: dict[str, Callable] | None = None) -> None:
        self.service = service
        self.cfg = cfg
        self.checks = dict(CHECKS if checks is None else checks)
        self.engines: dict[str, bool] = dict.fromkeys(ENGINES, False)
        self.reasons: dict[str, str | None] = dict.fromkeys(ENGINES, "not run yet")
        self.checked_at: dict[str, str | None] = dict.fromkeys(ENGINES, None)
        self.durations_ms: dict[str, int] = dict.fromkeys(ENGINES, 0)
        self.database = False
        self.database_reason: str | None = "not run yet"
        self.faults: set[str] = set()  # tests only: engines forced to fail
        self.live_faults: dict[str, str] = {}  # engine -> failure reported by fault()
        self.state_damage: dict[str, int] = {}  # kind -> count, found at start
        self._wake = trio.Event()
        try:
            self._token: trio.lowlevel.TrioToken | None = trio.lowlevel.current_trio_token()
        except RuntimeError:  # built outside trio (a test): no hook from worker threads
            self._token = None
        self.runs = 0
        self.last_run: str | None = None
        self._started = service.started_at
        self._lock = trio.Lock()
        self._last_status: str | None = None
        # called with the monitor after every run (the daemon keeps systemd's STATUS= current)
        self.listeners: list[Callable] = []
        self._log = log.get().bind(component="health")

    async def _one(self, name: str) -> None:
        fn = self.checks[name]
        t0 = time.monotonic()
        ok, reason = False, None
        was = self.engines.get(name)
        try:
            if name in self.faults:
                raise SelfTestFailed("fault injected")
            with trio.fail_after(self.cfg.timeouts.health_canary_seconds):
                r = fn(self.service, self.cfg)
                if isinstance(r, Awaitable):
                    await r
            ok = True
        except trio.TooSlowError:
            reason = f"self-test timed out after {self.cfg.timeouts.health_canary_seconds:.0f}s"
        except SelfTestSkipped as e:
            self.reasons[name] = str(e)
            self.checked_at[name] = timefmt.iso_seconds()
            return
        except SelfTestFailed as e:
            reason = str(e)
        except Exception as e:  # any crash of a self-test is a failed engine, never of the agent
            reason = f"{type(e).__name__}: {e}"
        self.engines[name] = ok
        self.reasons[name] = reason
        if ok:
            self.live_faults.pop(name, None)
        else:  # re-checked every health.recheck_seconds until it passes, not at the next interval
            self.live_faults[name] = reason or "failed"
        self.checked_at[name] = timefmt.iso_seconds()
        self.durations_ms[name] = int((time.monotonic() - t0) * 1000)
        # the first result is always logged (a first failure too), then every change
        if ok != was or self.runs == 0:
            (self._log.info if ok else self._log.warning)(
                "health_engine_changed", engine=name, ok=ok, duration_ms=self.durations_ms[name],
                reason=reason)

    def _database(self) -> None:
        try:
            self.service.journal.check()
            self.database, self.database_reason = True, None
        except Exception as e:
            self.database, self.database_reason = False, f"{type(e).__name__}: {e}"

    def fault(self, engine: str, reason: str) -> None:
        """Flip `engine` false now: code outside the self-tests saw it fail.  Its self-test
        re-runs every health.recheck_seconds (from `run`) until it passes again."""
        was = self.engines[engine]
        self.engines[engine] = False
        self.reasons[engine] = reason
        self.checked_at[engine] = timefmt.iso_seconds()
        self.live_faults[engine] = reason
        if was:
            self._log.warning("health_engine_changed", engine=engine, ok=False, reason=reason,
                              live=True)
        self._wake.set()

    def state_fault(self, reason: str | None) -> None:
        """Journal/spool hook: a failed write (reason) makes rzl and `database` false at
        once; None (the backlog was replayed) asks for an immediate re-check.  Callable
        from a worker thread (the spool writes there): it then runs on the loop."""
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            if self._token is not None:
                self._token.run_sync_soon(self.state_fault, reason)
                return
        if reason is not None:
            self.database, self.database_reason = False, reason
            self.fault("rzl", reason)
        else:
            self._wake.set()

    async def recheck(self) -> None:
        """Re-run the self-tests of the engines reported by fault(), and the journal's."""
        async with self._lock:
            async with trio.open_nursery() as nursery:
                for name in list(self.live_faults):
                    nursery.start_soon(self._one, name)
            self._database()

    async def run_once(self) -> dict:
        """Run every self-test now (one run at a time) and return the snapshot."""
        async with self._lock:
            async with trio.open_nursery() as nursery:
                for name in self.checks:
                    nursery.start_soon(self._one, name)
            self._database()
            self.runs += 1
            self.last_run = timefmt.iso_seconds()
            status = self.status
            if status != self._last_status:
                (self._log.info if status == "healthy" else self._log.error)(
                    "health_status_changed", status=status, previous=self._last_status,
                    reasons={n: r for n, r in self.reasons.items() if r and not self.engines[n]},
                    database_reason=self.database_reason)
                self._last_status = status
            for listener in list(self.listeners):
                listener(self)
        return self.snapshot()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Re-run the self-tests every `health.interval_seconds`, forever; an engine reported
        by fault() is re-checked every health.recheck_seconds until it passes."""
        task_status.started()
        next_full = trio.current_time() + self.cfg.health.interval_seconds
        while True:
            at = next_full
            if self.live_faults or not self.database:
                at = min(at, trio.current_time() + self.cfg.health.recheck_seconds)
            with trio.move_on_at(at):
                await self._wake.wait()
            if self._wake.is_set():  # a new fault: re-check it health.recheck_seconds from now
                self._wake = trio.Event()
                continue
            if trio.current_time() >= next_full:
                await self.run_once()
                next_full = trio.current_time() + self.cfg.health.interval_seconds
            else:
                await self.recheck()

    @property
    def status(self) -> str:
        if not self.database:
            return "unhealthy"
        return "healthy" if all(self.engines.values()) else "degraded"

    def snapshot(self) -> dict:
        """SPEC 10: {status, engines, database, uptime_seconds, timestamp}."""
        snap = {"status": self.status, "engines": dict(self.engines), "database": self.database,
                "uptime_seconds": int(time.monotonic() - self._started),
                "timestamp": timefmt.iso_seconds()}
        if self.state_damage:
            snap["state_damage"] = dict(self.state_damage)
        return snap

    def details(self) -> dict:
        """Per engine: ok, reason, when it ran and how long it took (debug socket `status`)."""
        out = {n: {"ok": self.engines[n], "reason": self.reasons[n],
                   "checked_at": self.checked_at[n], "duration_ms": self.durations_ms[n]}
               for n in self.engines}
        out["database"] = {"ok": self.database, "reason": self.database_reason}
        return out
