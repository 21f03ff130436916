"""Health self-tests (SPEC 10) against the real engine, session keys, journal, spool and keys."""

from __future__ import annotations

import shutil
import time
from types import SimpleNamespace

import pytest
import trio
from suite import cgroup_prefix, uid_base

from agent.config import Config
from agent.keys.attestation import AttestationKeyStore
from agent.ops.health import ENGINES, HealthMonitor, SelfTestFailed
from agent.sandbox.engine import SandboxEngine
from agent.service.journal import Journal
from agent.service.spool import Spool

MiB = 1024 * 1024


@pytest.fixture
async def service(agent_dirs):
    """A service made of the real parts on temp dirs and a private cgroup prefix."""
    state, runtime = agent_dirs
    cfg = Config()
    cfg.paths.state_dir, cfg.paths.runtime_dir = state, runtime
    cfg.sandbox.cgroup_prefix = cgroup_prefix("health")
    cfg.sandbox.uid_base = uid_base()
    cfg.node.max_sessions = 4
    cfg.tiers["free"].memory_bytes = 64 * MiB
    engine = SandboxEngine(cfg, cgroup_prefix=cfg.sandbox.cgroup_prefix)
    journal = Journal(state)
    svc = SimpleNamespace(config=cfg, engine=engine, journal=journal, spool=Spool(state),
                          key_store=AttestationKeyStore(state), started_at=time.monotonic(),
                          draining=False)
    yield svc
    await engine.aclose()
    journal.close()


async def test_every_engine_passes_on_a_sound_agent(service):
    """All five real self-tests pass: status healthy, each with its time and duration."""
    mon = HealthMonitor(service, service.config)
    snap = await mon.run_once()
    assert snap["engines"] == dict.fromkeys(ENGINES, True), mon.details()
    assert snap["status"] == "healthy" and snap["database"] is True
    assert set(snap) == {"status", "engines", "database", "uptime_seconds", "timestamp"}
    d = mon.details()
    assert all(d[e]["checked_at"] and d[e]["reason"] is None for e in ENGINES)
    assert not service.engine.live, "the canary sandbox must be gone"


async def test_unwritable_spool_degrades_rzl_and_recovers(service):
    """With the spool directory replaced by a file rzl fails (degraded, reason kept); restored, it heals."""
    mon = HealthMonitor(service, service.config)
    spool_dir = service.spool.dir
    shutil.rmtree(spool_dir)
    spool_dir.write_text("not a directory")
    try:
        snap = await mon.run_once()
        assert snap["status"] == "degraded"
        assert snap["engines"]["rzl"] is False
        assert all(snap["engines"][e] for e in ENGINES if e != "rzl")
        assert "NotADirectoryError" in mon.details()["rzl"]["reason"]
    finally:
        spool_dir.unlink()
        spool_dir.mkdir(mode=0o700)
    snap = await mon.run_once()
    assert snap["status"] == "healthy" and mon.details()["rzl"]["reason"] is None


async def test_injected_fault_degrades_one_engine_and_clears(service):
    """A fault hook on eee makes only eee false with its reason; removing it restores healthy."""
    mon = HealthMonitor(service, service.config)
    mon.faults.add("eee")
    snap = await mon.run_once()
    assert snap["status"] == "degraded" and snap["engines"]["eee"] is False
    assert mon.details()["eee"]["reason"] == "fault injected"
    mon.faults.clear()
    assert (await mon.run_once())["status"] == "healthy"


async def test_broken_journal_makes_the_agent_unhealthy(service):
    """A journal that cannot do its round trip makes status unhealthy and database false."""
    mon = HealthMonitor(service, service.config)
    service.journal.close()
    snap = await mon.run_once()
    assert snap["database"] is False and snap["status"] == "unhealthy"
    assert snap["engines"]["rzl"] is False
    service.journal = Journal(service.config.paths.state_dir)


