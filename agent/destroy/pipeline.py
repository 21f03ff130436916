"""The destruction pipeline (SPEC 5): the eight steps in order, one module each.

Each step module has `METHOD` and `async run(ctx, state, evidence)`, which fills the
evidence dict in place with what it measured and raises StepError (a short fixed reason)
when it could not do or verify its work; step 8 also has `base_fields(ctx, state)` for
its identity fields, which must be present even when it fails.  The pipeline
adds `step`, `ok`, `method`, `error` (on failure), `duration_us` and `completed_at`, seals
the chain hash h_i of each step as it ends (re-checked in step 7), awaits the test hooks,
and always runs every step: a failed step never stops the ones after it, so everything is
still killed and wiped.  Finally `sandbox.teardown()` runs (best effort, shielded from
cancellation); anything it still had to clean was already reported by step 6.
"""

from __future__ import annotations

import errno
import os
import time

import trio

from agent import log, timefmt
from agent.cdp import chain
from agent.cdp.canonical import canonical_json
from agent.cdp.document import destruction_state
from agent.destroy import (
    chain_integrity_seal,
    credential_incineration,
    environment_isolation,
    filesystem_destruction,
    key_zeroization,
    lifecycle_completion,
    merkle_zero_verification,
    multipass_overwrite,
    workers,
)
from agent.destroy.context import (
    REASONS,
    DestroyContext,
    DestroyOutcome,
    DestroyState,
    InjectedFault,
    StepError,
)

__all__ = ["MODULES", "reason_text", "run_pipeline", "run_steps"]

MODULES = (environment_isolation, filesystem_destruction, multipass_overwrite,
           key_zeroization, credential_incineration, merkle_zero_verification,
           chain_integrity_seal, lifecycle_completion)


def reason_text(e: BaseException) -> str:
    """A short error for evidence: our own fixed text, or the exception type (+ errno
    name); never str() of a foreign exception, which may carry a path or data."""
    if isinstance(e, StepError):
        return str(e)[:200]
    if isinstance(e, OSError) and e.errno is not None and e.errno in errno.errorcode:
        return f"{type(e).__name__} {errno.errorcode[e.errno]}"
    return type(e).__name__


async def run_pipeline(ctx: DestroyContext) -> DestroyOutcome:
    """Run steps 1–8 for one session; returns the evidence and the final status.  With a
    destroy worker pool (agent/destroy/workers.py, `[destroy] workers`) the steps run in a
    worker process; the teardown and the outcome are always the daemon's."""
    if ctx.reason not in REASONS:
        raise ValueError(f"unknown destroy reason {ctx.reason!r}")
    t_start = time.perf_counter_ns()
    logger = log.get().bind(session_id=ctx.session.session_id, reason=ctx.reason)
    hook_error: BaseException | None = None
    try:
        st = None
        pool = workers.current()
        if pool is not None and _may_leave_process(ctx):
            st = await pool.run_steps(ctx)  # None: no worker free, run here
        if st is None:
            st, hook_error = await run_steps(ctx)
    finally:
        teardown_ok = await _teardown(ctx, logger)
    ev8 = st.evidence[7]
    status = str(ev8.get("status")) if ev8.get("ok") else "expired_unclean"
    out = DestroyOutcome(
        session_id=ctx.session.session_id, created_at=ctx.session.created_at,
        destroyed_at=st.destroyed_at, reason=ctx.reason, status=status,
        destruction_state=destruction_state(st.evidence), evidence=st.evidence,
        teardown_ok=teardown_ok, duration_us=(time.perf_counter_ns() - t_start) // 1000,
        evidence_json=(st.evidence_json if len(st.evidence_json) == len(st.evidence)
                       else None))
    # a warm-pool sandbox never had a session key, so step 4 fails and its status is
    # expired_unclean by design; pool.py judges the other steps and logs an error for them
    expected = out.status != "expired_unclean" or ctx.reason == "pool_retired"
    (logger.info if expected else logger.error)(
        "destroy.done", status=out.status, destruction_state=out.destruction_state,
        teardown_ok=teardown_ok, duration_ms=out.duration_us // 1000,
        duration_us=out.duration_us)
    if hook_error is not None:
        raise hook_error
    return out


