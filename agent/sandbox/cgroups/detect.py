"""Pick the cgroup driver from the statfs magic of /sys/fs/cgroup (SPEC 3.5)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from .base import CgroupDriver, CgroupError
from .v1 import V1Driver
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
    """The driver for this host; `prefix` overrides cfg.sandbox.cgroup_prefix (tests)."""
    prefix = prefix or cfg.sandbox.cgroup_prefix
    if detect_mode() == "v2":
        own = own_cgroup()
        # in "/" (no systemd) the mount is ours; under systemd the delegated unit cgroup is
        root = CGROUP_ROOT if own == "/" else CGROUP_ROOT / own.lstrip("/")
        return V2Driver(prefix, root, delegated=own != "/")
    return V1Driver(prefix)
