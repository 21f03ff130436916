"""sd_notify: READY, periodic WATCHDOG from the trio loop, STOPPING (SPEC 11)."""

from __future__ import annotations

import os
import socket
import time

import trio

from agent.ops.notify import Notifier


def _server(tmp_path):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.setblocking(False)
    return s, path


def _drain(s) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except BlockingIOError:
            return out


async def test_ready_then_periodic_watchdog_then_stopping(tmp_path):
    """A notify-socket server receives READY, then WATCHDOG pings at half WatchdogSec, then STOPPING."""
    s, path = _server(tmp_path)
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000",
                           "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 0.05
    assert n.ready("serving")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(n.watchdog_task)
        await trio.sleep(0.22)
        nursery.cancel_scope.cancel()
    n.stopping()
    n.close()
    msgs = _drain(s)
    s.close()
    assert msgs[0] == "READY=1\nSTATUS=serving"
    assert msgs[-1] == "STOPPING=1"
    pings = [m for m in msgs if m == "WATCHDOG=1"]
    assert 3 <= len(pings) <= 6


async def test_watchdog_stops_when_loop_is_stuck(tmp_path):
    """While the trio loop is blocked no WATCHDOG ping goes out (so systemd can restart us)."""
    s, path = _server(tmp_path)
    n = Notifier(path, watchdog_usec=40_000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(n.watchdog_task)
        await trio.sleep(0.05)
        _drain(s)
        time.sleep(0.3)  # the loop is stuck: nothing may be sent meanwhile
        stuck = _drain(s)
        nursery.cancel_scope.cancel()
    n.close()
    s.close()
    assert stuck == []


def test_without_notify_socket_everything_is_a_noop():
    """With no $NOTIFY_SOCKET the notifier sends nothing and the watchdog task returns at once."""
    n = Notifier.from_env({})
    assert not n.enabled and not n.ready() and not n.watchdog()
    trio.run(n.watchdog_task)


def test_watchdog_for_another_pid_is_ignored(tmp_path):
    """WATCHDOG_PID naming another process disables our pings (sd_watchdog_enabled semantics)."""
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "x"), "WATCHDOG_USEC": "1000000",
                           "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None


def test_abstract_socket_address():
    """An '@' address is sent to the abstract namespace, as systemd uses it."""
    name = f"nrx-notify-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    n = Notifier("@" + name)
    assert n.ready()
    assert s.recv(100) == b"READY=1"
    n.close()
    s.close()
