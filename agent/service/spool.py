"""Durable CDP spool (SPEC 8): `<state>/spool/<session_id>.json`.

A proof is fsynced, renamed into place and the directory fsynced before `session.destroy`
returns, so an acknowledged-by-nobody proof survives a crash or restart.  `proof.ack`
removes the file.  The stored document is `{session_id, status, reason, cdp, auditproof,
regulatory_context, session_context}`; `proof.get` returns it as stored.

Durability before destruction (docs/operations.md "State faults"):

* **Reservation.** `reserve()` runs at session create, before any sandbox exists: it makes
  `<session_id>.resv` in the spool directory (one inode) and preallocates
  `spool.reserve_bytes` for it (`posix_fallocate`).  The file starts with a one-line
  header of the session's metadata (no customer data: ids, tier, class, jurisdiction,
  times) — a second record of the live session, used when the journal lost its row.
  `put()` writes the proof into that already-allocated file, truncates it to the proof's
  length, fsyncs and renames it to `<session_id>.json`: no new inode and no new block is
  needed at destroy, so a full state filesystem cannot make the proof unwritable.  The
  rename is not fsynced (one fsync per proof): if a crash loses it, `scan()` finishes it.  A
  session whose reservation cannot be made is refused (`Unavailable`).  A warm-pool
  sandbox (issue 18) gets its reservation ahead as `<session_id>.pool` (no header);
  `bind_pooled()` writes the header and renames it to `.resv` at `session.create`.
* **Fallback.** If the write still fails (an immutable directory, a proof larger than the
  reservation on a full disk, EIO), the signed proof is kept in memory (`unsaved`) and in
  `spool.fallback_dir` (default `<runtime_dir>/spool-fallback`, another file system), it
  is served by `get`/`pending` as usual, and `retry()` (run by the health monitor while
  rzl is down) moves it into the spool once it can.  `put()` returns False meanwhile and
  the health engine `rzl` is false.
* **Damage.** `scan()` (at start) reads every spool file: one that is truncated, garbage
  or names another session is moved to `<state>/quarantine/` and reported; a reservation
  that already holds a complete proof (a crash between the write and the rename) is
  finished; staging files are removed; proofs found in the fallback directory are
  adopted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.durable import atomic_write, fsync_dir

__all__ = ["DEFAULT_RESERVE_BYTES", "Damage", "Spool", "SpoolUnavailable"]

DEFAULT_RESERVE_BYTES = 64 * 1024  # a CDP + AuditProof result is ~21 KiB (PHI, measured)
_SID = r"sess_[0-9a-f]{16}"
_NAME = re.compile(rf"^({_SID})\.json$")
_RESV = re.compile(rf"^({_SID})\.resv$")
_STAGING = re.compile(rf"^\.({_SID})\.tmp$")
_POOLED = re.compile(rf"^({_SID})\.pool$")
_HEADER_KEY = "nanorix_spool_reservation"


class SpoolUnavailable(Exception):
    """The spool cannot take a new session's reservation; the message says why."""


@dataclass
class Damage:
    """One damaged state file found at start (what was lost, where it was put aside)."""

    kind: str  # "spool_file" | "fallback_file" | "journal" | "journal_row" | "proof_missing"
    session_id: str | None
    error: str
    quarantined_to: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "session_id": self.session_id, "error": self.error,
                "quarantined_to": self.quarantined_to}


def _encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def _header_line(session_id: str, header: dict) -> bytes:
    """A reservation's first line: the session's metadata (no customer data)."""
    return _encode({_HEADER_KEY: 1, "session_id": session_id, **header}) + b"\n"


def _proof_error(data: bytes, session_id: str) -> str | None:
    """Why `data` is not a spooled proof of `session_id` (None when it is one)."""
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as e:
        return f"not JSON ({e.msg} at byte {e.pos} of {len(data)})"
    except ValueError:
        return f"not UTF-8 JSON ({len(data)} bytes)"
    if not isinstance(doc, dict):
        return "not a JSON object"
    if doc.get("session_id") != session_id:
        return "names another session"
    if not isinstance(doc.get("cdp"), dict):
        return "has no cdp"
    return None


