"""systemd notify protocol (sd_notify) over $NOTIFY_SOCKET: READY, RELOADING, STOPPING, STATUS,
WATCHDOG; and `status_text`, the one-line STATUS= the daemon keeps current.

The watchdog ping is sent by a trio task, so it stops when the trio loop is stuck and systemd
restarts the agent (WatchdogSec in the unit).  Without $NOTIFY_SOCKET every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time

import trio

from agent import log
from agent.ops.view import ServiceView
from agent.service.hooks import HealthHook


class Notifier:
    """Sends sd_notify datagrams; `address` None disables it."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self.sent: list[str] = []  # last messages, for the debug socket / tests

    @classmethod
    def from_env(cls, environ: dict | None = None) -> Notifier:
        """Build from $NOTIFY_SOCKET / $WATCHDOG_USEC / $WATCHDOG_PID (ignored if for another pid)."""
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET") or None
        usec = 0
        try:
            usec = int(env.get("WATCHDOG_USEC", "0"))
        except ValueError:
            usec = 0
        wpid = env.get("WATCHDOG_PID")
        if wpid and wpid.isdigit() and int(wpid) != os.getpid():
            usec = 0
        return cls(addr, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of WatchdogSec, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec > 0 else None

    def notify(self, message: str) -> bool:
        """Send one datagram; False (logged) when it could not be sent."""
        if self.address is None:
            return False
        addr = self.address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), addr)
        except OSError as e:
            log.get().warning("sd_notify_failed", error=e.strerror or str(e))
            return False
        self.sent = (self.sent + [message])[-16:]
        return True

    def ready(self, status: str | None = None) -> bool:
        msg = "READY=1" + (f"\nSTATUS={status}" if status else "")
        return self.notify(msg)

    def stopping(self, status: str | None = None) -> bool:
        msg = "STOPPING=1" + (f"\nSTATUS={status}" if status else "")
        return self.notify(msg)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (systemd >= 253 needs it; older ones ignore it)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time (EXTEND_TIMEOUT_USEC), e.g. during a long recovery."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    async def watchdog_task(self) -> None:
        """Ping WATCHDOG=1 every WATCHDOG_USEC/2 from the trio loop until cancelled."""
        interval = self.watchdog_interval
        if not self.enabled or interval is None:
            return
        while True:
            self.watchdog()
            await trio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_text(health: HealthHook | None, service: ServiceView) -> str:
    """"ready: 12 sessions", "degraded: eee — <reason>", "unhealthy: database — <reason>",
    "draining: 3 sessions" (what `systemctl status` shows)."""
    try:
        live = int(service.capacity().get("sessions_live", 0))
    except Exception:
        live = -1
    sessions = f"{live} session{'' if live == 1 else 's'}" if live >= 0 else "sessions unknown"
    if service.draining:
        return f"draining: {sessions}"
    if health is None:
        return f"ready: {sessions}"
    if not health.database:
        return f"unhealthy: database — {health.database_reason}"
    failed = [n for n, ok in health.engines.items() if not ok]
    if failed:
        first = failed[0]
        more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
        return f"degraded: {first} — {health.reasons.get(first) or 'failed'}{more}"
    return f"ready: {sessions}"
