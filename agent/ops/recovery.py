"""Crash recovery at start (SPEC 12), before any socket exists.

One small reclaimer per resource kind, run in a fixed order — processes, mounts, cgroups,
network, uid slots — each returning a count and its errors; none stops the start.  Each
covers what the journal knows *and* what it does not (leftovers under the agent's own cgroup
prefix and runtime directory).  Then every journaled live session goes through the full
destruction pipeline with reason `agent_recovery` (the daemon's `destroy_fn` spools its CDP);
what can no longer be verified makes that session `expired_unclean`.

Leftover session file systems are wiped (the class's passes, fd-relative, no symlink
followed) before they are detached: after a crash the host view of a session tmpfs is the
last reference to customer data.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from agent import log
from agent.config import Config
from agent.ops.notify import Notifier
from agent.sandbox.cgroups.base import CgroupDriver
from agent.sandbox.engine import SandboxEngine
from agent.service.hooks import MetricsHook
from agent.service.journal import Journal

ORDER = ("processes", "mounts", "cgroups", "network", "slots")
LAST_REPORT: RecoveryReport | None = None  # this process's last recovery (debug `status`)
CGROUP_ROOT = Path("/sys/fs/cgroup")
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class ReclaimResult:
    kind: str
    count: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class RecoveryReport:
    reclaimers: list[ReclaimResult] = field(default_factory=list)
    sessions: dict[str, str] = field(default_factory=dict)  # session_id -> final status
    adopted: list[str] = field(default_factory=list)  # re-adopted, live again
    errors: list[str] = field(default_factory=list)  # per-session pipeline failures
    duration_ms: int = 0

    def counts(self) -> dict[str, int]:
        return {r.kind: r.count for r in self.reclaimers}

    def to_dict(self) -> dict:
        return {"reclaimed": self.counts(),
                "errors": {r.kind: r.errors for r in self.reclaimers if r.errors}
                | ({"sessions": self.errors} if self.errors else {}),
                "sessions": dict(self.sessions), "adopted": list(self.adopted),
                "duration_ms": self.duration_ms}


# -- /proc helpers -----------------------------------------------------------------------------

def starttime(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie holds no memory, mount or uid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _kill_verified(pid: int, expect_start: int | None, timeout: float = 5.0) -> bool:
    """SIGKILL `pid` through a pidfd if (and only if) its start time still matches; wait until
    it has exited.  True when a process was killed."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not alive(pid) or (expect_start is not None and starttime(pid) != expect_start):
            return False  # the pid was reused by an unrelated process: never touch it
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return False
        select.select([pidfd], [], [], timeout)  # readable once the process has exited
        return True
    finally:
        os.close(pidfd)


def _mount_points() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            out.append(mp)
    return out


