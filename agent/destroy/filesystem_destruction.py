"""Step 2 (eee_tmpfs / filesystem_destruction, method `mountinfo_verification`).

From the session tmpfs root fd pinned at creation (`sandbox.root_fd`, the agent's view),
walk the tree bottom-up without ever following a link:

* every name is a single component opened relative to its parent directory fd, with
  `O_NOFOLLOW` (and `O_DIRECTORY` for directories); `fstatat(AT_SYMLINK_NOFOLLOW)` decides
  what a name is and the opened fd is `fstat`-checked to be that same inode, so a symlink,
  a rename race or a FIFO swapped in cannot redirect a write anywhere else.  Anything on
  another device (a mount) is never entered and never unlinked;
* each regular file inode is overwritten in place once (hard links are counted by inode),
  only over its allocated ranges (SEEK_DATA/SEEK_HOLE: holes of sparse files stay holes),
  with the class's passes, and the final zero pass is read back into Merkle leaves;
* every name is unlinked (directories after their contents); the root is re-listed to
  confirm nothing is left;
* files the session deleted but still holds open or mapped (no name left to walk) are
  found first through the session processes' /proc/PID/fd and /proc/PID/map_files magic
  links (regular, no link left, on the session tmpfs or a memfd) and overwritten the same
  way (`open_unlinked_files`; their bytes and blocks are in `bytes`/`readback_blocks`);
* a file whose open is refused because a session process holds a lease on it (the
  holder is frozen and cannot release it) is pinned with an O_PATH fd and overwritten by
  step 3 right after the kill (`deferred_files`), before its pages can be freed.

Then `sandbox.detach_root_mount()` and /proc/self/mountinfo is re-read to confirm no
mount of the tmpfs superblock is left in the agent's namespace (`agent_view_unmounted`).
Deep trees never hold more than MAX_OPEN_DIRS directory fds: ancestors are closed and
re-opened through ".." with an identity (st_dev, st_ino) check.
"""

from __future__ import annotations

import builtins
import errno
import os
import stat
from dataclasses import dataclass, field

import trio

from agent.destroy import residue, wipe
from agent.destroy.context import DestroyContext, DestroyState, StepError
from agent.sandbox.engine import Sandbox

METHOD = "mountinfo_verification"
MAX_OPEN_DIRS = 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass
class TreeStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    fifos: int = 0
    other: int = 0
    hardlinks: int = 0          # names of an already wiped inode
    sparse_files: int = 0       # files with at least one hole
    logical_bytes: int = 0      # sum of st_size of the wiped inodes
    bytes: int = 0              # bytes overwritten per pass (allocated ranges only)
    blocks: int = 0
    nonzero_blocks: int = 0
    unlinked: int = 0
    unlink_failed: int = 0
    mounts_skipped: int = 0
    wipe_failed: int = 0
    deferred: list[int] = field(default_factory=list)  # O_PATH pins of leased inodes
    races: int = 0              # a name changed between fstatat and open (skipped + counted)
    loops: int = 0
    leaves: list[builtins.bytes] = field(default_factory=list)


@dataclass
class _Dir:
    fd: int | None
    ident: tuple[int, int]
    names: list[str]
    name_in_parent: str | None


def _wipe_file(dfd: int, name: str, lst: os.stat_result, passes: list[str],
               s: TreeStats) -> None:
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO):
            s.races += 1
        elif e.errno == errno.EWOULDBLOCK:
            _defer(dfd, name, lst, s)
        else:
            s.wipe_failed += 1
        return
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (lst.st_dev, lst.st_ino) or not stat.S_ISREG(fst.st_mode):
            s.races += 1
            return
        ranges = wipe.data_ranges(fd, fst.st_size)
        allocated = sum(n for _, n in ranges)
        if allocated < fst.st_size:
            s.sparse_files += 1
        r = wipe.wipe_ranges(fd, ranges, passes)
    except OSError:
        s.wipe_failed += 1  # keep going: every other file is still wiped and unlinked
        return
    finally:
        os.close(fd)
    _count_wiped(s, fst, r)


def _count_wiped(s: TreeStats, fst: os.stat_result, r) -> None:
    """Account one wiped file: its size, what was overwritten and read back."""
    s.files += 1
    s.logical_bytes += fst.st_size
    s.bytes += r.bytes
    s.blocks += r.blocks
    s.nonzero_blocks += r.nonzero_blocks
    s.leaves.append(r.leaf_digests)


