"""Under the shipped systemd unit openat2 answers ENOSYS (RestrictSUIDSGID= denies it that
way: a seccomp filter cannot read the flags inside struct open_how), which broke exec with
input_data there.  Here a real seccomp filter (as systemd's) makes openat2 ENOSYS in a child,
and fsops.openat2 falls back to openat(O_NOFOLLOW) for one component only."""

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
    from agent import fsops
    from agent.sandbox.exec import write_input
    root = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
    # systemd's RestrictSUIDSGID= in small: openat2 (437) -> ENOSYS, everything else allowed
    libc = deny(437, errno.ENOSYS)
    assert libc.syscall(437, root, b"input", 0, 0) == -1 and ctypes.get_errno() == errno.ENOSYS
    write_input(root, b"input under ENOSYS", os.getuid(), os.getgid())
    out = []
    for name in ("link", "input/data", ".."):
        try:
            os.close(fsops.openat2(root, name, os.O_RDONLY))
            out.append(f"{name}:opened")
        except OSError as e:
            out.append(f"{name}:{errno.errorcode[e.errno]}")
    print(" ".join(out))
""")


def test_openat2_enosys_falls_back_for_one_component_and_never_follows_a_link(tmp_path):
    """With openat2 denied as ENOSYS, write_input still replaces /input/data (content and
    mode as usual); a symlink is refused (ELOOP) and a multi-component or '..' path still
    fails (ENOSYS) instead of being resolved without openat2's guarantees."""
    (tmp_path / "input").mkdir()
    (tmp_path / "link").symlink_to("/etc")
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=_CHILD_ENV, capture_output=True,
                         text=True, timeout=60, cwd=os.getcwd())
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["link:ELOOP", "input/data:ENOSYS", "..:ENOSYS"]
    data = tmp_path / "input" / "data"
    assert data.read_bytes() == b"input under ENOSYS"
    assert data.stat().st_mode & 0o777 == 0o444
