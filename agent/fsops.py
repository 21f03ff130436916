"""Host-side file operations on sandbox files, and wipe passes (native, agent._native).

- `openat2(dirfd, path, flags, mode=0, resolve=RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`:
  open relative to a directory fd without ever following a link or leaving the directory
  (raises OSError with the kernel's errno: ELOOP for a symlink, EXDEV for a `..` escape).
- `wipe_ranges(fd, ranges, passes) -> WipeResult`: `ranges` are `(offset, length)` pairs
  (file offsets, or virtual addresses for `/proc/PID/mem`); every pass ("random" =
  ChaCha20 keyed from getrandom, "ones" = 0xFF, "zeros") is written over every range with
  pwrite in 1 MiB blocks, then the final pass is read back with pread and digested: one
  SHA-256 per 4 KiB block (a short last block of a range zero-padded to 4 KiB), and the
  blocks that are not all zero are counted.  Runs in C without the GIL.
- `present_ranges(pid) -> [(address, length)]`: the memory of a (frozen) process that
  holds its own data: resident pages (pagemap bit 63) of private mappings that are not
  clean page-cache pages (bit 61 clear), plus resident pages of writable shared mappings;
  adjacent pages coalesced.  Feed it straight to `wipe_ranges` on `/proc/PID/mem`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent._native import ffi, lib

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
SAFE_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS

BLOCK = 4096
PAGE = os.sysconf("SC_PAGE_SIZE")
PASSES = {"random": 0, "ones": 1, "zeros": 2}
MAX_PASSES = 7
_SKIP_MAPS = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")


@dataclass
class WipeResult:
    bytes: int  # bytes covered by the ranges (each pass writes them all)
    blocks: int  # 4 KiB blocks read back
    nonzero_blocks: int  # read-back blocks that are not all zero
    leaf_digests: bytes  # 32 bytes per block: SHA-256 of the final pass as read back
    pass_ns: list[int] = field(default_factory=list)  # wall time per pass, then read-back

    def throughput(self) -> list[float]:
        """GiB/s per pass (and for the read-back), for logs and benchmarks."""
        return [self.bytes / (ns / 1e9) / 2**30 if ns else 0.0 for ns in self.pass_ns]


def openat2(dirfd: int, path: str | bytes, flags: int, mode: int = 0,
            resolve: int = SAFE_RESOLVE) -> int:
    """openat2(2) with `resolve` (default never follow links, never leave dirfd)."""
    fd = lib.nrx_openat2(dirfd, os.fsencode(path), flags | os.O_CLOEXEC, mode, resolve)
    if fd < 0:
        raise OSError(-fd, os.strerror(-fd), os.fsdecode(path))
    return fd


def wipe_ranges(fd: int, ranges: Sequence[tuple[int, int]], passes: Sequence[str]) -> WipeResult:
    """Overwrite `(offset, length)` ranges of `fd` with `passes`; read the last one back."""
    ranges = [(int(o), int(n)) for o, n in ranges if int(n) > 0]
    if not passes or len(passes) > MAX_PASSES:
        raise ValueError(f"between 1 and {MAX_PASSES} wipe passes are needed, got {len(passes)}")
    try:
        codes = [PASSES[p] for p in passes]
    except KeyError as e:
        raise ValueError(f"unknown wipe pass {e.args[0]!r}; use random, ones or zeros") from None
    for off, n in ranges:
        if off < 0 or off + n >= 2**63:
            raise ValueError(f"range ({off:#x}, {n}) is outside 0..2^63")
    nblocks = sum((n + BLOCK - 1) // BLOCK for _, n in ranges)
    starts = ffi.new("uint64_t[]", [o for o, _ in ranges] or [0])
    lens = ffi.new("uint64_t[]", [n for _, n in ranges] or [0])
    cpasses = ffi.new("int[]", codes)
    digests = ffi.new("unsigned char[]", max(1, nblocks * 32))
    res = ffi.new("struct nrx_wipe_result *")
    rc = lib.nrx_wipe_ranges(fd, starts, lens, len(ranges), cpasses, len(codes), digests, res)
    if rc < 0:
        raise OSError(-rc, f"wipe failed at offset {res.err_offset:#x}: {os.strerror(-rc)}")
    return WipeResult(int(res.bytes), int(res.blocks), int(res.nonzero_blocks),
                      bytes(ffi.buffer(digests, nblocks * 32)),
                      [int(res.pass_ns[i]) for i in range(len(codes) + 1)])


def _maps(pid: int) -> list[tuple[int, int, str, str]]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            name = parts[5].strip() if len(parts) > 5 else ""
            out.append((lo, hi, parts[1], name))
    return out


def present_ranges(pid: int) -> list[tuple[int, int]]:
    """(address, length) of the resident memory holding `pid`'s own data (module doc)."""
    out: list[tuple[int, int]] = []
    pm = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for lo, hi, perms, name in _maps(pid):
            if name in _SKIP_MAPS:
                continue
            shared = perms[3] == "s"
            if shared and perms[1] != "w":
                continue
            # private: keep present pages that are not page-cache/shared (bit 61 clear);
            # writable shared: keep every present page (its content is the session's)
            need = (1 << 63) if shared else (1 << 63) | (1 << 61)
            want = 1 << 63
            first, npages = lo // PAGE, (hi - lo) // PAGE
            idx = 0
            while idx < npages:
                n = min(npages - idx, 1 << 16)
                raw = os.pread(pm, n * 8, (first + idx) * 8)
                got = len(raw) // 8
                if got == 0:
                    break
                for j, e in enumerate(memoryview(raw).cast("Q")):
                    if e & need == want:
                        addr = lo + (idx + j) * PAGE
                        if out and out[-1][0] + out[-1][1] == addr:
                            out[-1] = (out[-1][0], out[-1][1] + PAGE)
                        else:
                            out.append((addr, PAGE))
                idx += got
    finally:
        os.close(pm)
    return out
