"""For child processes of tests: install a real seccomp filter that fails one syscall with
one errno and allows everything else (how systemd's unit filters answer the agent: EPERM
for pidfd_getfd under SystemCallFilter=~@debug, ENOSYS for openat2 under
RestrictSUIDSGID=).  Irreversible for the calling process: only ever call it in a child."""

from __future__ import annotations

import ctypes
import struct


def deny(nr: int, err: int) -> ctypes.CDLL:
    """Make syscall `nr` fail with `err` in this process from now on; returns libc."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    ins = [(0x20, 0, 0, 0),  # load the syscall number
           (0x15, 0, 1, nr),  # == nr ?
           (0x06, 0, 0, 0x00050000 | err),  # SECCOMP_RET_ERRNO | err
           (0x06, 0, 0, 0x7FFF0000)]  # SECCOMP_RET_ALLOW
    raw = b"".join(struct.pack("HBBI", *i) for i in ins)
    buf = ctypes.create_string_buffer(raw)
    prog = ctypes.create_string_buffer(struct.pack("HxxxxxxQ", len(ins), ctypes.addressof(buf)))
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.addressof(prog), 0, 0) == 0  # PR_SET_SECCOMP, filter
    return libc
