"""Prometheus metrics (SPEC 9 `metrics`) through `prometheus_client`.

Counters and histograms are recorded by the daemon (`inc`, `observe`); gauges that describe the
current state (sessions by status, spool depth, key age, capacity, health) are read from the
service when `render(service)` runs, so they cannot go stale.  Names are declared once in
`METRICS`; an undeclared name or label set raises KeyError so a typo cannot silently make a new
series.  Every labelled series whose label values are known in advance (destroy reasons ×
statuses, steps 1–8, recovery kinds, engines, session statuses) exists from the start with 0,
so `rate()` and alerts work before the first event.  Besides the agent's own series the
registry carries the standard `process_*` and `python_info` collectors and
`nanorix_agent_build_info{version=…}`.  Labels never carry customer data.

The same text is served by the debug socket (`metrics`) and, when `[metrics] listen` is set,
by `serve_http` at `GET /metrics`.  That endpoint is a few lines of trio instead of
`prometheus_client.start_http_server` because the latter starts one thread per connection with
no limit and no timeout; here at most `metrics.max_connections` scrapes are served at once,
each request head is capped at 8 KiB and must arrive within 5 s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from itertools import product

import prometheus_client
import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import generate_latest

from agent import log, timefmt
from agent.config import MetricsConfig
from agent.ops.view import ServiceView

# `_created` timestamps per counter/histogram only add noise to a node agent's scrape
prometheus_client.disable_created_metrics()

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
    "config_reloads_total": ("counter", "SIGHUP config reloads, by result (applied, rejected).",
                             ("result",)),
    "state_damage_total": ("counter", "Damaged or lost state found at start (quarantined "
                           "files, rebuilt journal rows, re-proven sessions), by kind.",
                           ("kind",)),
    "pool_hits_total": ("counter", "Creates that took a warm-pool sandbox, by tier.",
                        ("tier",)),
    "pool_misses_total": ("counter", "Creates of a pooled tier that found its pool empty.",
                          ("tier",)),
    "pool_refill_failures_total": ("counter", "Warm-pool sandboxes that could not be made.",
                                   ("tier",)),
    "pool_retired_total": ("counter", "Warm-pool sandboxes destroyed without ever being "
                           "bound to a session (no CDP), by why and whether every step "
                           "verified.", ("why", "clean")),
    "pool_refill_seconds": ("histogram", "Time to make one warm-pool sandbox.", ()),
    "create_seconds": ("histogram", "Session creation latency.", ()),
    "exec_seconds": ("histogram", "Command execution latency.", ()),
    "destroy_seconds": ("histogram", "Destruction pipeline latency.", ()),
    # gauges, filled from the service at render time
    "sessions": ("gauge", "Sessions held in memory by status: live ones, and ended ones whose end the journal does not hold yet (ended sessions are counted by destroys_total).", ("status",)),
    "spool_depth": ("gauge", "CDPs spooled and not yet acknowledged.", ()),
    "proofs_not_durable": ("gauge", "Proofs kept only in memory/fallback: the spool could not "
                           "take them (retried).", ()),
    "attestation_key_age_seconds": ("gauge", "Age of the current attestation key.", ()),
    "capacity_sessions_max": ("gauge", "Maximum concurrent sessions on this node.", ()),
    "capacity_sessions_live": ("gauge", "Sessions currently live on this node.", ()),
    "capacity_memory_bytes": ("gauge", "Memory the node offers to sessions.", ()),
    "capacity_memory_committed_bytes": ("gauge", "Memory committed to live sessions.", ()),
    "health_engine_ok": ("gauge", "1 when the engine's last self-test passed.", ("engine",)),
    "pool_members": ("gauge", "Ready warm-pool sandboxes, by tier (they count against "
                     "capacity).", ("tier",)),
    "draining": ("gauge", "1 while the agent refuses new work (shutdown).", ()),
    "log_lines_dropped": ("gauge", "Log lines lost since start (stderr broken or full).", ()),
}

STATUSES = ("active", "executing", "destroyed", "expired", "expired_unclean")
DESTROY_REASONS = ("requested", "ttl_expired", "oom", "operator", "agent_recovery")
FINAL_STATUSES = ("destroyed", "expired", "expired_unclean")
# the label values known in advance: each combination starts at 0
LABEL_VALUES: dict[str, list[tuple[str, ...]]] = {
    "destroys_total": list(product(DESTROY_REASONS, FINAL_STATUSES)),
    "destroy_step_failures_total": [(str(n),) for n in range(1, 9)],
    "recovery_reclaimed_total": [(k,) for k in ("processes", "mounts", "cgroups", "network",
                                                "slots")],
    "config_reloads_total": [("applied",), ("rejected",)],
    "sessions": [(s,) for s in STATUSES],
    "health_engine_ok": [(e,) for e in ("eee", "dire", "rzl", "fgx", "ave")],
}


class Metrics:
    """The agent's metric registry (one `CollectorRegistry` per instance).  Thread-safe."""

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS, *, version: str | None = None,
                 process_metrics: bool = True) -> None:
        from agent import __version__

        self.buckets = tuple(sorted(buckets))
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._m: dict = {}
        for name, (kind, help_, labels) in METRICS.items():
            full = PREFIX + name
            m: Counter | Gauge | Histogram
            if kind == "counter":
                m = Counter(full.removesuffix("_total"), help_, labels, registry=self.registry)
            elif kind == "gauge":
                m = Gauge(full, help_, labels, registry=self.registry)
            else:
                m = Histogram(full, help_, labels, buckets=self.buckets, registry=self.registry)
            for values in LABEL_VALUES.get(name, []):
                m.labels(*values)
            self._m[name] = m
        Info(PREFIX + "build", "Version of the running agent.", registry=self.registry).info(
            {"version": version or __version__})
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)

    def _series(self, name: str, kind: str, labels: dict):
        want, _help, names = METRICS[name]
        if want != kind:
            raise KeyError(f"{name} is not a {kind}")
        if set(labels) != set(names):
            raise KeyError(f"metric {name} takes labels {names}, got {tuple(labels)}")
        m = self._m[name]
        return m.labels(*(str(labels[n]) for n in names)) if names else m

    def inc(self, name: str, by: float = 1, **labels) -> None:
        self._series(name, "counter", labels).inc(by)

    def set(self, name: str, value: float, **labels) -> None:
        self._series(name, "gauge", labels).set(value)

    def observe(self, name: str, seconds: float, **labels) -> None:
        self._series(name, "histogram", labels).observe(seconds)

    def value(self, name: str, **labels) -> float:
        """Current value of a counter/gauge series (0 when never recorded)."""
        kind, _help, names = METRICS[name]
        if set(labels) != set(names):
            raise KeyError(f"metric {name} takes labels {names}, got {tuple(labels)}")
        v = self.registry.get_sample_value(PREFIX + name, {k: str(v) for k, v in labels.items()})
        return v or 0

    # -- gauges from the service -----------------------------------------------------------
    def refresh(self, service: ServiceView) -> None:
        """Read the state gauges from the service; a missing member leaves its gauge unset."""
        counts = dict.fromkeys(STATUSES, 0)
        try:
            for meta in service.list_sessions():
                st = meta.get("status")
                if st in counts:
                    counts[st] += 1
        except Exception:  # noqa: S110 - a gauge must never break the metrics answer
            pass
        for st, n in counts.items():
            self.set("sessions", n, status=st)
        try:
            self.set("spool_depth", int(service.spool.depth()))
            self.set("proofs_not_durable", len(service.spool.unsaved))
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
            for tier, n in (cap.get("pool_by_tier") or {}).items():
                self.set("pool_members", int(n), tier=tier)
        except Exception:  # noqa: S110
            pass
        if service.health is not None:
            for eng, ok in service.health.engines.items():
                self.set("health_engine_ok", 1 if ok else 0, engine=eng)
        self.set("draining", 1 if service.draining else 0)
        self.set("log_lines_dropped", log.dropped_lines())

    def render(self, service: ServiceView | None = None) -> str:
        """Prometheus text exposition format 0.0.4."""
        with self._lock:
            if service is not None:
                self.refresh(service)
            return generate_latest(self.registry).decode("utf-8")


