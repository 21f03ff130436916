"""Step 3 (eee_memory / multipass_overwrite, method `dod_5220_multipass_wipe`).

For every process of the (frozen) session cgroup, nrx-init included, overwrite its
resident private memory through /proc/PID/mem with the class's passes and read the final
zero pass back (wipe.present_ranges: present pages only, found through pagemap, so no
page is faulted in), and the System V shared memory segments of the session's IPC
namespace that no process has attached (sysv_shm); the memory cap is first raised by the bytes to overwrite, since
writing a page still shared copy-on-write after a fork makes a copy.  Then SIGKILL everything (cgroup kill, which thaws a v1 freezer so
the kills are delivered, and PID 1 through its pidfd), wait (bounded) until the cgroup is
empty and its memory usage is 0, and remove the cgroup directories (step 6 verifies that
they are gone).  Records the swap state as found (/proc/swaps devices, and the cgroup's
swap limit) and `init_on_free` as the running kernel has it (kernel command line first,
then the kernel's build config), with the source it was read from.
"""

from __future__ import annotations

import fcntl
import gzip
import os
import platform
import termios
import time
from typing import Any

import trio

from agent import fsops
from agent.destroy import filesystem_destruction as fsd
from agent.destroy import residue, sysv_shm, wipe
from agent.destroy.context import DestroyContext, DestroyState, StepError
from agent.sandbox.cgroups import CgroupHandle
from agent.sandbox.engine import Sandbox

METHOD = "dod_5220_multipass_wipe"


_BOOT_INIT_ON_FREE: tuple[bool, str] | None = None


def init_on_free(cmdline: str | None = None, config: str | None = None) -> tuple[bool, str]:
    """(enabled, source): `init_on_free=` on the kernel command line wins, then
    CONFIG_INIT_ON_FREE_DEFAULT_ON from /proc/config.gz or /boot/config-<release>.
    Read once per process for the running kernel (both are fixed until the next boot;
    decompressing /proc/config.gz cost ~0.8 ms per destruction)."""
    global _BOOT_INIT_ON_FREE
    if cmdline is None and config is None:
        if _BOOT_INIT_ON_FREE is None:
            _BOOT_INIT_ON_FREE = _init_on_free(None, None)
        return _BOOT_INIT_ON_FREE
    return _init_on_free(cmdline, config)


def _init_on_free(cmdline: str | None, config: str | None) -> tuple[bool, str]:
    if cmdline is None:
        try:
            with open("/proc/cmdline") as f:
                cmdline = f.read()
        except OSError:
            cmdline = ""
    for tok in cmdline.split():
        if tok == "--":
            break  # the rest goes to init, not to the kernel
        if tok.startswith("init_on_free="):
            return tok.split("=", 1)[1].lower() in ("1", "on", "y", "yes", "true"), "cmdline"
    if config is None:
        try:
            with gzip.open("/proc/config.gz", "rt") as f:
                config = f.read()
        except OSError:
            try:
                with open(f"/boot/config-{platform.release()}") as f:
                    config = f.read()
            except OSError:
                config = None
    if config is not None:
        for line in config.splitlines():
            if line.startswith("CONFIG_INIT_ON_FREE_DEFAULT_ON="):
                return line.split("=", 1)[1].strip() == "y", "kernel_config"
            if line.strip() == "# CONFIG_INIT_ON_FREE_DEFAULT_ON is not set":
                return False, "kernel_config"
    return False, "unknown"


def swap_devices() -> int:
    """Active swap areas in /proc/swaps."""
    try:
        data = fsops.read_small("/proc/swaps")
    except OSError:
        return -1
    return max(0, len([ln for ln in data.splitlines() if ln.strip()]) - 1)


def cgroup_swap_limited(cgroup: CgroupHandle) -> bool:
    """The session cgroup forbids swap: v2 memory.swap.max == 0, v1 memsw limit == limit."""
    try:
        return cgroup.swap_limited()
    except (OSError, ValueError):
        return False


