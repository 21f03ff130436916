"""Mount namespace layer (SPEC 3.2): the plan nrx-init applies, and the agent side of the
session tmpfs.

nrx-init mounts the session tmpfs at `<runtime_dir>/sessions/<id>/root` in the AGENT's
mount namespace (so the agent can wipe it through a root fd), then, inside the new mount
namespace, applies the mount plan built here (`setup_plan`: an ordered list of
`SetupOp`s, bubblewrap's SetupOp list as the model: read-only binds of the runtime,
merged-usr links, /proc, a minimal /dev with /dev/shm, generated /etc, /work, /tmp,
/input) and pivot_roots into the tmpfs.  The ops, their bounds and their wire format are
in native/init/proto.h; docs/design.md (Sandbox, mount plan) lists them.

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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent._native import lib as _native

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
    `image_dir`, each entry of `ro_binds` is taken from inside the image instead.  Raises
    PlanError (the agent does not start) when they make a plan nrx-init would refuse.
    """
    image = sandbox_cfg.image_dir
    binds = []
    for path in sandbox_cfg.ro_binds:
        inside = "/" + path.strip("/")
        src = str(Path(image) / inside.lstrip("/")) if image else inside
        if os.path.isdir(src):
            binds.append((src, inside))
    top = Path(image) if image else Path("/")
    if any(not name or "/" in name for name in sandbox_cfg.usr_links):
        raise PlanError("sandbox.usr_links holds names of /usr entries, without a slash")
    links = [(name, f"usr/{name}") for name in sandbox_cfg.usr_links
             if (top / "usr" / name).is_dir()]
    # checked once, at start: a bad runtime bind or link stops the engine, not each create
    check_plan(setup_plan(binds, links, sandbox_id=0))
    return binds, links


# ---- the mount plan (mirrors native/init/proto.h: change both together) ----------------
OP_DIR, OP_FILE, OP_SYMLINK, OP_BIND, OP_PROC = 1, 2, 3, 4, 5
OP_NAMES = {OP_DIR: "dir", OP_FILE: "file", OP_SYMLINK: "symlink", OP_BIND: "bind",
            OP_PROC: "proc"}
RO, NOSUID, NODEV, NOEXEC, REC = 1, 2, 4, 8, 16
NO_ID = 0xFFFFFFFF
MAX_OPS = 256
MAX_OP_PATH = 1024
MAX_OP_DATA = 4096
DEVICES = ("null", "zero", "full", "random", "urandom")
DEV_LINKS = (("/dev/fd", "/proc/self/fd"), ("/dev/stdin", "/proc/self/fd/0"),
             ("/dev/stdout", "/proc/self/fd/1"), ("/dev/stderr", "/proc/self/fd/2"))


class PlanError(ValueError):
    """A mount plan breaks a rule nrx-init would refuse it for (proto.h)."""


@dataclass(frozen=True)
class SetupOp:
    """One step of the mount plan.  `dest` is an absolute path inside the sandbox; `arg`
    is the bind source (a host path), the symlink's text or the file's content."""

    kind: int
    dest: str
    arg: bytes = b""
    mode: int = 0
    flags: int = 0
    uid: int = NO_ID
    gid: int = NO_ID

    def check(self) -> None:
        """Raise PlanError unless nrx-init's parser accepts this op (proto.c, parse_op)."""
        kind = OP_NAMES.get(self.kind)
        ids = (self.uid, self.gid) != (NO_ID, NO_ID)
        rules = {
            "dir": not self.flags and not self.arg,
            "file": not self.flags and len(self.arg) <= MAX_OP_DATA,
            "symlink": (not self.flags and not self.mode and not ids
                        and 0 < len(self.arg) <= MAX_OP_PATH and b"\0" not in self.arg),
            "bind": (not self.flags & ~(RO | NOSUID | NODEV | NOEXEC | REC) and not self.mode
                     and not ids and _path_ok(self.arg)),
            "proc": not self.flags and not self.mode and not ids and not self.arg,
        }
        if kind is None:
            raise PlanError(f"unknown mount op kind {self.kind}")
        if not (_path_ok(self.dest.encode()) and 0 <= self.mode <= 0o7777 and rules[kind]
                and 0 <= self.uid <= NO_ID and 0 <= self.gid <= NO_ID):
            raise PlanError(f"mount op {kind} breaks the plan's rules (proto.h)")


