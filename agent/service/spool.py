"""Durable CDP spool (SPEC 8): `<state>/spool/<session_id>.json`.

A proof is written to a temporary file, fsynced, renamed into place and the directory
fsynced before `session.destroy` returns, so an acknowledged-by-nobody proof survives a
crash or restart.  `proof.ack` removes the file.  The stored document is
`{session_id, status, reason, cdp, auditproof, regulatory_context, session_context}`;
`proof.get` returns it as stored, so its `cdp` is the same object as destroy's.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from agent.durable import atomic_write, fsync_dir

__all__ = ["Spool"]

_NAME = re.compile(r"^sess_[0-9a-f]{16}\.json$")


class Spool:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "spool"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, session_id: str) -> Path:
        name = f"{session_id}.json"
        if not _NAME.match(name):
            raise ValueError("not a session id")
        return self.dir / name

    def put(self, session_id: str, record: dict) -> None:
        data = json.dumps(record, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")
        atomic_write(self._path(session_id), data, tmp=self.dir / f".{session_id}.tmp")

    def get(self, session_id: str) -> dict | None:
        try:
            return json.loads(self._path(session_id).read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    def get_bytes(self, session_id: str) -> bytes | None:
        try:
            return self._path(session_id).read_bytes()
        except (FileNotFoundError, ValueError):
            return None

    def ack(self, session_id: str) -> bool:
        try:
            self._path(session_id).unlink()
        except (FileNotFoundError, ValueError):
            return False
        fsync_dir(self.dir)
        return True

    def pending(self, limit: int | None = None, after: str | None = None) -> list[dict]:
        """Unacknowledged CDPs in session-id order; `after` (a session id) and `limit`
        select one page (proof.pending), so no answer holds the whole spool."""
        out = []
        floor = f"{after}.json" if after else ""
        for p in sorted(p for p in self.dir.iterdir() if p.name > floor):
            if limit is not None and len(out) >= limit:
                break
            if _NAME.match(p.name):
                try:
                    out.append(json.loads(p.read_bytes()))
                except (OSError, ValueError):
                    continue
        return out

    def depth(self) -> int:
        return sum(1 for p in self.dir.iterdir() if _NAME.match(p.name))

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
