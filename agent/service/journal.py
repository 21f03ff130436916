"""Session journal (SPEC 11, 12): SQLite in WAL mode in the state directory.

It holds metadata only — what crash recovery needs to find a session's resources again
(holder pid + start time, cgroup paths, mount path, uid slot, namespaces) and the audit
chain's hashes.  Never commands, input or output.

Schema (docs/design.md): `sessions(session_id PK, customer_id, tier, classification,
jurisdiction, created_at, ttl_seconds, status, hostname, slot, host_uid, init_pid,
init_starttime, cgroup_paths JSON, mount_path, namespaces JSON, exec_count, updated_at,
receipt_key_id, receipt_public_key, reason)` and `events(session_id, seq, kind, hash, at)`.
A live session is one whose status is `active` or `executing`.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from agent.timefmt import iso_seconds

__all__ = ["LIVE_STATUSES", "Journal"]

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
    reason TEXT
);
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    hash TEXT NOT NULL,
    at TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE INDEX IF NOT EXISTS sessions_status ON sessions(status);
CREATE INDEX IF NOT EXISTS sessions_receipt_key ON sessions(receipt_key_id);
"""

_JSON_COLUMNS = ("cgroup_paths", "namespaces")
_COLUMNS = frozenset(
    "session_id customer_id tier classification jurisdiction created_at ttl_seconds status "
    "hostname slot host_uid init_pid init_starttime cgroup_paths mount_path namespaces "
    "exec_count updated_at receipt_key_id receipt_public_key reason".split())


class JournalUnavailable(RuntimeError):
    """The journal database cannot be opened in its state directory (the agent cannot start)."""


class Journal:
    """Synchronous and small: each call is one short transaction on the agent's thread."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "journal.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a process crash
            self.db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            # e.g. "disk I/O error" on a 9p or NFS state dir: WAL needs a shared-memory mmap
            raise JournalUnavailable(
                f"cannot open the journal {self.path}: {e} (the state directory must be on a "
                "local file system that supports SQLite's WAL mode: shared mmap and POSIX "
                "locks, not 9p or NFS)") from None
        self.path.chmod(0o600)

    def close(self) -> None:
        self.db.close()

    # -- writes ------------------------------------------------------------------------
    def insert_session(self, **fields: Any) -> None:
        fields = _encode(fields)
        fields.setdefault("updated_at", iso_seconds())
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        with self.db:
            self.db.execute(f"INSERT INTO sessions ({cols}) VALUES ({marks})",
                            tuple(fields.values()))

    def update_session(self, session_id: str, **fields: Any) -> None:
        fields = _encode(fields)
        fields["updated_at"] = iso_seconds()
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.db:
            self.db.execute(f"UPDATE sessions SET {sets} WHERE session_id = ?",
                            (*fields.values(), session_id))

    def add_event(self, session_id: str, seq: int, kind: str, hash_: str, at: str) -> None:
        with self.db:
            self.db.execute("INSERT INTO events (session_id, seq, kind, hash, at) "
                            "VALUES (?, ?, ?, ?, ?)", (session_id, seq, kind, hash_, at))

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
        """Alias used by crash recovery (docs/design.md, E: daemon hooks)."""
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

    def events(self, session_id: str) -> list[dict]:
        rows = self.db.execute("SELECT seq, kind, hash, at FROM events WHERE session_id = ? "
                               "ORDER BY seq", (session_id,)).fetchall()
        return [dict(r) for r in rows]

    def prune(self, before: str, keep: set[str] = frozenset()) -> int:
        """Delete ended sessions (and their events) last updated before `before` (ISO
        time), except ids in `keep` (proofs still spooled).  Returns the count deleted."""
        rows = self.db.execute(
            "SELECT session_id FROM sessions WHERE status NOT IN (?, ?) AND updated_at < ?",
            (*LIVE_STATUSES, before)).fetchall()
        ids = [r[0] for r in rows if r[0] not in keep]
        with self.db:
            for sid in ids:
                self.db.execute("DELETE FROM events WHERE session_id = ?", (sid,))
                self.db.execute("DELETE FROM sessions WHERE session_id = ?", (sid,))
        return len(ids)

    def check(self) -> None:
        """A write + read round trip (health `database`/rzl); raises on failure."""
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
