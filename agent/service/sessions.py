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
import math
import os
import time

import structlog
import trio

from agent.config import Config
from agent.destroy.context import DestroyContext
from agent.destroy.pipeline import run_pipeline
from agent.errors import BadRequest, Conflict, InternalError, NotFound, Unavailable
from agent.keys.attestation import AttestationKeyStore
from agent.keys.session import SessionKey
from agent.sandbox.engine import AdoptFailed, SandboxEngine
from agent.sandbox.exec import ExecProgress
from agent.sandbox.faults import ExecBusy
from agent.sandbox.userns import SlotsExhausted
from agent.service import views
from agent.service.admission import Admission
from agent.service.audit import AuditLog
from agent.service.faults import fault_point
from agent.service.hooks import HealthHook, MetricsHook
from agent.service.journal import Journal, JournalUnwritable
from agent.service.model import (
    ENDED_STATUSES,
    LIVE_STATUSES,
    SESSION_ID_RE,
    InFlight,
    Session,
    SessionRecord,
    new_session_id,
    readopted_session,
    session_from_row,
)
from agent.service.proofs import ProofWriter
from agent.service.receipts import Receipts, exec_result, exec_tag
from agent.service.spool import Spool, SpoolUnavailable
from agent.timefmt import iso_seconds

__all__ = ["ENDED_STATUSES", "SESSION_ID_RE", "Service", "new_session_id"]

_log = structlog.get_logger("nanorix-agent.sessions")  # lazy: resolved after log.setup()