def _defer(dfd: int, name: str, lst: os.stat_result, s: TreeStats) -> None:
    """A lease held by a (frozen) session process refuses our open (EWOULDBLOCK instead of
    waiting up to lease-break-time).  Pin the inode with an O_PATH fd, which breaks no
    lease; step 3 overwrites it through that fd once the holder is dead."""
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        s.wipe_failed += 1
        return
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino) or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        s.races += 1
        return
    s.deferred.append(fd)


def wipe_deferred(fds: list[int], passes: list[str]) -> TreeStats:
    """Overwrite the inodes step 2 had to defer (see _defer), through /proc/self/fd: the
    magic link names exactly the pinned inode, no path is resolved.  Closes the fds."""
    s = TreeStats()
    while fds:
        pin = fds.pop()
        try:
            fd = os.open(f"/proc/self/fd/{pin}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            s.wipe_failed += 1
            os.close(pin)
            continue
        try:
            a, b = os.fstat(fd), os.fstat(pin)
            if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                s.wipe_failed += 1
                continue
            ranges = wipe.data_ranges(fd, a.st_size)
            r = wipe.wipe_ranges(fd, ranges, passes)
            s.files += 1
            s.bytes += r.bytes
            s.blocks += r.blocks
            s.nonzero_blocks += r.nonzero_blocks
            s.leaves.append(r.leaf_digests)
        except OSError:
            s.wipe_failed += 1
        finally:
            os.close(fd)
            os.close(pin)
    return s


def _remove(dfd: int, name: str, is_dir: bool, s: TreeStats) -> None:
    try:
        if is_dir:
            os.rmdir(name, dir_fd=dfd)
        else:
            os.unlink(name, dir_fd=dfd)
        s.unlinked += 1
    except OSError:
        s.unlink_failed += 1


def _reopen_parent(child_fd: int, want: tuple[int, int]) -> int:
    fd = os.open("..", _DIR_FLAGS, dir_fd=child_fd)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != want:
        os.close(fd)
        raise StepError("directory moved during destruction")
    return fd


def _is_memfd(link: str) -> bool:
    return link.startswith("/memfd:")


def wipe_open_unlinked(pids: list[int], dev: int, passes: list[str]) -> TreeStats:
    """Overwrite the files the session deleted but still holds open or mapped (a name-based
    walk cannot see them): every regular file with no link left that a session process
    reaches through /proc/PID/fd/* or /proc/PID/map_files/*, on the session tmpfs (`dev`)
    or a memfd.  The magic link names exactly that inode; nothing else of the host is
    reachable from a sandbox process.  Leased ones are pinned for step 3 (see _defer)."""
    s = TreeStats()
    seen: set[tuple[int, int]] = set()
    for pid in pids:
        for sub in ("fd", "map_files"):
            base = f"/proc/{pid}/{sub}"
            try:
                names = os.listdir(base)
            except OSError:
                continue
            for n in names:
                path = f"{base}/{n}"
                try:
                    lst = os.stat(path)  # follows the magic link to the inode itself
                except OSError:
                    continue
                if not stat.S_ISREG(lst.st_mode) or lst.st_nlink != 0:
                    continue  # most entries (the mapped binaries and libraries): no readlink
                if lst.st_dev != dev:
                    try:
                        if not _is_memfd(os.readlink(path)):
                            continue
                    except OSError:
                        continue
                key = (lst.st_dev, lst.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                _wipe_unlinked(path, lst, passes, s)
    return s


def _wipe_unlinked(path: str, lst: os.stat_result, passes: list[str], s: TreeStats) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EWOULDBLOCK:
            try:
                pin = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                s.wipe_failed += 1
                return
            pst = os.fstat(pin)
            if (pst.st_dev, pst.st_ino) == (lst.st_dev, lst.st_ino):
                s.deferred.append(pin)
            else:
                os.close(pin)
                s.races += 1
        else:
            s.wipe_failed += 1
        return
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (lst.st_dev, lst.st_ino):
            s.races += 1
            return
        ranges = wipe.data_ranges(fd, fst.st_size)
        r = wipe.wipe_ranges(fd, ranges, passes)
    except OSError:
        s.wipe_failed += 1  # e.g. a memfd sealed against writes
        return
    finally:
        os.close(fd)
    _count_wiped(s, fst, r)


def destroy_tree(root_fd: int, passes: list[str]) -> TreeStats:
    """Wipe and unlink everything below `root_fd` (see module doc); returns counts only."""
    s = TreeStats()
    rst = os.fstat(root_fd)
    dev = rst.st_dev
    top = os.open(".", _DIR_FLAGS, dir_fd=root_fd)
    stack = [_Dir(top, (rst.st_dev, rst.st_ino), sorted(os.listdir(top), reverse=True), None)]
    seen_inodes: set[int] = set()
    seen_dirs: set[int] = {rst.st_ino}
    try:
        while stack:
            cur = stack[-1]
            if not cur.names:
                stack.pop()
                assert cur.fd is not None
                if stack:
                    parent = stack[-1]
                    if parent.fd is None:
                        parent.fd = _reopen_parent(cur.fd, parent.ident)
                    os.close(cur.fd)
                    assert cur.name_in_parent is not None
                    _remove(parent.fd, cur.name_in_parent, True, s)
                else:
                    os.close(cur.fd)
                cur.fd = None
                continue
            name = cur.names.pop()
            assert cur.fd is not None
            try:
                lst = os.stat(name, dir_fd=cur.fd, follow_symlinks=False)
            except FileNotFoundError:
                s.races += 1
                continue
            if lst.st_dev != dev:
                s.mounts_skipped += 1
                continue
            mode = lst.st_mode
            if stat.S_ISDIR(mode):
                if lst.st_ino in seen_dirs:
                    s.loops += 1
                    continue
                seen_dirs.add(lst.st_ino)
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=cur.fd)
                except OSError:
                    s.races += 1
                    continue
                fst = os.fstat(fd)
                if (fst.st_dev, fst.st_ino) != (lst.st_dev, lst.st_ino):
                    os.close(fd)
                    s.races += 1
                    continue
                s.dirs += 1
                stack.append(_Dir(fd, (fst.st_dev, fst.st_ino),
                                  sorted(os.listdir(fd), reverse=True), name))
                if len(stack) > MAX_OPEN_DIRS:
                    far = stack[-MAX_OPEN_DIRS - 1]
                    if far.fd is not None:
                        os.close(far.fd)
                        far.fd = None
                continue
            if stat.S_ISREG(mode):
                if lst.st_ino in seen_inodes:
                    s.hardlinks += 1
                else:
                    seen_inodes.add(lst.st_ino)
                    _wipe_file(cur.fd, name, lst, passes, s)
            elif stat.S_ISLNK(mode):
                s.symlinks += 1
            elif stat.S_ISFIFO(mode):
                s.fifos += 1
            else:
                s.other += 1
            _remove(cur.fd, name, False, s)
    finally:
        for d in stack:
            if d.fd is not None:
                os.close(d.fd)
    return s


def _session_pids(sb: Sandbox | None) -> list[int]:
    if sb is None:  # recovery without a sandbox to re-adopt: no session processes
        return []
    try:
        return list(sb.cgroup.pids())
    except Exception:
        return []


def _detach(sb: Sandbox | None, dev: str) -> tuple[bool, int]:
    """(detach_root_mount() succeeded, mounts of the session tmpfs still in our view)."""
    ok = False  # without a sandbox there is no root mount of ours to detach
    if sb is not None:
        try:
            sb.detach_root_mount()
            ok = True
        except Exception:
            ok = False
    return ok, residue.own_mounts_of(dev)


def _wipe_and_detach(sb: Sandbox | None, root_fd: int, pids: list[int], dev_num: int, dev: str,
                     passes: list[str]) -> tuple:
    """Open-but-unlinked files, then the tree, then what is left in the root, then the
    detach: (o, s, remaining, (detached, mounts left) or the OSError of that check)."""
    o = wipe_open_unlinked(pids, dev_num, passes)
    s = destroy_tree(root_fd, passes)
    remaining = _remaining(root_fd)
    try:
        detach: tuple | BaseException = _detach(sb, dev)
    except OSError as e:  # raised after the results above are recorded
        detach = e
    return o, s, remaining, detach


def _remaining(root_fd: int) -> int:
    fd = os.open(".", _DIR_FLAGS, dir_fd=root_fd)
    try:
        return len(os.listdir(fd))
    finally:
        os.close(fd)


async def run(ctx: DestroyContext, st: DestroyState, ev: dict) -> None:
    sb = ctx.sandbox
    ev.update({"fs_type": "unknown", "size_limit_bytes": 0, "files": 0, "dirs": 0,
               "symlinks": 0, "bytes": 0, "passes": list(ctx.passes), "readback_blocks": 0,
               "unlinked": 0, "agent_view_unmounted": False})
    root_fd = sb.root_fd if sb is not None else None
    if root_fd is None or root_fd < 0:
        raise StepError("no pinned root fd")
    rst = os.fstat(root_fd)
    if st.pin_fd < 0:
        st.pin_fd = os.dup(root_fd)
    st.tmpfs_dev_num = rst.st_dev
    st.tmpfs_dev = residue.dev_str(rst.st_dev)
    # the kernel's f_type of the pinned root answers at once; the mount table is read
    # (and names the type) only when it is not a tmpfs
    tmpfs = residue.fs_magic(root_fd) == residue.TMPFS_MAGIC
    mine = [] if tmpfs else [m for m in residue.read_mountinfo() if m.dev == st.tmpfs_dev]
    if tmpfs:
        ev["fs_type"] = "tmpfs"
    elif not mine and sb is not None:
        # a re-adopted sandbox seen through its PID 1's root (the agent's own mount
        # namespace is new since the restart): its mount table says what the root is
        try:
            mine = [m for m in residue.read_mountinfo(sb.init_pid) if m.dev == st.tmpfs_dev]
        except OSError:
            mine = []
    if mine:
        ev["fs_type"] = mine[0].fs_type
    try:
        vfs = os.fstatvfs(root_fd)
        ev["size_limit_bytes"] = vfs.f_blocks * vfs.f_frsize
    except OSError:
        ev["size_limit_bytes"] = sb.tmpfs_bytes if sb is not None else 0
    errors = []
    if ev["fs_type"] != "tmpfs":
        errors.append("session root is not a mounted tmpfs")

    # first what the session deleted but still holds (invisible to the walk; after the
    # walk our own unlinks would make every open file look like one)
    pids = list(st.frozen_pids) or _session_pids(sb)
    # one worker-thread call for the whole sequence (each thread hop costs the event
    # loop a wake-up and a GIL hand-off); the detach has to follow the wipe anyway
    o, s, remaining, detach = await trio.to_thread.run_sync(
        _wipe_and_detach, sb, root_fd, pids, rst.st_dev, st.tmpfs_dev, list(ctx.passes))
    st.deferred_fds.extend(o.deferred + s.deferred)
    st.leaves_fs = [blk for leaves in o.leaves + s.leaves for blk in
                    (leaves[i:i + 32] for i in range(0, len(leaves), 32))]
    ev.update({"files": s.files, "dirs": s.dirs, "symlinks": s.symlinks, "fifos": s.fifos,
               "other": s.other, "hardlinks": s.hardlinks, "sparse_files": s.sparse_files,
               "logical_bytes": s.logical_bytes + o.logical_bytes, "bytes": s.bytes + o.bytes,
               "readback_blocks": s.blocks + o.blocks, "open_unlinked_files": o.files,
               "nonzero_blocks": s.nonzero_blocks + o.nonzero_blocks, "unlinked": s.unlinked,
               "remaining": remaining, "mounts_skipped": s.mounts_skipped, "races": s.races,
               "deferred_files": len(s.deferred) + len(o.deferred)})
    if s.nonzero_blocks:
        errors.append("read-back not zero")
    if s.wipe_failed or o.wipe_failed:
        errors.append("a file could not be overwritten")
    if o.races:
        errors.append("an open file changed during destruction")
    if s.unlink_failed or remaining:
        errors.append("entries left after unlink")
    if s.mounts_skipped or s.races or s.loops:
        errors.append("tree changed or held foreign mounts during destruction")

    # umount and the removal of the mount point each wait for an RCU grace period:
    # done in the worker thread above, so the event loop served other sessions meanwhile
    if isinstance(detach, BaseException):
        raise detach
    detached, left = detach
    if not detached:
        errors.append("detach failed")
    ev["agent_view_unmounted"] = not left
    if left:
        errors.append("agent view still mounted")
    if errors:
        raise StepError("; ".join(errors))
