"""`nanorix-agent serve`: wires config, keys, journal, spool, sandbox engine, sessions,
RPC and the ops hooks into one trio program (SPEC 8, 11; docs/design.md "Operations: Daemon hooks").

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

import os
import signal
import sqlite3
from pathlib import Path

import structlog
import trio

from agent import __version__ as VERSION
from agent import config as config_mod
from agent import hardening, log, memory_hygiene
from agent.destroy import workers as destroy_workers
from agent.keys.attestation import AttestationKeyStore
from agent.ops import debug as debug_mod
from agent.ops import metrics as metrics_mod
from agent.ops import notify, recovery
from agent.ops import reload as reload_mod
from agent.ops.health import HealthMonitor
from agent.ops.instance_lock import AlreadyRunning, InstanceLock
from agent.ops.instance_lock import acquire as acquire_instance_lock
from agent.rpc.methods import Api
from agent.rpc.server import (
    ConnectionGate,
    Limits,
    RemoteListener,
    RpcServer,
    bind_unix_socket,
    effective_max_connections,
    socket_gid,
)
from agent.sandbox.engine import SandboxEngine, unbound_mark
from agent.service.integrity import IntegrityReport, check_state
from agent.service.journal import Journal, JournalUnavailable
from agent.service.sessions import SESSION_ID_RE, Service
from agent.service.spool import Spool

__all__ = ["VERSION", "AlreadyRunning", "Daemon", "serve"]

EXIT_OK, EXIT_FATAL, EXIT_USAGE = 0, 1, 2

_log = structlog.get_logger("nanorix-agent.daemon")  # lazy: resolved after log.setup()


class Daemon:
    def __init__(self, cfg: config_mod.Config, *, config_path: Path | None = None,
                 state_dir: Path | None = None, runtime_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.service: Service | None = None
        self.engine: SandboxEngine | None = None
        self.recovery_report: recovery.RecoveryReport | None = None
        self.instance_lock: InstanceLock | None = None
        # what SIGHUP reloads: the same file with the same command-line overrides
        self._reload_args = (config_path, state_dir, runtime_dir)
        self.notifier: notify.Notifier | None = None
        self.ready_sent = False
        self._not_ready_logged: str | None = None
        self.remote: RemoteListener | None = None
        self.integrity: IntegrityReport | None = None

    # -- construction ----------------------------------------------------------------
    def build(self) -> Service:
        cfg = self.cfg
        state, runtime = cfg.paths.state_dir, cfg.paths.runtime_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(state, 0o700)
        runtime.mkdir(parents=True, exist_ok=True, mode=0o755)
        # one agent per cgroup prefix, uid range, state and runtime dir: held for life
        self.instance_lock = acquire_instance_lock(cfg)
        journal = Journal(state)
        spool = Spool(state, reserve_bytes=cfg.spool.reserve_bytes,
                      fallback_dir=cfg.spool_fallback_dir)
        holder: dict = {}
        key_store = AttestationKeyStore(
            state, cfg.keys.rotate_interval_seconds, credential_name=cfg.keys.credential_name,
            fallback=lambda key_id: holder["service"].receipt_key(key_id))
        self.engine = engine = SandboxEngine(cfg, cgroup_prefix=cfg.sandbox.cgroup_prefix)
        service = Service(cfg, engine=engine, key_store=key_store, journal=journal,
                          spool=spool, version=VERSION, metrics=metrics_mod.Metrics())
        holder["service"] = service
        self.service = service
        return service

    # -- the trio program --------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The daemon, with its destroy workers ([destroy] workers) around it: they start
        first and end last, once every destruction in flight is done."""
        d = self.cfg.destroy
        async with destroy_workers.open_pool(d.workers, max_jobs=d.max_jobs_per_worker,
                                             log_level=self.cfg.log.level):
            await self._run(task_status=task_status)

    async def _run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        service = self.service or self.build()
        notifier = notify.Notifier.from_env()
        self.notifier = notifier
        try:
            await self._recover(service)
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                allowed_gids = list(cfg.rpc.allowed_gids)
                gid = socket_gid(cfg.rpc.socket_group)
                if gid is not None:
                    allowed_gids.append(gid)
                gate = ConnectionGate(effective_max_connections(cfg.rpc, cfg.node.max_sessions))
                api = Api(service, rpc=gate)
                server = RpcServer(api.dispatch, allowed_uids=cfg.rpc.allowed_uids,
                                   allowed_gids=allowed_gids, gate=gate,
                                   limits=Limits.from_config(cfg.rpc))
                sock = bind_unix_socket(cfg.socket_path, mode=cfg.rpc.socket_mode,
                                        group=cfg.rpc.socket_group)
                if cfg.remote.listen:
                    self.remote = RemoteListener(server, cfg.remote)
                    self.remote.bind()
                rpc_scope = trio.CancelScope()

                async def serve_rpc(task_status=trio.TASK_STATUS_IGNORED):
                    with rpc_scope:
                        async with trio.open_nursery() as listeners:
                            await listeners.start(server.serve, sock)
                            if self.remote is not None:
                                await listeners.start(self.remote.serve)
                            task_status.started()

                await nursery.start(serve_rpc)
                monitor = await self._start_health(nursery, service)
                api.health = monitor.snapshot
                gate.on_starved = lambda reason: monitor.fault("eee", reason)
                await self._start_debug(nursery, service)
                await self._start_metrics_http(nursery, service)
                if notifier is not None:
                    self._ready_if_healthy(notifier, service)
                    nursery.start_soon(notifier.watchdog_task)
                    nursery.start_soon(self._status_task, notifier, service)
                memory_hygiene.freeze_startup_heap()  # full collections skip start-up
                _log.info("agent_ready", version=VERSION, node_id=cfg.node.node_id,
                          socket_mode=oct(cfg.rpc.socket_mode),
                          max_connections=gate.max_connections,
                          remote=cfg.remote.listen or None)
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

    def reload_tls(self) -> None:
        """SIGHUP: re-read the [remote] listener's certificate, key and client CA (new
        connections use them; live connections are kept)."""
        if self.remote is not None:
            self.remote.reload()

    def _check_state(self, service: Service) -> IntegrityReport:
        """Journal, spool and host cross-checked before recovery (agent.service.integrity)."""
        host: set[str] = set()
        try:
            host |= set(service.engine.cgroups.leftovers())
        except Exception:
            _log.exception("host_sessions_unreadable")
        sessions_dir = self.cfg.paths.runtime_dir / "sessions"
        if sessions_dir.is_dir():
            host |= {d.name for d in sessions_dir.iterdir()}
        runtime = self.cfg.paths.runtime_dir  # a warm-pool sandbox was never a session:
        report = check_state(service.journal, service.spool,
                             host_sessions={h for h in host if SESSION_ID_RE.match(h)
                                            and not unbound_mark(runtime, h).exists()},
                             default_tier=next(iter(self.cfg.tiers)))
        for d in report.damage:
            if service.metrics is not None:
                service.metrics.inc("state_damage_total", kind=d.kind)
        return report

    async def _recover(self, service: Service) -> None:
        try:
            self.integrity = self._check_state(service)
        except Exception:  # the start goes on: recovery and health still run and say more
            _log.exception("state_check_failed")
            self.integrity = IntegrityReport()
        await self._recover_sessions(service)
        for row in self.integrity.reprove:  # ended, unacknowledged, proof lost: prove again
            try:
                await service.recover_row(row, row.get("reason") or "agent_recovery")
            except Exception:
                _log.exception("reprove_failed", session_id=row["session_id"])

    async def _recover_sessions(self, service: Service) -> None:
        self.recovery_report = await recovery.recover(
            self.cfg, journal=service.journal, driver=service.engine.cgroups,
            destroy_fn=service.recover_row, adopt_fn=service.adopt_row,
            metrics=service.metrics)

    async def _start_health(self, nursery: trio.Nursery, service: Service) -> HealthMonitor:
        mon = HealthMonitor(service, self.cfg)
        service.health = mon
        service.journal.on_failure = mon.state_fault
        service.spool.on_failure = mon.state_fault
        if self.integrity is not None:
            mon.state_damage = self.integrity.counts()
        await mon.run_once()
        nursery.start_soon(mon.run)
        return mon

    async def _start_debug(self, nursery: trio.Nursery, service: Service) -> None:
        await nursery.start(debug_mod.serve_debug, self.cfg.debug_socket_path, service)

    async def _start_metrics_http(self, nursery: trio.Nursery, service: Service) -> None:
        if self.cfg.metrics.listen:
            try:
                await nursery.start(metrics_mod.serve_http, self.cfg.metrics, service)
            except OSError as e:  # a configured endpoint that cannot listen is fatal (exit 1)
                _log.error("metrics_listen_failed", address=self.cfg.metrics.listen,
                           error=e.strerror or type(e).__name__)
                raise

    async def _status_task(self, notifier: notify.Notifier, service: Service) -> None:
        """READY=1 once the self-tests pass (re-run every timeouts.status_interval_seconds until then, so a
        transient failure at boot does not hold the start for a whole health interval);
        STATUS= refreshed whenever its text changes."""
        mon = service.health
        assert mon is not None  # started after _start_health
        last = None
        while True:
            if not self.ready_sent:
                await trio.sleep(self.cfg.timeouts.status_interval_seconds)
                await mon.run_once()
                if self._ready_if_healthy(notifier, service):
                    continue
            text = notify.status_text(mon, service)
            if text != last:
                notifier.status(text)
                last = text
            if self.ready_sent:
                await trio.sleep(self.cfg.timeouts.status_interval_seconds)

    def _ready_if_healthy(self, notifier: notify.Notifier, service: Service) -> bool:
        """Send READY=1 (with the STATUS= line) when the last self-test left us healthy."""
        mon = service.health
        text = notify.status_text(mon, service)
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
        if self.notifier is not None:
            self.notifier.reloading()
        path, state_dir, runtime_dir = self._reload_args
        res = reload_mod.reload(self.cfg, path, state_dir=state_dir, runtime_dir=runtime_dir)
        self.reload_tls()  # logs its own failure and keeps the old certificate
        metrics = self.service.metrics if self.service is not None else None
        if metrics is not None:
            metrics.inc("config_reloads_total", result="applied" if res["ok"] else "rejected")
        if self.notifier is not None:
            self.notifier.ready()
        return res

    async def _wait_for_stop(self, notifier: notify.Notifier | None, rpc_scope: trio.CancelScope,
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
            with trio.move_on_after(self.cfg.timeouts.stop_seconds) as timeout_scope:
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
                _log.warning("agent_stop_timeout", seconds=self.cfg.timeouts.stop_seconds)


def serve(config_path: Path | None, state_dir: Path | None, runtime_dir: Path | None) -> int:
    """Run the daemon until SIGTERM/SIGINT; the exit status is in the module docstring."""
    # issue 13, before any thread: freed memory is overwritten (re-exec with the wiping
    # allocator) and session mounts live in the agent's own mount namespace (as root only:
    # anyone else is refused below with a clear message)
    if os.geteuid() == 0:
        from agent.memory_hygiene import ensure_wiping_allocator
        from agent.sandbox.mounts import enter_private_namespace

        ensure_wiping_allocator()
        enter_private_namespace()
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
    except (OSError, sqlite3.Error, JournalUnavailable) as e:  # e.g. a read-only state fs
        # only OSError has a strerror (sqlite3.Error and JournalUnavailable do not)
        why = (e.strerror if isinstance(e, OSError) else None) or str(e)
        _log.error("state_dir_unusable", error=type(e).__name__)
        log.console(f"cannot use state directory {cfg.paths.state_dir} or runtime "
                    f"directory {cfg.paths.runtime_dir}: {why}")
        return EXIT_FATAL
    try:
        trio.run(daemon.run)
    except KeyboardInterrupt:  # a SIGINT before the signal receiver was installed
        _log.warning("agent_interrupted_during_start")
        return EXIT_FATAL
    except Exception as crash:
        first: BaseException = crash
        while isinstance(first, BaseExceptionGroup) and first.exceptions:
            first = first.exceptions[0]
        tb = first.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        _log.error("agent_crashed", error=type(first).__name__,
                   where=tb.tb_frame.f_code.co_name if tb is not None else None)
        return EXIT_FATAL
    return EXIT_OK
