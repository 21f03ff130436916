"""Each live session's watcher (SPEC 3.5, 5): it ends the session at its TTL, when its
memory cgroup ran out of memory (the agent, not the kernel, handles OOM: the sandbox is
frozen at its cap and wiped before anything is freed) or when its nrx-init died on its
own.  Runs in the Service's nursery (`Service._arm`)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import structlog
import trio

from agent.service.model import Session

if TYPE_CHECKING:
    from agent.service.sessions import Service

__all__ = ["oom_fallback", "watch"]

_log = structlog.get_logger("nanorix-agent.sessions")


async def watch(svc: Service, s: Session) -> None:
    """End the session at its TTL (reason ttl_expired), when its memory cgroup ran out
    of memory (reason oom; the sandbox is then frozen at its cap, nothing freed) or when
    its nrx-init died on its own (reason sandbox_failed: its pidfd turned readable)."""
    assert s.sandbox is not None
    sb, sc = s.sandbox, svc.config.sandbox
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
        svc._inc("oom_kills_total")
        assert svc._nursery is not None
        svc._nursery.start_soon(oom_fallback, svc, s)
    await svc._end_quiet(s, reason)

async def oom_fallback(svc: Service, s: Session) -> None:
    """Bounded time for a session stalled at its cap: if its destruction has not begun
    within sandbox.oom_fallback_seconds, the kernel OOM killer takes over."""
    sb = s.sandbox
    with trio.move_on_after(svc.config.sandbox.oom_fallback_seconds):
        await s.done.wait()
        return
    if sb is not None and not sb.ending:
        try:
            sb.fall_back_to_kernel_oom()
        except Exception:
            _log.exception("oom_fallback_failed", session_id=s.session_id)
