"""Sessions (SPEC 2, 4, 5, 8): the state machine, tiers, TTL enforcement, exec with
receipts, and destruction into a spooled CDP.

State machine: `active` <-> `executing` -> `destroyed` (requested) | `expired` (TTL, OOM,
operator, recovery) | `expired_unclean` (a destruction step could not be verified).

* Limits at create: node capacity (sessions and committed memory; `Unavailable` when full
  or draining) and per-customer concurrency of the tier on this node (`RateLimited`).
* TTL: each live session has a watcher task in the service nursery that destroys it with
  reason `ttl_expired` at its deadline (even mid-exec, with nobody connected) or with
  reason `oom` when its memory cgroup OOM-killed something.  `ttl_seconds` above the tier
  maximum is clamped (config `node.ttl_policy = "clamp"`, the default) or refused
  (`"refuse"` -> BadRequest).  An exec's `timeout` defaults to the remaining TTL and is
  clamped to it.
* Ended sessions stay queryable (`session.get`, `session.list`, from the journal after a
  restart); an exec on one is `Conflict`; a second destroy returns the first result.
* Create and destroy are shielded from the caller's cancellation (a client that hangs up
  must not leave half a sandbox or half a proof); exec is not (hanging up kills it).
"""

from __future__ import annotations

import builtins
import time

import structlog
import trio

from agent.config import Config
from agent.errors import BadRequest, Conflict, InternalError, Unavailable
from agent.keys.attestation import AttestationKeyStore
from agent.sandbox.engine import SandboxEngine
from agent.service import adoption, views
from agent.service.admission import Admission
from agent.service.audit import AuditLog
from agent.service.creation import build_session
from agent.service.ending import destroy_session
from agent.service.execs import run_exec
from agent.service.hooks import HealthHook, MetricsHook
from agent.service.journal import Journal, JournalUnwritable
from agent.service.model import (
    ENDED_STATUSES,
    LIVE_STATUSES,
    SESSION_ID_RE,
    Session,
    new_session_id,
)
from agent.service.pool import PoolHooks, WarmPool
from agent.service.proofs import ProofWriter
from agent.service.receipts import Receipts
from agent.service.spool import Spool
from agent.service.watch import watch
from agent.timefmt import iso_seconds

__all__ = ["ENDED_STATUSES", "SESSION_ID_RE", "Service", "new_session_id"]

_log = structlog.get_logger("nanorix-agent.sessions")  # lazy: resolved after log.setup()


