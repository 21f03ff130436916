"""`nanorix-agent serve`: wires config, keys, journal, spool, sandbox engine, sessions,
RPC and the ops hooks into one trio program (SPEC 8, 11; docs/design.md "E: daemon hooks").

Order: config + logs -> self-hardening -> state/runtime dirs -> keys, journal, spool,
engine, service -> crash recovery (before any socket exists) -> RPC socket -> health
self-test -> debug socket -> READY.  SIGTERM/SIGINT: STOPPING, stop accepting, destroy
every live session with reason `operator` (CDPs spooled), exit 0; a second signal or the
stop timeout kills every sandbox at once (engine.aclose) so nothing is left behind.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import signal
import sys
import time
from pathlib import Path

import structlog
import trio

from agent import __version__ as VERSION
from agent import config as config_mod
from agent import log
from agent.rpc.methods import Api
from agent.rpc.server import RpcServer, bind_unix_socket, socket_gid
from agent.service.journal import Journal, JournalUnavailable
from agent.service.sessions import Service
from agent.service.spool import Spool
from agent.timefmt import iso_seconds

__all__ = ["VERSION", "AlreadyRunning", "Daemon", "serve"]

STOP_TIMEOUT = 60.0  # seconds the drain may take before every sandbox is killed outright

_log = structlog.get_logger("nanorix-agent.daemon")  # lazy: resolved after log.setup()


class AlreadyRunning(RuntimeError):
    """Another agent holds the state directory."""


def _ops(name: str):
    """An ops module (owned by E) when it exists; None while it is being built."""
    try:
        return importlib.import_module(f"agent.ops.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"agent.ops.{name}":
            raise
        return None


class Daemon:
    def __init__(self, cfg: config_mod.Config) -> None:
        self.cfg = cfg
        self.service: Service | None = None
        self.engine = None
        self.recovery_report = None

    # -- construction ----------------------------------------------------------------
    def build(self) -> Service:
        cfg = self.cfg
        state, runtime = cfg.paths.state_dir, cfg.paths.runtime_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(state, 0o700)
        runtime.mkdir(parents=True, exist_ok=True, mode=0o755)
        self._lock_state_dir(state)
        from agent.keys.attestation import AttestationKeyStore
        from agent.sandbox.engine import SandboxEngine

        journal = Journal(state)
        spool = Spool(state)
        holder: dict = {}
        key_store = AttestationKeyStore(
            state, cfg.keys.rotate_interval_seconds, credential_name=cfg.keys.credential_name,
            fallback=lambda key_id: holder["service"].receipt_key(key_id))
        self.engine = SandboxEngine(cfg, cgroup_prefix=cfg.sandbox.cgroup_prefix)
        metrics_mod = _ops("metrics")
        metrics = metrics_mod.Metrics() if metrics_mod is not None else None
        service = Service(cfg, engine=self.engine, key_store=key_store, journal=journal,
                          spool=spool, version=VERSION, metrics=metrics)
        holder["service"] = service
        self.service = service
        return service

    def _lock_state_dir(self, state: Path) -> None:
        """One agent per state directory: recovery would otherwise reclaim a live agent's
        sessions.  The flock is held for the life of the process."""
        fd = os.open(state / "agent.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(f"another agent is running with state directory {state}") \
                from None
        self._lock_fd = fd

    # -- the trio program --------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        service = self.service or self.build()
        notify_mod = _ops("notify")
        notifier = notify_mod.Notifier.from_env() if notify_mod is not None else None
        try:
            await self._recover(service)
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                allowed_gids = list(cfg.rpc.allowed_gids)
                gid = socket_gid(cfg.rpc.socket_group)
                if gid is not None:
                    allowed_gids.append(gid)
                api = Api(service)
                server = RpcServer(api.dispatch, max_frame_bytes=cfg.rpc.max_frame_bytes,
                                   allowed_uids=cfg.rpc.allowed_uids, allowed_gids=allowed_gids)
                sock = bind_unix_socket(cfg.socket_path, mode=cfg.rpc.socket_mode,
                                        group=cfg.rpc.socket_group)
                rpc_scope = trio.CancelScope()

                async def serve_rpc(task_status=trio.TASK_STATUS_IGNORED):
                    with rpc_scope:
                        await server.serve(sock, task_status=task_status)

                await nursery.start(serve_rpc)
                api.health = await self._start_health(nursery, service)
                await self._start_debug(nursery, service)
                if notifier is not None:
                    notifier.ready()
                    nursery.start_soon(notifier.watchdog_task)
                _log.info("agent_ready", version=VERSION, node_id=cfg.node.node_id,
                          socket_mode=oct(cfg.rpc.socket_mode))
                task_status.started(service)
                await self._wait_for_stop(notifier, rpc_scope, service)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if self.engine is not None:
                    with trio.move_on_after(30):
                        await self.engine.aclose()
                try:
                    cfg.socket_path.unlink()
                except OSError:
                    pass
                service.journal.close()
            _log.info("agent_stopped")

    async def _recover(self, service: Service) -> None:
        recovery = _ops("recovery")
        if recovery is None:
            # minimal, honest recovery until ops.recovery lands: every journaled live
            # session gets the full pipeline with reason agent_recovery
            for row in service.journal.live_sessions():
                try:
                    await service.recover_row(row)
                except Exception:
                    _log.exception("recovery_failed", session_id=row["session_id"])
            return
        driver = getattr(self.engine, "cgroups", None) or getattr(self.engine, "driver", None)
        self.recovery_report = await recovery.recover(
            self.cfg, journal=service.journal, driver=driver,
            destroy_fn=service.recover_row, metrics=service.metrics)

    async def _start_health(self, nursery: trio.Nursery, service: Service):
        health_mod = _ops("health")
        if health_mod is not None:
            mon = health_mod.HealthMonitor(service, self.cfg)
            service.health = mon
            await mon.run_once()
            nursery.start_soon(mon.run)
            return mon.snapshot
        return lambda: _basic_health(service)

    async def _start_debug(self, nursery: trio.Nursery, service: Service) -> None:
        debug_mod = _ops("debug")
        if debug_mod is not None:
            await nursery.start(debug_mod.serve_debug, self.cfg.debug_socket_path, service)

    async def _wait_for_stop(self, notifier, rpc_scope: trio.CancelScope,
                             service: Service) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                _log.info("agent_stopping", signal=signal.Signals(signum).name)
                break
            if notifier is not None:
                notifier.stopping()
            service.draining = True
            rpc_scope.cancel()  # stop accepting; live connections are dropped
            with trio.move_on_after(STOP_TIMEOUT) as timeout_scope:
                async with trio.open_nursery() as nursery:

                    async def second_signal():
                        async for signum in signals:
                            _log.warning("agent_stop_forced", signal=signal.Signals(signum).name)
                            nursery.cancel_scope.cancel()
                            return
                    nursery.start_soon(second_signal)
                    await service.drain("operator")
                    nursery.cancel_scope.cancel()
            if timeout_scope.cancelled_caught:
                _log.warning("agent_stop_timeout", seconds=STOP_TIMEOUT)


def _basic_health(service: Service) -> dict:
    """Used only while agent.ops.health is absent: what this module can test itself now.
    Engines it cannot test are reported false (never assumed healthy)."""
    engines = {"eee": False, "dire": False, "rzl": False, "fgx": False, "ave": False}
    database = service.journal.check_writable()
    engines["rzl"] = database and service.spool.check_writable()
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        signer = service.key_store.current()
        msg = b"nanorix-agent health " + iso_seconds().encode()
        Ed25519PublicKey.from_public_bytes(signer.public_key).verify(signer.sign(msg), msg)
        engines["ave"] = True
    except Exception:
        engines["ave"] = False
    status = "healthy" if all(engines.values()) and database else (
        "degraded" if database else "unhealthy")
    return {"status": status, "engines": engines, "database": database,
            "uptime_seconds": int(time.monotonic() - service.started_at),
            "timestamp": iso_seconds()}


def serve(config_path: Path | None, state_dir: Path | None, runtime_dir: Path | None) -> int:
    try:
        cfg = config_mod.load(config_path, state_dir=state_dir, runtime_dir=runtime_dir)
    except config_mod.ConfigError as e:
        log.setup("info")
        _log.error("config_invalid", error=str(e))
        print(f"nanorix-agent: config error: {e}", file=sys.stderr)
        return 2
    log.setup(cfg.log.level)
    hardening = _ops("hardening")
    if hardening is not None:
        report = hardening.harden(cfg)
        _log.info("agent_hardened", **{k: v for k, v in report.items() if k != "errors"},
                  errors=len(report.get("errors", [])))
    daemon = Daemon(cfg)
    try:
        daemon.build()
    except AlreadyRunning as e:
        _log.error("agent_already_running")
        print(f"nanorix-agent: {e}", file=sys.stderr)
        return 1
    except JournalUnavailable as e:
        _log.error("journal_unavailable")
        print(f"nanorix-agent: {e}", file=sys.stderr)
        return 1
    trio.run(daemon.run)
    return 0