UNLIMITED_EXEC_TIMEOUT = 365 * 24 * 3600.0  # an enterprise session with TTL 0


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
        self.sessions: dict[str, Session] = {}  # live and ended-since-start
        self.admission = Admission(cfg)
        self._reserved = self.admission.reserved  # sid -> (customer, tier) while creating
        self._nursery: trio.Nursery | None = None
        self._adopted: list[Session] = []  # waiting for run() to arm their watchers
        self.memory_capacity = self.admission.memory_capacity

    # -- lifetime ----------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery that watches every session's TTL/OOM, and prune the journal of
        ended sessions past their retention (hourly); runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for s in self._adopted:  # re-adopted before the nursery existed
                nursery.start_soon(self._watch, s)
            self._adopted.clear()
            task_status.started()
            while True:
                self.prune_journal()
                await trio.sleep(3600)

    def prune_journal(self) -> int:
        """Forget ended sessions older than node.journal_retention_seconds whose proof was
        acknowledged (their metadata, audit hashes and receipt public key)."""
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
        s = self.sessions.get(session_id)
        if s is not None:
            if customer_id is not None and customer_id != s.record.customer_id:
                raise NotFound(f"session {session_id} not found", field="session_id")
            return s, views.view(s)
        row = self.journal.get(session_id)
        if row is None or (customer_id is not None and customer_id != row["customer_id"]):
            raise NotFound(f"session {session_id} not found", field="session_id")
        return None, views.row_view(row)

    def get(self, session_id: str, customer_id: str | None = None) -> dict:
        return self._lookup(session_id, customer_id)[1]

    def list(self, customer_id: str | None = None) -> list[dict]:
        out = {}
        for row in self.journal.all(customer_id):
            out[row["session_id"]] = views.row_view(row)
        for s in self.sessions.values():
            if customer_id is None or s.record.customer_id == customer_id:
                out[s.session_id] = views.view(s)
        return sorted(out.values(), key=lambda v: (v["created_at"], v["session_id"]))

    # E's Service protocol -------------------------------------------------------------
    def list_sessions(self) -> builtins.list[dict]:
        return [views.meta(s) for s in self.sessions.values()]

    def get_meta(self, session_id: str) -> dict | None:
        s = self.sessions.get(session_id)
        if s is not None:
            return views.meta(s)
        row = self.journal.get(session_id)
        return views.row_meta(row) if row is not None else None

    def capacity(self) -> dict:
        return self.admission.capacity(self.live())

    def receipt_key(self, key_id: str) -> dict | None:
        """Public record of a session receipt key (live or destroyed session)."""
        for s in self.sessions.values():
            for k in (s.receipt_key, *s.previous_receipt_keys):
                if k.get("key_id") == key_id:
                    return dict(k)
        row = self.journal.by_receipt_key(key_id)
        if row is None or not row.get("receipt_public_key"):
            return None
        return {"key_id": key_id, "algorithm": "Ed25519",
                "public_key": row["receipt_public_key"], "created_at": row["created_at"]}

    # -- create ----------------------------------------------------------------------
    def resolve_ttl(self, tier: str, ttl: int | None) -> int:
        return self.admission.resolve_ttl(tier, ttl)

    async def create(self, *, customer_id: str, tier: str, data_classification: str = "general",
                     jurisdiction: str = "US", ttl_seconds: int | None = None,
                     session_id: str | None = None) -> dict:
        if tier not in self.config.tiers:
            raise BadRequest(f"tier must be one of {', '.join(self.config.tiers)}", field="tier")
        ttl = self.resolve_ttl(tier, ttl_seconds)
        if session_id is None:
            session_id = new_session_id()
            while session_id in self.sessions or self.journal.get(session_id):
                session_id = new_session_id()
        elif not SESSION_ID_RE.match(session_id):
            raise BadRequest("session_id must be sess_ + 16 lowercase hex", field="session_id")
        elif (session_id in self.sessions or session_id in self._reserved
              or self.journal.get(session_id) is not None):
            raise Conflict(f"session {session_id} already exists", field="session_id")
        if not self.journal.writable:
            raise Unavailable(f"the state directory cannot be written "
                              f"({self.journal.last_error}); new sessions are refused until "
                              f"it can")
        self.admission.admit(session_id, customer_id, tier, self.live(), self.draining)
        t0 = time.monotonic()
        try:
            with trio.CancelScope(shield=True):
                s = await self._create(session_id, customer_id, tier, data_classification,
                                       jurisdiction, ttl)
        finally:
            self._reserved.pop(session_id, None)
        self._inc("creates_total")
        self._observe("create_seconds", time.monotonic() - t0)
        return {"session_id": s.session_id, "status": s.status, "ttl_seconds": s.ttl_seconds,
                "created_at": s.record.created_at,
                "receipt_key": {"key_id": s.receipt_key["key_id"],
                                "public_key": s.receipt_key["public_key"]}}

    async def _create(self, session_id: str, customer_id: str, tier: str,
                      classification: str, jurisdiction: str, ttl: int) -> Session:
        now = time.time()
        start = trio.current_time()  # the TTL runs from created_at, not from sandbox ready
        created_at = iso_seconds(now)
        # the proof's space and inode first: a session that could not be proven never starts
        try:
            await trio.to_thread.run_sync(self.spool.reserve, session_id, {
                "customer_id": customer_id, "tier": tier, "classification": classification,
                "jurisdiction": jurisdiction, "created_at": created_at, "ttl_seconds": ttl})
        except SpoolUnavailable as e:
            _log.error("spool_reservation_failed", session_id=session_id, error=str(e))
            self._health_fault("rzl", str(e))
            raise Unavailable(f"{e}; new sessions are refused until the state directory "
                              f"has room") from None
        key = SessionKey.generate(session_id)
        try:
            sandbox = await self.engine.create(session_id, tier=tier,
                                               classification=classification)
        except SlotsExhausted:  # e.g. a health canary holds a slot
            self.spool.release(session_id)
            key.zeroize()
            raise Unavailable("node is at capacity (no free uid slot)") from None
        except Exception as e:
            self.spool.release(session_id)
            key.zeroize()
            self._health_fault("eee", f"sandbox creation failed ({type(e).__name__}: {e})")
            _log.exception("sandbox_create_failed", session_id=session_id)
            raise InternalError(f"sandbox creation failed ({type(e).__name__})") from None
        record = SessionRecord(session_id=session_id, customer_id=customer_id, tier=tier,
                               classification=classification, jurisdiction=jurisdiction,
                               created_at=created_at)
        deadline = start + ttl if ttl else math.inf  # from the exact creation time
        s = Session(record=record, ttl_seconds=ttl, created_ts=now, deadline=deadline,
                    sandbox=sandbox, session_key=key, receipt_key=key.public_record(created_at))
        self.sessions[session_id] = s
        try:
            self.journal.insert_session(
                session_id=session_id, customer_id=customer_id, tier=tier,
                classification=classification, jurisdiction=jurisdiction,
                created_at=created_at, ttl_seconds=ttl, status="active",
                hostname=sandbox.hostname, slot=sandbox.slot, host_uid=sandbox.host_uid,
                init_pid=sandbox.init_pid, init_starttime=sandbox.init_starttime,
                cgroup_paths=[str(p) for p in sandbox.cgroup.paths],
                mount_path=str(sandbox.root_mount_path),
                namespaces=dict(sandbox.namespaces),
                receipt_key_id=key.key_id, receipt_public_key=s.receipt_key["public_key"])
            self.audit.created(record, ttl)
        except Exception as e:
            # nothing half-made survives: run the real destruction on what exists
            _log.exception("session_journal_failed", session_id=session_id)
            await self.end(s, "operator")
            if isinstance(e, JournalUnwritable):
                raise Unavailable(f"{e}; new sessions are refused until it can") from None
            raise InternalError("could not record the session") from None
        self._arm(s)
        _log.info("session_created", session_id=session_id, tier=tier,
                  classification=classification, ttl_seconds=ttl)
        return s

    # -- TTL and OOM watch -----------------------------------------------------------------
    def _arm(self, s: Session) -> None:
        assert self._nursery is not None, "Service.run() is not running"
        self._nursery.start_soon(self._watch, s)

    async def _watch(self, s: Session) -> None:
        """End the session at its TTL (reason ttl_expired), when its memory cgroup ran out
        of memory (reason oom; the sandbox is then frozen at its cap, nothing freed) or when
        its nrx-init died on its own (reason sandbox_failed: its pidfd turned readable)."""
        assert s.sandbox is not None
        sb, sc = s.sandbox, self.config.sandbox
        ended: list[str] = []

        async def on_oom(scope: trio.CancelScope) -> None:
            await sb.watch_oom(guard=sc.oom_guard, headroom=sc.oom_headroom_bytes)
            ended.append("oom")
            scope.cancel()

        async def on_init_exit(scope: trio.CancelScope) -> None:
            fd = os.dup(sb.pidfd)  # our own fd: kill_init waits on the original
            try:
                await trio.lowlevel.wait_readable(fd)
            finally:
                os.close(fd)
            ended.append("sandbox_failed")
            scope.cancel()

        reason = None
        with trio.CancelScope() as s.watch_scope:
            with trio.move_on_at(s.deadline) as ttl_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(on_oom, nursery.cancel_scope)
                    nursery.start_soon(on_init_exit, nursery.cancel_scope)
            if ttl_scope.cancelled_caught:
                reason = "ttl_expired"
            elif ended:
                reason = ended[0]
        if reason is None or s.ending:
            return
        if reason == "sandbox_failed":
            _log.error("sandbox_init_died", session_id=s.session_id)
        if reason == "oom":
            self._inc("oom_kills_total")
            assert self._nursery is not None
            self._nursery.start_soon(self._oom_fallback, s)
        await self._end_quiet(s, reason)

    async def _oom_fallback(self, s: Session) -> None:
        """Bounded time for a session stalled at its cap: if its destruction has not begun
        within sandbox.oom_fallback_seconds, the kernel OOM killer takes over."""
        sb = s.sandbox
        with trio.move_on_after(self.config.sandbox.oom_fallback_seconds):
            await s.done.wait()
            return
        if sb is not None and not sb.ending:
            try:
                sb.fall_back_to_kernel_oom()
            except Exception:
                _log.exception("oom_fallback_failed", session_id=s.session_id)

    # -- exec ----------------------------------------------------------------------------
    async def exec(self, session_id: str, command: str, *, input_data: bytes | None = None,
                   timeout: float | None = None, env: dict[str, str] | None = None,
                   on_output=None, customer_id: str | None = None) -> dict:
        s, _ = self._lookup(session_id, customer_id)
        if s is None or s.ending or s.status in ENDED_STATUSES:
            status = s.status if s is not None else (self.journal.get(session_id) or {}).get(
                "status")
            raise Conflict(f"session {session_id} has ended ({status})", field="session_id")
        if s.status == "executing":
            raise Conflict(f"session {session_id} is already executing a command",
                           field="session_id")
        assert s.sandbox is not None
        remaining = s.deadline - trio.current_time()
        if remaining <= 0:
            raise Conflict(f"session {session_id} is expiring", field="session_id")
        limit = remaining if math.isfinite(remaining) else UNLIMITED_EXEC_TIMEOUT
        timeout = limit if timeout is None else min(float(timeout), limit)
        s.status = "executing"
        self.journal.update_session(session_id, status="executing")
        t0 = time.monotonic()
        inflight = InFlight(command=command, input_data=input_data,
                            progress=ExecProgress(tag=exec_tag(command, input_data)))
        s.inflight = inflight
        try:
            res = None
            try:
                with trio.CancelScope() as scope:
                    s.exec_scope = scope
                    res = await s.sandbox.exec(command, input_data=input_data, env=env,
                                               timeout=timeout, on_output=on_output,
                                               progress=inflight.progress)
            except ExecBusy:
                raise Conflict(f"session {session_id} is already executing a command",
                               field="session_id") from None
            except Exception:
                if not s.ending:
                    raise
            finally:
                s.exec_scope = None
            if s.ending:
                # the session ended under the exec (TTL, OOM, operator): end() gives it a
                # receipt marked interrupted before destruction begins.  The exec may have
                # returned (e.g. its own timeout, at the TTL) while that close-out still
                # runs: wait for it rather than race it.
                with trio.move_on_after(self.config.timeouts.close_out_seconds):
                    await inflight.closed.wait()
                if inflight.result is None:
                    raise Conflict(f"session {session_id} ended during the exec "
                                   f"({s.reason})", field="session_id")
                res, receipt = inflight.result
            else:
                assert res is not None
                receipt = self.receipts.sign(s, command, input_data, res)
        finally:
            if s.inflight is inflight:
                s.inflight = None
            if not s.ending and s.status == "executing":
                s.status = "active"
                self.journal.update_session(session_id, status="active",
                                            exec_count=s.record.exec_count)
        self._inc("execs_total")
        self._observe("exec_seconds", time.monotonic() - t0)
        return exec_result(res, receipt)

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
            s.result = await self._end(s, reason)
            return s.result
        finally:
            if s.exec_scope is not None:
                s.exec_scope.cancel()
            s.sandbox = None
            s.session_key = None
            s.done.set()
            self._observe("destroy_seconds", time.monotonic() - t0)

    def _passes(self, classification: str) -> builtins.list[str]:
        cls = self.config.classes.get(classification) or self.config.classes["general"]
        return list(cls.wipe_passes)

    async def _end(self, s: Session, reason: str) -> dict:
        sid = s.session_id
        await self.receipts.close_out(s, reason)
        self.audit.destroy_requested(s.record, reason)

        def revoke() -> None:
            s.ending = True

        ctx = DestroyContext(
            sandbox=s.sandbox, session=s.record, session_key=s.session_key,
            passes=self._passes(s.record.classification), reason=reason,
            node_id=self.config.node.node_id, agent_version=self.version, revoke=revoke)
        try:
            outcome = await run_pipeline(ctx)
        except Exception:
            _log.exception("destroy_pipeline_crashed", session_id=sid, reason=reason)
            self._health_fault("eee", f"the destruction pipeline of {sid} crashed")
            s.status = "expired_unclean"
            self.journal.update_session(sid, status=s.status, reason=reason)
            if s.sandbox is not None:
                with trio.move_on_after(10):
                    await s.sandbox.teardown()
            self._inc("destroys_total", reason=reason, status=s.status)
            raise InternalError("the destruction pipeline failed") from None
        failed = [str(n) for n, ev in enumerate(outcome.evidence, start=1)
                  if ev.get("ok") is not True]
        for step in failed:
            self._inc("destroy_step_failures_total", step=step)
        if failed and ctx.sandbox is not None:  # a live sandbox not destroyed cleanly
            self._health_fault("eee", f"destruction of {sid} could not verify step(s) "
                                      f"{', '.join(failed)}")
        # the live view and the journal turn to the end status only once the proof is
        # spooled: a control plane that sees `expired` (TTL, OOM) and calls proof.get must
        # find the proof, and a crash in between leaves a live journal row whose spooled
        # proof recovery adopts (recover_row) instead of a proof lost for good
        try:
            result = await self.proofs.write(s.record, outcome)
        except Exception:
            s.status = outcome.status
            _log.exception("proof_failed", session_id=sid, reason=reason)
            self._inc("destroys_total", reason=reason, status=s.status)
            raise InternalError("the session was destroyed but its proof could not be "
                                "built or spooled") from None
        finally:
            self.journal.update_session(sid, status=outcome.status, reason=reason,
                                        exec_count=s.record.exec_count)
            s.status = outcome.status
        self._inc("destroys_total", reason=reason, status=s.status)
        _log.info("session_destroyed", session_id=sid, reason=reason, status=s.status)
        return result

    # -- recovery (ops.recovery calls this per journaled live session) ---------------------
    async def adopt_row(self, row: dict) -> bool:
        """Re-adopt a journaled live session whose sandbox outlived the agent (issue 12):
        the same sandbox, verified (engine.adopt), becomes an active session again with
        a fresh receipt key (the old one lived only in the dead agent's locked memory),
        its TTL and OOM watch re-armed (a TTL that passed while the agent was down ends
        it at once, ttl_expired); an exec the crash cut off gets its receipt
        (`interrupted: agent_restart`).  False when there is nothing to adopt (the caller
        then reclaims and proves it, agent_recovery).  The journal row stays live
        throughout, so a crash at any point here leaves it to the next start: adopted or
        proven, never both and never neither."""
        sid = row["session_id"]
        if self.spool.get(sid) is not None:
            return False  # destroyed before the crash: recover_row adopts its proof
        try:
            sb = await self.engine.adopt(row)
        except AdoptFailed as e:
            _log.info("session_not_adoptable", session_id=sid, why=str(e))
            return False
        fault_point("adopt.attached")
        s = readopted_session(row, self.journal.events(sid), sb)
        key = s.session_key
        assert key is not None
        self.sessions[sid] = s
        try:
            if sb.interrupted is not None:
                self.receipts.close_out_crashed(s, *sb.interrupted)
            await sb.confirm_adopted()
            fault_point("adopt.confirmed")
            self.journal.update_session(sid, status="active", exec_count=s.record.exec_count,
                                        receipt_key_id=key.key_id,
                                        receipt_public_key=s.receipt_key["public_key"])
        except Exception:
            _log.exception("session_adopt_journal_failed", session_id=sid)
            await self.end(s, "agent_recovery")
            return True
        fault_point("adopt.journaled")
        if self._nursery is not None:
            self._arm(s)
        else:
            self._adopted.append(s)
        self._inc("sessions_adopted_total")
        _log.info("session_adopted", session_id=sid, exec_count=s.record.exec_count)
        return True

    async def recover_row(self, row: dict, reason: str = "agent_recovery") -> str:
        """End a session found in the journal after a crash through the same end() as a
        live one (no sandbox left to hand it), and return the final status.  A session
        whose proof was already spooled (the agent died between spool and journal) is
        not destroyed twice: its proof is adopted."""
        sid = row["session_id"]
        stored = self.spool.get(sid)
        if stored is not None:
            status = stored.get("status", "expired_unclean")
            self.journal.update_session(sid, status=status, reason=stored.get("reason", reason))
            return status
        s = session_from_row(row, self.journal.events(sid))
        await self.end(s, reason)
        return s.status