class Service:
    """Owns every session of this node.  Also the object the ops modules (health, debug
    socket, metrics, recovery) are given: see docs/design.md "Operations: Daemon hooks"."""

    def __init__(self, cfg: Config, *, engine: SandboxEngine, key_store: AttestationKeyStore,
                 journal: Journal, spool: Spool, version: str,
                 metrics: MetricsHook | None = None) -> None:
        self.config = cfg
        self.engine = engine
        self.key_store = key_store
        self.journal = journal
        self.spool = spool
        self.version = version
        self.metrics = metrics
        self.health: HealthHook | None = None  # set by the daemon once the monitor runs
        self.draining = False
        self.started_at = time.monotonic()
        self.audit = AuditLog(journal)
        self.proofs = ProofWriter(cfg, key_store, spool)
        self.receipts = Receipts(self.audit)
        self.sessions: dict[str, Session] = {}  # live, ending, and ended-not-yet-journaled
        self._unforgotten: set[str] = set()  # ended, kept in memory until journaled (_forget)
        self.admission = Admission(cfg)
        self._reserved = self.admission.reserved  # sid -> (customer, tier) while creating
        self._nursery: trio.Nursery | None = None
        self._adopted: list[Session] = []  # waiting for run() to arm their watchers
        self.memory_capacity = self.admission.memory_capacity
        self.pool = WarmPool(cfg, engine, PoolHooks(
            new_id=self._fresh_session_id, room=self._pool_room,
            draining=lambda: self.draining, busy=self._busy, health=lambda: self.health,
            metrics=metrics, version=version, spool=spool))
        self.admission.pooled, self.admission.pool_by_tier = self.pool.tiers, self.pool.counts

    # -- lifetime ----------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery that watches every session's TTL/OOM, and prune the journal of
        ended sessions past their retention (hourly); runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for s in self._adopted:  # re-adopted before the nursery existed
                nursery.start_soon(watch, self, s)
            self._adopted.clear()
            await nursery.start(self.pool.run)
            task_status.started()
            while True:
                self.prune_journal()
                await trio.sleep(3600)

    def prune_journal(self) -> int:
        """Forget ended sessions older than node.journal_retention_seconds whose proof was
        acknowledged (their metadata, audit hashes and receipt public key)."""
        if self._unforgotten:
            self._forget_pending()
        before = iso_seconds(time.time() - self.config.node.journal_retention_seconds)
        keep = {str(p.get("session_id")) for p in self.spool.pending()}
        keep |= set(self.sessions)
        try:
            n = self.journal.prune(before, keep)
        except Exception:
            _log.exception("journal_prune_failed")
            return 0
        if n:
            _log.info("journal_pruned", sessions=n)
        return n

    async def drain(self, reason: str = "operator") -> None:
        """Refuse new sessions, then destroy every live one (CDPs spooled)."""
        self.draining = True
        await self.pool.close()  # its members through the pipeline, no CDP (pool.py)
        while True:
            # creates admitted before draining began finish (they are shielded) and are
            # destroyed in the next round; destroys already running are waited for
            live = [s for s in self.sessions.values()
                    if not s.ending and s.status in LIVE_STATUSES]
            async with trio.open_nursery() as nursery:
                for s in live:
                    nursery.start_soon(self._end_quiet, s, reason)
            for s in list(self.sessions.values()):
                if s.ending:
                    await s.done.wait()
            if not self._reserved and not any(
                    not s.ending and s.status in LIVE_STATUSES for s in self.sessions.values()):
                return
            await trio.sleep(0.01)

    async def _end_quiet(self, s: Session, reason: str) -> None:
        try:
            await self.end(s, reason)
        except Exception:
            _log.exception("destroy_failed", session_id=s.session_id, reason=reason)

    def _health_fault(self, engine: str, reason: str) -> None:
        """Flip a health engine at once (HealthMonitor.fault); re-checked until it passes."""
        if self.health is not None:
            self.health.fault(engine, reason)

    # -- metrics helpers -----------------------------------------------------------------
    def _inc(self, name: str, **labels) -> None:
        if self.metrics is not None:
            try:
                self.metrics.inc(name, **labels)
            except Exception:
                _log.exception("metrics_failed", metric=name)

    def _observe(self, name: str, seconds: float) -> None:
        if self.metrics is not None:
            try:
                self.metrics.observe(name, seconds)
            except Exception:
                _log.exception("metrics_failed", metric=name)

    # -- views ---------------------------------------------------------------------------
    def live(self) -> list[Session]:
        return [s for s in self.sessions.values() if s.status in LIVE_STATUSES]

    def ack_proof(self, session_id: str) -> bool:
        """proof.ack: record the ack in the journal, then drop the proof.  Unavailable (the
        proof is kept) while either cannot be written."""
        if self.spool.get_bytes(session_id) is None:
            return False
        try:
            self.journal.mark_acked(session_id)
            return self.spool.ack(session_id)
        except (JournalUnwritable, OSError) as e:
            raise Unavailable(f"the acknowledgement cannot be recorded ({e}); the proof is "
                              f"kept, acknowledge it again later") from None

    def _lookup(self, session_id: str, customer_id: str | None) -> tuple[Session | None, dict]:
        """(live record or None, public view); NotFound for unknown or foreign sessions."""
        return views.lookup(self.sessions, self.journal, session_id, customer_id)

    def get(self, session_id: str, customer_id: str | None = None) -> dict:
        return self._lookup(session_id, customer_id)[1]

    def list(self, customer_id: str | None = None) -> list[dict]:
        return views.listing(self.sessions, self.journal, customer_id)

    # the ops' view (agent/ops/view.py) -------------------------------------------------
    def list_sessions(self) -> builtins.list[dict]:
        return [views.meta(s) for s in self.sessions.values()]

    def get_meta(self, session_id: str) -> dict | None:
        return views.lookup_meta(self.sessions, self.journal, session_id)

    def capacity(self) -> dict:
        return self.admission.capacity(self.live())

    def receipt_key(self, key_id: str) -> dict | None:
        """Public record of a session receipt key (live or destroyed session)."""
        return views.receipt_key(self.sessions, self.journal, key_id)

    # -- create ----------------------------------------------------------------------
    def resolve_ttl(self, tier: str, ttl: int | None) -> int:
        return self.admission.resolve_ttl(tier, ttl)

    async def create(self, *, customer_id: str, tier: str, data_classification: str = "general",
                     jurisdiction: str = "US", ttl_seconds: int | None = None,
                     session_id: str | None = None) -> dict:
        if tier not in self.config.tiers:
            raise BadRequest(f"tier must be one of {', '.join(self.config.tiers)}", field="tier")
        ttl = self.resolve_ttl(tier, ttl_seconds)
        member = None
        if session_id is None:  # a warm sandbox if the pool has one (its id is fresh)
            member = self.pool.take(tier, data_classification)
            session_id = member.session_id if member else self._fresh_session_id()
        elif not SESSION_ID_RE.match(session_id):
            raise BadRequest("session_id must be sess_ + 16 lowercase hex", field="session_id")
        elif (session_id in self.sessions or session_id in self._reserved
              or self.journal.get(session_id) is not None or self.pool.holds(session_id)):
            raise Conflict(f"session {session_id} already exists", field="session_id")
        try:
            if not self.journal.writable:
                raise Unavailable(f"the state directory cannot be written "
                                  f"({self.journal.last_error}); new sessions are refused "
                                  f"until it can")
            await self._admit(session_id, customer_id, tier)
        except BaseException:
            if member is not None:
                self.pool.put_back(member)
            raise
        t0 = time.monotonic()
        try:
            with trio.CancelScope(shield=True):
                s = await build_session(self, session_id, customer_id, tier, data_classification,
                                       jurisdiction, ttl, member)
        finally:
            self._reserved.pop(session_id, None)
        self._inc("creates_total")
        self._observe("create_seconds", time.monotonic() - t0)
        return {"session_id": s.session_id, "status": s.status, "ttl_seconds": s.ttl_seconds,
                "created_at": s.record.created_at,
                "receipt_key": {"key_id": s.receipt_key["key_id"],
                                "public_key": s.receipt_key["public_key"]}}

    async def _admit(self, session_id: str, customer_id: str, tier: str) -> None:
        """Admission; when only warm-pool members crowd the node, one gives way (a member
        being made is waited for, then one is destroyed through the pipeline, awaited) and
        admission is asked again: the pool never refuses a create that fits without it."""
        try:
            self.admission.admit(session_id, customer_id, tier, self.live(), self.draining)
        except Unavailable:
            if self.draining or not await self.pool.make_room(tier):
                raise
            self.admission.admit(session_id, customer_id, tier, self.live(), self.draining)

    def _fresh_session_id(self) -> str:
        """A session id used nowhere: not live, not journaled, not held by the pool."""
        while True:
            sid = new_session_id()
            if not (sid in self.sessions or sid in self._reserved or self.pool.holds(sid)
                    or self.journal.get(sid)):
                return sid

    def _busy(self) -> bool:
        """A create or an exec is in flight (the pool's refill lets them go first)."""
        return bool(self._reserved) or any(s.status == "executing"
                                           for s in self.sessions.values())

    def _pool_room(self, tier: str) -> bool:
        """Room on the node for one more pool member of `tier`, keeping the last uid slot
        free (the health canary needs one)."""
        cap = self.capacity()
        return (cap["sessions_live"] + cap["pool_members"] + 2 <= cap["sessions_max"]
                and cap["memory_committed_bytes"] + self.config.tiers[tier].memory_bytes
                <= cap["memory_capacity_bytes"])

    # -- TTL and OOM watch -----------------------------------------------------------------
    def _arm(self, s: Session) -> None:
        assert self._nursery is not None, "Service.run() is not running"
        self._nursery.start_soon(watch, self, s)

    # -- exec ----------------------------------------------------------------------------
    async def exec(self, session_id: str, command: str, *, input_data: bytes | None = None,
                   timeout: float | None = None, env: dict[str, str] | None = None,
                   on_output=None, customer_id: str | None = None) -> dict:
        s, _ = self._lookup(session_id, customer_id)
        return await run_exec(self, s, session_id, command, input_data=input_data,
                              timeout=timeout, env=env, on_output=on_output)

    # -- the one ending: destroy, drain, TTL, OOM, re-adoption and recovery ----------------
    async def destroy(self, session_id: str, reason: str = "requested", *,
                      customer_id: str | None = None) -> dict:
        s, view = self._lookup(session_id, customer_id)
        if s is None or s.done.is_set():  # ended: the same answer before and after a restart
            stored = self.spool.get(session_id)
            if stored is not None:
                return stored
            row = self.journal.get(session_id)
            if row is not None and row.get("proof_acked_at"):
                raise Conflict(f"session {session_id} has ended ({view['status']}) and its "
                               f"proof was acknowledged", field="session_id")
            raise InternalError(f"session {session_id} has ended ({view['status']}) but its "
                                f"proof is missing (see health state_damage)")
        with trio.CancelScope(shield=True):
            result = await self.end(s, reason)
        return result

    async def end(self, s: Session, reason: str) -> dict:
        """End session `s` for `reason`: the exec in flight gets an interrupted receipt,
        `destroy_requested` is audited, steps 1-8 run on its sandbox (None when recovery
        found none), the proof is signed and spooled, and only then the journal and the
        live view turn to the end status.  Idempotent: a second call waits for the first
        and returns its result."""
        if s.ending:
            await s.done.wait()
            if s.result is None:
                raise InternalError("destruction failed")
            return s.result
        s.ending = True
        s.reason = reason
        if s.sandbox is not None:
            s.sandbox.ending = True
        t0 = time.monotonic()
        if s.watch_scope is not None:
            s.watch_scope.cancel()
        try:
            s.result = await destroy_session(self, s, reason)
            return s.result
        finally:
            if s.exec_scope is not None:
                s.exec_scope.cancel()
            s.sandbox = None
            s.session_key = None
            s.done.set()
            self._observe("destroy_seconds", time.monotonic() - t0)
            self._forget(s)

    def _forget(self, s: Session) -> None:
        """Drop ended sessions from memory once the journal holds their end (status and
        exec count) and their proof is spooled: from then on every lookup answers from the
        journal and the spool, as after a restart, so memory and the walks over `sessions`
        (admission, the pool's refill, metrics) stay bounded by the live sessions instead
        of growing with every lifecycle since start.  One whose end the journal does not
        hold yet (a disk fault: its update is kept and replayed) or whose proof failed
        stays, and is looked at again at the next end and at the hourly prune."""
        self._unforgotten.add(s.session_id)
        self._forget_pending()

    def _forget_pending(self) -> None:
        for sid in list(self._unforgotten):
            ended = self.sessions.get(sid)
            if ended is None or not ended.done.is_set():
                self._unforgotten.discard(sid)
                continue
            if ended.result is None:
                continue
            try:
                row = self.journal.get(sid)
            except Exception:
                _log.exception("journal_read_failed", session_id=sid)
                return
            if (row is not None and row["status"] == ended.status
                    and row["exec_count"] == ended.record.exec_count):
                del self.sessions[sid]
                self._unforgotten.discard(sid)

    # -- recovery (ops.recovery calls this per journaled live session) ---------------------
    async def adopt_row(self, row: dict) -> bool:
        """Re-adopt a journaled live session whose sandbox outlived the agent (adoption.py)."""
        return await adoption.adopt_row(self, row)

    async def recover_row(self, row: dict, reason: str = "agent_recovery") -> str:
        """End a journaled session after a crash through end() (adoption.py)."""
        return await adoption.recover_row(self, row, reason)
