"""What the service calls on the ops objects the daemon hands it (health monitor, metrics),
as structural types: the service never imports `agent.ops` (it sits below it), and the type
checker still proves `agent.ops.health.HealthMonitor` and `agent.ops.metrics.Metrics` fit."""

from __future__ import annotations

from typing import Protocol


class HealthHook(Protocol):
    """The health monitor (agent.ops.health.HealthMonitor) as the service and the ops see it."""

    engines: dict[str, bool]
    database: bool
    database_reason: str | None
    reasons: dict[str, str | None]

    @property
    def status(self) -> str: ...

    def fault(self, engine: str, reason: str) -> None: ...

    def snapshot(self) -> dict: ...

    def details(self) -> dict: ...

    async def run_once(self) -> dict: ...


class MetricsHook(Protocol):
    """The metrics registry (agent.ops.metrics.Metrics) as the service and the ops see it."""

    def inc(self, name: str, by: float = 1, **labels: object) -> None: ...

    def set(self, name: str, value: float, **labels: object) -> None: ...

    def observe(self, name: str, seconds: float, **labels: object) -> None: ...
