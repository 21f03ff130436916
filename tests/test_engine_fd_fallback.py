"""Re-adoption fetches the sandbox's kept tmpfs view with pidfd_getfd; under the systemd unit
(SystemCallFilter=~@debug) that syscall fails with EPERM and the engine reaches the same open
file through /proc/PID/fd.  Here a real seccomp filter (as the unit's) denies it in a child."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import ctypes, errno, os, struct, sys
    from agent.sandbox import engine
    target, fd, want = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    # the unit's filter in small: pidfd_getfd (438) -> EPERM, everything else allowed
    ins = [(0x20, 0, 0, 0), (0x15, 0, 1, 438), (0x06, 0, 0, 0x00050000 | errno.EPERM),
           (0x06, 0, 0, 0x7FFF0000)]
    raw = b"".join(struct.pack("HBBI", *i) for i in ins)
    buf = ctypes.create_string_buffer(raw)
    prog = struct.pack("HxxxxxxQ", len(ins), ctypes.addressof(buf))
    pbuf = ctypes.create_string_buffer(prog)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.addressof(pbuf), 0, 0) == 0  # seccomp filter
    pidfd = os.pidfd_open(target)
    assert libc.syscall(438, pidfd, fd, 0) == -1 and ctypes.get_errno() == errno.EPERM
    got = engine._pidfd_getfd(pidfd, fd)
    st = os.fstat(got)
    print(f"{st.st_dev}:{st.st_ino}" == want)
""")


def test_kept_fd_is_reached_through_proc_when_pidfd_getfd_is_denied(tmp_path):
    """With pidfd_getfd denied (EPERM) by a seccomp filter, _pidfd_getfd still returns the
    target's open file (same device and inode) through /proc/PID/fd."""
    d = tmp_path / "view"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        holder = subprocess.Popen(["sleep", "60"], pass_fds=(fd,))
        try:
            st = os.stat(d)
            res = subprocess.run([sys.executable, "-c", CHILD, str(holder.pid), str(fd),
                                  f"{st.st_dev}:{st.st_ino}"], capture_output=True, text=True,
                                 timeout=60, cwd=os.getcwd())
            assert res.returncode == 0, res.stderr[-2000:]
            assert res.stdout.strip() == "True"
        finally:
            holder.kill()
            holder.wait()
    finally:
        os.close(fd)
