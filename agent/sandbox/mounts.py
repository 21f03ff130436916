"""Mount namespace layer (SPEC 3.2): the plan nrx-init applies, and the agent side of the
session tmpfs.

nrx-init mounts the session tmpfs at `<runtime_dir>/sessions/<id>/root` in the AGENT's
mount namespace (so the agent can wipe it through a root fd), then, inside the new mount
namespace: read-only binds of the runtime, merged-usr links, /proc, a minimal /dev with
/dev/shm, generated /etc, /work, /tmp, /input; pivot_root into the tmpfs.

The agent's mount namespace is its own (`enter_private_namespace`, called by `serve`
before anything else): the host's mount table never lists a session tmpfs, and no other
host user can reach one through the runtime dir (whose `sessions/` is 0700 root besides).
Mounts made on the host still propagate in (slave), none propagate out.  When the agent
dies, its namespace and its view of every tmpfs die with it; a sandbox that outlives it
keeps its own mount namespace, whose root is the tmpfs: a new agent reaches it through
`/proc/<init pid>/root` (root only, ptrace rules), never through a host path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
from pathlib import Path

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_SLAVE = 0x80000
SESSIONS_MODE = 0o700
_libc = ctypes.CDLL(None, use_errno=True)


def enter_private_namespace() -> None:
    """Move this process into a new mount namespace whose mounts never propagate to the
    host (the host's still propagate in).  Must run while the process has one thread
    (unshare(CLONE_NEWNS) implies CLONE_FS).  Raises OSError: the daemon does not start
    with session mounts visible to the host."""
    if _libc.unshare(CLONE_NEWNS) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unshare(CLONE_NEWNS): {os.strerror(e)}")
    if _libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"making / a slave mount: {os.strerror(e)}")


def sessions_root(runtime_dir: Path) -> Path:
    """`<runtime_dir>/sessions`, created 0700 (root only) and kept so: every session
    mount point lives below it."""
    d = Path(runtime_dir) / "sessions"
    d.mkdir(mode=SESSIONS_MODE, parents=True, exist_ok=True)
    if (d.stat().st_mode & 0o777) != SESSIONS_MODE:
        os.chmod(d, SESSIONS_MODE)
    return d


def session_dir(runtime_dir: Path, session_id: str) -> Path:
    return Path(runtime_dir) / "sessions" / session_id


def mount_path(runtime_dir: Path, session_id: str) -> Path:
    return session_dir(runtime_dir, session_id) / "root"


def attach_path(runtime_dir: Path, session_id: str) -> Path:
    """The socket a restarted agent re-attaches to the session's PID 1 through."""
    return session_dir(runtime_dir, session_id) / "attach"


def make_mount_point(root: Path) -> None:
    """Create a session's mount point (`mount_path`) below the 0700 `sessions/` directory,
    each new directory 0700."""
    sessions_root(root.parent.parent.parent)
    root.parent.mkdir(mode=SESSIONS_MODE, exist_ok=True)
    root.mkdir(mode=SESSIONS_MODE, exist_ok=True)


def plan(sandbox_cfg) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(ro_binds as (host source, inside target), links as (name, target)).

    Without an image directory the host's runtime paths are bound at the same place and
    each merged-usr link is made only if the host has `/usr/<name>`.  With
    `image_dir`, each entry of `ro_binds` is taken from inside the image instead.
    """
    image = sandbox_cfg.image_dir
    binds = []
    for path in sandbox_cfg.ro_binds:
        inside = "/" + path.strip("/")
        src = str(Path(image) / inside.lstrip("/")) if image else inside
        if os.path.isdir(src):
            binds.append((src, inside))
    top = Path(image) if image else Path("/")
    links = [(name, f"usr/{name}") for name in sandbox_cfg.usr_links
             if (top / "usr" / name).is_dir()]
    return binds, links


def is_mountpoint(path: Path) -> bool:
    target = os.fsencode(os.path.abspath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mp = line.split()[4].replace(b"\\040", b" ")
            if mp == target:
                return True
    return False


def detach(path: Path) -> bool:
    """umount2(path, MNT_DETACH|UMOUNT_NOFOLLOW) until nothing is mounted there; True if
    something was unmounted.  Idempotent."""
    done = False
    for _ in range(8):
        if _libc.umount2(os.fsencode(path), MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
            e = ctypes.get_errno()
            if e in (errno.EINVAL, errno.ENOENT):
                return done
            raise OSError(e, os.strerror(e), str(path))
        done = True
    return done


def remove_session_dir(runtime_dir: Path, session_id: str) -> None:
    """Remove the (now unmounted) session directory; never descends into a mount."""
    d = session_dir(runtime_dir, session_id)
    root = d / "root"
    if root.exists() and is_mountpoint(root):
        raise OSError(errno.EBUSY, "session tmpfs still mounted", str(root))
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(d)
