"""Steps 5 and 6 take the kernel's word where it is authoritative (an nsfs handle that
went stale: the namespace no longer exists; IN_UNMOUNT on the tmpfs root: the superblock
was shut down, so no mount of it is left; a thread pidfd's credentials), and each such
check still finds what it claims is absent: a host process left in a session namespace,
a copy of the session tmpfs in another mount namespace, a thread running as the session's
uid while its process's leader does not.  Real sandboxes, real leftovers."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import test_sandbox_fixtures as fx
from test_destroy_pipeline import bad, make_ctx

from agent.destroy import DestroyHooks, residue, run_pipeline

sandbox_cfg, engine, sandbox = fx.sandbox_cfg, fx.engine, fx.sandbox  # fixtures


async def _destroy_with(engine, start_leftover, at_step: int = 1):
    """Destroy a fresh session; after step `at_step` ends, `start_leftover(sb)` starts a
    host process (killed after the pipeline)."""
    sb = await engine.create(fx.new_session_id(), tier="tiny", classification="general")
    procs: list[subprocess.Popen] = []

    async def after_step(n, ev):
        if n == at_step:
            procs.append(start_leftover(sb))

    try:
        out = await run_pipeline(make_ctx(sb, passes=["zeros"],
                                          hooks=DestroyHooks(after_step=after_step)))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return out, {e["step"]: e for e in out.evidence}


def _ready(p: subprocess.Popen) -> subprocess.Popen:
    """Wait for the helper's first output line (it has joined / unshared)."""
    assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    return p


async def test_clean_destroy_answers_from_kernel_facts(engine):
    """A clean session's namespaces are gone (stale handles) but for the user and PID
    namespaces the kernel frees a little later; its PID namespace has no init, and its
    tmpfs superblock is shut down by step 6: at most the user namespace is walked for, no
    mount namespace is read, ids are read through pidfds, and the proof is complete."""
    out, ev = await _destroy_with(engine, lambda sb: subprocess.Popen(["true"]))
    assert out.status == "destroyed", bad(out)
    assert ev[5]["ids_read_via"] == "pidfd_info" and ev[5]["uts_namespace_released"] is True
    assert ev[6]["namespaces_released"] >= 5 and set(ev[6]["namespaces_walked"]) <= {"user"}
    assert ev[6]["namespaces_released"] == 7 or ev[6]["pid_namespace_emptied"] is True \
        or ev[6]["namespaces_released"] == 6
    assert ev[6]["superblock_released"] is True and ev[6]["nsfs_mounts_searched"] == []
    assert ev[6]["mount_namespaces_scanned"] == 0
    assert ev[6]["residue"] == {"processes": 0, "mounts": 0, "cgroups": 0}
    assert ev[6]["namespaces_pinned"] is True


