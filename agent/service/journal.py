"""Session journal (SPEC 11, 12): SQLite in WAL mode in the state directory.

It holds metadata only — what crash recovery needs to find a session's resources again
(holder pid + start time, cgroup paths, mount path, uid slot, namespaces) and the audit
chain's hashes.  Never commands, input or output.

Schema (docs/design.md): `sessions(session_id PK, customer_id, tier, classification,
jurisdiction, created_at, ttl_seconds, status, hostname, slot, host_uid, init_pid,
init_starttime, cgroup_paths JSON, mount_path, namespaces JSON, exec_count, updated_at,
receipt_key_id, receipt_public_key, reason, proof_acked_at)`, `events(session_id, seq,
kind, hash, at)` and `receipt_keys(session_id, epoch, key_id, public_key, created_at,
introduction JSON)`: every receipt key a session ever had, in order (epoch 0 from
`session.create`, one more per re-adoption, each introduced by a statement signed with
the attestation key; agent/cdp/receiptkeys.py), while the row's `receipt_key_id` /
`receipt_public_key` name the current one.  A live session is one whose status is
`active` or `executing`.

Faults (docs/operations.md "State faults"): creating a session needs its row written
(`insert_session` raises `JournalUnwritable`), but nothing on the destruction path waits
for the journal — a failed `update_session`/`add_event` is kept in a bounded backlog,
replayed by the next successful write or `check()`, reported through `on_failure` (the
health monitor flips rzl and `database` at once) and `writable` is False meanwhile.  A
journal SQLite cannot open (garbage, not a database, a failed `quick_check`) is moved to
`<state>/quarantine/` and a fresh one started; `damage` says what happened.
"""

from __future__ import annotations

import json
import sqlite3
from collections import deque
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import structlog

from agent.timefmt import iso_seconds

__all__ = ["LIVE_STATUSES", "Journal", "JournalUnavailable", "JournalUnwritable"]

_log = structlog.get_logger("nanorix-agent.journal")
MAX_BACKLOG = 100_000  # pending event/update writes kept while the journal cannot be written
# errors of the program, not of the disk: never kept for later
_PROGRAM_ERRORS = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)


class JournalUnwritable(Exception):
    """The journal cannot take a write now; the message says why."""


class JournalUnavailable(RuntimeError):
    """The journal database cannot be opened in its state directory (the agent cannot start)."""