def _under(path: str | os.PathLike, root: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
        return Path(os.path.abspath(path)) != Path(os.path.abspath(root))
    except ValueError:
        return False


# -- reclaimers (sync; run in a worker thread) ---------------------------------------------------

class _Ctx:
    def __init__(self, cfg: Config, rows: list[dict], driver: CgroupDriver | None,
                 keep: set[str] | None = None) -> None:
        self.cfg = cfg
        self.rows = rows
        self.driver = driver
        self.keep = keep or set()  # re-adopted sessions: live again, never reclaimed
        self.runtime = Path(cfg.paths.runtime_dir)
        self.prefix = driver.prefix if driver is not None else cfg.sandbox.cgroup_prefix

    def cgroup_names(self) -> tuple[list[str], list[str]]:
        """(journaled names, every name to reclaim) of session cgroups under our prefix."""
        journaled = []
        for row in self.rows:
            for p in row.get("cgroup_paths") or []:
                name = Path(p).name
                if name not in journaled and self._is_ours(Path(p)):
                    journaled.append(name)
        names = list(journaled)
        if self.driver is not None:
            try:
                names += [n for n in self.driver.leftovers()
                          if n not in names and n not in self.keep]
            except Exception as e:  # reported by the caller through the count
                log.get().warning("recovery_leftovers_failed", error=str(e))
        return journaled, names

    def _is_ours(self, p: Path) -> bool:
        # only directories inside <cgroup root>/.../<prefix>/ : never a cgroup we did not create
        return _under(p, CGROUP_ROOT) and self.prefix in p.parts[:-1]


def reclaim_processes(c: _Ctx) -> ReclaimResult:
    """Everything in our session cgroups first (kill_all thaws a cgroup a crash left frozen in
    destruction step 1: a frozen v1 task ignores SIGKILL until thawed), then each journaled
    holder whose pid *and* start time still match."""
    r = ReclaimResult("processes")
    _, names = c.cgroup_names()
    driver = c.driver
    if driver is None:
        names = []
    for name in names:
        try:
            assert driver is not None
            h = driver.open(name)
            try:
                pids = h.pids()
                if pids:
                    h.kill_all()
                    if not h.wait_empty():
                        r.errors.append(f"{name}: processes survived SIGKILL")
                    r.count += len(pids)
            finally:
                h.close()
        except Exception as e:
            r.errors.append(f"{name}: {e}")
    if c.driver is None:
        for row in c.rows:
            for p in row.get("cgroup_paths") or []:
                procs = Path(p) / "cgroup.procs"
                if c._is_ours(Path(p)) and procs.exists():
                    for pid in procs.read_text().split():
                        if _kill_verified(int(pid), None):
                            r.count += 1
    for row in c.rows:
        holder, start = row.get("init_pid"), row.get("init_starttime")
        if not holder or start is None:
            continue
        try:
            if _kill_verified(int(holder), int(start)):
                r.count += 1
        except OSError as e:
            r.errors.append(f"{row['session_id']}: holder: {e.strerror}")
    return r


def _wipe_passes(cfg, classification: str | None) -> list[str]:
    dc = cfg.classes.get(classification or "general") or cfg.classes["general"]
    return list(dc.wipe_passes)


def _wipe_tree(path: str, passes: list[str]) -> None:
    from agent.destroy.filesystem_destruction import destroy_tree

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        destroy_tree(fd, passes)
    finally:
        os.close(fd)


def umount_detach(path: str) -> None:
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def reclaim_mounts(c: _Ctx) -> ReclaimResult:
    """Session file systems (journaled, or anything mounted under our runtime dir's sessions/):
    wiped with the class's passes, then detached; their directories removed."""
    r = ReclaimResult("mounts")
    by_path: dict[str, dict | None] = {}
    for row in c.rows:
        mp = row.get("mount_path")
        if mp and _under(mp, c.runtime):
            by_path[os.path.abspath(mp)] = row
    sessions = c.runtime / "sessions"
    kept = {os.path.abspath(sessions / sid / "root") for sid in c.keep}
    mounted = [m for m in _mount_points() if _under(m, c.runtime)]
    for m in mounted:
        if os.path.abspath(m) not in kept:
            by_path.setdefault(os.path.abspath(m), None)
    # deepest first, so nested mounts go before their parents
    for mp in sorted(by_path, key=lambda p: p.count("/"), reverse=True):
        found = by_path[mp]
        while mp in _mount_points():
            try:
                try:
                    _wipe_tree(mp, _wipe_passes(c.cfg, (found or {}).get("classification")))
                except Exception as e:  # the mount still goes; the CDP says unclean
                    r.errors.append(f"{(found or {}).get('session_id', 'untracked')}: wipe: {e}")
                umount_detach(mp)
                r.count += 1
            except OSError as e:
                r.errors.append(f"{(found or {}).get('session_id', 'untracked')}: umount: "
                                f"{e.strerror}")
                break
    if sessions.is_dir():
        for d in sessions.iterdir():
            if d.name in c.keep:
                continue
            _unlink_leftover_files(d)
            for sub in (d / "root", d):
                try:
                    if sub.is_dir() and not sub.is_symlink() and sub.as_posix() not in _mount_points():
                        os.rmdir(sub)
                except OSError as e:
                    if e.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                        r.errors.append(f"{d.name}: rmdir: {e.strerror}")
    return r


def _unlink_leftover_files(d: Path) -> None:
    """What a dead sandbox leaves in its session directory besides the mount point, and
    would keep the directory from being removed: the re-attach socket nrx-init bound
    (issue 12) and a warm-pool sandbox's `unbound` mark (issue 18).  Only a socket and a
    regular file of those names, never anything else."""
    for name, kind in (("attach", stat.S_ISSOCK), ("unbound", stat.S_ISREG)):
        try:
            if kind(os.lstat(d / name).st_mode):
                os.unlink(d / name)
        except OSError:
            pass


def reclaim_cgroups(c: _Ctx) -> ReclaimResult:
    """Session cgroups (journaled, or left under our prefix) emptied and removed."""
    r = ReclaimResult("cgroups")
    _, names = c.cgroup_names()
    if c.driver is not None:
        for name in names:
            try:
                h = c.driver.open(name)
                try:
                    if not h.empty():
                        h.kill_all()
                        h.wait_empty()
                    h.remove()
                    r.count += 1
                finally:
                    h.close()
            except Exception as e:
                r.errors.append(f"{name}: {e}")
        return r
    for row in c.rows:
        for p in sorted(row.get("cgroup_paths") or [], key=lambda s: s.count("/"), reverse=True):
            if c._is_ours(Path(p)) and Path(p).is_dir():
                try:
                    os.rmdir(p)
                    r.count += 1
                except OSError as e:
                    r.errors.append(f"{row['session_id']}: {e.strerror}")
    return r


def reclaim_network(c: _Ctx) -> ReclaimResult:
    """Any process still inside a journaled session's network namespace is killed (the netns
    then goes away with its last user); netns pinned by a mount under our runtime dir were
    detached by the mounts reclaimer."""
    r = ReclaimResult("network")
    want = {}
    for row in c.rows:
        ino = (row.get("namespaces") or {}).get("net")
        if ino:
            want[int(ino)] = row["session_id"]
    if not want:
        return r
    me = os.getpid()
    for pid in _pids():
        if pid == me:
            continue
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
        if ino in want:
            st = starttime(pid)
            try:
                if _kill_verified(pid, st):
                    r.count += 1
            except OSError as e:
                r.errors.append(f"{want[ino]}: {e.strerror}")
    return r


def _uids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def reclaim_slots(c: _Ctx) -> ReclaimResult:
    """Each journaled uid slot is released: no process may still run as a uid of its host range
    (any that does is killed first).  The count is the number of slots released."""
    r = ReclaimResult("slots")
    sc = c.cfg.sandbox
    ranges = []
    for row in c.rows:
        slot = row.get("slot")
        if slot is None:
            continue
        lo = sc.uid_base + int(slot) * sc.uid_slot_size
        ranges.append((lo, lo + sc.uid_slot_size, row["session_id"]))
    if not ranges:
        return r
    survivors: dict[str, int] = {}
    for pid in _pids():
        if not alive(pid):
            continue
        uids = _uids(pid)
        for lo, hi, sid in ranges:
            if any(lo <= u < hi for u in uids):
                try:
                    _kill_verified(pid, starttime(pid))
                except OSError:
                    pass
                if alive(pid) and any(lo <= u < hi for u in _uids(pid)):
                    survivors[sid] = survivors.get(sid, 0) + 1
    for _lo, _hi, sid in ranges:
        if sid in survivors:
            r.errors.append(f"{sid}: {survivors[sid]} process(es) still run in the slot's uid range")
        else:
            r.count += 1
    return r


RECLAIMERS: tuple[Callable[[_Ctx], ReclaimResult], ...] = (
    reclaim_processes, reclaim_mounts, reclaim_cgroups, reclaim_network, reclaim_slots)
assert tuple(f.__name__.removeprefix("reclaim_") for f in RECLAIMERS) == ORDER


async def _adopt_all(rows: list[dict], adopt_fn: Callable[[dict], Awaitable[bool]],
                     report: RecoveryReport, extend: Callable[[], None]) -> set[str]:
    """Re-adopt what can be; the ids of the sessions that are live again."""
    lg = log.get().bind(component="recovery")
    adopted: set[str] = set()
    for row in rows:
        extend()
        try:
            if await adopt_fn(row):
                adopted.add(row["session_id"])
                report.adopted.append(row["session_id"])
        except Exception as e:  # not adopted: reclaimed and proven below
            report.errors.append(f"{row['session_id']}: adopt: {type(e).__name__}: {e}")
            lg.error("recovery_adopt_failed", session_id=row["session_id"],
                     error=type(e).__name__)
    if adopted:
        lg.info("recovery_adopted", sessions=len(adopted))
    return adopted




async def recover(cfg: Config, *, journal: Journal, driver: CgroupDriver | None = None,
                  destroy_fn: Callable[..., Awaitable[str]] | None = None,
                  adopt_fn: Callable[[dict], Awaitable[bool]] | None = None,
                  metrics: MetricsHook | None = None, engine: SandboxEngine | None = None,
                  notifier: Notifier | None = None) -> RecoveryReport:
    """Re-adopt every journaled live session whose sandbox outlived the agent, reclaim
    everything else a crashed agent left, then destroy each session not re-adopted.

    `adopt_fn(row) -> bool` (Service.adopt_row) re-adopts one session (issue 12): True
    when it is live again (or was ended by it, e.g. a TTL that passed while the agent was
    down); its cgroup, mount and slot are then left alone by the reclaimers.
    `journal.live_sessions()` gives the rows; `driver` is the engine's cgroup driver (or
    `engine.cgroups`); `destroy_fn(row, "agent_recovery") -> status` runs the pipeline and
    spools the CDP.  Never raises for a leftover it cannot reclaim: the report says so.
    Under systemd (`notifier`, default from $NOTIFY_SOCKET) it asks for more start time with
    EXTEND_TIMEOUT_USEC while it works, so many sessions to reclaim do not hit
    TimeoutStartSec."""
    own_notifier = notifier is None
    if notifier is None:
        notifier = Notifier.from_env()
    every = cfg.timeouts.systemd_extend_every_seconds
    last_extend = [-every]

    def extend() -> None:
        if time.monotonic() - last_extend[0] >= every:
            last_extend[0] = time.monotonic()
            notifier.extend_timeout(cfg.timeouts.systemd_extend_by_seconds)

    lg = log.get().bind(component="recovery")
    t0 = time.monotonic()
    if driver is None and engine is not None:
        driver = engine.cgroups
    report = RecoveryReport()
    try:
        rows = list(journal.live_sessions())
    except Exception as e:
        lg.error("recovery_journal_unreadable", error=str(e))
        report.errors.append(f"journal: {e}")
        rows = []
    adopted = await _adopt_all(rows, adopt_fn, report, extend) if adopt_fn else set()
    rows = [r for r in rows if r["session_id"] not in adopted]
    ctx = _Ctx(cfg, rows, driver, keep=adopted)
    if rows:
        extend()
    for fn in RECLAIMERS:
        try:
            res = await trio.to_thread.run_sync(fn, ctx)
        except Exception as e:
            res = ReclaimResult(fn.__name__.removeprefix("reclaim_"), 0, [f"reclaimer failed: {e}"])
        report.reclaimers.append(res)
        if metrics is not None and res.count:
            metrics.inc("recovery_reclaimed_total", by=res.count, kind=res.kind)
        lg.info("recovery_reclaimed", kind=res.kind, count=res.count, errors=len(res.errors))
        for err in res.errors:
            lg.warning("recovery_reclaim_error", kind=res.kind, error=err)
    for row in rows:
        sid = row["session_id"]
        extend()
        if destroy_fn is None:
            report.errors.append(f"{sid}: no destroy function")
            continue
        try:
            status = await destroy_fn(row, "agent_recovery")
            report.sessions[sid] = status
            lg.info("recovery_session_destroyed", session_id=sid, status=status)
        except Exception as e:
            report.errors.append(f"{sid}: {type(e).__name__}: {e}")
            lg.error("recovery_session_failed", session_id=sid, error=type(e).__name__)
    report.duration_ms = int((time.monotonic() - t0) * 1000)
    global LAST_REPORT
    LAST_REPORT = report
    if own_notifier:
        notifier.close()
    lg.info("recovery_done", sessions=len(rows), duration_ms=report.duration_ms,
            **{f"reclaimed_{k}": v for k, v in report.counts().items()})
    return report