def _join(sb, flag: str) -> subprocess.Popen:
    """A host process (outside the session's cgroup, so step 3 does not kill it) that
    joined one of the session's namespaces with nsenter."""
    return _ready(subprocess.Popen(
        ["nsenter", "-t", str(sb.init_pid), flag, "--", sys.executable, "-c",
         "import time; print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE))


async def test_a_process_left_in_the_session_net_namespace_fails_step_6(engine):
    """The net namespace still exists (the kernel reopens its handle), so step 6 walks for
    it, finds the process, and fails with residue; the other six are gone."""
    out, ev = await _destroy_with(engine, lambda sb: _join(sb, "-n"))
    assert out.status == "expired_unclean"
    assert not ev[6]["ok"] and "session residue found" in ev[6]["error"]
    assert ev[6]["residue"]["processes"] == 1 and "net" in ev[6]["namespaces_walked"]
    assert "net" in ev[6]["nsfs_mounts_searched"] and ev[6]["host_walk_sessions"] >= 1


async def test_a_process_left_in_the_session_uts_namespace_fails_steps_5_and_6(engine):
    """A process in the session's UTS namespace keeps it alive: step 5 does not retire the
    hostname (it walked and found the process) and step 6 finds it as residue."""
    out, ev = await _destroy_with(engine, lambda sb: _join(sb, "-u"))
    assert out.status == "expired_unclean"
    assert not ev[5]["ok"] and "hostname not retired" in ev[5]["error"]
    assert ev[5]["uts_namespace_released"] is False and ev[5]["hostname_retired"] is False
    assert ev[6]["residue"]["processes"] == 1 and not ev[6]["ok"]


def _in_mount_namespace(sb) -> subprocess.Popen:
    """A host process (outside the session's cgroup) that joined the session's mount
    namespace, which keeps that namespace and its mount of the session tmpfs alive."""
    mnt = os.stat(f"/proc/{sb.init_pid}/ns/mnt").st_ino
    p = subprocess.Popen(["nsenter", "-t", str(sb.init_pid), "-m", "--", "sleep", "60"])
    deadline = time.monotonic() + 10
    while True:
        try:
            if os.stat(f"/proc/{p.pid}/ns/mnt").st_ino == mnt:
                return p
        except FileNotFoundError:
            pass
        assert p.poll() is None and time.monotonic() < deadline, "nsenter did not join"
        time.sleep(0.005)


async def test_a_mount_of_the_session_tmpfs_left_alive_fails_step_6(engine):
    """A mount of the tmpfs kept alive (here by a host process in the session's mount
    namespace) keeps the superblock, so no IN_UNMOUNT comes: step 6 reads every mount
    namespace, finds the mount (and the process), and fails with residue."""
    out, ev = await _destroy_with(engine, _in_mount_namespace)
    assert out.status == "expired_unclean"
    assert ev[6]["superblock_released"] is False and ev[6]["residue"]["mounts"] >= 1
    assert ev[6]["residue"]["processes"] == 1 and "mnt" in ev[6]["namespaces_walked"]
    assert ev[6]["mount_namespaces_scanned"] >= 2 and not ev[6]["ok"]


THREAD_SETUID = """
import ctypes, sys, threading, time
uid = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def thread():
    # the raw syscall changes this thread's credentials only (glibc's setresuid would
    # change every thread's)
    assert libc.syscall(117, uid, uid, uid) == 0, ctypes.get_errno()
    print("ready", flush=True)
    time.sleep(60)
threading.Thread(target=thread, daemon=True).start()
time.sleep(60)
"""


def _thread_with_uid(sb) -> subprocess.Popen:
    """A host process whose leader stays root while one of its threads runs as the
    session's host uid."""
    return _ready(subprocess.Popen([sys.executable, "-c", THREAD_SETUID, str(sb.host_uid)],
                                   stdout=subprocess.PIPE))


async def test_a_thread_running_as_the_session_uid_fails_step_5(engine):
    """Credentials are per thread: the pidfd scan reads each thread's own, so a thread
    holding the uid under a root leader is found and the slot is kept."""
    out, ev = await _destroy_with(engine, _thread_with_uid, at_step=4)
    assert not ev[5]["ok"] and "processes still run with session ids" in ev[5]["error"]
    assert ev[5]["processes_with_ids"] == 1 and ev[5]["slot_released"] is False
    assert ev[5]["ids_read_via"] == "pidfd_info"


def test_pidfd_scan_reads_each_threads_own_credentials():
    """The pidfd id scan and the status oracle agree on a process whose only holder of an
    unused uid is a non-leader thread, and both find it (no session needed)."""
    import oracles

    uid = 3_999_999_000 + os.getpid() % 900
    p = _ready(subprocess.Popen([sys.executable, "-c", THREAD_SETUID, str(uid)],
                                stdout=subprocess.PIPE))
    try:
        r = [(uid, uid + 1)]
        assert residue.processes_with_ids_fast(r, []) == (1, "pidfd_info")
        assert oracles.py_processes_with_ids(r, []) == 1
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 5
    while residue.processes_with_ids_fast([(uid, uid + 1)], [])[0]:
        assert time.monotonic() < deadline
        time.sleep(0.01)


class _OlderKernel:
    """The native library as a kernel before 6.18 / 6.13 / 6.8 answers it: no nsfs file
    handles (EOPNOTSUPP), no PIDFD_GET_INFO (ENOTTY), no listmount (ENOSYS).  A fake for
    a kernel this host does not run; everything else is the real library."""

    def __init__(self, lib) -> None:
        self._lib = lib

    def __getattr__(self, name):
        return getattr(self._lib, name)

    def nrx_ns_handle(self, *a):
        return -errno.EOPNOTSUPP

    def nrx_scan_ids_pidfd(self, *a):
        return -errno.ENOTTY

    def nrx_own_mounts_of_dev(self, *a):
        return -errno.ENOSYS


async def test_without_the_new_kernel_facts_every_check_walks_and_still_finds(
        engine, monkeypatch):
    """On an older kernel steps 5 and 6 walk everything (the evidence says so): a clean
    session still ends destroyed, and a process left in its net namespace is still found."""
    monkeypatch.setattr(residue, "_lib", _OlderKernel(residue._lib))
    out, ev = await _destroy_with(engine, lambda sb: subprocess.Popen(["true"]))
    assert out.status == "destroyed", bad(out)
    assert ev[5]["ids_read_via"] == "proc_status" and ev[5]["uts_namespace_released"] is False
    assert len(ev[6]["namespaces_walked"]) == 7 and ev[6]["namespaces_released"] == 0
    assert ev[6]["mount_namespaces_scanned"] >= 1 and ev[6]["namespaces_pinned"] is True
    out, ev = await _destroy_with(engine, lambda sb: _join(sb, "-n"))
    assert out.status == "expired_unclean" and ev[6]["residue"]["processes"] == 1
