"""agent.fsops: openat2 that never follows links, wipe passes over files and over the
memory of a frozen process (/proc/PID/mem), and the present-page map of a process."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import subprocess
import sys

import pytest
from suite import cgroup_prefix

from agent import fsops
from agent.config import Config
from agent.sandbox.cgroups import CgroupLimits, detect

MiB = 1 << 20
ZERO_LEAF = hashlib.sha256(bytes(4096)).digest()
SHM = "/dev/shm"  # tmpfs, like a session root


@pytest.fixture
def shm_file():
    path = os.path.join(SHM, f"nrx-test-{secrets.token_hex(6)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    yield fd
    os.close(fd)
    os.unlink(path)


@pytest.fixture
def cgroup():
    d = detect(Config(), prefix=cgroup_prefix())
    h = d.create("wipe", CgroupLimits(512 * MiB, 16, 200))
    yield h
    h.kill_all()
    h.wait_empty(5)
    h.remove()
    d.remove_root()


def test_file_three_passes_read_back_zero(shm_file):
    """A file wiped with random, ones, zeros reads back zero and every leaf is SHA-256 of a
    zero block, including the zero-padded short last block."""
    size = 3 * MiB + 100
    os.pwrite(shm_file, secrets.token_bytes(size), 0)
    r = fsops.wipe_ranges(shm_file, [(0, size)], ["random", "ones", "zeros"])
    nblocks = (size + 4095) // 4096
    assert (r.bytes, r.blocks, r.nonzero_blocks) == (size, nblocks, 0)
    assert r.leaf_digests == ZERO_LEAF * nblocks
    assert os.pread(shm_file, size + 10, 0) == bytes(size)
    assert os.fstat(shm_file).st_size == size
    assert len(r.pass_ns) == 4 and all(ns > 0 for ns in r.pass_ns)


def test_leaves_hash_what_was_read_back(shm_file):
    """A final pass of ones gives SHA-256 of 0xFF blocks, the short block zero-padded, and
    counts every block as nonzero."""
    size = 2 * 4096 + 10
    os.pwrite(shm_file, bytes(size), 0)
    r = fsops.wipe_ranges(shm_file, [(0, size)], ["ones"])
    full = hashlib.sha256(b"\xff" * 4096).digest()
    short = hashlib.sha256(b"\xff" * 10 + bytes(4086)).digest()
    assert r.leaf_digests == full + full + short
    assert r.nonzero_blocks == 3


def test_random_pass_writes_fresh_random_data(shm_file):
    """A lone random pass leaves high-entropy data that differs between blocks and runs."""
    os.pwrite(shm_file, bytes(2 * MiB), 0)
    fsops.wipe_ranges(shm_file, [(0, 2 * MiB)], ["random"])
    a = os.pread(shm_file, 2 * MiB, 0)
    fsops.wipe_ranges(shm_file, [(0, 2 * MiB)], ["random"])
    b = os.pread(shm_file, 2 * MiB, 0)
    assert a != b and a[:MiB] != a[MiB:]
    assert len(set(a[:4096])) > 200


def test_only_the_given_ranges_are_touched(shm_file):
    """Bytes outside the ranges keep their content; digests cover the ranges in order."""
    os.pwrite(shm_file, b"A" * (64 * 1024), 0)
    r = fsops.wipe_ranges(shm_file, [(4096, 4096), (20000, 5000)], ["zeros"])
    data = os.pread(shm_file, 64 * 1024, 0)
    assert data[:4096] == b"A" * 4096 and data[4096:8192] == bytes(4096)
    assert data[8192:20000] == b"A" * (20000 - 8192) and data[20000:25000] == bytes(5000)
    assert data[25000:] == b"A" * (64 * 1024 - 25000)
    assert r.blocks == 1 + 2 and r.leaf_digests == ZERO_LEAF * 3 and r.bytes == 9096


def test_wipe_errors_are_raised(shm_file):
    """Unknown passes, no passes, bad fds and ranges past the end of a file raise."""
    with pytest.raises(ValueError, match="unknown wipe pass"):
        fsops.wipe_ranges(shm_file, [(0, 10)], ["zeros", "gamma"])
    with pytest.raises(ValueError, match="between 1 and"):
        fsops.wipe_ranges(shm_file, [(0, 10)], [])
    with pytest.raises(OSError) as e:
        fsops.wipe_ranges(-1, [(0, 10)], ["zeros"])
    assert e.value.errno == errno.EBADF
    ro = os.open(f"/proc/{os.getpid()}/stat", os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            fsops.wipe_ranges(ro, [(0, 10)], ["zeros"])
    finally:
        os.close(ro)


def test_openat2_refuses_links_and_escapes(tmp_path):
    """openat2 opens plain files beneath the dirfd, refuses a symlink (ELOOP), a `..` or
    absolute escape (EXDEV), and a symlinked directory in the middle of a path (ELOOP)."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("ok")
    (tmp_path / "d" / "link").symlink_to("f")
    (tmp_path / "d" / "out").symlink_to("/etc/passwd")
    (tmp_path / "dlink").symlink_to("d")
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = fsops.openat2(dfd, "d/f", os.O_RDONLY)
        assert os.read(fd, 10) == b"ok"
        os.close(fd)
        for path, code in [("d/link", errno.ELOOP), ("d/out", errno.ELOOP),
                           ("dlink/f", errno.ELOOP), ("../x", errno.EXDEV),
                           ("d/../../x", errno.EXDEV), ("/etc/passwd", errno.EXDEV)]:
            with pytest.raises(OSError) as e:
                fsops.openat2(dfd, path, os.O_RDONLY)
            assert e.value.errno == code, path
        with pytest.raises(FileNotFoundError):
            fsops.openat2(dfd, "d/missing", os.O_RDONLY)
        fd = fsops.openat2(dfd, "d/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        assert os.fstat(fd).st_mode & 0o777 == 0o640
        assert os.get_inheritable(fd) is False
        os.close(fd)
    finally:
        os.close(dfd)


HOLDER = r"""
import os, sys
secret = bytes.fromhex(sys.stdin.readline().strip())
keep = [secret * 4]                      # a few heap copies
big = bytearray(int(sys.argv[1]))        # resident filler to wipe
for i in range(0, len(big), 4096):
    big[i] = 1
print("ready", flush=True)
sys.stdin.readline()
"""


def _spawn_holder(secret: bytes, filler: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(filler)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    p.stdin.write(secret.hex().encode() + b"\n")
    p.stdin.flush()
    assert p.stdout.readline() == b"ready\n"
    return p


def _memory_contains(pid: int, needle: bytes) -> bool:
    """Search every readable mapping of `pid` through /proc/PID/mem."""
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for lo, hi, perms, _name in fsops._maps(pid):
            if perms[0] != "r" or lo >= 0xFFFF_FFFF_FFFF:
                continue
            for off in range(lo, hi, 4 * MiB):
                try:
                    chunk = os.pread(fd, min(4 * MiB + len(needle), hi - off), off)
                except OSError:
                    break
                if needle in chunk:
                    return True
    finally:
        os.close(fd)
    return False


def _kill(p: subprocess.Popen, cg) -> None:
    cg.kill_all()
    p.wait(timeout=5)
    p.stdin.close()
    p.stdout.close()


def test_present_ranges_cover_resident_private_memory():
    """present_ranges of a live process is sorted, coalesced, page-aligned, within its
    mappings, and includes a freshly touched heap buffer."""
    buf = bytearray(8 * MiB)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    ranges = fsops.present_ranges(os.getpid())
    assert ranges == sorted(ranges)
    assert all(a % fsops.PAGE == 0 and n % fsops.PAGE == 0 and n > 0 for a, n in ranges)
    assert all(a1 + n1 < a2 for (a1, n1), (a2, _) in zip(ranges, ranges[1:], strict=False))
    assert sum(n for _, n in ranges) >= 8 * MiB
    del buf


ZERO_READER = r"""
import ctypes, mmap, sys
m = mmap.mmap(-1, 32 << 20, flags=mmap.MAP_PRIVATE)
total = sum(m[i] for i in range(0, len(m), 4096))   # read faults only: the zero page
d = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE)
d[0:1] = b"x"                                        # one written page
print(ctypes.addressof(ctypes.c_char.from_buffer(m)),
      ctypes.addressof(ctypes.c_char.from_buffer(d)), flush=True)
sys.stdin.readline()
"""


def test_present_ranges_skip_the_zero_page():
    """Pages that only map the kernel's shared zero page (read, never written) are not
    listed — they hold no data and writing them would allocate — but a written page is."""
    assert fsops.zero_pfns(), "root should see the zero page's PFN in pagemap"
    p = subprocess.Popen([sys.executable, "-c", ZERO_READER], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    try:
        zero, dirty = map(int, p.stdout.readline().split())
        ranges = fsops.present_ranges(p.pid)
        assert not any(a < zero + (32 << 20) and zero < a + n for a, n in ranges)
        assert any(a <= dirty < a + n for a, n in ranges)
    finally:
        p.kill()
        p.wait()
        p.stdin.close()
        p.stdout.close()


def test_frozen_process_memory_wipe_removes_secret(cgroup):
    """Overwriting the present ranges of a frozen process through /proc/PID/mem with three
    passes leaves zero read-back and no trace of a secret it held; then it is killed."""
    secret = secrets.token_bytes(48)
    p = _spawn_holder(secret, 4 * MiB)
    try:
        cgroup.attach(p.pid)
        cgroup.freeze()
        assert _memory_contains(p.pid, secret)  # the test would fail without the wipe
        ranges = fsops.present_ranges(p.pid)
        mem = os.open(f"/proc/{p.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        try:
            r = fsops.wipe_ranges(mem, ranges, ["random", "ones", "zeros"])
        finally:
            os.close(mem)
        assert r.bytes == sum(n for _, n in ranges) >= 4 * MiB
        assert r.nonzero_blocks == 0 and r.leaf_digests == ZERO_LEAF * r.blocks
        assert not _memory_contains(p.pid, secret)
        assert cgroup.frozen()
    finally:
        _kill(p, cgroup)


def test_wipe_three_passes_cover_64_mib(shm_file, cgroup):
    """Three passes over a 64 MiB tmpfs file and 64 MiB of frozen process memory each cover
    every byte and read back all zero (speed lives in bench/run.py's wipe row, not here)."""
    size = 64 * MiB
    os.pwrite(shm_file, secrets.token_bytes(MiB) * 64, 0)
    fsops.wipe_ranges(shm_file, [(0, size)], ["zeros"])  # warm up
    rf = fsops.wipe_ranges(shm_file, [(0, size)], ["random", "ones", "zeros"])
    p = _spawn_holder(secrets.token_bytes(32), size)
    try:
        cgroup.attach(p.pid)
        cgroup.freeze()
        ranges = fsops.present_ranges(p.pid)
        mem = os.open(f"/proc/{p.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        try:
            rm = fsops.wipe_ranges(mem, ranges, ["random", "ones", "zeros"])
        finally:
            os.close(mem)
    finally:
        _kill(p, cgroup)
    assert rf.bytes == size and rf.blocks == size // 4096 and rf.nonzero_blocks == 0
    assert rm.bytes >= size and rm.blocks == rm.bytes // 4096 and rm.nonzero_blocks == 0
    assert len(rf.pass_ns) == len(rm.pass_ns) == 4  # three passes, then the read-back


def test_random_pass_generator_is_aes_ctr():
    """The random pass's AES-NI generator is standard AES-128-CTR (checked against the
    cryptography package), including a partial last 128-byte group."""
    from agent._native import ffi, lib
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    key, nonce = secrets.token_bytes(16), 0x0102030405060708
    for n in (16, 100, 4096 + 7, MiB):
        buf = ffi.new("unsigned char[]", n)
        if lib.nrx_aes_ctr_fill(key, nonce, buf, n) == -errno.ENOSYS:
            pytest.skip("no AES-NI: the random pass uses libsodium's ChaCha20")
        enc = Cipher(algorithms.AES(key), modes.CTR(nonce.to_bytes(8, "big") + bytes(8)))
        assert bytes(ffi.buffer(buf, n)) == enc.encryptor().update(bytes(n))
