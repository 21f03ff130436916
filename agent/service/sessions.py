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

import hashlib
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from agent.cdp.canonical import canonical_json
from agent.config import Config
from agent.destroy.context import SessionRecord
from agent.errors import BadRequest, Conflict, InternalError, NotFound, RateLimited, Unavailable
from agent.service.journal import LIVE_STATUSES, Journal
from agent.service.spool import Spool
from agent.timefmt import iso_seconds, parse_iso

__all__ = ["ENDED_STATUSES", "SESSION_ID_RE", "Service", "new_session_id"]

_log = structlog.get_logger("nanorix-agent.sessions")  # lazy: resolved after log.setup()

SESSION_ID_RE = re.compile(r"^sess_[0-9a-f]{16}$")
ENDED_STATUSES = ("destroyed", "expired", "expired_unclean")
UNLIMITED_EXEC_TIMEOUT = 365 * 24 * 3600.0  # an enterprise session with TTL 0


def new_session_id() -> str:
    return "sess_" + secrets.token_hex(8)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class _Live:
    """Runtime state of one session (the metadata lives in `record`)."""

    record: SessionRecord
    ttl_seconds: int
    created_ts: float  # wall clock
    deadline: float  # trio clock; inf = no TTL
    status: str = "active"
    sandbox: Any = None
    session_key: Any = None
    receipt_key: dict = field(default_factory=dict)
    ending: bool = False
    reason: str | None = None
    exec_scope: trio.CancelScope | None = None
    watch_scope: trio.CancelScope | None = None
    done: trio.Event = field(default_factory=trio.Event)
    result: dict | None = None

    @property
    def session_id(self) -> str:
        return self.record.session_id

    @property
    def expires_at(self) -> str | None:
        return iso_seconds(self.created_ts + self.ttl_seconds) if self.ttl_seconds else None


