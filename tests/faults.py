"""Real faults for the state tests: small tmpfs file systems (size=/nr_inodes=), filled
space and inodes, the immutable flag, and what a test checks afterwards (a proof verifies,
a session's file system is gone from the host)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import subprocess
from pathlib import Path

from agent.cdp.verify import verify

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x10


@contextlib.contextmanager
def small_fs(path: Path, *, size: str = "4m", inodes: int = 512, ro: bool = False):
    """Mount a tmpfs of `size` and `inodes` at `path`; unmounted (lazily if busy) after."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size},nr_inodes={inodes},mode=0700" + (",ro" if ro else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        for p in path.rglob("*"):  # an immutable file or dir would keep the test's tree
            with contextlib.suppress(OSError):
                set_immutable(p, False)
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)


def set_immutable(path: Path, on: bool) -> None:
    """chattr +i / -i through FS_IOC_SETFLAGS (works on tmpfs since Linux 6.0)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        buf = fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0))
        flags = struct.unpack("i", buf)[0]
        flags = flags | FS_IMMUTABLE_FL if on else flags & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
    finally:
        os.close(fd)


def fill_space(fs: Path) -> Path:
    """Write zeros into `fs`/filler until the file system is full (ENOSPC)."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    chunk = bytes(64 * 1024)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return filler
                chunk = chunk[:len(chunk) // 2]
    finally:
        os.close(fd)


def fill_inodes(fs: Path) -> Path:
    """Create empty files in `fs`/inodes until no inode is left (ENOSPC)."""
    d = fs / "inodes"
    d.mkdir()
    n = 0
    while True:
        try:
            os.close(os.open(d / str(n), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            return d
        n += 1


def free(path: Path) -> None:
    """Undo fill_space / fill_inodes."""
    if path.is_dir():
        for p in path.iterdir():
            p.unlink()
        path.rmdir()
    else:
        path.unlink()


def verifies(proof: dict) -> bool:
    """The destroy result's CDP verifies (signature, chain, evidence)."""
    return verify(proof["cdp"])["valid"] is True


def mounted(path: Path) -> bool:
    """`path` is a mount point on the host right now."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)