def key_age_seconds(service: ServiceView) -> int | None:
    """Age of the current attestation key from its record's created_at, or None."""
    try:
        return max(0, int(time.time() - timefmt.parse_iso(service.key_store.current().created_at)))
    except Exception:
        return None


# -- GET /metrics ---------------------------------------------------------------------------

# what generate_latest writes for our (legacy-valid) names: text format 0.0.4
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
              head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii")
    return head if head_only else head + body


def answer(request_head: bytes, metrics: Metrics, service: ServiceView) -> bytes:
    """The whole HTTP response to one request head (never raises)."""
    line = request_head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response("400 Bad Request", b"bad request\n")
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"only GET\n")
    if target not in ("/metrics", "/"):
        return _response("404 Not Found", b"see /metrics\n")
    try:
        body = metrics.render(service).encode("utf-8")
    except Exception as e:
        log.get().warning("metrics_render_failed", error=type(e).__name__)
        return _response("500 Internal Server Error", b"metrics unavailable\n")
    return _response("200 OK", body, CONTENT_TYPE, head_only=method == "HEAD")


async def _serve_conn(stream: trio.SocketStream, metrics: Metrics, service: ServiceView,
                      slots: trio.Semaphore) -> None:
    try:
        async with stream:
            buf = b""
            with trio.move_on_after(service.config.timeouts.metrics_request_seconds) as cs:
                while (b"\r\n\r\n" not in buf
                       and len(buf) <= service.config.metrics.max_request_head_bytes):
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    buf += chunk
            if cs.cancelled_caught or b"\r\n\r\n" not in buf:
                resp = _response("400 Bad Request", b"incomplete or oversized request\n")
            else:
                resp = answer(buf, metrics, service)
            with trio.move_on_after(service.config.timeouts.metrics_request_seconds):
                await stream.send_all(resp)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        slots.release()


async def _accept_loop(listener, metrics: Metrics, service: ServiceView, slots: trio.Semaphore,
                       nursery: trio.Nursery) -> None:
    async with listener:
        while True:
            await slots.acquire()  # at the limit, further clients wait in the listen backlog
            try:
                stream = await listener.accept()
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(_serve_conn, stream, metrics, service, slots)


async def serve_http(mcfg: MetricsConfig, service: ServiceView, *,
                     task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `GET /metrics` on `mcfg.listen` ("HOST:PORT") until cancelled; `started()` gets
    the bound (host, port) pairs."""
    from agent.config import parse_listen

    host, port = parse_listen(mcfg.listen)
    listeners = await trio.open_tcp_listeners(port, host=host)
    slots = trio.Semaphore(mcfg.max_connections)
    bound = [tuple(ls.socket.getsockname()[:2]) for ls in listeners]
    log.get().info("metrics_http_listening", address=[f"{h}:{p}" for h, p in bound])
    async with trio.open_nursery() as nursery:
        metrics = service.metrics
        assert isinstance(metrics, Metrics)  # the daemon always builds one
        for ls in listeners:
            nursery.start_soon(_accept_loop, ls, metrics, service, slots, nursery)
        task_status.started(bound)