def _exited(pid: int) -> bool:
    """The process is gone or a zombie: it has no address space left to overwrite."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def plan_processes(pids: list[int]) -> tuple[dict[int, list[tuple[int, int]] | None], int]:
    """pid -> present ranges to overwrite (None when unreadable), and the total bytes."""
    plan: dict[int, list[tuple[int, int]] | None] = {}
    for pid in pids:
        try:
            plan[pid] = wipe.present_ranges(pid)
        except OSError:
            plan[pid] = None
    return plan, sum(n for r in plan.values() if r for _, n in r)


def raise_cap(cgroup: CgroupHandle, extra: int) -> bool:
    """Give the frozen cgroup room for the copy-on-write copies the overwrite may make
    (a page shared after fork is copied when written through /proc/PID/mem): the memory
    limit becomes current usage + the bytes to overwrite + 4 MiB."""
    try:
        cgroup.set_memory_limit(int(cgroup.memory_usage()) + extra + (4 << 20))
        return True
    except (OSError, ValueError):
        return False


def wipe_processes(plan: dict, passes: list[str]) -> dict:
    """Overwrite the planned memory of each pid; counts and read-back leaves."""
    out: dict[str, Any] = {"processes": 0, "failed": 0, "exited": 0, "bytes": 0, "blocks": 0,
                           "nonzero": 0, "leaves": []}
    for pid, ranges in plan.items():
        try:
            if ranges is None:
                raise OSError("no plan")
            if not ranges:  # nothing resident (or an exited process without memory)
                out["processes"] += 1
                continue
            fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
            try:
                r = wipe.wipe_ranges(fd, ranges, passes)
            finally:
                os.close(fd)
        except OSError:
            if _exited(pid):
                out["exited"] += 1  # its memory was released by the kernel, not by us
            else:
                out["failed"] += 1
            continue
        out["processes"] += 1
        out["bytes"] += r.bytes
        out["blocks"] += r.blocks
        out["nonzero"] += r.nonzero_blocks
        d = r.leaf_digests
        out["leaves"].extend(d[i:i + 32] for i in range(0, len(d), 32))
    return out


def pipe_and_socket_buffers(pids: list[int]) -> tuple[int, int]:
    """(bytes queued in the session's pipes, sockets held) of the frozen processes.  Pipes
    are measured with FIONREAD on a fresh non-blocking read open through /proc/PID/fd
    (nothing is read); socket queues cannot be reached that way and are only counted.
    Neither is drained nor wiped (SPEC 13): the evidence says so."""
    seen: set[int] = set()
    queued = sockets = 0
    buf = bytearray(4)
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            kind, _, rest = link.partition(":[")
            if kind not in ("pipe", "socket") or not rest.endswith("]"):
                continue
            ino = int(rest[:-1])
            if ino in seen:
                continue
            seen.add(ino)
            if kind == "socket":
                sockets += 1
                continue
            try:
                pfd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.ioctl(pfd, termios.FIONREAD, buf)
                queued += int.from_bytes(buf, "little")
            except OSError:
                pass
            finally:
                os.close(pfd)
    return queued, sockets


def _plan_and_wipe(cgroup: CgroupHandle, pids: list[int], passes: list[str],
                   ipc_fd: int | None) -> tuple[tuple[int, int], bool, dict, dict]:
    """The frozen processes' pipe and socket buffers measured (pipe_and_socket_buffers),
    then plan_processes, raise_cap (when there is a cgroup), wipe_processes, then the
    unattached SysV segments of the pinned IPC namespace (None without a pin)."""
    buffers = pipe_and_socket_buffers(pids)
    plan, total = plan_processes(pids)
    cap_raised = raise_cap(cgroup, total)
    w = wipe_processes(plan, passes)
    shm = sysv_shm.wipe_segments(ipc_fd, passes) if ipc_fd is not None else {}
    return buffers, cap_raised, w, shm


def memory_after(cgroup: CgroupHandle) -> tuple[int, int]:
    """(user bytes, kernel bytes) still charged to the cgroup (CgroupHandle.memory_after)."""
    return cgroup.memory_after()


def _pinned(st: DestroyState, name: str) -> int | None:
    """Step 1's pin on one of the session's namespaces (None when step 1 could not pin)."""
    if len(st.ns_fds) != len(residue.NAMESPACES):
        return None
    return st.ns_fds[residue.NAMESPACES.index(name)]


def _is_session_init(pid: int, st: DestroyState, sb: Sandbox) -> bool:
    """A pid outside the cgroup is only wiped when it provably is the session's PID 1
    (its PID namespace is the session's): after a crash the number may name another
    process of the host."""
    want = st.namespaces.get("pid") or sb.namespaces.get("pid")
    if not want:
        return False
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino == want
    except OSError:
        return False


async def _release(cgroup: CgroupHandle, timeout: float) -> tuple[int, int, int]:
    """Wait (bounded) until no user page is charged to the empty cgroup, asking the kernel
    to reclaim before each look (clean page cache the session read stays charged
    otherwise; pages still in per-CPU LRU batches and the per-CPU charge stocks are only
    released by the drain each request does).  What one request leaves, the next one
    usually takes at once (waiting alone did not release it: measured), so the first
    requests follow each other in one worker-thread call, without the 2 ms sleeps
    between them; only then does it back off (2 ms, then 20 ms).  Returns (reclaim
    requests, user bytes, kernel bytes) of the last look."""
    rounds, user, kernel = 0, -1, -1
    with trio.move_on_after(timeout):
        tries = 3
        while True:
            try:
                n, user, kernel = await trio.to_thread.run_sync(cgroup.reclaim_rounds, tries)
            except OSError:
                break
            rounds += n
            if user == 0:
                break
            await trio.sleep(0.002 if rounds < 5 else 0.02)
            tries = 1
    return rounds, user, kernel


async def _poll(pred, timeout: float) -> bool:
    with trio.move_on_after(timeout):
        delay = 0.0005
        while True:
            try:
                if pred():
                    return True
            except OSError:
                pass
            await trio.sleep(delay)
            delay = min(delay * 2, 0.02)
    try:
        return bool(pred())
    except OSError:
        return False


async def freeze(sb: Sandbox, st: DestroyState, ev: dict, errors: list[str],
                 timeout: float) -> list[int]:
    """The processes to wipe: the frozen cgroup's, plus PID 1 when it provably is the
    session's (it may sit outside the cgroup after a half-done attach)."""
    pids: list[int] = []
    try:
        if not sb.cgroup.frozen():
            await trio.to_thread.run_sync(sb.cgroup.freeze, timeout)
        pids = list(sb.cgroup.pids())
    except Exception:
        errors.append("cannot freeze for the memory wipe")
    if sb.init_pid and sb.init_pid not in pids and _is_session_init(sb.init_pid, st, sb):
        pids.append(sb.init_pid)
    ev["processes_found"] = len(pids)
    return pids


async def wipe_memory(ctx: DestroyContext, st: DestroyState, ev: dict, pids: list[int],
                      errors: list[str]) -> None:
    """Overwrite and read back every process's memory and the unattached SysV segments."""
    sb = ctx.sandbox
    assert sb is not None
    t0 = time.perf_counter_ns()
    ipc_fd = _pinned(st, "ipc")
    # the pipe buffers (a /proc/PID/fd listing and a readlink per fd, off the event
    # loop), plan, cap, overwrite and the SysV segments in one worker-thread call (each
    # thread hop costs the event loop a wake-up and a GIL hand-off)
    (queued, sockets), cap_raised, w, shm = await trio.to_thread.run_sync(
        _plan_and_wipe, sb.cgroup, pids, list(ctx.passes), ipc_fd)
    ev.update({"pipe_buffer_bytes": queued, "sockets": sockets,
               "pipe_socket_buffers_wiped": False})
    ev["cap_raised"] = cap_raised
    st.leaves_mem = w["leaves"]
    ev.update({"processes": w["processes"], "bytes": w["bytes"], "readback_blocks": w["blocks"],
               "nonzero_blocks": w["nonzero"], "processes_exited": w["exited"]})
    if w["failed"]:
        errors.append("memory of a process could not be wiped")
    if w["nonzero"]:
        errors.append("memory read-back not zero")
    if ipc_fd is None:
        errors.append("session IPC namespace unknown: shared memory not checked")
    else:
        st.leaves_mem.extend(shm["leaves"])
        ev.update({"sysv_shm_segments": shm["segments"], "sysv_shm_bytes": shm["bytes"],
                   "readback_blocks": ev["readback_blocks"] + shm["blocks"],
                   "nonzero_blocks": ev["nonzero_blocks"] + shm["nonzero"]})
        if shm["error"] or shm["failed"] or shm["nonzero"]:
            errors.append(shm["error"] or "a shared memory segment could not be wiped")
    ev["wipe_us"] = (time.perf_counter_ns() - t0) // 1000


async def kill(ctx: DestroyContext, ev: dict, errors: list[str]) -> None:
    """Cgroup-wide SIGKILL (thaws), then PID 1 via its pidfd (waits until reaped), then a
    bounded wait until the cgroup is empty."""
    sb = ctx.sandbox
    assert sb is not None
    t1 = time.perf_counter_ns()
    try:
        sb.cgroup.kill_all()
    except Exception:
        errors.append("cgroup kill failed")
    try:
        with trio.move_on_after(ctx.timeout) as cs:
            await sb.kill_init()
        init_dead = not cs.cancelled_caught
    except Exception:
        init_dead = False
    ev["cgroup_empty"] = await _poll(sb.cgroup.empty, ctx.timeout)
    ev["killed"] = init_dead and ev["cgroup_empty"]
    ev["kill_us"] = (time.perf_counter_ns() - t1) // 1000


async def release(ctx: DestroyContext, st: DestroyState, ev: dict, errors: list[str]) -> None:
    """Files leased by a (now dead) holder, the cgroup's memory back to 0, the cgroup
    removed."""
    sb = ctx.sandbox
    assert sb is not None
    cgroup = sb.cgroup
    t2 = time.perf_counter_ns()
    if st.deferred_fds:  # files step 2 could not open while a (now dead) holder leased them
        d: fsd.TreeStats = await trio.to_thread.run_sync(fsd.wipe_deferred, st.deferred_fds,
                                                         list(ctx.passes))
        st.leaves_fs.extend(d.leaves[i][j:j + 32] for i in range(len(d.leaves))
                            for j in range(0, len(d.leaves[i]), 32))
        ev.update({"deferred_files": d.files, "deferred_bytes": d.bytes,
                   "deferred_blocks": d.blocks})
        if d.wipe_failed or d.nonzero_blocks:
            errors.append("a deferred file could not be overwritten")
    if ev["cgroup_empty"]:
        rounds, user, kernel = await _release(cgroup, ctx.timeout)
        ev.update({"memory_reclaim_rounds": rounds, "memory_after_bytes": user,
                   "kernel_memory_after_bytes": kernel})
    else:
        try:
            ev["memory_after_bytes"], ev["kernel_memory_after_bytes"] = cgroup.memory_after()
        except OSError:
            pass
    ev["release_us"] = (time.perf_counter_ns() - t2) // 1000
    st.cgroup_paths = [str(p) for p in cgroup.paths]
    try:
        if ev["cgroup_empty"]:
            await sb.remove_cgroup()  # stops the sandbox's OOM watch first
    except Exception:
        errors.append("cgroup not removable")


def verdict(ev: dict, errors: list[str]) -> None:
    """Raise the step's error when anything above could not be done or verified."""
    kills = ev.get("kernel_oom_kills", 0)
    if kills > 0:  # the kernel's OOM killer freed a session process's pages before the wipe
        errors.append("the kernel OOM killer freed session memory unwiped")
    elif kills < 0:
        errors.append("kernel OOM kill count not readable")
    if not ev["killed"]:
        errors.append("processes survived the kill")
    if ev["memory_after_bytes"] != 0:
        errors.append("cgroup memory not released")
    if not ev["swap_disabled"]:
        errors.append("swap may hold session pages")
    if errors:
        raise StepError("; ".join(errors))


async def run(ctx: DestroyContext, st: DestroyState, ev: dict) -> None:
    sb = ctx.sandbox
    on, source = init_on_free()
    ev.update({"processes": 0, "bytes": 0, "passes": list(ctx.passes), "readback_blocks": 0,
               "killed": False, "cgroup_empty": False, "memory_after_bytes": -1,
               "swap_disabled": False, "init_on_free": on, "init_on_free_source": source})
    if sb is None:
        raise StepError("no sandbox")
    errors: list[str] = []
    devices = swap_devices()
    limited = cgroup_swap_limited(sb.cgroup)
    ev.update({"swap_devices": devices, "swap_cgroup_limited": limited,
               "swap_disabled": devices == 0 or limited})
    ev.update(sb.oom_evidence())
    pids = await freeze(sb, st, ev, errors, ctx.timeout)
    await wipe_memory(ctx, st, ev, pids, errors)
    if ctx.hooks is not None and ctx.hooks.before_kill is not None:
        await ctx.hooks.before_kill(list(pids))
    await kill(ctx, ev, errors)
    await release(ctx, st, ev, errors)
    verdict(ev, errors)