def _may_leave_process(ctx: DestroyContext) -> bool:
    """Test hooks that are callables run where the test is (in the daemon); a destruction
    without a sandbox has no kernel work to move."""
    hooks = ctx.hooks
    return ctx.sandbox is not None and (
        hooks is None or (hooks.after_step is None and hooks.before_kill is None))


async def run_steps(ctx: DestroyContext) -> tuple[DestroyState, BaseException | None]:
    """Steps 1-8 in this process (the daemon, or a destroy worker): the state with the
    evidence, and the first error a test hook raised."""
    st = DestroyState(destroy_started=time.time())
    logger = log.get().bind(session_id=ctx.session.session_id, reason=ctx.reason)
    hooks = ctx.hooks
    hook_error: BaseException | None = None
    prev = chain.GENESIS
    try:
        for (n, subsystem, operation), mod in zip(chain.STEPS, MODULES, strict=True):
            if n == 8:
                st.destroyed_at = timefmt.iso_seconds()
            ev: dict = {"step": n, "ok": True, "method": mod.METHOD}
            if n == 8:  # its identity fields are present even when the step fails
                ev.update(lifecycle_completion.base_fields(ctx, st))
            t0 = time.perf_counter_ns()
            try:
                if hooks is not None and hooks.fail_step == n:
                    raise InjectedFault("injected fault")
                if n == 4 and ctx.key_owner is not None:
                    await ctx.key_owner.key_step(ev)
                else:
                    await mod.run(ctx, st, ev)
            except Exception as e:
                ev["ok"] = False
                ev["error"] = reason_text(e)
            ev["duration_us"] = (time.perf_counter_ns() - t0) // 1000
            ev["completed_at"] = timefmt.iso_micro()
            st.evidence.append(ev)
            # serialised once: the CDP and AuditProof chains hash these same bytes
            st.evidence_json.append(canonical_json(ev))
            prev = chain.chain_step(prev, n, subsystem, operation,
                                    chain.hash_encoded(st.evidence_json[-1])[len(chain.PREFIX):])
            st.chain_at_step[n] = prev
            # a failed step is a warning (journald priority 4), never info
            (logger.info if ev["ok"] else logger.warning)(
                "destroy.step", step=n, operation=operation, ok=ev["ok"],
                error=ev.get("error"), duration_ms=ev["duration_us"] // 1000,
                duration_us=ev["duration_us"])
            if hooks is not None and hooks.after_step is not None:
                try:
                    await hooks.after_step(n, ev)
                except Exception as e:
                    hook_error = hook_error or e
    finally:
        merkle_zero_verification.release_pin(st)
        while st.deferred_fds:  # only left when step 3 could not run
            os.close(st.deferred_fds.pop())
    return st, hook_error


async def _teardown(ctx: DestroyContext, logger) -> bool:
    sb = ctx.sandbox
    if sb is None:
        return True
    with trio.CancelScope(shield=True):
        # A v1-frozen task does not die from SIGKILL until thawed: whatever a failed step
        # left frozen is killed and thawed here, or the kill of PID 1 would wait forever.
        try:
            if not sb.cgroup.empty():
                sb.cgroup.kill_all()
        except Exception as e:
            logger.warning("destroy.teardown_kill_failed", error=reason_text(e))
        with trio.move_on_after(max(ctx.timeout, 1.0) * 2) as cs:
            try:
                await sb.teardown()
            except Exception as e:
                logger.warning("destroy.teardown_failed", error=reason_text(e))
                return False
        if cs.cancelled_caught:
            logger.warning("destroy.teardown_failed", error="timeout")
            return False
    return True
