"""Re-adoption fetches the sandbox's kept tmpfs view with pidfd_getfd; under the systemd unit
(SystemCallFilter=~@debug) that syscall fails with EPERM and the engine reaches the same open
file through /proc/PID/fd.  Here a real seccomp filter (as the unit's) denies it in a child."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")])}

CHILD = textwrap.dedent("""
    import ctypes, errno, os, sys
    from seccomp_deny import deny
    from agent.sandbox import engine
    target, fd, want = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    # the unit's filter in small: pidfd_getfd (438) -> EPERM, everything else allowed
    libc = deny(438, errno.EPERM)
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
                                  f"{st.st_dev}:{st.st_ino}"], env=_CHILD_ENV, capture_output=True, text=True,
                                 timeout=60, cwd=os.getcwd())
            assert res.returncode == 0, res.stderr[-2000:]
            assert res.stdout.strip() == "True"
        finally:
            holder.kill()
            holder.wait()
    finally:
        os.close(fd)