def quarantine(path: Path, qdir: Path) -> str:
    """Move a damaged state file aside (same file system, never deleted); returns where."""
    qdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    dest = qdir / f"{path.name}.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    n = 0
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.rsplit('~', 1)[0]}~{n}")
    os.replace(path, dest)
    with contextlib.suppress(OSError):
        fsync_dir(qdir)
    return str(dest)


class Spool:
    def __init__(self, state_dir: Path, *, reserve_bytes: int = DEFAULT_RESERVE_BYTES,
                 fallback_dir: Path | None = None) -> None:
        self.dir = Path(state_dir) / "spool"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.quarantine_dir = Path(state_dir) / "quarantine"
        self.fallback_dir = Path(fallback_dir) if fallback_dir is not None else None
        self.reserve_bytes = reserve_bytes
        self.unsaved: dict[str, bytes] = {}  # proofs not yet durable in self.dir
        self.last_error: str | None = None  # why the last put/retry failed
        self.on_failure: Callable[[str], None] | None = None  # health: rzl false at once

    # -- names -------------------------------------------------------------------------
    def _path(self, session_id: str) -> Path:
        name = f"{session_id}.json"
        if not _NAME.match(name):
            raise ValueError("not a session id")
        return self.dir / name

    def _resv(self, session_id: str) -> Path:
        return self._path(session_id).with_suffix(".resv")

    def _pooled(self, session_id: str) -> Path:
        return self._path(session_id).with_suffix(".pool")

    def _fallback(self, session_id: str) -> Path | None:
        if self.fallback_dir is None:
            return None
        return self.fallback_dir / self._path(session_id).name

    # -- reservation (create) ----------------------------------------------------------
    def reserve(self, session_id: str, header: dict) -> None:
        """Preallocate this session's proof file (inode + `reserve_bytes`), fsynced, with
        `header` (session metadata) on its first line.  Raises SpoolUnavailable."""
        self._preallocate(self._resv(session_id), _header_line(session_id, header))

    def _preallocate(self, path: Path, line: bytes) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise SpoolUnavailable(f"cannot create the proof reservation: {_why(e)}") from None
        try:
            try:
                os.posix_fallocate(fd, 0, max(self.reserve_bytes, len(line)))
                os.pwrite(fd, line, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.dir)
        except OSError as e:
            with contextlib.suppress(OSError):
                path.unlink()
            raise SpoolUnavailable(f"cannot reserve {self.reserve_bytes} bytes for the "
                                   f"proof: {_why(e)}") from None

    # -- a warm-pool sandbox's reservation (issue 18) ------------------------------------
    def reserve_pooled(self, session_id: str) -> None:
        """The reservation of a warm-pool sandbox, made ahead: `<session_id>.pool` with its
        inode and `reserve_bytes` preallocated and fsynced, and no header (no session yet;
        `reservations()` does not see it).  Raises SpoolUnavailable."""
        self._preallocate(self._pooled(session_id), b"")

    def bind_pooled(self, session_id: str, header: dict) -> None:
        """Make a pooled reservation the session's at `session.create`: the header written
        into it, then renamed to `<session_id>.resv`.  Not fsynced: like the journal row
        (WAL, synchronous=NORMAL) it survives an agent crash, and the space and inode that
        make the proof writable were made durable ahead.  Raises SpoolUnavailable (the
        caller then reserves the normal way)."""
        line = _header_line(session_id, header)
        try:
            fd = os.open(self._pooled(session_id), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.pwrite(fd, line, 0)
            finally:
                os.close(fd)
            os.rename(self._pooled(session_id), self._resv(session_id))
        except OSError as e:
            self.release_pooled(session_id)
            raise SpoolUnavailable(f"the pooled proof reservation cannot be used: "
                                   f"{_why(e)}") from None

    def release_pooled(self, session_id: str) -> None:
        """Drop a pool sandbox's reservation (it was never bound)."""
        with contextlib.suppress(OSError):
            self._pooled(session_id).unlink()

    def release(self, session_id: str) -> None:
        """Drop a reservation whose session never started."""
        with contextlib.suppress(OSError):
            self._resv(session_id).unlink()

    def reservations(self) -> dict[str, dict | None]:
        """session_id -> reservation header (None when unreadable) of every reservation
        not yet turned into a proof: the sessions that were live when last written."""
        out: dict[str, dict | None] = {}
        for p in self.dir.iterdir():
            m = _RESV.match(p.name)
            if m:
                out[m.group(1)] = _read_header(p)
        return out

    # -- proofs (destroy) --------------------------------------------------------------
    def put(self, session_id: str, record: dict, data: bytes | None = None) -> bool:
        """Store a proof durably; True when it is in the spool.  `data`: the record
        already serialised (its canonical JSON, ProofWriter.build_encoded), so it is not
        serialised twice.  On failure the proof is kept in memory and in the fallback
        directory (served as usual, retried by `retry()`) and False is returned; never
        raises for an I/O error."""
        if data is None:
            data = _encode(record)
        self._path(session_id)  # ValueError for a bad id, before anything is kept
        try:
            self._store(session_id, data)
        except OSError as e:
            self.unsaved[session_id] = data
            self.last_error = f"{self._path(session_id).name}: {_why(e)}"
            self._fallback_put(session_id, data)
            if self.on_failure is not None:
                self.on_failure(f"proof of {session_id} not durably spooled: "
                                f"{self.last_error}")
            return False
        self.unsaved.pop(session_id, None)
        self._fallback_drop(session_id)
        return True

    def _store(self, session_id: str, data: bytes) -> None:
        final, resv = self._path(session_id), self._resv(session_id)
        try:
            fd = os.open(resv, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:  # no reservation (made before this version, or recovery)
            atomic_write(final, data, tmp=self.dir / f".{session_id}.tmp")
            return
        try:
            view, off = memoryview(data), 0
            while off < len(data):
                off += os.pwrite(fd, view[off:], off)
            os.ftruncate(fd, len(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        # one fsync per proof: the reservation's name was made durable at create, and a
        # rename that a crash loses leaves a `.resv` holding the complete proof, which
        # scan() finishes at the next start (_finish_reservation) before anything reads
        # the reservations; so the directory is not fsynced here (ack() fsyncs it)
        os.replace(resv, final)

    def _fallback_put(self, session_id: str, data: bytes) -> None:
        fb = self._fallback(session_id)
        if fb is None:
            return
        try:
            fb.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(fb, data, tmp=fb.with_name(f".{session_id}.tmp"))
        except OSError as e:
            self.last_error = f"{self.last_error}; fallback: {_why(e)}"

    def _fallback_drop(self, session_id: str) -> None:
        fb = self._fallback(session_id)
        if fb is not None:
            with contextlib.suppress(OSError):
                fb.unlink()

    def retry(self) -> int:
        """Move proofs kept in memory into the spool; returns how many are still not."""
        for sid, data in list(self.unsaved.items()):
            try:
                self._store(sid, data)
            except OSError as e:
                self.last_error = f"{self._path(sid).name}: {_why(e)}"
                continue
            self.unsaved.pop(sid, None)
            self._fallback_drop(sid)
        if not self.unsaved:
            self.last_error = None
        return len(self.unsaved)

    def get(self, session_id: str) -> dict | None:
        data = self.get_bytes(session_id)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    def get_bytes(self, session_id: str) -> bytes | None:
        try:
            return self._path(session_id).read_bytes()
        except ValueError:
            return None
        except OSError:
            return self.unsaved.get(session_id)

    def ack(self, session_id: str) -> bool:
        """Drop a proof (its file, memory and fallback copies).  False when there was none;
        an OSError (the directory cannot be written) propagates and nothing is dropped."""
        try:
            path = self._path(session_id)
        except ValueError:
            return False
        try:
            path.unlink()
            found = True
        except FileNotFoundError:
            found = False
        if found:
            fsync_dir(self.dir)
        found = self.unsaved.pop(session_id, None) is not None or found
        self._fallback_drop(session_id)
        return found

    def pending(self, limit: int | None = None, after: str | None = None) -> list[dict]:
        """Unacknowledged proofs (spooled, and kept in memory) in session-id order; `after`
        (a session id) and `limit` select one page."""
        names = {m.group(1) for p in self.dir.iterdir() if (m := _NAME.match(p.name))}
        out: list[dict] = []
        for sid in sorted(names | set(self.unsaved)):
            if after is not None and sid <= after:
                continue
            if limit is not None and len(out) >= limit:
                break
            data = self.get_bytes(sid)
            if data is None:  # acknowledged meanwhile
                continue
            try:
                out.append(json.loads(data))
            except ValueError:
                continue
        return out

    def depth(self) -> int:
        names = {m.group(1) for p in self.dir.iterdir() if (m := _NAME.match(p.name))}
        return len(names | set(self.unsaved))

    # -- start -------------------------------------------------------------------------
    def scan(self) -> list[Damage]:
        """Check every spool file (see the module docstring); returns what was damaged.
        Damaged files are quarantined, never deleted."""
        found: list[Damage] = []
        for p in sorted(self.dir.iterdir()):
            if m := _NAME.match(p.name):
                self._check_file(p, m.group(1), "spool_file", found)
            elif m := _RESV.match(p.name):
                self._finish_reservation(p, m.group(1))
            elif _STAGING.match(p.name) or _POOLED.match(p.name):
                # a pooled reservation never outlives the agent that made it: its sandbox
                # ended with that agent, unbound (issue 18)
                with contextlib.suppress(OSError):
                    p.unlink()
        if self.fallback_dir is not None and self.fallback_dir.is_dir():
            for p in sorted(self.fallback_dir.iterdir()):
                m = _NAME.match(p.name)
                if m and self._check_file(p, m.group(1), "fallback_file", found):
                    sid = m.group(1)
                    if not self._path(sid).exists():
                        self.unsaved[sid] = p.read_bytes()
                    else:
                        self._fallback_drop(sid)
            self.retry()
        return found

    def _check_file(self, p: Path, sid: str, kind: str, found: list[Damage]) -> bool:
        try:
            why = _proof_error(p.read_bytes(), sid)
        except OSError as e:
            why = f"unreadable ({_why(e)})"
        if why is None:
            return True
        try:
            where = quarantine(p, self.quarantine_dir)
        except OSError as e:
            where, why = None, f"{why}; could not be quarantined ({_why(e)})"
        found.append(Damage(kind, sid, why, where))
        return False

    def _finish_reservation(self, p: Path, sid: str) -> None:
        """A reservation that holds a complete proof: the crash fell between the write and
        the rename, so finish the rename."""
        try:
            data = p.read_bytes()
        except OSError:
            return
        if _proof_error(data, sid) is None:
            with contextlib.suppress(OSError):
                os.replace(p, self._path(sid))
                fsync_dir(self.dir)

    def check_writable(self) -> bool:
        probe = self.dir / ".health"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
            return True
        except OSError:
            return False


def _read_header(p: Path) -> dict | None:
    try:
        with open(p, "rb") as f:
            line = f.readline(8192)
        doc = json.loads(line)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get(_HEADER_KEY) == 1 else None


def _why(e: OSError) -> str:
    """A short reason for an I/O error, e.g. `No space left on device (ENOSPC)`."""
    name = errno.errorcode.get(e.errno or 0)
    return f"{e.strerror or e} ({name})" if name else str(e.strerror or e)