class Service:
    """Owns every session of this node.  Also the object the ops modules (health, debug
    socket, metrics, recovery) are given: see docs/design.md "E: daemon hooks"."""

    def __init__(self, cfg: Config, *, engine, key_store, journal: Journal, spool: Spool,
                 version: str, metrics=None) -> None:
        self.config = cfg
        self.engine = engine
        self.key_store = key_store
        self.journal = journal
        self.spool = spool
        self.version = version
        self.metrics = metrics
        self.health = None
        self.draining = False
        self.started_at = time.monotonic()
        self.sessions: dict[str, _Live] = {}  # live and ended-since-start
        self._reserved: dict[str, tuple[str, str]] = {}  # sid -> (customer, tier) while creating
        self._nursery: trio.Nursery | None = None
        cap = cfg.node.memory_capacity_bytes
        self.memory_capacity = cap or int(_mem_total() * 0.8)

    # -- lifetime ----------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery that watches every session's TTL/OOM, and prune the journal of
        ended sessions past their retention (hourly); runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                self.prune_journal()
                await trio.sleep(3600)

    def prune_journal(self) -> int:
        """Forget ended sessions older than node.journal_retention_seconds whose proof was
        acknowledged (their metadata, audit hashes and receipt public key)."""
        before = iso_seconds(time.time() - self.config.node.journal_retention_seconds)
        keep = {p.get("session_id") for p in self.spool.pending()}
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
                    nursery.start_soon(self._destroy_quiet, s, reason)
            for s in list(self.sessions.values()):
                if s.ending:
                    await s.done.wait()
            if not self._reserved and not any(
                    not s.ending and s.status in LIVE_STATUSES for s in self.sessions.values()):
                return
            await trio.sleep(0.01)

    async def _destroy_quiet(self, s: _Live, reason: str) -> None:
        try:
            await self._destroy(s, reason)
        except Exception:
            _log.exception("destroy_failed", session_id=s.session_id, reason=reason)

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
    def live(self) -> list[_Live]:
        return [s for s in self.sessions.values() if s.status in LIVE_STATUSES]

    def _view(self, s: _Live) -> dict:
        return {"session_id": s.session_id, "status": s.status, "ttl_seconds": s.ttl_seconds,
                "created_at": s.record.created_at,
                "data_classification": s.record.classification, "expires_at": s.expires_at}

    @staticmethod
    def _row_view(row: dict) -> dict:
        ttl = row["ttl_seconds"]
        expires = iso_seconds(parse_iso(row["created_at"]) + ttl) if ttl else None
        return {"session_id": row["session_id"], "status": row["status"], "ttl_seconds": ttl,
                "created_at": row["created_at"], "data_classification": row["classification"],
                "expires_at": expires}

    def _lookup(self, session_id: str, customer_id: str | None) -> tuple[_Live | None, dict]:
        """(live record or None, public view); NotFound for unknown or foreign sessions."""
        s = self.sessions.get(session_id)
        if s is not None:
            if customer_id is not None and customer_id != s.record.customer_id:
                raise NotFound(f"session {session_id} not found", field="session_id")
            return s, self._view(s)
        row = self.journal.get(session_id)
        if row is None or (customer_id is not None and customer_id != row["customer_id"]):
            raise NotFound(f"session {session_id} not found", field="session_id")
        return None, self._row_view(row)

    def get(self, session_id: str, customer_id: str | None = None) -> dict:
        return self._lookup(session_id, customer_id)[1]

    def list(self, customer_id: str | None = None) -> list[dict]:
        out = {}
        for row in self.journal.all(customer_id):
            out[row["session_id"]] = self._row_view(row)
        for s in self.sessions.values():
            if customer_id is None or s.record.customer_id == customer_id:
                out[s.session_id] = self._view(s)
        return sorted(out.values(), key=lambda v: (v["created_at"], v["session_id"]))

    # E's Service protocol -------------------------------------------------------------
    def list_sessions(self) -> list[dict]:
        return [self._meta(s) for s in self.sessions.values()]

    def get_meta(self, session_id: str) -> dict | None:
        s = self.sessions.get(session_id)
        if s is not None:
            return self._meta(s)
        row = self.journal.get(session_id)
        if row is None:
            return None
        return {**self._row_view(row), "customer_id": row["customer_id"], "tier": row["tier"],
                "jurisdiction": row["jurisdiction"], "exec_count": row["exec_count"],
                "reason": row.get("reason")}

    def _meta(self, s: _Live) -> dict:
        return {**self._view(s), "customer_id": s.record.customer_id, "tier": s.record.tier,
                "jurisdiction": s.record.jurisdiction, "exec_count": s.record.exec_count,
                "reason": s.reason}

    def capacity(self) -> dict:
        live = self.live()
        committed = sum(self.config.tiers[s.record.tier].memory_bytes for s in live)
        committed += sum(self.config.tiers[t].memory_bytes for _, t in self._reserved.values())
        return {"sessions_live": len(live) + len(self._reserved),
                "sessions_max": self.config.node.max_sessions,
                "memory_committed_bytes": committed,
                "memory_capacity_bytes": self.memory_capacity}

    def receipt_key(self, key_id: str) -> dict | None:
        """Public record of a session receipt key (live or destroyed session)."""
        for s in self.sessions.values():
            if s.receipt_key.get("key_id") == key_id:
                return dict(s.receipt_key)
        row = self.journal.by_receipt_key(key_id)
        if row is None or not row.get("receipt_public_key"):
            return None
        return {"key_id": key_id, "algorithm": "Ed25519",
                "public_key": row["receipt_public_key"], "created_at": row["created_at"]}

    # -- create ----------------------------------------------------------------------
    def resolve_ttl(self, tier: str, ttl: int | None) -> int:
        t = self.config.tiers[tier]
        if ttl is None:
            ttl = t.default_ttl_seconds
            if t.max_ttl_seconds:
                ttl = min(ttl, t.max_ttl_seconds)
            return ttl
        if t.max_ttl_seconds and (ttl == 0 or ttl > t.max_ttl_seconds):
            if self.config.node.ttl_policy == "refuse":
                raise BadRequest(f"ttl_seconds must be between 1 and {t.max_ttl_seconds} for "
                                 f"tier {tier}", field="ttl_seconds")
            return t.max_ttl_seconds
        return ttl

    def _admit(self, session_id: str, customer_id: str, tier: str) -> None:
        if self.draining:
            raise Unavailable("node is draining")
        cap = self.capacity()
        if cap["sessions_live"] >= cap["sessions_max"]:
            raise Unavailable("node is at session capacity")
        need = self.config.tiers[tier].memory_bytes
        if cap["memory_committed_bytes"] + need > cap["memory_capacity_bytes"]:
            raise Unavailable("node is at memory capacity")
        limit = self.config.tiers[tier].max_concurrent
        if limit:
            mine = sum(1 for s in self.live() if s.record.customer_id == customer_id)
            mine += sum(1 for c, _ in self._reserved.values() if c == customer_id)
            if mine >= limit:
                raise RateLimited(f"customer has {mine} live sessions on this node; tier {tier} "
                                  f"allows {limit}")
        self._reserved[session_id] = (customer_id, tier)

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
        self._admit(session_id, customer_id, tier)
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

    async def _create(self, session_id, customer_id, tier, classification, jurisdiction,
                      ttl) -> _Live:
        from agent.keys.session import SessionKey

        now = time.time()
        start = trio.current_time()  # the TTL runs from created_at, not from sandbox ready
        created_at = iso_seconds(now)
        key = SessionKey.generate(session_id)
        try:
            sandbox = await self.engine.create(session_id, tier=tier,
                                               classification=classification)
        except Exception as e:
            key.zeroize()
            if type(e).__name__ == "SlotsExhausted":  # e.g. a health canary holds a slot
                raise Unavailable("node is at capacity (no free uid slot)") from None
            _log.exception("sandbox_create_failed", session_id=session_id)
            raise InternalError(f"sandbox creation failed ({type(e).__name__})") from None
        record = SessionRecord(session_id=session_id, customer_id=customer_id, tier=tier,
                               classification=classification, jurisdiction=jurisdiction,
                               created_at=created_at)
        deadline = start + ttl if ttl else math.inf  # from the exact creation time
        s = _Live(record=record, ttl_seconds=ttl, created_ts=now, deadline=deadline,
                  sandbox=sandbox, session_key=key, receipt_key=key.public_record(created_at))
        self.sessions[session_id] = s
        try:
            cg = getattr(sandbox, "cgroup", None)
            self.journal.insert_session(
                session_id=session_id, customer_id=customer_id, tier=tier,
                classification=classification, jurisdiction=jurisdiction,
                created_at=created_at, ttl_seconds=ttl, status="active",
                hostname=getattr(sandbox, "hostname", None), slot=getattr(sandbox, "slot", None),
                host_uid=getattr(sandbox, "host_uid", None),
                init_pid=getattr(sandbox, "init_pid", None),
                init_starttime=getattr(sandbox, "init_starttime", None),
                cgroup_paths=[str(p) for p in getattr(cg, "paths", [])],
                mount_path=str(getattr(sandbox, "root_mount_path", "") or ""),
                namespaces=dict(getattr(sandbox, "namespaces", {}) or {}),
                receipt_key_id=key.key_id, receipt_public_key=s.receipt_key["public_key"])
            self._event(s, "created", canonical_json(
                {"kind": "created", "session_id": session_id, "created_at": created_at,
                 "tier": tier, "data_classification": classification,
                 "jurisdiction": jurisdiction, "ttl_seconds": ttl}))
        except Exception:
            # nothing half-made survives: run the real destruction on what exists
            _log.exception("session_journal_failed", session_id=session_id)
            await self._destroy(s, "operator")
            raise InternalError("could not record the session") from None
        assert self._nursery is not None, "Service.run() is not running"
        self._nursery.start_soon(self._watch, s)
        _log.info("session_created", session_id=session_id, tier=tier,
                  classification=classification, ttl_seconds=ttl)
        return s

    def _event(self, s: _Live, kind: str, payload: bytes | None = None,
               hash_hex: str | None = None) -> None:
        seq = len(s.record.audit_events) + 1
        at = iso_seconds()
        h = hash_hex if hash_hex is not None else _sha256_hex(payload or b"")
        ev = {"seq": seq, "kind": kind, "hash": h, "at": at}
        s.record.audit_events.append(ev)
        self.journal.add_event(s.session_id, seq, kind, h, at)

    async def _watch(self, s: _Live) -> None:
        """Destroy the session at its TTL (reason ttl_expired) or on OOM (reason oom)."""
        reason = None
        with trio.CancelScope() as s.watch_scope:
            with trio.move_on_at(s.deadline) as ttl_scope:
                oom = getattr(s.sandbox, "oom", None)
                if oom is not None:
                    await oom.wait()
                    reason = "oom"
                else:
                    await trio.sleep_forever()
            if ttl_scope.cancelled_caught:
                reason = "ttl_expired"
        if reason is None or s.ending:
            return
        if reason == "oom":
            self._inc("oom_kills_total")
        await self._destroy_quiet(s, reason)

    # -- exec ----------------------------------------------------------------------------
    async def exec(self, session_id: str, command: str, *, input_data: bytes | None = None,
                   timeout: float | None = None, env: dict[str, str] | None = None,
                   on_output=None, customer_id: str | None = None) -> dict:
        s, _ = self._lookup(session_id, customer_id)
        if s is None or s.ending or s.status in ENDED_STATUSES:
            status = s.status if s is not None else self.journal.get(session_id)["status"]
            raise Conflict(f"session {session_id} has ended ({status})", field="session_id")
        if s.status == "executing":
            raise Conflict(f"session {session_id} is already executing a command",
                           field="session_id")
        remaining = s.deadline - trio.current_time()
        if remaining <= 0:
            raise Conflict(f"session {session_id} is expiring", field="session_id")
        limit = remaining if math.isfinite(remaining) else UNLIMITED_EXEC_TIMEOUT
        timeout = limit if timeout is None else min(float(timeout), limit)
        s.status = "executing"
        self.journal.update_session(session_id, status="executing")
        t0 = time.monotonic()
        try:
            from agent.sandbox.exec import ExecBusy as busy

            res = None
            try:
                with trio.CancelScope() as scope:
                    s.exec_scope = scope
                    res = await s.sandbox.exec(command, input_data=input_data, env=env,
                                               timeout=timeout, on_output=on_output)
            except busy:
                raise Conflict(f"session {session_id} is already executing a command",
                               field="session_id") from None
            except Exception:
                if s.ending:  # the sandbox was destroyed under the exec (TTL, OOM, operator)
                    raise Conflict(f"session {session_id} ended during the exec "
                                   f"({s.reason})", field="session_id") from None
                raise
            finally:
                s.exec_scope = None
            if s.ending or res is None:
                raise Conflict(f"session {session_id} ended during the exec ({s.reason})",
                               field="session_id")
            receipt = self._receipt(s, command, input_data, res)
        finally:
            if not s.ending and s.status == "executing":
                s.status = "active"
                self.journal.update_session(session_id, status="active",
                                            exec_count=s.record.exec_count)
        self._inc("execs_total")
        self._observe("exec_seconds", time.monotonic() - t0)
        return {"output": res.stdout, "stderr": res.stderr, "exit_code": res.exit_code,
                "timed_out": res.timed_out, "signal": res.signal, "oom_killed": res.oom_killed,
                "output_truncated": res.output_truncated,
                "stderr_truncated": res.stderr_truncated, "duration_ms": res.duration_ms,
                "receipt": receipt}

    def _receipt(self, s: _Live, command: str, input_data: bytes | None, res) -> dict:
        from agent.cdp.receipt import build_receipt, receipt_leaf

        seq = s.record.exec_count + 1
        receipt = build_receipt({
            "session_id": s.session_id, "seq": seq,
            "command_sha256": _sha256_hex(command.encode("utf-8")),
            "input_sha256": _sha256_hex(input_data or b""),
            "output_sha256": _sha256_hex(res.stdout), "stderr_sha256": _sha256_hex(res.stderr),
            "exit_code": res.exit_code, "timed_out": bool(res.timed_out),
            "started_at": res.started_at, "finished_at": res.finished_at,
        }, s.session_key)
        s.record.receipts.append(receipt)
        s.record.exec_count = seq
        self._event(s, "exec", hash_hex=receipt_leaf(receipt).hex())
        return receipt

    # -- destroy ---------------------------------------------------------------------
    async def destroy(self, session_id: str, reason: str = "requested", *,
                      customer_id: str | None = None) -> dict:
        s, view = self._lookup(session_id, customer_id)
        if s is None:
            stored = self.spool.get(session_id)
            if stored is not None:
                return stored
            raise Conflict(f"session {session_id} has ended ({view['status']}) and its proof "
                           f"was acknowledged", field="session_id")
        with trio.CancelScope(shield=True):
            return await self._destroy(s, reason)

    async def _destroy(self, s: _Live, reason: str) -> dict:
        if s.ending:
            await s.done.wait()
            if s.result is None:
                raise InternalError("destruction failed")
            return s.result
        s.ending = True
        s.reason = reason
        t0 = time.monotonic()
        if s.watch_scope is not None:
            s.watch_scope.cancel()
        try:
            s.result = await self._run_destroy(s, reason)
            return s.result
        finally:
            if s.exec_scope is not None:
                s.exec_scope.cancel()
            s.sandbox = None
            s.session_key = None
            s.done.set()
            self._observe("destroy_seconds", time.monotonic() - t0)

    async def _run_destroy(self, s: _Live, reason: str) -> dict:
        from agent.destroy.context import DestroyContext
        from agent.destroy.pipeline import run_pipeline

        sid = s.session_id
        self._event(s, "destroy_requested", canonical_json(
            {"kind": "destroy_requested", "session_id": sid, "reason": reason}))

        def revoke() -> None:
            s.ending = True

        ctx = DestroyContext(
            sandbox=s.sandbox, session=s.record, session_key=s.session_key,
            passes=list(self.config.classes[s.record.classification].wipe_passes),
            reason=reason, node_id=self.config.node.node_id, agent_version=self.version,
            revoke=revoke)
        try:
            outcome = await run_pipeline(ctx)
        except Exception:
            _log.exception("destroy_pipeline_crashed", session_id=sid, reason=reason)
            s.status = "expired_unclean"
            self.journal.update_session(sid, status=s.status, reason=reason)
            if s.sandbox is not None:
                with trio.move_on_after(10):
                    await s.sandbox.teardown()
            self._inc("destroys_total", reason=reason, status=s.status)
            raise InternalError("the destruction pipeline failed") from None
        for step, ev in enumerate(outcome.evidence, start=1):
            if isinstance(ev, dict) and ev.get("ok") is not True:
                self._inc("destroy_step_failures_total", step=str(step))
        # the live view and the journal turn to the end status only once the proof is
        # spooled: a control plane that sees `expired` (TTL, OOM) and calls proof.get must
        # find the proof, and a crash in between leaves a live journal row whose spooled
        # proof recovery adopts (recover_row) instead of a proof lost for good
        try:
            result = self.build_proof(session_id=sid, customer_id=s.record.customer_id,
                                      classification=s.record.classification,
                                      jurisdiction=s.record.jurisdiction, outcome=outcome,
                                      exec_count=s.record.exec_count)
            # still durable (fsynced) before destroy returns, but the fsyncs no longer
            # stall every other session on the event loop meanwhile
            await trio.to_thread.run_sync(self.spool.put, sid, result)
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

    def finish_proof(self, *, session_id: str, customer_id: str, classification: str,
                     jurisdiction: str, outcome, exec_count: int) -> dict:
        """Sign the v1.0 CDP and its 2.1 rendition, spool both durably, return the destroy
        result `{session_id, status, cdp, regulatory_context, session_context, auditproof}`."""
        result = self.build_proof(session_id=session_id, customer_id=customer_id,
                                  classification=classification, jurisdiction=jurisdiction,
                                  outcome=outcome, exec_count=exec_count)
        self.spool.put(session_id, result)
        return result

    def build_proof(self, *, session_id: str, customer_id: str, classification: str,
                    jurisdiction: str, outcome, exec_count: int) -> dict:
        """The destroy result finish_proof() spools, signed but not yet spooled."""
        from agent.cdp.auditproof import build_auditproof
        from agent.regulatory import regulatory_context

        signer = self.key_store.current()
        cdp = outcome.build_cdp(signer)
        auditproof = build_auditproof(
            signer=signer, customer_id=customer_id, jurisdiction=jurisdiction,
            authority_id=self.config.authority_id, signing_key_version=signer.generation,
            exec_count=exec_count, region=self.config.auditproof.region or None, cdp_v1=cdp)
        result = {"session_id": session_id, "status": outcome.status,
                  "reason": outcome.reason, "cdp": cdp,
                  "regulatory_context": regulatory_context(classification, jurisdiction),
                  "session_context": {"jurisdiction": jurisdiction,
                                      "data_classification": classification},
                  "auditproof": auditproof}
        return result

    # -- recovery (E calls this per journaled live session) ------------------------------
    async def recover_row(self, row: dict, reason: str = "agent_recovery") -> str:
        """Destroy a session found in the journal after a crash (no sandbox object left),
        spool its CDP and mark the row ended; returns the final status."""
        from agent.destroy.context import DestroyContext
        from agent.destroy.pipeline import run_pipeline

        sid = row["session_id"]
        stored = self.spool.get(sid)
        if stored is not None:
            # the agent died after spooling this session's proof but before the journal
            # said it ended: the session was destroyed; adopt its proof, do not redo it
            status = stored.get("status", "expired_unclean")
            self.journal.update_session(sid, status=status, reason=stored.get("reason", reason))
            return status
        events = self.journal.events(sid)
        record = SessionRecord(session_id=sid, customer_id=row["customer_id"], tier=row["tier"],
                               classification=row["classification"],
                               jurisdiction=row["jurisdiction"], created_at=row["created_at"],
                               audit_events=events, exec_count=row["exec_count"] or 0)
        seq = len(events) + 1
        ev = {"seq": seq, "kind": "destroy_requested",
              "hash": _sha256_hex(canonical_json({"kind": "destroy_requested",
                                                  "session_id": sid, "reason": reason})),
              "at": iso_seconds()}
        record.audit_events.append(ev)
        self.journal.add_event(sid, seq, ev["kind"], ev["hash"], ev["at"])
        ctx = DestroyContext(
            sandbox=None, session=record, session_key=None,
            passes=list(self.config.classes.get(row["classification"],
                                                self.config.classes["general"]).wipe_passes),
            reason=reason, node_id=self.config.node.node_id, agent_version=self.version,
            revoke=lambda: None)
        outcome = await run_pipeline(ctx)
        self.finish_proof(session_id=sid, customer_id=row["customer_id"],
                          classification=row["classification"],
                          jurisdiction=row["jurisdiction"], outcome=outcome,
                          exec_count=record.exec_count)
        self.journal.update_session(sid, status=outcome.status, reason=reason)
        self._inc("destroys_total", reason=reason, status=outcome.status)
        return outcome.status
