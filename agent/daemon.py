"""`nanorix-agent serve`: wires config, keys, journal, spool, sandbox engine, sessions,
RPC and the ops hooks into one trio program (SPEC 8, 11; docs/design.md "E: daemon hooks").

Order: config + logs -> root check -> self-hardening -> state/runtime dirs -> instance lock
(cgroup prefix, uid range, state and runtime dir: agent/ops/instance_lock.py) -> keys,
journal, spool, engine, service -> crash recovery (before any socket exists) -> RPC socket ->
health self-test -> debug socket, metrics endpoint -> READY=1 once the self-test passed
(STATUS= is kept current: "ready: N sessions", "degraded: eee — <reason>").

Signals: SIGHUP reloads the config (agent/ops/reload.py: what can change live is applied, an
invalid file or a restart-only change is rejected and the old config kept).  SIGTERM/SIGINT:
STOPPING, stop accepting, destroy every live session with reason `operator` (CDPs spooled),
exit 0; a second signal or the stop timeout kills every sandbox at once (engine.aclose) so
nothing is left behind.  Exit status: 0 after a drain, 2 for a config or usage error (also:
not root), 1 for every other fatal condition (another agent holds our locks, a crash), so
systemd's Restart=on-failure restarts the agent after anything but a requested stop.
"""

from __future__ import annotations

import importlib
import os
import signal
import time
from pathlib import Path

import structlog
import trio

from agent import __version__ as VERSION
from agent import config as config_mod
from agent import log
from agent.ops.instance_lock import AlreadyRunning
from agent.ops.instance_lock import acquire as acquire_instance_lock
from agent.rpc.methods import Api
from agent.rpc.server import RpcServer, bind_unix_socket, socket_gid
from agent.service.journal import Journal, JournalUnavailable
from agent.service.sessions import Service
from agent.service.spool import Spool
from agent.timefmt import iso_seconds

__all__ = ["VERSION", "AlreadyRunning", "Daemon", "serve"]

STOP_TIMEOUT = 60.0  # seconds the drain may take before every sandbox is killed outright
STATUS_INTERVAL = 5.0  # seconds between STATUS= refreshes (sent only when the text changed)
EXIT_OK, EXIT_FATAL, EXIT_USAGE = 0, 1, 2

_log = structlog.get_logger("nanorix-agent.daemon")  # lazy: resolved after log.setup()


