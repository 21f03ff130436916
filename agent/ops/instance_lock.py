"""One agent per cgroup prefix, uid range, state directory and runtime directory.

Start-up recovery reclaims whatever lies under the cgroup prefix, in the runtime directory and
in the sandbox uid range, so two agents sharing any of them would destroy each other's live
sessions.  `acquire()` takes, for the life of the process (the descriptors are never closed):

- an exclusive flock on `<lock_dir>/prefix-<cgroup prefix>.lock` (host-wide, keyed by the
  prefix, so it catches a second agent whose state and runtime dirs differ), whose content
  says who holds it: pid, state dir, runtime dir, prefix, uid range;
- a check, under a short-lived registry lock, that no other live holder in `<lock_dir>`
  (one whose file is still flocked) has a uid range that overlaps ours;
- exclusive flocks on `<state_dir>/agent.lock` and `<runtime_dir>/agent.lock`.

The kernel drops every flock when the process dies (even by SIGKILL), so a stale file never
blocks a start.  A refusal raises `AlreadyRunning` with one line naming the other agent.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AlreadyRunning", "InstanceLock", "acquire"]


class AlreadyRunning(RuntimeError):
    """Another live agent holds the same prefix, uid range, state or runtime directory."""


@dataclass
class InstanceLock:
    fds: list[int]
    prefix_path: Path

    def release(self) -> None:
        """Only for tests and clean exits: unlink our prefix file, then drop the locks."""
        try:
            st = os.stat(self.prefix_path)
            if self.fds and (st.st_dev, st.st_ino) == _ident(self.fds[0]):
                os.unlink(self.prefix_path)
        except OSError:
            pass
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _describe(info: dict) -> str:
    return (f"pid {info.get('pid', '?')}, state {info.get('state_dir', '?')}, "
            f"runtime {info.get('runtime_dir', '?')}")


def _read_info(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        return json.loads(data.decode() or "{}")
    except (OSError, ValueError):
        return {}


def _lock_file(path: Path, info: dict | None, what: str) -> int:
    """flock `path` exclusively; on success write `info` into it.  Handles the unlink race
    (a holder that exits unlinks its file: if the inode changed after we locked it, retry)."""
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_info(fd)
            os.close(fd)
            raise AlreadyRunning(
                f"another agent is running ({_describe(other)}) and holds {what}") from None
        try:
            if _ident(fd) != (os.stat(path).st_dev, os.stat(path).st_ino):
                os.close(fd)
                continue
        except FileNotFoundError:
            os.close(fd)
            continue
        if info is not None:
            data = json.dumps(info, sort_keys=True).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        return fd
    raise AlreadyRunning(f"could not lock {path}: it keeps being replaced")


def _safe_name(prefix: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", prefix)


def _live_holders(lock_dir: Path, own_fd: int) -> list[dict]:
    """Content of every other prefix lock file in `lock_dir` that a live process holds;
    files no process holds (their agent was killed) are removed on the way."""
    out = []
    own = _ident(own_fd)
    for p in sorted(lock_dir.glob("prefix-*.lock")):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if _ident(fd) == own:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                # nobody holds it: a dead agent's file (every lock is taken under the
                # registry lock we hold, so no agent is between creating and locking it)
                if _ident(fd) == (os.stat(p).st_dev, os.stat(p).st_ino):
                    os.unlink(p)
                continue
            except FileNotFoundError:
                continue
            except BlockingIOError:
                out.append(_read_info(fd))
        finally:
            os.close(fd)
    return out


def acquire(cfg) -> InstanceLock:
    """Take every lock of this agent instance or raise AlreadyRunning (see module doc)."""
    sc = cfg.sandbox
    lock_dir = Path(cfg.paths.lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    uid_lo = sc.uid_base
    uid_hi = sc.uid_base + sc.uid_slot_size * cfg.node.max_sessions
    info = {"pid": os.getpid(), "state_dir": str(cfg.paths.state_dir),
            "runtime_dir": str(cfg.paths.runtime_dir), "cgroup_prefix": sc.cgroup_prefix,
            "uid_range": [uid_lo, uid_hi]}
    fds: list[int] = []
    prefix_path = lock_dir / f"prefix-{_safe_name(sc.cgroup_prefix)}.lock"
    try:
        # the registry lock makes "lock our prefix + check everyone's uid range" atomic
        reg = os.open(lock_dir / "registry.lock",
                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(reg, fcntl.LOCK_EX)
            fds.append(_lock_file(prefix_path, info, f"cgroup prefix {sc.cgroup_prefix!r}"))
            for other in _live_holders(lock_dir, fds[0]):
                lo, hi = (other.get("uid_range") or [0, 0])[:2]
                if lo < uid_hi and uid_lo < hi:
                    raise AlreadyRunning(
                        f"another agent is running ({_describe(other)}) with sandbox uids "
                        f"[{lo}, {hi}), "
                        f"which overlap ours [{uid_lo}, {uid_hi}): change sandbox.uid_base")
        finally:
            os.close(reg)
        fds.append(_lock_file(Path(cfg.paths.state_dir) / "agent.lock", info,
                              f"state directory {cfg.paths.state_dir}"))
        fds.append(_lock_file(Path(cfg.paths.runtime_dir) / "agent.lock", info,
                              f"runtime directory {cfg.paths.runtime_dir}"))
    except BaseException:
        InstanceLock(fds, prefix_path).release()
        raise
    return InstanceLock(fds, prefix_path)