LIVE_STATUSES = ("active", "executing")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    tier TEXT NOT NULL,
    classification TEXT NOT NULL,
    jurisdiction TEXT NOT NULL,
    created_at TEXT NOT NULL,
    ttl_seconds INTEGER NOT NULL,
    status TEXT NOT NULL,
    hostname TEXT,
    slot INTEGER,
    host_uid INTEGER,
    init_pid INTEGER,
    init_starttime INTEGER,
    cgroup_paths TEXT,
    mount_path TEXT,
    namespaces TEXT,
    exec_count INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL,
    receipt_key_id TEXT,
    receipt_public_key TEXT,
    reason TEXT,
    proof_acked_at TEXT
);
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    hash TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS receipt_keys (
    session_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    key_id TEXT NOT NULL UNIQUE,
    public_key TEXT NOT NULL,
    created_at TEXT NOT NULL,
    introduction TEXT,
    PRIMARY KEY (session_id, epoch)
);
CREATE INDEX IF NOT EXISTS sessions_status ON sessions(status);
CREATE INDEX IF NOT EXISTS sessions_receipt_key ON sessions(receipt_key_id);
"""

_JSON_COLUMNS = ("cgroup_paths", "namespaces")
_COLUMNS = frozenset(
    "session_id customer_id tier classification jurisdiction created_at ttl_seconds status "
    "hostname slot host_uid init_pid init_starttime cgroup_paths mount_path namespaces "
    "exec_count updated_at receipt_key_id receipt_public_key reason proof_acked_at".split())


class Journal:
    """Synchronous and small: each call is one short transaction on the agent's thread."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "journal.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.damage: list[dict] = []  # what was wrong with the journal at open
        self.on_failure: Callable[[str | None], None] | None = None  # health: reason/None
        self.last_error: str | None = None
        self._updates: dict[str, dict] = {}  # session_id -> fields not yet written
        self._events: deque[tuple] = deque()  # (session_id, seq, kind, hash, at) not written
        self._keys: deque[tuple] = deque()  # receipt_keys rows not written
        self.backlog_dropped = 0
        try:
            self._open()
        except sqlite3.OperationalError as e:  # the directory, not the file, is the problem
            raise JournalUnavailable(
                f"cannot open the journal {self.path}: {e} (the state directory must be "
                "writable, on a local file system that supports SQLite's WAL mode: shared "
                "mmap and POSIX locks, not 9p or NFS)") from None
        except sqlite3.DatabaseError as e:  # the file is damaged: put it aside, start afresh
            self._quarantine(f"{type(e).__name__}: {e}")
            self._open()

    def _open(self) -> None:
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a process crash
            verdict = [r[0] for r in self.db.execute("PRAGMA quick_check").fetchall()]
            if verdict != ["ok"]:
                raise sqlite3.DatabaseError("quick_check: " + "; ".join(verdict[:3]))
            self.db.executescript(_SCHEMA)
            cols = {r[1] for r in self.db.execute("PRAGMA table_info(sessions)")}
            if "proof_acked_at" not in cols:  # journals written before this column existed
                self.db.execute("ALTER TABLE sessions ADD COLUMN proof_acked_at TEXT")
                # their acks were not recorded: an ended row without a spooled proof was
                # acknowledged, not lost (a spooled proof is still served and ackable)
                self.db.execute("UPDATE sessions SET proof_acked_at = updated_at "
                                "WHERE status NOT IN (?, ?)", LIVE_STATUSES)
        except BaseException:
            self.db.close()
            raise
        self.path.chmod(0o600)

    def _quarantine(self, why: str) -> None:
        """Put an unusable journal (and its WAL) aside, never delete it."""
        from agent.service.spool import quarantine

        moved = []
        for suffix in ("", "-wal", "-shm"):
            p = self.path.with_name(self.path.name + suffix)
            if p.exists():
                moved.append(quarantine(p, self.path.parent / "quarantine"))
        self.damage.append({"kind": "journal", "session_id": None, "error": why,
                            "quarantined_to": moved[0] if moved else None})
        _log.error("journal_damaged", error=why, quarantined_to=moved,
                   lost="every session row and audit hash it held; live sessions are "
                        "rebuilt from the spool reservations")

    def close(self) -> None:
        self.db.close()

    # -- fault handling ----------------------------------------------------------------
    @property
    def writable(self) -> bool:
        """False while a write failed and its backlog is not yet replayed."""
        return (self.last_error is None and not self._updates and not self._events
                and not self._keys)

    def _failed(self, what: str, e: sqlite3.Error) -> None:
        first = self.last_error is None
        self.last_error = f"{what}: {type(e).__name__}: {e}"
        if first:
            _log.error("journal_write_failed", what=what, error=f"{type(e).__name__}: {e}")
        if self.on_failure is not None:
            self.on_failure(self.last_error)

    def _keep(self, what: str, e: sqlite3.Error, add) -> None:
        if isinstance(e, _PROGRAM_ERRORS):
            raise e
        if len(self._updates) + len(self._events) + len(self._keys) >= MAX_BACKLOG:
            self.backlog_dropped += 1
            _log.error("journal_backlog_full", what=what, dropped=self.backlog_dropped)
        else:
            add()
        self._failed(what, e)

    def flush(self) -> None:
        """Replay what failed to be written (raises sqlite3.Error if it still fails)."""
        while self._events:
            ev = self._events[0]
            with self.db:
                self.db.execute("INSERT OR IGNORE INTO events (session_id, seq, kind, hash, at)"
                                " VALUES (?, ?, ?, ?, ?)", ev)
            self._events.popleft()
        while self._keys:
            with self.db:
                self.db.execute(_INSERT_KEY, self._keys[0])
            self._keys.popleft()
        for sid in list(self._updates):
            self._write_update(sid, self._updates[sid])
            del self._updates[sid]
        if self.last_error is not None:
            self.last_error = None
            _log.info("journal_writable_again")
            if self.on_failure is not None:
                self.on_failure(None)

    # -- writes ------------------------------------------------------------------------
    def insert_session(self, **fields: Any) -> None:
        """Write a new session's row; raises JournalUnwritable when it cannot be written."""
        fields = _encode(fields)
        fields.setdefault("updated_at", iso_seconds())
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        try:
            if not self.writable:
                self.flush()
            with self.db:
                self.db.execute(f"INSERT INTO sessions ({cols}) VALUES ({marks})",
                                tuple(fields.values()))
                if fields.get("receipt_key_id") and fields.get("receipt_public_key"):
                    self.db.execute(_INSERT_KEY, (
                        fields["session_id"], 0, fields["receipt_key_id"],
                        fields["receipt_public_key"], fields["created_at"], None))
        except sqlite3.Error as e:
            if isinstance(e, _PROGRAM_ERRORS):
                raise
            self._failed("insert_session", e)
            raise JournalUnwritable(f"the journal cannot be written ({e})") from None

    def update_session(self, session_id: str, **fields: Any) -> bool:
        """Update a row; never raises for a disk fault (the update is kept and replayed,
        see the module docstring).  True when it is written now."""
        fields = _encode(fields)
        fields["updated_at"] = iso_seconds()
        try:
            if not self.writable:
                self.flush()
            self._write_update(session_id, fields)
            return True
        except sqlite3.Error as e:
            self._keep("update_session", e,
                       lambda: self._updates.setdefault(session_id, {}).update(fields))
            return False

    def _write_update(self, session_id: str, fields: dict) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.db:
            self.db.execute(f"UPDATE sessions SET {sets} WHERE session_id = ?",
                            (*fields.values(), session_id))

    def add_event(self, session_id: str, seq: int, kind: str, hash_: str, at: str) -> bool:
        """Record an audit hash; like update_session, a disk fault is kept and replayed."""
        ev = (session_id, seq, kind, hash_, at)
        try:
            if not self.writable:
                self.flush()
            with self.db:
                self.db.execute("INSERT INTO events (session_id, seq, kind, hash, at) "
                                "VALUES (?, ?, ?, ?, ?)", ev)
            return True
        except sqlite3.Error as e:
            self._keep("add_event", e, lambda: self._events.append(ev))
            return False

    def add_receipt_key(self, session_id: str, entry: dict) -> bool:
        """Record a session's next receipt key (an epoch entry with its introduction,
        agent/cdp/receiptkeys.py) before anything is signed with it; like update_session,
        a disk fault is kept and replayed.  True when it is written now."""
        intro = entry.get("introduction")
        params = (session_id, int(entry["epoch"]), entry["key_id"], entry["public_key"],
                  entry["created_at"], json.dumps(intro, sort_keys=True) if intro else None)
        try:
            if not self.writable:
                self.flush()
            with self.db:
                self.db.execute(_INSERT_KEY, params)
            return True
        except sqlite3.Error as e:
            self._keep("add_receipt_key", e, lambda: self._keys.append(params))
            return False

    def mark_acked(self, session_id: str) -> None:
        """Record that the proof of `session_id` was acknowledged (before the spool drops
        it, so a later destroy can say so truthfully).  Raises JournalUnwritable."""
        try:
            if not self.writable:
                self.flush()
            self._write_update(session_id, {"proof_acked_at": iso_seconds(),
                                            "updated_at": iso_seconds()})
        except sqlite3.Error as e:
            if isinstance(e, _PROGRAM_ERRORS):
                raise
            self._failed("mark_acked", e)
            raise JournalUnwritable(f"the journal cannot be written ({e})") from None

    # -- reads -------------------------------------------------------------------------
    def get(self, session_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM sessions WHERE session_id = ?",
                              (session_id,)).fetchone()
        return _decode(row) if row else None

    def live(self) -> list[dict]:
        """Sessions that were live when last written: what recovery must reclaim."""
        rows = self.db.execute("SELECT * FROM sessions WHERE status IN (?, ?) "
                               "ORDER BY created_at", LIVE_STATUSES).fetchall()
        return [_decode(r) for r in rows]

    def live_sessions(self) -> list[dict]:
        """Alias used by crash recovery (docs/design.md, Operations: Daemon hooks)."""
        return self.live()

    def all(self, customer_id: str | None = None) -> list[dict]:
        if customer_id is None:
            rows = self.db.execute("SELECT * FROM sessions ORDER BY created_at").fetchall()
        else:
            rows = self.db.execute("SELECT * FROM sessions WHERE customer_id = ? "
                                   "ORDER BY created_at", (customer_id,)).fetchall()
        return [_decode(r) for r in rows]

    def by_receipt_key(self, key_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM sessions WHERE receipt_key_id = ?",
                              (key_id,)).fetchone()
        return _decode(row) if row else None

    def receipt_keys(self, session_id: str) -> list[dict]:
        """Every receipt key of the session in epoch order (agent/cdp/receiptkeys.py
        entries); a row journaled before this table existed gives its one key as epoch 0."""
        rows = self.db.execute("SELECT epoch, key_id, public_key, created_at, introduction "
                               "FROM receipt_keys WHERE session_id = ? ORDER BY epoch",
                               (session_id,)).fetchall()
        if not rows:
            row = self.get(session_id)
            if row is None or not row.get("receipt_key_id") or not row.get("receipt_public_key"):
                return []
            return [{"epoch": 0, "key_id": row["receipt_key_id"],
                     "public_key": row["receipt_public_key"], "created_at": row["created_at"]}]
        return [_key_entry(r) for r in rows]

    def receipt_key(self, key_id: str) -> tuple[str, dict] | None:
        """(session id, epoch entry) of a receipt key id, any epoch; None if unknown."""
        r = self.db.execute("SELECT session_id, epoch, key_id, public_key, created_at, "
                            "introduction FROM receipt_keys WHERE key_id = ?",
                            (key_id,)).fetchone()
        if r is not None:
            return r["session_id"], _key_entry(r)
        row = self.by_receipt_key(key_id)
        if row is None or not row.get("receipt_public_key"):
            return None
        return row["session_id"], {"epoch": 0, "key_id": key_id,
                                   "public_key": row["receipt_public_key"],
                                   "created_at": row["created_at"]}

    def events(self, session_id: str) -> list[dict]:
        rows = self.db.execute("SELECT seq, kind, hash, at FROM events WHERE session_id = ? "
                               "ORDER BY seq", (session_id,)).fetchall()
        return [dict(r) for r in rows]

    def prune(self, before: str, keep: Collection[str] = frozenset()) -> int:
        """Delete ended sessions (and their events) last updated before `before` (ISO
        time), except ids in `keep` (proofs still spooled).  Returns the count deleted."""
        rows = self.db.execute(
            "SELECT session_id FROM sessions WHERE status NOT IN (?, ?) AND updated_at < ?",
            (*LIVE_STATUSES, before)).fetchall()
        ids = [r[0] for r in rows if r[0] not in keep]
        with self.db:
            for sid in ids:
                self.db.execute("DELETE FROM events WHERE session_id = ?", (sid,))
                self.db.execute("DELETE FROM receipt_keys WHERE session_id = ?", (sid,))
                self.db.execute("DELETE FROM sessions WHERE session_id = ?", (sid,))
        return len(ids)

    def ended_unacked(self) -> list[dict]:
        """Ended sessions whose proof was never acknowledged: each must have a proof."""
        rows = self.db.execute("SELECT * FROM sessions WHERE status NOT IN (?, ?) AND "
                               "proof_acked_at IS NULL ORDER BY created_at",
                               LIVE_STATUSES).fetchall()
        return [_decode(r) for r in rows]

    def check(self) -> None:
        """Replay the backlog, then a write + read round trip (health `database`/rzl);
        raises on failure."""
        self.flush()
        stamp = iso_seconds()
        with self.db:
            self.db.execute("CREATE TABLE IF NOT EXISTS health (at TEXT)")
            self.db.execute("DELETE FROM health")
            self.db.execute("INSERT INTO health (at) VALUES (?)", (stamp,))
        if self.db.execute("SELECT at FROM health").fetchone()[0] != stamp:
            raise sqlite3.DatabaseError("journal read-back mismatch")

    def check_writable(self) -> bool:
        try:
            self.check()
            return True
        except sqlite3.Error:
            return False


_INSERT_KEY = ("INSERT OR IGNORE INTO receipt_keys (session_id, epoch, key_id, public_key, "
               "created_at, introduction) VALUES (?, ?, ?, ?, ?, ?)")


def _key_entry(r: sqlite3.Row) -> dict:
    out = {"epoch": r["epoch"], "key_id": r["key_id"], "public_key": r["public_key"],
           "created_at": r["created_at"]}
    if r["introduction"]:
        out["introduction"] = json.loads(r["introduction"])
    return out


def _encode(fields: dict) -> dict:
    unknown = set(fields) - _COLUMNS
    if unknown:  # column names are interpolated into SQL: only known ones
        raise ValueError(f"unknown journal columns: {sorted(unknown)}")
    out = dict(fields)
    for k in _JSON_COLUMNS:
        if k in out and out[k] is not None and not isinstance(out[k], str):
            out[k] = json.dumps(out[k], sort_keys=True)
    for k, v in out.items():
        if isinstance(v, Path):
            out[k] = str(v)
    return out


def _decode(row: sqlite3.Row) -> dict:
    out = dict(row)
    for k in _JSON_COLUMNS:
        if out.get(k):
            out[k] = json.loads(out[k])
    return out