def _ops(name: str):
    """An ops module (owned by E) when it exists; None while it is being built."""
    try:
        return importlib.import_module(f"agent.ops.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"agent.ops.{name}":
            raise
        return None


class Daemon:
    def __init__(self, cfg: config_mod.Config, *, config_path: Path | None = None,
                 state_dir: Path | None = None, runtime_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.service: Service | None = None
        self.engine = None
        self.recovery_report = None
        self.instance_lock = None
        # what SIGHUP reloads: the same file with the same command-line overrides
        self._reload_args = (config_path, state_dir, runtime_dir)
        self.notifier = None
        self.ready_sent = False
        self._not_ready_logged: str | None = None

    # -- construction ----------------------------------------------------------------
    def build(self) -> Service:
        cfg = self.cfg
        state, runtime = cfg.paths.state_dir, cfg.paths.runtime_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(state, 0o700)
        runtime.mkdir(parents=True, exist_ok=True, mode=0o755)
        # one agent per cgroup prefix, uid range, state and runtime dir: held for life
        self.instance_lock = acquire_instance_lock(cfg)
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

    # -- the trio program --------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        service = self.service or self.build()
        notify_mod = _ops("notify")
        notifier = notify_mod.Notifier.from_env() if notify_mod is not None else None
        self.notifier = notifier
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
                await self._start_metrics_http(nursery, service)
                if notifier is not None:
                    self._ready_if_healthy(notifier, service)
                    nursery.start_soon(notifier.watchdog_task)
                    nursery.start_soon(self._status_task, notifier, service)
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
            if self.instance_lock is not None:
                self.instance_lock.release()
            _log.info("agent_stopped", log_lines_dropped=log.dropped_lines())

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

    async def _start_metrics_http(self, nursery: trio.Nursery, service: Service) -> None:
        if self.cfg.metrics.listen and service.metrics is not None:
            from agent.ops import metrics as metrics_mod

            try:
                await nursery.start(metrics_mod.serve_http, self.cfg.metrics, service)
            except OSError as e:  # a configured endpoint that cannot listen is fatal (exit 1)
                _log.error("metrics_listen_failed", address=self.cfg.metrics.listen,
                           error=e.strerror or type(e).__name__)
                raise

    async def _status_task(self, notifier, service: Service) -> None:
        """READY=1 once the self-tests pass (re-run every STATUS_INTERVAL until then, so a
        transient failure at boot does not hold the start for a whole health interval);
        STATUS= refreshed whenever its text changes."""
        from agent.ops.notify import status_text

        mon = getattr(service, "health", None)
        last = None
        while True:
            if not self.ready_sent:
                await trio.sleep(STATUS_INTERVAL)
                await mon.run_once()
                if self._ready_if_healthy(notifier, service):
                    continue
            text = status_text(mon, service)
            if text != last:
                notifier.status(text)
                last = text
            if self.ready_sent:
                await trio.sleep(STATUS_INTERVAL)

    def _ready_if_healthy(self, notifier, service: Service) -> bool:
        """Send READY=1 (with the STATUS= line) when the last self-test left us healthy."""
        from agent.ops.notify import status_text

        mon = getattr(service, "health", None)
        text = status_text(mon, service)
        if mon is not None and mon.status != "healthy":
            notifier.status(text)
            if text != self._not_ready_logged:  # once per distinct reason
                _log.warning("agent_not_ready", status=text)
                self._not_ready_logged = text
            return False
        notifier.ready(text)
        self.ready_sent = True
        return True

    def reload(self) -> dict:
        """SIGHUP: re-read the config (agent/ops/reload.py); the result is logged."""
        from agent.ops import reload as reload_mod

        if self.notifier is not None:
            self.notifier.reloading()
        path, state_dir, runtime_dir = self._reload_args
        res = reload_mod.reload(self.cfg, path, state_dir=state_dir, runtime_dir=runtime_dir)
        metrics = self.service.metrics if self.service is not None else None
        if metrics is not None:
            metrics.inc("config_reloads_total", result="applied" if res["ok"] else "rejected")
        if self.notifier is not None:
            self.notifier.ready()
        return res

    async def _wait_for_stop(self, notifier, rpc_scope: trio.CancelScope,
                             service: Service) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.reload()
                    continue
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
                            if signum == signal.SIGHUP:
                                continue  # no reload while draining
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
    """Run the daemon until SIGTERM/SIGINT; the exit status is in the module docstring."""
    try:
        cfg = config_mod.load(config_path, state_dir=state_dir, runtime_dir=runtime_dir)
    except config_mod.ConfigError as e:
        log.setup("info")
        _log.error("config_invalid", error=str(e))
        log.console(f"config error: {e}")
        return EXIT_USAGE
    log.setup(cfg.log.level)
    if os.geteuid() != 0:
        _log.error("agent_needs_root", uid=os.geteuid())
        log.console("serve needs root (it creates namespaces and cgroups and maps sandbox "
                    "uids); run it as root or through the systemd unit")
        return EXIT_USAGE
    # until the trio loop's receiver takes over: a SIGHUP during start-up (recovery) is
    # ignored instead of killing the agent undrained.  A Python handler, not SIG_IGN, which
    # every sandbox would inherit across exec.  It must not log (the log writer's lock).
    signal.signal(signal.SIGHUP, lambda _signum, _frame: None)
    hardening = _ops("hardening")
    if hardening is not None:
        report = hardening.harden(cfg)
        (_log.warning if report.get("errors") else _log.info)(
            "agent_hardened", **{k: v for k, v in report.items() if k != "errors"},
            errors=len(report.get("errors", [])))
    daemon = Daemon(cfg, config_path=config_path, state_dir=state_dir, runtime_dir=runtime_dir)
    try:
        daemon.build()
    except AlreadyRunning as e:
        _log.error("agent_already_running", error=str(e))
        log.console(str(e))
        return EXIT_FATAL
    except JournalUnavailable as e:
        _log.error("journal_unavailable", error=str(e))
        log.console(str(e))
        return EXIT_FATAL
    try:
        trio.run(daemon.run)
    except KeyboardInterrupt:  # a SIGINT before the signal receiver was installed
        _log.warning("agent_interrupted_during_start")
        return EXIT_FATAL
    except Exception as e:
        while isinstance(e, BaseExceptionGroup) and e.exceptions:
            e = e.exceptions[0]
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        _log.error("agent_crashed", error=type(e).__name__,
                   where=tb.tb_frame.f_code.co_name if tb is not None else None)
        return EXIT_FATAL
    return EXIT_OK
