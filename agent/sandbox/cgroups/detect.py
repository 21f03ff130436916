"""Pick the cgroup driver from the statfs magic of /sys/fs/cgroup (SPEC 3.5)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from agent import log

from . import systemd_scope
from .base import CgroupDriver, CgroupError
from .v1 import V1Driver, find_mounts, find_named_systemd
from .v2 import V2Driver, own_cgroup

CGROUP2_SUPER_MAGIC = 0x63677270
TMPFS_MAGIC = 0x01021994
CGROUP_ROOT = Path("/sys/fs/cgroup")
_libc = ctypes.CDLL(None, use_errno=True)


def fs_magic(path: Path) -> int:
    """f_type of statfs(path) (the first field of struct statfs on 64-bit Linux)."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def detect_mode(root: Path = CGROUP_ROOT) -> str:
    magic = fs_magic(root)
    if magic == CGROUP2_SUPER_MAGIC:
        return "v2"
    if magic == TMPFS_MAGIC:
        return "v1"
    raise CgroupError(f"{root} is neither cgroup2 nor a tmpfs of v1 hierarchies "
                      f"(statfs magic {magic:#x}); mount cgroups there")


def detect(cfg, *, prefix: str | None = None) -> CgroupDriver:
    """The driver for this host; `prefix` overrides cfg.sandbox.cgroup_prefix (tests).
    Under systemd (and `[sandbox] systemd_scope = "auto"`) the session cgroups go into the
    sandbox scope (systemd_scope.py), made or re-used here; if it cannot be made, they go
    where they did before the scope (the unit's cgroup: sessions then die with the agent)
    and the failure is logged at error."""
    prefix = prefix or cfg.sandbox.cgroup_prefix
    where = systemd_scope.from_host(cfg.sandbox.systemd_scope)
    if detect_mode() == "v2":
        own = own_cgroup()
        # in "/" (no systemd) the mount is ours; under systemd the delegated unit cgroup is
        root = CGROUP_ROOT if own == "/" else CGROUP_ROOT / own.lstrip("/")
        if where is not None:
            scope = _scope(cfg, where, prefix, [CGROUP_ROOT / where.scope_path(prefix)],
                           holder_leaf=True)
            if scope is not None:
                return V2Driver(prefix, scope.root, delegated=True, scope=scope,
                                legacy_roots=[root])
        return V2Driver(prefix, root, delegated=own != "/")
    if where is not None:
        _, unified = find_mounts()
        named = find_named_systemd()
        dirs = [m / where.scope_path(prefix) for m in (unified, named) if m is not None]
        scope = _scope(cfg, where, prefix, dirs, holder_leaf=False) if dirs else None
        if scope is not None:
            return V1Driver(prefix, scope=scope)
    return V1Driver(prefix)


def _scope(cfg, where: systemd_scope.Placement, prefix: str, dirs: list[Path], *,
           holder_leaf: bool) -> systemd_scope.SandboxScope | None:
    scope = systemd_scope.SandboxScope(where, prefix, dirs, holder_leaf=holder_leaf,
                                       start_timeout=cfg.timeouts.systemd_scope_seconds)
    try:
        scope.ensure()
    except (OSError, CgroupError) as e:
        log.get().error("sandbox_scope_unavailable", scope=scope.name,
                        error=f"{type(e).__name__}: {e}"[:300],
                        effect="sessions live in the agent's unit and end with it")
        return None
    return scope
