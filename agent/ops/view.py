"""The service as the ops modules (health, debug socket, metrics, notify) see it: the members
they read, as a structural type the type checker holds `agent.service.sessions.Service` to.
Every member is always there, so the ops read them directly (no getattr)."""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.config import Config
    from agent.keys.attestation import AttestationKeyStore
    from agent.sandbox.engine import SandboxEngine
    from agent.service.hooks import HealthHook, MetricsHook
    from agent.service.journal import Journal
    from agent.service.spool import Spool


class ServiceView(Protocol):
    config: Config
    engine: SandboxEngine
    journal: Journal
    spool: Spool
    key_store: AttestationKeyStore
    metrics: MetricsHook | None
    health: HealthHook | None
    draining: bool
    version: str
    started_at: float

    def capacity(self) -> dict: ...

    def list_sessions(self) -> builtins.list[dict]: ...

    def get_meta(self, session_id: str) -> dict | None: ...

    async def destroy(self, session_id: str, reason: str = "requested", *,
                      customer_id: str | None = None) -> dict: ...
