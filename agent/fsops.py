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
  pages that map the kernel's shared zero page are skipped (no data; writing them would
  allocate memory in a cgroup at its limit); adjacent pages coalesced.  Feed it straight to `wipe_ranges` on `/proc/PID/mem`.
"""

from __future__ import annotations

import builtins
import errno
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
    leaf_digests: builtins.bytes  # 32 bytes per block: SHA-256 of the final pass as read back
    pass_ns: list[int] = field(default_factory=list)  # wall time per pass, then read-back

    def throughput(self) -> list[float]:
        """GiB/s per pass (and for the read-back), for logs and benchmarks."""
        return [self.bytes / (ns / 1e9) / 2**30 if ns else 0.0 for ns in self.pass_ns]


def read_small(path: str | os.PathLike) -> builtins.bytes:
    """The whole of a small kernel file (a cgroup control file, /proc/swaps), read
    unbuffered: open() would add a text wrapper and five syscalls (fstat, ioctl, lseek...)
    to every read, and these are read on every exec or destruction."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return b"".join(iter(lambda: os.read(fd, 65536), b""))
    finally:
        os.close(fd)


def openat2(dirfd: int, path: str | bytes, flags: int, mode: int = 0,
            resolve: int = SAFE_RESOLVE) -> int:
    """openat2(2) with `resolve` (default never follow links, never leave dirfd).

    Where openat2 answers ENOSYS — systemd's RestrictSUIDSGID= (the shipped unit sets it)
    denies it that way, because a seccomp filter cannot read the flags inside its
    `struct open_how` — a single-component name under the default resolve is opened with
    openat(O_NOFOLLOW) instead, which gives the same guarantee for one component (never a
    link, never outside dirfd); anything else still fails."""
    raw = os.fsencode(path)
    fd = lib.nrx_openat2(dirfd, raw, flags | os.O_CLOEXEC, mode, resolve)
    if fd == -errno.ENOSYS and resolve & ~SAFE_RESOLVE == 0 and _one_component(raw):
        return os.open(raw, flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode, dir_fd=dirfd)
    if fd < 0:
        raise OSError(-fd, os.strerror(-fd), os.fsdecode(path))
    return fd


def _one_component(name: bytes) -> bool:
    return bool(name) and b"/" not in name and b"\0" not in name and name not in (b".", b"..")


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


_zero_pfns: list[tuple[int, int]] | None = None
_PFN_MASK = (1 << 55) - 1


def _own_pfn(addr: int) -> int:
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        e = int.from_bytes(f.read(8), "little")
    return e & _PFN_MASK if e >> 63 & 1 else 0


def _is_zero_page(pfn: int) -> bool:
    """/proc/kpageflags KPF_ZERO_PAGE (bit 24): never skip a PFN that is not provably zero."""
    try:
        fd = os.open("/proc/kpageflags", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return bool(int.from_bytes(os.pread(fd, 8, pfn * 8), "little") >> 24 & 1)
    finally:
        os.close(fd)


def zero_pfns() -> list[tuple[int, int]]:
    """PFN range of the kernel's shared zero page, found by read-faulting a fresh private
    anonymous page of our own and confirmed with /proc/kpageflags; [] without
    CAP_SYS_ADMIN (nothing is skipped then).  The THP huge zero page is deliberately not
    skipped: the kernel frees and reallocates it, so a cached PFN could later name real
    data (wiping it only costs an allocation)."""
    global _zero_pfns
    if _zero_pfns is not None:
        return _zero_pfns
    import ctypes
    import mmap
    found: list[tuple[int, int]] = []
    m = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE)
    try:
        m[0]  # read fault: maps the zero page
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        pfn = _own_pfn(addr)
        if pfn and _is_zero_page(pfn):
            found.append((pfn, pfn + 1))
    finally:
        m.close()  # the temporary c_char export is gone: addressof kept only an int
    _zero_pfns = found
    return found


def present_ranges(pid: int) -> list[tuple[int, int]]:
    """(address, length) of the resident memory holding `pid`'s own data (module doc)."""
    out: list[tuple[int, int]] = []
    skip = [x for r in zero_pfns() for x in r]
    cskip = ffi.new("uint64_t[]", skip or [0])
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
            mask = (1 << 63) if shared else (1 << 63) | (1 << 61)
            npages = (hi - lo) // PAGE
            cap = npages // 2 + 1
            buf = ffi.new("uint64_t[]", 2 * cap)
            n = lib.nrx_pagemap_runs(pm, lo // PAGE, npages, PAGE, mask, 1 << 63, cskip,
                                     len(skip) // 2, buf, cap)
            if n < 0:
                raise OSError(-n, f"reading /proc/{pid}/pagemap: {os.strerror(-n)}")
            for i in range(n):
                addr, length = int(buf[2 * i]), int(buf[2 * i + 1])
                if out and out[-1][0] + out[-1][1] == addr:
                    out[-1] = (out[-1][0], out[-1][1] + length)
                else:
                    out.append((addr, length))
    finally:
        os.close(pm)
    return out
