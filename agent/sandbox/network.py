"""Network namespace layer (SPEC 3.4): loopback only, up; no route anywhere.

nrx-init creates the namespace (clone) and brings `lo` up with one ioctl; no netns is
bind-mounted, so nothing is left behind when PID 1 dies.  This module inspects a
sandbox's namespace over netlink (pyroute2) from the host, for tests and `doctor`.
"""

from __future__ import annotations

import os
import socket
import threading


def inspect(pid: int) -> dict:
    """Links and routes of the network namespace of `pid`:
    {"links": [(name, up)], "routes": [(family, dst, dst_len, table)]}."""
    from pyroute2 import IPRoute

    out: dict = {}

    def run() -> None:
        # setns() affects only the calling thread: do it in a throwaway thread
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        with IPRoute() as ipr:
            out["links"] = [(link.get_attr("IFLA_IFNAME"), bool(link["flags"] & 1))
                            for link in ipr.get_links()]
            out["routes"] = [(r["family"], r.get_attr("RTA_DST"), r["dst_len"],
                              r.get_attr("RTA_TABLE"))
                             for fam in (socket.AF_INET, socket.AF_INET6)
                             for r in ipr.get_routes(family=fam)
                             if r.get_attr("RTA_TABLE") == 254]

    err: list[BaseException] = []

    def guarded() -> None:
        try:
            run()
        except BaseException as e:  # reported to the caller below
            err.append(e)

    t = threading.Thread(target=guarded)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out


def _setns(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
