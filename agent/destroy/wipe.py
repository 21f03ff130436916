"""Overwrite passes and read-back for steps 2 and 3.

Uses `agent.fsops` (native: large blocks in C) when it is importable and falls back to
the same algorithm in Python otherwise, so destruction never silently skips a wipe:

  for each pass in `passes` ("random" | "ones" | "zeros", the last is always "zeros"):
      write the pattern over every byte of every (offset, length) range of `fd`
  read the final pass back; per 4 KiB block (a short last block of a range is zero-padded
  to 4 KiB) keep SHA-256 as a Merkle leaf and count blocks that are not all zero.

`present_ranges(pid)` lists the private memory of a process that is resident and not a
clean page-cache page (pagemap: present bit 63 set, file/shared bit 61 clear), plus the
resident pages of its writable shared mappings, so no page is faulted in by the wipe.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BLOCK", "WipeResult", "data_ranges", "native", "present_ranges", "wipe_ranges"]

BLOCK = 4096
CHUNK = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
_SKIP_MAPS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")
_ZERO_BLOCK = bytes(BLOCK)

try:  # the native implementation (A2); optional until it lands
    from agent import fsops as _fsops
except Exception:  # any import failure means "use the Python path"
    _fsops = None  # type: ignore[assignment]


def native() -> bool:
    """True when the native wipe is available and used."""
    return _fsops is not None and hasattr(_fsops, "wipe_ranges")


@dataclass
class WipeResult:
    bytes: int = 0  # the evidence's name: annotations below use builtins.bytes
    blocks: int = 0
    nonzero_blocks: int = 0
    leaf_digests: builtins.bytes = b""


def _pattern(name: str, n: int) -> bytes:
    if name == "zeros":
        return bytes(n)
    if name == "ones":
        return b"\xff" * n
    if name == "random":
        return os.urandom(n)
    raise ValueError(f"unknown wipe pass {name!r}")


def _py_wipe(fd: int, ranges: Sequence[tuple[int, int]], passes: Sequence[str]) -> WipeResult:
    res = WipeResult()
    ones = zeros = None
    for p in passes:
        for off, length in ranges:
            pos, end = off, off + length
            while pos < end:
                n = min(CHUNK, end - pos)
                buf: bytes | memoryview
                if p == "random":
                    buf = os.urandom(n)
                elif p == "ones":
                    ones = ones if ones is not None and len(ones) >= n else _pattern("ones", CHUNK)
                    buf = memoryview(ones)[:n]
                else:
                    zeros = zeros if zeros is not None else bytes(CHUNK)
                    buf = memoryview(zeros)[:n]
                w = os.pwrite(fd, buf, pos)
                if w <= 0:
                    raise OSError(5, "short write during wipe")
                pos += w
    leaves = bytearray()
    sha = hashlib.sha256
    for off, length in ranges:
        pos, end = off, off + length
        while pos < end:
            n = min(CHUNK, end - pos)
            data = os.pread(fd, n, pos)
            if len(data) != n:
                raise OSError(5, "short read during read-back")
            mv = memoryview(data)
            for i in range(0, n, BLOCK):
                blk = bytes(mv[i:i + BLOCK])
                if len(blk) < BLOCK:
                    blk = blk + bytes(BLOCK - len(blk))
                leaves += sha(blk).digest()
                res.blocks += 1
                if blk != _ZERO_BLOCK:
                    res.nonzero_blocks += 1
            pos += n
        res.bytes += length
    res.leaf_digests = bytes(leaves)
    return res


def wipe_ranges(fd: int, ranges: Sequence[tuple[int, int]], passes: Sequence[str]) -> WipeResult:
    """Overwrite `ranges` of `fd` with `passes`, read the last back (see module doc)."""
    ranges = [(int(o), int(n)) for o, n in ranges if n > 0]
    if native():
        r = _fsops.wipe_ranges(fd, ranges, list(passes))
        return WipeResult(int(r.bytes), int(r.blocks), int(r.nonzero_blocks),
                          bytes(r.leaf_digests))
    return _py_wipe(fd, ranges, passes)


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The allocated (non-hole) byte ranges of a regular file, via SEEK_DATA/SEEK_HOLE, so
    a sparse file's holes are not filled (no new pages are allocated by the wipe)."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == 6:  # ENXIO: no more data
                break
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            out.append((start, end - start))
        pos = end if end > start else start + 1
    return out


def _smaps(pid: int) -> list[tuple[str, str, str, dict[str, int]]]:
    """(range, perms, name, {field: kB}) per mapping of /proc/<pid>/smaps."""
    out: list[tuple[str, str, str, dict[str, int]]] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                name = head[5].strip() if len(head) > 5 else ""
                out.append((head[0], head[1], name, {}))
            elif out and len(head) >= 2 and head[0].endswith(":") and head[1].isdigit():
                out[-1][3][head[0][:-1]] = int(head[1])
    return out


def _py_present_ranges(pid: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    maps = _smaps(pid)
    pm = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for rng, perms, name, fields in maps:
            if name in _SKIP_MAPS:
                continue
            shared = perms[3] == "s"
            if shared and (perms[1] != "w" or not fields.get("Rss")):
                continue
            if not shared and not fields.get("Anonymous"):
                continue  # no private dirty page: nothing of the process's own data
            parts = [rng]
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            npages = (hi - lo) // PAGE
            first = lo // PAGE
            idx = 0
            run_start = None
            while idx < npages:
                n = min(npages - idx, 65536)
                raw = os.pread(pm, n * 8, (first + idx) * 8)
                entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
                for j, e in enumerate(entries):
                    present = e >> 63 & 1
                    file_or_shared = e >> 61 & 1
                    keep = present and (shared or not file_or_shared)
                    addr = lo + (idx + j) * PAGE
                    if keep and run_start is None:
                        run_start = addr
                    elif not keep and run_start is not None:
                        out.append((run_start, addr - run_start))
                        run_start = None
                idx += len(entries)
                if len(entries) < n:
                    break
            if run_start is not None:
                out.append((run_start, lo + idx * PAGE - run_start))
    finally:
        os.close(pm)
    return out


def present_ranges(pid: int) -> list[tuple[int, int]]:
    """(address, length) of the resident memory of `pid` to overwrite (see module doc)."""
    if _fsops is not None and hasattr(_fsops, "present_ranges"):
        return [(int(a), int(n)) for a, n in _fsops.present_ranges(pid)]
    return _py_present_ranges(pid)
