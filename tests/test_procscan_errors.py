"""The /proc scans of destruction steps 5 and 6 (the C scans and the mountinfo scan) fail
on read errors instead of counting the task as gone (issue 13).  The live /proc cannot be made to fail a read on demand, so these
tests point the same scans (`nrx_scan_*_at`, `residue.mounts_of(proc=)`) at a /proc-shaped tree in a temporary
directory whose files give real kernel errors (a directory where a file is read: EISDIR;
a file where a directory is opened: ENOTDIR); a vanished task (ENOENT) is still skipped."""

from __future__ import annotations

import errno
import os

import pytest
import test_sandbox_fixtures as fx
from test_destroy_pipeline import bad, make_ctx

from agent.destroy import residue, run_pipeline

sandbox_cfg, engine, sandbox = fx.sandbox_cfg, fx.engine, fx.sandbox  # fixtures

STATUS = "Name:\tx\nUid:\t5\t5\t5\t5\nGid:\t5\t5\t5\t5\nNSpid:\t100\n"


def fake_proc(root, *, status="file", ns="dir", tid="100") -> bytes:
    """A one-task /proc tree: 100/task/<tid>/{status,ns/<name>} shaped as asked (and, for
    the per-process user-namespace link, 100/ns as a link to task/<tid>/ns)."""
    task = root / "100" / "task" / tid
    task.mkdir(parents=True)
    os.symlink(f"task/{tid}/ns", root / "100" / "ns")
    if status == "file":
        (task / "status").write_text(STATUS)
    elif status == "dir":
        (task / "status").mkdir()
    if ns == "dir":
        (task / "ns").mkdir()
        for name in residue.NAMESPACES:
            os.symlink(f"{name}:[4026531840]", task / "ns" / name)
    elif ns == "file":
        (task / "ns").write_text("")
    return os.fsencode(root)


def scan_both(root: bytes) -> tuple[int, tuple[int, int, int]]:
    """(the first error of the id and namespace scans or 0, (processes with ids,
    processes in the namespace, their threads)) of a fake tree."""
    lib, ffi = residue._lib, residue._ffi
    out = ffi.new("int[2]")
    r = ffi.new("uint64_t[]", [5, 6])
    ids = lib.nrx_scan_ids_at(root, r, 2, r, 2)
    rc = lib.nrx_scan_ns_at(root, ffi.new("uint64_t[]", [4026531840]), 1, 0x7F, out, out + 1)
    return (ids if ids < 0 else rc), (max(ids, 0), out[0], out[1])


def test_readable_tree_counts_and_vanished_task_is_skipped(tmp_path):
    """The fake tree itself scans fine (1 process by ids and by namespace), whether the
    process's one thread is its leader (read at its known path) or another thread (its task
    directory listed: a two-entry one here), and a task whose files are gone (ENOENT: it
    exited) is skipped, not an error."""
    assert scan_both(fake_proc(tmp_path / "ok")) == (0, (1, 1, 1))
    other = fake_proc(tmp_path / "other", tid="101")
    os.mkdir(tmp_path / "other" / "100" / "task" / "102")  # a second (empty: gone) thread
    assert scan_both(other) == (0, (1, 1, 1))
    assert scan_both(fake_proc(tmp_path / "gone", status="none", ns="none")) == (0, (0, 0, 0))


@pytest.mark.parametrize(("status", "ns", "err"), [("dir", "dir", errno.EISDIR),
                                                   ("file", "file", errno.ENOTDIR)])
def test_read_error_fails_the_scan(tmp_path, status, ns, err):
    """A status file that cannot be read, or an ns directory that cannot be opened, makes
    the scan return -errno (the old code counted the task as gone and answered 0)."""
    root = fake_proc(tmp_path, status=status, ns=ns)
    rc, _ = scan_both(root)
    assert rc == -err
    if ns == "file":  # the walk for the user namespace alone reads 100/ns/user
        p, t = residue._ffi.new("int *"), residue._ffi.new("int *")
        assert residue._lib.nrx_scan_ns_at(root, residue._ffi.new("uint64_t[]", [1]), 1, 1,
                                           p, t) == -err
    lib, ffi = residue._lib, residue._ffi
    if status == "dir":
        r = ffi.new("uint64_t[]", [5, 6])
        assert lib.nrx_scan_ids_at(root, r, 2, r, 2) == -err
    else:
        p, t = ffi.new("int *"), ffi.new("int *")
        assert lib.nrx_scan_ns_at(root, ffi.new("uint64_t[]", [1]), 1, 0x7F, p, t) == -err


class _ProcAt:
    """The native library with every scan pointed at a fake /proc (see module docstring);
    the pidfd id scan, which needs live tids, reads the fake tree's status files instead.
    Everything else (nsfs handles, the superblock watch) is the real library."""

    def __init__(self, lib, root: bytes) -> None:
        self._lib, self._root = lib, root

    def __getattr__(self, name):
        return getattr(self._lib, name)

    def nrx_scan_ids_pidfd(self, *a):
        return self._lib.nrx_scan_ids_at(self._root, *a)

    def nrx_scan_ns(self, *a):
        return self._lib.nrx_scan_ns_at(self._root, *a)

    def nrx_scan_ids(self, *a):
        return self._lib.nrx_scan_ids_at(self._root, *a)



async def test_scan_read_error_fails_steps_5_and_6(engine, tmp_path, monkeypatch):
    """With the scans reading a tree that gives EISDIR, destruction steps 5 and 6 fail and
    the session ends expired_unclean: an unreadable /proc is never "no residue"."""
    sb = await engine.create(fx.new_session_id(), tier="tiny", classification="general")
    monkeypatch.setattr(residue, "_lib", _ProcAt(residue._lib, fake_proc(tmp_path, status="dir")))
    out = await run_pipeline(make_ctx(sb))
    monkeypatch.undo()
    ev = {e["step"]: e for e in out.evidence}
    assert not ev[5]["ok"] and "EISDIR" in ev[5]["error"], bad(out)
    assert out.status == "expired_unclean"


MOUNTINFO = "36 35 0:99 / /x rw,relatime shared:1 - tmpfs tmpfs rw\n"


def fake_mount_proc(root, *, mountinfo="file", ns=True) -> str:
    """A one-process /proc tree for the mountinfo scan: 100/{ns/mnt,mountinfo,status}."""
    p = root / "100"
    (p / "ns").mkdir(parents=True)
    (p / "status").write_text(STATUS.replace("NSpid:\t100", "NSpid:\t100\t1"))
    if ns:
        os.symlink("mnt:[4026531841]", p / "ns" / "mnt")
    if mountinfo == "file":
        (p / "mountinfo").write_text(MOUNTINFO)
    elif mountinfo == "dir":
        (p / "mountinfo").mkdir()
    return str(root)


def test_mountinfo_scan_fails_on_a_read_error(tmp_path):
    """Step 6's scan of every mount namespace counts a readable tree, skips a process that
    is gone, and raises on a mountinfo it cannot read (it used to skip it and say 0)."""
    assert residue.mounts_of("0:99", proc=fake_mount_proc(tmp_path / "ok")) == (1, 1)
    assert residue.mounts_of("0:99", proc=fake_mount_proc(tmp_path / "gone", ns=False)) == (0, 0)
    with pytest.raises(IsADirectoryError):
        residue.mounts_of("0:99", proc=fake_mount_proc(tmp_path / "bad", mountinfo="dir"))
