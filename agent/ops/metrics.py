"""Prometheus text-format metrics (SPEC 9 `metrics`), without a runtime dependency.

Counters and histograms are recorded by the daemon (`inc`, `observe`); gauges that describe the
current state (sessions by status, spool depth, key age, capacity, health) are read from the
service when `render(service)` runs, so they cannot go stale.  Names are declared once in
`METRICS`; an undeclared name raises KeyError so a typo cannot silently make a new series.
Labels never carry customer data (only status, reason, step, engine, kind values).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable

from agent import timefmt

PREFIX = "nanorix_agent_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# name -> (type, help, label names)
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "creates_total": ("counter", "Sessions created.", ()),
    "create_failures_total": ("counter", "Session creations that failed.", ()),
    "execs_total": ("counter", "Commands executed.", ()),
    "destroys_total": ("counter", "Sessions destroyed, by reason and final status.",
                       ("reason", "status")),
    "destroy_step_failures_total": ("counter", "Destruction steps that could not be verified.",
                                    ("step",)),
    "oom_kills_total": ("counter", "Sessions ended by an out-of-memory kill.", ()),
    "sessions_adopted_total": ("counter", "Live sessions re-adopted after an agent restart.",
                               ()),
    "recovery_reclaimed_total": ("counter", "Leftovers reclaimed at start, by resource kind.",
                                 ("kind",)),
    "state_damage_total": ("counter", "Damaged or lost state found at start (quarantined "
                           "files, rebuilt journal rows, re-proven sessions), by kind.",
                           ("kind",)),
    "create_seconds": ("histogram", "Session creation latency.", ()),
    "exec_seconds": ("histogram", "Command execution latency.", ()),
    "destroy_seconds": ("histogram", "Destruction pipeline latency.", ()),
    # gauges, filled from the service at render time
    "sessions": ("gauge", "Live and ended sessions known to the agent, by status.", ("status",)),
    "spool_depth": ("gauge", "CDPs spooled and not yet acknowledged.", ()),
    "proofs_not_durable": ("gauge", "Proofs kept only in memory/fallback: the spool could not "
                           "take them (retried).", ()),
    "attestation_key_age_seconds": ("gauge", "Age of the current attestation key.", ()),
    "capacity_sessions_max": ("gauge", "Maximum concurrent sessions on this node.", ()),
    "capacity_sessions_live": ("gauge", "Sessions currently live on this node.", ()),
    "capacity_memory_bytes": ("gauge", "Memory the node offers to sessions.", ()),
    "capacity_memory_committed_bytes": ("gauge", "Memory committed to live sessions.", ()),
    "health_engine_ok": ("gauge", "1 when the engine's last self-test passed.", ("engine",)),
    "draining": ("gauge", "1 while the agent refuses new work (shutdown).", ()),
}

STATUSES = ("active", "executing", "destroyed", "expired", "expired_unclean")


def _fmt_labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class Metrics:
    """The agent's metric registry.  Thread-safe (sync code in worker threads may record)."""

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[str, ...], float]] = {k: {} for k in METRICS}
        self._hist: dict[str, dict[tuple[str, ...], list]] = {}

    def _key(self, name: str, labels: dict) -> tuple[str, ...]:
        kind, _help, names = METRICS[name]
        if set(labels) != set(names):
            raise KeyError(f"metric {name} takes labels {names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in names)

    def inc(self, name: str, by: float = 1, **labels) -> None:
        if METRICS[name][0] != "counter":
            raise KeyError(f"{name} is not a counter")
        key = self._key(name, labels)
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0) + by

    def set(self, name: str, value: float, **labels) -> None:
        if METRICS[name][0] != "gauge":
            raise KeyError(f"{name} is not a gauge")
        key = self._key(name, labels)
        with self._lock:
            self._values[name][key] = value

    def observe(self, name: str, seconds: float, **labels) -> None:
        if METRICS[name][0] != "histogram":
            raise KeyError(f"{name} is not a histogram")
        key = self._key(name, labels)
        with self._lock:
            h = self._hist.setdefault(name, {}).setdefault(
                key, [[0] * len(self.buckets), 0, 0.0])
            for i, b in enumerate(self.buckets):
                if seconds <= b:
                    h[0][i] += 1
            h[1] += 1
            h[2] += seconds

    def value(self, name: str, **labels) -> float:
        """Current value of a counter/gauge series (0 when never recorded)."""
        return self._values[name].get(self._key(name, labels), 0)

    # -- gauges from the service -----------------------------------------------------------
    def refresh(self, service) -> None:
        """Read the state gauges from the service; a missing member leaves its gauge unset."""
        counts = dict.fromkeys(STATUSES, 0)
        try:
            for meta in service.list_sessions():
                st = meta.get("status")
                if st in counts:
                    counts[st] += 1
        except Exception:  # noqa: S110 - a gauge must never break the metrics answer
            pass
        with self._lock:
            self._values["sessions"] = {(k,): v for k, v in counts.items()}
        spool = getattr(service, "spool", None)
        if spool is not None and hasattr(spool, "depth"):
            try:
                self.set("spool_depth", int(spool.depth()))
                self.set("proofs_not_durable", len(spool.unsaved))
            except Exception:  # noqa: S110
                pass
        age = key_age_seconds(service)
        if age is not None:
            self.set("attestation_key_age_seconds", age)
        try:
            cap = service.capacity()
            for src, dst in (("sessions_max", "capacity_sessions_max"),
                             ("sessions_live", "capacity_sessions_live"),
                             ("memory_capacity_bytes", "capacity_memory_bytes"),
                             ("memory_committed_bytes", "capacity_memory_committed_bytes")):
                if src in cap:
                    self.set(dst, int(cap[src]))
        except Exception:  # noqa: S110
            pass
        mon = getattr(service, "health", None)
        if mon is not None and hasattr(mon, "engines"):
            for eng, ok in mon.engines.items():
                self.set("health_engine_ok", 1 if ok else 0, engine=eng)
        self.set("draining", 1 if getattr(service, "draining", False) else 0)

    def render(self, service=None) -> str:
        """Prometheus text exposition format 0.0.4."""
        if service is not None:
            self.refresh(service)
        out: list[str] = []
        with self._lock:
            for name, (kind, help_, names) in METRICS.items():
                full = PREFIX + name
                out.append(f"# HELP {full} {help_}")
                out.append(f"# TYPE {full} {kind}")
                if kind == "histogram":
                    series = self._hist.get(name, {})
                    if not series and not names:
                        series = {(): [[0] * len(self.buckets), 0, 0.0]}
                    for key, (counts, n, total) in sorted(series.items()):
                        for b, c in zip(self.buckets, counts, strict=True):
                            le = 'le="' + _num(b) + '"'
                            out.append(f"{full}_bucket{_fmt_labels(names, key, le)} {c}")
                        inf = 'le="+Inf"'
                        out.append(f"{full}_bucket{_fmt_labels(names, key, inf)} {n}")
                        out.append(f"{full}_sum{_fmt_labels(names, key)} {_num(total)}")
                        out.append(f"{full}_count{_fmt_labels(names, key)} {n}")
                    continue
                series = self._values[name]
                if not series and not names:
                    series = {(): 0}
                for key, v in sorted(series.items()):
                    out.append(f"{full}{_fmt_labels(names, key)} {_num(v)}")
        return "\n".join(out) + "\n"


def key_age_seconds(service) -> int | None:
    """Age of the current attestation key from its record's created_at, or None."""
    ks = getattr(service, "key_store", None)
    if ks is None:
        return None
    try:
        created = None
        if hasattr(ks, "current_record"):
            created = ks.current_record().get("created_at")
        if created is None:
            created = getattr(ks.current(), "created_at", None)
        if not created:
            return None
        return max(0, int(time.time() - timefmt.parse_iso(created)))
    except Exception:
        return None