def _path_ok(p: bytes) -> bool:
    """Absolute, <= MAX_OP_PATH bytes, no NUL, no empty, "." or ".." component."""
    parts = p.split(b"/")
    return (2 <= len(p) <= MAX_OP_PATH and p.startswith(b"/") and b"\0" not in p
            and all(c not in (b"", b".", b"..") for c in parts[1:]))


def dir_op(dest: str, mode: int, owner: int | None = None) -> SetupOp:
    ids = NO_ID if owner is None else owner
    return SetupOp(OP_DIR, dest, mode=mode, uid=ids, gid=ids)


def file_op(dest: str, mode: int, text: str) -> SetupOp:
    return SetupOp(OP_FILE, dest, text.encode(), mode=mode)


def symlink_op(dest: str, target: str) -> SetupOp:
    return SetupOp(OP_SYMLINK, dest, target.encode())


def bind_op(src: str, dest: str, flags: int = 0) -> SetupOp:
    return SetupOp(OP_BIND, dest, os.fsencode(src), flags=flags)


def proc_op(dest: str) -> SetupOp:
    return SetupOp(OP_PROC, dest)


def setup_plan(binds: list[tuple[str, str]], links: list[tuple[str, str]], *,
               sandbox_id: int) -> list[SetupOp]:
    """The sandbox's filesystem, in the order nrx-init applies it: read-only binds of the
    runtime (`binds` from `plan`, each with the directories above it), merged-usr links,
    /proc, /dev (device binds from the host, /dev/shm in the session tmpfs: charged to the
    session, wiped with it), /etc (its /etc/hostname and /etc/hosts are the session's
    identity: nrx-init's set_identity writes them, at setup or at a pooled sandbox's BIND),
    /work (the sandbox user's), /tmp, /input.  Not checked
    here: `plan()` checks it once at start and InitConfig.encode at the wire (check_plan,
    PlanError), so each create checks it once."""
    ops: list[SetupOp] = []
    made: set[str] = set()
    for src, inside in binds:
        for d in reversed(PurePosixPath(inside).parents[:-1]):
            if str(d) not in made:
                made.add(str(d))
                ops.append(dir_op(str(d), 0o755))
        made.add(inside)
        ops.append(dir_op(inside, 0o755))
        ops.append(bind_op(src, inside, REC | RO | NOSUID | NODEV))
    ops += [symlink_op(f"/{name}", target) for name, target in links if f"/{name}" not in made]
    ops += [dir_op("/proc", 0o555), proc_op("/proc"), dir_op("/dev", 0o755),
            dir_op("/dev/shm", 0o1777)]
    for dev in DEVICES:
        ops += [file_op(f"/dev/{dev}", 0o666, ""), bind_op(f"/dev/{dev}", f"/dev/{dev}")]
    ops += [symlink_op(name, target) for name, target in DEV_LINKS]
    i = sandbox_id
    ops += [
        dir_op("/etc", 0o755),
        file_op("/etc/passwd", 0o644, "root:x:0:0:root:/root:/usr/sbin/nologin\n"
                f"sandbox:x:{i}:{i}:sandbox:/work:/bin/sh\n"
                "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
        file_op("/etc/group", 0o644, f"root:x:0:\nsandbox:x:{i}:\nnogroup:x:65534:\n"),
        file_op("/etc/nsswitch.conf", 0o644,
                "passwd: files\ngroup: files\nshadow: files\nhosts: files\n"),
        dir_op("/work", 0o700, owner=sandbox_id),
        dir_op("/tmp", 0o1777),
        dir_op("/input", 0o755),
    ]
    return ops


def check_plan(ops: list[SetupOp]) -> None:
    """Raise PlanError unless nrx-init accepts the whole list (each op, and its length)."""
    if not 0 < len(ops) <= MAX_OPS:
        raise PlanError(f"a mount plan has 1..{MAX_OPS} ops, not {len(ops)}")
    for op in ops:
        op.check()


def is_mountpoint(path: Path) -> bool:
    """Something is mounted at `path` in our view: statx's STATX_ATTR_MOUNT_ROOT (the
    kernel's answer, without reading a mountinfo line per live session), else mountinfo."""
    target = os.fsencode(os.path.abspath(path))
    r = _native.nrx_is_mount_root(target)
    if r >= 0:
        return bool(r)
    if r == -errno.ENOENT:
        return False
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
