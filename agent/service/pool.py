"""The warm pool (issue 18): ready sandboxes made off the request path, bound to a session
at `session.create`.

A member is a whole sandbox — namespaces, cgroups with its tier's limits, tmpfs, uid slot,
seccomp filter, nrx-init serving — made by the engine with `unbound=True`: its PID 1 runs
nothing until `engine.bind()` gave it the session's hostname.  Everything else that is a
session's identity is made at bind time by the Service, never ahead: the session key, the
journal row, the TTL (from `created_at`, the moment of the create).  The member's id is a
fresh `sess_` id drawn when it was made (unique among the journal, the live sessions and
the pool) and never used for anything else; a create that names its own `session_id`
takes the normal path.

Keyed by (tier, seccomp profile): `[pool] sizes` per tier times `[pool] profiles`.  One
background task refills (at most `refill_concurrency` creates at a time, each waiting up to
0.1 s for the creates and execs in flight to finish first, backing off after a failure), never while draining, while the health monitor says sandboxes or the journal
fail, or when the node has no room (members count against `node.max_sessions` and the
committed memory, and the pool never takes the last free uid slot, which the health canary
needs).  It also retires members older than `max_age_seconds`.

Retiring a member (aged out, drained, stopped, bind failed, making room) runs the one
destruction pipeline (`agent.destroy.pipeline.run_pipeline`, the same eight steps as every
session) with reason `pool_retired`.  It gets **no CDP**: a CDP is a signed statement about
a customer's session and this sandbox never had one (no customer, no key, no journal row),
so signing one would invent it.  The outcome is logged (`pool_member_retired`: why, status,
the steps that could not be verified) and counted (`pool_retired_total{why, clean}`); a step
that fails (other than step 4, which honestly finds no session key to zeroize) flips the
health engine `eee` like any unverified destruction.  After a crash, pool members are
leftovers without a journal row: their PID 1 ends with the agent's lifeline (an unbound
nrx-init takes no orphan grace) and recovery reclaims their cgroups and directories like
any other leftover (docs/operations.md "Warm pool").
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio

from agent.config import Config
from agent.destroy.context import DestroyContext
from agent.destroy.pipeline import run_pipeline
from agent.sandbox.engine import BindFailed, Sandbox, SandboxEngine
from agent.service.hooks import HealthHook, MetricsHook
from agent.service.spool import Spool, SpoolUnavailable
from agent.timefmt import iso_seconds

__all__ = ["Member", "PoolFacts", "PoolHooks", "WarmPool", "bind_or_create", "reserve_proof"]

_log = structlog.get_logger("nanorix-agent.pool")
BACKOFF_MAX_SECONDS = 60.0
QUIET_WAIT_SECONDS = 0.1  # how long a refill waits for the requests in flight to finish
NO_KEY_STEP = 4  # key zeroization: a member never had a session key (recorded as such)


@dataclass
class PoolFacts:
    """What the destruction pipeline reads of a retired member: no customer, no audit
    events, no receipts.  `created_at` is when the sandbox was made."""

    session_id: str
    created_at: str
    tier: str
    classification: str
    customer_id: str = ""
    jurisdiction: str = ""
    receipts: list[dict] = field(default_factory=list)
    receipt_keys: list[dict] = field(default_factory=list)  # never bound: no session key
    audit_events: list[dict] = field(default_factory=list)
    exec_count: int = 0
    receipts_complete: bool = True


@dataclass
class Member:
    sandbox: Sandbox
    tier: str
    profile: str
    classification: str  # the one it was made with (its seccomp profile, its wipe passes)
    created_at: str
    born: float  # trio clock
    spool_ready: bool = False  # its proof reservation was made ahead (Spool.reserve_pooled)

    @property
    def session_id(self) -> str:
        return self.sandbox.session_id


@dataclass
class PoolHooks:
    """What the pool needs of its Service (wired in Service.__init__)."""

    new_id: Callable[[], str]  # a fresh session id, unused anywhere
    room: Callable[[str], bool]  # room on the node for one more member of this tier
    draining: Callable[[], bool]
    busy: Callable[[], bool]  # a create or an exec is in flight (a refill waits, bounded)
    health: Callable[[], HealthHook | None]
    metrics: MetricsHook | None
    version: str
    spool: Spool


class WarmPool:
    def __init__(self, cfg: Config, engine: SandboxEngine, hooks: PoolHooks) -> None:
        self.cfg = cfg
        self.engine = engine
        self.hooks = hooks
        self.members: dict[tuple[str, str], deque[Member]] = {}
        self.making: dict[tuple[str, str], int] = {}  # refills in flight
        self.closed = False
        self._wake = trio.Event()
        self._backoff: dict[tuple[str, str], tuple[float, float]] = {}  # key -> (until, delay)
        self._nursery: trio.Nursery | None = None
        self._retiring: set[str] = set()
        self._idle = trio.Event()  # set while nothing is being made or retired
        self._idle.set()
        self.room_waiters = 0  # creates waiting for the pool to give way: no refill starts

    # -- what the config asks for ----------------------------------------------------------
    def wanted(self) -> dict[tuple[str, str], int]:
        p = self.cfg.pool
        return {(tier, prof): n for tier, n in p.sizes.items() if n > 0 and tier in self.cfg.tiers
                for prof in p.profiles}

    def _class_for(self, profile: str) -> str:
        """A data class with that seccomp profile (its wipe passes retire the member)."""
        for name, c in self.cfg.classes.items():
            if c.seccomp_profile == profile:
                return name
        raise KeyError(profile)

    # -- views -----------------------------------------------------------------------------
    def tiers(self) -> list[str]:
        """The tier of every member, ready or being made (what capacity counts)."""
        out = [m.tier for q in self.members.values() for m in q]
        out += [k[0] for k, n in self.making.items() for _ in range(n)]
        return out

    def counts(self) -> dict[str, int]:
        """Ready members per tier (the `pool_members` gauge)."""
        out = dict.fromkeys(self.cfg.pool.sizes, 0)
        for (tier, _), q in self.members.items():
            out[tier] = out.get(tier, 0) + len(q)
        return out

    def holds(self, session_id: str) -> bool:
        return any(m.session_id == session_id for q in self.members.values() for m in q)

    # -- taking ----------------------------------------------------------------------------
    def take(self, tier: str, classification: str) -> Member | None:
        """The oldest ready member for this tier and classification's profile, or None (the
        create takes the normal path).  Wakes the refill."""
        cls = self.cfg.classes.get(classification)
        if cls is None or self.closed:
            return None
        q = self.members.get((tier, cls.seccomp_profile))
        if not q:
            self._inc("pool_misses_total", tier=tier)
            return None
        m = q.popleft()
        if not m.sandbox.alive:  # died in the pool: retired (its pipeline says how), not used
            self.retire_soon(m, "died")
            return self.take(tier, classification)
        self._inc("pool_hits_total", tier=tier)
        self.wake()
        return m

    def put_back(self, m: Member) -> None:
        """A member taken for a create that was then refused before binding (admission)."""
        if self.closed:
            self.retire_soon(m, "closed")
        else:
            self.members.setdefault((m.tier, m.profile), deque()).appendleft(m)

    def wake(self) -> None:
        self._wake.set()

    # -- the refill and age-out task --------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep the pool at its sizes until cancelled or closed."""
        limiter = trio.CapacityLimiter(self.cfg.pool.refill_concurrency)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while not self.closed:
                self._age_out()
                for key, want in self.wanted().items():
                    while (len(self.members.get(key, ())) + self.making.get(key, 0) < want
                           and self._may_refill(key)):
                        self.making[key] = self.making.get(key, 0) + 1
                        self._idle = trio.Event()
                        nursery.start_soon(self._refill, key, limiter)
                self._wake = trio.Event()
                with trio.move_on_after(self._next_check()):
                    await self._wake.wait()
            self._nursery = None

    def _next_check(self) -> float:
        """Seconds until the oldest member ages out, the earliest backoff ends, or a
        periodic re-check of room and health (1 s)."""
        now = trio.current_time()
        at = [m.born + self.cfg.pool.max_age_seconds for q in self.members.values() for m in q]
        at += [until for until, _ in self._backoff.values()]
        return max(0.01, min([now + 1.0, *at]) - now)

    def _may_refill(self, key: tuple[str, str]) -> bool:
        if self.closed or self.room_waiters or self.hooks.draining():
            return False
        h = self.hooks.health()
        if h is not None and (not h.database or not h.engines.get("eee", True)):
            return False
        until, _ = self._backoff.get(key, (0.0, 0.0))
        if trio.current_time() < until:
            return False
        return self.hooks.room(key[0])

    async def _refill(self, key: tuple[str, str], limiter: trio.CapacityLimiter) -> None:
        tier, profile = key
        try:
            async with limiter:
                # live requests first: a create or exec in flight is answered before this
                # refill's work (spawning nrx-init runs partly on the event loop); bounded,
                # so a busy node still refills
                with trio.move_on_after(QUIET_WAIT_SECONDS):
                    while self.hooks.busy():
                        await trio.sleep(0.005)
                if not self._may_refill_now(key):
                    return
                cls = self._class_for(profile)
                t0 = time.monotonic()
                try:  # nothing of a refill may end the daemon: a failure backs off
                    sid = self.hooks.new_id()
                    sb = await self.engine.create(sid, tier=tier, classification=cls,
                                                  unbound=True)
                except Exception as e:
                    _, delay = self._backoff.get(key, (0.0, 0.0))
                    delay = min(BACKOFF_MAX_SECONDS,
                                delay * 2 if delay else self.cfg.pool.refill_backoff_seconds)
                    self._backoff[key] = (trio.current_time() + delay, delay)
                    self._inc("pool_refill_failures_total", tier=tier)
                    _log.warning("pool_refill_failed", tier=tier, profile=profile,
                                 error=type(e).__name__, retry_in_s=delay)
                    return
                self._backoff.pop(key, None)
                m = Member(sandbox=sb, tier=tier, profile=profile, classification=cls,
                           created_at=iso_seconds(), born=trio.current_time())
                try:  # its proof's space too: no fsync left on the request path
                    await trio.to_thread.run_sync(self.hooks.spool.reserve_pooled, sid)
                    m.spool_ready = True
                except SpoolUnavailable as e:  # the create reserves then (and may refuse)
                    _log.warning("pool_reservation_failed", tier=tier, error=str(e))
                if self.closed:  # the pool closed while this one was being made
                    await self.retire(m, "closed")
                    return
                self.members.setdefault(key, deque()).append(m)
                self._observe("pool_refill_seconds", time.monotonic() - t0)
                _log.debug("pool_member_ready", tier=tier, profile=profile,
                           ms=round((time.monotonic() - t0) * 1000, 2))
        finally:
            self.making[key] -= 1
            self._settle()
            self.wake()

    def _may_refill_now(self, key: tuple[str, str]) -> bool:
        """Re-checked once the limiter let this refill go: it may have waited a while."""
        self.making[key] -= 1
        try:
            return self._may_refill(key)
        finally:
            self.making[key] += 1

    def _age_out(self) -> None:
        """Retire members past `max_age_seconds`, and any whose nrx-init died (at most a
        second after: the loop looks at least that often)."""
        now, age = trio.current_time(), self.cfg.pool.max_age_seconds
        for q in self.members.values():
            while q and now - q[0].born >= age:
                self.retire_soon(q.popleft(), "aged_out")
            for m in [m for m in q if not m.sandbox.alive]:
                q.remove(m)
                self.retire_soon(m, "died")

    # -- retiring: the destruction pipeline, no CDP -------------------------------------------
    def retire_soon(self, m: Member, why: str) -> None:
        if self._nursery is not None:
            self._idle = trio.Event()
            self._retiring.add(m.session_id)
            self._nursery.start_soon(self._retire_task, m, why)
        else:  # not running (tests of the class alone): nothing to schedule it on
            raise RuntimeError("the pool's task is not running")

    async def _retire_task(self, m: Member, why: str) -> None:
        try:
            await self.retire(m, why)
        finally:
            self._retiring.discard(m.session_id)
            self._settle()

    def _settle(self) -> None:
        if not self._retiring and not any(self.making.values()):
            self._idle.set()

    async def retire(self, m: Member, why: str) -> bool:
        """Destroy a member that never belonged to a session through the destruction
        pipeline (reason `pool_retired`); True when every step but the key step (no key
        existed) verified its work.  Logged and counted; no proof."""
        with trio.CancelScope(shield=True):
            ctx = DestroyContext(
                sandbox=m.sandbox,
                session=PoolFacts(session_id=m.session_id, created_at=m.created_at,
                                  tier=m.tier, classification=m.classification),
                session_key=None, passes=list(self.cfg.classes[m.classification].wipe_passes),
                reason="pool_retired", node_id=self.cfg.node.node_id,
                agent_version=self.hooks.version, revoke=lambda: None)
            try:
                out = await run_pipeline(ctx)
            except Exception:
                _log.exception("pool_retire_crashed", session_id=m.session_id, why=why)
                self._fault(f"the destruction of pool sandbox {m.session_id} crashed")
                with trio.move_on_after(10):
                    await m.sandbox.teardown()
                self.hooks.spool.release_pooled(m.session_id)
                self._inc("pool_retired_total", why=why, clean="false")
                return False
        self.hooks.spool.release_pooled(m.session_id)  # a no-op once bound
        failed = [n for n, ev in enumerate(out.evidence, start=1)
                  if ev.get("ok") is not True and n != NO_KEY_STEP]
        clean = not failed and out.teardown_ok
        if failed:
            self._fault(f"destruction of pool sandbox {m.session_id} could not verify "
                        f"step(s) {', '.join(map(str, failed))}")
        self._inc("pool_retired_total", why=why, clean="true" if clean else "false")
        (_log.info if clean else _log.error)(
            "pool_member_retired", session_id=m.session_id, tier=m.tier, why=why,
            never_bound=True, steps_unverified=failed, pipeline_status=out.status,
            teardown_ok=out.teardown_ok,
            duration_ms=out.duration_us // 1000)
        return clean

    async def close(self) -> None:
        """Stop refilling and retire every member through the pipeline (drain, stop); waits
        for refills and retirements in flight."""
        self.closed = True
        self.wake()
        members = [m for q in self.members.values() for m in q]
        self.members.clear()
        async with trio.open_nursery() as n:
            for m in members:
                n.start_soon(self.retire, m, "closed")
        with trio.move_on_after(self.cfg.timeouts.create_seconds * 2):
            await self._idle.wait()

    async def make_room(self, keep_tier: str) -> bool:
        """Make room for a create the pool crowds out: no refill starts meanwhile; a member
        still being made is waited for (bounded by timeouts.create_seconds: it counts
        against capacity until it is ready or failed), then the newest member of another
        tier (or of this one when no other has any) is retired and waited for.  False when
        the pool held nothing, ready or being made (admission is not worth asking again)."""
        self.room_waiters += 1
        waited = any(self.making.values())
        try:
            with trio.move_on_after(self.cfg.timeouts.create_seconds):
                while not any(self.members.values()) and any(self.making.values()):
                    await self._idle.wait()
            order = sorted(self.members.items(), key=lambda kv: kv[0][0] == keep_tier)
            for _, q in order:
                if q:
                    await self.retire(q.pop(), "making_room")
                    return True
            return waited  # a refill in flight gave up (or failed): its room is free
        finally:
            self.room_waiters -= 1
            self.wake()

    # -- metrics and health --------------------------------------------------------------------
    def _inc(self, name: str, **labels) -> None:
        if self.hooks.metrics is not None:
            try:
                self.hooks.metrics.inc(name, **labels)
            except Exception:
                _log.exception("metrics_failed", metric=name)

    def _observe(self, name: str, seconds: float) -> None:
        if self.hooks.metrics is not None:
            try:
                self.hooks.metrics.observe(name, seconds)
            except Exception:
                _log.exception("metrics_failed", metric=name)

    def _fault(self, reason: str) -> None:
        h = self.hooks.health()
        if h is not None:
            h.fault("eee", reason)



async def bind_or_create(pool: WarmPool, member: Member | None, session_id: str, *, tier: str,
                         classification: str, prelude=None) -> Sandbox:
    """The new session's sandbox: the warm `member` bound to it, or a new one (no member;
    or its bind failed, fail closed: it is destroyed through the pipeline first, then the
    session is built cold under the same id).  `prelude`: SandboxEngine.create's, for a
    new sandbox only (a member has none)."""
    if member is not None:
        assert member.session_id == session_id
        try:
            await pool.engine.bind(member.sandbox)
            return member.sandbox
        except BindFailed as e:
            _log.error("pool_bind_failed", session_id=session_id, error=str(e))
            await pool.retire(member, "bind_failed")
    return await pool.engine.create(session_id, tier=tier, classification=classification,
                                    prelude=prelude if member is None else None)


async def reserve_proof(spool: Spool, member: Member | None, session_id: str,
                        header: dict) -> None:
    """The new session's proof reservation: the warm `member`'s, made ahead, takes the
    header (no fsync, no worker thread on the request path); else one is made now.
    Raises SpoolUnavailable."""
    if member is not None and member.spool_ready:
        try:
            spool.bind_pooled(session_id, header)
            return
        except SpoolUnavailable as e:
            _log.warning("pool_reservation_unusable", session_id=session_id, error=str(e))
    await trio.to_thread.run_sync(spool.reserve, session_id, header)
