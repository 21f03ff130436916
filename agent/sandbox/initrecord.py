"""What a sandbox's PID 1 (nrx-init) kept about the command the agent's death cut off,
read from its memory when it cannot be asked (issue 12).

Normally a restarted agent sends ATTACH and nrx-init answers with that command's wait
status and exec tag (initproto).  A sandbox that ran into its memory cap while the agent
was down cannot answer: PID 1 is charged to the same cgroup and stalls with the rest.
The agent then freezes the sandbox (CgroupHandle.contain_oom) and reads the same record
from PID 1's initialised data through /proc/PID/mem (native/init/serve.c `struct
cut_record`, found by its magic in the writable mappings of PID 1's own executable):

    char magic[16] = "nrx-init-cut/1"; int32 leader, reaped, status; uint32 tag_len;
    unsigned char tag[1024];

`clear` writes `leader = 0` once the exec is on the agent's record, as ADOPTED does for
an attached PID 1, so a second crash does not report it twice.  Plain procfs reads and
writes of a frozen process, like step 3's wipe: nothing here runs inside the sandbox.
"""

from __future__ import annotations

import os
import signal
import struct

__all__ = ["CutRecord", "clear", "read"]

MAGIC = b"nrx-init-cut/1\x00\x00"
_HEAD = struct.Struct("=16siiiI")
TAG_MAX = 1024
MAX_SCAN = 1 << 20  # PID 1's writable data is a few KiB; never read more than this


class CutRecord:
    """The exec PID 1 killed at the agent's death: its wait status and exec tag, and
    where the record lives in PID 1's memory (to clear it)."""

    def __init__(self, status: int, tag: bytes, address: int) -> None:
        self.status, self.tag, self.address = status, tag, address


def _data_ranges(pid: int) -> list[tuple[int, int]]:
    """Writable private mappings of PID 1's own executable file (its .data)."""
    exe = os.stat(f"/proc/{pid}/exe")
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 6 or not fields[1].startswith("rw"):
                continue
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            if int(fields[4]) != exe.st_ino or os.makedev(major, minor) != exe.st_dev:
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, min(hi, lo + MAX_SCAN)))
    return out


def read(pid: int) -> CutRecord | None:
    """The record of the exec PID 1 cut off, or None when there was none.  PID 1 must be
    frozen (its record could change under the read otherwise).  Raises OSError when its
    memory cannot be read, ValueError when no record is found."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for lo, hi in _data_ranges(pid):
            data = os.pread(fd, hi - lo, lo)
            at = data.find(MAGIC)
            if at < 0 or at + _HEAD.size + TAG_MAX > len(data):
                continue
            _magic, leader, reaped, status, tag_len = _HEAD.unpack_from(data, at)
            if leader <= 0:
                return None
            tag = data[at + _HEAD.size:at + _HEAD.size + min(tag_len, TAG_MAX)]
            # what ATTACHED would have said: the status PID 1 reaped, else the SIGKILL
            # it sent (serve.c attach())
            return CutRecord(status if reaped else signal.SIGKILL, bytes(tag), lo + at)
    finally:
        os.close(fd)
    raise ValueError("no nrx-init cut record in PID 1's memory")


def clear(pid: int, record: CutRecord) -> None:
    """Mark the record reported (`leader = 0`), as ADOPTED does for an attached PID 1."""
    fd = os.open(f"/proc/{pid}/mem", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, struct.pack("=i", 0), record.address + 16)
    finally:
        os.close(fd)