async def test_self_tests_rerun_every_interval(autojump_clock):
    """run() repeats the self-tests every health.interval_seconds (fake clock)."""
    cfg = Config()
    cfg.health.interval_seconds = 60
    calls = []
    checks = {e: (lambda svc, c, e=e: calls.append(e)) for e in ENGINES}
    svc = SimpleNamespace(journal=SimpleNamespace(check=lambda: None), started_at=0.0)
    mon = HealthMonitor(svc, cfg, checks=checks)
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        await trio.sleep(60 * 3 + 1)
        nursery.cancel_scope.cancel()
    assert mon.runs == 3 and calls.count("eee") == 3
    assert mon.status == "healthy"


async def test_full_node_skips_the_canary_and_keeps_the_last_result(service):
    """At capacity the eee canary (which needs a slot) is skipped: flag kept, reason says why."""
    mon = HealthMonitor(service, service.config)
    service.capacity = lambda: {"sessions_live": 4, "sessions_max": 4}
    await mon.run_once()
    assert mon.engines["eee"] is False and "capacity" in mon.details()["eee"]["reason"]
    service.capacity = lambda: {"sessions_live": 0, "sessions_max": 4}
    await mon.run_once()
    assert mon.engines["eee"] is True
    service.capacity = lambda: {"sessions_live": 4, "sessions_max": 4}
    snap = await mon.run_once()
    assert snap["engines"]["eee"] is True and "capacity" in mon.details()["eee"]["reason"]
    assert not service.engine.live


async def test_ready_waits_for_a_passing_self_test_and_status_names_the_failure(service, tmp_path):
    """A first failing self-test is logged (warning, then health_status_changed at error);
    READY=1 is held back while STATUS= names the engine and reason; once the self-test passes
    READY=1 goes out with a "ready: …" status."""
    import socket

    import structlog

    from agent.daemon import Daemon
    from agent.ops.notify import Notifier

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(tmp_path / "notify.sock"))
    srv.settimeout(5)
    notifier = Notifier(str(tmp_path / "notify.sock"))
    mon = HealthMonitor(service, service.config)
    service.health = mon
    mon.faults.add("eee")
    with structlog.testing.capture_logs() as logs:
        await mon.run_once()
    assert any(e["event"] == "health_engine_changed" and e["engine"] == "eee" and not e["ok"]
               and e["log_level"] == "warning" for e in logs)
    assert any(e["event"] == "health_status_changed" and e["status"] == "degraded"
               and e["log_level"] == "error" for e in logs)
    daemon = Daemon(service.config)
    try:
        assert not daemon._ready_if_healthy(notifier, service)
        assert srv.recv(4096).decode() == "STATUS=degraded: eee — fault injected"
        mon.faults.clear()
        await mon.run_once()
        assert daemon._ready_if_healthy(notifier, service)
        assert srv.recv(4096).decode().startswith("READY=1\nSTATUS=ready: ")
    finally:
        notifier.close()
        srv.close()
async def test_a_reported_fault_flips_at_once_and_heals_within_a_recheck(autojump_clock):
    """fault() makes the engine false immediately (no self-test run); run() re-tests it
    every health.recheck_seconds, long before the next interval, and it turns true when its
    self-test passes again (fake clock)."""
    cfg = Config()
    cfg.health.interval_seconds = 60
    broken = {"rzl": True}

    def rzl(svc, c):
        if broken["rzl"]:
            raise SelfTestFailed("spool not writable")

    checks = {e: (lambda svc, c: None) for e in ENGINES} | {"rzl": rzl}
    svc = SimpleNamespace(journal=SimpleNamespace(check=lambda: None), started_at=0.0)
    mon = HealthMonitor(svc, cfg, checks=checks)
    async with trio.open_nursery() as nursery:
        broken["rzl"] = False
        await mon.run_once()
        await nursery.start(mon.run)
        assert mon.status == "healthy"
        broken["rzl"] = True
        mon.state_fault("a spool write failed: ENOSPC")
        assert mon.snapshot()["engines"]["rzl"] is False and not mon.database
        await trio.sleep(cfg.health.recheck_seconds * 3)
        assert mon.engines["rzl"] is False and mon.reasons["rzl"] == "spool not writable"
        broken["rzl"] = False
        await trio.sleep(cfg.health.recheck_seconds * 2)
        assert mon.status == "healthy" and mon.runs == 1
        nursery.cancel_scope.cancel()
