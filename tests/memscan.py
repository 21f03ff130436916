"""Count copies of marker strings in another process's readable memory (test oracle).

Reads `/proc/PID/maps` and every readable mapping through `/proc/PID/mem` (root, or the
process's own user with ptrace rights), in 4 MiB windows that overlap by the longest
marker, so a marker split across two windows is still counted once.  Mappings the kernel
refuses to read (`[vvar]`, guard pages, device memory) are counted in `unreadable`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

WINDOW = 4 * 1024 * 1024


@dataclass
class ScanResult:
    counts: dict[bytes, int]
    bytes_read: int = 0
    regions: int = 0
    unreadable: list[str] = field(default_factory=list)
    where: dict[bytes, list[str]] = field(default_factory=dict)  # marker -> region names


def _regions(pid: int):
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            perms = parts[1]
            name = parts[5].strip() if len(parts) > 5 else "[anon]"
            if perms[0] != "r" or name in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
                continue
            yield start, end, name


def scan(pid: int, markers: list[bytes]) -> ScanResult:
    """Occurrences of each marker in the readable memory of `pid`."""
    res = ScanResult(counts=dict.fromkeys(markers, 0))
    overlap = max(len(m) for m in markers) - 1
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for start, end, name in _regions(pid):
            res.regions += 1
            pos, tail = start, b""
            while pos < end:
                n = min(WINDOW, end - pos)
                try:
                    chunk = os.pread(fd, n, pos)
                except OSError:
                    res.unreadable.append(f"{start:x}-{end:x} {name}")
                    break
                if not chunk:
                    break
                res.bytes_read += len(chunk)
                buf = tail + chunk
                for m in markers:
                    # count only matches that end inside the new chunk (no double count)
                    c = buf.count(m) - tail.count(m)
                    if c:
                        res.counts[m] += c
                        res.where.setdefault(m, []).append(name)
                tail = buf[-overlap:] if overlap else b""
                pos += len(chunk)
    finally:
        os.close(fd)
    return res
