"""Admission (SPEC 2, 8): whether a new session fits this node — node capacity (sessions
and committed memory; `Unavailable` when full or draining) and the customer's concurrency
for the tier (`RateLimited`) — and the TTL it gets (clamped to the tier maximum, or refused
with `node.ttl_policy = "refuse"`)."""

from __future__ import annotations

from collections.abc import Callable

from agent.config import Config
from agent.errors import BadRequest, RateLimited, Unavailable
from agent.service.model import Session

__all__ = ["Admission", "mem_total"]


def mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Admission:
    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.memory_capacity = cfg.node.memory_capacity_bytes or int(mem_total() * 0.8)
        self.reserved: dict[str, tuple[str, str]] = {}  # sid -> (customer, tier) while creating
        # the tier of every warm-pool member (issue 18): they count against capacity
        self.pooled: Callable[[], list[str]] = list
        self.pool_by_tier: Callable[[], dict[str, int]] = dict

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

    def capacity(self, live: list[Session]) -> dict:
        tiers = self.config.tiers
        committed = sum(tiers[s.record.tier].memory_bytes for s in live)
        committed += sum(tiers[t].memory_bytes for _, t in self.reserved.values())
        pooled = self.pooled()
        committed += sum(tiers[t].memory_bytes for t in pooled)
        return {"sessions_live": len(live) + len(self.reserved),
                "sessions_max": self.config.node.max_sessions,
                "memory_committed_bytes": committed,
                "memory_capacity_bytes": self.memory_capacity,
                "pool_members": len(pooled), "pool_by_tier": self.pool_by_tier()}

    def admit(self, session_id: str, customer_id: str, tier: str, live: list[Session],
              draining: bool) -> None:
        """Reserve room for the session, or raise why it does not fit."""
        if draining:
            raise Unavailable("node is draining")
        cap = self.capacity(live)
        if cap["sessions_live"] + cap["pool_members"] >= cap["sessions_max"]:
            raise Unavailable("node is at session capacity")
        need = self.config.tiers[tier].memory_bytes
        if cap["memory_committed_bytes"] + need > cap["memory_capacity_bytes"]:
            raise Unavailable("node is at memory capacity")
        limit = self.config.tiers[tier].max_concurrent
        if limit:
            mine = sum(1 for s in live if s.record.customer_id == customer_id)
            mine += sum(1 for c, _ in self.reserved.values() if c == customer_id)
            if mine >= limit:
                raise RateLimited(f"customer has {mine} live sessions on this node; tier {tier} "
                                  f"allows {limit}")
        self.reserved[session_id] = (customer_id, tier)
